"""The parallel plans of odeified models describe the ODE block: the tensor-parallel plan names
its basis tensors (each sharded along the dimension of the linear it replaces) and nothing that
no longer exists, a model sharded by it computes what the whole model computes (two gloo
processes on the CPU), and ``device_map="auto"`` keeps the block on one device."""

import tempfile

import pytest
import torch
import torch.distributed as dist
from _launch import fork, join
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes
from transformers.distributed.parallel_utils import _get_parameter_plan

import odeify
from odeify.models import tp_plan

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _converted(make_llama, model_type):
    stock = make_llama(model_type)
    return stock, odeify.odeify(stock.__class__(stock.config), progress=False)


def _matches(model, key) -> bool:
    # How transformers resolves a plan key (a parameter or its module, `*` for layer numbers).
    plan = {key: "found"}
    return any(
        _get_parameter_plan(name, plan, is_weight=True) for name, _ in model.named_parameters()
    ) or any(_get_parameter_plan(name, plan, is_weight=False) for name, _ in model.named_modules())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_plan_key_names_a_basis_tensor_of_the_converted_model(make_llama, model_type):
    stock, model = _converted(make_llama, model_type)
    assert model.tp_plan, "the odeified model has no TP plan"
    for key in model.tp_plan:
        assert _matches(model, key), f"{key} matches nothing in {type(model).__name__}"
    # the stock plan's layer keys name modules the conversion removed
    stale = [k for k in stock.tp_plan if ".layers.*." in k]
    assert stale and not any(_matches(model, k) for k in stale)
    # every stock linear of the plan is there, as its basis tensor, with the stock style
    for key, style in stock.tp_plan.items():
        if ".layers.*." in key and not key.endswith("_norm"):
            ode_key = key.replace(".layers.*.", ".layers.*.basis.") + ".weight"
            assert model.tp_plan[ode_key] == style


def test_gpt2_has_no_plan_as_the_stock_model(make_gpt2):
    stock = make_gpt2()
    assert stock.config.base_model_tp_plan is None
    assert odeify.odeify(stock, progress=False).config.base_model_tp_plan is None


@pytest.fixture
def one_rank_mesh():
    # A real process group of one rank (gloo, on the CPU): transformers' TP styles shard through
    # DTensor, whose placements say which dimension each rank would get a slice of.
    from torch.distributed.device_mesh import init_device_mesh

    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        try:
            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()


def test_the_basis_shards_along_the_dimension_of_the_layer_it_replaces(make_llama, one_rank_mesh):
    from torch.distributed.tensor import Shard
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    stock = make_llama("qwen3")
    model = odeify.odeify(stock.__class__(stock.config), progress=False)
    for m in (stock, model):
        apply_tensor_parallelism(m, one_rank_mesh, m._expand_parallel_plan(m.tp_plan))
    stock_params = dict(stock.named_parameters())
    sharded = 0
    for name, basis in model.named_parameters():
        if ".basis." not in name or not hasattr(basis, "placements"):
            continue
        # model.layers.0.basis.<module>.weight [K, out, in] <-> model.layers.<l>.<module>.weight
        layer = stock_params[name.replace(".layers.0.basis.", ".layers.0.")]
        (placement,) = basis.placements
        (stock_placement,) = layer.placements
        assert isinstance(placement, Shard) and basis.dim() == layer.dim() + 1
        assert placement.dim == stock_placement.dim + 1, name  # the same axis, after K
        sharded += 1
    assert sharded == 7  # q, k, v, o, gate, up, down


def test_device_map_auto_keeps_the_ode_block_whole(make_llama):
    model = odeify.odeify(make_llama(), progress=False)
    assert model._no_split_modules == {"ODEBlock"}
    assert {type(m).__name__ for m in model.modules()} >= model._no_split_modules
    sizes = compute_module_sizes(model)
    # Room on the first device for less than the block: it goes elsewhere whole, never in parts.
    budget = {"cpu": sizes["model.layers.0"] // 2, "disk": 10 * sizes[""]}
    whole = infer_auto_device_map(
        model, max_memory=budget, no_split_module_classes=list(model._no_split_modules)
    )
    assert not any(key.startswith("model.layers.0.") for key in whole), whole
    split = infer_auto_device_map(model, max_memory=budget)  # the same without the declaration
    assert any(key.startswith("model.layers.0.") for key in split)


def test_the_plan_function_maps_the_stock_linears():
    from transformers import LlamaConfig, Qwen3Config

    assert tp_plan(LlamaConfig) == {
        f"layers.*.basis.{module}.weight": style
        for module, style in (
            ("self_attn.q_proj", "colwise"),
            ("self_attn.k_proj", "colwise"),
            ("self_attn.v_proj", "colwise"),
            ("self_attn.o_proj", "rowwise"),
            ("mlp.gate_proj", "colwise"),
            ("mlp.up_proj", "colwise"),
            ("mlp.down_proj", "rowwise"),
        )
    }
    # Qwen3's q/k norms: replicated (no entry), as their basis has no forward to hook
    assert tp_plan(Qwen3Config) == tp_plan(LlamaConfig)


def _sharded_run(args):
    """One rank of a two-process run: the whole model's logits and gradients, then the model
    sharded by its plan must give the same (each rank's gradient shards gathered)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    model_type, make_llama = args  # forked: the fixture's builder itself, not pickled
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)  # every rank builds the same model
        model = odeify.odeify(make_llama(model_type), progress=False).train()
        ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
        whole = model(ids, labels=ids)
        whole.loss.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        apply_tensor_parallelism(model, mesh, model._expand_parallel_plan(model.tp_plan))
        basis = model.model.layers[0].basis.self_attn.q_proj.weight
        assert isinstance(basis, DTensor) and basis.to_local().shape[1] == basis.shape[1] // 2
        sharded = model(ids, labels=ids)
        sharded.loss.backward()
        torch.testing.assert_close(sharded.logits, whole.logits.detach())
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            torch.testing.assert_close(grad, expected[name], msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_a_model_sharded_by_its_plan_computes_what_the_whole_model_does(make_llama, model_type):
    # The plan shards how the basis is stored (each rank holds 1 / ranks of the sharded
    # tensors); the block gathers them for its forward, so every rank computes the whole block.
    join(fork(_sharded_run, [model_type, make_llama], world=2))
