"""Section 1: training images/s (forward + backward + SGD step), bit_core against timm.

Every configuration trains its own copy of the same initial weights on the same batch. One
forward + backward per configuration first (no update) checks that the configuration is correct
(loss and gradient against the fp32 channels-first run of the same library) and warms it up;
then the configurations take turns, one step each per round.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench import compile_probe, models
from bench.timing import interleaved, paired_ratio_range, profile_top_ops, summary
from bit_core.device import autocast
from bit_core.model import StdConv2d

CPU = torch.device("cpu")
# Correctness of a configuration against fp32 channels-first of the same library: relative loss
# difference, and cosine between the gradients of all parameters. Not a relative error bound on
# the gradient: at this random initialisation the body gradient is ill-conditioned (against a
# float64 run fp32 itself is ~1% off, with cosine 0.9999), so only its direction is compared.
TOLERANCE = {"fp32": {"loss_rel": 1e-4, "grad_cosine": 0.999},
             "bf16": {"loss_rel": 2e-2, "grad_cosine": 0.99}}


@dataclass(frozen=True)
class TrainVariant:
    name: str
    library: str  # bit_core | timm | candidate
    precision: str  # fp32 | bf16
    channels_last: bool = False
    compiled: bool = False


def variants(compile_precision: str | None) -> list[TrainVariant]:
    out = []
    for lib in ("bit_core", "timm"):
        out += [TrainVariant(f"{lib} fp32", lib, "fp32"),
                TrainVariant(f"{lib} fp32 channels_last", lib, "fp32", True),
                TrainVariant(f"{lib} bf16 channels_last", lib, "bf16", True)]
    if compile_precision:
        out.append(TrainVariant(f"bit_core compiled {compile_precision} channels_last",
                                "bit_core", compile_precision, True, compiled=True))
    out.append(TrainVariant("candidate fp32 (bit_core, layer_norm WS)", "candidate", "fp32"))
    return out


class TrainRunner:
    """One configuration: its model copy, optimizer and fixed batch."""

    def __init__(self, variant: TrainVariant, model: torch.nn.Module, batch: int,
                 resolution: int, seed: int = 0):
        self.variant = variant
        fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt).train()
        self.forward = torch.compile(self.model, dynamic=False) if variant.compiled else self.model
        # BiT-HyperRule's learning rate for this batch; the value does not change the cost.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.003 * batch / 512,
                                         momentum=0.9)
        generator = torch.Generator().manual_seed(seed)
        self.x = (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1
                  ).contiguous(memory_format=fmt)
        self.y = torch.randint(0, models.NUM_CLASSES, (batch,), generator=generator)

    def _loss(self) -> torch.Tensor:
        with autocast(CPU, self.variant.precision):
            logits = self.forward(self.x)
        return F.cross_entropy(logits.float(), self.y)

    def probe(self) -> tuple[float, torch.Tensor]:
        """Forward + backward without an update: (loss, all gradients flattened)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                 for p in self.model.parameters()]
        return float(loss.detach()), torch.cat([g.detach().float().flatten() for g in grads])

    def step(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()
        self.optimizer.step()
        return time.perf_counter() - start


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))


def _parity(loss: float, grad: torch.Tensor, ref_loss: float, ref_grad: torch.Tensor,
            precision: str, head: int) -> dict:
    """`head`: number of classifier parameters (the last ones) -- their gradient is reported
    apart, being well conditioned."""
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    grad_rel = float((grad.double() - ref_grad.double()).norm() / ref_grad.double().norm())
    cosine = _cosine(grad, ref_grad)
    tol = TOLERANCE[precision]
    return {"loss": loss, "reference_loss": ref_loss, "loss_rel_diff": loss_rel,
            "grad_rel_err": grad_rel, "grad_cosine": cosine,
            "head_grad_cosine": _cosine(grad[-head:], ref_grad[-head:]),
            "body_grad_cosine": _cosine(grad[:-head], ref_grad[:-head]), "tolerance": tol,
            "correct": loss_rel <= tol["loss_rel"] and cosine >= tol["grad_cosine"]}


def _ratio(name: str, rows: dict, num: str, den: str, samples: dict) -> dict | None:
    if num not in rows or den not in rows:
        return None
    a, b = rows[num]["img_s"], rows[den]["img_s"]
    return {"name": name, "numerator": num, "denominator": den, "numerator_value": a,
            "denominator_value": b, "value": a / b, "metric": "img_s",
            "per_round_range": paired_ratio_range(samples[num], samples[den])}


