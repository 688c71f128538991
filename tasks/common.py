"""What every stage entry point shares: reading params.yaml and failing with one clear line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from bit_core.config import Params, load_params
from bit_core.errors import USER_ERRORS
from bit_core.redact import redact
from tasks import environment

log = logging.getLogger("bit")


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
    environment.apply()  # before any tool is imported: some read their settings at import
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    try:
        run(args, read_params())
    except USER_ERRORS as err:
        print(error_line(name, err), file=sys.stderr)
        return 2
    return 0


def error_line(name: str, err: BaseException) -> str:
    """How a stage reports an error that is the user's to fix: one line."""
    return f"error: {name}: {redact(str(err))}"


def exit_now(name: str, err: BaseException) -> NoReturn:
    """Report `err` as :func:`stage_main` does and end this process at once, from any thread."""
    print(error_line(name, err), file=sys.stderr, flush=True)
    os._exit(2)
