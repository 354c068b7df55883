"""One process or a torchrun group (odeify.train.distributed): each `Dist` method at world 1 and,
with torch.distributed's collectives replaced by recorders, at world > 1; the process group
setup; the wrapping and the gradient sync each kind of model gets; full state views round-trip.
A whole checkpoint loaded into two gloo ranks' FSDP shards; the other real two-process runs
are in test_shards.py, test_pretrain.py and test_adapt_depth.py, under torchrun."""

import contextlib
import datetime
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp
import torch.nn.parallel
from torch import nn

from odeify.train.distributed import (
    Dist,
    StateView,
    full_state,
    full_tensor,
    setup_distributed,
    sync,
    teardown,
    wrap,
)


@pytest.fixture
def calls(monkeypatch):
    """What the collectives were asked to do; all_reduce adds 10 (the other ranks' share)."""
    seen = []

    def all_reduce(value):
        seen.append(("all_reduce", value.tolist()))
        value.add_(10.0)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "barrier", lambda: seen.append(("barrier",)))
    return seen


def test_one_process_calls_no_collective(calls):
    one = Dist()
    assert (one.rank, one.world, one.local_rank, one.device) == (0, 1, 0, torch.device("cpu"))
    assert one.main and not Dist(rank=1, world=2).main
    value = torch.tensor([1.0, 2.0])
    assert one.mean(value) is value and one.sum(value) is value
    one.barrier()
    with one.main_first():
        calls.append(("body",))
    assert calls == [("body",)]


def test_mean_and_sum_over_ranks_leave_the_input(calls):
    ctx = Dist(rank=1, world=2)
    value = torch.tensor([2.0, 4.0])
    assert ctx.mean(value).tolist() == [6.0, 7.0]  # (2 + 10) / 2, (4 + 10) / 2
    assert ctx.sum(value).tolist() == [12.0, 14.0]
    assert value.tolist() == [2.0, 4.0]
    ctx.barrier()
    assert calls == [("all_reduce", [2.0, 4.0]), ("all_reduce", [2.0, 4.0]), ("barrier",)]


@pytest.mark.parametrize("rank,order", [(0, ["body", "barrier"]), (1, ["barrier", "body"])])
def test_main_first_runs_rank_0_before_the_others(calls, rank, order):
    with Dist(rank=rank, world=2).main_first():
        calls.append(("body",))
    assert [c[0] for c in calls] == order


