"""Stage register: the ONNX model into the MLflow Model Registry, as champion or challenger.

The alias ``champion`` moves to the new version only when its ONNX parity check passed and its
test metric is at least the current champion's plus the margin; otherwise the new version is the
``challenger``. ``models:/<name>@champion`` always names the model to deploy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from bit_core.config import ConfigError, Params, RegistryConfig
from bit_core.io import atomic_write_json
from tasks import tracking
from tasks.common import log, stage_main

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG = "test_metric"


def champion_metric(client, name: str) -> float | None:
    """The current champion's recorded metric, or None when there is no champion."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return float(version.tags.get(METRIC_TAG, "nan"))


def decide(cfg: RegistryConfig, new: float, parity_ok: bool, current: float | None) -> str:
    """Which alias a new version gets."""
    if not parity_ok:
        return CHALLENGER
    if current is None or np.isnan(current):
        return CHAMPION
    return CHAMPION if new >= current + cfg.margin else CHALLENGER


def register(params: Params, onnx_path: Path, checkpoint_dir: Path, eval_metrics: Path,
             export_report: Path, out: Path) -> dict:
    """Log the ONNX model to the run, register a version, set its alias; write `out`."""
    cfg = params.registry
    metrics = json.loads(eval_metrics.read_text())
    if cfg.metric not in metrics:
        raise ConfigError(f"registry.metric {cfg.metric!r} is not in {eval_metrics}: choose one of "
                       f"{', '.join(k for k in metrics if 'top' in k)}")
    value = float(metrics[cfg.metric])
    parity = json.loads(export_report.read_text())["max_abs_diff"] <= params.export.atol
    with tracking.appended_run(checkpoint_dir) as mlflow:
        if mlflow is None:
            raise FileNotFoundError(f"no MLflow run recorded in {checkpoint_dir}: run finetune")
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        example = np.zeros((1, 3, metrics["resolution"], metrics["resolution"]), np.float32)
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model",
                                     input_example=example, pip_requirements=["onnxruntime"])
        current = champion_metric(client, cfg.model_name)
        version = mlflow.register_model(info.model_uri, cfg.model_name)
        alias = decide(cfg, value, parity, current)
        client.set_model_version_tag(cfg.model_name, version.version, METRIC_TAG, str(value))
        client.set_model_version_tag(cfg.model_name, version.version, "parity_ok", str(parity))
        client.set_registered_model_alias(cfg.model_name, alias, version.version)
        mlflow.set_tags({"registry.version": version.version, "registry.alias": alias})
        mlflow.set_tags(tracking.dvc_out_hashes())  # this run's: see dvc_out_hashes
    record = {"model_name": cfg.model_name, "version": int(version.version), "alias": alias,
              "metric": cfg.metric, "value": value, "previous_champion": current,
              "parity_ok": parity}
    atomic_write_json(out, record)
    return record


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", type=Path, required=True, help="exported model.onnx")
    parser.add_argument("--checkpoint", type=Path, required=True, help="finetune output dir")
    parser.add_argument("--metrics", type=Path, required=True, help="evaluate metrics.json")
    parser.add_argument("--export-report", type=Path, required=True, help="export report")
    parser.add_argument("--out", type=Path, required=True, help="registry decision JSON")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Register the model and move the champion alias if it earned it."""
    record = register(params, args.onnx, args.checkpoint, args.metrics, args.export_report,
                      args.out)
    log.info("registered %s version %d as %s (%s = %.2f, champion had %s)",
             record["model_name"], record["version"], record["alias"], record["metric"],
             record["value"], record["previous_champion"])


def main(argv=None) -> int:
    return stage_main("register", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
