"""What every stage entry point shares: reading params.yaml and failing with one clear line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
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


class Terminated(BaseException):
    """SIGTERM, raised wherever the stage is (a BaseException, so no ``except Exception`` on the
    way swallows it)."""


def _terminated(signum: int, frame: object) -> NoReturn:
    raise Terminated()


def stage_main(name: str, configure: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace, Params], object],
               argv: Sequence[str] | None = None, *, sigterm_cleans_up: bool = True) -> int:
    """Parse a stage's path arguments, load params.yaml, run it; one-line errors, exit 2.

    SIGTERM (how a Prefect flow or a job scheduler stops a stage) ends the stage as Ctrl-C does:
    the temporary files and folders of what it was writing are removed on the way out, where
    Python's default would end the process there and leave them. A stage that handles stop
    signals itself (the fine-tune checkpoints) passes ``sigterm_cleans_up=False``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=run.__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    environment.apply()  # before any tool is imported: some read their settings at import
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    previous = None
    if sigterm_cleans_up:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        run(args, read_params())
    except USER_ERRORS as err:
        print(error_line(name, err), file=sys.stderr)
        return 2
    except Terminated:
        print(error_line(name, "stopped by SIGTERM; nothing half-written is left: run it again"),
              file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:  # called in-process (tests, a flow): leave SIGTERM as it was
            signal.signal(signal.SIGTERM, previous)
    return 0


def error_line(name: str, err: BaseException) -> str:
    """How a stage reports an error that is the user's to fix: one line."""
    return f"error: {name}: {redact(str(err))}"


def exit_now(name: str, err: BaseException) -> NoReturn:
    """Report `err` as :func:`stage_main` does and end this process at once, from any thread."""
    print(error_line(name, err), file=sys.stderr, flush=True)
    os._exit(2)
