"""The evaluation's own measuring helpers (bit_core.evaluate)."""

from __future__ import annotations

import subprocess
import sys
import time

from bit_core.evaluate import cpu_used_elsewhere

SPIN = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"


def test_cpu_used_elsewhere_counts_another_process():
    import psutil

    cpus = psutil.cpu_count() or 1
    share = cpu_used_elsewhere()
    child = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:  # this process busy meanwhile, as an evaluation is
            pass
    finally:
        child.wait(timeout=30)
    busy = share()
    # one spinning process for ~the whole window is ~1/cpus of the host's time (less its start-up)
    assert 50 / cpus <= busy <= 100, busy