@pytest.fixture
def group(monkeypatch):
    """torch.distributed's process group calls, recorded; no group is started."""
    seen, state = [], {"initialized": False}
    monkeypatch.setattr(dist, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(dist, "init_process_group", lambda backend: seen.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: seen.append(("destroy",)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return seen, state


def test_setup_without_torchrun_is_one_process(group, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert setup_distributed() == Dist(0, 1, 0, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert setup_distributed() == Dist(0, 1, 0, torch.device("cpu"))
    assert group[0] == []


def test_setup_under_torchrun_starts_gloo_once(group, monkeypatch):
    seen, state = group
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert setup_distributed() == Dist(3, 4, 1, torch.device("cpu"))
    assert seen == [("init", "gloo")]
    state["initialized"] = True
    assert setup_distributed() == Dist(3, 4, 1, torch.device("cpu"))
    assert seen == [("init", "gloo")]


def test_teardown_destroys_only_a_started_group(group):
    seen, state = group
    teardown()
    assert seen == []
    state["initialized"] = True
    teardown()
    assert seen == [("destroy",)]


def test_wrap_per_world_and_shard(monkeypatch):
    model = nn.Sequential(nn.Linear(2, 2))
    inner = model[0]
    compiled = []
    model.compile = lambda: compiled.append(True)
    assert wrap(model, Dist()) is model and compiled == []
    assert wrap(model, Dist(), compile=True) is model and compiled == [True]

    sharded = []
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", sharded.append)
    assert wrap(model, Dist(rank=1, world=2), shard=[inner]) is model
    assert sharded == [inner, model]  # each shard group, then the rest

    class DDP:
        def __init__(self, module, device_ids):
            self.module, self.device_ids = module, device_ids

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DDP)
    on_cpu = wrap(model, Dist(rank=1, world=2))
    assert isinstance(on_cpu, DDP) and on_cpu.module is model and on_cpu.device_ids is None
    gpu = Dist(rank=1, world=2, local_rank=1, device=torch.device("cuda", 1))
    assert wrap(model, gpu).device_ids == [1]
    assert sharded == [inner, model] and compiled == [True]


class _DDPLike(nn.Module):
    def __init__(self, log):
        super().__init__()
        self.log = log

    @contextlib.contextmanager
    def no_sync(self):
        self.log.append("no_sync")
        yield
        self.log.append("synced")


class _FSDPLike(nn.Module):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def set_requires_gradient_sync(self, value):
        self.log.append(value)


@pytest.mark.parametrize(
    "kind,last,expected",
    [
        (_DDPLike, False, ["no_sync", "body", "synced"]),
        (_DDPLike, True, ["body"]),
        (_FSDPLike, False, [False, "body", True]),
        (_FSDPLike, True, ["body"]),
        (None, False, ["body"]),
    ],
)
def test_sync_reduces_on_the_last_micro_batch_only(kind, last, expected):
    log = []
    model = nn.Linear(1, 1) if kind is None else kind(log)
    with sync(model, last=last):
        log.append("body")
    assert log == expected


def test_fsdp_sync_comes_back_after_an_error():
    log = []
    with pytest.raises(RuntimeError, match="^oops$"), sync(_FSDPLike(log), last=False):
        raise RuntimeError("oops")
    assert log == [False, True]


def test_full_tensor_gathers_only_sharded_values():
    class Sharded:
        def full_tensor(self):
            return "whole"

    plain = torch.ones(2)
    assert full_tensor(plain) is plain and full_tensor(Sharded()) == "whole"


def test_state_views_round_trip_model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    model_state, optim_state = full_state(model, optimizer)
    assert model_state.keys() == model.state_dict().keys()
    assert StateView(model, optimizer, "model", model_state).state_dict() is model_state

    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    StateView(fresh, fresh_optimizer, "model").load_state_dict(model_state)
    for mine, theirs in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert fresh_optimizer.state_dict()["state"] == {}  # the model part leaves the optimizer
    StateView(fresh, fresh_optimizer, "optimizer").load_state_dict(optim_state)
    loaded, saved = fresh_optimizer.state_dict(), optimizer.state_dict()
    # the loaded groups hold betas as a list (from the saved state), AdamW's own a tuple
    groups = [{**g, "betas": tuple(g["betas"])} for g in loaded["param_groups"]]
    assert groups == saved["param_groups"]
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["state"][i][key], value), (i, key)


def test_setup_on_gpus_picks_the_local_device_and_nccl(group, monkeypatch):
    seen, _ = group
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert setup_distributed() == Dist(0, 1, 0, torch.device("cuda", 0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert setup_distributed() == Dist(3, 2, 1, torch.device("cuda", 1))
    assert devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert seen == [("init", "nccl")]


def test_full_state_of_a_sharded_model_is_whole(monkeypatch):
    # FSDP2 over a real (one-process, gloo) group: the parameters are DTensors, the state a
    # checkpoint gets is plain tensors with the model's values.
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        fully_shard(model[0])
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        assert isinstance(model[0].weight, DTensor)
        model_state, optim_state = full_state(model, optimizer)
        for name, value in model_state.items():
            assert type(value) is torch.Tensor and value.device.type == "cpu", name
            assert torch.equal(value, model.state_dict()[name].full_tensor()), name
        for state in optim_state["state"].values():
            assert type(state["exp_avg"]) is torch.Tensor
    finally:
        teardown()
    assert not dist.is_initialized()


def _sharded_pair():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    fully_shard(model[0])
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _resume_sharded(rank: int, folder: Path, world: int = 2):
    store = dist.FileStore(str(folder / "store"), world)
    timeout = datetime.timedelta(seconds=60)  # a rank that failed leaves the other waiting
    dist.init_process_group("gloo", rank=rank, world_size=world, store=store, timeout=timeout)
    saved = folder / "state.pt"
    try:
        model, optimizer = _sharded_pair()
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        model_state, optim_state = full_state(model, optimizer)
        if rank == 0:
            torch.save({"model": model_state, "optimizer": optim_state}, saved)
        dist.barrier()
        # What a resumed run does: every rank reads the whole checkpoint into its fresh shards.
        fresh, fresh_optimizer = _sharded_pair()
        loaded = torch.load(saved, weights_only=False)  # sharded in place as it loads
        StateView(fresh, fresh_optimizer, "model").load_state_dict(loaded["model"])
        StateView(fresh, fresh_optimizer, "optimizer").load_state_dict(loaded["optimizer"])
        state = torch.load(saved, weights_only=False)
        for name, value in fresh.state_dict().items():
            assert value.to_local().shape[0] == value.shape[0] // world, name  # half each
            assert torch.equal(value.full_tensor(), state["model"][name]), name
        x = torch.randn(5, 3)
        for net, adamw in (model, optimizer), (fresh, fresh_optimizer):  # the next step, either
            adamw.zero_grad()
            net(x).square().sum().backward()
            adamw.step()
        for mine, theirs in zip(fresh.parameters(), model.parameters(), strict=True):
            assert torch.equal(mine.full_tensor(), theirs.full_tensor())
    finally:
        teardown()


def test_a_whole_checkpoint_loads_into_two_ranks_shards(tmp_path):
    # Each rank holds half of every weight; the checkpoint holds them whole (full_state), so
    # loading must shard it again, as resuming an FSDP pretraining run does. Rank 0 runs in this
    # process, where mutmut sees what the test reaches; rank 1 in a forked one.
    other = multiprocessing.get_context("fork").Process(target=_resume_sharded, args=(1, tmp_path))
    other.start()
    try:
        _resume_sharded(0, tmp_path)
    finally:
        other.join(90)
        if other.is_alive():
            other.kill()
    assert other.exitcode == 0
