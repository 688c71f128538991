"""`bit predict`: classify image files with a registered model, an exported ONNX file or a
fine-tuned checkpoint, preprocessed exactly as the evaluation preprocesses the test split."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from bit_core.backends import serving_backend
from bit_core.config import Params, RegistryConfig
from bit_core.device import cpu_units
from bit_core.errors import ConfigError
from bit_core.redact import redact
from bit_core.serving import ImageClassifier, ImageError, Prediction, load_image
from bit_core.splits import images_in
from tasks.register import CHALLENGER, CHAMPION

BATCH = 32


@dataclass(frozen=True)
class Result:
    """One input path: its prediction, or why it could not be classified."""

    path: str
    prediction: Prediction | None = None
    error: str | None = None


class RuntimeClassifier(ImageClassifier):
    """A model with its record, run by any numpy predictor: the back-end chosen for this host."""

    def __init__(self, record, predict, backend: str):
        self.use_record(record.model_dump())
        self._predict, self.backend = predict, backend

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._predict(batch)


def checkpoint_classifier(checkpoint: Path) -> RuntimeClassifier:
    """A fine-tuned checkpoint run by PyTorch (the back-end chosen among torch's)."""
    import torch

    from bit_core.evaluate import torch_predictor
    from bit_core.model import fold_weight_standardization
    from bit_core.record import ModelRecord
    from bit_core.weights import load_trained

    model, saved = load_trained(checkpoint)
    backend = serving_backend(cpu_units(), None, BATCH, runtimes=("torch",))
    predict = torch_predictor(fold_weight_standardization(model), torch.device("cpu"),
                              backend.precision, channels_last=backend.precision != "fp32")
    return RuntimeClassifier(ModelRecord.of_checkpoint(saved), predict, backend.name)


def exported_classifier(onnx_path: Path, ir_dir: Path | None = None,
                        metrics: dict[str, float] | None = None) -> ImageClassifier:
    """An exported model (with the OpenVINO IR the compile stage built beside it, if any) run
    by the back-end that :func:`bit_core.backends.serving_backend` chooses for this CPU from
    the model's evaluation `metrics`."""
    from bit_core.contracts import IR_MANIFEST, IRManifest, IRStatus

    manifest = IRManifest.read(ir_dir / IR_MANIFEST, "compile_openvino") \
        if ir_dir is not None and (ir_dir / IR_MANIFEST).is_file() else None
    built = manifest is not None and manifest.status is IRStatus.BUILT
    backend = serving_backend(
        cpu_units(), metrics, BATCH, openvino_ir=None if built else "no OpenVINO IR",
        int8_ir=None if built and "int8" in manifest.files else "no int8 IR")
    if backend.runtime == "onnxruntime":
        return ImageClassifier(onnx_path)
    from bit_core.openvino_ir import inference_precision, ir_predictor
    from bit_core.record import ModelRecord

    predict = ir_predictor(manifest.ir(ir_dir, backend.precision),
                           inference_precision(backend.precision, cpu_units()))
    return RuntimeClassifier(ModelRecord.of_onnx(onnx_path), predict, backend.name)


def _registered(name: str, spec: str, into: Path) -> tuple[Path, Path | None, dict[str, float]]:
    """The ONNX file of a registered version (`spec`: an alias or a version number), the
    OpenVINO IR registered with it (or None) and its evaluation's metrics (registered with it;
    those of its run for a version registered without them). A store on this disk is read in
    place; a remote one is downloaded under `into`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks import environment, tracking

    uri = f"models:/{name}@{spec}" if not spec.isdigit() else f"models:/{name}/{spec}"
    if (store := environment.missing_store(environment.tracking_uri())) is not None:
        raise ConfigError(f"no model {uri}: there is no MLflow store here ({store}): run the "
                          "pipeline here first, or give an .onnx/.pt file")
    tracking.configure()
    try:
        client = mlflow.MlflowClient()
        version = client.get_model_version(name, spec) if spec.isdigit() else \
            client.get_model_version_by_alias(name, spec)
        source = client.get_model_version_download_uri(name, version.version)
        local = Path(url2pathname(urlparse(source).path)) if urlparse(source).scheme in \
            ("", "file") else Path(mlflow.artifacts.download_artifacts(source, dst_path=into))
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    except MlflowException as err:
        raise ConfigError(f"no model {uri} in {redact(environment.tracking_uri())} "
                          f"({str(err).splitlines()[0]}): run the pipeline to register one, or "
                          "give a version number or an .onnx/.pt file") from None
    found = sorted(local.glob("artifacts/*.onnx"))
    if not found:
        raise ConfigError(f"{uri} has no ONNX file: it was registered by an older version of "
                          "the pipeline; re-run the register stage")
    from bit_core.contracts import EVALUATION, IR_MANIFEST, EvaluationMetrics

    ir = sorted(local.glob(f"artifacts/*/{IR_MANIFEST}"))  # the IR folder, under its own name
    if (local / "artifacts" / EVALUATION).is_file():
        metrics = EvaluationMetrics.read(local / "artifacts" / EVALUATION, "evaluate").values()
    return found[0], ir[0].parent if ir else None, metrics


def open_model(spec: str, params: Params | None) -> ImageClassifier:
    """A classifier for `spec`: champion, challenger, a version number, an .onnx or a .pt file;
    run by the fastest correct back-end of this CPU (:func:`exported_classifier`)."""
    path = Path(spec).expanduser()
    if path.suffix == ".onnx" or path.suffix == ".pt":
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist: give an exported .onnx or a "
                              "fine-tuned checkpoint.pt")
        try:
            return exported_classifier(path) if path.suffix == ".onnx" else \
                checkpoint_classifier(path)
        except ImageError:
            raise  # an ONNX file without the export's model record: its own message
        except Exception as err:  # noqa: BLE001 (whatever ONNX Runtime or torch.load refuses)
            kind = "an exported ONNX model" if path.suffix == ".onnx" else "a fine-tuned checkpoint"
            raise ConfigError(f"model file {path} is not {kind} this pipeline can read "
                              f"({type(err).__name__}): give models/onnx/model.onnx or "
                              "models/finetuned/checkpoint.pt") from None
    if spec in (CHAMPION, CHALLENGER) or spec.isdigit():
        name = (params.registry if params else RegistryConfig()).model_name
        # The classifier holds the model in memory once built, so a download from a remote
        # store (ONNX and IR, some 200 MB) goes with this folder instead of staying behind.
        with tempfile.TemporaryDirectory(prefix="bit-model-") as download:
            return exported_classifier(*_registered(name, spec, Path(download)))
    raise ConfigError(f"--model {spec}: give champion, challenger, a version number, or an "
                      ".onnx / .pt file")


def image_paths(inputs: list[Path]) -> Iterator[Path]:
    """The files given, and the image files under the folders given (sorted; hidden files and
    folders skipped, as a data folder's are)."""
    for path in inputs:
        if path.is_dir():
            yield from images_in(path)
        else:
            yield path


def predict(classifier: ImageClassifier, inputs: list[Path], top_k: int | None = None
            ) -> list[Result]:
    """Classify every image under `inputs`, in order; unreadable ones are results with an
    error."""
    classifier.check_top_k(top_k)
    results: list[Result | None] = []
    pending: list[tuple[int, Path, object]] = []
    for path in image_paths(inputs):
        try:
            pending.append((len(results), path, load_image(path)))
            results.append(None)
        except ImageError as err:
            results.append(Result(str(path), error=str(err).removeprefix(f"{path}: ")))
        if len(pending) == BATCH:
            _classify(classifier, pending, top_k, results)
            pending = []
    _classify(classifier, pending, top_k, results)
    return results


def _classify(classifier: ImageClassifier, pending: list, top_k: int | None,
              results: list) -> None:
    found = classifier.classify([image for _, _, image in pending], top_k)
    for (index, path, _), prediction in zip(pending, found, strict=True):
        results[index] = Result(str(path), prediction)
