"""bit_core: the BiT library — model, weights, data, BiT-HyperRule, training, export, evaluation.

Pure of the MLOps stack (no DVC, Prefect or MLflow): usable from a notebook as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bit_core.model import ResNetV2

__all__ = ["ResNetV2", "create_model", "fold_weight_standardization", "list_models"]

_FROM_MODEL = frozenset({"ResNetV2", "build_model", "fold_weight_standardization"})


def __getattr__(name: str):
    # torch loads on first use, so the configuration and data code imports in a blink.
    if name in _FROM_MODEL:
        from bit_core import model

        return getattr(model, name)
    if name == "list_models":
        from bit_core.variants import list_models

        return list_models
    raise AttributeError(f"module 'bit_core' has no attribute {name!r}")


def create_model(name: str, num_classes: int | None = None,
                 weights: str | Path | None = None) -> ResNetV2:
    """Build an official BiT variant, optionally with weights.

    Args:
        name: official variant name, e.g. ``BiT-M-R50x1`` (see :func:`list_models`).
        num_classes: head size of a new, zero-initialised head (as BiT fine-tunes), even when
            it is the upstream size; None keeps the upstream head (1000 classes for BiT-S,
            21843 for BiT-M), loaded from `weights`.
        weights: an official ``.npz`` or a checkpoint ``.pt`` written by this project (whose
            head is always loaded: it must have `num_classes`).
    """
    from bit_core.model import build_model
    from bit_core.weights import load_checkpoint_into, load_npz

    model = build_model(name, num_classes)
    if weights is None:
        return model
    if Path(weights).suffix == ".npz":
        return load_npz(model, Path(weights), head=num_classes is None)
    load_checkpoint_into(model, Path(weights))
    return model
