"""The FLOP cost model of depth adaptation (odeify.train.cost) and the steps a budget buys."""

import math
import re

import pytest

import odeify
from odeify.train.cost import CostModel, steps_for_budget
from odeify.train.sampler import StepSampler


def test_cost_model_and_budget(make_llama):
    stock = make_llama(num_hidden_layers=4)
    layer = sum(p.numel() for p in stock.model.layers[0].parameters())
    cost = CostModel.of(odeify.odeify(stock, progress=False))
    assert (cost.layer_params, cost.head_params, cost.num_layers) == (layer, 97 * 32, 4)
    assert cost.train_step(10, [4]) == 4 * cost.forward(10, 4)
    sampler = StepSampler(4, 2, 8, seed=0)
    steps, spent = steps_for_budget(1e7, 10, cost, sampler.draw)
    assert spent <= 1e7 < spent + cost.train_step(10, sampler.draw(steps))
    assert spent == sum(cost.train_step(10, sampler.draw(s)) for s in range(steps))
    with pytest.raises(ValueError, match="budget"):
        steps_for_budget(0, 10, cost, sampler.draw)


def test_cost_of_a_compressed_block_and_a_headless_model(make_llama, make_gpt2):
    stock = make_llama(num_hidden_layers=4)
    layer = sum(p.numel() for p in stock.model.layers[0].parameters())
    # K = 2 of L = 4: the block holds 2 coefficient sets, one layer's worth each
    cost = CostModel.of(odeify.odeify(stock, basis="legendre", num_basis=2, progress=False), 2.0)
    assert (cost.layer_params, cost.num_layers, cost.train_factor) == (layer, 4, 2.0)
    assert type(cost.layer_params) is int  # a count, as the field says (reports print it)
    headless = odeify.odeify(make_gpt2().transformer, progress=False)
    assert CostModel.of(headless).head_params == 0


def test_cost_formulas_against_known_values():
    cost = CostModel(layer_params=10, head_params=5, num_layers=4)
    assert cost.forward(tokens=3, steps=2) == 2.0 * 3 * (2 * 10 + 5) == 150.0
    # teacher at L = 4: 2 * (40 + 5) = 90; students at 4 and 2: 3 * (90 + 50)
    assert cost.train_step(tokens=1, counts=[4, 2]) == 90.0 + 3 * 90.0 + 3 * 50.0
    frozen = CostModel(layer_params=10, head_params=5, num_layers=4, train_factor=2.0)
    assert frozen.train_step(tokens=1, counts=[2]) == 90.0 + 2 * 50.0
    assert cost.train_step(tokens=1, counts=[]) == 90.0


def test_steps_for_budget_edges():
    cost = CostModel(layer_params=10, head_params=0, num_layers=2)  # every step costs 160
    one = lambda step: [2]  # noqa: E731
    assert steps_for_budget(480.0, 1, cost, one) == (3, 480.0)  # a step that lands on it fits
    assert steps_for_budget(479.0, 1, cost, one) == (2, 320.0)
    assert steps_for_budget(1.0, 1, cost, one) == (1, 160.0)  # at least one step
    assert steps_for_budget(1e9, 1, cost, one, limit=5) == (5, 800.0)
    assert steps_for_budget(1e9, 1, cost, one, limit=1) == (1, 160.0)
    growing = lambda step: [2] * (step + 1)  # noqa: E731
    # teacher 40 + 120 per count: 160, 280, 400, ... summed 160, 440, 840
    assert steps_for_budget(840.0, 1, cost, growing) == (3, 840.0)
    for bad in (0, -1.0, math.nan):
        message = f"the FLOP budget must be > 0, got {bad}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            steps_for_budget(bad, 1, cost, one)
