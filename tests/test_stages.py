"""Each stage's main on the embedded data in a temporary directory, chained as DVC would run them.

Tiny settings (2 training steps at 16 px) keep this tier fast; what is checked is that every
declared output exists and holds what it claims, and that the MLflow run collects all stages.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import dag
from flows.overrides import apply_overrides
from tests.conftest import TINY



@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo_root):
    work = tmp_path_factory.mktemp("stages")
    (work / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    apply_overrides(work / "params.yaml", TINY)
    old = Path.cwd()
    env = {"BIT_PARAMS": str(work / "params.yaml"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.chdir(work)
    yield work
    os.chdir(old)
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _stage(module: str, *args: str) -> int:
    import importlib

    return importlib.import_module(f"tasks.{module}").main(list(args))


@pytest.fixture(scope="module")
def pipeline(workdir):
    """Run every stage once, in order, as dvc.yaml does (with the same arguments)."""
    root, codes = Path(__file__).parents[1], {}
    for name in dag.stages(root):
        argv = dag.command(root, name).split()
        assert argv[:2] == ["python", "-m"]
        codes[name] = _stage(argv[2].removeprefix("tasks."), *argv[3:])
    return workdir, codes


def test_every_stage_succeeds(pipeline):
    assert all(code == 0 for code in pipeline[1].values()), pipeline[1]


def test_fetch_data_writes_class_folders(pipeline):
    raw = pipeline[0] / "data/raw"
    assert sorted(p.name for p in raw.iterdir()) == [str(i) for i in range(10)]
    assert sum(1 for _ in raw.rglob("*.png")) == 1797


def test_prepare_splits_are_stratified_and_disjoint(pipeline):
    prepared = pipeline[0] / "data/prepared"
    splits = {name: (prepared / f"{name}.csv").read_text().splitlines()[1:]
              for name in ("train", "val", "test")}
    paths = [set(line.split(",")[0] for line in lines) for lines in splits.values()]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert sum(map(len, paths)) == 1797
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["classes"] == 10 and stats["test_images"] == len(splits["test"])
    for lines in splits.values():  # every class in every split
        assert {line.split(",")[1] for line in lines} == {str(i) for i in range(10)}


def test_fetch_weights_records_source(pipeline):
    record = json.loads((pipeline[0] / "models/pretrained/source.json").read_text())
    assert record == {"source": "none", "model": "BiT-M-R50x1"}


def test_finetune_outputs(pipeline):
    work = pipeline[0]
    checkpoint = torch.load(work / "models/finetuned/checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["model_name"] == "BiT-M-R50x1"
    assert checkpoint["classes"] == [str(i) for i in range(10)] and checkpoint["resolution"] == 16
    rows = (work / "reports/train/loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,images_per_s" and len(rows) == 3
    assert (work / "reports/train/loss.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((work / "reports/train/metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["val_top1"] <= 100


def test_export_parity_recorded(pipeline):
    report = json.loads((pipeline[0] / "reports/export.json").read_text())
    assert 0 < report["max_diff_to_tolerance"] <= 1 and report["opset"] == 17
    assert "max_abs_diff_real_bs3" in report and "ReduceMean" not in report["op_types"]


def test_compile_om_skipped_without_atc(pipeline):
    manifest = json.loads((pipeline[0] / "models/om/manifest.json").read_text())
    assert manifest["status"] == "skipped" and "atc" in manifest["reason"]
    assert len(manifest["commands"]) == 2


def test_compile_openvino_builds_ir_checked_against_pytorch(pipeline):
    from bit_core.contracts import IRManifest, IRStatus

    out = pipeline[0] / "models/openvino"
    manifest = IRManifest.read(out / "manifest.json", "compile_openvino")
    assert manifest.status is IRStatus.BUILT and manifest.calibration_images == 8
    for xml in manifest.files.values():
        assert (out / xml).is_file() and (out / xml).with_suffix(".bin").is_file()
    assert set(manifest.files) == {"fp32", "int8"} and manifest.int8_reason is None
    assert 0 < manifest.parity["fp32_max_diff_to_tolerance"] <= 1
    assert 0 <= manifest.parity["int8_top1_agreement_real"] <= 100


def test_evaluate_reports(pipeline):
    from bit_core.backends import GATE_PP

    out = pipeline[0] / "reports/eval"
    metrics = json.loads((out / "metrics.json").read_text())
    measured = ("torch_fp32", "torch_bf16", "onnxruntime", "openvino_fp32", "openvino_bf16",
                "openvino_int8")
    for backend in measured:
        assert 0 <= metrics[f"{backend}_top1"] <= metrics[f"{backend}_top5"] <= 100
    for backend in measured:  # within its accuracy gate: measured; outside: the miss is told
        delta = abs(metrics[f"{backend}_top1"] - metrics["torch_fp32_top1"])
        within = delta <= GATE_PP["int8" if backend.endswith("int8") else "fp32"]
        assert (f"{backend}_fps_bs1" in metrics and f"{backend}_fps_bs2" in metrics) == within
        assert (backend in metrics["gate_missed"]) == (not within)
    assert abs(metrics["onnxruntime_top1"] - metrics["torch_fp32_top1"]) <= 0.1
    assert set(metrics["fastest"]) == {"bs1", "bs2"}
    assert metrics["skipped"]["torch_compiled"] == "evaluate.compiled is false"
    busy = metrics["cpu_used_elsewhere_pct"]
    assert 0 <= busy <= 100
    table = (out / "fps.md").read_text()
    assert f"While the speeds were measured, {busy:.0f}% of the host's CPU time went to" in table
    assert "| onnxruntime |" in table and "| images/s | bs1 | bs2 |" in table
    assert f"| fastest | {metrics['fastest']['bs1']} |" in table
    assert "latency ms p50 / p99" in table and "- torch_compiled: evaluate.compiled is false" in table
    for png in ("fps.png", "confusion.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_without_matrix_units_skips_reduced_precision(pipeline, tmp_path):
    """A CPU without AMX or avx512_bf16 (or VNNI) gets no bf16 or int8 OpenVINO rows, and
    the report says why."""
    from bit_core.config import load_params
    from bit_core.device import CpuUnits
    from tasks.evaluate import evaluate

    work = pipeline[0]
    params = load_params(work / "params.yaml")
    plain = CpuUnits("Plain x86", frozenset({"avx2", "avx512f"}))
    metrics = evaluate(params, work / "models/finetuned", work / "models/onnx/model.onnx",
                       work / "models/om", work / "data/raw", work / "data/prepared",
                       tmp_path / "eval", work / "models/openvino", units=plain)
    assert "openvino_fp32_top1" in metrics.values()
    assert not {"openvino_bf16_top1", "openvino_int8_top1"} & set(metrics.values())
    assert "no AMX-bf16 or avx512_bf16" in metrics.skipped["openvino_bf16"]
    assert "no AMX-int8 or VNNI" in metrics.skipped["openvino_int8"]
    table = (tmp_path / "eval/fps.md").read_text()
    assert "Host CPU: Plain x86 (no AMX-bf16, no AMX-int8, no avx512_bf16, no VNNI)" in table
    assert "- openvino_bf16: the CPU has no AMX-bf16 or avx512_bf16" in table


def test_one_mlflow_run_holds_every_stage(pipeline):
    from mlflow.tracking import MlflowClient

    work = pipeline[0]
    run_id = json.loads((work / "models/finetuned/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.data.params["train.batch"] == "8" and run.data.params["plan.schedule"] == "[1, 2]"
    assert "onnx_max_abs_diff" in run.data.metrics and "test_onnxruntime_top1" in run.data.metrics
    assert 0 < run.data.metrics["onnx_max_diff_to_tolerance"] <= 1
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert run.data.tags["git.commit"]
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"plots", "onnx", "evaluation", "checkpoint", "om", "openvino"} <= artifacts
    assert {"openvino/model.xml", "openvino/int8.bin", "openvino/manifest.json"} <= \
        {a.path for a in client.list_artifacts(run_id, "openvino")}
    assert 0 < run.data.metrics["openvino_fp32_max_diff_to_tolerance"] <= 1
    assert run.data.tags["eval.fastest.bs1"]
    assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} == {"checkpoint/checkpoint.pt"}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_bad_params_stop_a_stage_with_one_line(workdir, capsys, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((workdir / "params.yaml").read_text().replace("batch: 8", "batch: eight"))
    os.environ["BIT_PARAMS"] = str(bad)
    try:
        code = _stage("prepare", "--raw", "data/raw", "--out", str(tmp_path / "prepared"),
                      "--report", str(tmp_path / "report"))
    finally:
        os.environ["BIT_PARAMS"] = str(workdir / "params.yaml")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "train.batch = 'eight'" in err
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "report").exists()


@pytest.mark.slow
def test_finetune_relaunches_itself_with_torchrun(pipeline, tmp_path, monkeypatch):
    """train.processes=2: the stage runs as two gloo processes; rank 0 alone writes and logs,
    and the launcher's log folder does not outlive the run."""
    import tempfile

    work = pipeline[0]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    params = tmp_path / "params.yaml"
    params.write_text((work / "params.yaml").read_text())
    apply_overrides(params, ["train.processes=2", "train.device=cpu"])
    os.environ["BIT_PARAMS"] = str(params)
    try:
        code = _stage("finetune", "--data", "data/raw", "--splits", "data/prepared", "--weights",
                      "models/pretrained", "--out", str(tmp_path / "ft"), "--reports",
                      str(tmp_path / "rep"))
    finally:
        os.environ["BIT_PARAMS"] = str(work / "params.yaml")
    assert code == 0
    checkpoint = torch.load(tmp_path / "ft/checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["config"]["processes"] == 2
    assert len((tmp_path / "rep/loss.csv").read_text().splitlines()) == 3
    assert list(scratch.iterdir()) == []


def test_an_export_that_fails_parity_keeps_the_previous_model_and_report(pipeline, tmp_path):
    """The ONNX file is published only once it matches PyTorch: a failed export leaves the
    previous model.onnx and export.json as they were (a new, unchecked model beside the old
    report saying parity passed is what register would then have registered)."""
    from tests.conftest import tiny_onnx

    work = pipeline[0]
    (tmp_path / "onnx").mkdir()
    tiny_onnx(tmp_path / "onnx/model.onnx")  # an earlier export, unlike the one made here
    shutil.copy(work / "reports/export.json", tmp_path / "export.json")
    before = {p.name: p.read_bytes() for p in (tmp_path / "onnx").iterdir()}
    report = (tmp_path / "export.json").read_bytes()
    params = tmp_path / "params.yaml"
    params.write_text((work / "params.yaml").read_text())
    apply_overrides(params, ["export.atol=1e-12", "export.rtol=0.0"])
    os.environ["BIT_PARAMS"] = str(params)
    try:
        code = _stage("export", "--checkpoint", "models/finetuned", "--data", "data/raw",
                      "--splits", "data/prepared", "--out", str(tmp_path / "onnx"), "--report",
                      str(tmp_path / "export.json"))
    finally:
        os.environ["BIT_PARAMS"] = str(work / "params.yaml")
    assert code == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "onnx").iterdir()} == before
    assert (tmp_path / "export.json").read_bytes() == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "onnx", "params.yaml"]


