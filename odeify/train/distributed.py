"""One process, or the process group torchrun starts: DDP or FSDP2 around the model, gradients
reduced on the last micro-batch only, and full (unsharded) state views for checkpoints.

Under torchrun each rank takes rows ``rank::world`` of every global batch
(:meth:`odeify.train.data.Batches.get`), so a loss curve does not depend on the number of
processes; rank 0 writes the checkpoints, metrics and reports.

Example:
    >>> ctx = setup_distributed()                  # one process: no torchrun around it
    >>> ctx.rank, ctx.world, ctx.main
    (0, 1, True)
    >>> wrap(model.to(ctx.device), ctx) is model   # nothing to wrap in one process
    True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """Where this process stands: its rank, the world size, its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first, then on the others: rank 0 writes a cache (tokens)
        that the others then read, never racing on a file."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def setup_distributed() -> Dist:
    """One process, or the process group torchrun describes: NCCL on GPUs, gloo on CPUs.

    Example:
        >>> setup_distributed().world
        1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, local_rank, device)


def teardown() -> None:
    """Destroy the process group, if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(
    model: nn.Module,
    ctx: Dist,
    shard: list[nn.Module] | None = None,
    compile: bool = False,
) -> nn.Module:
    """The model a training loop calls: compiled (in place, so state_dict keys stay those of the
    plain model), and when distributed under DDP, or FSDP2 with one shard group per module in
    ``shard`` and one for the rest.

    Example:
        >>> ctx = setup_distributed()
        >>> wrapped = wrap(model, ctx, shard=[odeify.get_block(model)])
        >>> wrapped is model, ctx.world   # FSDP2 shards only with more than one process
        (True, 1)
    """
    if compile:
        model.compile()
    if ctx.world == 1:
        return model
    if shard is not None:
        from torch.distributed.fsdp import fully_shard

        for module in shard:
            fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
    )


@contextlib.contextmanager
def sync(model: nn.Module, last: bool) -> Iterator[None]:
    """Reduce gradients on the last micro-batch (or backward) of an accumulation only.

    Example:
        >>> accum = 2
        >>> for j in range(accum):
        ...     with sync(model, last=j == accum - 1):
        ...         model(ids, labels=ids).loss.backward()
        >>> model.lm_head.weight.grad.shape
        torch.Size([97, 32])
    """
    if last:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole; any other tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class StateView:
    """Full (unsharded) model or optimizer state for :class:`odeify.train.checkpoints.Checkpoints`,
    under any wrapping.

    torch.distributed.checkpoint's state-dict functions see through DDP, FSDP2 and compile,
    and key optimizer state by parameter name, so one file resumes any of them.

    Example:
        >>> from odeify.train.checkpoints import Checkpoints
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> ckpt, step = Checkpoints("runs/x", config={}), 10
        >>> model_state, optim_state = full_state(model, optimizer)
        >>> _ = ckpt.save(step, StateView(model, optimizer, "model", model_state),
        ...               StateView(model, optimizer, "optimizer", optim_state))
        >>> views = [StateView(model, optimizer, part) for part in ("model", "optimizer")]
        >>> ckpt.resume(*views)   # loads the saved state back into model and optimizer
        (10, {})
    """

    def __init__(self, model: nn.Module, optimizer, part: str, saved: dict | None = None):
        self.model, self.optimizer, self.part, self.saved = model, optimizer, part, saved

    def state_dict(self) -> dict:
        return self.saved

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        if self.part == "model":
            set_model_state_dict(self.model, state, options=options)
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state, options=options)


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state gathered on rank 0 (a collective: every rank calls it).

    Example:
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> model_state, optim_state = full_state(model, optimizer)
        >>> model_state.keys() == model.state_dict().keys(), sorted(optim_state)
        (True, ['param_groups', 'state'])
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
