"""Depth-adaptation distillation (odeify.train.distill) on tiny models: the matched hidden
states, the loss against an independent computation of each term, the gradient shares of a
step, the teacher's checks, distillation lowering the loss away from N = L while N = L stays
close to the original, and the layer-dropping baseline."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

import odeify
from odeify.schedule import Schedule
from odeify.train.distill import (
    LossWeights,
    _autocast,
    adapt_step,
    distill_loss,
    drop_layers,
    frozen_teacher,
    matching,
    recording,
    teacher_targets,
)
from odeify.train.evaluate import sweep
from odeify.train.sampler import StepSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def test_matching_pairs_where_the_grids_meet():
    assert matching(15, 30) == [(j, 2 * j) for j in range(1, 16)]
    assert matching(20, 30) == [(j, 3 * j // 2) for j in range(2, 21, 2)]
    assert matching(60, 30) == [(j, j // 2) for j in range(2, 61, 2)]
    assert matching(7, 30) == [(7, 30)]  # every grid ends where the teacher ends


def test_recording_gives_the_state_after_each_step(make_llama):
    stock = make_llama(num_hidden_layers=4)
    ids = torch.randint(1, 97, (2, 8))
    after = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, out: after.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in stock.model.layers
    ]
    with torch.no_grad():
        stock(ids, use_cache=False)
    for h in hooks:
        h.remove()
    model = odeify.odeify(copy.deepcopy(stock), progress=False)
    block = odeify.get_block(model)
    with torch.no_grad(), recording(model) as states:
        model(ids, use_cache=False)
    assert len(states) == 4
    for mine, theirs in zip(states, after, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    with torch.no_grad(), recording(model) as states:
        model(ids, use_cache=False, ode_steps=7)
    assert len(states) == 7
    assert "step" not in block.__dict__  # the block's own step is back


def test_teacher_must_be_exact(make_llama):
    smooth = odeify.odeify(
        make_llama(num_hidden_layers=4), basis="legendre", num_basis=2, progress=False
    )
    with pytest.raises(ValueError, match="exact at N = L"):
        frozen_teacher(smooth)
    teacher = frozen_teacher(make_llama(num_hidden_layers=4))
    assert not any(p.requires_grad for p in teacher.parameters())


def _student_and_teacher(make_llama, layers=4):
    stock = make_llama(num_hidden_layers=layers)
    teacher = frozen_teacher(stock)
    student = odeify.odeify(stock, progress=False).train()
    block = odeify.get_block(student)
    for p in student.parameters():
        p.requires_grad_(any(p is block.basis_tensor(n) for n in block.names))
    return student, teacher


def evaluate_depths(student, teacher, windows, counts) -> dict:
    """Perplexity and KL from the teacher at each step count, and the teacher's perplexity."""
    scores = sweep(student, windows, counts, teacher=teacher)
    steps = {n: {"perplexity": math.exp(scores.loss[n]), "kl": scores.kl[n]} for n in counts}
    return {"original": math.exp(scores.teacher_loss), "steps": steps}


def _train(student, teacher, sampler, weights, steps, lr=1e-3):
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(step))
        labels = torch.roll(ids, -1, dims=1)
        targets = teacher_targets(teacher, ids, weights)
        adapt_step(student, targets, ids, labels, sampler.draw(step), weights)
        optimizer.step()
        optimizer.zero_grad()


def test_distillation_lowers_the_loss_away_from_L_and_keeps_L_close(make_llama):
    student, teacher = _student_and_teacher(make_llama)
    free = copy.deepcopy(student)
    held = torch.randint(1, 97, (8, 12), generator=torch.Generator().manual_seed(99))
    before = evaluate_depths(student, teacher, held, [2, 4])["steps"]
    assert before[4]["kl"] < 1e-10 and before[2]["kl"] > 0.05  # exact at L, far at L / 2
    weights = LossWeights(kl=1.0, hidden=1.0)
    _train(student, teacher, StepSampler(4, 2, 8, seed=0), weights, steps=25)
    _train(free, teacher, StepSampler(4, 2, 8, full_every=0, seed=0), weights, steps=25)
    after = evaluate_depths(student, teacher, held, [2, 4])
    unanchored = evaluate_depths(free, teacher, held, [2, 4])["steps"]
    assert after["steps"][2]["kl"] < 0.5 * before[2]["kl"]
    # N = L stays within tolerance: KL under 0.01 nats/token, perplexity within 2 %
    assert after["steps"][4]["kl"] < 0.01
    assert abs(after["steps"][4]["perplexity"] / after["original"] - 1) < 0.02
    assert after["steps"][4]["kl"] < 0.75 * unanchored[4]["kl"]  # the anchor holds L closer