def weight_standardisation(settings, log, step_s: float | None) -> dict:
    """The cost of weight standardisation alone: all 53 StdConv2d kernels of R50x1, forward
    (what unfolded inference pays per call) and forward + backward (what every training step
    pays), in bit_core's formulation and in single-op ones. Short calls, many interleaved
    rounds: far less noisy than whole training steps."""
    model = models.bit_model()
    convs = [m for m in model.modules() if isinstance(m, StdConv2d)]
    generator = torch.Generator().manual_seed(0)
    upstream = [torch.randn(c.weight.shape, generator=generator) for c in convs]
    forms = {
        "bit_core StdConv2d.standardized_weight (var_mean, sub, add, sqrt, div)":
            lambda c: c.standardized_weight(),
        "F.layer_norm(w, w.shape[1:]) (candidate)":
            lambda c: F.layer_norm(c.weight, c.weight.shape[1:], eps=c.eps),
        "F.batch_norm over (1, out, in*kh*kw) (timm's form)":
            lambda c: F.batch_norm(c.weight.reshape(1, c.out_channels, -1), None, None,
                                   training=True, momentum=0.0, eps=c.eps).reshape_as(c.weight),
    }

    def forward(form):
        def run() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for c in convs:
                    form(c)
            return time.perf_counter() - start
        return run

    def forward_backward(form):
        def run() -> float:
            for c in convs:
                c.weight.grad = None
            start = time.perf_counter()
            torch.autograd.backward([form(c) for c in convs], upstream)
            return time.perf_counter() - start
        return run

    reference = None
    numerics = {}
    for name, form in forms.items():
        forward_backward(form)()
        with torch.no_grad():
            out = torch.cat([form(c).flatten() for c in convs])
        grad = torch.cat([c.weight.grad.flatten() for c in convs])
        if reference is None:
            reference = (out, grad)
        numerics[name] = {
            "max_abs_diff": float((out - reference[0]).abs().max()),
            "grad_rel_diff": float((grad - reference[1]).norm() / reference[1].norm())}
    log(f"  weight standardisation alone: {len(forms)} forms x {settings.ws_repeats} rounds")
    fwd = interleaved({n: forward(f) for n, f in forms.items()}, settings.ws_repeats)
    both = interleaved({n: forward_backward(f) for n, f in forms.items()}, settings.ws_repeats)
    rows = []
    base = next(iter(forms))
    for name in forms:
        f, b = summary(fwd[name]), summary(both[name])
        rows.append({"form": name, "forward_ms": 1e3 * f["median_s"],
                     "forward_backward_ms": 1e3 * b["median_s"],
                     "speedup_forward": summary(fwd[base])["median_s"] / f["median_s"],
                     "speedup_forward_backward": summary(both[base])["median_s"] / b["median_s"],
                     "share_of_bit_core_fp32_step": b["median_s"] / step_s if step_s else None,
                     "forward_samples_s": f["samples_s"], "forward_backward_samples_s":
                         b["samples_s"], **numerics[name]})
        log(f"    {name}: forward {rows[-1]['forward_ms']:.0f} ms, forward+backward "
            f"{rows[-1]['forward_backward_ms']:.0f} ms")
    return {"kernels": len(convs), "weights": sum(c.weight.numel() for c in convs),
            "forms": rows}


