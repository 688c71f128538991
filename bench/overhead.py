"""Section 6: what the pipeline's machinery costs beyond the work of its stages.

(a) DVC. A temporary git + DVC repository (``git init``, ``dvc init``, analytics off) with a
three-stage dvc.yaml of trivial ``python -c`` stages. The first ``dvc repro`` runs them all;
after it, ``dvc repro`` has nothing to run (checked in its output) and its wall time is DVC's
own cost of deciding that. Timed next to ``dvc status``, ``dvc --version`` (the CLI's start-up)
and ``python -c pass`` (the interpreter's).

(b) Prefect. Inside ``prefect_test_harness`` (a temporary Prefect server, as the project's tests
run the flow) a flow of N tasks, each running one trivial subprocess, against the same N
subprocesses in a plain loop, plus an empty flow (the cost of a flow run itself). Then the real
flow's stage task, ``flows.pipeline.run_stage``, over the temporary repository's stages (each a
no-op ``dvc repro --single-item``, as ``bit-finetune`` runs one per stage), against the same
commands run directly. All variants take turns (interleaved rounds) after one warm-up each.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from bench.timing import interleaved, summary, timed

UP_TO_DATE = "Data and pipelines are up to date."
SKIPPED = "didn't change, skipping"
TRIVIAL = [sys.executable, "-c", "pass"]
# Three chained stages, each a python one-liner writing a small file.
STAGES = {
    "generate": {"cmd": "python -c \"open('numbers.txt', 'w').write(' '.join(map(str, "
                        "range(1000))))\"",
                 "outs": ["numbers.txt"]},
    "square": {"cmd": "python -c \"open('squares.txt', 'w').write(' '.join(str(int(n) ** 2) "
                      "for n in open('numbers.txt').read().split()))\"",
               "deps": ["numbers.txt"], "outs": ["squares.txt"]},
    "total": {"cmd": "python -c \"open('total.txt', 'w').write(str(sum(map(int, "
                     "open('squares.txt').read().split()))))\"",
              "deps": ["squares.txt"], "outs": ["total.txt"]},
}


def environment() -> dict[str, str]:
    """What ``flows.pipeline.dvc`` gives a stage: telemetry off, this interpreter's bin first."""
    from tasks.environment import tool_env

    return tool_env()


def command(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run `args`; its stdout + stderr, or RuntimeError naming the command."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout)[-500:]}")
    return proc.stdout + proc.stderr


def make_repo(root: Path, env: dict[str, str], dvc: list[str]) -> Path:
    """A git + DVC repository with the three-stage dvc.yaml, nothing run yet."""
    repo = root / "repo"
    repo.mkdir()
    command(["git", "init", "-q"], repo, env)
    command([*dvc, "init", "-q"], repo, env)
    command([*dvc, "config", "core.analytics", "false"], repo, env)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}, sort_keys=False))
    return repo


def nothing_to_run(args: list[str], repo: Path, env: dict[str, str], expect: str):
    """A timed command that must report `expect` and must not run a stage."""

    def run() -> float:
        start = time.perf_counter()
        output = command(args, repo, env)
        elapsed = time.perf_counter() - start
        if "Running stage" in output or expect not in output:
            raise RuntimeError(f"{' '.join(args)} was not a no-op: {output[-500:]}")
        return elapsed

    return run


def _rows(samples: dict[str, list[float]], commands: dict[str, str]) -> list[dict]:
    return [{"name": name, "command": commands[name], **summary(samples[name])}
            for name in samples]


def measure_dvc(repo: Path, env: dict[str, str], dvc: list[str], rounds: int, log) -> dict:
    """First `dvc repro` (runs every stage), then the no-op commands, interleaved."""
    start = time.perf_counter()
    output = command([*dvc, "repro"], repo, env)
    first = time.perf_counter() - start
    ran = output.count("Running stage")
    if ran != len(STAGES):
        raise RuntimeError(f"first dvc repro ran {ran} of {len(STAGES)} stages: {output[-500:]}")
    log(f"  dvc: first repro ran {ran} stages in {first:.2f} s; {rounds} rounds of no-ops")
    commands = {"dvc repro (nothing to run)": "dvc repro", "dvc status": "dvc status",
                "dvc --version (CLI start-up)": "dvc --version",
                "python -c pass (interpreter start-up)": "python -c pass"}
    fns = {"dvc repro (nothing to run)": nothing_to_run([*dvc, "repro"], repo, env, UP_TO_DATE),
           "dvc status": nothing_to_run([*dvc, "status"], repo, env, UP_TO_DATE),
           "dvc --version (CLI start-up)": timed(lambda: command([*dvc, "--version"], repo,
                                                                    env)),
           "python -c pass (interpreter start-up)": timed(lambda: command(TRIVIAL, repo, env))}
    rows = _rows(interleaved(fns, rounds), commands)
    for row in rows:
        log(f"    {row['name']}: {row['median_s']:.3f} s")
    return {"stages": list(STAGES), "first_repro_s": first, "first_repro_ran": ran,
            "noop_confirmed": True, "commands": rows}


@contextmanager
def quiet_console():
    """Prefect's console log handlers at WARNING (its API log handler, part of the cost, stays)."""
    handlers = [h for name in ("", "prefect") for h in logging.getLogger(name).handlers
                if type(h).__name__ == "PrefectConsoleHandler"]
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)