def test_evaluate_refuses_a_checkpoint_export_and_split_that_do_not_belong_together(
        pipeline, tmp_path, capsys):
    """A model scored on another data set's labels gives chance-level numbers, not an error;
    an export of another checkpoint fails deep in ONNX Runtime. Both are one line first."""
    from tests.conftest import tiny_onnx

    shutil.copytree(pipeline[0] / "data/prepared", tmp_path / "prepared")
    classes = json.loads((tmp_path / "prepared/classes.json").read_text())
    (tmp_path / "prepared/classes.json").write_text(json.dumps(classes[:2]))
    common = ["--checkpoint", "models/finetuned", "--om", "models/om", "--openvino",
              "models/openvino", "--data", "data/raw", "--out", str(tmp_path / "eval")]
    assert _stage("evaluate", *common, "--onnx", "models/onnx/model.onnx",
                  "--splits", str(tmp_path / "prepared")) == 2
    assert "the checkpoint's 10 classes are not the 2 of" in capsys.readouterr().err
    assert _stage("evaluate", *common, "--onnx", str(tiny_onnx(tmp_path / "tiny.onnx")),
                  "--splits", "data/prepared") == 2
    err = capsys.readouterr().err
    assert "tiny.onnx was exported from another checkpoint (3 classes at 4 px" in err
    assert err.count("\n") == 1 and not (tmp_path / "eval").exists()


