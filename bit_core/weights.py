"""Official BiT checkpoints (`.npz`, TensorFlow layout) and their translation into `ResNetV2`.

The official files hold one array per variable, named like
``resnet/block1/unit01/a/standardized_conv2d/kernel``; kernels are HWIO, GroupNorm scales and
offsets are vectors, the head is a 1x1 conv with bias. Files are read with ``allow_pickle=False``:
an object array in a checkpoint is refused, never unpickled.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bit_core.errors import WeightsError
from bit_core.model import PreActBottleneck, ResNetV2, build_model
from bit_core.variants import get_variant

OFFICIAL_URL = "https://storage.googleapis.com/bit_models/{name}.npz"
PREFIX = "resnet/"
_CONV = "standardized_conv2d/kernel"
HEAD_KEYS = (f"{PREFIX}head/conv2d/kernel", f"{PREFIX}head/conv2d/bias")


def official_url(name: str) -> str:
    """Download address of the official checkpoint for a variant name such as BiT-M-R50x1."""
    get_variant(name)
    return OFFICIAL_URL.format(name=name)


def _unit_layout(unit: PreActBottleneck, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    for letter, conv, norm in (("a", unit.conv1, unit.gn1), ("b", unit.conv2, unit.gn2),
                               ("c", unit.conv3, unit.gn3)):
        yield f"{prefix}{letter}/{_CONV}", conv.weight
        yield f"{prefix}{letter}/group_norm/gamma", norm.weight
        yield f"{prefix}{letter}/group_norm/beta", norm.bias
    if unit.downsample is not None:
        yield f"{prefix}a/proj/{_CONV}", unit.downsample.weight


def npz_layout(model: ResNetV2) -> dict[str, torch.Tensor]:
    """Checkpoint key -> the model parameter it fills, for every parameter of the model."""
    layout = {f"{PREFIX}root_block/{_CONV}": model.root.conv.weight}
    for block_name, block in model.body.named_children():
        for unit_name, unit in block.named_children():
            layout.update(_unit_layout(unit, f"{PREFIX}{block_name}/{unit_name}/"))
    layout[f"{PREFIX}group_norm/gamma"] = model.norm.weight
    layout[f"{PREFIX}group_norm/beta"] = model.norm.bias
    layout[HEAD_KEYS[0]] = model.fc.weight
    layout[HEAD_KEYS[1]] = model.fc.bias
    return layout


def to_checkpoint_layout(tensor: torch.Tensor) -> np.ndarray:
    """Torch layout -> checkpoint layout (OIHW -> HWIO for kernels, vectors unchanged)."""
    array = tensor.detach().cpu().numpy()
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array


def _to_torch_layout(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(3, 2, 0, 1) if array.ndim == 4
                                                 else array))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file, read without unpickling; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: run `bit fetch-weights` or set "
                           "weights.path in params.yaml")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # numpy would take it for a pickle
        raise WeightsError(f"{path} is not an .npz file (not a zip archive): delete it and "
                           "download the official checkpoint again")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as err:
        if "pickle" in str(err):
            raise WeightsError(f"{path} holds a pickled object array; refusing to unpickle it — "
                               "use an official BiT .npz") from None
        raise WeightsError(f"{path} is not a valid .npz ({err}); download it again") from None
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise WeightsError(f"{path} is truncated or corrupt ({err}); delete it and download it "
                           "again") from None


def check_arrays(arrays: dict[str, np.ndarray], model: ResNetV2, source: str = "checkpoint"
                 ) -> bool:
    """Validate a checkpoint against `model`; return whether its head fits the model's classes.

    Every missing or unexpected key and every shape mismatch is reported in one error. The head
    may differ in class count only (it is then left out of loading).
    """
    layout = npz_layout(model)
    missing = sorted(set(layout) - set(arrays))
    unexpected = sorted(set(arrays) - set(layout))
    mismatched, head_fits = [], True
    for key, param in layout.items():
        if key not in arrays:
            continue
        shape = tuple(param.shape)
        want = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
        got = tuple(arrays[key].shape)
        if got == want:
            continue
        if key in HEAD_KEYS and got[:-1] == want[:-1]:
            head_fits = False
        else:
            mismatched.append(f"{key} has shape {got}, expected {want}")
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    problems += mismatched
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)"
                                           if len(problems) > 8 else "")
        raise WeightsError(f"{source} does not match the model: {shown}")
    return head_fits


@torch.no_grad()
def load_npz(model: ResNetV2, path: Path, head: bool = True) -> ResNetV2:
    """Load an official `.npz` into `model`, all or nothing.

    The upstream head is copied when `head` is asked for and its class count matches;
    otherwise the head is zero-initialised, as BiT fine-tunes from a zero head (an upstream
    head of the same size, BiT-S's 1000 ImageNet classes say, means nothing for other classes).
    """
    arrays = read_npz(path)
    keep = check_arrays(arrays, model, source=str(path)) and head
    for key, param in npz_layout(model).items():
        if key in HEAD_KEYS and not keep:
            continue
        param.copy_(_to_torch_layout(arrays[key]))
    if not keep:
        model.reset_classifier(model.num_classes)
    return model


def save_npz(model: ResNetV2, path: Path) -> None:
    """Write `model` in the official checkpoint layout (used for tests and conversions)."""
    arrays = {key: to_checkpoint_layout(p) for key, p in npz_layout(model).items()}
    np.savez(path, **arrays)


def verify_npz(path: Path, name: str) -> None:
    """Check a downloaded file by content: readable without pickle and shaped like `name`."""
    with torch.device("meta"):
        model = build_model(name)
    check_arrays(read_npz(path), model, source=f"{path} (for {name})")


def load_trained(path: Path) -> tuple[ResNetV2, dict]:
    """A fine-tuned model (eval mode) and its self-describing checkpoint, read without pickle;
    WeightsError in one line when the file is no such checkpoint (truncated, another format,
    weights that do not fit the model it names)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(checkpoint["model_name"], num_classes=checkpoint["num_classes"])
        model.load_state_dict(checkpoint["model"])
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 (torch.load's and load_state_dict's many failures)
        raise WeightsError(f"{path} is not a fine-tuned checkpoint this pipeline can read "
                           f"({type(err).__name__}): re-run the finetune stage") from None
    return model.eval(), checkpoint


def load_checkpoint_into(model: nn.Module, path: Path) -> dict:
    """Load one of our own `.pt` checkpoints (``weights_only=True``) into `model`; return it."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    return checkpoint


def fetch_official(name: str, cache_dir: Path, *, url: str | None = None,
                   sha256: str | None = None, progress: bool = True) -> Path:
    """Download (or reuse from `cache_dir`) the official checkpoint of `name`, verified by content.

    Args:
        name: official variant name.
        cache_dir: where downloads are kept between runs (resumed if interrupted).
        url: a mirror instead of the official address.
        sha256: expected digest, when known; otherwise the content check alone decides.
    """
    from bit_core.download import download

    dest = Path(cache_dir).expanduser() / f"{name}.npz"
    source = url or official_url(name)
    download(source, dest, sha256=sha256, progress=progress, what=f"{name}.npz", mirror=bool(url))
    try:
        verify_npz(dest, name)
    except WeightsError:
        dest.unlink(missing_ok=True)
        raise
    return dest
