"""The numbers odeify reports against the model's own loss: perplexity is exp of the loss
transformers computes, and a scheme asked of sweep() or `odeify eval --scheme` is the scheme
the numbers were computed with."""

import contextlib
import json
import math
import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from odeify import get_block, odeify, steps
from odeify.assets import gpt2_tokenizer
from odeify.cli import main
from odeify.evaluate import perplexity
from odeify.train.data import corpus, tokenize, windows
from odeify.train.evaluate import sweep

WINDOWS = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(0))


def _loss(model, ids, **kw) -> float:
    """transformers' mean next-token cross-entropy over the whole batch, one forward."""
    with torch.no_grad():
        return model(ids, labels=ids, use_cache=False, **kw).loss.item()


@pytest.fixture
def model(make_gpt2):
    return odeify(make_gpt2(), progress=False)


def test_perplexity_is_exp_of_the_models_loss(model, make_gpt2):
    # Windows of one length: the mean over batches of 2 (the last one short) is the mean over
    # all tokens, so log(perplexity) equals the one-forward loss, to float32 rounding of a mean
    # of ~60 token losses (rel 1e-6; compared as logs, since exp turns it into an absolute error).
    at_l = perplexity(model, WINDOWS, batch_size=2, progress=False)
    assert math.log(at_l) == pytest.approx(_loss(model, WINDOWS), rel=1e-6)
    stock = make_gpt2()
    assert math.log(perplexity(stock, WINDOWS, progress=False)) == pytest.approx(
        _loss(stock, WINDOWS), rel=1e-6
    )
    with steps(model, 2):  # the model as it is: its step count inside the context
        at_2 = perplexity(model, WINDOWS, progress=False)
    assert math.log(at_2) == pytest.approx(_loss(model, WINDOWS, ode_steps=2), rel=1e-6)
    assert abs(math.log(at_2) - math.log(at_l)) > 1e-2


@pytest.mark.parametrize("scheme", ["euler", "rk4"])
def test_sweep_runs_the_scheme_it_is_given(model, scheme):
    scores = sweep(model, WINDOWS, [2, 3], batch_size=2, scheme=scheme)
    for n in (2, 3):
        direct = _loss(model, WINDOWS, ode_steps=n, ode_scheme=scheme)
        assert scores.loss[n] == pytest.approx(direct, rel=1e-6)
    assert scores.tokens == WINDOWS.shape[0] * (WINDOWS.shape[1] - 1)


def test_sweeps_under_two_schemes_differ(model):
    euler = sweep(model, WINDOWS, [2], scheme="euler").loss[2]
    rk4 = sweep(model, WINDOWS, [2], scheme="rk4").loss[2]
    assert abs(euler - rk4) > 1e-3


@pytest.fixture
def converted(tmp_path):
    source = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=64)).save_pretrained(
        source
    )
    gpt2_tokenizer().save_pretrained(source)
    assert main(["convert", str(source), str(tmp_path / "ode")]) == 0
    text = tmp_path / "text.txt"
    text.write_text("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar. " * 8)
    return tmp_path / "ode", text


def test_odeify_eval_scheme_is_the_scheme_of_its_numbers(converted, tmp_path, capsys):
    from odeify import from_pretrained

    folder, text = converted
    args = ["eval", str(folder), "--steps", "2", "--seq-len", "32", "--corpus", str(text)]
    reported = {}
    for scheme in ("euler", "rk4"):
        out = tmp_path / f"{scheme}.json"
        assert main([*args, "--scheme", scheme, "--json", str(out)]) == 0
        reported[scheme] = json.loads(out.read_text())["steps"]["2"]
    assert f"scheme {scheme}" in capsys.readouterr().out
    model = from_pretrained(folder)
    ids = windows(tokenize(corpus(str(text)), gpt2_tokenizer()), 32)
    for scheme, ppl in reported.items():
        direct = _loss(model, ids, ode_steps=2, ode_scheme=scheme)
        assert math.log(ppl) == pytest.approx(direct, rel=1e-6), scheme
    assert abs(reported["euler"] - reported["rk4"]) > 1e-3 * reported["rk4"]
    assert get_block(model).ode.scheme == "sequential"  # the saved default was not the one run


def test_converting_an_odeified_model_exits_2_with_one_line(converted, tmp_path, capsys):
    folder, _ = converted
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(folder), str(tmp_path / "again")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"odeify: error: {folder} is already odeified"
    assert not (tmp_path / "again").exists()


