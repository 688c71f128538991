"""``python -m bench``: run the benchmarks (see ``python -m bench --help``)."""

import os
import sys

# Before torch (and its libgomp) loads. With the default wait policy idle OpenMP workers spin;
# on a machine shared with other jobs they steal the cores the busy workers need, and every
# parallel region waits for a descheduled thread. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.suite import main  # noqa: E402

sys.exit(main())
