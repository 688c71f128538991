"""A run's workspace and what it shares: the host's DVC cache, the DVC remote (a directory or an
S3-compatible endpoint on 127.0.0.1), and DVC experiments pushed to the git remote.

The experiment tests use a two-stage DVC project made here (seconds per command), not the BiT
pipeline: what is checked is how workspaces share, not what the stages compute.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from flows import workspace
from flows.pipeline import PreflightError, check_shared_run, experiment_name
from flows.workspace import Sharing, WorkspaceError
from tests.conftest import BIN, free_port

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


# --- settings ------------------------------------------------------------------------------------

def test_sharing_comes_from_the_environment(tmp_path):
    assert Sharing.from_env({"XDG_CACHE_HOME": str(tmp_path)}) == Sharing(
        tmp_path / "bit-pipeline" / "dvc", None)
    env = {workspace.CACHE_ENV: str(tmp_path / "c"), workspace.REMOTE_ENV: "s3://b/p"}
    assert Sharing.from_env(env) == Sharing(tmp_path / "c", "s3://b/p")
    shown = Sharing(tmp_path, "https://ci:pa%40ss@dav.example/store").remote_shown
    assert shown == "https://dav.example/store"
    assert Sharing(tmp_path).remote_shown == "none"


@pytest.mark.parametrize("url, options", [
    ("s3://bucket/dvc", {"url": "s3://bucket/dvc"}),
    ("file:///srv/nfs/dvc", {"url": "/srv/nfs/dvc"}),
    ("/srv/nfs/../nfs/dvc", {"url": "/srv/nfs/dvc"}),
    ("https://ci:pa%40ss@dav.example/store",
     {"url": "https://dav.example/store", "user": "ci", "password": "pa@ss", "auth": "basic"}),
    ("ssh://ci@host/srv/dvc", {"url": "ssh://host/srv/dvc", "user": "ci"}),
])
def test_remote_options_keep_credentials_out_of_the_url(url, options):
    assert workspace.remote_options(url) == options


def test_credentials_in_an_s3_url_are_refused_without_being_quoted():
    with pytest.raises(WorkspaceError) as err:
        workspace.remote_options("s3://AKIA123:hunter2@bucket/dvc")
    message = str(err.value)
    assert "\n" not in message and "hunter2" not in message and "AKIA123" not in message
    assert "AWS_ACCESS_KEY_ID" in message and workspace.REMOTE_ENV in message


# --- the workspace's DVC configuration -------------------------------------------------------------

def _dvc(root: Path, *args: str) -> str:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True,
                          check=True, timeout=300).stdout


def _git(root: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout


STAGES = {
    "make": {"cmd": "python -c \"import yaml, json; x = yaml.safe_load(open('params.yaml'))['x'];"
                    " open('data.txt', 'w').write(str(x) * 1000);"
                    " open('notes.txt', 'w').write(f'made {x}');"
                    " json.dump({'x': x}, open('metrics.json', 'w'))\"",
             "params": ["x"], "outs": ["data.txt", {"notes.txt": {"cache": False}}],
             "metrics": [{"metrics.json": {"cache": False}}]},
    "use": {"cmd": "python -c \"import os; os.makedirs('keep', exist_ok=True);"
                   " open('keep/run.json', 'w').write('{}');"
                   " open('result.txt', 'w').write(open('data.txt').read()[::-1])\"",
            "deps": ["data.txt"], "outs": ["result.txt", {"keep": {"persist": True,
                                                                    "cache": False}}]},
}


@pytest.fixture
def origin(tmp_path) -> Path:
    """A bare git repository holding a two-stage DVC project (x: 1 in params.yaml)."""
    src = tmp_path / "src"
    src.mkdir()
    _git(src, "init", "-q", "-b", "main")
    _dvc(src, "init", "-q")
    (src / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}, sort_keys=False))
    (src / "params.yaml").write_text("x: 1\n")
    (src / ".gitignore").write_text("keep/\n")
    _git(src, "add", "-A")
    _git(src, "commit", "-qm", "baseline")
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(bare)], check=True)
    return bare


def _clone(origin: Path, dest: Path) -> Path:
    """What the deployments' git_clone step makes: a shallow clone."""
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{origin}", str(dest)],
                   check=True)
    return dest


