"""The `bit` command as a user meets it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks import environment
from tests.conftest import BIN, all_gone, command_lines, free_port, running_server, tiny_onnx

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "params", "fetch-weights", "run", "flow", "compare-loss", "ui"):
        assert command in result.output


def test_models_table():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "BiT-M-R152x4" in result.output and "936.53" in result.output


def test_params_valid_and_invalid(tmp_path, repo_root):
    good = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", good)
    result = runner.invoke(app, ["params", "--file", str(good)])
    assert result.exit_code == 0 and '"source": "digits"' in result.output
    good.write_text(good.read_text().replace("eval_every:", "eval_evry:"))
    result = runner.invoke(app, ["params", "--file", str(good)])
    assert result.exit_code == 2 and "unknown key 'train.eval_evry'" in result.output


def test_params_never_print_a_mirror_password(tmp_path, repo_root):
    from flows.overrides import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", path)
    apply_overrides(path, ["data.url=https://ci:hunter2@mirror.example/cifar-10-python.tar.gz"])
    result = runner.invoke(app, ["params", "--file", str(path)])
    assert result.exit_code == 0 and "https://ci:***@mirror.example/" in result.output
    assert "hunter2" not in result.output


def test_fetch_weights_error_is_one_redacted_line(tmp_path):
    from tests.http_fixtures import ArchiveServer

    with ArchiveServer() as server:
        url = server.add("/BiT-M-R50x1.npz", b"", basic=("ci", "right"))
        url = url.replace("://", "://ci:hunter2@")
        result = runner.invoke(app, ["fetch-weights", "BiT-M-R50x1", "--cache-dir", str(tmp_path),
                                     "--url", url])
    assert result.exit_code == 2 and "HTTP 401" in result.output and "ci:***@" in result.output
    assert "hunter2" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--url", "/tmp/BiT-M-R50x1.npz"], "give an http(s) mirror; for a file on this machine set "
                                        "weights.source: file"),
    (["--cache-dir", "cache-file"], "cannot use --cache-dir cache-file"),
])
def test_fetch_weights_input_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache-file").write_text("a file, not a folder")
    url = [] if "--url" in args else ["--url", f"http://127.0.0.1:{free_port()}/w.npz"]
    result = runner.invoke(app, ["fetch-weights", "BiT-M-R50x1", *args, *url])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_run_refuses_bad_override_without_touching_params(tmp_path, repo_root, monkeypatch):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(repo_root / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "params.yaml").read_text()
    result = runner.invoke(app, ["run", "-S", "train.batch=lots"])
    assert result.exit_code == 2 and "train.batch = 'lots'" in result.output
    assert (tmp_path / "params.yaml").read_text() == before



@pytest.mark.slow
def test_run_reads_an_image_folder_again_and_trains_on_what_changed(tmp_path, repo_root):
    """DVC tracks data.folder's name, not its images: `bit run` reads the folder again each time,
    so images added since the last run are used, and nothing after fetch_data runs when none
    changed."""
    from PIL import Image

    from tests.conftest import make_clone

    photos = tmp_path / "photos"
    for i in range(12):
        (photos / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(photos / f"c{i % 2}" / f"{i}.png")
    repo = make_clone(repo_root, tmp_path / "repo", [])
    command = [str(BIN / "bit"), "run", "--until", "prepare", "-S", "data.source=imagefolder",
               "-S", f"data.folder={photos}"]

    def run() -> tuple[str, int]:
        result = subprocess.run(command, cwd=repo, env=environment.tool_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        stats = json.loads((repo / "data/prepared/stats.json").read_text())
        return result.stdout + result.stderr, sum(stats[f"{s}_images"]
                                                  for s in ("train", "val", "test"))

    assert run()[1] == 12
    output, images = run()
    assert images == 12 and "Running stage 'prepare'" not in output
    Image.new("RGB", (8, 8), (0, 0, 255)).save(photos / "c0" / "new.png")
    output, images = run()
    assert images == 13 and "Running stage 'prepare'" in output

def _csv(path, losses):
    path.write_text("step,loss\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(losses)))
    return str(path)


def test_compare_loss_pass_and_fail(tmp_path):
    ref = _csv(tmp_path / "ref.csv", [2.0, 1.5, 1.0, 0.8])
    same = _csv(tmp_path / "same.csv", [2.0, 1.5, 1.0, 0.8])
    off = _csv(tmp_path / "off.csv", [2.4, 1.8, 1.2, 0.96])
    plot = tmp_path / "align.png"
    result = runner.invoke(app, ["compare-loss", same, ref, "--plot", str(plot)])
    assert result.exit_code == 0 and "PASS" in result.output
    assert plot.read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["compare-loss", off, ref, "--plot", str(plot)])
    assert result.exit_code == 1 and "FAIL" in result.output and "MRE 0.2" in result.output


@pytest.mark.parametrize("args, message", [
    (["-S", "train.batch=8"], "dvc.yaml not found: run from the repository root"),
    (["--until", "finetune"], "dvc.yaml not found: run from the repository root"),
])
def test_run_outside_a_project_is_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 2 and message in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("files, message", [
    ({}, "'missing.csv' is neither a CSV file nor an MLflow run id: no such file"),
    ({"a.csv": "x,y\n1,2\n"}, "a.csv needs the columns step and loss"),
    ({"a.csv": "step,loss\n1,abc\n"}, "a.csv: step and loss must be numbers on every row"),
    ({"a.csv": "step,loss\n1,2.0\n", "plot": None}, "cannot write the plot"),
])
def test_compare_loss_input_errors_are_one_line(tmp_path, monkeypatch, files, message):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).mkdir() if text is None else (tmp_path / name).write_text(text)
    first = "a.csv" if "a.csv" in files else "missing.csv"
    result = runner.invoke(app, ["compare-loss", first, first, "--plot", "plot"])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "mlflow.db").exists()


def test_compare_loss_of_a_run_the_store_lacks_says_so(tmp_path, tracking_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_store)  # this store, whatever URI an earlier test set
    run = client.create_run(client.create_experiment("runs"))
    client.log_metric(run.info.run_id, "accuracy", 1.0)
    (tmp_path / "a.csv").write_text("step,loss\n1,2.0\n")
    result = runner.invoke(app, ["compare-loss", "a.csv", "0a1b2c3d"])
    assert result.exit_code == 2
    assert "'0a1b2c3d' is neither a CSV file nor an MLflow run id in sqlite:" in result.output
    result = runner.invoke(app, ["compare-loss", "a.csv", run.info.run_id])
    assert result.exit_code == 2 and f"run {run.info.run_id} has no 'loss' metric" in result.output


def test_bit_predict_on_a_model_file_does_not_read_params_yaml(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  batch: lots\n")  # another project's, broken
    tiny_onnx(tmp_path / "tiny.onnx")
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "green.png")
    result = runner.invoke(app, ["predict", "--model", "tiny.onnx", "--json", "green.png"])
    assert result.exit_code == 0, result.output


def test_compare_loss_of_a_run_without_a_store_creates_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["compare-loss", "0a1b2c", "3d4e5f"])
    assert result.exit_code == 2 and "there is no MLflow store here" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--model", "bad.onnx"], "model file bad.onnx is not an exported ONNX model this pipeline "
                              "can read (InvalidProtobuf)"),
    (["--model", "bad.pt"], "model file bad.pt is not a fine-tuned checkpoint"),
    (["--model", "tiny.onnx", "--top-k", "1", "empty"], "no image files in empty: give image "
                                                         "files, or folders holding them"),
    ([], "no model models:/bit-classifier@champion: there is no MLflow store here"),
])
def test_bit_predict_input_errors_are_one_line(tmp_path, monkeypatch, args, message):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("no image here")
    Image.new("RGB", (8, 8)).save(tmp_path / "black.png")
    before = sorted(tmp_path.iterdir())
    images = ["empty"] if "empty" in args else ["black.png"]
    result = runner.invoke(app, ["predict", *[a for a in args if a != "empty"], *images])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and sorted(tmp_path.iterdir()) == before



def test_bit_predict_shows_every_class_of_a_model_with_fewer_than_five(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    tiny_onnx(tmp_path / "tiny.onnx")  # classes a, b, c
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "green.png")
    result = runner.invoke(app, ["predict", "--model", "tiny.onnx", "--json", "green.png"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["classes"] == ["b", "c", "a"]

def test_flow_names_the_failed_stages_own_error_in_one_line(tmp_path, repo_root, monkeypatch):
    """A stage that fails with its one-line error: `bit flow` ends with that line (not DVC's
    closing "failed to reproduce" line, nor a traceback) and exit 2."""
    from prefect.testing.utilities import prefect_test_harness

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "fail.py").write_text(
        "import sys\nprint('error: evaluate: the test split is empty: lower data.shots',"
        " file=sys.stderr)\nsys.exit(2)\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: python fail.py\n")
    subprocess.run([str(BIN / "dvc"), "init", "-q", "--no-scm"], cwd=tmp_path, check=True,
                   env=environment.tool_env())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with prefect_test_harness(server_startup_timeout=120):
        result = runner.invoke(app, ["flow"])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == ("error: stage evaluate failed: evaluate: the test "
                                              "split is empty: lower data.shots")
    assert "Traceback" not in result.output.splitlines()[-1]


def test_ui_refuses_a_missing_store_a_busy_port_and_a_server_uri(tmp_path, monkeypatch):
    import socket

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["ui"])  # outside the repository: MLflow would make a store
    assert result.exit_code == 2 and "there is no MLflow store here" in result.output
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mlflow.db").touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = runner.invoke(app, ["ui", "--port", str(busy.getsockname()[1])])
    assert result.exit_code == 2 and "is in use: choose another with --port" in result.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ci:hunter2@127.0.0.1:5999")
    result = runner.invoke(app, ["ui"])
    assert result.exit_code == 2 and "open its own UI at that address" in result.output
    assert "hunter2" not in result.output
    assert runner.invoke(app, ["ui", "--port", "99999"]).exit_code == 2
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]


@pytest.mark.parametrize("args, message", [
    (["-S", "train.nosuch=1"], "params.yaml: unknown key 'train.nosuch'"),
    (["--device", "gpu"], "--device gpu: choose one of auto, cpu, cuda, npu"),
    (["-S", "train.batch=[1,"], "the value is not valid YAML"),
])
def test_flow_input_errors_are_one_line_before_any_server(tmp_path, repo_root, monkeypatch,
                                                          args, message):
    import time

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "params.yaml").read_text()
    start = time.perf_counter()
    result = runner.invoke(app, ["flow", *args])
    assert result.exit_code == 2 and message in result.output
    assert result.output.count("\n") == 1 and time.perf_counter() - start < 10
    assert (tmp_path / "params.yaml").read_text() == before


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_a_bad_stop_grace_is_one_line_before_any_server(tmp_path, repo_root, monkeypatch, value):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("BIT_STOP_GRACE", value)
    result = runner.invoke(app, ["flow"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"BIT_STOP_GRACE={value} is not a number of seconds above 0: unset it" in result.output


def test_ui_serves_the_project_store_with_one_web_worker(tmp_path):
    """`bit ui` in a folder: the MLflow UI on 127.0.0.1 over that folder's mlflow.db, run as three
    processes (bit, the mlflow CLI, one uvicorn worker: no job consumers, no spare workers) and
    stopped with its process group."""
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("seen-by-ui")
    port, marker = free_port(), ("BIT_TEST_UI", str(tmp_path))
    env = {**environment.tool_env(), marker[0]: marker[1]}
    env.pop("MLFLOW_TRACKING_URI", None)
    with running_server([str(BIN / "bit"), "ui", "--port", str(port)],
                        f"http://127.0.0.1:{port}/health", tmp_path, "ui", env=env):
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        with urllib.request.urlopen(url, timeout=10) as answer:
            names = {e["name"] for e in json.load(answer)["experiments"]}
        commands = command_lines(*marker)
    assert all_gone(*marker)
    assert "seen-by-ui" in names
    assert len(commands) == 3, commands


def test_bit_runs_onnx_runtime_without_its_telemetry(tmp_path):
    """`bit` switches the tools' telemetry off itself: started without the project's settings,
    `bit predict` on an ONNX file leaves no ONNX Runtime device id or event queue in the home
    folder and no session file in the temp folder."""
    from PIL import Image

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    env = {key: value for key, value in os.environ.items() if key not in environment.TOOL_ENV}
    result = subprocess.run(
        [str(BIN / "bit"), "predict", str(tmp_path / "red.png"), "--model",
         str(tiny_onnx(tmp_path / "tiny.onnx")), "--top-k", "1", "--json"],
        env={**env, "HOME": str(home), "TMPDIR": str(tmp)}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["classes"] == ["a"]
    assert not (home / ".cache/Microsoft").exists()  # .../DeveloperTools/.onnxruntime/deviceid
    assert not (tmp / ".ses").exists()