def test_distill_loss_parts_and_weights(make_llama):
    student, teacher = _student_and_teacher(make_llama)
    ids = torch.randint(1, 97, (2, 10))
    labels = torch.roll(ids, -1, dims=1)
    weights = LossWeights(kl=1.0, lm=0.5, hidden=2.0)
    loss, parts = distill_loss(
        student, ids, labels, teacher_targets(teacher, ids, weights), 4, weights
    )
    assert set(parts) == {"kl", "lm", "hidden", "loss"}
    assert parts["kl"] == pytest.approx(0, abs=1e-6) and parts["hidden"] == pytest.approx(
        0, abs=1e-10
    )
    assert parts["loss"] == pytest.approx(0.5 * parts["lm"], rel=1e-5)
    no_states = teacher_targets(teacher, ids, LossWeights())
    with pytest.raises(ValueError, match="hidden > 0"):
        distill_loss(student, ids, labels, no_states, 2, weights)
    with pytest.raises(ValueError, match="not all zero"):
        LossWeights(kl=0.0)


def test_drop_layers_keeps_the_layer_at_or_before_each_grid_time(make_llama):
    stock = make_llama(num_hidden_layers=4)
    ids = torch.randint(1, 97, (2, 8))
    half = drop_layers(stock, 2)
    ode = odeify.odeify(copy.deepcopy(stock), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(
            half(ids, use_cache=False).logits,
            odeify.materialize(ode, 2)(ids, use_cache=False).logits,
            rtol=0,
            atol=1e-5,
        )
    three = drop_layers(stock, 3)  # layers floor(4 i / 3) = 0, 1, 2, output projections x 4/3
    for i, layer in enumerate(three.model.layers):
        source = stock.model.layers[i]
        torch.testing.assert_close(layer.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
        torch.testing.assert_close(layer.mlp.down_proj.weight, source.mlp.down_proj.weight * 4 / 3)
    with pytest.raises(ValueError, match="keep must be"):
        drop_layers(stock, 5)
    with pytest.raises(ValueError, match="stock"):
        drop_layers(ode, 2)


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            dict(kl=-1.0),
            "loss weights must be >= 0 and not all zero, got kl=-1.0, lm=0.0, hidden=0.0",
        ),
        (
            dict(lm=-0.5),
            "loss weights must be >= 0 and not all zero, got kl=1.0, lm=-0.5, hidden=0.0",
        ),
        (
            dict(kl=0.0),
            "loss weights must be >= 0 and not all zero, got kl=0.0, lm=0.0, hidden=0.0",
        ),
        (
            dict(hidden=-2.0),  # a sum of -1: refused for the negative weight alone
            "loss weights must be >= 0 and not all zero, got kl=1.0, lm=0.0, hidden=-2.0",
        ),
        (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
        (dict(temperature=-2.0), "temperature must be > 0, got -2.0"),
    ],
)
def test_loss_weights_refusals(settings, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LossWeights(**settings)


@pytest.mark.parametrize(
    "settings", [dict(kl=0.0, lm=1.0), dict(kl=0.0, hidden=0.5), dict(kl=1.0, lm=1.0)]
)
def test_loss_weights_one_term_is_enough(settings):
    weights = LossWeights(**settings)
    assert weights.needs_states == (settings.get("hidden", 0) > 0)


def _normalised_here(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)


def test_distill_loss_equals_its_definition_term_by_term(make_llama):
    student, teacher = _student_and_teacher(make_llama)
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, dims=1)
    weights = LossWeights(kl=0.7, lm=0.3, hidden=1.5, temperature=3.0)
    with torch.no_grad():
        with recording(teacher) as theirs:
            p = teacher(ids, use_cache=False, ode_steps=4).logits
        with recording(student) as mine:
            q = student(ids, use_cache=False, ode_steps=2).logits
    log_p, log_q = (p / 3.0).log_softmax(-1), (q / 3.0).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum() / labels.numel() * 3.0**2
    lm = F.cross_entropy(q.flatten(0, 1), labels.flatten())
    # matching(2, 4): student step 1 ends at t = 1 / 2, where teacher layer 2 ends; step 2 at 1.
    hidden = (
        sum(
            (_normalised_here(mine[j]) - _normalised_here(theirs[layer])).pow(2).mean()
            for j, layer in [(0, 1), (1, 3)]
        )
        / 2
    )
    targets = teacher_targets(teacher, ids, weights)
    loss, parts = distill_loss(student, ids, labels, targets, 2, weights)
    # float32 sums over 2 x 10 x 97 terms: agreement to a few float32 roundings
    assert parts["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert parts["lm"] == pytest.approx(float(lm), rel=1e-6)
    assert parts["hidden"] == pytest.approx(float(hidden), rel=1e-5)
    expected = 0.7 * parts["kl"] + 0.3 * parts["lm"] + 1.5 * parts["hidden"]
    assert parts["loss"] == pytest.approx(expected, rel=1e-6)
    assert float(loss.detach()) == parts["loss"] and loss.requires_grad


def test_hidden_matching_takes_a_uniform_schedule_only(make_llama):
    student, teacher = _student_and_teacher(make_llama)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, dims=1)
    weights = LossWeights(hidden=1.0)
    targets = teacher_targets(teacher, ids, weights)
    _, plain = distill_loss(student, ids, labels, targets, 2, weights)
    _, uniform = distill_loss(
        student, ids, labels, targets, 2, weights, schedule=Schedule.uniform(2, 4)
    )
    assert uniform == plain
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "hidden-state matching pairs the uniform grid's step ends with the teacher's layers; "
            "a calibrated schedule's steps end elsewhere. Set hidden: 0"
        )
        + "$",
    ):
        distill_loss(
            student, ids, labels, targets, 2, weights, schedule=Schedule.from_layers([0, 1], 4)
        )
    without = teacher_targets(teacher, ids, LossWeights())
    message = "hidden-state matching needs teacher_targets(..., weights) with hidden > 0"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        distill_loss(student, ids, labels, without, 2, weights)


