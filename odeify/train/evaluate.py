"""Next-token loss of a model over token windows at several solver step counts, in one pass over
the windows: optionally against a teacher (KL, and the teacher's own loss), under autocast, and
split over the ranks of a distributed run."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..api import get_block
from ..api import steps as at_steps
from ..surgery import is_odeified


@dataclass
class Scores:
    """Mean next-token loss (nats) per step count over ``tokens`` predicted tokens; with a
    teacher, the mean KL(teacher || model) per step count and the teacher's own loss."""

    tokens: int
    loss: dict[int, float]
    kl: dict[int, float] | None = None
    teacher_loss: float | None = None

    def perplexity(self) -> dict[int, float]:
        """{steps: exp(loss)}.

        Example:
            >>> Scores(10, {4: 0.0}).perplexity()
            {4: 1.0}
        """
        return {n: math.exp(v) for n, v in self.loss.items()}


def _logits(model, batch: Tensor, shifted: bool, **kwargs) -> Tensor:
    # shifted: the window's last token is only a target, so the model reads one token less (a
    # window of context + 1 tokens fits a model of that context).
    logits = model(batch[:, :-1] if shifted else batch, use_cache=False, **kwargs).logits
    return logits if shifted else logits[:, :-1]


def _log_probs(logits: Tensor) -> Tensor:
    return logits.float().log_softmax(-1).flatten(0, 1)


@torch.no_grad()
def sweep(
    model: nn.Module,
    windows: Tensor,
    counts: Sequence[int | None],
    batch_size: int = 4,
    *,
    scheme: str | None = None,
    teacher: nn.Module | None = None,
    shifted: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    dist=None,
    progress: bool = False,
    desc: str = "evaluate",
) -> Scores:
    """Score ``model`` on every window of a [n, T] token tensor at each step count in ``counts``
    (``None``, or any count for a model that is not odeified: the model as it is), in eval mode,
    the mode restored after.

    ``teacher`` (an odeified model, run once per batch at its depth) adds the KL and its own
    loss. ``dist`` (:class:`odeify.train.distributed.Dist`) splits the windows over ranks in
    contiguous shares and sums the scores of all ranks; a sharded (FSDP) model needs shares of
    one size, so its caller passes a multiple of the world size of windows.

    Example:
        >>> from odeify.train.data import windows
        >>> tokens = torch.randint(0, 97, (128,)).numpy()
        >>> scores = sweep(model, windows(tokens, 32), [2, 4])
        >>> scores.tokens, {n: round(p) for n, p in scores.perplexity().items()}  # untrained
        (124, {2: 98, 4: 98})
        >>> with_teacher = sweep(model, windows(tokens, 32), [2, 4], teacher=model)
        >>> {n: round(kl, 4) for n, kl in with_teacher.kl.items()}   # 0 at the teacher's depth
        {2: 0.0007, 4: 0.0}
    """
    device = next(model.parameters()).device
    if dist is not None:
        windows = windows.tensor_split(dist.world)[dist.rank]
    # Sums over tokens in Python floats (double), every key from the start: each rank reduces
    # the same keys in the same order, also one with no windows.
    totals: dict = {("nll", n): 0.0 for n in counts}
    if teacher is not None:
        totals.update({("kl", n): 0.0 for n in counts}, teacher=0.0)
    totals["tokens"] = 0
    training = model.training
    model.eval()
    starts = range(0, len(windows), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        for key, value in _batch_sums(model, batch, counts, teacher, shifted, scheme, autocast):
            totals[key] += value
    model.train(training)
    if dist is not None and dist.world > 1:
        summed = dist.sum(torch.tensor(list(totals.values()), dtype=torch.float64, device=device))
        totals = dict(zip(totals, summed.tolist(), strict=True))
    tokens = int(totals["tokens"])
    return Scores(
        tokens,
        {n: totals[("nll", n)] / tokens for n in counts},
        {n: totals[("kl", n)] / tokens for n in counts} if teacher is not None else None,
        totals["teacher"] / tokens if teacher is not None else None,
    )


def _batch_sums(model, batch: Tensor, counts, teacher, shifted, scheme, autocast):
    """(key, summed value) of one batch: the model's NLL at each count, with a teacher its NLL
    and the KL at each count, and the number of predicted tokens."""
    targets = batch[:, 1:].reshape(-1)
    autocast = autocast or contextlib.nullcontext
    ode = is_odeified(model)
    if teacher is not None:
        layers = get_block(teacher).ode.num_layers
        log_p = _log_probs(_logits(teacher, batch, shifted, ode_steps=layers))
        yield "teacher", F.nll_loss(log_p, targets, reduction="sum").item()
    for n in counts:
        with at_steps(model, n, scheme) if ode and n else contextlib.nullcontext(), autocast():
            logits = _logits(model, batch, shifted)
        log_q = _log_probs(logits)
        yield ("nll", n), F.nll_loss(log_q, targets, reduction="sum").item()
        if teacher is not None:
            yield ("kl", n), F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
    yield "tokens", targets.numel()