def test_configure_writes_the_local_config_only(origin, tmp_path):
    root = _clone(origin, tmp_path / "ws")
    (root / ".dvc" / "config.local").write_text("[core]\n    no_scm = false\n")
    sharing = Sharing(tmp_path / "host-cache", "https://ci:pa%40ss@dav.example/store")
    path = workspace.configure(root, sharing)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the remote's password
    config = dict(line.split("=", 1) for line in _dvc(root, "config", "--list").splitlines())
    assert config["cache.dir"] == str(tmp_path / "host-cache")
    assert config["cache.type"] == workspace.LINKS and config["cache.shared"] == "group"
    assert config["core.remote"] == workspace.REMOTE and config["core.no_scm"] == "false"
    assert config[f"remote.{workspace.REMOTE}.url"] == "https://dav.example/store"
    assert config[f"remote.{workspace.REMOTE}.password"] == "pa@ss"
    assert config["core.site_cache_dir"].startswith(str(root))  # removed with the workspace
    assert _git(root, "status", "--porcelain") == ""  # nothing git would commit
    workspace.configure(root, Sharing(tmp_path / "host-cache"))  # no remote any more
    assert "remote" not in _dvc(root, "config", "--list", "--local")


# --- the remote's one-line errors ----------------------------------------------------------------