def _grads(student):
    return [p.grad.clone() for p in student.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "counts,full_weight,shares",
    [
        ([4, 2, 3], 0.5, [0.5, 0.5, 0.5]),
        ([4, 4, 2], 1.0, [0.5, 0.5, 1.0]),
        ([2, 3], 2.0, [0.5] * 2),
        ([4, 2], None, [1.0, 1.0]),  # the default: the anchor weighs 1
    ],
)
def test_adapt_step_weights_the_anchor_and_shares_the_rest(make_llama, counts, full_weight, shares):
    student, teacher = _student_and_teacher(make_llama)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(5))
    labels = torch.roll(ids, -1, dims=1)
    weights = LossWeights(kl=1.0, lm=0.1)
    targets = teacher_targets(teacher, ids, weights)
    trained = [p for p in student.parameters() if p.requires_grad]
    expected, reports = [torch.zeros_like(p) for p in trained], []
    for n, share in zip(counts, shares, strict=True):
        loss, parts = distill_loss(student, ids, labels, targets, n, weights)
        for total, g in zip(expected, torch.autograd.grad(loss * share, trained), strict=True):
            total += g
        reports.append({"steps": n, **parts})
    given = {} if full_weight is None else {"full_weight": full_weight}
    got = adapt_step(student, targets, ids, labels, counts, weights, **given)
    assert got == reports
    for g, want in zip(_grads(student), expected, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-8)  # summed in another order


def test_adapt_step_runs_each_count_on_its_schedule(make_llama):
    student, teacher = _student_and_teacher(make_llama)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(6))
    labels = torch.roll(ids, -1, dims=1)
    targets = teacher_targets(teacher, ids)
    visit = Schedule.from_layers([0, 1], 4)  # layers 0 and 1 only: far from the uniform N = 2
    calls = []

    def schedules(n):
        calls.append(n)
        return visit if n == 2 else None

    reports = adapt_step(student, targets, ids, labels, [4, 2], schedules=schedules)
    assert calls == [4, 2]
    _, on_visit = distill_loss(student, ids, labels, targets, 2, schedule=visit)
    _, uniform = distill_loss(student, ids, labels, targets, 2)
    assert reports[1] == {"steps": 2, **on_visit} and on_visit != uniform
    with pytest.raises(ValueError, match="^adapt_step needs at least one step count$"):
        adapt_step(student, targets, ids, labels, [])


def test_teacher_refusal_in_full_and_an_exact_odeified_teacher(make_llama):
    stock = make_llama(num_hidden_layers=4)
    coarse = odeify.odeify(copy.deepcopy(stock), basis="hat", num_basis=2, progress=False)
    message = (
        "the teacher must be exact at N = L: give the original (stock) model, or one odeified "
        "with the hat basis and K = L (got basis='hat', K=2, L=4)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        frozen_teacher(coarse)
    exact = odeify.odeify(copy.deepcopy(stock), progress=False).train()
    teacher = frozen_teacher(exact)
    assert teacher is not exact and not teacher.training and exact.training
    assert all(p.requires_grad for p in exact.parameters())
    ids = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            teacher(ids, use_cache=False).logits,
            stock(ids, use_cache=False).logits,
            rtol=0,
            atol=1e-5,
        )


