"""Classify images with an exported model: decode, preprocess as the evaluation does, run ONNX
Runtime, answer with class names and probabilities.

Everything the model needs travels inside its ONNX file: the export stage writes the model
record (classes, input resolution, normalisation) into the file's metadata under RECORD_KEY.
This module needs nothing but numpy, Pillow and ONNX Runtime, so that a registered model that
carries it can be served anywhere those are installed.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RECORD_KEY = "bit.model"  # the ONNX metadata_props entry holding the model record
TOP_K = 5  # classes answered per image unless asked otherwise


class ImageError(ValueError):
    """An input that is not a usable image; the message names it and says why."""


ORIENTATION = 0x0112  # the EXIF tag cameras record how the picture is to be turned with
_TURNED = (5, 6, 7, 8)  # its values that swap width and height
BACKGROUND = (255, 255, 255)  # what transparent pixels are laid over


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright); 1 when the EXIF block cannot be read (a damaged one
    does not stop an image that decodes)."""
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - Pillow raises SyntaxError, ValueError, ... for bad EXIF
        return 1


def turned_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown: after the turn its EXIF orientation asks for."""
    width, height = image.size
    return (height, width) if _orientation(image) in _TURNED else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, as a viewer shows it.

    - Turned upright by its EXIF orientation (phone and camera photos are stored sideways with
      a tag saying so).
    - Transparent pixels laid over white (:data:`BACKGROUND`): a plain conversion keeps
      whatever colour happens to be stored under them, black in most files.
    - 16-bit grayscale (a 16-bit PNG or TIFF opens as mode I;16, or I) scaled from 0..65535 to
      0..255: Pillow's own conversion clips it at 255, which turns nearly every pixel white.

    Raises:
        ImageError: a floating-point image, whose range no file states.
    """
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        raise ImageError("a 32-bit floating-point image, whose range is unknown: save it as an "
                         "8- or 16-bit image")
    if image.mode == "I" or image.mode.startswith("I;16"):
        deep = np.asarray(image, dtype=np.float64)
        shown = Image.fromarray(np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8))
        if "transparency" in image.info:  # one 16-bit value marks transparent pixels
            alpha = np.where(deep == image.info["transparency"], 0, 255).astype(np.uint8)
            shown = Image.merge("LA", (shown, Image.fromarray(alpha)))
        image = shown
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, BACKGROUND + (255,)),
                                     image).convert("RGB")
    return image.convert("RGB")


def decode(data: bytes | str, name: str = "image") -> Image.Image:
    """An RGB image from encoded bytes (JPEG, PNG, ...) or their base64 text."""
    if isinstance(data, str):
        try:
            data = base64.b64decode("".join(data.split()), validate=True)  # wrapped lines too
        except (binascii.Error, ValueError):
            raise ImageError(f"{name}: not base64-encoded image bytes") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(image)
    except ImageError as err:
        raise ImageError(f"{name}: {err}") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: too large ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # Pillow's kinds
        reason = "not an image" if isinstance(err, UnidentifiedImageError) else f"broken ({err})"
        raise ImageError(f"{name}: {reason}") from None


def load_image(path: Path) -> Image.Image:
    """An RGB image from a file; ImageError naming the file when it is not one."""
    try:
        return decode(Path(path).read_bytes(), str(path))
    except OSError as err:
        raise ImageError(f"{path}: cannot read it ({err.strerror or err})") from None


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, most probable first."""

    classes: list[str]
    probabilities: list[float]


class ImageClassifier:
    """An exported model with its record: images or tensors in, class names out. It runs on ONNX
    Runtime; a subclass runs another back-end by overriding :meth:`logits`.

    Args:
        onnx_path: a model written by the export stage (its metadata holds the record).
        threads: ONNX Runtime intra-op threads (None: its default).
    """

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        if RECORD_KEY not in metadata:
            raise ImageError(f"{onnx_path} carries no model record: export it with the "
                             "export_onnx stage")
        self.use_record(json.loads(metadata[RECORD_KEY]))
        self.input = self.session.get_inputs()[0].name

    def use_record(self, record: dict) -> None:
        """Take the classes and the input (resolution, mean, std) from a model record."""
        self.classes: list[str] = list(record["classes"])
        self.resolution: int = record["resolution"]
        self.mean = np.asarray(record["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(record["std"], np.float32).reshape(3, 1, 1)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32: resized to the model's resolution (bilinear, as torchvision's Resize
        does for PIL images), scaled to [0, 1], normalised with the record's mean and std."""
        size = (self.resolution, self.resolution)
        pixels = np.asarray(to_rgb(image).resize(size, Image.BILINEAR), np.float32)
        return (pixels.transpose(2, 0, 1) / 255.0 - self.mean) / self.std

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Softmax over the classes for a (N, 3, H, W) batch of preprocessed images."""
        expected = (3, self.resolution, self.resolution)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ImageError(f"tensor of shape {list(batch.shape)}: the model takes "
                             f"[N, {', '.join(map(str, expected))}]")
        logits = self.logits(batch.astype(np.float32))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's logits for a float32 (N, 3, H, W) batch (ONNX Runtime here)."""
        return self.session.run(None, {self.input: batch})[0]

    def check_top_k(self, top_k: int | None) -> int:
        """`top_k` if the model has that many classes; None: :data:`TOP_K`, or every class
        when it has fewer."""
        if top_k is None:
            return min(TOP_K, len(self.classes))
        if not 1 <= top_k <= len(self.classes):
            raise ImageError(f"top-k {top_k}: the model has {len(self.classes)} classes; ask "
                             f"for 1 to {len(self.classes)}")
        return top_k

    def top(self, probabilities: np.ndarray, top_k: int | None = None) -> list[Prediction]:
        """The `top_k` classes of each row of `probabilities`."""
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :self.check_top_k(top_k)]
        return [Prediction([self.classes[i] for i in row], [float(p[i]) for i in row])
                for row, p in zip(order, probabilities, strict=True)]

    def classify(self, images: list[Image.Image], top_k: int | None = None) -> list[Prediction]:
        """The top classes of each image."""
        if not images:
            return []
        batch = np.stack([self.preprocess(image) for image in images])
        return self.top(self.probabilities(batch), top_k)
