"""``python -m bench``: run the benchmark suite (see ``python -m bench --help``)."""

import os
import sys

# Must happen before torch (and its libgomp) is imported. With the default wait policy, idle
# OpenMP workers spin; on a machine shared with other jobs they then steal the cores the busy
# workers need, and every parallel region waits for a descheduled thread: a batch-1 forward of
# R50x1 measured 3.5 s with 2 threads against 0.28 s with PASSIVE. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet

from bench.suite import main  # noqa: E402

sys.exit(main())