def _flows(repo: Path, tasks: int, env: dict[str, str], dvc: list[str]) -> dict:
    """The timed variants of part (b): Prefect flows and the loops they are compared with."""
    from prefect import flow, task

    from flows.pipeline import run_stage, stages

    names = stages(repo)

    @task(name="bench-subprocess", task_run_name="subprocess-{index}")
    def subprocess_task(index: int) -> int:
        command(TRIVIAL, repo, env)
        return index

    @flow(name="bench-subprocesses")
    def subprocess_flow(count: int) -> list[int]:
        return [subprocess_task(i) for i in range(count)]

    @flow(name="bench-empty")
    def empty_flow() -> None:
        return None

    @flow(name="bench-dvc-stages")
    def stage_flow(repo_dir: str) -> list[dict]:
        return [run_stage(stage, repo_dir) for stage in names]

    def checked_stage_flow() -> None:
        ran = [r["stage"] for r in stage_flow(str(repo)) if r["ran"]]
        if ran:
            raise RuntimeError(f"no-op stages ran: {ran}")

    def direct_stages() -> None:
        for stage in names:
            output = command([*dvc, "repro", "--single-item", stage], repo, env)
            if SKIPPED not in output:
                raise RuntimeError(f"stage {stage} was not skipped: {output[-300:]}")

    return {
        "stages": names,
        "variants": {
            f"{tasks} subprocesses in a loop": lambda: [command(TRIVIAL, repo, env)
                                                        for _ in range(tasks)],
            f"Prefect flow, {tasks} tasks of one subprocess": lambda: subprocess_flow(tasks),
            "Prefect flow, no task": empty_flow,
            f"{len(names)} dvc repro --single-item in a loop": direct_stages,
            f"Prefect flow, {len(names)} x flows.pipeline.run_stage": checked_stage_flow,
        },
    }


def _ratio(name: str, rows: dict, num: str, den: str, samples: dict) -> dict:
    a, b = rows[num]["median_s"], rows[den]["median_s"]
    pairs = [n / d for n, d in zip(samples[num], samples[den]) if d > 0]
    return {"name": name, "numerator": num, "denominator": den, "numerator_value": a,
            "denominator_value": b, "value": a / b, "metric": "s",
            "per_round_range": [round(min(pairs), 3), round(max(pairs), 3)] if pairs else None}


def measure_prefect(repo: Path, env: dict[str, str], dvc: list[str], tasks: int, rounds: int,
                    log) -> tuple[dict, list[dict]]:
    """Part (b) inside a temporary Prefect server; rows, overheads and the two ratios."""
    from prefect.testing.utilities import prefect_test_harness

    start = time.perf_counter()
    with quiet_console(), prefect_test_harness(server_startup_timeout=120):
        harness = time.perf_counter() - start
        built = _flows(repo, tasks, env, dvc)
        variants, names = built["variants"], built["stages"]
        # A flow's first run registers it with the server; the loops ran in part (a) already.
        warm = {name: timed(fn)() for name, fn in variants.items() if name.startswith("Prefect")}
        log(f"  prefect: temporary server up in {harness:.1f} s; first runs "
            + ", ".join(f"{k} {v:.2f} s" for k, v in warm.items()))
        samples = interleaved({name: timed(fn) for name, fn in variants.items()}, rounds)
    keys = list(variants)
    rows = {name: {"name": name, "first_run_s": warm.get(name), **summary(samples[name])}
            for name in keys}
    loop, flow_n, empty, dvc_loop, dvc_flow = (rows[k]["median_s"] for k in keys)
    result = {
        "harness_start_s": harness, "tasks": tasks, "stages": names,
        "variants": list(rows.values()),
        "subprocess_overhead_s": flow_n - loop,
        "subprocess_overhead_per_task_s": (flow_n - loop) / tasks,
        "flow_run_s": empty,
        "task_overhead_s": (flow_n - empty - loop) / tasks,
        "stage_overhead_s": dvc_flow - dvc_loop,
        "stage_overhead_per_stage_s": (dvc_flow - dvc_loop) / len(names),
        "stage_task_overhead_s": (dvc_flow - empty - dvc_loop) / len(names),
    }
    for row in rows.values():
        log(f"    {row['name']}: {row['median_s']:.3f} s")
    ratios = [
        _ratio(f"Prefect flow / plain loop, wall time of {tasks} trivial subprocesses", rows,
               keys[1], keys[0], samples),
        _ratio(f"Prefect flow (flows.pipeline.run_stage) / plain loop, wall time of "
               f"{len(names)} no-op dvc repro --single-item", rows, keys[4], keys[3], samples),
    ]
    return result, ratios


def run(settings, log) -> dict:
    from tasks import environment as tool_environment

    tool_environment.apply()  # the temporary Prefect server inherits this environment
    env = environment()
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        dvc = [tool_environment.tool("dvc")]
        repo = make_repo(Path(tmp), env, dvc)
        dvc_part = measure_dvc(repo, env, dvc, settings.overhead_repeats, log)
        prefect_part, ratios = measure_prefect(repo, env, dvc, settings.overhead_tasks,
                                               settings.overhead_repeats, log)
    return {"dvc": dvc_part, "prefect": prefect_part, "rounds": settings.overhead_repeats,
            "ratios": ratios}
