"""Corpora, the token cache and deterministic batches used by the recipes and the CLI."""

import hashlib
import json
import re
import sys
import types

import numpy as np
import pytest
import torch

from odeify.assets import gpt2_tokenizer, plays
from odeify.train import data
from odeify.train.data import (
    Batches,
    Documents,
    Split,
    char_tokenizer,
    corpus,
    load_tokenizer,
    split,
    tokenize,
    windows,
)


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


class _Tokenizer:
    """A stand-in tokenizer: one id per character, of a vocabulary of ``size``; a BOS (id 1) in
    front only when asked for special tokens."""

    def __init__(self, size=300, eos=0):
        self.size, self.eos_token_id = size, eos

    def __len__(self):
        return self.size

    def get_vocab(self):
        return {f"t{i}": i for i in range(self.size)}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * add_special_tokens + [ord(c) for c in text]}


def _cache_name(tokenizer, docs, dtype):
    # The cache key from its definition: tokenizer class, size, EOS, the first 64 vocabulary
    # entries by token, then each document's name and text, NUL-terminated, by name.
    digest = hashlib.sha256()
    digest.update(f"_Tokenizer:{len(tokenizer)}:{tokenizer.eos_token_id}".encode())
    digest.update(repr(sorted(tokenizer.get_vocab().items())[:64]).encode())
    for name in sorted(docs):
        digest.update(name.encode() + b"\0" + docs[name].encode() + b"\0")
    return f"{digest.hexdigest()[:24]}.{dtype}"


