"""Stage finetune: train the BiT model on the prepared splits; checkpoint, loss curve, MLflow."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bit_core import create_model
from bit_core.config import Params
from bit_core.data import (ImageListDataset, eval_transform, read_classes, read_split,
                           train_transform)
from bit_core.device import resolve_device
from bit_core.evaluate import predict_all, topk_accuracy, torch_predictor
from bit_core.hyperrule import get_resolution
from bit_core.io import atomic_path, atomic_write_json
from bit_core.plots import plot_loss
from bit_core.train import Trainer
from tasks import tracking
from tasks.common import log, stage_main
from tasks.fetch_weights import WEIGHTS_FILE

CHECKPOINT = "checkpoint.pt"
CACHE_LIMIT = 100_000  # keep decoded images in memory for data sets up to this size


def resolve_sizes(params: Params, stats: dict) -> tuple[int, int]:
    """(precrop, crop): params.yaml values, else the BiT-HyperRule for the images' size."""
    rule_precrop, rule_crop = get_resolution((stats["image_height"], stats["image_width"]))
    crop = params.train.resolution or rule_crop
    precrop = params.train.precrop or round(crop * rule_precrop / rule_crop)
    return precrop, crop


def _loader(dataset, batch: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)


def write_history(history: list[dict], csv_path: Path) -> None:
    """The per-step records as CSV (step, loss, lr, images_per_s) for DVC plots."""
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "lr", "images_per_s"])
        writer.writeheader()
        writer.writerows(history)


def _flat_params(params: Params) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in params.model_dump().items()
            for key, value in values.items()}


def finetune(params: Params, data_root: Path, splits: Path, weights_dir: Path, out: Path,
             reports: Path) -> dict:
    """Fine-tune and write `out/checkpoint.pt`, `reports/{loss.csv,loss.png,metrics.json}`."""
    cfg = params.train
    torch.manual_seed(cfg.seed)
    stats = json.loads((splits / "stats.json").read_text())
    classes = read_classes(splits)
    precrop, crop = resolve_sizes(params, stats)
    train_samples = read_split(splits / "train.csv")
    cache = len(train_samples) <= CACHE_LIMIT
    train_set = ImageListDataset(data_root, train_samples, train_transform(precrop, crop, cfg.flip),
                                 cache=cache)
    val_set = ImageListDataset(data_root, read_split(splits / "val.csv"), eval_transform(crop),
                               cache=cache)
    device = resolve_device(cfg.device)
    weights = weights_dir / WEIGHTS_FILE
    model = create_model(params.model.name, num_classes=len(classes),
                         weights=weights if weights.is_file() else None).to(device)

    def evaluate(net) -> dict:
        if not len(val_set):
            return {}
        predict = torch_predictor(net, device)
        logits, labels = predict_all(predict, _loader(val_set, 64, cfg.workers))
        return {f"val_{k}": v for k, v in topk_accuracy(logits, labels).items()}

    meta = {"model_name": params.model.name, "classes": classes, "resolution": crop,
            "precrop": precrop, "num_classes": len(classes)}
    run_id = tracking.start_run(params.tracking.experiment, run_name=f"{params.model.name}-"
                                f"{params.data.source}")
    import mlflow

    try:
        steplog = tracking.StepLogger(run_id)
        trainer = Trainer(model, train_set, cfg, device, checkpoint_meta=meta, evaluate=evaluate,
                          on_step=steplog, on_eval=lambda m: mlflow.log_metrics(
                              {k: v for k, v in m.items() if k != "step"}, step=m["step"]))
        mlflow.log_params({**_flat_params(params), "plan.schedule": trainer.plan.schedule,
                           "plan.lr": trainer.plan.lr, "plan.mixup_alpha": trainer.plan.mixup_alpha,
                           "plan.precrop": precrop, "plan.resolution": crop,
                           "plan.precision": trainer.precision, "plan.device": str(device),
                           "data.train_images": len(train_set), "data.classes": len(classes)})
        start = time.perf_counter()
        state = trainer.fit(out / CHECKPOINT)
        seconds = time.perf_counter() - start
        steplog.flush()
        write_history(state.history, reports / "loss.csv")
        plot_loss({"train": state.history}, reports / "loss.png",
                  title=f"{params.model.name} on {params.data.source}")
        final = state.evals[-1] if state.evals else {}
        metrics = {"steps": state.step, "train_seconds": round(seconds, 2),
                   "train_images_per_s": round(state.step * cfg.batch / seconds, 2),
                   "final_loss": state.history[-1]["loss"],
                   **{k: v for k, v in final.items() if k != "step"}}
        atomic_write_json(reports / "metrics.json", metrics)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(reports / "loss.png"), "plots")
        mlflow.log_artifact(str(reports / "loss.csv"), "plots")
        tracking.write_run_file(out, run_id)
    finally:
        mlflow.end_run()
    return metrics


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="class-folder root")
    parser.add_argument("--splits", type=Path, required=True, help="prepare stage output")
    parser.add_argument("--weights", type=Path, required=True, help="fetch_weights output")
    parser.add_argument("--out", type=Path, required=True, help="directory for the checkpoint")
    parser.add_argument("--reports", type=Path, required=True, help="loss curve and metrics")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Fine-tune BiT with the BiT-HyperRule."""
    metrics = finetune(params, args.data, args.splits, args.weights, args.out, args.reports)
    log.info("fine-tuned: %s", metrics)


def main(argv=None) -> int:
    return stage_main("finetune", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