def _one_line(err: pytest.ExceptionInfo, *absent: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for secret in absent:
        assert secret not in message, message
    return message


def test_a_missing_directory_remote_is_an_error_not_a_new_directory(origin, tmp_path):
    root = _clone(origin, tmp_path / "ws")
    sharing = Sharing(tmp_path / "cache", str(tmp_path / "nfs" / "dvc"))
    workspace.configure(root, sharing)
    with pytest.raises(WorkspaceError) as err:
        workspace.check_remote(root, sharing)
    assert "mkdir -p" in _one_line(err) and str(tmp_path / "nfs" / "dvc") in str(err.value)
    assert not (tmp_path / "nfs").exists()


def test_an_unreachable_s3_remote_fails_in_one_line(origin, tmp_path, monkeypatch):
    root = _clone(origin, tmp_path / "ws")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    sharing = Sharing(tmp_path / "cache", "s3://bit-dvc/store")
    workspace.configure(root, sharing)
    start = time.perf_counter()
    with pytest.raises(WorkspaceError) as err:
        workspace.check_remote(root, sharing)
    message = _one_line(err, "s3cr3t-value")
    assert "s3://bit-dvc/store" in message and "AWS_ENDPOINT_URL" in message
    assert time.perf_counter() - start < 60


def test_wrong_s3_credentials_fail_in_one_line(origin, tmp_path, monkeypatch, s3_server):
    root = _clone(origin, tmp_path / "ws")
    for key, value in {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-s3cr3t"}.items():
        monkeypatch.setenv(key, value)
    sharing = Sharing(tmp_path / "cache", f"s3://{s3_server.bucket}/store")
    workspace.configure(root, sharing)
    with pytest.raises(WorkspaceError) as err:
        workspace.check_remote(root, sharing)
    assert "AWS_SECRET_ACCESS_KEY" in _one_line(err, "wrong-s3cr3t", s3_server.secret_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    workspace.check_remote(root, sharing)  # the right ones work


def test_a_remote_password_never_reaches_a_message(origin, tmp_path):
    root = _clone(origin, tmp_path / "ws")
    url = f"webdav://ci:pa55word@127.0.0.1:{free_port()}/dvc"  # nothing listens there
    sharing = Sharing(tmp_path / "cache", url)
    workspace.configure(root, sharing)
    _dvc(root, "repro", "make")
    with pytest.raises(WorkspaceError) as err:
        workspace.push(root, sharing)  # data to send: DVC has to reach the remote
    assert "webdav://127.0.0.1" in _one_line(err, "pa55word")


# --- two hosts sharing work through the remotes --------------------------------------------------

def _host(origin: Path, tmp_path: Path, name: str, remote: str | None
          ) -> tuple[Path, Sharing]:
    """A fresh workspace on host `name`: its own clone and host cache, the shared remote."""
    root = _clone(origin, tmp_path / name / "ws")
    sharing = Sharing(tmp_path / name / "cache", remote)
    workspace.prepare(root, sharing)  # what the flow's prepare-workspace task does
    return root, sharing


@pytest.mark.slow
def test_one_host_restores_what_another_computed(origin, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    first, sharing = _host(origin, tmp_path, "a", str(remote))
    _dvc(first, "repro")
    for stage in STAGES:  # what a shared run does after each stage
        workspace.share_run(first, stage, sharing)
    name = experiment_name(nightly=False)
    rev = workspace.save_experiment(first, name, f"{name}: MLflow run r1")
    saved = _git(first, "show", "--name-only", "--format=", rev).split()
    assert {"dvc.lock", "metrics.json", "notes.txt", "keep/run.json"} <= set(saved)
    workspace.push_experiment(first, sharing, name)

    second, sharing = _host(origin, tmp_path, "b", str(remote))
    # the run cache came from the remote, with the run DVC itself leaves out of it (notes.txt:
    # an uncached output that is no metric); its files come from the remote
    assert not workspace.restorable(second, "make")  # not in host b's cache yet
    assert workspace.restorable(second, "make", pull=True)
    _dvc(second, "repro", "--pull", "--single-item", "make")
    assert (second / "notes.txt").read_text() == "made 1"
    assert json.loads(_dvc(second, "status", "--json", "make")) == {}
    assert not workspace.restorable(second, "use")  # a persist output: never run-cached
    assert workspace.matching_experiment(second) == name
    assert workspace.restore_experiment(second, name, sharing)
    assert json.loads(_dvc(second, "status", "--json")) == {}
    assert (second / "result.txt").read_text() == "1" * 1000
    linked = second / "result.txt"  # from the host cache: a link where the file system allows
    assert linked.is_symlink() or linked.stat().st_nlink > 1 or workspace.LINKS.startswith("reflink")

    third, _ = _host(origin, tmp_path, "c", str(remote))
    (third / "params.yaml").write_text("x: 2\n")
    assert workspace.matching_experiment(third) is None  # other parameters


def test_a_committed_run_whose_outputs_are_on_the_remote_is_restorable(origin, tmp_path):
    """dvc.lock records the run (committed, with the uncached files) and the remote holds its
    cached outputs from a plain `dvc push`, with no run cache: DVC pulls instead of running."""
    remote = tmp_path / "remote"
    remote.mkdir()
    first, sharing = _host(origin, tmp_path, "a", str(remote))
    _dvc(first, "repro", "make")
    _dvc(first, "push")
    _git(first, "add", "dvc.lock", "notes.txt", "metrics.json", ".gitignore")
    _git(first, "commit", "-qm", "made")
    _git(first, "push", "-q", "origin", "HEAD")
    second, _ = _host(origin, tmp_path, "b", str(remote))
    assert not (second / "data.txt").exists()
    assert workspace.restorable(second, "make", pull=True)
    assert "Running stage" not in _dvc(second, "repro", "--pull", "--single-item", "make")
    assert (second / "data.txt").read_text() == "1" * 1000


def test_a_run_whose_outputs_are_nowhere_is_not_restorable(origin, tmp_path):
    """The remote's run cache names a run whose files never reached the remote (host a had no
    remote when it ran): host b cannot restore it, so the stage counts as one that runs."""
    import shutil

    first, host_a = _host(origin, tmp_path, "a", None)
    _dvc(first, "repro", "make")
    workspace.share_run(first, "make", host_a)  # recorded in host a's run cache only
    remote = tmp_path / "remote"
    shutil.copytree(host_a.cache / "runs", remote / "runs")  # the record, without the files
    second, host_b = _host(origin, tmp_path, "b", str(remote))
    answer = workspace.restorable(second, "make", pull=True)
    # the run-cache key comes with the answer: the one a kept checkpoint of the stage goes by
    assert not answer and answer.key == workspace._inputs_key(second, "make") is not None
    third, _ = _host(origin, tmp_path, "c", None)
    workspace.configure(third, host_a)  # on host a, the files are in the host cache
    answer = workspace.restorable(third, "make")
    assert answer and answer.key == workspace._inputs_key(third, "make")


@pytest.mark.slow
def test_without_a_dvc_remote_an_experiment_restores_on_its_host_and_runs_again_elsewhere(
        origin, tmp_path):
    """BIT_DVC_REMOTE unset: a shared run pushes its experiment to git all the same. A later run
    of that commit and those parameters on the same host restores it from the host cache; on
    another host its data is nowhere, so it is not restored, and the stages run again."""
    first, host_a = _host(origin, tmp_path, "a", None)
    _dvc(first, "repro")
    name = experiment_name(nightly=False)
    workspace.save_experiment(first, name, f"{name}: MLflow run r1")
    workspace.push_experiment(first, host_a, name)  # to git only

    again = _clone(origin, tmp_path / "a" / "again")
    workspace.configure(again, host_a)
    assert workspace.matching_experiment(again) == name
    assert workspace.restore_experiment(again, name, host_a)
    assert json.loads(_dvc(again, "status", "--json")) == {}

    elsewhere, host_b = _host(origin, tmp_path, "b", None)
    assert workspace.matching_experiment(elsewhere) == name
    assert not workspace.restore_experiment(elsewhere, name, host_b)
    assert _git(elsewhere, "status", "--porcelain") == ""  # the clone as it was: no dvc.lock
    assert json.loads(_dvc(elsewhere, "status", "--json"))  # its outputs are missing
    _dvc(elsewhere, "repro")
    assert json.loads(_dvc(elsewhere, "status", "--json")) == {}
    assert (elsewhere / "result.txt").read_text() == "1" * 1000


@pytest.mark.slow
def test_runs_of_a_commit_with_history_share_experiments_from_shallow_clones(origin, tmp_path):
    """The deployments clone with --depth 1. Once the commit has a parent, a workspace that
    fetched another run's experiment of that commit (as every shared run does first) must
    still push its own: DVC's git library drops the clone's shallow marker when it fetches,
    after which the push looks for the missing parent."""
    src = tmp_path / "later"
    subprocess.run(["git", "clone", "-q", str(origin), str(src)], check=True)
    (src / "README").write_text("a later commit\n")
    _git(src, "add", "README")
    _git(src, "commit", "-qm", "later")
    _git(src, "push", "-q", "origin", "HEAD")
    names = []
    for run, x in (("a", 1), ("b", 2)):
        root, sharing = _host(origin, tmp_path, run, None)
        (root / "params.yaml").write_text(f"x: {x}\n")  # the run's overrides come first
        assert workspace.matching_experiment(root) is None  # b fetched a's, of other params
        _dvc(root, "repro")
        names.append(experiment_name(nightly=False) + run)
        workspace.save_experiment(root, names[-1], f"{names[-1]}: MLflow run r{x}")
        workspace.push_experiment(root, sharing, names[-1])
    pushed = _git(origin, "for-each-ref", "--format=%(refname:short)", "refs/exps").split()
    assert sorted(ref.rsplit("/", 1)[1] for ref in pushed) == sorted(names)


def test_experiment_names_are_unique_per_run():
    name = experiment_name(nightly=True)
    assert name.startswith("nightly-") and len(name.split("-")) == 3
    assert experiment_name(nightly=False).startswith("run-")


# --- a shared run's preflight --------------------------------------------------------------------

def test_a_shared_run_needs_an_mlflow_server(origin, tmp_path):
    root = _clone(origin, tmp_path / "ws")
    with pytest.raises(PreflightError) as err:
        check_shared_run(root, f"sqlite:///{root}/mlflow.db")
    assert "MLFLOW_TRACKING_URI=http" in _one_line(err)
    check_shared_run(root, "http://127.0.0.1:5000")


def test_a_shared_run_refuses_a_used_workspace(origin, tmp_path):
    root = _clone(origin, tmp_path / "ws")
    (root / "params.yaml").write_text("x: 3\n")
    with pytest.raises(PreflightError) as err:
        check_shared_run(root, "http://127.0.0.1:5000")
    assert "params.yaml" in _one_line(err)



def _stopped_at_step_10(root: Path, sharing: Sharing, stage: str) -> None:
    """`stage` ran in `root`, wrote a checkpoint in its resume folder `keep`, and was stopped."""
    with pytest.raises(KeyboardInterrupt):
        with workspace.checkpoints_kept(root, sharing, stage, ["keep"]):
            (root / "keep").mkdir()
            (root / "keep" / "checkpoint.pt").write_text("step 10")
            raise KeyboardInterrupt


def test_a_stopped_stage_leaves_its_checkpoint_on_the_host_for_the_next_run(origin, tmp_path):
    sharing = Sharing(tmp_path / "host-cache")
    _stopped_at_step_10(_clone(origin, tmp_path / "first"), sharing, "use")
    other = _clone(origin, tmp_path / "other")
    (other / "params.yaml").write_text("x: 2\n")
    with workspace.checkpoints_kept(other, sharing, "use", ["keep"]):
        assert not (other / "keep").exists()  # other parameters: not theirs
    failed = _clone(origin, tmp_path / "failed")  # failed after training: no checkpoint left
    with pytest.raises(RuntimeError):
        with workspace.checkpoints_kept(failed, sharing, "use", ["keep"]):
            (failed / "keep" / "checkpoint.pt").unlink()  # moved to the finished model
            (failed / "keep" / "README.txt").write_text("what this folder is")
            raise RuntimeError("logging the model failed")
    second = _clone(origin, tmp_path / "second")  # a retry: same commit, same parameters
    with workspace.checkpoints_kept(second, sharing, "use", ["keep"]):
        assert (second / "keep" / "checkpoint.pt").read_text() == "step 10"
    with workspace.checkpoints_kept(_clone(origin, tmp_path / "third"), sharing, "use",
                                    ["keep"]):
        assert not (tmp_path / "third" / "keep").exists()  # forgotten once the stage succeeded


def test_a_kept_checkpoint_follows_the_stages_inputs_not_the_commit(origin, tmp_path):
    """Stage `make` reads parameter x: its checkpoint reaches the next run after a commit that
    changes only the README, and not a run with another x."""
    sharing = Sharing(tmp_path / "host-cache")
    first = _clone(origin, tmp_path / "first")
    _stopped_at_step_10(first, sharing, "make")
    edit = _clone(origin, tmp_path / "edit")
    (edit / "README").write_text("words\n")
    _git(edit, "add", "README")
    _git(edit, "commit", "-qm", "docs")
    _git(edit, "push", "-q", "origin", "HEAD")
    other = _clone(origin, tmp_path / "other")
    (other / "params.yaml").write_text("x: 2\n")
    with pytest.raises(KeyboardInterrupt):
        with workspace.checkpoints_kept(other, sharing, "make", ["keep"]):
            assert not (other / "keep").exists()  # another input
            raise KeyboardInterrupt  # stopped too, before writing a checkpoint
    later = _clone(origin, tmp_path / "later")
    assert workspace.head(later) != workspace.head(first)
    with workspace.checkpoints_kept(later, sharing, "make", ["keep"]):
        assert (later / "keep" / "checkpoint.pt").read_text() == "step 10"


@pytest.mark.parametrize("elsewhere", [False, True], ids=["one file system", "two"])
def test_the_hand_over_replaces_the_kept_folder_whole(tmp_path, elsewhere):
    """The stopped run's folder replaces the one kept before it, by a rename, or by a copy when
    the host cache is on another file system (here tmpfs)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/dev/shm")) if elsewhere else tmp_path / "cache"
    try:
        if elsewhere and base.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm is on the same file system here")
        kept = base / workspace.KEPT_DIR / "k" / "models" / "resume"
        kept.mkdir(parents=True)
        (kept / "checkpoint.pt").write_text("step 4")
        (kept / "stale.json").write_text("{}")
        folder = tmp_path / "ws" / "models" / "resume"
        (folder / "sub").mkdir(parents=True)
        (folder / "checkpoint.pt").write_text("step 10")
        (folder / "sub" / "run.json").write_text("{}")
        workspace._hand_over(folder, kept)
        assert folder.exists() == elsewhere  # a copy leaves it to go with the workspace
        assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*")) == [
            "checkpoint.pt", "sub", "sub/run.json"]
        assert (kept / "checkpoint.pt").read_text() == "step 10"
        assert [p.name for p in kept.parent.iterdir()] == ["resume"]  # no staging folder left
    finally:
        if elsewhere:
            shutil.rmtree(base, ignore_errors=True)


def test_a_stopped_stage_leaves_its_checkpoint_on_the_remote_for_a_retry_on_another_host(
        origin, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    host_a = Sharing(tmp_path / "cache-a", str(remote))
    host_b = Sharing(tmp_path / "cache-b", str(remote))
    first = _clone(origin, tmp_path / "first")
    workspace.configure(first, host_a)
    with pytest.raises(RuntimeError):
        with workspace.checkpoints_kept(first, host_a, "use", ["keep"]):
            (first / "keep" / "sub").mkdir(parents=True)
            (first / "keep" / "checkpoint.pt").write_bytes(b"\x00step 10")
            (first / "keep" / "sub" / "run.json").write_text("{}")
            raise RuntimeError("lost node 1")  # the stage failed
    kept = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    assert len(kept) == 3 and all(p.startswith(f"{workspace.KEPT_DIR}/") for p in kept)
    again = _clone(origin, tmp_path / "again")  # stopped again on host a, with fewer files
    workspace.configure(again, host_a)
    with pytest.raises(RuntimeError):
        with workspace.checkpoints_kept(again, host_a, "use", ["keep"]):
            shutil.rmtree(again / "keep" / "sub")
            (again / "keep" / "checkpoint.pt").write_bytes(b"\x00step 12")
            raise RuntimeError("lost node 1")
    kept = sorted(p.name for p in remote.rglob("*") if p.is_file())
    assert kept == ["checkpoint.pt", workspace.KEPT]  # the remote copy was replaced whole
    retry = _clone(origin, tmp_path / "retry")  # same commit and parameters, on host b
    workspace.configure(retry, host_b)
    with workspace.checkpoints_kept(retry, host_b, "use", ["keep"]):
        assert (retry / "keep" / "checkpoint.pt").read_bytes() == b"\x00step 12"
        assert not (retry / "keep" / "sub").exists()
        downloaded = [p.name for p in (host_b.cache / workspace.KEPT_DIR).rglob("*keep*")]
        assert downloaded == ["keep"]  # in place whole, no staging folder left
    assert not list((remote / workspace.KEPT_DIR).rglob("*.pt"))  # forgotten once the stage succeeded


def test_a_run_starts_with_the_furthest_kept_checkpoint_and_the_remote_gets_it(origin, tmp_path):
    """Host a stops at step 100, but its upload is cut short; host b trains from the start and
    stops at step 20: host a's next run keeps its own step 100 and sends it up. Host b then goes
    on from 100 to 120: host a's retry starts at 120, not with its own older copy. A copy whose
    checkpoint (sent last) never reached the remote is not taken."""
    import torch

    remote = tmp_path / "remote"
    remote.mkdir()
    host_a = Sharing(tmp_path / "cache-a", str(remote))
    host_b = Sharing(tmp_path / "cache-b", str(remote))

    def step(path: Path) -> int | None:
        return torch.load(path, weights_only=True)["step"] if path.is_file() else None

    def run(name: str, host: Sharing, trains_to: int | None = None, on_remote=lambda: None
            ) -> int | None:
        """A run of stage `use` on `host` that writes a checkpoint at `trains_to` and is
        stopped; the step it started with. `on_remote` is asked at its start."""
        root = _clone(origin, tmp_path / name)
        workspace.configure(root, host)
        with contextlib.suppress(KeyboardInterrupt):
            with workspace.checkpoints_kept(root, host, "use", ["keep"]):
                started = step(root / "keep" / "checkpoint.pt")
                on_remote()
                if trains_to is not None:
                    (root / "keep").mkdir(exist_ok=True)
                    torch.save({"step": trains_to}, root / "keep" / "checkpoint.pt")
                raise KeyboardInterrupt
        return started

    def remote_step() -> int | None:
        return step(next(remote.glob(f"{workspace.KEPT_DIR}/*/keep/checkpoint.pt"), Path("-")))

    assert run("a1", host_a, trains_to=100) is None
    next(remote.glob(f"{workspace.KEPT_DIR}/*/keep/checkpoint.pt")).unlink()  # the upload was cut short
    assert run("b1", host_b, trains_to=20) is None  # the remote's copy is not whole
    assert remote_step() == 20
    seen = []
    assert run("a2", host_a, on_remote=lambda: seen.append(remote_step())) == 100
    assert seen == [100]  # sent up at the start of the run
    assert run("b2", host_b, trains_to=120) == 100  # host b's 20 gave way to a's 100
    assert run("a3", host_a) == 120  # the remote's copy went further than host a's
    assert run("a4", host_a) == 120 and remote_step() == 120  # stopped again: nothing changes

    # Two uploads at once can leave a record that claims more than its checkpoint holds: the
    # checkpoint itself decides, once downloaded. A record cut short is read from the checkpoint.
    on_remote = next(remote.glob(f"{workspace.KEPT_DIR}/*/keep"))
    torch.save({"step": 50}, on_remote / "checkpoint.pt")
    (on_remote / workspace.KEPT).write_text('{"step": 200}')
    (next((tmp_path / "cache-a").glob(f"{workspace.KEPT_DIR}/*/keep")) / workspace.KEPT).write_text('{"st')
    assert run("a5", host_a) == 120


def test_the_key_is_the_one_a_new_run_would_record_whatever_dvc_lock_says(origin, tmp_path):
    """dvc.lock says x: 1 and params.yaml now x: 1.0, the same to DVC, which restores dvc.lock's
    run: the key that comes with the answer is the hash of the inputs as a new run records them,
    as checkpoints_kept works it out on its own."""
    root = _clone(origin, tmp_path / "ws")
    sharing = Sharing(tmp_path / "cache")
    workspace.configure(root, sharing)
    _dvc(root, "repro", "make")
    workspace.share_run(root, "make", sharing)  # notes.txt in the cache too
    (root / "params.yaml").write_text("x: 1.0\n")
    answer = workspace.restorable(root, "make")
    assert answer and answer.key == workspace._inputs_key(root, "make") is not None
