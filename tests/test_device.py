"""Device and precision selection, on whatever this host has: CPU only, CUDA or Ascend."""

from __future__ import annotations

import pytest
import torch

from bit_core.device import DeviceError, cpu_units, parse_cpuinfo, resolve_device, resolve_precision


def _npu_visible() -> bool:
    try:
        return resolve_device("npu").type == "npu"
    except DeviceError:
        return False


CUDA = torch.cuda.is_available()
NPU = _npu_visible()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this host")
without_cuda = pytest.mark.skipif(CUDA, reason="a CUDA GPU is visible on this host")


def test_auto_picks_the_visible_accelerator_else_cpu():
    expected = "cuda" if CUDA else "npu" if NPU else "cpu"
    assert resolve_device("auto").type == expected


@without_cuda
def test_cuda_absent_is_a_clear_error():
    with pytest.raises(DeviceError, match="no CUDA GPU is visible.*device: cpu"):
        resolve_device("cuda")


@needs_cuda
def test_cuda_present_is_used_with_half_precision_by_default():
    device = resolve_device("cuda")
    assert device.type == "cuda"
    assert resolve_precision("auto", device) in ("bf16", "fp16")


@pytest.mark.skipif(NPU, reason="an Ascend NPU is usable on this host")
def test_npu_absent_is_a_clear_error():
    with pytest.raises(DeviceError, match="npu.*set device: cpu"):
        resolve_device("npu")


def test_precision_defaults():
    cpu = torch.device("cpu")
    expected = "bf16" if cpu_units().amx_bf16 else "fp32"
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu, parse_cpuinfo(CPUINFO)) == "fp32"
    with pytest.raises(DeviceError, match="fp16 is not supported on cpu"):
        resolve_precision("fp16", cpu)


@without_cuda
def test_finetune_stage_reports_missing_device(tmp_path, repo_root, monkeypatch, capsys):
    from flows.overrides import apply_overrides
    from tasks import finetune

    params = tmp_path / "params.yaml"
    params.write_text((repo_root / "params.yaml").read_text())
    apply_overrides(params, ["train.device=cuda"])
    monkeypatch.setenv("BIT_PARAMS", str(params))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits/stats.json").write_text('{"image_height": 8, "image_width": 8}')
    (tmp_path / "splits/classes.json").write_text('["a", "b"]')
    for split in ("train", "val"):
        (tmp_path / f"splits/{split}.csv").write_text("path,label\n")
    code = finetune.main(["--data", str(tmp_path), "--splits", str(tmp_path / "splits"),
                          "--weights", str(tmp_path), "--out", str(tmp_path / "out"),
                          "--reports", str(tmp_path / "rep")])
    assert code == 2 and "no CUDA GPU" in capsys.readouterr().err


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: other
flags\t\t: fpu
"""


def test_cpu_units_read_from_cpuinfo():
    units = parse_cpuinfo(CPUINFO)
    assert units.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert units.amx_bf16 and units.amx_int8 and units.avx512_bf16 and units.vnni
    assert units.fast_bf16 and units.fast_int8
    assert units.describe() == "AMX-bf16, AMX-int8, avx512_bf16, VNNI"


def test_a_cpu_without_matrix_units_says_so():
    units = parse_cpuinfo("model name : old\nflags : fpu sse2 avx2\n")
    assert not (units.fast_bf16 or units.fast_int8 or units.amx_bf16)
    assert units.describe() == "no AMX-bf16, no AMX-int8, no avx512_bf16, no VNNI"
    assert parse_cpuinfo("").model == "unknown"


def test_auto_precision_on_a_cpu_is_bf16_only_with_amx():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, parse_cpuinfo(CPUINFO)) == "bf16"
    # avx512_bf16 without AMX: bf16 arithmetic exists, but a training step is faster in fp32.
    no_amx = parse_cpuinfo("model name : x\nflags : avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert no_amx.fast_bf16 and resolve_precision("auto", cpu, no_amx) == "fp32"
    assert resolve_precision("auto", cpu, parse_cpuinfo("")) == "fp32"


def test_this_hosts_units_agree_with_torchs_probes():
    units = cpu_units()
    assert units.amx_bf16 == torch.cpu._is_amx_tile_supported()
    assert units.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
