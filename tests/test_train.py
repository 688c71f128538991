"""The training loop: exact resume, accumulation equivalence, interruption, determinism."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from bit_core.config import TrainConfig
from bit_core.device import DeviceError
from bit_core.model import ResNetV2
from bit_core.train import (Interrupted, Trainer, _StepBatches, compile_model, make_plan,
                            resolve_compile)
from tests.datasets import Jittered


def _cfg(**kw) -> TrainConfig:
    base = dict(batch=8, base_lr=0.5, schedule=[2, 4, 6], eval_every=100, precision="fp32",
                mixup_alpha=0.2, seed=3)
    return TrainConfig(**{**base, **kw})


def _trainer(cfg, **kw) -> Trainer:
    """A trainer of BiT's ResNetV2 with one bottleneck unit per stage (R50 has 3, 4, 6, 3): the
    same kinds of layers at under half the time per step. The loop does not depend on the
    depth; the full R50x1 trains in the stage, node and stop tests."""
    torch.manual_seed(0)
    model = ResNetV2((1, 1, 1, 1), width_factor=1, num_classes=3)
    torch.nn.init.normal_(model.fc.weight, std=0.01)  # a non-zero head so every layer learns
    return Trainer(model, Jittered(), cfg, torch.device("cpu"), **kw)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_is_exact(tmp_path):
    straight = _trainer(_cfg())
    straight.fit()
    first = _trainer(_cfg())
    first.fit(tmp_path / "ckpt.pt", until=3)
    assert first.state.step == 3
    resumed = _trainer(_cfg())
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    resumed.fit()
    assert [r["loss"] for r in resumed.state.history] == [r["loss"] for r in straight.state.history]
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_loss_is_a_one_line_error_that_says_what_to_change():
    from bit_core.errors import USER_ERRORS, Diverged

    with pytest.raises(Diverged, match=r"^loss is (nan|inf) at step \d: lower train.base_lr$"):
        _trainer(_cfg(base_lr=1e12, mixup_alpha=0.0)).fit()
    assert issubclass(Diverged, USER_ERRORS)


def test_an_unreadable_resume_checkpoint_is_passed_over(tmp_path, caplog):
    """A checkpoint cut short (copied by a process killed midway) or not a checkpoint at all:
    the run starts from the beginning and says why, instead of failing at every retry."""
    whole = _trainer(_cfg())
    whole.fit(tmp_path / "ckpt.pt", until=2)
    data = (tmp_path / "ckpt.pt").read_bytes()
    for name, content in (("cut.pt", data[:len(data) // 2]), ("text.pt", b"not a checkpoint")):
        (tmp_path / name).write_bytes(content)
        fresh = _trainer(_cfg())
        with caplog.at_level("INFO", logger="bit"):
            assert not fresh.resume(tmp_path / name)
        assert f"not resuming from {tmp_path / name}: it cannot be read" in caplog.text
        assert fresh.state.step == 0
    torch.save([1, 2], tmp_path / "list.pt")
    with caplog.at_level("INFO", logger="bit"):
        assert not _trainer(_cfg()).resume(tmp_path / "list.pt")
    assert "it is no checkpoint" in caplog.text


def test_where_a_run_executes_does_not_stop_it_resuming_unless_mixup_pairs_by_process():
    """Hosts, processes and their rendezvous are RESUME_NEUTRAL: every layout computes the same
    global batch. Mixup pairs images within each process's share, so there the count matters."""
    elsewhere = dict(nodes=2, processes=2, rdzv_endpoint="node-a:29400", rdzv_id="run-7",
                     join_timeout=30, peer_timeout=30)
    plain = _trainer(_cfg(mixup_alpha=0.0))
    saved = {**plain.state_dict(), "config": _cfg(mixup_alpha=0.0, **elsewhere).model_dump(),
             "world": 4}
    assert plain.resumes(saved) is None
    mixing = _trainer(_cfg())
    assert mixing.resumes({**mixing.state_dict(), "world": 4}) == \
        "it was written with other processes in all (4, which pair images for mixup)"


def test_same_seed_same_curve_other_seed_differs():
    one, two, other = _trainer(_cfg()), _trainer(_cfg()), _trainer(_cfg(seed=4))
    for t in (one, two, other):
        t.fit()
    losses = [[r["loss"] for r in t.state.history] for t in (one, two, other)]
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_accumulation_equals_full_batch():
    grads = []
    for split in (1, 4):
        trainer = _trainer(_cfg(batch_split=split, schedule=[1, 2], mixup_alpha=0.0))
        trainer.optimizer.step = lambda *a, **k: None  # keep the gradients for comparison
        trainer.optimizer.zero_grad = lambda *a, **k: None
        trainer.fit()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_step_batches_cover_each_epoch_once():
    plan = make_plan(_cfg(batch=8, batch_split=2), 24)
    sampler = _StepBatches(24, plan, 8, seed=1, start=0, end=3)
    indices = [i for micro in sampler for i, _ in micro]
    assert sorted(indices) == list(range(24))
    resumed = [i for micro in _StepBatches(24, plan, 8, 1, start=2, end=3) for i, _ in micro]
    assert resumed == indices[16:]


def test_sigterm_writes_checkpoint_then_resumes(tmp_path):
    path = tmp_path / "ckpt.pt"
    trainer = _trainer(_cfg(schedule=[2, 40, 60]))
    fired = threading.Event()

    def on_step(record):
        if record["step"] == 2 and not fired.is_set():
            fired.set()
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.on_step = on_step
    with pytest.raises(Interrupted, match="signal"):
        trainer.fit(path)
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 2 and len(saved["history"]) == 2
    resumed = _trainer(_cfg(schedule=[2, 4, 6]))  # resumed under a shorter schedule
    resumed.load_state_dict(saved)
    resumed.fit()
    assert resumed.state.step == 6 and len(resumed.state.history) == 6


