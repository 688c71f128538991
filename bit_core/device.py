"""Device and precision selection: cpu, cuda, or Ascend npu through the optional torch_npu."""

from __future__ import annotations

import importlib
import importlib.util
from contextlib import nullcontext

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


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> the default for the device: bf16 on CUDA (if supported), fp16 on NPU, fp32 on CPU.

    fp16 needs a gradient scaler and is refused on CPU.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp16" if device.type == "npu" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("precision fp16 is not supported on cpu: use bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