def test_interrupted_finetune_resumes_from_persisted_checkpoint(pipeline, tmp_path):
    """A checkpoint left in --resume-dir by an interrupted run is picked up by the next run."""
    from bit_core.config import load_params
    from tasks.finetune import finetune

    work = pipeline[0]
    params = load_params(work / "params.yaml")
    resume = tmp_path / "resume"
    resume.mkdir()
    done = torch.load(work / "models/finetuned/checkpoint.pt", weights_only=True)
    marker = {**done["history"][0], "loss": 123.0}  # a fresh start could not produce this
    partial = {**done, "step": 1, "history": [marker], "evals": done["evals"][:1]}
    torch.save(partial, resume / "checkpoint.pt")
    finetune(params, work / "data/raw", work / "data/prepared", work / "models/pretrained",
             tmp_path / "out", tmp_path / "rep", resume_dir=resume)
    resumed = torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)
    assert resumed["step"] == 2 and resumed["history"][0]["loss"] == 123.0
    assert not (resume / "checkpoint.pt").exists()


def test_a_smoke_run_stops_early_and_a_full_run_continues_it(pipeline, tmp_path):
    """train.stop_after leaves its checkpoint for the next run, which resumes although
    stop_after (a setting that changes nothing computed) now differs."""
    from bit_core.config import load_params
    from tasks.finetune import finetune

    work = pipeline[0]
    params = load_params(work / "params.yaml")
    smoke = params.model_copy(update={"train": params.train.model_copy(update={"stop_after": 1})})
    resume = tmp_path / "resume"
    args = (work / "data/raw", work / "data/prepared", work / "models/pretrained",
            tmp_path / "out", tmp_path / "rep")
    finetune(smoke, *args, resume_dir=resume)
    first = torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)
    assert first["step"] == 1 and (resume / "checkpoint.pt").is_file()
    left = torch.load(resume / "checkpoint.pt", weights_only=True)
    left["history"][0]["loss"] = 123.0  # a fresh start could not produce this
    torch.save(left, resume / "checkpoint.pt")
    finetune(params, *args, resume_dir=resume)
    full = torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)
    assert full["step"] == 2 and full["history"][0]["loss"] == 123.0
    assert not (resume / "checkpoint.pt").exists()


