"""ONNX export with weight standardisation folded into the kernels, and its parity check.

The exported graph takes ``image`` (N, 3, H, W) in [-1, 1] with a dynamic batch axis and returns
``logits`` (N, classes). Folding makes every conv a plain Conv with constant weights, which ATC
and ONNX Runtime fuse and which removes per-call weight statistics from inference.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bit_core.errors import ParityError
from bit_core.io import atomic_path
from bit_core.model import fold_weight_standardization

INPUT, OUTPUT = "image", "logits"
# Protobuf cannot hold a model over 2 GiB: larger weights go to a side file.
EXTERNAL_DATA_BYTES = 1_800_000_000
WS_OP_TYPES = {"LayerNormalization", "ReduceMean", "Sqrt", "Pow"}  # unfolded WS would add these


class ConcatZeroPad(nn.Module):
    """Zero padding written as concatenation, so no graph optimiser can fold it into MaxPool.

    BiT pads the stem with zeros before a max-pool without padding. An ONNX ``Pad`` followed by
    ``MaxPool`` gets fused by ONNX Runtime's optimiser into a padded MaxPool, which pads with
    -inf, not zero: logits then differ by ~1e-2. Concatenated zeros mean the same and are kept.
    """

    def __init__(self, padding: int):
        super().__init__()
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        rows = torch.zeros_like(x[:, :, :p, :])
        x = torch.cat([rows, x, rows], dim=2)
        cols = torch.zeros_like(x[:, :, :, :p])
        return torch.cat([cols, x, cols], dim=3)


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A float32 CPU eval copy with weight standardisation folded and the stem pad made explicit."""
    folded = fold_weight_standardization(model).float().cpu().eval()
    pad = getattr(getattr(folded, "root", None), "pad", None)
    if isinstance(pad, nn.ConstantPad2d) and pad.value == 0 and len(set(pad.padding)) == 1:
        folded.root.pad = ConcatZeroPad(pad.padding[0])
    return folded.to(memory_format=torch.contiguous_format)


def _torch_export(model: nn.Module, path: Path, resolution: int, opset: int) -> None:
    dummy = torch.zeros(2, 3, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)


def save_onnx(proto: onnx.ModelProto, path: Path) -> Path:
    """Write a model atomically; weights over ~1.8 GB go to ``<name>.data`` beside it."""
    path = Path(path)
    large = proto.ByteSize() > EXTERNAL_DATA_BYTES if proto.ByteSize() >= 0 else True
    if large:
        # The .data file is written first; the .onnx that points at it appears last.
        onnx.save_model(proto, str(path.with_suffix(".staging.onnx")), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data")
        path.with_suffix(".staging.onnx").replace(path)
        return path
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def export_onnx(model: nn.Module, path: Path, *, resolution: int, opset: int = 17,
                simplify: bool = True, metadata: dict[str, str] | None = None) -> Path:
    """Export `model` (StdConv folded) to ONNX at `path`, simplified with onnxslim.

    Args:
        model: a ResNetV2 (StdConv2d layers are folded on a copy; `model` is unchanged).
        path: the .onnx to write.
        resolution: input height and width used for tracing (the batch axis stays dynamic).
        opset: ONNX opset; ATC reads up to 18.
        simplify: run onnxslim (constant folding, dead-node removal).
        metadata: entries for the model's metadata_props (e.g. what it was trained on).
    """
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw.onnx"
        _torch_export(prepare_for_export(model), raw, resolution, opset)
        proto = onnx.load(str(raw))
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto)
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    path = save_onnx(proto, Path(path))
    onnx.checker.check_model(str(path), full_check=False)  # from the file: a graph with its
    return path  # weights over protobuf's 2 GiB (BiT-*-R152x4) is checked only that way


