"""Stage finetune: train the BiT model on the prepared splits; checkpoint, loss curve, MLflow."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bit_core import create_model, distributed
from bit_core.config import Params, TrainConfig
from bit_core.contracts import CHECKPOINT, WEIGHTS_FILE, WEIGHTS_SOURCE
from bit_core.data import ImageListDataset, eval_transform, train_transform
from bit_core.device import resolve_device
from bit_core.errors import ClusterError, ConfigError
from bit_core.evaluate import predict_all, topk_accuracy, torch_predictor
from bit_core.hyperrule import resolve_resolution
from bit_core.io import atomic_path, atomic_write, atomic_write_json
from bit_core.plots import plot_loss
from bit_core.splits import fingerprint, read_classes, read_split
from bit_core.train import Trainer
from tasks import tracking
from tasks.common import error_line, exit_now, log, read_params, stage_main

CACHE_LIMIT = 100_000  # keep decoded images in memory for data sets up to this size


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


class ProgressReporter:
    """A progress bar with loss, lr and images/s, plus a log line every `every` steps (so logs
    of non-interactive runs, e.g. under DVC or a Prefect worker, show progress too)."""

    def __init__(self, total: int, start: int, every: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
            TimeRemainingColumn

        self.every = every
        self.bar = Progress(TextColumn("fine-tune"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total, completed=start, stats="")

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def __call__(self, record: dict) -> None:
        stats = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                 f"{record['images_per_s']:.0f} img/s")
        self.bar.update(self.task, completed=record["step"], stats=stats)
        if record["step"] % self.every == 0 and not self.bar.console.is_terminal:
            log.info("step %d: %s", record["step"], stats)


def _describe_resume_dir(resume_dir: Path) -> None:
    resume_dir.mkdir(parents=True, exist_ok=True)
    note = resume_dir / "README.txt"
    if not note.exists():
        note.write_text("Checkpoints of an interrupted fine-tune. The next run with the same "
                        "parameters resumes from checkpoint.pt here; a finished run moves it to "
                        "models/finetuned/.\n")


def _datasets(params: Params, data_root: Path, splits: Path):
    """(train set, val set, classes, (precrop, crop)) of the prepared splits."""
    cfg = params.train
    stats = json.loads((splits / "stats.json").read_text())
    precrop, crop = resolve_resolution((stats["image_height"], stats["image_width"]),
                                       cfg.resolution, cfg.precrop)
    train_samples = read_split(splits / "train.csv")
    cache = len(train_samples) <= CACHE_LIMIT
    train_set = ImageListDataset(data_root, train_samples, train_transform(precrop, crop, cfg.flip),
                                 cache=cache)
    val_set = ImageListDataset(data_root, read_split(splits / "val.csv"), eval_transform(crop),
                               cache=cache)
    return train_set, val_set, read_classes(splits), (precrop, crop)


def _plan_params(params: Params, trainer: Trainer, sizes: tuple[int, int], world, device,
                 train_set, classes) -> dict:
    """params.yaml as run, plus what the HyperRule and the host resolved it to."""
    precrop, crop = sizes
    return {**_flat_params(params), "plan.schedule": trainer.plan.schedule,
            "plan.lr": trainer.plan.lr, "plan.mixup_alpha": trainer.plan.mixup_alpha,
            "plan.precrop": precrop, "plan.resolution": crop,
            "plan.precision": trainer.precision, "plan.compile": trainer.compiled,
            "plan.device": str(device), "plan.processes": world.size,
            "data.train_images": len(train_set), "data.classes": len(classes)}


def _weights_identity(weights_dir: Path) -> str:
    """The SHA-256 the fetch_weights stage recorded for the starting weights, or "none"."""
    source = weights_dir / WEIGHTS_SOURCE
    return json.loads(source.read_text()).get("sha256", "none") if source.is_file() else "none"


def _trainer(params: Params, world: distributed.World, device: torch.device, datasets: tuple,
             splits: Path, weights_dir: Path) -> Trainer:
    """The model (from the fetched weights, if any) and its Trainer; rank 0 evaluates."""
    cfg = params.train
    train_set, val_set, classes, (precrop, crop) = datasets
    weights = weights_dir / WEIGHTS_FILE
    if params.weights.source != "none" and not weights.is_file():
        raise ConfigError(f"weights.source is {params.weights.source} but {weights} does not "
                          "exist: run the fetch_weights stage (or set weights.source: none to "
                          "train from scratch)")
    model = create_model(params.model.name, num_classes=len(classes),
                         weights=weights if params.weights.source != "none" else None).to(device)

    def evaluate(net) -> dict:
        if not len(val_set) or not world.is_main:
            return {}
        predict = torch_predictor(getattr(net, "module", net), device)
        logits, labels = predict_all(predict, _loader(val_set, 64, cfg.workers))
        return {f"val_{k}": v for k, v in topk_accuracy(logits, labels).items()}

    meta = {"model_name": params.model.name, "classes": classes, "resolution": crop,
            "precrop": precrop, "num_classes": len(classes), "data": fingerprint(splits),
            "weights": _weights_identity(weights_dir)}
    return Trainer(distributed.wrap(model, world, device), train_set, cfg, device,
                   checkpoint_meta=meta, evaluate=evaluate, rank=world.rank, world=world.size)


def finetune(params: Params, data_root: Path, splits: Path, weights_dir: Path, out: Path,
             reports: Path, resume_dir: Path | None = None) -> dict:
    """Fine-tune and write `out/checkpoint.pt`, `reports/{loss.csv,loss.png,metrics.json}`.

    Periodic and interruption checkpoints go to `resume_dir` (not a DVC output, so it survives
    the stage being re-run); a later run with the same parameters resumes from it and
    continues its MLflow run. The run ends FINISHED, KILLED when stopped by a signal (the
    checkpoint is kept), or FAILED.

    Under torchrun every process, on this host or others, trains on its slice of each batch;
    global rank 0 alone evaluates, logs to MLflow and writes files. A lost process ends the
    others with one line naming it.
    """
    cfg = params.train
    torch.manual_seed(cfg.seed)
    datasets = _datasets(params, data_root, splits)
    with distributed.session(resolve_device(cfg.device), cfg.peer_timeout,
                             functools.partial(exit_now, "finetune")) as (world, device):
        trainer = _trainer(params, world, device, datasets, splits, weights_dir)
        resume_file = resume_dir / CHECKPOINT if resume_dir else None
        if resume_dir is not None and world.is_main:
            _describe_resume_dir(resume_dir)
        resumed = trainer.resume(resume_file)
        if not world.is_main:
            _fit(trainer, resume_file, out, None)
            return {}
        with tracking.training_run(params.tracking.experiment,
                                   f"{params.model.name}-{params.data.source}",
                                   continue_from=resume_dir if resumed else None,
                                   record_in=resume_dir) as run:
            train_set, _, classes, sizes = datasets
            run.log_params(_plan_params(params, trainer, sizes, world, device, train_set, classes))
            trainer.on_eval = lambda m: run.log_metrics(
                {k: v for k, v in m.items() if k != "step"}, step=m["step"])
            started = trainer.state.step  # a resumed run's steps before this one are not timed
            state, seconds = _fit(trainer, resume_file, out, run)
            metrics = _write_reports(params, state, state.step - started, seconds, reports)
            run.log_metrics({k: float(v) for k, v in metrics.items()})
            for name in ("loss.png", "loss.csv"):
                run.log_artifact(reports / name, "plots")
            run.log_artifact(out / CHECKPOINT, "checkpoint")
            tracking.write_run_file(out, run.id)
        return metrics


def _fit(trainer: Trainer, resume_file: Path | None, out: Path, run) -> tuple:
    """Train to the end (or to stop_after); leave the checkpoint in `out` (and, when stopped
    early, in the resume directory for the next run). Returns (state, seconds)."""
    start = time.perf_counter()
    main = trainer.rank == 0
    with ProgressReporter(trainer.plan.steps, trainer.state.step, trainer.cfg.eval_every) as bar:
        trainer.on_step = _both(run.log_step, bar) if run is not None else None
        state = trainer.fit(resume_file or out / CHECKPOINT)
    seconds = time.perf_counter() - start
    if resume_file is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        if state.step < trainer.plan.steps:  # stopped early: the next run continues from it
            atomic_write(out / CHECKPOINT, lambda tmp: shutil.copyfile(resume_file, tmp))
        else:
            os.replace(resume_file, out / CHECKPOINT)
    return state, seconds


def _both(*callbacks):
    def call(record: dict) -> None:
        for callback in callbacks:
            callback(record)

    return call


def _write_reports(params: Params, state, steps_timed: int, seconds: float, reports: Path
                   ) -> dict:
    """loss.csv, loss.png and metrics.json; images/s over the `steps_timed` steps that took
    `seconds`."""
    write_history(state.history, reports / "loss.csv")
    plot_loss({"train": state.history}, reports / "loss.png",
              title=f"{params.model.name} on {params.data.source}")
    final = state.evals[-1] if state.evals else {}
    metrics = {"steps": state.step, "train_seconds": round(seconds, 2),
               "train_images_per_s": round(steps_timed * params.train.batch / seconds, 2),
               "final_loss": state.history[-1]["loss"],
               **{k: v for k, v in final.items() if k != "step"}}
    atomic_write_json(reports / "metrics.json", metrics)
    return metrics


def relaunch_with_torchrun(cfg: TrainConfig, argv: list[str]) -> int:
    """Run this stage again as `cfg.processes` torchrun workers on this host, which meet the
    workers of the other `cfg.nodes` hosts at `cfg.rdzv_endpoint`; return the exit code.

    A worker reports its own errors and stops in one line (exit code 2); the others are then
    stopped with SIGTERM. Any other failure is named here.
    """
    from torch.distributed.elastic.multiprocessing import SignalException

    try:
        failed = distributed.launch(cfg, ["-m", "tasks.finetune", *argv])
    except SignalException as stop:  # passed on to the workers, which say where they stopped
        return 128 + stop.sigval
    except ClusterError as err:
        print(error_line("finetune", err), file=sys.stderr)
        return 2
    if not failed:
        return 0
    crashed = {rank: code for rank, code in failed.items() if code not in (2, -signal.SIGTERM)}
    if not crashed and 2 in failed.values():
        return 2
    rank = min(crashed or failed)
    print(f"error: finetune: training process {rank} exited with code {failed[rank]}; "
          "its output above says why", file=sys.stderr)
    return 1


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="class-folder root")
    parser.add_argument("--splits", type=Path, required=True, help="prepare stage output")
    parser.add_argument("--weights", type=Path, required=True, help="fetch_weights output")
    parser.add_argument("--out", type=Path, required=True, help="directory for the checkpoint")
    parser.add_argument("--reports", type=Path, required=True, help="loss curve and metrics")
    parser.add_argument("--resume-dir", type=Path, default=None,
                        help="where periodic checkpoints go and interrupted runs resume from")
    parser.add_argument("--data-report", type=Path, default=None,
                        help="the prepare stage's data report, logged to the run")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Fine-tune BiT with the BiT-HyperRule."""
    metrics = finetune(params, args.data, args.splits, args.weights, args.out, args.reports,
                       args.resume_dir)
    tracking.log_data_report(args.out, args.data_report)
    log.info("fine-tuned: %s", metrics)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = _train_settings()
    if cfg is not None and cfg.nodes * cfg.processes > 1 \
            and not distributed.launched_by_torchrun():
        return relaunch_with_torchrun(cfg, argv)
    return stage_main("finetune", _args, _run, argv, sigterm_cleans_up=False)


def _train_settings() -> TrainConfig | None:
    try:
        return read_params().train
    except Exception:  # noqa: BLE001 - stage_main reports params errors properly
        return None


if __name__ == "__main__":
    raise SystemExit(main())