ASCEND_TOOLS = Path(__file__).parent / "ascend_tools"


def test_om_models_reach_the_evaluation(pipeline, tmp_path, monkeypatch):
    """compile_om then evaluate with ATC and ais_bench present (stand-ins with the real tools'
    command lines, file naming and output formats): the OM row has accuracy and images/s per
    batch size in fps.md, metrics.json and the MLflow run."""
    from mlflow.tracking import MlflowClient

    work = pipeline[0]
    monkeypatch.setenv("PATH", f"{ASCEND_TOOLS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(ASCEND_TOOLS), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(ASCEND_TOOLS))
    params = tmp_path / "params.yaml"
    params.write_text((work / "params.yaml").read_text())
    apply_overrides(params, ["compile.soc_version=Ascend310P3"])
    monkeypatch.setenv("BIT_PARAMS", str(params))
    om, out = tmp_path / "om", tmp_path / "eval"
    assert _stage("compile_om", "--onnx", "models/onnx/model.onnx", "--out", str(om)) == 0
    manifest = json.loads((om / "manifest.json").read_text())
    assert manifest["status"] == "built" and len(manifest["models"]) == 2
    assert _stage("evaluate", "--checkpoint", "models/finetuned", "--onnx", "models/onnx/model.onnx",
                  "--om", str(om), "--openvino", "models/openvino", "--data", "data/raw",
                  "--splits", "data/prepared", "--out", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["om_skipped"] == ""
    assert metrics["om_top1"] == metrics["onnxruntime_top1"]  # the same graph behind both
    assert metrics["om_fps_bs1"] > 0 and metrics["om_fps_bs4"] > 0
    table = (out / "fps.md").read_text()
    assert f"| om | {metrics['om_top1']:.2f} |" in table
    grid = table.split("| images/s |")[1].split("latency")[0]
    om_fps = next(row for row in grid.splitlines() if row.startswith("| om |")).split("|")[2:-1]
    assert [cell.strip() != "–" for cell in om_fps] == [True, False, True]  # bs1, bs2, bs4
    run_id = json.loads((work / "models/finetuned/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.data.metrics["test_om_top1"] == metrics["om_top1"]
    assert run.data.metrics["om_fps_bs4"] == metrics["om_fps_bs4"]
    logged = {a.path for a in client.list_artifacts(run_id, "om")}
    assert {"om/manifest.json", "om/bs1_linux_x86_64.om", "om/bs4_linux_x86_64.om"} <= logged


def test_a_stopped_finetune_ends_its_run_killed_and_the_resumed_one_continues_it(pipeline,
                                                                                  tmp_path):
    """SIGTERM mid-run: the MLflow run ends KILLED with the steps so far; the next run resumes
    the checkpoint and continues the same MLflow run (same id, the loss steps go on)."""
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    work = pipeline[0]
    params = tmp_path / "params.yaml"
    params.write_text((work / "params.yaml").read_text())
    apply_overrides(params, ["train.schedule=[2, 500]"])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "BIT_PARAMS": str(params), "MLFLOW_TRACKING_URI": store}
    env.pop("MLFLOW_RUN_ID", None)
    argv = [sys.executable, "-m", "tasks.finetune", "--data", "data/raw", "--splits",
            "data/prepared", "--weights", "models/pretrained", "--out", str(tmp_path / "ft"),
            "--reports", str(tmp_path / "rep"), "--resume-dir", str(tmp_path / "resume")]
    process = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in process.stdout:
            if "step 2:" in line:  # logged every eval_every (1) steps
                process.send_signal(signal.SIGTERM)
                break
        output = process.stdout.read()
        assert process.wait(timeout=120) == 2, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "stopped by signal" in output and "Traceback" not in output
    client = MlflowClient(store)
    run_id = json.loads((tmp_path / "resume/mlflow_run.json").read_text())["run_id"]
    first = client.get_run(run_id)
    stopped_at = torch.load(tmp_path / "resume/checkpoint.pt", weights_only=True)["step"]
    assert first.info.status == "KILLED" and stopped_at >= 2
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == \
        list(range(1, stopped_at + 1))

    apply_overrides(params, [f"train.stop_after={stopped_at + 2}"])  # changes nothing computed
    again = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"continuing MLflow run {run_id}" in again.stderr
    assert f"resuming from step {stopped_at}" in again.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == \
        list(range(1, stopped_at + 3))
    assert run.data.tags["resumed.train.stop_after"] == str(stopped_at + 2)
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert {a.path for a in client.list_artifacts(run_id)} >= {"plots", "checkpoint"}


# --- using the model -----------------------------------------------------------------------------

def _bit(*args: str):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, list(args))


def test_predict_preprocesses_as_the_evaluation_does(pipeline):
    """bit_core.serving (numpy + Pillow) and the evaluation's torchvision transform agree."""
    from PIL import Image

    from bit_core.data import eval_transform
    from bit_core.serving import ImageClassifier

    classifier = ImageClassifier(pipeline[0] / "models/onnx/model.onnx")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 23, 3), np.uint8))
    ours = classifier.preprocess(image)
    reference = eval_transform(classifier.resolution)(image).numpy()
    assert ours.shape == reference.shape == (3, 16, 16)
    assert np.abs(ours - reference).max() < 1e-5


