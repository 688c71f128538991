"""`bit`: run the pipeline, inspect models and parameters, fetch weights, open the MLflow UI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated, get_args

import typer
from rich.console import Console
from rich.table import Table

from bit_core.config import TrainConfig
from bit_core.redact import redact, redact_value
from flows import dag
from tasks import environment

app = typer.Typer(help="bit-pipeline: fine-tune, export, compile and measure BiT (ResNetV2) "
                  "models with DVC, MLflow and Prefect.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _environment() -> None:
    # Every command runs with the project's tool settings (telemetry off), in this process before
    # any tool starts, and in the commands it starts.
    environment.apply()

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-S", help="override a parameter in params.yaml, e.g. -S train.batch=64 (repeatable)")]


def _fail(message: str) -> None:
    """Print one redacted error line and exit with status 2."""
    err_console.print(f"[red]error:[/red] {redact(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command("models")
def models() -> None:
    """List the official BiT variants and their sizes."""
    import torch

    from bit_core.model import build_model
    from bit_core.variants import VARIANTS

    table = Table("name", "blocks", "width", "upstream classes", "params (M)")
    for name, variant in VARIANTS.items():
        with torch.device("meta"):
            count = sum(p.numel() for p in build_model(name).parameters()) / 1e6
        table.add_row(name, str(list(variant.block_units)), f"x{variant.width_factor}",
                      str(variant.upstream_classes), f"{count:.2f}")
    console.print(table)


@app.command("params")
def params(file: Path = typer.Option(Path("params.yaml"), help="parameters file")) -> None:
    """Validate params.yaml and print every effective value."""
    from bit_core.config import ConfigError, load_params

    try:
        loaded = load_params(file)
    except ConfigError as err:
        _fail(str(err))
    console.print_json(json.dumps(redact_value(loaded.model_dump())))


@app.command("fetch-weights")
def fetch_weights(
    name: str = typer.Argument(..., help="official variant, e.g. BiT-M-R50x1"),
    cache_dir: Path = typer.Option(Path("~/.cache/bit-pipeline"), help="download directory"),
    url: str | None = typer.Option(None, help="mirror URL instead of the official one"),
) -> None:
    """Download an official checkpoint (resumable), verify it, and print its path and sha256."""
    from bit_core.download import DownloadError
    from bit_core.io import file_digest
    from bit_core.weights import WeightsError, fetch_official

    if url is not None and not url.lower().startswith(("http://", "https://")):
        _fail(f"--url {url}: give an http(s) mirror; for a file on this machine set "
              "weights.source: file and weights.path in params.yaml")
    try:
        path = fetch_official(name, cache_dir, url=url)
    except (DownloadError, WeightsError, ValueError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"cannot use --cache-dir {cache_dir} ({err.strerror or err}): give a folder")
    console.print(f"{path}  sha256={file_digest(path)}")


def _results_summary() -> None:
    table = Path(dag.EVAL_TABLE)
    if table.is_file():
        print(table.read_text())
    console.print("Results:")
    for path in dag.RESULTS:
        if Path(path).exists():
            console.print(f"  {path}")
    console.print("Compare runs:  make ui   (MLflow UI on http://127.0.0.1:5000)")


@app.command("run")
def run(set_: SetOption = None,
        preset: str | None = typer.Option(None, "--preset", "-P", help="apply a recipe from "
                                          "presets/ first: cifar10, cifar100, imagenet, flowers"),
        force: bool = typer.Option(False, help="re-run every stage"),
        until: str | None = typer.Option(None, "--until", "-U", help="stop after this stage "
                                         "(and what it needs), e.g. --until finetune")) -> None:
    """Run the pipeline with DVC (only what changed), after applying a preset and --set values."""
    from bit_core.config import ConfigError
    from flows.overrides import apply_overrides, preset_overrides

    if not Path("dvc.yaml").is_file():
        _fail("dvc.yaml not found: run from the repository root")
    stages = dag.stages() if until else []
    if until is not None and until not in stages:
        _fail(f"--until {until}: no such stage; choose from {', '.join(stages)}")
    try:
        changes = (preset_overrides(preset) if preset else []) + (set_ or [])
        params = apply_overrides(Path("params.yaml"), changes).model_dump()
    except ConfigError as err:
        _fail(str(err))
    dvc = [environment.tool("dvc"), "repro"]
    wanted = dag.needs(".", until) if until else set(dag.stages())
    refresh = [] if force else [dvc + ["--force", "--single-item", stage]
                                for stage in dag.changing_sources(params) if stage in wanted]
    for command in refresh + [dvc + (["--force"] if force else []) + ([until] if until else [])]:
        if subprocess.run(command, env=environment.tool_env()).returncode != 0:
            _fail("the pipeline failed: see the stage's error above")
    if until and until != stages[-1]:
        train = Path(dag.TRAIN_METRICS)
        if until == "finetune" and train.is_file():
            console.print_json(train.read_text())
        console.print(f"Stopped after {until}; the later stages did not run (see `dvc status`).")
        return
    _results_summary()


DEVICES = get_args(TrainConfig.model_fields["device"].annotation)  # train.device's values


@app.command("flow")
def flow(set_: SetOption = None, device: str = typer.Option("auto", help="|".join(DEVICES))
         ) -> None:
    """Run the bit-finetune Prefect flow here (a temporary local Prefect server if none is set)."""
    import shutil
    import tempfile

    from bit_core.config import ConfigError
    from flows.overrides import apply_overrides
    from flows.pipeline import (PreflightError, StageError, bit_finetune, check_tracking_server,
                                run_changes, stop_grace)
    from flows.workspace import WorkspaceError

    if device not in DEVICES:
        _fail(f"--device {device}: choose one of {', '.join(DEVICES)}")
    # Bad input fails here in one line, before a Prefect server starts and the flow run logs it.
    with tempfile.TemporaryDirectory(prefix="bit-flow-") as scratch:
        try:
            if Path("params.yaml").is_file():
                shutil.copy("params.yaml", Path(scratch) / "params.yaml")
            apply_overrides(Path(scratch) / "params.yaml", run_changes(set_, device, None))
            check_tracking_server(environment.tracking_uri())
            stop_grace()
        except (ConfigError, PreflightError) as err:
            _fail(str(err).replace(str(Path(scratch) / "params.yaml"), "params.yaml"))
    try:
        result = bit_finetune(overrides=set_ or [], device=device, repo=str(Path.cwd()))
    except (ConfigError, PreflightError, StageError, WorkspaceError) as err:
        _fail(str(err))
    console.print_json(json.dumps(result))


def _curve(source: str) -> dict[int, float]:
    """A loss curve from a CSV file or an MLflow run id (metric `loss`)."""
    from bit_core.align import read_curve_csv

    if Path(source).is_file():
        try:
            return read_curve_csv(Path(source))
        except UnicodeDecodeError:
            _fail(f"{source} is not a text file: give a loss CSV, as reports/train/loss.csv")
        except ValueError as err:
            _fail(f"{err} (as in reports/train/loss.csv)")
    uri = environment.tracking_uri()
    if Path(source).suffix or "/" in source or (store := environment.missing_store(uri)):
        where = "no such file" if Path(source).suffix or "/" in source else \
            f"there is no MLflow store here ({store})"
        _fail(f"{source!r} is neither a CSV file nor an MLflow run id: {where}")
    from tasks import tracking

    tracking.configure()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        client.get_run(source)
        history = client.get_metric_history(source, "loss")
    except MlflowException:
        _fail(f"{source!r} is neither a CSV file nor an MLflow run id in {redact(uri)}")
    if not history:
        _fail(f"MLflow run {source} has no 'loss' metric")
    return {m.step: m.value for m in history}


@app.command("compare-loss")
def compare_loss(
    candidate: str = typer.Argument(..., help="loss CSV or MLflow run id of the run to check"),
    reference: str = typer.Argument(..., help="loss CSV or MLflow run id of the reference run"),
    mre: float = typer.Option(0.05, help="pass if mean relative error <= this"),
    mae: float = typer.Option(0.0002, help="... or if mean absolute error <= this"),
    plot: Path = typer.Option(Path("reports/loss_alignment.png"), help="PNG with both curves"),
) -> None:
    """Check that a run's loss curve matches a reference (exit 1 when it does not)."""
    from bit_core.align import compare_curves
    from bit_core.plots import plot_loss

    a, b = _curve(candidate), _curve(reference)
    try:
        result = compare_curves(a, b, mre_max=mre, mae_max=mae)
    except ValueError as err:
        _fail(str(err))
    try:
        plot_loss({"candidate": [{"step": s, "loss": v} for s, v in sorted(a.items())],
                   "reference": [{"step": s, "loss": v} for s, v in sorted(b.items())]}, plot,
                  title="Loss alignment")
    except OSError as err:
        _fail(f"cannot write the plot {plot} ({err.strerror or err}): give --plot a .png path")
    verdict = "[green]PASS[/green]" if result.passed else "[red]FAIL[/red]"
    console.print(f"{verdict} over {result.steps} steps: MRE {result.mre:.4g} (<= {mre}) "
                  f"MAE {result.mae:.4g} (<= {mae}); plot: {plot}")
    raise typer.Exit(0 if result.passed else 1)


