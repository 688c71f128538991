"""The official BiT architectures by name (``BiT-M-R50x1`` and the rest): their shapes and the
head size of their upstream checkpoints. Kept apart from :mod:`bit_core.model` so that checking
a name (params.yaml's ``model.name``) needs no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """An official BiT architecture."""

    block_units: tuple[int, int, int, int]
    width_factor: int
    upstream_classes: int  # head size of the official checkpoint


_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_SHAPES = [(50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4)]
# BiT-S is pretrained on ILSVRC-2012 (1000 classes), BiT-M on ImageNet-21k (21843 classes).
_UPSTREAM = {"S": 1000, "M": 21843}

VARIANTS: dict[str, Variant] = {
    f"BiT-{tier}-R{depth}x{width}": Variant(_DEPTHS[depth], width, classes)
    for tier, classes in _UPSTREAM.items()
    for depth, width in _SHAPES
}


def list_models() -> list[str]:
    """Official variant names, e.g. ``BiT-M-R50x1``."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """Look up a variant by its official name, with a clear error for unknown names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(VARIANTS)}") from None
