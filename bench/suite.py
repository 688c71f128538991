"""Command line and orchestration of the benchmark suite (see :mod:`bench`)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import SECTIONS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ALIASES = {"training": "train", "inference": "infer", "gflops": "flops", "compute": "flops",
           "loading": "data", "dataload": "data", "pipeline": "overhead"}


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    resolution: int = 128
    train_batch: int = 32
    train_repeats: int = 4
    ws_repeats: int = 8  # rounds of the weight-standardisation component benchmark
    infer_batches: tuple[int, ...] = (1, 8, 32)
    # Timed rounds and discarded warm-up rounds per batch size (the parity call warms up too).
    infer_repeats: dict[int, int] = field(default_factory=lambda: {1: 9, 8: 5, 32: 4})
    infer_warmup: dict[int, int] = field(default_factory=lambda: {1: 1, 8: 1, 32: 0})
    gemm_sizes: tuple[int, ...] = (1024, 2048, 4096)
    gemm_repeats: int = 3
    scaling_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    scaling_resolutions: tuple[int, ...] = (64, 96, 128, 160, 192, 224)
    scaling_resolution_batch: int = 8
    scaling_models: int = 2
    scaling_warmup: int = 1
    scaling_repeats: int = 3
    # Data loading: source images (width, height) and format, BiT precrop / crop, loader
    # batches per round, the training batch measured at that crop, and the cache modes of
    # ImageListDataset to measure.
    data_sizes: dict[str, dict] = field(default_factory=lambda: {
        "CIFAR-10": {"source": (32, 32), "format": "PNG", "precrop": 160, "crop": 128,
                     "batches": 24, "train_batch": 32, "cache": (False, True)},
        "ImageNet": {"source": (400, 350), "format": "JPEG", "precrop": 512, "crop": 480,
                     "batches": 8, "train_batch": 4, "cache": (False,)}})
    data_images: int = 256  # generated per size
    data_batch: int = 32  # loader batch (train.batch / batch_split)
    data_repeats: int = 3
    data_workers: tuple[int, ...] = (0, 1, 2)  # main() sets 0, 1, 2 and the usable cores
    overhead_tasks: int = 5  # Prefect tasks (one trivial subprocess each) in the timed flow
    overhead_repeats: int = 3
    compile: bool = True
    compile_precision: str = "fp32"
    compile_timeout: float = 240.0
    profile: bool = True
    sections: tuple[str, ...] = SECTIONS
    elapsed_s: float = 0.0


def quick_settings(base: Settings) -> Settings:
    """Tiny sizes: seconds per section, for the test. Numbers are not comparable to a full run."""
    return replace(base, quick=True, resolution=64, train_batch=4, train_repeats=2, ws_repeats=2,
                   infer_batches=(1, 4), infer_repeats={1: 1, 4: 1}, infer_warmup={1: 0, 4: 0},
                   gemm_sizes=(256, 512), gemm_repeats=2, scaling_batches=(1, 2),
                   scaling_resolutions=(32, 64), scaling_resolution_batch=2, scaling_models=1,
                   scaling_warmup=0, scaling_repeats=1, compile=False, profile=True,
                   data_sizes={
                       "CIFAR-10": {**base.data_sizes["CIFAR-10"], "batches": 8,
                                    "train_batch": 4},
                       "ImageNet": {**base.data_sizes["ImageNet"], "source": (200, 175),
                                    "precrop": 256, "crop": 224, "batches": 4,
                                    "train_batch": 2}},
                   data_images=32, data_batch=8, data_repeats=2, overhead_tasks=2,
                   overhead_repeats=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark bit_core's BiT-M-R50x1 against timm and ONNX Runtime on this "
                    "machine; write results.json and RESULTS.md.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny batches, resolutions and repeats (seconds; for the tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--only", action="append", metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)}); repeat or "
                             "comma-separate")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and ONNX Runtime threads (default: usable cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    parser.add_argument("--compile-timeout", type=float, default=240.0,
                        help="seconds allowed for each torch.compile (default 240)")
    parser.add_argument("--no-profile", action="store_true", help="skip torch.profiler runs")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rebuild RESULTS.md and scaling.png from the "
                             "results.json in --out")
    args = parser.parse_args(argv)
    if args.only:
        names = [ALIASES.get(n.strip(), n.strip()) for item in args.only for n in item.split(",")
                 if n.strip()]
        unknown = sorted(set(names) - set(SECTIONS))
        if unknown:
            parser.error(f"unknown section(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(SECTIONS)}")
        args.sections = tuple(s for s in SECTIONS if s in names)
    else:
        args.sections = SECTIONS
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write(results: dict, out: Path) -> None:
    """Headline, targets, RESULTS.md and the plot from `results`; every file written atomically."""
    from bench import report
    from bit_core.io import atomic_write_json, atomic_write_text

    results["headline"] = report.headline(results)
    results["targets"] = report.targets(results)
    if "scaling" in results["sections"]:
        report.plot_scaling(results["sections"]["scaling"], out / "scaling.png")
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "RESULTS.md", report.markdown(results))
    for name in ("results.json", "RESULTS.md", "scaling.png"):
        if (out / name).exists():
            (out / name).chmod(0o644)  # mkstemp (behind the atomic writes) creates 0600


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        import json

        write(json.loads((args.out / "results.json").read_text()), args.out)
        log(f"bench: rebuilt {args.out / 'RESULTS.md'}")
        return 0
    from tasks import environment

    environment.apply()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # effective only before torch loads
    import torch

    from bench import compute, dataload, inference, machine, overhead, scaling, training

    threads = args.threads or machine.usable_cores()
    torch.set_num_threads(threads)
    settings = Settings(threads=threads, compile=not args.no_compile,
                        compile_timeout=args.compile_timeout, profile=not args.no_profile,
                        sections=args.sections,
                        data_workers=dataload.worker_counts(machine.usable_cores()),
                        # bf16 only pays where AMX makes bf16 GEMMs fast; elsewhere fp32 is faster.
                        compile_precision="bf16" if machine.has_amx() else "fp32")
    if args.quick:
        settings = quick_settings(settings)
    start = time.perf_counter()
    log(f"bench: sections {', '.join(settings.sections)}{' (quick)' if settings.quick else ''}, "
        f"{threads} threads, output {args.out}")
    results: dict = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.describe(threads),
        "sections": {},
        "errors": {},
    }
    try:
        from torch._inductor.runtime.runtime_utils import cache_dir

        # Compile times depend on what this cache already holds (cold: minutes).
        results["machine"]["inductor_cache"] = cache_dir()
    except Exception:  # noqa: BLE001 - informational only
        pass
    runners = {"train": lambda: training.run(settings, log),
               "infer": lambda: inference.run(settings, log),
               "flops": lambda: compute.run(settings, log, results["sections"], gemm_runs),
               "scaling": lambda: scaling.run(settings, log),
               "data": lambda: dataload.run(settings, log),
               "overhead": lambda: overhead.run(settings, log)}
    gemm_runs: list[dict] = []
    for name in settings.sections:
        t0 = time.perf_counter()
        log(f"[{name}]")
        try:
            if name in ("train", "infer") and "flops" in settings.sections:
                # A GEMM sample next to each timed section: the peak is the best of them all.
                gemm_runs += compute.gemm_sample(settings.gemm_sizes[-2:-1], settings.gemm_repeats,
                                                 f"before {name}")
            results["sections"][name] = runners[name]()
            results["sections"][name]["elapsed_s"] = time.perf_counter() - t0
            results["sections"][name]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        except Exception:  # noqa: BLE001 - record, go on with the other sections
            results["errors"][name] = traceback.format_exc()
            log(results["errors"][name])
        log(f"[{name}] {time.perf_counter() - t0:.0f} s")
    settings.elapsed_s = time.perf_counter() - start
    results["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["settings"] = {k: (list(v) if isinstance(v, tuple) else
                               {str(a): b for a, b in v.items()} if isinstance(v, dict) else v)
                           for k, v in asdict(settings).items()}
    out = Path(args.out)
    write(results, out)
    log(f"bench: wrote {out / 'results.json'} and {out / 'RESULTS.md'} "
        f"in {settings.elapsed_s:.0f} s")
    return 1 if results["errors"] else 0
