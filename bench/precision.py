"""The `precision` section: does bf16 fine-tune the default experiment as fp32 does?

The default experiment (params.yaml as committed) is fine-tuned in fp32 and in bf16 by
the stages' own commands from dvc.yaml (fetch_data, prepare, fetch_weights once, then finetune
per run) in a temporary workspace, so nothing of the checkout changes. The bf16 loss curve is
compared with the fp32 one by the seeds' alignment rule (:func:`bit_core.align.compare_curves`,
MRE <= 0.05), and every checkpoint is scored on the test split. This is the evidence for what
``train.precision: auto`` picks on a CPU (:func:`bit_core.device.resolve_precision`).

A third run is the rule's control: fp32 in channels_last, the same arithmetic as the fp32 run
with its sums taken in another order (bf16 on a CPU trains channels_last too). How far its curve
and its top-1 drift from fp32's is what rounding alone does to this experiment, which trains from
scratch; a bf16 deviation of that size says nothing against bf16.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from bench.measure import CPU
from bit_core.align import compare_curves, read_curve_csv
from bit_core.config import load_params
from bit_core.data import ImageListDataset, eval_transform
from bit_core.device import cpu_units, resolve_precision
from bit_core.evaluate import predict_all, topk_accuracy, torch_predictor
from bit_core.splits import read_split
from bit_core.weights import load_trained
from flows import dag

REPO = Path(__file__).resolve().parents[1]
REFERENCE, CONTROL, CANDIDATE = "fp32", "fp32 channels_last", "bf16"
RUNS = {REFERENCE: {"precision": "fp32", "channels_last": False},
        CONTROL: {"precision": "fp32", "channels_last": True},
        CANDIDATE: {"precision": "bf16", "channels_last": None}}  # None: its default (on)
INPUT_STAGES = ("fetch_data", "prepare", "fetch_weights")


def _stage(work: Path, name: str, env: dict, extra: list[str] = ()) -> None:
    """Run a dvc.yaml stage's command in `work` (with this checkout's code)."""
    python, *args = dag.command(REPO, name).split()
    proc = subprocess.run([sys.executable, *args, *extra], cwd=work, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"stage {name} failed: {proc.stderr.strip()[-2000:]}")


def _set_train(params: Path, **values) -> None:
    from flows.overrides import apply_overrides

    apply_overrides(params, [f"train.{k}={json.dumps(v)}" for k, v in values.items()])


def test_top1(work: Path, checkpoint: Path) -> float:
    """Top-1 (%) of a fine-tuned checkpoint on the prepared test split, in fp32."""
    model, meta = load_trained(checkpoint)
    test = ImageListDataset(work / "data/raw", read_split(work / "data/prepared/test.csv"),
                            eval_transform(meta["resolution"]))
    logits, labels = predict_all(torch_predictor(model, model.fc.weight.device),
                                 DataLoader(test, batch_size=64))
    return topk_accuracy(logits, labels, ks=(1,))["top1"]


def finetune(work: Path, name: str, env: dict, stop_after: int | None) -> dict:
    """The finetune stage as RUNS[name] sets it: its metrics, test top-1 and seconds."""
    params, folder = work / "params.yaml", name.replace(" ", "-")
    _set_train(params, **RUNS[name], stop_after=stop_after)
    out, reports = work / f"models/{folder}", work / f"reports/{folder}"
    start = time.perf_counter()
    _stage(work, "finetune", env, ["--out", str(out), "--reports", str(reports),
                                   "--resume-dir", str(work / f"resume/{folder}")])
    seconds = time.perf_counter() - start
    metrics = json.loads((reports / "metrics.json").read_text())
    return {**metrics, "stage_s": seconds, "test_top1": test_top1(work, out / "checkpoint.pt"),
            "curve": read_curve_csv(reports / "loss.csv")}


def run(settings, log) -> dict:
    units = cpu_units()
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        work = Path(tmp)
        shutil.copyfile(REPO / "params.yaml", work / "params.yaml")
        env = {**os.environ, "BIT_PARAMS": str(work / "params.yaml"), "PYTHONPATH": str(REPO),
               "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        cfg = load_params(work / "params.yaml").train
        for name in INPUT_STAGES:
            _stage(work, name, env)
        runs = {}
        for name in RUNS:
            runs[name] = finetune(work, name, env, settings.precision_stop_after)
            log(f"  {name}: final loss {runs[name]['final_loss']:.4f}, test top-1 "
                f"{runs[name]['test_top1']:.2f}%, {runs[name]['stage_s']:.0f} s")
    rows = {name: {"run": name, **RUNS[name], "min_s": r["stage_s"], "median_s": r["stage_s"],
                   "max_s": r["stage_s"], "samples_s": [r["stage_s"]],
                   **{k: r[k] for k in ("steps", "final_loss", "val_top1", "test_top1",
                                        "train_images_per_s") if k in r}}
            for name, r in runs.items()}
    aligns = {name: compare_curves(runs[name]["curve"], runs[REFERENCE]["curve"])
              for name in (CONTROL, CANDIDATE)}
    for name, align in aligns.items():
        rows[name].update(mre=align.mre, mae=align.mae, aligned=align.passed,
                          top1_change=rows[name]["test_top1"] - rows[REFERENCE]["test_top1"])
        log(f"  {name} against fp32: MRE {align.mre:.4f} over {align.steps} steps "
            f"({'passes' if align.passed else 'fails'})")
    bf16, control = rows[CANDIDATE], rows[CONTROL]
    return {"params_precision": cfg.precision, "cpu": units.describe(),
            "auto_picks": resolve_precision("auto", CPU, units),
            "steps": aligns[CANDIDATE].steps, "mre_max": aligns[CANDIDATE].mre_max,
            **{k: bf16[k] for k in ("mre", "mae", "aligned", "top1_change")},
            "control": {k: control[k] for k in ("run", "mre", "mae", "aligned", "top1_change")},
            "rows": rows, "ratios": [], "curves": {name: r["curve"] for name, r in runs.items()}}
