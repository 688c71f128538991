"""The pipeline as dvc.yaml defines it: the stages in order, their outputs and resume folders, and
the result files that the `bit` command and the flow show (a test checks dvc.yaml declares them)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from bit_core.contracts import EVALUATION, MLFLOW_RUN

EVAL_TABLE = "reports/eval/fps.md"
EVAL_METRICS = f"reports/eval/{EVALUATION}"
TRAIN_METRICS = "reports/train/metrics.json"
RUN_RECORD = f"models/finetuned/{MLFLOW_RUN}"
RESULTS = (EVAL_METRICS, EVAL_TABLE, "reports/eval/fps.png", "reports/eval/confusion.png",
           "reports/train/loss.png", "models/onnx/model.onnx", "models/om/manifest.json",
           "models/openvino/manifest.json")


def _stages(repo: Path) -> dict:
    return yaml.safe_load((Path(repo) / "dvc.yaml").read_text())["stages"]


def stages(repo: str | Path = ".") -> list[str]:
    """Stage names in dvc.yaml order (which is the pipeline's order)."""
    return list(_stages(Path(repo)))


def command(repo: str | Path, stage: str) -> str:
    """The stage's command line, as dvc.yaml gives it."""
    return _stages(Path(repo))[stage]["cmd"]


def _outputs(stage: dict) -> dict[str, bool]:
    """{path: whether DVC caches it} of one stage's outs, metrics and plots."""
    found = {}
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            found[path] = (options or {}).get("cache", True)
    return found


def outputs(repo: str | Path = ".", *, cached: bool | None = None) -> set[str]:
    """Declared outputs (outs, metrics, plots) of every stage; only the uncached ones with
    ``cached=False``, only the cached ones with ``cached=True``."""
    return {path for stage in _stages(Path(repo)).values()
            for path, is_cached in _outputs(stage).items() if cached is None or cached == is_cached}


def needs(repo: str | Path, stage: str) -> set[str]:
    """`stage` and every stage it depends on through their outputs, as `dvc repro <stage>`
    brings them up to date."""
    stages = _stages(Path(repo))
    made = {name: list(_outputs(s)) for name, s in stages.items()}
    found, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            deps = stages[name].get("deps", [])
            todo += [other for other, outs in made.items()
                     if any(dep == out or dep.startswith(f"{out}/") or out.startswith(f"{dep}/")
                            for dep in deps for out in outs)]
    return found


def tracked_stages(repo: str | Path = ".") -> list[str]:
    """The stages that log to the pipeline's MLflow run: those that depend on (that is, import)
    tasks/tracking.py."""
    return [name for name, stage in _stages(Path(repo)).items()
            if "tasks/tracking.py" in stage.get("deps", [])]


def resume_folders(repo: str | Path, stage: str) -> list[str]:
    """The folders `stage` keeps its checkpoints in between runs (its command's ``--resume-dir``:
    the fine-tune's ``models/resume``). They are not DVC outputs, so DVC neither removes them
    when the stage runs again nor keeps the stage out of its run cache."""
    argv = shlex.split(command(repo, stage))
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--resume-dir"]


def changing_sources(params: dict, repo: str | Path = ".") -> list[str]:
    """The fetch stages whose source can change while everything DVC tracks stays the same: a
    folder or a file of the user's outside the repository (DVC tracks its path, a parameter, not
    its contents). Each run reads them again where they are on this host; the stages after
    them run only when what they wrote changed. A host without them (a worker that trains what
    another host fetched) takes the fetched data as DVC restores it. Relative paths are the
    stages', from `repo`."""
    sources = (("fetch_data", "imagefolder", params["data"]["source"], params["data"]["folder"]),
               ("fetch_weights", "file", params["weights"]["source"], params["weights"]["path"]))
    return [stage for stage, kind, source, where in sources
            if source == kind and where and (Path(repo) / Path(where).expanduser()).exists()]


def locked_outputs(repo: str | Path, stage: str) -> list | None:
    """What dvc.lock records of `stage`'s outputs (paths and content hashes); None before it
    first ran."""
    lock = Path(repo) / "dvc.lock"
    if not lock.is_file():
        return None
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {}).get("outs")