def op_types(path: Path) -> set[str]:
    """Every operator type in the graph (without loading external weights)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {node.op_type for node in proto.graph.node}


def onnx_session(path: Path, threads: int | None = None, *, spinning: bool = False):
    """An ONNX Runtime CPU session with full graph optimisation.

    Idle intra-op threads sleep unless `spinning`: spinning buys a little latency on an idle
    machine and costs a lot on a shared one (up to 1.4x slower measured on 2 busy cores).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def real_batch(data_root: Path, splits: Path, resolution: int, count: int = 8
               ) -> torch.Tensor | None:
    """The first `count` test images, preprocessed as for evaluation: the real inputs of the
    parity checks."""
    from bit_core.data import ImageListDataset, eval_transform
    from bit_core.splits import read_split

    samples = read_split(Path(splits) / "test.csv")[:count]
    dataset = ImageListDataset(data_root, samples, eval_transform(resolution))
    return torch.stack([dataset[i][0] for i in range(len(dataset))]) if samples else None


def check_parity(model: nn.Module, onnx_path: Path, *, batches: list[int], resolution: int,
                 atol: float, rtol: float, real_images: torch.Tensor | None = None,
                 seed: int = 0) -> dict:
    """Compare ONNX Runtime's logits with the PyTorch model's (unfolded) at each batch size, as
    :func:`compare_logits` does."""
    session = onnx_session(onnx_path)
    return compare_logits(model, lambda x: session.run([OUTPUT], {INPUT: x})[0],
                          "ONNX Runtime", "the export is wrong", batches=batches,
                          resolution=resolution, atol=atol, rtol=rtol, real_images=real_images,
                          seed=seed)


def exact_logits(model: nn.Module, batches: list[torch.Tensor]) -> list[np.ndarray]:
    """The model's logits for each batch, computed in float64 on the CPU: the reference that a
    back-end's fp32 rounding is measured against. The model is left in fp32, in eval mode."""
    model = model.cpu().eval()
    try:
        model.double()
        with torch.no_grad():
            return [model(x.double()).numpy() for x in batches]
    finally:
        model.float()  # fp32 -> fp64 -> fp32 is exact: the weights come back unchanged


def compare_logits(model: nn.Module, predict, name: str, verdict: str, *, batches: list[int],
                   resolution: int, atol: float, rtol: float,
                   real_images: torch.Tensor | None = None, seed: int = 0) -> dict:
    """The worst |logits - exact logits| of `predict` (numpy -> numpy) per input kind and batch
    size, and the worst of those differences over its tolerance (``max_diff_to_tolerance``);
    ParityError naming `name` and ending with `verdict` when one is above its tolerance.

    Inputs are uniform in [-1, 1] and, when given, real preprocessed images. The reference is
    :func:`exact_logits`. The tolerance of a batch is ``atol + rtol * largest |exact logit|``:
    fp32 rounding grows with the logits (a ResNet-50 with logits near 4 is about 1e-4 from
    exact on AVX-512 kernels), while the defects this check exists for (the zero-pad trap,
    wrong weights) are 1e-2 and more.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for batch in batches:
        inputs.append((batch, "random",
                       torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1))
        if real_images is not None and len(real_images):
            inputs.append((batch, "real", real_images[torch.arange(batch) % len(real_images)]))
    expected = exact_logits(model, [x for _, _, x in inputs])
    report, worst = {}, 0.0
    for (batch, kind, x), exact in zip(inputs, expected):
        diff = float(np.abs(exact - predict(x.float().numpy())).max())
        largest = float(np.abs(exact).max())
        tolerance = atol + rtol * largest
        report[f"max_abs_diff_{kind}_bs{batch}"] = diff
        worst = max(worst, diff / tolerance)
        if not diff <= tolerance:
            raise ParityError(f"{name} differs from PyTorch by {diff:.3g} (> {tolerance:.3g}: "
                              f"atol + rtol x largest logit {largest:.3g}) at batch {batch} on "
                              f"{kind} inputs: {verdict}")
    report["max_abs_diff"] = max(report.values())
    report["max_diff_to_tolerance"] = worst
    return report
