"""Device and precision selection: cpu, cuda, or Ascend npu through the optional torch_npu; what
the CPU offers for matrix products (AMX, avx512_bf16, VNNI)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from bit_core.errors import DeviceError


def _npu_usable() -> bool:
    try:
        importlib.import_module("torch_npu")
    except Exception:  # noqa: BLE001 - any failure (missing CANN libraries, ABI) means "not usable"
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto | cpu | cuda | npu`` to a usable torch.device or raise DeviceError.

    torch_npu is imported only for ``npu``, or for ``auto`` when it is installed. It must be
    installed together with Huawei's CANN toolkit; without it ``import torch_npu`` fails.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' requested but no CUDA GPU is visible: run on a GPU "
                              "host or set device: cpu")
        return torch.device("cuda")
    if name == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            raise DeviceError("device 'npu' requested but torch_npu is not installed: "
                              "pip install '.[npu]' on an Ascend host with CANN, or set device: cpu")
        if not _npu_usable():
            raise DeviceError("device 'npu' requested but no Ascend NPU is usable (torch_npu "
                              "failed to initialise; source CANN's set_env.sh) or set device: cpu")
        return torch.device("npu")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if importlib.util.find_spec("torch_npu") is not None and _npu_usable():
            return torch.device("npu")
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or npu")


def resolve_precision(precision: str, device: torch.device, units: CpuUnits | None = None) -> str:
    """``auto`` -> the default for the device: bf16 on CUDA (if supported), fp16 on NPU; on a CPU
    bf16 where it has AMX-bf16 (`units`, default this host's), else fp32.

    On AMX a bf16 step is faster than fp32 and fine-tunes alike (loss curves within the alignment
    rule and the same test accuracy: ``python -m bench --only precision``); without AMX bf16
    arithmetic is emulated or half-width and slower than fp32. fp16 needs a gradient scaler and
    is refused on CPU.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "npu":
            return "fp16"
        return "bf16" if (units or cpu_units()).amx_bf16 else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("precision fp16 is not supported on cpu: use bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# The x86 CPU features that decide which precision and back-end are fast (Linux /proc/cpuinfo
# names). AMX multiplies bf16 (and int8) matrices in tiles: where it exists a bf16 matmul runs
# ~6x faster than fp32; without it (avx512_bf16 only) bf16 gains little or loses.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8")


@dataclass(frozen=True)
class CpuUnits:
    """This CPU's model name and feature flags, read for what they offer matrix products."""

    model: str
    flags: frozenset[str]

    @property
    def amx_bf16(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def amx_int8(self) -> bool:
        return {"amx_tile", "amx_int8"} <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def fast_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AMX or avx512_bf16): bf16 inference pays."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def fast_int8(self) -> bool:
        """int8 dot products in hardware (AMX or VNNI): int8 inference pays."""
        return self.amx_int8 or self.vnni

    def describe(self) -> str:
        """'AMX-bf16, AMX-int8, avx512_bf16, VNNI' or 'no AMX, no avx512_bf16, no VNNI'."""
        named = {"AMX-bf16": self.amx_bf16, "AMX-int8": self.amx_int8,
                 "avx512_bf16": self.avx512_bf16, "VNNI": self.vnni}
        return ", ".join(name if has else f"no {name}" for name, has in named.items())


def parse_cpuinfo(text: str) -> CpuUnits:
    """The model name and flags of the first processor in /proc/cpuinfo text."""
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model == "unknown":
            model = value
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuUnits(model, flags)


@functools.cache
def cpu_units() -> CpuUnits:
    """This host's CpuUnits: from /proc/cpuinfo on Linux, else from torch's own CPU probes."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        probe = {"amx_tile": "_is_amx_tile_supported", "amx_bf16": "_is_amx_tile_supported",
                 "avx512_bf16": "_is_avx512_bf16_supported", "avx512_vnni": "_is_vnni_supported",
                 "avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported"}
        flags = {flag for flag, name in probe.items() if getattr(torch.cpu, name, lambda: False)()}
        return CpuUnits(platform.processor() or "unknown", frozenset(flags))