def test_bit_predict_on_files_and_folders(pipeline, tmp_path):
    work = pipeline[0]
    images = sorted((work / "data/raw/3").glob("*.png"))[:2]
    folder = tmp_path / "more"
    folder.mkdir()
    for source in sorted((work / "data/raw/7").glob("*.png"))[:2]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image, not listed")
    (folder / "._copied_from_a_mac.png").write_bytes(b"resource fork, not listed")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints/x-checkpoint.png").write_bytes(images[0].read_bytes())
    args = [str(p) for p in images] + [str(folder), "--top-k", "3", "--json"]
    by_onnx = _bit("predict", *args, "--model", str(work / "models/onnx/model.onnx"))
    by_torch = _bit("predict", *args, "--model", str(work / "models/finetuned/checkpoint.pt"))
    assert by_onnx.exit_code == by_torch.exit_code == 1  # one unreadable file
    onnx_rows, torch_rows = json.loads(by_onnx.stdout), json.loads(by_torch.stdout)
    assert [Path(r["path"]).name for r in onnx_rows] == \
        [p.name for p in images] + sorted(p.name for p in folder.glob("[!.]*.png"))
    broken = next(r for r in onnx_rows if r["path"].endswith("broken.png"))
    assert broken["error"] == "not an image" and broken["classes"] is None
    for a, b in zip(onnx_rows, torch_rows, strict=True):
        if a["classes"]:
            assert a["classes"] == b["classes"] and len(a["classes"]) == 3
            assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-4)
            assert set(a["classes"]) <= {str(i) for i in range(10)}


