"""``python -m bench``: run the benchmarks (see ``python -m bench --help``)."""

import os
import sys

# Before torch (and its libgomp) loads. The variants of a section take turns batch by batch, so
# torch's idle OpenMP workers must neither spin on through the next variant's batch (with
# OMP_WAIT_POLICY=ACTIVE, OpenVINO int8 at batch 32 lost a third of its speed to them) nor sleep
# between torch's own ops (with PASSIVE, compiled torch at batch 1 ran at 40% of its speed): they
# spin GOMP_SPINCOUNT rounds, a short while against one batch, then sleep. Settings in the
# environment win.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

from bench.suite import main  # noqa: E402

sys.exit(main())
