"""The pieces of a multi-host run that need no Prefect server: where node 0 asks the others to
meet, and what each node runs. The whole (a Prefect server, two worker hosts of one pool) is in
tests/test_multi_host.py."""

from __future__ import annotations

import shlex

from prefect.settings import PREFECT_API_URL, temporary_settings

from bit_core.config import TrainConfig
from bit_core.distributed import meeting_place
from flows import nodes


def test_node_0_offers_its_address_toward_the_prefect_server(monkeypatch):
    monkeypatch.delenv(nodes.ADDRESS_ENV, raising=False)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        host, _, port = nodes.default_endpoint().rpartition(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536


def test_a_worker_can_name_its_own_address(monkeypatch):
    monkeypatch.setenv(nodes.ADDRESS_ENV, "10.0.0.1")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert nodes.default_endpoint().startswith("10.0.0.1:")


def test_each_node_finds_the_meeting_place_and_its_rank_in_its_environment():
    env = nodes.node_env("10.0.0.1:29400", "bit-run-1", 1)
    assert meeting_place(TrainConfig(nodes=2), env) == ("10.0.0.1:29400", "bit-run-1", 1)


def test_a_node_runs_the_fine_tune_stages_command_of_dvc_yaml(repo_root):
    argv = nodes.stage_command(str(repo_root), "finetune")
    assert argv[:2] == ["sh", "-c"]
    assert shlex.split(argv[2])[:3] == ["python", "-m", "tasks.finetune"]


def test_the_flow_process_loads_no_torch(repo_root, tmp_path):
    """A flow run's process only orchestrates (each stage is a process of its own), so it stays
    small on the worker host for the whole run: importing torch would add about 600 MB and 2 s
    to every flow run. Checked: importing the flows, and the parameters the flow validates."""
    import shutil
    import subprocess
    import sys

    shutil.copyfile(repo_root / "params.yaml", tmp_path / "params.yaml")
    code = ("import sys, flows.cli, flows.pipeline, flows.nodes, flows.workspace; "
            "from flows.overrides import apply_overrides; "
            "apply_overrides(sys.argv[1], ['train.seed=3', 'model.name=BiT-S-R50x1']); "
            "print(sorted(m for m in ('torch', 'torchvision', 'onnxruntime') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code, str(tmp_path / "params.yaml")],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
