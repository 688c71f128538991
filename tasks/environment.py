"""What the project's processes take from their environment, defined once.

- The tools' telemetry is off (everything here runs offline or on private hosts), and importing
  torch does not try to load an accelerator back-end on its own (``torch_npu`` is imported only
  when ``device: npu`` asks for it).
- ``mlflow server`` and ``mlflow ui`` run without MLflow's server-side jobs: the project uses none
  of the features they serve (GenAI evaluation and trace roll-ups), and with them on the server
  starts eight more processes beside the web server (a job runner and its seven consumers), each
  a Python of its own.
- The default MLflow store is ``mlflow.db`` at the repository root, the directory the stages run
  in; ``MLFLOW_TRACKING_URI`` points elsewhere (a shared server).
- Commands started for the pipeline (``dvc``, and the ``python`` of dvc.yaml's commands) are
  this interpreter's, whatever the caller's PATH says.

Shell scripts take the same settings with ``eval "$(python -m tasks.environment)"``.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

TOOL_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "NNCF_CI": "1",  # NNCF's switch for its usage statistics (OpenVINO's are sent only by ovc,
                     # its converter, which the pipeline does not use: it reads the ONNX itself)
    "ORT_DISABLE_TELEMETRY": "1",  # ONNX Runtime's (on Linux and macOS since 1.29): read when it
                                   # starts, so no device id, event queue or upload
    "TORCH_DEVICE_BACKEND_AUTOLOAD": "0",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def apply() -> None:
    """Put TOOL_ENV into this process's environment (and so its children's)."""
    os.environ.update(TOOL_ENV)


def tool_path() -> str:
    """PATH with this interpreter's bin directory first."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def tool_env() -> dict[str, str]:
    """The environment for a command the pipeline starts: TOOL_ENV and this interpreter's tools
    first on PATH."""
    return {**os.environ, **TOOL_ENV, "PATH": tool_path()}


def tool(name: str) -> str:
    """A console script installed beside this interpreter (dvc, mlflow, prefect), else `name`."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def tracking_uri(root: str | Path = ".") -> str:
    """The MLflow store of a pipeline run in `root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def is_server(uri: str | None) -> bool:
    """Whether an MLflow tracking URI is a server (http or https), not a store on this disk."""
    return bool(uri) and uri.lower().startswith(("http://", "https://"))


def missing_store(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store that does not exist yet (MLflow would create it on
    first use); None for an existing file or any other kind of store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///"))
    return None if path.exists() else path


if __name__ == "__main__":
    print("\n".join(f"export {key}={shlex.quote(value)}" for key, value in TOOL_ENV.items()))
