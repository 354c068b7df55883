"""Test setup shared by every test module.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before
odeify (or anything that imports its kernels) is imported: Triton kernels then run on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny models run thousands of small ops: on a loaded 2-core machine OpenMP's spinning second
    thread makes them far slower, and one thread makes training runs bit-reproducible for the
    resume tests. The count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(
        n_layer=4,
        n_embd=32,
        n_head=4,
        vocab_size=97,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


_LLAMA_LIKE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def _llama(model_type="llama", **overrides):
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in _LLAMA_LIKE[model_type])
    config = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config.update(overrides)
    return model_cls(config_cls(**config)).eval()


def _perturb(model, scale=0.3):
    # Fresh inits make near-identical layers and tiny updates; larger random weights make every
    # layer matter, so a wrong layer order or a missed parameter shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, scale / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05)
    return model


@pytest.fixture
def make_gpt2():
    return lambda **kw: _perturb(_gpt2(**kw))


@pytest.fixture
def make_llama():
    return lambda model_type="llama", **kw: _perturb(_llama(model_type, **kw))