def run(settings, log) -> dict:
    batch, res = settings.train_batch, settings.resolution
    bit_base = models.bit_model()
    timm_base = models.timm_model()
    base = {"bit_core": bit_base, "timm": timm_base, "candidate": models.candidate_model(bit_base)}
    head = {lib: models.param_count(models.classifier(m)) for lib, m in base.items()}
    compile_precision = settings.compile_precision if settings.compile else None
    runners: dict[str, TrainRunner] = {}
    rows: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    references: dict[str, tuple[float, torch.Tensor]] = {}

    child_compile: dict[int, float | str] = {}
    for variant in variants(compile_precision):
        if variant.compiled:
            child_compile = compile_probe.prewarm("train", [batch], settings, log)
            if isinstance(child_compile[batch], str):
                skipped[variant.name] = child_compile[batch]
                continue
        runner = TrainRunner(variant, copy.deepcopy(base[variant.library]), batch, res)
        start = time.perf_counter()
        loss, grad = runner.probe()
        first_call = time.perf_counter() - start
        ref_key = "timm" if variant.library == "timm" else "bit_core"
        if variant.library != "candidate" and not variant.compiled \
                and variant.precision == "fp32" and not variant.channels_last:
            references[ref_key] = (loss, grad)
        ref_loss, ref_grad = references[ref_key]
        rows[variant.name] = {**asdict(variant), "first_call_s": first_call,
                              "child_compile_s": child_compile.get(batch) if variant.compiled
                              else None,
                              "parity": _parity(loss, grad, ref_loss, ref_grad, variant.precision,
                                                head[variant.library])}
        runners[variant.name] = runner
        log(f"  {variant.name}: first fwd+bwd {first_call:.1f} s, "
            f"loss rel diff {rows[variant.name]['parity']['loss_rel_diff']:.1e}, "
            f"grad cosine {rows[variant.name]['parity']['grad_cosine']:.5f}")
        del grad

    references.clear()
    log(f"  timing {len(runners)} configurations x {settings.train_repeats} interleaved rounds")
    samples = interleaved({name: r.step for name, r in runners.items()}, settings.train_repeats)
    for name, row in rows.items():
        row.update(summary(samples[name]))
        row["img_s"] = batch / row["median_s"]
        if row["compiled"]:
            row["compile_s"] = max(row["first_call_s"] - row["median_s"], 0.0)
        log(f"  {name}: {row['img_s']:.2f} img/s")

    def best(library: str, eager_only: bool = False) -> str | None:
        names = [n for n, r in rows.items() if r["library"] == library and r["parity"]["correct"]
                 and not (eager_only and r["compiled"])]
        return max(names, key=lambda n: rows[n]["img_s"]) if names else None

    best_names = {"bit_core": best("bit_core"), "bit_core_eager": best("bit_core", True),
                  "timm": best("timm")}
    ratios = [
        _ratio("bit_core / timm, fp32", rows, "bit_core fp32", "timm fp32", samples),
        _ratio("bit_core / timm, fp32 channels_last", rows, "bit_core fp32 channels_last",
               "timm fp32 channels_last", samples),
        _ratio("bit_core / timm, bf16 channels_last", rows, "bit_core bf16 channels_last",
               "timm bf16 channels_last", samples),
        _ratio("bit_core best / timm best", rows, best_names["bit_core"], best_names["timm"],
               samples),
        _ratio("bit_core best eager / timm best (both without torch.compile)", rows,
               best_names["bit_core_eager"], best_names["timm"], samples),
        _ratio("bit_core best / bit_core fp32", rows, best_names["bit_core"], "bit_core fp32",
               samples),
        _ratio("timm best / timm fp32", rows, best_names["timm"], "timm fp32", samples),
        _ratio("candidate (layer_norm WS) / bit_core fp32", rows,
               "candidate fp32 (bit_core, layer_norm WS)", "bit_core fp32", samples),
    ]
    profiles = {}
    if settings.profile:
        for key in ("bit_core", "timm"):
            if best_names[key]:
                log(f"  profiling one step of {best_names[key]}")
                profiles[best_names[key]] = profile_top_ops(runners[best_names[key]].step)
    del runners
    ws = weight_standardisation(settings, log, rows.get("bit_core fp32", {}).get("median_s"))
    forms = ws["forms"]
    for key, label in (("forward_backward_ms", "forward+backward"), ("forward_ms", "forward")):
        a, b = 1e3 / forms[1][key], 1e3 / forms[0][key]
        ratios.append({"name": f"weight standardisation alone, {label}: layer_norm form / "
                               f"bit_core", "numerator": forms[1]["form"],
                       "denominator": forms[0]["form"], "numerator_value": a,
                       "denominator_value": b, "value": a / b, "metric": "calls_per_s",
                       "per_round_range": None})
    return {"model": models.MODEL, "timm_model": models.TIMM_MODEL, "batch": batch,
            "weight_standardisation": ws,
            "resolution": res, "rounds": settings.train_repeats,
            "optimizer": "SGD momentum 0.9", "configs": list(rows.values()),
            "skipped": skipped, "best": best_names,
            "ratios": [r for r in ratios if r], "profiles": profiles}