@app.command("predict")
def predict(
    paths: list[Path] = typer.Argument(..., help="image files and folders of images"),
    model: str = typer.Option("champion", "--model", "-m", help="champion, challenger, a "
                              "registered version number, or an .onnx / checkpoint .pt file"),
    top_k: int | None = typer.Option(None, "--top-k", "-k", show_default=False,
                                     help="classes to show per image (default: 5, or all the "
                                     "model has when fewer)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Classify images with the registered model (or a model file); exit 1 if any is unreadable."""
    from bit_core.config import ConfigError, load_params
    from bit_core.errors import ContractError
    from bit_core.serving import ImageError
    from tasks.predict import open_model
    from tasks.predict import predict as classify

    try:
        registered = not model.endswith((".onnx", ".pt"))  # its name comes from params.yaml
        params = load_params(Path("params.yaml")) \
            if registered and Path("params.yaml").is_file() else None
        results = classify(open_model(model, params), paths, top_k)
    except (ConfigError, ContractError, ImageError) as err:
        _fail(str(err))
    if not results:
        _fail(f"no image files in {', '.join(map(str, paths))}: give image files, or folders "
              "holding them (.jpg, .png, .webp, ...)")
    if as_json:
        console.print_json(json.dumps([{"path": r.path, "error": r.error,
                                        "classes": r.prediction and r.prediction.classes,
                                        "probabilities": r.prediction and r.prediction.probabilities}
                                       for r in results]))
    else:
        table = Table("path", "classes (probability)", "error")
        for r in results:
            found = r.prediction and ", ".join(f"{c} ({p:.3f})" for c, p in
                                               zip(r.prediction.classes, r.prediction.probabilities))
            table.add_row(r.path, found or "", r.error or "")
        console.print(table)
    if any(r.error for r in results):
        raise typer.Exit(1)


@app.command("ui")
def ui(port: int = typer.Option(5000, min=1, max=65535, help="port on 127.0.0.1")) -> None:
    """Open the MLflow UI on the project's store (sqlite:///mlflow.db unless MLFLOW_TRACKING_URI)."""
    import socket

    uri = environment.tracking_uri()
    if environment.is_server(uri):
        _fail(f"MLFLOW_TRACKING_URI is a tracking server ({uri}): open its own UI at that "
              "address, or unset it to browse this folder's mlflow.db")
    if (store := environment.missing_store(uri)) is not None:  # mlflow ui would make it
        _fail(f"there is no MLflow store here ({store}): run from the repository root, or run "
              "the pipeline first")
    with socket.socket() as probe:  # mlflow ui exits 0 when uvicorn cannot bind
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            _fail(f"port {port} on 127.0.0.1 is in use: choose another with --port")
    console.print(f"MLflow UI for {redact(uri)} on http://127.0.0.1:{port}")
    # one web worker: one person reads it (mlflow ui's default is four processes)
    command = [environment.tool("mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    raise typer.Exit(subprocess.run(command, env=environment.tool_env()).returncode)


if __name__ == "__main__":
    app()
