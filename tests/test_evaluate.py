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


def test_a_compiled_back_end_is_timed_at_each_batch_size_and_padded_only_for_accuracy(
        monkeypatch):
    """The compiled back-end's accuracy pass feeds one shape (the split's last, shorter batch
    padded), but its images/s at batch 1 must be a batch of 1: its speed rows were all timed on
    padded batches of 64. `compiled_predictor` is swapped for the eager one (the wiring is what
    is checked; compiling takes ~20 s a shape)."""
    import torch

    import tasks.evaluate as stage
    from bit_core.backends import Backend, Plan
    from bit_core.config import EvaluateConfig
    from bit_core.device import cpu_units
    from bit_core.evaluate import torch_predictor
    from bit_core.model import build_model

    seen: list[int] = []

    def eager(model, device, precision):
        inner = torch_predictor(model, device, "fp32")
        return lambda batch: (seen.append(len(batch)), inner(batch))[1]

    monkeypatch.setattr(stage, "compiled_predictor", eager)
    compiled = Backend("torch_compiled", "bf16")
    factories = stage._factories(Plan((compiled,), {}), build_model("BiT-M-R50x1", num_classes=3),
                                 None, None, torch.device("cpu"), cpu_units(), None)
    cfg = EvaluateConfig(batch_sizes=[1, 2], warmup=0, repeats=1)
    rows = stage._speed(factories, [compiled.name], 16, cfg)
    assert [row["batch"] for row in rows] == [1, 2] and set(seen) == {1, 2}
    seen.clear()
    images = torch.zeros(3, 3, 16, 16)
    stage._measure(factories, [(images, torch.tensor([0, 1, 2]))], {compiled.name})
    assert seen == [stage.ACCURACY_BATCH]
