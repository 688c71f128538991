"""Command line, settings, machine description and the run of the sections (see :mod:`bench`)."""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import SECTIONS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MODULES = {"train": "training", "infer": "inference", "flops": "measure", "data": "dataload",
           "precision": "precision", "overhead": "overhead"}
VERSIONS = ("torch", "timm", "onnxruntime", "dvc", "prefect")


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    compile_precision: str | None = None  # None: no torch.compile rows
    resolution: int = 128
    train_batch: int = 32
    train_rounds: int = 5
    curve_steps: int = 20  # steps of each training configuration's loss curve (and warm-up)
    infer_batches: tuple[int, ...] = (1, 8, 32)
    infer_rounds: dict[int, int] = field(default_factory=lambda: {1: 20, 8: 8, 32: 5})
    infer_warmup: int = 1  # rounds after the first call, not counted
    gemm_sizes: tuple[int, ...] = (2048, 4096)
    gemm_repeats: int = 5
    copy_megabytes: int = 512  # the bandwidth's tensor: far beyond the caches
    # Source images, their format, BiT's precrop / crop, loader batches per round, and the
    # training batch at that crop.
    data_sizes: dict[str, dict] = field(default_factory=lambda: {
        "CIFAR-10": {"source": (32, 32), "format": "PNG", "precrop": 160, "crop": 128,
                     "batches": 24, "train_batch": 32},
        "ImageNet": {"source": (400, 350), "format": "JPEG", "precrop": 512, "crop": 480,
                     "batches": 8, "train_batch": 4}})
    data_images: int = 256
    data_batch: int = 32
    data_workers: tuple[int, ...] = (0,)
    data_rounds: int = 3
    precision_stop_after: int | None = None  # None: the default experiment's whole schedule
    overhead_stages: int = 3
    overhead_rounds: int = 3
    overhead_warmup: int = 1


def quick(s: Settings) -> Settings:
    """Tiny sizes, no torch.compile: proves that every section runs and writes its results in
    seconds. Its numbers are not comparable to a full run's."""
    return replace(
        s, quick=True, compile_precision=None, resolution=32, train_batch=2, train_rounds=1,
        curve_steps=3,
        infer_batches=(1, 2), infer_rounds={1: 1, 2: 1}, infer_warmup=0, gemm_sizes=(256,),
        gemm_repeats=2, copy_megabytes=16,
        data_sizes={"CIFAR-10": {**s.data_sizes["CIFAR-10"], "precrop": 40, "crop": 32,
                                 "batches": 4, "train_batch": 1},
                    "ImageNet": {**s.data_sizes["ImageNet"], "source": (100, 88),
                                 "precrop": 72, "crop": 64, "batches": 4, "train_batch": 1}},
        data_images=16, data_batch=4, data_rounds=1, precision_stop_after=5, overhead_stages=1,
        overhead_rounds=1, overhead_warmup=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark bit_core's BiT-M-R50x1 against timm and "
        "ONNX Runtime on this machine; write results.json and RESULTS.md.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, no torch.compile (a minute; for the tests)")
    parser.add_argument("--only", action="append", metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)}); repeat or "
                             "comma-separate")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime threads "
                        "(default: the usable cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows "
                        "(minutes of compiling when the inductor cache is cold)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite RESULTS.md from results.json in --out")
    args = parser.parse_args(argv)
    names = [n.strip() for item in args.only or SECTIONS for n in item.split(",") if n.strip()]
    if unknown := sorted(set(names) - set(SECTIONS)):
        parser.error(f"unknown section {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in names]
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(threads: int) -> dict:
    """What the numbers were measured on, stored with them."""
    import torch

    from bit_core.device import CPU_FLAGS, cpu_units

    units = cpu_units()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    return {"cpu_model": units.model, "flags": {f: f in units.flags for f in CPU_FLAGS},
            "flags_source": "/proc/cpuinfo", "amx": units.amx_bf16,
            "hypervisor": "hypervisor" in units.flags, "usable_cores": len(os.sched_getaffinity(0)),
            "threads": threads,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "versions": {"python": platform.python_version(),
                         **{p: importlib.metadata.version(p) for p in VERSIONS}},
            "git_commit": commit or None, "loadavg_start": list(os.getloadavg())}


def run_section(name: str, settings: Settings, results: dict) -> None:
    """Run one section into `results`; a failure is recorded and the others still run."""
    start = time.perf_counter()
    log(f"[{name}]")
    try:
        module = importlib.import_module(f"bench.{MODULES[name]}")
        results["sections"][name] = {**module.run(settings, log),
                                     "elapsed_s": time.perf_counter() - start,
                                     "loadavg_end": list(os.getloadavg())}
    except Exception:  # noqa: BLE001 - record it, go on with the other sections
        results["errors"][name] = traceback.format_exc()
        log(results["errors"][name])
    log(f"[{name}] {time.perf_counter() - start:.0f} s")


def write(results: dict, out: Path) -> None:
    """results.json and RESULTS.md, with the achieved GFLOP/s and the headline ratios."""
    from bench import report
    from bit_core.io import atomic_write_text

    results["utilization"] = report.utilization(results)
    results["targets"] = report.targets(results)
    results["infer_targets"] = report.infer_targets(results)
    results["headline"] = [{**r, "section": name} for name, s in results["sections"].items()
                           for r in s["ratios"] if r["headline"]]
    results["headline"] += [{**u, "section": "flops"} for u in results["utilization"]
                            if u["headline"]]
    # Insertion order kept (not sorted keys): sections, rows and ratios read in measuring order.
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "RESULTS.md", report.markdown(results))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        write(json.loads((args.out / "results.json").read_text()), args.out)
        return 0
    from tasks import environment

    environment.apply()
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or cores)
    machine = describe(torch.get_num_threads())
    # bf16 pays only where AMX makes bf16 matrix products fast; elsewhere fp32 is faster.
    settings = Settings(threads=torch.get_num_threads(), data_workers=tuple(sorted({0, cores})),
                        compile_precision=None if args.no_compile else
                        ("bf16" if machine["amx"] else "fp32"))
    settings = quick(settings) if args.quick else settings
    log(f"bench: {', '.join(args.sections)}{' (quick)' if args.quick else ''}, "
        f"{settings.threads} threads, into {args.out}")
    results = {"schema": 3, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "machine": machine, "settings": asdict(settings), "sections": {},
        "errors": {}}
    start = time.perf_counter()
    for name in args.sections:
        run_section(name, settings, results)
    machine.update(loadavg_end=list(os.getloadavg()), elapsed_s=time.perf_counter() - start)
    write(results, args.out)
    log(f"bench: wrote {args.out / 'RESULTS.md'} in {machine['elapsed_s']:.0f} s")
    return 1 if results["errors"] else 0