def test_predict_runs_the_back_end_the_evaluation_found_fastest(pipeline, tmp_path,
                                                                monkeypatch):
    """bit predict picks with the evaluation's rule: the fastest measured back-end this CPU runs,
    which answers as ONNX Runtime does; the registered champion brings its IR and its run's
    metrics; a store on this disk is read in place, with nothing left in the temp folder."""
    import tempfile

    from bit_core.backends import openvino_missing, serving_backend
    from bit_core.config import load_params
    from bit_core.device import cpu_units
    from bit_core.serving import ImageClassifier
    from tasks.predict import exported_classifier, open_model

    work = pipeline[0]
    onnx, ir = work / "models/onnx/model.onnx", work / "models/openvino"
    assert exported_classifier(onnx, ir, {"onnxruntime_fps_bs32": 30.0,
                                          "openvino_fp32_fps_bs32": 20.0}).backend == "onnxruntime"
    assert exported_classifier(onnx, ir).backend == "onnxruntime"  # no evaluation: fp32, ORT
    batch = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    if openvino_missing() is None:
        chosen = exported_classifier(onnx, ir, {"onnxruntime_fps_bs32": 10.0,
                                                "openvino_fp32_fps_bs32": 20.0})
        assert chosen.backend == "openvino_fp32"
        assert np.allclose(chosen.probabilities(batch),
                           ImageClassifier(onnx).probabilities(batch), atol=1e-5)
    from mlflow.tracking import MlflowClient

    import mlflow

    registered = Path(mlflow.artifacts.download_artifacts("models:/bit-classifier@champion"))
    assert {"model.xml", "model.bin", "int8.xml", "int8.bin", "manifest.json"} <= \
        {p.name for p in (registered / "artifacts/openvino").iterdir()}  # models/openvino
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    evaluated = json.loads((work / "reports/eval/metrics.json").read_text())
    expected = serving_backend(cpu_units(), evaluated, 32).name
    # A later evaluation of the same run (evaluate.batch_sizes changed, or a back-end now
    # missing its gate) leaves the run's numbers for the back-ends it no longer measures.
    run_id = json.loads((work / "models/finetuned/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    stale = [key for key in evaluated if key.rpartition("_fps_bs")[0] not in ("", expected)]
    assert any(key.startswith("openvino") for key in stale) or openvino_missing() is not None
    try:
        for key in stale:
            client.log_metric(run_id, key, 1e9)
        champion = open_model("champion", load_params(work / "params.yaml"))
    finally:  # the run's own numbers back, for the tests after this one
        for key in stale:
            client.log_metric(run_id, key, evaluated[key])
    assert list(scratch.iterdir()) == []
    assert champion.backend == expected  # by the evaluation registered with it
    assert champion.probabilities(batch).shape == (3, 10)


@pytest.mark.parametrize("args, message", [
    (["--top-k", "11"], "top-k 11: the model has 10 classes; ask for 1 to 10"),
    (["--model", "nightly"], "--model nightly: give champion, challenger"),
    (["--model", "missing.onnx"], "model file missing.onnx does not exist"),
    (["--model", "challenger"], "no model models:/bit-classifier@challenger"),
])
def test_bit_predict_errors_are_one_line(pipeline, args, message):
    image = next((pipeline[0] / "data/raw/1").glob("*.png"))
    model = [] if "--model" in args else ["--model", "models/onnx/model.onnx"]
    result = _bit("predict", str(image), *model, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_served_champion_answers_as_bit_predict_does(pipeline, monkeypatch):
    """`mlflow models serve` of the registered champion takes base64 images over HTTP and
    answers with the class names and probabilities `bit predict` gives for the same files."""
    import base64
    import subprocess
    import time
    import urllib.request

    from tasks import environment
    from tests.conftest import BIN, free_port, stop_group

    work = pipeline[0]
    monkeypatch.chdir(work)
    images = [next((work / f"data/raw/{d}").glob("*.png")) for d in (2, 5)]
    local = json.loads(_bit("predict", *map(str, images), "--top-k", "3", "--json").stdout)
    port = free_port()
    with open(work / "serve.log", "w") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", "models:/bit-classifier@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            cwd=work, env=environment.tool_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        body = json.dumps({"dataframe_records": [
            {"image": base64.b64encode(p.read_bytes()).decode()} for p in images],
            "params": {"top_k": 3}}).encode()
        deadline = time.monotonic() + 180
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as reply:
                    served = json.load(reply)["predictions"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (work / "serve.log").read_text()[-3000:]
                time.sleep(1)
    finally:
        stop_group(server, grace=20)
    assert server.poll() is not None
    assert [row["classes"] for row in served] == [row["classes"] for row in local]
    for row, ours in zip(served, local, strict=True):
        assert np.allclose(row["probabilities"], ours["probabilities"], atol=1e-6)


def test_a_checkpoint_of_other_data_or_weights_is_not_resumed(pipeline, tmp_path, caplog):
    """Same recipe, other prepared data (or other starting weights): the run starts afresh."""
    import logging

    from bit_core.config import load_params
    from tasks.finetune import finetune

    work = pipeline[0]
    params = load_params(work / "params.yaml")
    resume = tmp_path / "resume"
    resume.mkdir()
    done = torch.load(work / "models/finetuned/checkpoint.pt", weights_only=True)
    for key, other in (("data", "0" * 64), ("weights", "f" * 64)):
        marker = {**done["history"][0], "loss": 123.0}
        torch.save({**done, "step": 1, "history": [marker], key: other}, resume / "checkpoint.pt")
        with caplog.at_level(logging.INFO, logger="bit"):
            finetune(params, work / "data/raw", work / "data/prepared", work / "models/pretrained",
                     tmp_path / "out", tmp_path / "rep", resume_dir=resume)
        fresh = torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)
        assert fresh["history"][0]["loss"] != 123.0 and fresh["step"] == 2
        assert f"it was written with other {key}" in caplog.text
