"""`bit predict`: classify image files with a registered model, an exported ONNX file or a
fine-tuned checkpoint, preprocessed exactly as the evaluation preprocesses the test split."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from bit_core.config import Params, RegistryConfig
from bit_core.errors import ConfigError
from bit_core.redact import redact
from bit_core.serving import ImageClassifier, ImageError, Prediction, load_image
from tasks.register import CHALLENGER, CHAMPION

BATCH = 32


@dataclass(frozen=True)
class Result:
    """One input path: its prediction, or why it could not be classified."""

    path: str
    prediction: Prediction | None = None
    error: str | None = None


class CheckpointClassifier(ImageClassifier):
    """A fine-tuned checkpoint, run by PyTorch, with the preprocessing of its record."""

    def __init__(self, checkpoint: Path):
        import torch

        from bit_core.record import ModelRecord
        from bit_core.weights import load_trained

        self.model, saved = load_trained(checkpoint)
        record = ModelRecord.of_checkpoint(saved)
        self.classes, self.resolution = record.classes, record.resolution
        self.mean = np.asarray(record.mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(record.std, np.float32).reshape(3, 1, 1)
        self._torch = torch

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            logits = self.model(self._torch.from_numpy(batch.astype(np.float32)))
            return self._torch.softmax(logits, dim=1).numpy()


def _registered_onnx(name: str, spec: str) -> Path:
    """The ONNX file of a registered version (`spec`: an alias or a version number)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks import environment, tracking

    tracking.configure()
    uri = f"models:/{name}@{spec}" if not spec.isdigit() else f"models:/{name}/{spec}"
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        raise ConfigError(f"no model {uri} in {redact(environment.tracking_uri())} "
                          f"({str(err).splitlines()[0]}): run the pipeline to register one, or "
                          "give a version number or an .onnx/.pt file") from None
    found = sorted(local.glob("artifacts/*.onnx"))
    if not found:
        raise ConfigError(f"{uri} has no ONNX file: it was registered by an older version of "
                          "the pipeline; re-run the register stage")
    return found[0]


def open_model(spec: str, params: Params | None) -> ImageClassifier:
    """A classifier for `spec`: champion, challenger, a version number, an .onnx or a .pt file."""
    path = Path(spec).expanduser()
    if path.suffix == ".onnx" or path.suffix == ".pt":
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist: give an exported .onnx or a "
                              "fine-tuned checkpoint.pt")
        return ImageClassifier(path) if path.suffix == ".onnx" else CheckpointClassifier(path)
    if spec in (CHAMPION, CHALLENGER) or spec.isdigit():
        name = (params.registry if params else RegistryConfig()).model_name
        return ImageClassifier(_registered_onnx(name, spec))
    raise ConfigError(f"--model {spec}: give champion, challenger, a version number, or an "
                      ".onnx / .pt file")


def image_paths(inputs: list[Path]) -> Iterator[Path]:
    """The files given, and the image files under the folders given (sorted)."""
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*")
                              if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        else:
            yield path


def predict(classifier: ImageClassifier, inputs: list[Path], top_k: int) -> list[Result]:
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


def _classify(classifier: ImageClassifier, pending: list, top_k: int, results: list) -> None:
    found = classifier.classify([image for _, _, image in pending], top_k)
    for (index, path, _), prediction in zip(pending, found, strict=True):
        results[index] = Result(str(path), prediction)
