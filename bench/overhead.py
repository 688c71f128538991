"""The `overhead` section: what the pipeline's machinery costs beyond the work of its stages.

A temporary git + DVC repository holds a chain of trivial stages (each a ``python -c`` writing a
small file), and a first ``dvc repro`` runs them. Then, with nothing to run (checked: no output
file changes), these take turns: ``python -c pass`` (an interpreter's start-up), a no-op ``dvc
repro``, the stages one by one with ``dvc repro --single-item`` in a plain loop, and the same
stages through the project's flow task ``flows.pipeline.run_stage`` in a Prefect flow, inside a
temporary Prefect server (``prefect_test_harness``, as the project's tests run the flow).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.measure import interleaved, ratio, row, timed
from tasks import environment

LOOP = "each stage by dvc repro --single-item, plain loop"
FLOW = "each stage by flows.pipeline.run_stage, Prefect flow"


def command(args: list[str], cwd: Path) -> str:
    """Run `args` in the pipeline's tool environment; its stdout, or an error with its output."""
    proc = subprocess.run(args, cwd=cwd, env=environment.tool_env(), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr[-500:]}")
    return proc.stdout


def make_repo(root: Path, count: int) -> Path:
    """A git + DVC repository with `count` chained stages, all run once."""
    stages = {f"s{i}": {"cmd": f"python -c \"open('s{i}.txt', 'w').write('{i}')\"",
                        **({"deps": [f"s{i - 1}.txt"]} if i else {}), "outs": [f"s{i}.txt"]}
              for i in range(count)}
    repo = root / "repo"
    repo.mkdir()
    command(["git", "init", "-q"], repo)
    command([environment.tool("dvc"), "init", "-q"], repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    command([environment.tool("dvc"), "repro"], repo)
    return repo


def variants(repo: Path, names: list[str]) -> dict:
    """The timed commands and flow (called inside a Prefect server)."""
    from prefect import flow

    from flows.pipeline import run_stage

    dvc = environment.tool("dvc")

    @flow(name="bench-stages")
    def stage_flow() -> None:
        ran = [r["stage"] for r in [run_stage(s, str(repo)) for s in names] if r["ran"]]
        if ran:
            raise RuntimeError(f"stages with nothing to do ran: {ran}")

    return {"python -c pass": lambda: command([sys.executable, "-c", "pass"], repo),
            "dvc repro, nothing to run": lambda: command([dvc, "repro"], repo),
            LOOP: lambda: [command([dvc, "repro", "--single-item", s], repo) for s in names],
            FLOW: stage_flow}


def run(settings, log) -> dict:
    environment.apply()  # the temporary Prefect server inherits it
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    n = settings.overhead_stages
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        repo = make_repo(Path(tmp), n)
        outputs = {p: p.stat().st_mtime_ns for p in repo.glob("s*.txt")}
        start = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=120):
            harness_s = time.perf_counter() - start
            fns = {k: timed(fn) for k, fn in variants(repo, [f"s{i}" for i in range(n)]).items()}
            samples = interleaved(fns, settings.overhead_rounds, settings.overhead_warmup)
        if outputs != {p: p.stat().st_mtime_ns for p in repo.glob("s*.txt")}:
            raise RuntimeError("a stage with nothing to do rewrote its output")
    rows = {k: row(s) for k, s in samples.items()}
    for k, r in rows.items():
        log(f"    {k}: {r['min_s']:.2f} s")
    return {"stages": n, "rounds": settings.overhead_rounds, "harness_start_s": harness_s,
            "rows": rows,
            "flow_overhead_per_stage_s": (rows[FLOW]["min_s"] - rows[LOOP]["min_s"]) / n,
            "ratios": [ratio("Prefect flow / plain loop, stages with nothing to do", rows, FLOW,
                             LOOP, "min_s", headline=True),
                       ratio("no-op dvc repro / python -c pass", rows,
                             "dvc repro, nothing to run", "python -c pass", "min_s")]}
