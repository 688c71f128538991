"""Section 3: model FLOPs, the GEMM peak of this machine, and the achieved GFLOP/s.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory,
no compute): 2 per multiply-add of convolutions and matrix products; GroupNorm, ReLU, pooling and
the optimizer are not counted. Training FLOPs are forward + backward of the loss (about 3x the
forward: the first convolution needs no input gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import models
from bench.timing import gemm_gflops
from bit_core.model import build_model


def count_flops(build, resolution: int, train: bool = False) -> int:
    """FLOPs for one image at `resolution`; `build()` must return a model (built on meta)."""
    with torch.device("meta"):
        model = build()
        x = torch.empty(1, 3, resolution, resolution)
        with FlopCounterMode(display=False) as counter:
            logits = model(x)
            if train:
                F.cross_entropy(logits, torch.zeros(1, dtype=torch.long)).backward()
    return int(counter.get_total_flops())


def model_flops(resolution: int) -> dict:
    bit = lambda: build_model(models.MODEL, models.NUM_CLASSES)  # noqa: E731

    def timm_build():
        import timm

        return timm.create_model(models.TIMM_MODEL, pretrained=False,
                                 num_classes=models.NUM_CLASSES)

    return {"resolution": resolution,
            "bit_core": {"forward": count_flops(bit, resolution),
                         "train": count_flops(bit, resolution, train=True)},
            "timm": {"forward": count_flops(timm_build, resolution),
                     "train": count_flops(timm_build, resolution, train=True)}}


def gemm_sample(sizes: tuple[int, ...], repeats: int, when: str) -> list[dict]:
    """fp32 and bf16 torch.mm GFLOP/s now; `when` labels the moment of the run."""
    runs = gemm_gflops(sizes, torch.float32, repeats) + gemm_gflops(sizes, torch.bfloat16, repeats)
    return [{**r, "when": when} for r in runs]


def gemm_peak(runs: list[dict]) -> dict:
    """Peak = the best of every GEMM measured during the run (the load of a shared machine
    varies, and a peak is what the hardware can do at best)."""
    peak = {dtype: max(r["gflops"] for r in runs if r["dtype"] == name)
            for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16"))}
    return {"runs": runs, "peak_gflops": peak}


def _library_flops(flops: dict, library: str) -> dict:
    return flops["timm"] if library == "timm" else flops["bit_core"]


def utilization(flops: dict, peak: dict, sections: dict) -> list[dict]:
    """Achieved GFLOP/s (model FLOPs x images/s) of every measured configuration."""
    rows = []
    train = sections.get("train")
    if train and "configs" in train and train.get("resolution") == flops["resolution"]:
        for cfg in train["configs"]:
            if "img_s" not in cfg:
                continue
            per_image = _library_flops(flops, cfg["library"])["train"]
            gflops = per_image * cfg["img_s"] / 1e9
            rows.append({"section": "train", "config": cfg["name"], "batch": train["batch"],
                         "precision": cfg["precision"], "gflop_per_image": per_image / 1e9,
                         "img_s": cfg["img_s"], "gflops": gflops,
                         "peak_gflops": peak[cfg["precision"]],
                         "fraction_of_peak": gflops / peak[cfg["precision"]]})
    infer = sections.get("infer")
    if infer and "variants" in infer and infer.get("resolution") == flops["resolution"]:
        for var in infer["variants"]:
            per_image = _library_flops(flops, var["library"])["forward"]
            for batch, result in var["results"].items():
                if "img_s" not in result:
                    continue
                gflops = per_image * result["img_s"] / 1e9
                rows.append({"section": "infer", "config": var["name"], "batch": int(batch),
                             "precision": var["precision"], "gflop_per_image": per_image / 1e9,
                             "img_s": result["img_s"], "gflops": gflops,
                             "peak_gflops": peak[var["precision"]],
                             "fraction_of_peak": gflops / peak[var["precision"]]})
    return rows


def run(settings, log, sections: dict, earlier_gemm: list[dict]) -> dict:
    flops = model_flops(settings.resolution)
    log(f"  R50x1 at {settings.resolution} px: forward {flops['bit_core']['forward'] / 1e9:.2f} "
        f"GFLOP/image, train {flops['bit_core']['train'] / 1e9:.2f} GFLOP/image")
    gemm = gemm_peak(earlier_gemm + gemm_sample(settings.gemm_sizes, settings.gemm_repeats,
                                                "flops section"))
    log(f"  GEMM peak: fp32 {gemm['peak_gflops']['fp32']:.0f} GFLOP/s, "
        f"bf16 {gemm['peak_gflops']['bf16']:.0f} GFLOP/s")
    peak = gemm["peak_gflops"]
    fwd, train = flops["bit_core"]["forward"], flops["bit_core"]["train"]
    best_precision = max(peak, key=peak.get)
    bounds = {  # images/s if every FLOP ran at the measured GEMM peak
        "precision": best_precision,
        "train_img_s": peak[best_precision] * 1e9 / train,
        "infer_img_s": peak[best_precision] * 1e9 / fwd,
        "infer_latency_ms_bs1": 1e3 * fwd / (peak[best_precision] * 1e9),
    }
    return {"flops": flops, "gemm": gemm, "bounds_at_gemm_peak": bounds,
            "utilization": utilization(flops, peak, sections)}