@pytest.mark.parametrize("size,dtype", [(300, "uint16"), (65535, "uint16"), (65536, "uint32")])
def test_token_cache_file_and_contents(tmp_path, size, dtype):
    tokenizer, docs = _Tokenizer(size), {"b": "yz", "a": "x"}
    tokens = tokenize(docs, tokenizer, cache=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [_cache_name(tokenizer, docs, dtype)]
    assert tokens.dtype == np.dtype(dtype) and not tokens.flags.writeable
    assert tokens.tolist() == [ord("x"), 0, ord("y"), ord("z"), 0]  # by name, no BOS
    again = tokenize(docs, tokenizer, cache=tmp_path)
    assert again.dtype == np.dtype(dtype) and again.tolist() == tokens.tolist()
    assert not again.flags.writeable
    nested = tokenize(docs, tokenizer, cache=tmp_path / "a" / "b")  # folders made
    assert nested.tolist() == tokens.tolist()
    plain = tokenize(docs, _Tokenizer(size, eos=None), cache=None)
    assert type(plain) is np.ndarray and plain.tolist() == [ord("x"), ord("y"), ord("z")]


def test_no_documents_to_tokenize():
    with pytest.raises(ValueError, match="^no documents to tokenize$"):
        tokenize({}, _Tokenizer(), cache=None)


def test_windows_are_int64_and_cut_to_max_windows():
    tokens = np.arange(100, dtype=np.uint16)
    got = windows(tokens, 30)
    assert got.dtype == torch.int64 and got.tolist() == np.arange(90).reshape(3, 30).tolist()
    assert windows(tokens, 30, max_windows=5).shape == (3, 30)
    with pytest.raises(ValueError, match="^10 tokens make no window of 32$"):
        windows(np.arange(10, dtype=np.uint16), 32)


def test_char_tokenizer_vocabulary_and_round_trip(tmp_path):
    tok = char_tokenizer({"title": "to be"})  # the texts, not the names
    assert tok.get_vocab() == {
        "<|endoftext|>": 0,
        "<unk>": 1,
        " ": 2,
        "b": 3,
        "e": 4,
        "o": 5,
        "t": 6,
    }
    assert (tok.eos_token, tok.eos_token_id, tok.unk_token, tok.unk_token_id) == (
        "<|endoftext|>",
        0,
        "<unk>",
        1,
    )
    assert tok("bez")["input_ids"] == [3, 4, 1]  # an unseen character is <unk>
    assert tok.decode(tok("to be")["input_ids"]) == "to be"  # fused, no spaces between
    assert char_tokenizer(iter(["to", " be"])).get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"), {})
    assert loaded.get_vocab() == tok.get_vocab() and loaded("to be")["input_ids"] == [6, 5, 2, 3, 4]


def test_load_tokenizer_by_spec(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "gpt2_tokenizer", lambda: "the offline GPT-2")
    assert load_tokenizer("gpt2", {}) == "the offline GPT-2"
    (tmp_path / "a.txt").write_text("ab")
    from_docs = load_tokenizer("char", Documents(str(tmp_path)))
    assert from_docs.get_vocab() == {"<|endoftext|>": 0, "<unk>": 1, "a": 2, "b": 3}
    assert load_tokenizer("char", {"a.txt": "c"}).get_vocab()["c"] == 2

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(
        tmp_path / "no_eos"
    )
    spec = str(tmp_path / "no_eos")
    message = f"tokenizer {spec} has no EOS token to separate documents"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_tokenizer(spec, {})


def test_jsonl_skips_blank_lines_and_refuses_records_without_text(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text('{"text": "caf\\u00e9"}\n\n  \n{"text": "second"}\n', encoding="utf-8")
    assert corpus(str(path)) == {"web:1": "café", "web:4": "second"}
    for bad in ('["text"]', '{"text": 3}', '{"body": "x"}'):
        path.write_text('{"text": "first"}\n' + bad + "\n")
        message = f"{path}:2 has no string 'text' field"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            corpus(str(path))


def test_hf_specs_name_dataset_config_and_split(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "a"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    for spec in ("hf:owt", "hf:owt:en", "hf:owt:en:test", "hf:owt::test"):
        assert corpus(spec) == {"owt/0": "a"}
    assert calls == [
        ("owt", None, "train", True),
        ("owt", "en", "train", True),
        ("owt", "en", "test", True),
        ("owt", None, "test", True),
    ]
    monkeypatch.setitem(
        sys.modules,
        "datasets",
        types.SimpleNamespace(load_dataset=lambda *a, **k: iter([{"body": "x", "id": 1}])),
    )
    message = "dataset owt has no 'text' column (columns: ['body', 'id'])"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        corpus("hf:owt:en")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    message = "hf: corpora need the `datasets` package: pip install datasets"
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        corpus("hf:owt")


def test_folders_hold_only_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "notes.bin").write_text("not listed")
    (tmp_path / "dir.md").mkdir()  # a folder named like a text file
    (tmp_path / "dir.md" / "c.md").write_text("gamma")
    docs = Documents(str(tmp_path))
    assert docs.names() == ["a.txt", "dir.md/c.md"]
    assert dict(docs) == {"a.txt": "alpha", "dir.md/c.md": "gamma"}


def test_split_of_documents_in_memory():
    docs = {f"d{i}.txt": f"text {i}" for i in range(5)}
    train, held = split(docs, [])  # default fraction 0: still one document held out
    first = min(docs, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert list(held) == [first] and sorted(train) == sorted(set(docs) - {first})
    train, held = split(docs, [], 0.4)
    assert len(held) == 2 and set(held) | set(train) == set(docs)
    assert split(docs, ["d3"], spec="notes") == (
        {k: v for k, v in docs.items() if k != "d3.txt"},
        {"d3.txt": "text 3"},
    )
    message = (
        "held-out documents ['zz'] are not in corpus 'the corpus' (it has 5 documents: d0.txt, "
        "d1.txt, d2.txt, d3.txt, d4.txt)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        split(docs, ["zz"])
    with pytest.raises(ValueError, match=re.escape("not in corpus 'notes'")):
        split(docs, ["zz"], spec="notes")


def test_split_describes_what_it_holds_out():
    assert Split(["a.txt"], [], 0.1).describe() == "the last 10% of a.txt"
    names = [f"d{i}" for i in range(7)]
    assert Split(names, names[:6]).describe() == "d0, d1, d2, d3, d4, d5"
    assert Split(names + ["e"], names).describe() == "d0, d1, d2, d3, d4, d5, ..."
    assert Split(None, [], 0.05).describe() == "about 5.00% of the documents, by name hash"
    assert Split(None, ["x", "y"]).describe() == "x, y"


def test_split_keys_and_refusals_in_full():
    assert Split(["a", "b", "c"], ["c", "a"]).key == '{"heldout": ["a", "c"]}'
    fraction = Split(["a", "b", "c"], [], 0.25)
    assert fraction.key == '{"fraction": 0.25}'
    assert fraction.held.key == json.dumps({"split": fraction.key, "held": True})
    assert fraction.train.key == json.dumps({"split": fraction.key, "held": False})
    for count, tail in ((12, ""), (13, ", ...")):
        names = [f"n{i:02d}" for i in range(count)]
        listed = ", ".join(names[:12]) + tail
        message = (
            f"held-out documents ['x', 'y'] are not in corpus 'c' (it has {count} documents: "
            f"{listed})"
        )
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            Split(names, ["y", "n01", "x"], spec="c")
    with pytest.raises(ValueError, match="^every document is held out; leave some for training$"):
        Split(["a.txt", "b.txt"], ["a", "b.txt"])
    streamed = Split(None, ["a", "b"])  # names unknown up front: held out as named
    assert (streamed.held("a", "x"), streamed.train("a", "x"), streamed.train("c", "y")) == (
        "x",
        None,
        "y",
    )


def test_split_by_stem_or_name_and_by_hash():
    split_ = Split(["sub/a.txt", "b.md", "c.txt"], ["sub/a", "b.md"])
    assert split_.held_names == {"sub/a.txt", "b.md"} and split_.train("c.txt", "z") == "z"
    names = [f"doc{i}" for i in range(4)]
    by_hash = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    for fraction, count in ((0.0, 1), (0.5, 2), (0.99, 3)):  # at least one, never all
        assert Split(names, [], fraction).held_names == set(by_hash[:count])
    streamed = Split(None, [], 0.3)
    for i in range(50):
        name = f"web/{i}"
        inside = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) < 0.3 * 2**64
        assert (streamed.held(name, "t"), streamed.train(name, "t")) == (
            ("t", None) if inside else (None, "t")
        )


def test_one_document_splits_at_a_line_break_before_its_tail():
    text = "one\ntwo\nthree\nfour\n"  # 19 characters; 70 % is 13, a line break at 3, 7, 13, 18
    one = Split(["only"], [], 0.3)
    assert (one.train("only", text), one.held("only", text)) == ("one\ntwo", "\nthree\nfour\n")
    flat = "x" * 10  # no line break: cut at 70 % exactly
    assert (one.train("only", flat), one.held("only", flat)) == ("x" * 7, "x" * 3)
    starts = "\n" + "y" * 9  # the only break at 0 is no cut
    assert one.train("only", starts) == starts[:7]
    second = "y\n" + "y" * 8  # a break at 1 is
    assert (one.train("only", second), one.held("only", second)) == ("y", "\n" + "y" * 8)


def test_documents_of_each_kind(tmp_path, monkeypatch):
    assert Documents("shakespeare:macbeth, hamlet,,macbeth").names() == ["hamlet", "macbeth"]
    assert Documents("shakespeare:macbeth").fingerprint() == "plays:macbeth"
    assert Documents("shakespeare").names() == sorted(plays())
    message = f"unknown plays ['nonesuch', 'zz']; choose among {', '.join(plays())}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Documents("shakespeare:zz,hamlet,nonesuch")
    message = f"unknown plays ['hamlet:1']; choose among {', '.join(plays())}"  # one split only
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Documents("shakespeare:hamlet:1")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.setenv("HOME", str(tmp_path))
    one = Documents("~/a.txt")
    assert (one.kind, one.names(), list(one)) == ("file", ["a"], [("a", "alpha")])
    stat = (tmp_path / "a.txt").stat()
    stats = json.dumps([((tmp_path / "a.txt").as_posix(), stat.st_size, stat.st_mtime_ns)])
    assert one.fingerprint() == hashlib.sha256(stats.encode()).hexdigest()
    assert Documents(str(tmp_path / "b.jsonl")).names() is None
    assert Documents("hf:owt:en").names() is None
    assert Documents("hf:owt:en").fingerprint() == "hf:owt:en"
    message = (
        "corpus '/no/such' is neither 'shakespeare[:play,...]', 'hf:NAME', nor an existing file "
        "or folder"
    )
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        Documents("/no/such")


def test_a_folder_streams_text_and_lists_what_it_skipped(tmp_path):
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / "a.md").write_bytes(b"caf\xe9")  # latin-1, not UTF-8
    (tmp_path / "c.txt").write_bytes(b"nul\0inside")
    (tmp_path / "d.txt").write_text("delta")
    docs = Documents(str(tmp_path))
    files = [tmp_path / n for n in ("a.md", "b.txt", "c.txt", "d.txt")]
    stats = json.dumps([(p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    assert docs.fingerprint() == hashlib.sha256(stats.encode()).hexdigest()
    assert list(docs) == [("b.txt", "beta"), ("d.txt", "delta")]
    assert docs.skipped == ["a.md", "c.txt"]
    assert list(docs) == [("b.txt", "beta"), ("d.txt", "delta")] and docs.skipped == [
        "a.md",
        "c.txt",
    ]
    message = f"{tmp_path / 'sub'} holds no .txt or .md files"
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        Documents(str(tmp_path / "sub"))


def test_batches_against_their_definition():
    tokens = np.arange(40, dtype=np.uint16)
    message = (
        "the corpus has 40 tokens, fewer than one window of seq_len + 1 = 40; use a shorter "
        "seq_len or more text"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Batches(tokens, 2, 39)
    Batches(tokens, 2, 38)  # 40 tokens hold windows of 39 at two starts
    default = np.random.default_rng([0, 2]).integers(0, 40 - 8 - 1, size=2)  # seed 0
    assert Batches(tokens, 2, 8).get(2)[0].tolist() == [list(range(s, s + 8)) for s in default]
    batches = Batches(tokens, batch_size=6, seq_len=5, seed=7)
    starts = np.random.default_rng([7, 3]).integers(0, 40 - 5 - 1, size=6)
    x, y = batches.get(3, rank=1, world=3)
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == [list(range(s, s + 5)) for s in starts[1::3]]
    assert y.tolist() == [list(range(s + 1, s + 6)) for s in starts[1::3]]
    assert batches.get(3)[0].tolist() == [list(range(s, s + 5)) for s in starts]
    with pytest.raises(ValueError, match="^batch_size 6 does not split over 4 processes$"):
        batches.get(0, world=4)


def test_split_defaults_and_two_documents():
    names = ["a.txt", "b.txt", "c.txt"]
    assert len(Split(names, []).held_names) == 1  # fraction 0 by default: still one held out
    message = (
        "held-out documents ['zz'] are not in corpus 'the corpus' (it has 3 documents: a.txt, "
        "b.txt, c.txt)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Split(names, ["zz"])
    two = Split(["a.txt", "b.txt"], [], 0.5)  # two documents: one of them, not a tail of one
    first = min(["a.txt", "b.txt"], key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert two.single is None and two.held_names == {first}
