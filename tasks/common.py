"""What every stage entry point shares: reading params.yaml and failing with one clear line."""

from __future__ import annotations

import argparse
import contextlib
import errno
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
    except OSError as err:
        if err.errno not in HOST_FIXES:  # a defect of ours: the traceback is the report
            raise
        print(error_line(name, host_error(err, getattr(args, "out", None))), file=sys.stderr)
        return 2
    except Terminated:
        print(error_line(name, "stopped by SIGTERM; nothing half-written is left: run it again"),
              file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:  # called in-process (tests, a flow): leave SIGTERM as it was
            signal.signal(signal.SIGTERM, previous)
    return 0


# Errors of the host rather than of the stage, and what the user does about each.
HOST_FIXES = {
    errno.ENOSPC: "free space on that file system, or move the data, the DVC cache or TMPDIR "
                  "to a larger one",
    errno.EDQUOT: "free space within your quota, or write to another file system",
    errno.EACCES: "make that path readable and writable by you, or use another one",
    errno.EPERM: "make that path readable and writable by you, or use another one",
    errno.EROFS: "that file system is read-only: write to another one",
    errno.EFBIG: "a limit on file size (the file system's, or `ulimit -f`) is in the way: raise "
                 "it, or write to another file system",
}


def host_error(err: OSError, writing: Path | None = None) -> str:
    """One line for an OSError in :data:`HOST_FIXES`: what failed, where (the files it names;
    else `writing`, the stage's output: a failed write names no file), and the fix."""
    where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name) or \
        (f"writing {writing}" if writing else "")
    return f"{err.strerror or err}{f': {where}' if where else ''}: {HOST_FIXES[err.errno]}"


def error_line(name: str, err: BaseException) -> str:
    """How a stage reports an error that is the user's to fix: one line."""
    return f"error: {name}: {redact(str(err))}"


def exit_now(name: str, err: BaseException) -> NoReturn:
    """Report `err` as :func:`stage_main` does and end this process at once, from any thread."""
    print(error_line(name, err), file=sys.stderr, flush=True)
    os._exit(2)
