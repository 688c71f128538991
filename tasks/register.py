"""Stage register: the ONNX model into the MLflow Model Registry, as champion or challenger.

Versions compete only with versions trained and tested on the same prepared data (the same
source, splits and classes): a top-1 on the digits says nothing about a CIFAR-10 model. Among
those, the champion is the version that would hold the title had they been registered one after
another: a version whose ONNX parity passed takes it when its test metric is at least the
holder's plus the margin. When the current champion was trained on other data the new version
is the ``challenger``, and the record says why. ``models:/<name>@champion`` names the model to
deploy; give each data set its own ``registry.model_name`` (the presets do).

Two registers at the same time (the nightly gpu and npu runs) cannot leave a wrong champion:
each one, after registering, recomputes the champion from all the versions and moves the alias
until what it reads back is what the rule gives. The rule depends only on the set of versions,
so whichever register writes last writes the same answer.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bit_core import serving

from bit_core.config import Params
from bit_core.contracts import (IR_MANIFEST, EvaluationMetrics, ExportReport, IRManifest, IRStatus,
                                onnx_files)
from bit_core.record import ModelRecord
from bit_core.errors import ConfigError
from bit_core.io import atomic_write_json
from bit_core.splits import fingerprint
from tasks import tracking
from tasks.common import log, stage_main

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG, PARITY_TAG = "test_metric", "parity_ok"
SOURCE_TAG, DATA_TAG = "data.source", "data.fingerprint"
SETTLE_ROUNDS = 20  # alias moves before giving up; two racing registers need two or three


@dataclass(frozen=True)
class Candidate:
    """A registered version as the champion rule sees it."""

    version: int
    metric: float
    parity_ok: bool
    data: str | None  # fingerprint of the prepared data; None for versions without one


def choose_champion(candidates: list[Candidate], margin: float) -> int | None:
    """The champion had `candidates` been registered one after another, or None."""
    best = None
    for c in sorted(candidates, key=lambda c: c.version):
        if c.parity_ok and (best is None or c.metric >= best.metric + margin):
            best = c
    return best.version if best else None


def _candidate(version) -> Candidate:
    tags = version.tags
    return Candidate(int(version.version), float(tags.get(METRIC_TAG, "nan")),
                     tags.get(PARITY_TAG) == "True", tags.get(DATA_TAG))


def _holder(client, name: str) -> Candidate | None:
    """The version the champion alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _candidate(client.get_model_version_by_alias(name, CHAMPION))
    except MlflowException:
        return None


def settle_champion(client, name: str, mine: Candidate, margin: float) -> tuple[str, str | None]:
    """Move the champion alias to what the rule gives for `mine`'s data; return (alias of
    `mine`, why it cannot compete or None)."""
    for _ in range(SETTLE_ROUNDS):
        holder = _holder(client, name)
        if holder is not None and holder.data != mine.data:
            return CHALLENGER, (f"champion version {holder.version} of {name} was trained on other "
                                "data (or has no data fingerprint), so it is not compared: set registry.model_name for this "
                                "data set, or move the alias yourself")
        same = [c for c in map(_candidate, client.search_model_versions(f"name='{name}'"))
                if c.data == mine.data]
        want = choose_champion(same, margin)
        if want is None or (holder is not None and holder.version == want):
            break
        client.set_registered_model_alias(name, CHAMPION, str(want))
    final = _holder(client, name)
    return (CHAMPION if final and final.version == mine.version else CHALLENGER), None


