"""The BiT model: every official variant, its API, and numerical parity with timm's ResNetV2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bit_core import create_model, fold_weight_standardization, list_models
from bit_core.model import StdConv2d, build_model
from bit_core.weights import load_npz, save_npz, to_checkpoint_layout

# Parameter counts with a 1000-class head (millions, as timm and the paper's code report them).
PARAM_COUNTS_M = {"R50x1": 25.55, "R50x3": 217.32, "R101x1": 44.54, "R101x3": 387.93,
                  "R152x2": 236.34, "R152x4": 936.53}


def test_twelve_official_variants():
    names = list_models()
    assert len(names) == 12
    assert {n.split("-")[1] for n in names} == {"S", "M"}
    assert {n.split("-")[2] for n in names} == set(PARAM_COUNTS_M)


@pytest.mark.parametrize("name", list_models())
def test_parameter_count(name):
    with torch.device("meta"):
        model = build_model(name, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(count, 2) == PARAM_COUNTS_M[name.split("-")[2]]


@pytest.mark.parametrize("name", ["BiT-S-R50x1", "BiT-M-R50x1"])
def test_upstream_head_size(name):
    with torch.device("meta"):
        model = build_model(name)
    assert model.num_classes == (1000 if "-S-" in name else 21843)


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith(("R50x1", "R101x1"))])
def test_cpu_forward_shapes_no_nan(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, model.num_features, 2, 2)
    assert logits.shape == (2, 7)
    assert torch.isfinite(features).all()
    # a new head is zero-initialised: logits are exactly zero before fine-tuning
    assert torch.count_nonzero(logits) == 0
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)


def test_reset_classifier_zero_head():
    model = create_model("BiT-S-R50x1")
    model.reset_classifier(3)
    assert model.fc.out_channels == 3 and model.num_classes == 3
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="BiT-M-R50x1"):
        create_model("BiT-X-R50x1")


def test_weight_standardisation_definition():
    conv = StdConv2d(4, 5, 3, padding=1, bias=False)
    w = conv.weight.detach().double()
    flat = w.reshape(5, -1)
    expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False,
                                                                          keepdim=True) + 1e-10)
    assert torch.allclose(conv.standardized_weight().double(), expected.reshape_as(w), atol=1e-6)


def test_stem_pads_with_zeros_not_minus_infinity():
    model = build_model("BiT-S-R50x1", 2)
    assert isinstance(model.root.pad, torch.nn.ConstantPad2d) and model.root.pad.value == 0
    assert model.root.pool.padding == 0


def test_fold_weight_standardization_keeps_logits():
    torch.manual_seed(1)
    model = create_model("BiT-M-R50x1", num_classes=5).eval()
    torch.nn.init.normal_(model.fc.weight, std=0.1)
    folded = fold_weight_standardization(model)
    assert not any(isinstance(m, StdConv2d) for m in folded.modules())
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-5, rtol=0)


def _timm_as_official_npz(tmp_path):
    """A seeded timm resnetv2_50x1_bit (eps 1e-10, random GroupNorm affine) saved in the
    official checkpoint layout, written independently of bit_core's own name mapping."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        for module in ref.modules():
            if hasattr(module, "eps") and "StdConv" in type(module).__name__:
                module.eps = 1e-10
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        torch.nn.init.normal_(ref.head.fc.weight, std=0.05)
        torch.nn.init.normal_(ref.head.fc.bias, std=0.05)
    arrays = {"resnet/root_block/standardized_conv2d/kernel": ref.stem.conv.weight,
              "resnet/group_norm/gamma": ref.norm.weight, "resnet/group_norm/beta": ref.norm.bias,
              "resnet/head/conv2d/kernel": ref.head.fc.weight,
              "resnet/head/conv2d/bias": ref.head.fc.bias}
    for i, stage in enumerate(ref.stages):
        for j, block in enumerate(stage.blocks):
            p = f"resnet/block{i + 1}/unit{j + 1:02d}/"
            for letter, n in zip("abc", (1, 2, 3)):
                arrays[f"{p}{letter}/standardized_conv2d/kernel"] = getattr(block, f"conv{n}").weight
                arrays[f"{p}{letter}/group_norm/gamma"] = getattr(block, f"norm{n}").weight
                arrays[f"{p}{letter}/group_norm/beta"] = getattr(block, f"norm{n}").bias
            if block.downsample is not None:
                arrays[f"{p}a/proj/standardized_conv2d/kernel"] = block.downsample.conv.weight
    path = tmp_path / "BiT-M-R50x1.npz"
    np.savez(path, **{k: to_checkpoint_layout(v) for k, v in arrays.items()})
    return ref, path


def test_parity_with_timm_on_official_layout(tmp_path):
    ref, path = _timm_as_official_npz(tmp_path)
    model = load_npz(build_model("BiT-M-R50x1", 10), path).eval()  # its 10-class head too
    torch.manual_seed(2)
    x = torch.rand(4, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert expected.abs().max() > 1e-2  # the comparison is not between zeros
    assert (expected - got).abs().max().item() <= 1e-4


def test_save_npz_round_trip(tmp_path):
    torch.manual_seed(3)
    model = create_model("BiT-S-R50x1", num_classes=4)
    torch.nn.init.normal_(model.fc.weight)
    save_npz(model, tmp_path / "m.npz")
    again = load_npz(build_model("BiT-S-R50x1", 4), tmp_path / "m.npz")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
