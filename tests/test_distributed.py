"""DDP: two CPU processes (gloo) on a global batch train like one process on that batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from bit_core import distributed
from bit_core.config import TrainConfig
from tests.datasets import Jittered

CFG = dict(batch=8, batch_split=2, base_lr=0.5, schedule=[1, 2, 3], eval_every=100,
           precision="fp32", mixup_alpha=0.0, seed=5)


def _train(rank: int, world: int, port: int, out: str) -> None:
    from bit_core import create_model
    from bit_core.train import Trainer

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    where, device = distributed.init(torch.device("cpu"))
    model = create_model("BiT-S-R50x1", num_classes=3)
    model.load_state_dict(_initial_weights())
    trainer = Trainer(distributed.wrap(model, where, device), Jittered(), TrainConfig(**CFG),
                      device, rank=where.rank, world=where.size)
    trainer.fit()
    torch.save({"model": model.state_dict(), "losses": [r["loss"] for r in trainer.state.history]},
               f"{out}/rank{rank}.pt")
    distributed.finish()


def _initial_weights() -> dict[str, torch.Tensor]:
    from bit_core import create_model

    torch.manual_seed(0)
    model = create_model("BiT-S-R50x1", num_classes=3)
    torch.nn.init.normal_(model.fc.weight, std=0.01)
    return model.state_dict()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    _train(0, 1, 0, str(single))
    mp.spawn(_train, args=(2, _free_port(), str(multi)), nprocs=2, join=True)
    one = torch.load(single / "rank0.pt", weights_only=True)
    ranks = [torch.load(multi / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), f"ranks differ at {key}"
    assert ranks[0]["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # The updates agree up to float summation order (amplified by weight standardisation's
    # 1/std in the backward pass): compare them as a whole, relative to their size.
    initial = _initial_weights()
    moved = sum(((one["model"][k] - w) ** 2).sum() for k, w in initial.items())
    apart = sum(((ranks[0]["model"][k] - one["model"][k]) ** 2).sum() for k in initial)
    assert moved > 0 and (apart / moved).sqrt() < 1e-2


def test_backend_by_device():
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda") == "nccl"
    assert distributed.backend_for("npu") == "hccl"
    with pytest.raises(ValueError, match="mps"):
        distributed.backend_for("mps")


def test_single_process_is_a_no_op():
    world, device = distributed.init(torch.device("cpu"))
    assert world.size == 1 and world.is_main and device.type == "cpu"


def test_the_meeting_place_comes_from_params_or_the_environment():
    cfg = TrainConfig(nodes=2, rdzv_endpoint="10.0.0.1:29400", rdzv_id="run-1")
    assert distributed.meeting_place(cfg, {}) == ("10.0.0.1:29400", "run-1", None)
    flow = {"BIT_RDZV_ENDPOINT": "node-a:4711", "BIT_RDZV_ID": "flow-7", "BIT_NODE_RANK": "1"}
    assert distributed.meeting_place(cfg, flow) == ("node-a:4711", "flow-7", 1)
    assert distributed.meeting_place(TrainConfig(nodes=2), flow) == ("node-a:4711", "flow-7", 1)
    assert distributed.meeting_place(TrainConfig(), {}) == (None, "bit-finetune", None)


@pytest.mark.parametrize("cfg, env, message", [
    (TrainConfig(nodes=2), {}, "2 nodes need a rendezvous endpoint: set train.rdzv_endpoint "
     r"\(or BIT_RDZV_ENDPOINT\) to host:port"),
    (TrainConfig(nodes=2), {"BIT_RDZV_ENDPOINT": "node-a"},
     "BIT_RDZV_ENDPOINT=node-a: write it as host:port"),
    (TrainConfig(nodes=2, rdzv_endpoint="a:1"), {"BIT_NODE_RANK": "2"},
     "BIT_NODE_RANK=2: give a node rank from 0 to 1"),
])
def test_a_meeting_place_that_cannot_work_is_one_line(cfg, env, message):
    with pytest.raises(distributed.ClusterError, match=message):
        distributed.meeting_place(cfg, env)


def _ask(store, asked: dict[int, int | None], me: int):
    """What node `me` agrees on after the others asked for `asked` (by rendezvous rank)."""
    for rank, wanted in asked.items():
        if rank != me:
            store.set(f"bit/node-rank/{rank}", "" if wanted is None else str(wanted))
    return distributed.agreed_node_ranks(store, me, len(asked), asked[me])


def test_nodes_keep_the_rendezvous_ranks_unless_they_ask_for_their_own():
    assert _ask(torch.distributed.HashStore(), {0: None, 1: None, 2: None}, 1) == [0, 1, 2]
    # the node the rendezvous ranked last asked to be node 0 (the flow's own host)
    assert _ask(torch.distributed.HashStore(), {0: 1, 1: 2, 2: 0}, 2) == [1, 2, 0]


@pytest.mark.parametrize("asked", [{0: 0, 1: 0}, {0: 1, 1: None}])
def test_nodes_that_ask_for_clashing_ranks_are_refused(asked):
    with pytest.raises(distributed.ClusterError,
                       match="give every node its own BIT_NODE_RANK from 0 to 1, or none"):
        _ask(torch.distributed.HashStore(), asked, 0)
