"""BiT: ResNetV2 with weight-standardised convolutions and GroupNorm.

Big Transfer (Kolesnikov et al., 2019, arXiv:1912.11370) fine-tunes pre-activation ResNets
(He et al., 2016, arXiv:1603.05027) in which every convolution standardises its weights
(Qiao et al., 2019, arXiv:1903.10520) and every normalisation is GroupNorm with 32 groups.

The module names mirror the official checkpoints (`root`, `block1/unit01/a`, ...) so the weight
loader in :mod:`bit_core.weights` is a straight translation of names.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bit_core.variants import get_variant

# Inside the square root of the weight standardisation, as in the official BiT code.
STD_CONV_EPS = 1e-10
GROUPS = 32


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel on every call.

    Mean and biased variance are taken over in_channels x kh x kw (Qiao et al., 2019).
    """

    def __init__(self, *args, eps: float = STD_CONV_EPS, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        """The kernel actually convolved: (w - mean) / sqrt(var + eps).

        Written as a layer norm over (in, kh, kw) without affine parameters: the same formula
        (biased variance, eps inside the root) in one fused kernel, forward and backward, instead
        of var_mean followed by subtraction, addition, square root and division.
        """
        return F.layer_norm(self.weight, self.weight.shape[1:], eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._as_matmul(x):
            return self._pointwise(x)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def _as_matmul(self, x: torch.Tensor) -> bool:
        """A 1x1 convolution of a channels_last bf16 batch, run as the matrix product it is.

        oneDNN's bf16 weight gradient of 1x1 convolutions is slow at small feature maps (on an
        AMX CPU, 20-50x slower than torch.mm of the same product at 4x4 maps in a layer-by-layer
        timing), and autograd of a product is two more products. fp32 keeps the convolution,
        whose rounding the parity tests pin.
        """
        where = x.device.type
        low = x.dtype == torch.bfloat16 or (
            torch.amp.is_autocast_available(where) and torch.is_autocast_enabled(where)
            and torch.get_autocast_dtype(where) == torch.bfloat16)
        return (low and self.kernel_size == (1, 1) and self.groups == 1 and self.bias is None
                and self.padding == (0, 0) and x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last))

    def _pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 convolution as a product over the channels of the (N, H, W, C) layout."""
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        weight = self.standardized_weight().flatten(1)
        return F.linear(x.permute(0, 2, 3, 1), weight).permute(0, 3, 1, 2)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: GN-ReLU-conv1x1, GN-ReLU-conv3x3 (strided), GN-ReLU-conv1x1.

    The projection shortcut reads the pre-activated input, as in ResNetV2; the stride sits on the
    3x3 conv (the official BiT models; the original ResNetV2 paper strides the first 1x1).
    """

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1):
        super().__init__()
        self.gn1 = nn.GroupNorm(GROUPS, cin)
        self.conv1 = _conv(cin, cmid, 1)
        self.gn2 = nn.GroupNorm(GROUPS, cmid)
        self.conv2 = _conv(cmid, cmid, 3, stride)
        self.gn3 = nn.GroupNorm(GROUPS, cmid)
        self.conv3 = _conv(cmid, cout, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + shortcut


def _stage(cin: int, cout: int, cmid: int, units: int, stride: int) -> nn.Sequential:
    layers = [("unit01", PreActBottleneck(cin, cout, cmid, stride))]
    layers += [(f"unit{i:02d}", PreActBottleneck(cout, cout, cmid)) for i in range(2, units + 1)]
    return nn.Sequential(OrderedDict(layers))


class ResNetV2(nn.Module):
    """BiT ResNetV2.

    Args:
        block_units: bottleneck units per stage, e.g. (3, 4, 6, 3) for R50.
        width_factor: channel multiplier (the "x1", "x3" of the variant name).
        num_classes: size of the classification head.
    """

    def __init__(self, block_units: tuple[int, ...], width_factor: int, num_classes: int):
        super().__init__()
        wf = width_factor
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, 64 * wf, 7, stride=2, padding=3, bias=False)),
            # Zero-pad then pool without padding. This is subtly not MaxPool2d(3, 2, padding=1):
            # that pads with -inf, and after the (signed) stem conv the border values differ.
            ("pad", nn.ConstantPad2d(1, 0.0)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
        ]))
        self.body = nn.Sequential(OrderedDict([
            ("block1", _stage(64 * wf, 256 * wf, 64 * wf, block_units[0], stride=1)),
            ("block2", _stage(256 * wf, 512 * wf, 128 * wf, block_units[1], stride=2)),
            ("block3", _stage(512 * wf, 1024 * wf, 256 * wf, block_units[2], stride=2)),
            ("block4", _stage(1024 * wf, 2048 * wf, 512 * wf, block_units[3], stride=2)),
        ]))
        self.num_features = 2048 * wf
        self.norm = nn.GroupNorm(GROUPS, self.num_features)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> final pre-activated feature map (N, num_features, H/32, W/32)."""
        return self.relu(self.norm(self.body(self.root(x))))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (N, num_classes), or pooled features when `pre_logits`."""
        pooled = self.pool(features)
        if pre_logits:
            return pooled.flatten(1)
        return self.fc(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one of `num_classes` outputs (BiT's choice)."""
        fc = nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True)
        fc.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        nn.init.zeros_(fc.weight)
        nn.init.zeros_(fc.bias)
        self.fc = fc
        self.num_classes = num_classes


def build_model(name: str, num_classes: int | None = None) -> ResNetV2:
    """Build an untrained variant; a new head (num_classes given) is zero-initialised."""
    variant = get_variant(name)
    model = ResNetV2(variant.block_units, variant.width_factor,
                     num_classes or variant.upstream_classes)
    if num_classes is not None:
        model.reset_classifier(num_classes)
    return model


@torch.no_grad()
def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """A copy of `model` whose StdConv2d layers are plain Conv2d holding the standardised kernels.

    Logits are unchanged; the exported graph then has no mean/variance ops on weights, and
    inference skips recomputing them on every call.
    """
    folded = copy.deepcopy(model)
    for parent in folded.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, StdConv2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                  stride=child.stride, padding=child.padding,
                                  dilation=child.dilation, groups=child.groups,
                                  bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                plain.weight.copy_(child.standardized_weight())
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
                setattr(parent, child_name, plain)
    return folded