def _nll_and_log_probs(model, ids, **kw):
    with torch.no_grad():
        logits = model(ids, use_cache=False, **kw).logits[:, :-1].float()
    log_probs = logits.log_softmax(-1).flatten(0, 1)
    targets = ids[:, 1:].reshape(-1)
    return -log_probs[torch.arange(len(targets)), targets].sum().item(), log_probs


def test_sweep_against_a_teacher_equals_the_direct_sums(model, make_gpt2):
    # The teacher's own default is 2 steps: sweep runs it at its depth, L = 4, all the same.
    teacher = odeify(make_gpt2(), steps=2, progress=False)
    scores = sweep(model, WINDOWS, [2, None], batch_size=2, teacher=teacher)
    tokens = WINDOWS.shape[0] * (WINDOWS.shape[1] - 1)
    assert scores.tokens == tokens
    teacher_nll, log_p = _nll_and_log_probs(teacher, WINDOWS, ode_steps=4)
    # Sums of float32 terms over 55 tokens in another order: relative 1e-5
    assert scores.teacher_loss == pytest.approx(teacher_nll / tokens, rel=1e-5)
    for n, run in ((2, {"ode_steps": 2}), (None, {})):  # None: the model as it is (N = L)
        nll, log_q = _nll_and_log_probs(model, WINDOWS, **run)
        kl = (log_p.exp() * (log_p - log_q)).sum().item()
        assert scores.loss[n] == pytest.approx(nll / tokens, rel=1e-5)
        assert scores.kl[n] == pytest.approx(kl / tokens, rel=1e-5)
    assert scores.kl[2] > 1e-3 and scores.loss[2] != scores.loss[None]


class _Recorder(torch.nn.Module):
    """A model that records what it is called with; its logits are bfloat16."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(97, 97)
        self.calls = []

    def forward(self, ids, **kwargs):
        self.calls.append((tuple(ids.shape), kwargs))
        return types.SimpleNamespace(logits=self.table(ids).to(torch.bfloat16))


@pytest.mark.parametrize("shifted", [False, True])
def test_sweep_of_a_stock_model_reads_windows_as_asked(shifted):
    recorder = _Recorder()
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(True)
        yield

    scores = sweep(recorder, WINDOWS, [2, 3], batch_size=4, shifted=shifted, autocast=autocast)
    width = WINDOWS.shape[1] - 1 if shifted else WINDOWS.shape[1]
    assert (
        recorder.calls
        == [((4, width), {"use_cache": False})] * 2 + [((1, width), {"use_cache": False})] * 2
    )  # any count: a stock model as it is
    assert len(entered) == 4
    with torch.no_grad():
        logits = recorder.table(WINDOWS[:, :-1]).to(torch.bfloat16).float()
    # the bfloat16 logits are scored in float32
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), WINDOWS[:, 1:].flatten())
    assert scores.loss[2] == scores.loss[3] == pytest.approx(nll.item(), rel=1e-6)
    assert scores.kl is None and scores.teacher_loss is None


def test_a_shifted_sweep_reads_one_token_less_with_a_teacher_too(make_gpt2):
    # Models of an 11-token context: the 12-token windows fit only shifted, teacher included.
    model = odeify(make_gpt2(n_positions=11), progress=False)
    teacher = odeify(make_gpt2(n_positions=11), progress=False)
    scores = sweep(model, WINDOWS, [2], teacher=teacher, shifted=True)
    with torch.no_grad():
        log_p = teacher(WINDOWS[:, :-1], use_cache=False).logits.log_softmax(-1).flatten(0, 1)
        log_q = model(WINDOWS[:, :-1], use_cache=False, ode_steps=2).logits
    log_q = log_q.log_softmax(-1).flatten(0, 1)
    targets = WINDOWS[:, 1:].reshape(-1)
    tokens = len(targets)
    rows = torch.arange(tokens)
    assert scores.teacher_loss == pytest.approx(
        -log_p[rows, targets].sum().item() / tokens, rel=1e-5
    )
    assert scores.loss[2] == pytest.approx(-log_q[rows, targets].sum().item() / tokens, rel=1e-5)
    kl = (log_p.exp() * (log_p - log_q)).sum().item() / tokens
    assert scores.kl[2] == pytest.approx(kl, rel=1e-5)
