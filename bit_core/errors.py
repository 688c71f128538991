"""The errors that are the user's to fix, in one place.

Each message is one line naming the problem and the fix. A stage entry point prints such an
error as that line and exits with status 2, without a traceback; any other exception is a bug
and keeps its traceback. The modules that raise them import them from here, so the list below
is complete by construction and the entry plumbing needs nothing else of the library.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """params.yaml is unusable; the message names the key and what to do."""


class ContractError(ValueError):
    """A stage's output is missing or not what this code expects; the message says what to run."""


class DataError(ValueError):
    """Unusable input data; the message names the file or folder and the fix."""


class DeviceError(RuntimeError):
    """The requested device cannot be used here; the message says what to install or set."""


class DownloadError(RuntimeError):
    """A download failed; the message names the URL (credentials redacted) and the fix."""


class ParityError(AssertionError):
    """ONNX Runtime does not reproduce PyTorch's logits within tolerance."""


class OMError(RuntimeError):
    """ATC or ais_bench cannot run or failed; the message says what went wrong and what to do."""


class Interrupted(RuntimeError):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""


class ClusterError(RuntimeError):
    """Training processes on several hosts could not meet, or one of them was lost; the message
    names the rendezvous or the lost process and what to do."""


class Diverged(ArithmeticError):
    """Training's loss stopped being a finite number; the message says at which step and what
    to change."""


class WeightsError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the problem and the fix."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, ContractError, DataError, DeviceError, DownloadError, ParityError, OMError,
    Interrupted, ClusterError, WeightsError, Diverged, FileNotFoundError)