def test_stop_after_ends_early_with_the_full_schedule_and_evaluates_there(tmp_path):
    calls = []
    trainer = _trainer(_cfg(stop_after=2, eval_every=100),
                       evaluate=lambda model: calls.append(1) or {"val_top1": 50.0})
    trainer.fit(tmp_path / "ckpt.pt")
    assert trainer.state.step == 2 and trainer.plan.steps == 6
    assert trainer.plan.schedule == [2, 4, 6]
    assert [e["step"] for e in trainer.state.evals] == [2] and calls == [1]
    # the stopped run continues to the same weights as one that never stopped
    straight = _trainer(_cfg())
    straight.fit()
    resumed = _trainer(_cfg())
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    resumed.fit()
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("setting", "device", "steps", "expected"), [
    (None, "cpu", 10_000, True), (None, "cuda", 2_000, True), (None, "cpu", 300, False),
    (None, "npu", 10_000, False), (True, "cpu", 10, True), (False, "cuda", 10_000, False)])
def test_compile_is_chosen_for_long_runs(setting, device, steps, expected):
    assert resolve_compile(setting, SimpleNamespace(type=device), steps) is expected


def test_compile_on_npu_without_torchair_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchair", None)  # import fails, as where it is absent
    with pytest.raises(DeviceError, match=r"needs TorchAir.*train.compile: false"):
        compile_model(torch.nn.Linear(2, 2), SimpleNamespace(type="npu"))


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.slow
def test_compiled_training_follows_eager():
    curves = []
    for flag in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(TinyNet(), Jittered(), _cfg(compile=flag), torch.device("cpu"))
        assert trainer.compiled is flag
        trainer.fit()
        curves.append([r["loss"] for r in trainer.state.history])
        keys = set(trainer.state_dict()["model"])
        assert keys == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}  # no _orig_mod.
    assert curves[0] == pytest.approx(curves[1], rel=1e-4, abs=1e-5)


def _temp_folder(parent, size: int):
    """A folder whose path is `size` bytes long, under `parent`."""
    path = parent / ("d" * (size - len(str(parent)) - 1))
    path.mkdir()
    assert len(str(path)) == size
    return path


_LOAD = ("import torch; from torch.utils.data import DataLoader; "
         "print(sum(len(b) for b in DataLoader(torch.zeros(64, 256), batch_size=8, "
         "num_workers=1)))")


@pytest.fixture
def short_base():
    """A new folder with a short path (pytest's own are too deep to build on)."""
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="w"))
    yield base
    shutil.rmtree(base)


@pytest.mark.timeout(300)  # a reader that never sees the line it waits for
def test_data_loader_workers_need_a_short_temporary_folder(short_base, monkeypatch):
    """DataLoader workers pass batches through Unix sockets in the temporary folder: the longest
    folder they run in is the one the trainer accepts, and one byte more is refused in one line
    before any work."""
    import subprocess
    import tempfile

    from bit_core.data import _SOCKET_PATH_MAX, _SOCKET_SUFFIX
    from bit_core.errors import ConfigError

    base = short_base
    longest = _SOCKET_PATH_MAX - _SOCKET_SUFFIX
    for size, works in ((longest, True), (longest + 1, False)):
        env = {**os.environ, "TMPDIR": str(_temp_folder(base, size))}
        # the worker's error goes to stderr, and the loader then waits for it for ever
        process = subprocess.Popen([sys.executable, "-c", _LOAD], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            errors = "".join(iter(process.stderr.readline, "")) if works else next(
                (line for line in process.stderr if "AF_UNIX path too long" in line), "")
        finally:
            process.kill()
            output = process.communicate()[0]
        assert ("AF_UNIX path too long" in errors) != works, errors[-500:]
        assert (output.strip() == "64") == works
        monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])
        if works:
            _trainer(_cfg(workers=1))
        else:
            with pytest.raises(ConfigError) as err:
                _trainer(_cfg(workers=1))
            assert "\n" not in str(err.value) and "set TMPDIR to a shorter path" in str(err.value)
            _trainer(_cfg(workers=0))  # no workers, no sockets


def test_missing_pretrained_weights_stop_the_stage_instead_of_training_from_scratch(
        digits_inputs, tmp_path):
    """weights.source: official with no weights.npz (fetch_weights not run on this host, or a
    wrong --weights): one line and exit 2, not a model trained from scratch in their name."""
    from tests.finetune_runs import Stage, finish

    stage = Stage(digits_inputs, f"sqlite:///{tmp_path / 'mlflow.db'}", [])
    with stage.start(tmp_path / "run", ["weights.source=official"]) as process:
        code, stderr = finish(process, tmp_path / "run")
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: finetune: weights.source is official but {digits_inputs}/models/pretrained/"
        "weights.npz does not exist: run the fetch_weights stage (or set weights.source: none "
        "to train from scratch)")
    assert not (tmp_path / "run" / "out").exists()


def test_images_per_second_count_only_the_steps_this_run_trained(tmp_path, repo_root):
    """A run resumed at step 400 of 500 trained 100 steps in its seconds, not 500."""
    from bit_core.config import load_params
    from tasks.finetune import _write_reports

    params = load_params(repo_root / "params.yaml")
    history = [{"step": s, "loss": 1.0, "lr": 0.1} for s in range(1, 501)]
    state = SimpleNamespace(step=500, history=history, evals=[])
    metrics = _write_reports(params, state, 100, 10.0, tmp_path)
    assert metrics["train_images_per_s"] == 100 * params.train.batch / 10.0
