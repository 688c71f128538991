"""What every stage entry point shares: reading params.yaml and failing with one clear line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bit_core.config import ConfigError, Params, load_params

# Errors that are the user's to fix: printed as one line, exit status 2, no traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)

log = logging.getLogger("bit")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as a one-line message rather than a traceback."""
    from bit_core.data import DataError
    from bit_core.device import DeviceError
    from bit_core.download import DownloadError
    from bit_core.export import ParityError
    from bit_core.om import OMError
    from bit_core.train import Interrupted
    from bit_core.weights import WeightsError

    return _USER_ERRORS + (DataError, DeviceError, DownloadError, Interrupted, OMError,
                          ParityError, WeightsError)


def params_path() -> Path:
    """params.yaml of the current working directory (BIT_PARAMS overrides, for tests)."""
    return Path(os.environ.get("BIT_PARAMS", "params.yaml"))


def read_params() -> Params:
    return load_params(params_path())


def stage_main(name: str, configure: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace, Params], object],
               argv: Sequence[str] | None = None) -> int:
    """Parse a stage's path arguments, load params.yaml, run it; one-line errors, exit 2."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=run.__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    try:
        run(args, read_params())
    except user_errors() as err:
        print(f"error: {name}: {err}", file=sys.stderr)
        return 2
    return 0
