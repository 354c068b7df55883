"""Token shards: streamed preparation in worker processes, resumption, bad input, the loader."""

import hashlib
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from _launch import fork, join
from tqdm import tqdm

from odeify.assets import gpt2_tokenizer
from odeify.cli import main as cli
from odeify.train import data, shards
from odeify.train.distributed import setup_distributed, teardown

PLAYS = "shakespeare:hamlet,macbeth,othello"


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture
def folder(tmp_path):
    """A small folder corpus: 12 documents of a few hundred characters."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        where = root / "sub" if i % 3 == 0 else root
        (where / f"doc{i:02d}.txt").write_text(f"Document {i}. " + "To be, or not to be. " * i)
    return root


@pytest.fixture
def tokenizer(folder):
    """A character tokenizer of the folder corpus."""
    return data.char_tokenizer(text for _, text in data.Documents(str(folder)))


def test_shards_hold_todays_token_stream_and_batches(tmp_path, gpt2, capsys):
    """Shakespeare through shards (several of them, two workers) equals today's tokenize()."""
    docs = data.Documents(PLAYS)
    split = data.Split(docs.names(), ["macbeth"])
    train_docs, held_docs = data.split(data.corpus(PLAYS), ["macbeth"])
    today = data.tokenize(train_docs, gpt2, cache=None)
    options = {"workers": 2, "part": split.train, "shard_tokens": 20_000, "batch_chars": 9_000}
    ours = shards.prepare(docs, gpt2, tmp_path / "train", **options)
    assert len(ours.files) == 2 and ours.documents == 2  # a shard holds whole documents
    assert np.array_equal(ours[0 : len(ours)], today)
    megabytes = f"{len(ours) * 2 / 1e6:,.1f} MB"  # uint16 tokens
    assert megabytes != "0.0 MB" and f"in 2 shard(s) ({megabytes})," in capsys.readouterr().out
    held = shards.prepare(docs, gpt2, tmp_path / "held", part=split.held, progress=False)
    assert np.array_equal(held[0 : len(held)], data.tokenize(held_docs, gpt2, cache=None))
    a, b = data.Batches(today, 8, 64, seed=3), data.Batches(ours, 8, 64, seed=3)
    for step in range(20):
        assert torch.equal(a.get(step)[0], b.get(step)[0])
        assert torch.equal(a.get(step, rank=1, world=2)[1], b.get(step, rank=1, world=2)[1])
    assert torch.equal(data.windows(today, 65), data.windows(ours, 65))


def _crash_at_the_third_shard(spec, tokenizer, out) -> dict:
    """Prepare ``spec`` into ``out`` (300-token shards, 200-character batches) until the third
    shard would close; the index it left."""
    closed, close = [], shards._Writer.close_shard

    def killed(writer):
        closed.append(writer.name)
        if len(closed) == 3:
            raise RuntimeError("killed")
        close(writer)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(shards._Writer, "close_shard", killed)
        with pytest.raises(RuntimeError, match="killed"):
            shards.prepare(spec, tokenizer, out, shard_tokens=300, batch_chars=200, progress=False)
    assert (out / "shard-00002.uint16.tmp").exists()  # written, never listed
    return json.loads((out / "index.json").read_text())


def test_reused_then_resumed_after_a_crash(tmp_path, folder, monkeypatch, tokenizer):
    clean = shards.prepare(
        str(folder), tokenizer, tmp_path / "clean", shard_tokens=300, batch_chars=200
    )
    again = shards.prepare(
        str(folder), tokenizer, tmp_path / "clean", shard_tokens=300, batch_chars=200
    )
    assert again.index["digest"] == clean.index["digest"]

    out = tmp_path / "crashed"
    listed = _crash_at_the_third_shard(str(folder), tokenizer, out)
    assert not listed["complete"] and len(listed["shards"]) == 2 and 0 < listed["read"] < 12
    with pytest.raises(ValueError, match="unfinished"):
        shards.Shards(out)

    encoded = []
    encode = shards._Encoder.__call__
    monkeypatch.setattr(shards._Encoder, "__call__", lambda s, t: encoded.extend(t) or encode(s, t))
    resumed = shards.prepare(str(folder), tokenizer, out, shard_tokens=300, batch_chars=200)
    assert len(encoded) == 12 - listed["read"]  # only the documents after the listed shards
    assert resumed.index["digest"] == clean.index["digest"]
    assert np.array_equal(resumed[0 : len(resumed)], clean[0 : len(clean)])
    assert not list(out.glob("*.tmp"))