def _example_image() -> str:
    """A small PNG as base64 text: the input example of the logged model."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 160, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _log_model(mlflow, onnx_path: Path, classes: int, ir_dir: Path | None = None,
               evaluation: Path | None = None):
    """The self-contained image model (tasks/mlflow_model.py, with the ONNX file and bit_core's
    serving code inside, and the OpenVINO IR beside them when `ir_dir` is given) logged to the
    active run, with `evaluation`, the metrics that `bit predict` chooses its back-end by: the
    run's own may hold an earlier evaluation's numbers for a back-end that this one dropped."""
    import onnxruntime
    import pandas as pd
    import PIL
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    example = pd.DataFrame({"image": [_example_image()]})
    signature = infer_signature(example, params={"top_k": min(serving.TOP_K, classes)})
    signature.inputs = Schema([ColSpec(AnyType(), "image")])  # encoded image or tensor
    requirements = [f"mlflow=={mlflow.__version__}", f"onnxruntime=={onnxruntime.__version__}",
                    f"pillow=={PIL.__version__}", f"numpy=={np.__version__}",
                    f"pandas=={pd.__version__}"]
    with tempfile.TemporaryDirectory() as code:  # bit_core's serving module, and only it
        package = Path(code) / "bit_core"
        package.mkdir()
        (package / "__init__.py").write_text('"""The serving part of bit_core."""\n')
        shutil.copyfile(serving.__file__, package / "serving.py")
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")),
            artifacts={"onnx": str(onnx_path), **_weights_beside(onnx_path),
                       **({"openvino": str(ir_dir)} if ir_dir else {}),
                       **({"evaluation": str(evaluation)} if evaluation else {})},
            code_paths=[str(package)],
            signature=signature, input_example=example, pip_requirements=requirements)


def _weights_beside(onnx_path: Path) -> dict[str, str]:
    """The model's weights file as an artifact, when the graph keeps them apart (over ~1.8 GB):
    copied beside the graph, where ONNX Runtime looks for them."""
    return {"onnx_weights": str(file) for file in onnx_files(onnx_path)[1:]}


def _built_ir(ir_dir: Path | None) -> Path | None:
    """`ir_dir` when compile_openvino built IR there, else None."""
    if ir_dir is None:
        return None
    manifest = IRManifest.read(ir_dir / IR_MANIFEST, "compile_openvino")
    return ir_dir if manifest.status is IRStatus.BUILT else None


def register(params: Params, onnx_path: Path, checkpoint_dir: Path, eval_metrics: Path,
             export_report: Path, splits: Path, out: Path, ir_dir: Path | None = None) -> dict:
    """Log the ONNX model (and the OpenVINO IR in `ir_dir`, when built) to the run, register a
    version, settle the aliases; write `out`."""
    cfg = params.registry
    metrics = EvaluationMetrics.read(eval_metrics, "evaluate").values()
    if cfg.metric not in metrics:
        raise ConfigError(f"registry.metric {cfg.metric!r} is not in {eval_metrics}: choose one of "
                          f"{', '.join(k for k in metrics if 'top' in k)}")
    value = metrics[cfg.metric]
    parity = ExportReport.read(export_report, "export_onnx").max_diff_to_tolerance <= 1
    data = fingerprint(splits)
    with tracking.appended_run(checkpoint_dir) as mlflow:
        if mlflow is None:
            raise FileNotFoundError(f"no MLflow run recorded in {checkpoint_dir}: run finetune")
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        record = ModelRecord.of_onnx(onnx_path)  # a model without its record is refused here
        info = _log_model(mlflow, onnx_path, len(record.classes), _built_ir(ir_dir),
                          eval_metrics)
        before = _holder(client, cfg.model_name)
        version = mlflow.register_model(info.model_uri, cfg.model_name, tags={
            METRIC_TAG: str(value), PARITY_TAG: str(parity), SOURCE_TAG: params.data.source,
            DATA_TAG: data})
        mine = Candidate(int(version.version), value, parity, data)
        alias, note = settle_champion(client, cfg.model_name, mine, cfg.margin)
        if alias == CHALLENGER:
            client.set_registered_model_alias(cfg.model_name, CHALLENGER, version.version)
        mlflow.set_tags({"registry.version": version.version, "registry.alias": alias})
        mlflow.set_tags(tracking.dvc_out_hashes(running="register"))  # this run's
    record = {"model_name": cfg.model_name, "version": mine.version, "alias": alias,
              "metric": cfg.metric, "value": value,
              "previous_champion": before.metric if before and before.data == data else None,
              "parity_ok": parity, "data_source": params.data.source, "data_fingerprint": data,
              "note": note}
    atomic_write_json(out, record)
    return record


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", type=Path, required=True, help="exported model.onnx")
    parser.add_argument("--checkpoint", type=Path, required=True, help="finetune output dir")
    parser.add_argument("--metrics", type=Path, required=True, help="evaluate metrics.json")
    parser.add_argument("--export-report", type=Path, required=True, help="export report")
    parser.add_argument("--splits", type=Path, required=True, help="prepare output dir")
    parser.add_argument("--openvino", type=Path, help="compile_openvino output dir")
    parser.add_argument("--out", type=Path, required=True, help="registry decision JSON")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Register the model and move the champion alias if it earned it."""
    record = register(params, args.onnx, args.checkpoint, args.metrics, args.export_report,
                      args.splits, args.out, args.openvino)
    log.info("registered %s version %d as %s (%s = %.2f, champion had %s)",
             record["model_name"], record["version"], record["alias"], record["metric"],
             record["value"], record["previous_champion"])
    if record["note"]:
        log.info("%s", record["note"])


def main(argv=None) -> int:
    return stage_main("register", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
