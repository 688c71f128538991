"""Which inference back-ends a host can run fast, and which one to use: the fastest correct.

One rule serves the evaluation (which measures every planned back-end) and ``bit predict``
(which runs the one chosen from those measurements). A back-end is planned by capability:

- reduced precision (bf16) only where the CPU multiplies bf16 in hardware (AMX or avx512_bf16):
  elsewhere bf16 is emulated and slower than fp32; fp16 or bf16 on CUDA by what the GPU has;
- OpenVINO only on x86-64 with the ``openvino`` extra installed; int8 only where the CPU has
  int8 dot products (AMX-int8 or VNNI) and the compile stage built an int8 IR;
- torch.compile (inductor, weights frozen) on CPU and CUDA, not on Ascend (its fast path is OM).

A skipped back-end carries its reason, which the evaluation report prints.

A back-end is *correct* when its top-1 on the test split is within its gate of PyTorch fp32:
:data:`GATE_PP` points by precision (0.1 for fp32 and bf16/fp16, 0.5 for int8). On a test split
of N images one image is 100/N points, so the 0.1 gate allows no net change in correct answers
below 1000 images.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bit_core.device import CpuUnits

GATE_PP = {"fp32": 0.1, "bf16": 0.1, "fp16": 0.1, "int8": 0.5}
REFERENCE = "torch_fp32"  # what every other back-end's top-1 is compared with
OPENVINO_HINT = "pip install '.[openvino]'"


@dataclass(frozen=True)
class Backend:
    """An inference back-end: `runtime` (torch, torch_compiled, onnxruntime, openvino, om) at
    `precision` (fp32, bf16, fp16, int8)."""

    runtime: str
    precision: str

    @property
    def name(self) -> str:
        """The key in metrics.json and fps.md, e.g. ``openvino_bf16``; the legacy rows keep
        their names (``torch_fp32``, ``torch_bf16``, ``onnxruntime``, ``om``)."""
        if self.runtime in ("onnxruntime", "om"):
            return self.runtime
        return f"{self.runtime}_{self.precision}"

    @property
    def gate_pp(self) -> float:
        return GATE_PP[self.precision]


@dataclass(frozen=True)
class Plan:
    """The back-ends to measure on a host, and why the others are not."""

    backends: tuple[Backend, ...]
    skipped: Mapping[str, str]  # back-end name -> reason

    def names(self) -> list[str]:
        return [b.name for b in self.backends]


OM = Backend("om", "fp16")  # ATC's default precision on Ascend


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here, or None when it can."""
    if not is_x86():
        return f"OpenVINO's CPU plug-in is for x86-64 hosts, this is {platform.machine()}"
    if importlib.util.find_spec("openvino") is None:
        return f"openvino is not installed: {OPENVINO_HINT}"
    return None


def _torch_plan(device_type: str, units: CpuUnits, cuda_bf16: bool, fast: str, compiled: bool
                ) -> tuple[list[Backend], dict[str, str]]:
    eager = [Backend("torch", "fp32"), Backend("torch", fast)]
    if not compiled:
        return eager, {"torch_compiled": "evaluate.compiled is false"}
    if device_type == "npu":
        return eager, {"torch_compiled": "inductor does not target Ascend: the OM row is its "
                                         "compiled path"}
    if device_type == "cuda":
        return eager + [Backend("torch_compiled", "bf16" if cuda_bf16 else "fp16")], {}
    if units.fast_bf16:
        return eager + [Backend("torch_compiled", "bf16")], {}
    return eager, {"torch_compiled_bf16": f"the CPU has no AMX-bf16 or avx512_bf16 "
                                          f"({units.describe()}): bf16 is slower than fp32"}