def test_autocast_context():
    with _autocast(None, torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with _autocast(torch.float16, torch.device("cpu")):  # not CPU autocast's default, bf16
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.float16


def test_loss_terms_are_only_those_weighted(make_llama):
    student, teacher = _student_and_teacher(make_llama)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(7))
    labels = torch.roll(ids, -1, dims=1)
    for weights, names in ((LossWeights(kl=0.0, lm=1.0), {"lm"}), (LossWeights(), {"kl"})):
        _, parts = distill_loss(student, ids, labels, teacher_targets(teacher, ids), 2, weights)
        assert set(parts) == names | {"loss"}


def test_distill_loss_and_adapt_step_under_autocast(make_llama):
    student, teacher = _student_and_teacher(make_llama)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(8))
    labels = torch.roll(ids, -1, dims=1)
    weights = LossWeights(kl=0.0, lm=1.0)
    targets = teacher_targets(teacher, ids, weights)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(ids, use_cache=False, ode_steps=2).logits
    lm = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).item()
    _, parts = distill_loss(student, ids, labels, targets, 2, weights, autocast=torch.bfloat16)
    assert parts["lm"] == lm  # the same bf16 forward, scored in float32
    _, plain = distill_loss(student, ids, labels, targets, 2, weights)
    assert abs(plain["lm"] - lm) > 1e-4  # bf16 rounding shows
    reports = adapt_step(student, targets, ids, labels, [2], weights, autocast=torch.bfloat16)
    assert reports == [{"steps": 2, **parts}]


def test_a_student_keeps_its_scheme_unless_given_a_schedule(make_llama):
    stock = make_llama(num_hidden_layers=4)
    teacher = frozen_teacher(stock)
    student = odeify.odeify(copy.deepcopy(stock), scheme="rk4", progress=False)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(9))
    labels = torch.roll(ids, -1, dims=1)
    weights = LossWeights(kl=0.0, lm=1.0)
    targets = teacher_targets(teacher, ids, weights)
    visit = Schedule.from_layers([0, 1], 4)
    for schedule, run in ((None, {}), (visit, {"ode_schedule": visit, "ode_scheme": "sequential"})):
        with torch.no_grad():
            logits = student(ids, use_cache=False, ode_steps=2, **run).logits
        lm = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
        _, parts = distill_loss(student, ids, labels, targets, 2, weights, schedule=schedule)
        assert parts["lm"] == pytest.approx(lm, rel=1e-6)
    with torch.no_grad():
        sequential = student(ids, use_cache=False, ode_steps=2, ode_scheme="sequential").logits
    assert not torch.allclose(sequential, logits)  # rk4 is not the sequential scheme here


def test_hidden_matching_follows_the_students_discrete_ends(make_llama):
    stock = make_llama(num_hidden_layers=4)
    teacher = frozen_teacher(stock)
    student = odeify.odeify(copy.deepcopy(stock), discrete_ends=1, progress=False)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(10))
    labels = torch.roll(ids, -1, dims=1)
    weights = LossWeights(kl=0.0, hidden=1.0)
    with torch.no_grad():
        with recording(teacher) as theirs:
            teacher(ids, use_cache=False, ode_steps=4)
        with recording(student) as mine:
            student(ids, use_cache=False, ode_steps=3)
    # N = 3 with one discrete step at each end: steps end at layers 1, 3 and 4
    assert matching(3, 4, ends=1) == [(1, 1), (2, 3), (3, 4)] != matching(3, 4)
    hidden = (
        sum(
            (_normalised_here(mine[j - 1]) - _normalised_here(theirs[layer - 1])).pow(2).mean()
            for j, layer in [(1, 1), (2, 3), (3, 4)]
        )
        / 3
    )
    targets = teacher_targets(teacher, ids, weights)
    _, parts = distill_loss(student, ids, labels, targets, 3, weights)
    assert parts["hidden"] == pytest.approx(hidden.item(), rel=1e-5)


def test_frozen_teacher_converts_quietly(make_llama, capsys):
    frozen_teacher(make_llama(num_hidden_layers=4))
    assert capsys.readouterr().err == ""
