"""``python -m bench``: run the benchmarks (see ``python -m bench --help``)."""

import os
import sys

from bench import THREAD_ENV  # bench/__init__ imports nothing that loads torch

for key, value in THREAD_ENV.items():
    os.environ.setdefault(key, value)

from bench.suite import main  # noqa: E402

sys.exit(main())
