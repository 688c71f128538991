"""The CIFAR-10 recipe as a user starts it, on this CPU, against local mirrors.

`bit run --preset cifar10` with the archive and the official weights served from 127.0.0.1 (as a
mirror would), `train.stop_after` for a smoke run and `--until finetune`: the stage trains with
the exact BiT-HyperRule values for 50,000 training images.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bit_core.model import build_model
from bit_core.weights import save_npz
from tests.http_fixtures import ArchiveServer
from tests.conftest import BIN, make_clone
from tests.archives import CIFAR10_NAMES, py2_pickle, tar_bytes

pytestmark = pytest.mark.slow
STEPS = 2


def _cifar10_full_size(seed: int = 0) -> bytes:
    """cifar-10-python.tar.gz in the real layout and size: 5 x 10,000 training images, 10,000
    test images (images are plain colours per class with noise, so the archive builds fast)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(10, 3), dtype=np.uint8)

    def batch(n: int, label: str) -> bytes:
        labels = rng.integers(0, 10, size=n)
        planes = np.repeat(colours[labels], 1024, axis=1)  # N x 3072, R then G then B planes
        noise = rng.integers(0, 8, size=planes.shape, dtype=np.uint8)
        return py2_pickle({b"batch_label": label.encode(), b"labels": labels.tolist(),
                            b"data": planes + noise,
                            b"filenames": [f"img_{i}.png".encode() for i in range(n)]})

    members = {f"cifar-10-batches-py/data_batch_{i}": batch(10_000, f"training batch {i} of 5")
               for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = batch(10_000, "testing batch 1 of 1")
    members["cifar-10-batches-py/batches.meta"] = py2_pickle(
        {b"num_cases_per_batch": 10_000, b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    return tar_bytes(members)


def _official_weights(path: Path) -> Path:
    """BiT-M-R50x1 in the official .npz layout (random values; 21,843-class head)."""
    torch.manual_seed(0)
    save_npz(build_model("BiT-M-R50x1"), path)
    return path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, repo_root):
    with ArchiveServer() as http_server:
        yield _smoke_run(tmp_path_factory, repo_root, http_server)


def _smoke_run(tmp_path_factory, repo_root, http_server):
    repo = make_clone(repo_root, tmp_path_factory.mktemp("cifar10"), [])
    home = tmp_path_factory.mktemp("home")  # the download caches live under ~/.cache
    archive = _cifar10_full_size()
    data_url = http_server.add("/cifar/cifar-10-python.tar.gz", archive)
    weights = _official_weights(tmp_path_factory.mktemp("w") / "BiT-M-R50x1.npz").read_bytes()
    weights_url = http_server.add("/bit_models/BiT-M-R50x1.npz", weights)
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    env.pop("BIT_PARAMS", None)
    command = [str(BIN / "bit"), "run", "--preset", "cifar10", "--until", "finetune",
               "-S", f"data.url={data_url}", "-S", f"data.md5={hashlib.md5(archive).hexdigest()}",
               "-S", f"weights.url={weights_url}",
               "-S", f"weights.sha256={hashlib.sha256(weights).hexdigest()}",
               "-S", f"train.stop_after={STEPS}"]
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return repo, env, result


def test_trains_with_the_exact_hyperrule_values(smoke_run):
    repo, _, result = smoke_run
    assert "Stopped after finetune" in result.stdout
    rows = list(csv.DictReader((repo / "reports/train/loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    # lr = 0.003 x 512 / 512, linearly warmed up over the first 500 of 10,000 steps
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.003 * s / 500 for s in range(STEPS)])
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    assert metrics["steps"] == STEPS and 0 <= metrics["val_top1"] <= 100


def test_the_run_records_the_plan_in_mlflow(smoke_run):
    repo, env, _ = smoke_run
    code = ("import json, mlflow; r = mlflow.search_runs(experiment_names=['bit-pipeline'], "
            "output_format='list')[0]; print(json.dumps(r.data.params))")
    params = json.loads(subprocess.run([sys.executable, "-c", code], cwd=repo, env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert params["plan.schedule"] == "[500, 3000, 6000, 9000, 10000]"
    assert float(params["plan.lr"]) == pytest.approx(0.003)
    assert float(params["plan.mixup_alpha"]) == pytest.approx(0.1)
    assert (params["plan.precrop"], params["plan.resolution"]) == ("160", "128")
    assert params["data.train_images"] == "49000" and params["data.classes"] == "10"
    assert params["weights.source"] == "official" and params["plan.compile"] == "False"


def test_later_stages_wait_and_a_longer_run_continues(smoke_run):
    repo, env, _ = smoke_run
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=repo, env=env, capture_output=True,
                            text=True, check=True).stdout
    assert "export_onnx" in status and "finetune:" not in status
    resume = torch.load(repo / "models/resume/checkpoint.pt", weights_only=True)
    assert resume["step"] == STEPS and resume["schedule"] == [500, 3000, 6000, 9000, 10000]