def test_bad_input(tmp_path, folder, gpt2, capsys):
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (folder / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    out = tmp_path / "shards"
    prepared = shards.prepare(str(folder), gpt2, out, progress=False)
    assert prepared.documents == 12 and prepared.index["skipped"] == ["image.txt", "latin1.md"]
    assert "skipped 2 file(s) that are not UTF-8 text" in capsys.readouterr().out

    other = data.char_tokenizer(["To be"])
    with pytest.raises(ValueError, match="another tokenizer"):
        shards.Shards(out, other)
    with pytest.raises(ValueError, match="different .*tokenizer"):
        shards.prepare(str(folder), other, out)
    (shard,) = out.glob("shard-*")
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-2])  # a truncated shard is not read as a shorter corpus
    with pytest.raises(ValueError, match="do not hold the token counts their index lists"):
        shards.Shards(out, gpt2)
    shard.write_bytes(whole)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "format": 0}))
    with pytest.raises(ValueError, match="format version 0"):
        shards.Shards(out, gpt2)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt or .md"):
        shards.prepare(str(empty), gpt2, tmp_path / "x")
    (empty / "blank.txt").write_text("")
    (empty / "binary.txt").write_bytes(b"\0\1\2")
    with pytest.raises(ValueError, match=r"no text to tokenise \(1 file\(s\) skipped"):
        shards.prepare(str(empty), gpt2, tmp_path / "x")
    assert not (tmp_path / "x" / "index.json").exists()


