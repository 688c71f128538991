"""What the numbers were measured on: CPU, ISA flags, oneDNN dispatch, versions, threads, load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
         "amx_tile", "amx_bf16", "amx_int8")
ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ONEDNN_MAX_CPU_ISA",
            "DNNL_MAX_CPU_ISA", "TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FREEZING")


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask, not the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", set()
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def has_amx() -> bool:
    """True when the kernel exposes AMX tiles with bf16 (what makes bf16 GEMMs fast on Xeon)."""
    flags = _cpuinfo()[1]
    return {"amx_tile", "amx_bf16"} <= flags


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    """HEAD of the checkout (read-only)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def onednn_dispatch() -> dict:
    """Which oneDNN kernels PyTorch picks here for an fp32 conv, a bf16 conv and a bf16 matmul.

    oneDNN prints its verbose log on the C-level stdout, so fd 1 is redirected for the probe.
    Best called before any other oneDNN work (the ``isa`` line is printed once per process).
    """
    x = torch.randn(2, 64, 16, 16)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    a = torch.randn(128, 128)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                conv(x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    conv(x)
                a.bfloat16() @ a.bfloat16()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    result: dict = {"isa": None, "fp32_conv": None, "bf16_conv": None, "bf16_matmul": None}
    for line in lines:
        fields = line.split(",")
        for field in fields:
            if field.startswith("isa:") and result["isa"] is None:
                result["isa"] = field[4:]
        if len(fields) > 6 and fields[2] == "primitive" and fields[3] == "exec":
            kind, impl, descs = fields[5], fields[6], ",".join(fields[8:9])
            if kind == "convolution":
                key = "bf16_conv" if "src:bf16" in descs else "fp32_conv"
                result[key] = result[key] or impl
            elif kind == "matmul" and "src:bf16" in descs:
                result["bf16_matmul"] = result["bf16_matmul"] or impl
    return result


def describe(threads: int) -> dict:
    """The machine and software description stored with every result."""
    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "hypervisor": "hypervisor" in flags,
        "flags": {flag: flag in flags for flag in FLAGS},
        "amx": {"amx_tile", "amx_bf16"} <= flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "mem_total_gb": _mem_total_gb(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": onednn_dispatch(),
        "threads": {"torch_intra_op": torch.get_num_threads(),
                    "torch_inter_op": torch.get_num_interop_threads(),
                    "onnxruntime_intra_op": threads},
        "env": {key: os.environ.get(key) for key in ENV_KEYS},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": _version("onnxruntime"), "timm": _version("timm"),
                     "onnx": _version("onnx"), "numpy": _version("numpy")},
        "git_commit": _git_commit(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
