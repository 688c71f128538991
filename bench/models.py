"""The models under test, built identically for every section.

* ``bit_core``: ``bit_core.create_model("BiT-M-R50x1", num_classes=10)``;
* ``timm``: ``timm.create_model("resnetv2_50x1_bit", num_classes=10)`` -- the same architecture
  (23.5 M parameters, identical FLOPs), written with timm's StdConv2d;
* ``candidate``: bit_core's model with its StdConv2d computing the standardised kernel through
  ``F.layer_norm`` (no affine). Not part of bit_core: measured to show what that change would
  give; never counted as bit_core's result.

Both heads get the same random initialisation (bit_core zero-initialises a new head, which would
make every logit 0 and every body gradient 0, hiding numerical errors in the parity checks).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import bit_core
from bit_core.model import StdConv2d

MODEL = "BiT-M-R50x1"
TIMM_MODEL = "resnetv2_50x1_bit"
NUM_CLASSES = 10


def _random_head(fc: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator)
                        / fc.weight[0].numel() ** 0.5)
        if fc.bias is not None:
            fc.bias.zero_()


def bit_model(name: str = MODEL, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = bit_core.create_model(name, num_classes=NUM_CLASSES)
    _random_head(model.fc, seed)
    return model


def timm_model(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=NUM_CLASSES)
    _random_head(model.get_classifier(), seed)
    return model


class LayerNormStdConv2d(StdConv2d):
    """bit_core's StdConv2d with the kernel standardised by one ``F.layer_norm`` call.

    Same formula, (w - mean) / sqrt(var + eps) with the biased variance over in x kh x kw of each
    output channel, but one vectorised kernel forward and one backward, where
    ``torch.var_mean`` over dims (1, 2, 3) runs a slow reduction and the rest adds sub, add,
    sqrt and div (and their backward ops) per convolution.
    """

    def standardized_weight(self) -> torch.Tensor:
        return F.layer_norm(self.weight, self.weight.shape[1:], eps=self.eps)


def candidate_model(base: nn.Module) -> nn.Module:
    """A copy of a bit_core model whose StdConv2d layers use :class:`LayerNormStdConv2d`."""
    model = copy.deepcopy(base)
    for module in model.modules():
        if type(module) is StdConv2d:
            module.__class__ = LayerNormStdConv2d
    return model


def classifier(model: nn.Module) -> nn.Module:
    """The head (registered last in both implementations)."""
    return model.get_classifier() if hasattr(model, "get_classifier") else model.fc


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
