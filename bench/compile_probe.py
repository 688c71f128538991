"""torch.compile in a child process, under a time limit, before the suite compiles in-process.

Interrupting a compilation inside the measuring process is not an option: a torch.compile
stopped by a signal leaves the dispatcher's thread-local state broken (the next eager call
fails with "PythonDispatcherTLS was not set"). So the child compiles exactly the graphs the
suite will use (same model, weights, shapes and inductor settings) and reports each compile
time; the parent kills it when one compile exceeds its budget. What the child finished is in the
inductor cache, so the suite's own compile is then quick, and what it did not finish is skipped.

Child: ``python -m bench.compile_probe {train,infer} --resolution R --threads T --precision P
BATCH [BATCH ...]`` prints one JSON line when ready, then one per compiled batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

STARTUP_TIMEOUT_S = 180.0


def prewarm(kind: str, batches: list[int], settings, log) -> dict[int, float | str]:
    """Compile in a child; {batch: compile seconds, or why it is skipped}."""
    cmd = [sys.executable, "-m", "bench.compile_probe", kind, "--resolution",
           str(settings.resolution), "--threads", str(settings.threads), "--precision",
           settings.compile_precision, *map(str, batches)]
    root = str(Path(__file__).resolve().parents[1])  # bench/ is not an installed package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=root)
    lines: queue.Queue = queue.Queue()
    stderr: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    result: dict[int, float | str] = {}
    budget = STARTUP_TIMEOUT_S
    pending = list(batches)
    try:
        while True:
            try:
                line = lines.get(timeout=budget)
            except queue.Empty:
                what = f"batch {pending[0]}" if pending and budget != STARTUP_TIMEOUT_S \
                    else "start-up"
                reason = f"torch.compile ({what}) did not finish within {budget:.0f} s"
                log(f"  compile probe: {reason}")
                for b in pending:
                    result[b] = reason if b == pending[0] else f"not compiled ({reason})"
                break
            if line is None:
                break
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "ready" in msg:
                budget = settings.compile_timeout
            elif "batch" in msg:
                result[msg["batch"]] = msg["compile_s"]
                pending.remove(msg["batch"])
                log(f"  compile probe ({kind}, batch {msg['batch']}): {msg['compile_s']:.0f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    tail = "".join(stderr).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    for b in pending:
        result.setdefault(b, f"torch.compile failed in the child: {tail[0][:300]}")
    return result


def _train(args) -> None:
    import torch

    from bench import models
    from bench.training import TrainRunner, TrainVariant

    variant = TrainVariant("probe", "bit_core", args.precision, True, compiled=True)
    for batch in args.batches:
        runner = TrainRunner(variant, models.bit_model(), batch, args.resolution)
        _emit({"ready": True})
        start = time.perf_counter()
        runner.probe()
        _emit({"batch": batch, "compile_s": time.perf_counter() - start})
        del runner
        torch._dynamo.reset()


def _infer(args) -> None:
    from bench import models
    from bench.inference import _batch, compiled_predictor
    from bit_core import fold_weight_standardization

    predict = compiled_predictor(fold_weight_standardization(models.bit_model().eval()),
                                 args.precision)
    _emit({"ready": True})
    for batch in args.batches:
        x = _batch(batch, args.resolution)
        start = time.perf_counter()
        predict(x)
        _emit({"batch": batch, "compile_s": time.perf_counter() - start})


def _emit(msg: dict) -> None:
    print(json.dumps(msg), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_probe")
    parser.add_argument("kind", choices=["train", "infer"])
    parser.add_argument("batches", type=int, nargs="+")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    (_train if args.kind == "train" else _infer)(args)


if __name__ == "__main__":
    main()