def _openvino_plan(units: CpuUnits, int8_ir: str | None
                   ) -> tuple[list[Backend], dict[str, str]]:
    """`int8_ir`: None when the compile stage built an int8 IR, else why not."""
    if (missing := openvino_missing()) is not None:
        return [], {"openvino": missing}
    planned, skipped = [Backend("openvino", "fp32")], {}
    if units.fast_bf16:
        planned.append(Backend("openvino", "bf16"))
    else:
        skipped["openvino_bf16"] = (f"the CPU has no AMX-bf16 or avx512_bf16 "
                                    f"({units.describe()})")
    if not units.fast_int8:
        skipped["openvino_int8"] = f"the CPU has no AMX-int8 or VNNI ({units.describe()})"
    elif int8_ir is not None:
        skipped["openvino_int8"] = int8_ir
    else:
        planned.append(Backend("openvino", "int8"))
    return planned, skipped


def plan(device_type: str, units: CpuUnits, *, fast: str = "bf16", cuda_bf16: bool = True,
         compiled: bool = True, openvino_ir: str | None = None, int8_ir: str | None = None
         ) -> Plan:
    """The back-ends to measure on a host with `units` evaluating on `device_type`.

    Args:
        device_type: cpu, cuda or npu (where the PyTorch rows run).
        units: the host CPU's matrix units (:func:`bit_core.device.cpu_units`).
        fast: the eager reduced precision of the device (bf16, or fp16 on Ascend).
        cuda_bf16: whether the CUDA GPU computes in bf16 (else compiled fp16).
        compiled: whether to plan torch.compile rows at all.
        openvino_ir: None when the compile stage built an OpenVINO IR, else why not.
        int8_ir: None when it built an int8 IR too, else why not.
    """
    backends, skipped = _torch_plan(device_type, units, cuda_bf16, fast, compiled)
    backends.append(Backend("onnxruntime", "fp32"))
    if openvino_ir is not None and openvino_missing() is None:
        skipped["openvino"] = openvino_ir
    else:
        planned, why = _openvino_plan(units, int8_ir)
        backends += planned
        skipped.update(why)
    return Plan(tuple(backends), skipped)


def gate_miss(backend: Backend, top1: float, reference_top1: float) -> float:
    """Points by which `backend` misses its accuracy gate (0 when it passes)."""
    return max(0.0, round(abs(top1 - reference_top1) - backend.gate_pp, 6))  # not float noise


def fastest(candidates: Iterable[Backend], fps: Mapping[str, float] | None
            ) -> Backend | None:
    """The fastest of `candidates` by measured images/s (`fps` by back-end name).

    Measurements are the evidence of correctness too: the evaluation keeps a back-end's images/s
    only when it passed its accuracy gate. So when any candidate was measured only measured
    ones are chosen; without any measurement the first fp32 candidate is (a reduced precision
    is unproven for that model).
    """
    candidates = list(candidates)
    measured = [b for b in candidates if fps and fps.get(b.name)]
    if measured:
        return max(measured, key=lambda b: fps[b.name])
    return next((b for b in candidates if b.precision == "fp32"), None)


def fps_at(metrics: Mapping[str, float], batch: int) -> dict[str, float]:
    """Images/s by back-end at the measured batch size nearest `batch`, from evaluation metrics
    (keys ``<back-end>_fps_bs<N>``, :func:`bit_core.contracts.metric_key`)."""
    found: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        name, sep, size = key.rpartition("_fps_bs")
        if sep and size.isdigit():
            found.setdefault(int(size), {})[name] = float(value)
    if not found:
        return {}
    return found[min(found, key=lambda size: (abs(size - batch), -size))]


def serving_backend(units: CpuUnits, metrics: Mapping[str, float] | None, batch: int, *,
                    runtimes: tuple[str, ...] = ("onnxruntime", "openvino"),
                    openvino_ir: str | None = None, int8_ir: str | None = None) -> Backend:
    """The back-end to classify with on this CPU: of those it runs fast (:func:`plan`, without
    torch.compile, whose first call costs more than a command saves) in `runtimes`, the fastest
    at `batch` images by the model's evaluation `metrics`; without them, the first fp32 one."""
    host = plan("cpu", units, compiled=False, openvino_ir=openvino_ir, int8_ir=int8_ir)
    candidates = [b for b in host.backends if b.runtime in runtimes]
    return fastest(candidates, fps_at(metrics or {}, batch))
