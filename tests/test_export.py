"""ONNX export: folded weight standardisation, parity on ONNX Runtime, the zero-pad trap."""

from __future__ import annotations

import onnx
import pytest
import torch

from bit_core import create_model
from bit_core.export import (WS_OP_TYPES, ParityError, check_parity, exact_logits, export_onnx,
                             op_types)


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A model with non-trivial weights everywhere (random head, random GroupNorm affine)."""
    torch.manual_seed(0)
    model = create_model("BiT-S-R50x1", num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
        torch.nn.init.normal_(model.fc.weight, std=0.05)
    path = export_onnx(model.eval(), tmp_path_factory.mktemp("onnx") / "model.onnx",
                       resolution=32)
    return model, path


def test_graph_has_no_weight_standardisation_ops(trained_like):
    ops = op_types(trained_like[1])
    assert "Conv" in ops and not (ops & WS_OP_TYPES)


def test_unfolded_export_would_have_them(tmp_path):
    from bit_core.export import _torch_export

    _torch_export(create_model("BiT-S-R50x1", num_classes=2).eval(), tmp_path / "raw.onnx", 32, 17)
    assert op_types(tmp_path / "raw.onnx") & WS_OP_TYPES


def test_io_names_opset_and_dynamic_batch(trained_like):
    proto = onnx.load(str(trained_like[1]))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17


def test_parity_random_and_real_inputs(trained_like):
    model, path = trained_like
    real = torch.tanh(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    report = check_parity(model, path, batches=[1, 3, 8], resolution=32, atol=1e-4, rtol=1e-4,
                          real_images=real)
    assert {"max_abs_diff_random_bs3", "max_abs_diff_real_bs8"} <= set(report)
    assert 0 < report["max_diff_to_tolerance"] <= 1
    assert report["max_abs_diff"] < 5e-4


def test_zero_pad_is_not_fused_into_maxpool(trained_like):
    """ORT's optimiser turns Pad(0)+MaxPool into a -inf padded MaxPool; the export must not
    give it the chance (inputs with negative stem activations expose the difference)."""
    model, path = trained_like
    x = -torch.rand(2, 3, 32, 32)
    from bit_core.export import onnx_session

    got = onnx_session(path).run(["logits"], {"image": x.numpy()})[0]
    assert abs(exact_logits(model, [x])[0] - got).max() <= 1e-4


def test_parity_failure_is_reported(trained_like):
    model, path = trained_like
    other = create_model("BiT-S-R50x1", num_classes=10)
    torch.nn.init.normal_(other.fc.weight, std=0.05)
    with pytest.raises(ParityError, match="at batch 1"):
        check_parity(other.eval(), path, batches=[1], resolution=32, atol=1e-4, rtol=1e-4)


def test_a_model_over_the_limit_keeps_its_weights_beside_the_graph(trained_like, tmp_path,
                                                                   monkeypatch):
    """Over ~1.8 GB (BiT-*-R152x4 is 3.7 GB) the weights go to model.onnx.data; the graph is
    checked from the file (protobuf cannot hold more than 2 GiB) and matches PyTorch."""
    from bit_core import export
    from bit_core.contracts import onnx_files

    model, _ = trained_like
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1000)
    path = export_onnx(model, tmp_path / "model.onnx", resolution=32)
    assert onnx_files(path) == [path, tmp_path / "model.onnx.data"]
    assert (tmp_path / "model.onnx.data").stat().st_size > 50 * path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    report = check_parity(model, path, batches=[2], resolution=32, atol=1e-4, rtol=1e-4)
    assert report["max_abs_diff"] < 1e-3