def test_jsonl_and_streamed_hf_datasets(tmp_path, gpt2, monkeypatch):
    lines = [{"text": "first"}, {"text": "second", "id": 2}, {"text": "third"}]
    path = tmp_path / "web.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    assert data.corpus(str(path)) == {"web:1": "first", "web:2": "second", "web:3": "third"}
    prepared = shards.prepare(str(path), gpt2, tmp_path / "jsonl", progress=False)
    assert prepared.documents == 3 and prepared[0 : len(prepared)].tolist().count(50256) == 3

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "alpha"}, {"text": "  "}, {"text": "beta"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert data.corpus("hf:owt::validation") == {"owt/0": "alpha", "owt/2": "beta"}
    assert calls == [("owt", None, "validation", True)]
    split = data.Split(data.Documents("hf:owt").names(), [], 0.5)
    kept = [split.held(f"owt/{i}", "x") for i in range(400)]
    assert 150 < sum(k is not None for k in kept) < 250  # about half, by name hash


def _prepare_under_torchrun(args):
    folder, out, log = map(Path, args)
    tokenizer = data.char_tokenizer(text for _, text in data.Documents(str(folder)))
    ctx = setup_distributed()
    encode = shards._Encoder.__call__

    def logged(self, texts):
        with open(log / f"rank{ctx.rank}", "a") as f:
            f.write(f"{len(texts)}\n")
        return encode(self, texts)

    shards._Encoder.__call__ = logged  # this forked process's copy of the module only
    with ctx.main_first():
        tokens = shards.prepare(str(folder), tokenizer, out, progress=False)
    (log / f"tokens{ctx.rank}").write_text(str(len(tokens)))
    teardown()


def test_under_torchrun_one_rank_tokenises(tmp_path, folder):
    log = tmp_path / "log"
    log.mkdir()
    join(fork(_prepare_under_torchrun, [str(folder), str(tmp_path / "out"), str(log)], world=2))
    assert (log / "rank0").read_text().split() == ["12"] and not (log / "rank1").exists()
    assert (log / "tokens0").read_text() == (log / "tokens1").read_text() != "0"


def test_cli_prepare(tmp_path, folder, capsys):
    out = tmp_path / "out"
    assert cli(["prepare", str(folder), str(out), "--tokenizer", "char", "--quiet"]) == 0
    assert "12 documents" in capsys.readouterr().out and shards.Shards(out).documents == 12
    cache = tmp_path / "cache"
    args = ["prepare", str(folder), str(cache), "--tokenizer", "char", "--heldout", "doc04"]
    assert cli([*args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"--set token_cache={cache}" in printed and len(list(cache.iterdir())) == 2


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_reading_leaves_no_shard_mapped(tmp_path, folder, gpt2):
    # A memory map kept open keeps every page a random window touched resident, so the RSS of
    # a long run would grow to the size of the shards; reads must leave nothing mapped.
    prepared = shards.prepare(
        str(folder), gpt2, tmp_path / "s", shard_tokens=200, batch_chars=1, progress=False
    )
    assert len(prepared.files) > 1
    batches = data.Batches(prepared, 4, 32, seed=0)
    whole = np.concatenate([np.fromfile(f, dtype=prepared.dtype) for f in prepared.files])
    for step in range(10):
        x, y = batches.get(step)
        rows = np.random.default_rng([0, step]).integers(0, len(whole) - 33, size=4)
        assert np.array_equal(x.numpy(), np.stack([whole[r : r + 32] for r in rows]))
    mapped = Path("/proc/self/maps").read_text()
    assert not [f.name for f in prepared.files if str(f) in mapped]


def test_tokenizer_identity_from_its_definition():
    tokenizer = data.char_tokenizer(["café"])  # a non-ASCII token, written as itself
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    described = [type(tokenizer).__name__, 6, 0, vocab]  # EOS, <unk> and c, a, f, é
    expected = hashlib.sha256(json.dumps(described, ensure_ascii=False).encode()).hexdigest()
    assert shards.tokenizer_identity(tokenizer) == expected


def _index_of(out):
    return json.loads((out / "index.json").read_text())


def test_index_lists_each_shard_and_chains_their_digests(tmp_path, folder, tokenizer):
    out = tmp_path / "s"
    prepared = shards.prepare(str(folder), tokenizer, out, shard_tokens=300, batch_chars=200)
    index = _index_of(out)
    assert index == prepared.index
    assert (index["format"], index["complete"], index["read"], index["skipped"]) == (
        1,
        True,
        12,
        [],
    )
    assert (index["corpus"], index["dtype"], index["shard_tokens"], index["part"]) == (
        str(folder),
        "uint16",
        300,
        None,
    )
    assert index["tokenizer"] == shards.tokenizer_identity(tokenizer)
    assert index["source"] == data.Documents(str(folder)).fingerprint()
    chain = None
    for i, shard in enumerate(index["shards"]):
        raw = (out / shard["file"]).read_bytes()
        assert shard["file"] == f"shard-{i:05d}.uint16" and shard["tokens"] == len(raw) // 2
        assert shard["sha256"] == hashlib.sha256(raw).hexdigest()
        chain = hashlib.sha256(((chain or "") + shard["sha256"]).encode()).hexdigest()
    assert index["digest"] == chain and len(index["shards"]) > 2
    assert index["documents"] == 12 == sum(s["documents"] for s in index["shards"])
    assert index["tokens"] == len(prepared) == sum(s["tokens"] for s in index["shards"])
    assert all(s["tokens"] >= 300 for s in index["shards"][:-1])  # closed once full
    texts = [text for _, text in data.Documents(str(folder))]
    expected = [t for text in texts for t in [*tokenizer(text)["input_ids"], 0]]
    assert prepared[0 : len(prepared)].tolist() == expected


def test_slices_across_shards(tmp_path, folder, tokenizer):
    prepared = shards.prepare(
        str(folder), tokenizer, tmp_path / "s", shard_tokens=100, batch_chars=1, progress=False
    )
    whole = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in prepared.files])
    assert len(prepared.files) > 3 and len(prepared) == len(whole)
    edges = prepared.starts
    for a, b in [(0, 1), (edges[1] - 1, edges[1] + 1), (edges[1], edges[3]), (5, edges[4] + 7)]:
        assert prepared[a:b].tolist() == whole[a:b].tolist(), (a, b)
    assert prepared[-5:].tolist() == whole[-5:].tolist()
    assert prepared[10:20:1].tolist() == whole[10:20].tolist()
    for key in (slice(20, 10), slice(0, 0), slice(7, 7)):
        empty = prepared[key]
        assert empty.dtype == np.uint16 and empty.shape == (0,)
    message = "shards are read in contiguous slices, tokens[a:b]"
    for key in (3, slice(0, 10, 2)):
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            prepared[key]
    with open(prepared.files[1], "r+b") as f:  # cut short after it was opened
        f.truncate(4)
    message = f"{prepared.files[1]} ended early; prepare the shards again"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        prepared[edges[1] : edges[1] + 10]


def test_refusals_in_full(tmp_path, folder, tokenizer):
    nothing = tmp_path / "nothing"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{nothing} holds no prepared shards (no index.json)")
    ):
        shards.Shards(nothing)
    out = tmp_path / "s"
    shards.prepare(str(folder), tokenizer, out, progress=False)
    other = data.char_tokenizer(["To be"])
    message = (
        f"the shards in {out} were written by another tokenizer (its vocabulary differs from "
        "this one's); prepare them again with this tokenizer"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        shards.Shards(out, other)
    message = (
        f"{out} already holds shards of another preparation (different shard_tokens, "
        "tokenizer); delete it or prepare into another folder"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        shards.prepare(str(folder), other, out, shard_tokens=99)
    (shard,) = out.glob("shard-*")
    whole = shard.read_bytes()
    shard.write_bytes(whole + b"\0\0")
    message = (
        f"{out}: the shard files do not hold the token counts their index lists (a file was "
        "truncated or replaced); prepare the shards again"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        shards.Shards(out)
    index = _index_of(out)
    (out / "index.json").write_text(json.dumps({**index, "complete": False}))
    message = f"{out} holds an unfinished preparation; run prepare again to resume it"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        shards.Shards(out)
    (out / "index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "format"}))
    message = (
        f"{out} holds shards of format version None, this odeify reads version 1; delete the "
        "folder (or prepare into another) to write them again"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        shards.Shards(out)


def test_an_unfinished_run_of_another_preparation_is_discarded(tmp_path, folder, tokenizer):
    out = tmp_path / "s"
    shards.prepare(str(folder), tokenizer, out, shard_tokens=300, progress=False)
    index = _index_of(out)
    (out / "index.json").write_text(json.dumps({**index, "complete": False}))
    (out / "shard-00009.uint16.tmp").write_bytes(b"half")
    (out / "keep.txt").write_text("not ours")
    (out / index["shards"][0]["file"]).unlink()  # listed, yet gone: nothing to remove
    again = shards.prepare(str(folder), tokenizer, out, shard_tokens=200, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["index.json", "keep.txt", *(s["file"] for s in again.index["shards"])])
    assert again.index["shard_tokens"] == 200 and again.documents == 12


def test_summary_line_and_progress_bar(tmp_path, folder, capsys, tokenizer):
    for i in range(7):
        (folder / f"bin{i}.txt").write_bytes(b"\0")
    split = data.Split(data.Documents(str(folder)).names(), ["doc04"])
    shards.prepare(str(folder), tokenizer, tmp_path / "held", part=split.held)
    captured = capsys.readouterr()
    assert re.fullmatch(
        rf"prepared {re.escape(str(folder))}: 1 documents, \d+ tokens in 1 shard\(s\) \(0\.0 MB\), "
        r"[\d,]+ tokens/s; skipped 7 file\(s\) that are not UTF-8 text: "
        r"bin0\.txt, bin1\.txt, bin2\.txt, bin3\.txt, bin4\.txt\n",
        captured.out,
    )
    assert "tokenising the held-out part" in captured.err and "tok" in captured.err
    shards.prepare(str(folder), tokenizer, tmp_path / "train", part=split.train)
    assert "tokenising the held-out part" not in capsys.readouterr().err
    shards.prepare(str(folder), tokenizer, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_no_text_on_the_held_out_side(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("words")
    (corpus / "b.txt").write_text("")
    split = data.Split(["a.txt", "b.txt"], ["b"])
    tokenizer = data.char_tokenizer(["words"])
    message = f"corpus {str(corpus)!r} has no text to tokenise on the held-out side of the split"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        shards.prepare(str(corpus), tokenizer, tmp_path / "x", part=split.held, progress=False)


def test_cached_folder_is_named_by_corpus_side_and_tokenizer(
    tmp_path, folder, monkeypatch, tokenizer
):
    docs = data.Documents(str(folder))
    split = data.Split(docs.names(), ["doc04"])
    with monkeypatch.context() as m:  # by default in this process: no pool is forked
        m.setattr(shards.multiprocessing, "get_context", lambda *a: pytest.fail("forked a pool"))
        held = shards.cached(docs, tokenizer, split.held, root=tmp_path, progress=False)
    key = [docs.spec, docs.fingerprint(), split.held.key, shards.tokenizer_identity(tokenizer)]
    assert held.folder == tmp_path / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    assert held.index["part"] == split.held.key and held.documents == 1
    whole = shards.cached(docs, tokenizer, root=tmp_path, workers=2, progress=False)
    key = [docs.spec, docs.fingerprint(), None, shards.tokenizer_identity(tokenizer)]
    assert whole.folder == tmp_path / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    assert whole.documents == 12


def test_the_summary_line_reports_this_runs_rate_and_the_size_in_mb(capsys):
    # 1,000,000 new tokens (100 were there before the resume) in half a second; 1.05 MB on disk.
    index = {"documents": 1234, "tokens": 1_000_100, "dtype": "uint16", "skipped": []}
    index["shards"] = [{"tokens": 500_000}, {"tokens": 25_000}]
    shards._summarise("corpus", index, seconds=0.5, tokens_before=100)
    assert capsys.readouterr().out == (
        "prepared corpus: 1,234 documents, 1,000,100 tokens in 2 shard(s) (1.1 MB), "
        "2,000,000 tokens/s\n"
    )


class _Slow:
    """A tokenizer without a Rust backend (nor an ``is_fast`` to say so): ids are characters'
    code points; no EOS."""

    eos_token_id = None

    def __len__(self):
        return 70000  # more than uint16 holds

    def get_vocab(self):
        return {"a": 0}

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[1] * add_special_tokens + [ord(c) for c in t] for t in texts]}


def test_workers_tokenise_in_a_fork_pool_of_that_many(tmp_path, folder, monkeypatch, tokenizer):
    # Forked, so the workers inherit the tokenizer (macOS and Windows default to spawn).
    made, real = [], shards.multiprocessing.get_context

    class Recording:
        def __init__(self, method):
            made.append(method)
            self.context = real(method)

        def Pool(self, processes, *args):
            made.append(processes)
            return self.context.Pool(processes, *args)

    monkeypatch.setattr(shards.multiprocessing, "get_context", Recording)
    prepared = shards.prepare(str(folder), tokenizer, tmp_path / "s", workers=2, progress=False)
    assert made == ["fork", 2] and len(prepared) > 0


def test_token_files_are_uint16_up_to_65535_tokens():
    sized = [type("Vocab", (), {"__len__": lambda self, n=n: n})() for n in (65535, 65536)]
    assert [shards._dtype(t) for t in sized] == [np.uint16, np.uint32]


def test_a_slow_tokenizer_without_eos_in_uint32(tmp_path, folder):
    prepared = shards.prepare(str(folder), _Slow(), tmp_path / "s", batch_chars=50, progress=False)
    texts = [text for _, text in data.Documents(str(folder))]
    assert prepared.dtype == np.uint32 and prepared.files[0].name == "shard-00000.uint32"
    assert prepared[0 : len(prepared)].tolist() == [ord(c) for text in texts for c in text]


@pytest.mark.parametrize("workers", [1, 3])
def test_batches_of_text_keep_the_corpus_order(tmp_path, folder, workers, tokenizer):
    one = shards.prepare(
        str(folder), tokenizer, tmp_path / "one", batch_chars=10**9, progress=False
    )
    small = shards.prepare(
        str(folder), tokenizer, tmp_path / "small", workers=workers, batch_chars=1, progress=False
    )
    assert small[0 : len(small)].tolist() == one[0 : len(one)].tolist()


def test_cached_shows_progress_unless_asked_not_to(
    tmp_path, folder, capsys, monkeypatch, tokenizer
):
    docs = data.Documents(str(folder))
    shards.cached(docs, tokenizer, root=tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    clock = iter([100.0])  # the start, then half a second for everything after it
    with monkeypatch.context() as m:
        m.setattr(shards.time, "perf_counter", lambda: next(clock, 100.5))
        shown = shards.cached(docs, tokenizer, root=tmp_path / "shown")
    out, err = capsys.readouterr()
    tokens = f"{len(shown):,} tokens in 1 shard(s) (0.0 MB)"
    rate = f"{2 * len(shown):,} tokens/s"  # all of them in the half second
    assert out == f"prepared {docs.spec}: 12 documents, {tokens}, {rate}\n"
    # The last refresh: the tokens so far in thousands ("k"), their rate, 12 documents in 0.5 s.
    last = err.rstrip("\n").split("\r")[-1]
    assert re.fullmatch(r"tokenising: [\d.]+ktok \[00:\d\d, [\d.]+k?tok/s, 24 docs/s\]", last), last


def test_reads_without_pread_seek_and_read_the_same_tokens(
    tmp_path, folder, monkeypatch, tokenizer
):
    prepared = shards.prepare(
        str(folder), tokenizer, tmp_path / "s", shard_tokens=100, batch_chars=1, progress=False
    )
    edges = prepared.starts
    slices = [(0, 5), (edges[1] - 3, edges[2] + 4), (edges[2] + 1, edges[2] + 9)]
    expected = [prepared[a:b].tolist() for a, b in slices]
    monkeypatch.delattr(os, "pread")  # as on Windows
    assert [prepared[a:b].tolist() for a, b in slices] == expected


def test_a_tokenizer_that_adds_bos_leaves_none_in_the_shards(tmp_path, folder, tokenizer):
    # Llama-family tokenizers add BOS in their post-processor; shards are documents joined by EOS
    # alone, so the Rust backend is called without special tokens.
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    core.add_special_tokens(["<s>"])
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    llama_like = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    assert llama_like("To be")["input_ids"] == [bos, *tokenizer("To be")["input_ids"]]
    prepared = shards.prepare(str(folder), llama_like, tmp_path / "s", progress=False)
    eos = [tokenizer.eos_token_id]
    texts = [text for _, text in data.Documents(str(folder))]
    expected = [i for text in texts for i in tokenizer(text)["input_ids"] + eos]
    assert prepared[0 : len(prepared)].tolist() == expected


def test_workers_keep_two_batches_each_in_flight(tokenizer):
    # One batch being tokenised and one queued per worker, however long the corpus: preparing
    # reads it as fast as the shards are written, never ahead into memory.
    pulled = []

    def batches():
        for read in range(1, 11):
            pulled.append(read)
            yield ["To be"], read

    tokenised = shards._tokenised(batches(), tokenizer, workers=2)
    ahead = [len(pulled) - done for done, _ in enumerate(tokenised, 1)]
    assert ahead == [3] * 7 + [2, 1, 0]


def test_a_resumed_run_with_nothing_left_to_read_leaves_no_partial_shard(tmp_path, monkeypatch):
    # An hf: corpus is known by its name alone, so a stream that shrank since the crash passes
    # for the same source: the resumed run writes no shard over the crashed run's partial one,
    # which must still go.
    rows = [{"text": f"Document {i}. " + "To be, or not to be. " * i} for i in range(12)]
    stream = types.SimpleNamespace(load_dataset=lambda *args, **kwargs: iter(rows))
    monkeypatch.setitem(sys.modules, "datasets", stream)
    tokenizer = data.char_tokenizer(row["text"] for row in rows)
    out = tmp_path / "s"
    listed = _crash_at_the_third_shard("hf:owt", tokenizer, out)
    assert len(listed["shards"]) == 2
    del rows[listed["read"] :]
    resumed = shards.prepare("hf:owt", tokenizer, out, shard_tokens=300, batch_chars=200)
    assert sorted(os.listdir(out)) == ["index.json", "shard-00000.uint16", "shard-00001.uint16"]
    assert (resumed.documents, len(resumed)) == (listed["documents"], listed["tokens"])
    assert resumed.index["read"] == listed["read"]  # where a later resumption would go on


def test_a_shard_closes_at_the_batch_that_brings_it_to_shard_tokens(tmp_path, tokenizer):
    corpus = tmp_path / "three"
    corpus.mkdir()
    for name in "abc":
        (corpus / f"{name}.txt").write_text("To be")  # 5 characters and EOS: 6 tokens
    prepared = shards.prepare(
        str(corpus), tokenizer, tmp_path / "s", shard_tokens=6, batch_chars=1, progress=False
    )
    assert [s["tokens"] for s in prepared.index["shards"]] == [6, 6, 6]


def test_a_resumed_run_s_bar_counts_on_from_the_listed_shards(
    tmp_path, folder, capsys, monkeypatch, tokenizer
):
    out = tmp_path / "s"
    listed = _crash_at_the_third_shard(str(folder), tokenizer, out)
    clock = iter([100.0])  # the start, then half a second for everything after it
    monkeypatch.setattr(shards.time, "perf_counter", lambda: next(clock, 100.5))
    resumed = shards.prepare(str(folder), tokenizer, out, shard_tokens=300, batch_chars=200)
    # The last refresh: every token, the listed shards' too; this run's documents (one or two
    # a batch) in its half second.
    last = capsys.readouterr().err.rstrip("\n").split("\r")[-1]
    tokens = tqdm.format_sizeof(len(resumed))
    rate = 2 * (12 - listed["read"])
    assert re.fullmatch(rf"tokenising: {tokens}tok \[00:\d\d, [\d.]+k?tok/s, {rate} docs/s\]", last)


def test_the_index_counts_the_source_documents_after_the_last_kept_one(tmp_path, folder, tokenizer):
    # The held-out side keeps doc04 alone; the documents read after its batch count too.
    split = data.Split(data.Documents(str(folder)).names(), ["doc04"])
    held = shards.prepare(
        str(folder), tokenizer, tmp_path / "s", part=split.held, batch_chars=1, progress=False
    )
    assert (held.documents, held.index["read"]) == (1, 12)
