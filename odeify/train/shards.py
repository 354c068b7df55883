"""Token shards: a corpus of any size streamed, tokenised in parallel, read a window at a time.

:func:`prepare` streams a corpus's documents (:class:`~odeify.train.data.Documents`), tokenises
them in batches on a pool of worker processes, and appends the tokens (EOS after each document)
to shard files of about ``shard_tokens`` tokens, uint16 (uint32 for vocabularies over 65,535),
next to ``index.json``: the documents, the tokens of each shard, the tokenizer's identity (a
hash of its vocabulary), the format version and a digest of the tokens. Memory stays flat in the
corpus size: a few batches of text are in flight at a time.

A shard is written under a temporary name, fsynced, renamed, and only then listed in the index
(itself replaced atomically), so a run killed half-way leaves nothing a later run reads as
complete: the next :func:`prepare` resumes after the last listed shard. :class:`Shards` reads a
complete folder back as one token array, which :class:`~odeify.train.data.Batches` and
:func:`~odeify.train.data.windows` take as they take a memmap; each slice is a positional read
of just those tokens, so the loader's memory does not grow with the corpus or the run.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..atomic import write_text
from .data import CACHE, Documents, Part

FORMAT = 1
SHARD_TOKENS = 1 << 26  # 128 MiB of uint16 per shard
BATCH_CHARS = 1 << 20  # text per tokenizer call: large enough to amortise a task, small in memory


def tokenizer_identity(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, EOS and class: shards are read back only with the
    tokenizer that wrote them.

    Example:
        >>> from odeify.assets import gpt2_tokenizer
        >>> tokenizer_identity(gpt2_tokenizer())[:8]
        'abe3fa75'
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    described = [type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id, vocab]
    return hashlib.sha256(json.dumps(described, ensure_ascii=False).encode()).hexdigest()


class Shards:
    """A prepared folder as one read-only token array: ``len()`` and slices across shards.

    Opening checks the format version, that preparation finished, and (given a tokenizer) that
    it is the tokenizer the shards were written with.

    Example:
        >>> from odeify.train.data import char_tokenizer
        >>> Path("corpus").mkdir()
        >>> _ = Path("corpus/a.txt").write_text("To be, or not to be, that is the question.\\n")
        >>> _ = Path("corpus/b.txt").write_text("Tomorrow, and tomorrow, and tomorrow.\\n")
        >>> tokenizer = char_tokenizer(text for _, text in Documents("corpus"))
        >>> sizes = dict(shard_tokens=40, batch_chars=1)   # small shards: one per document
        >>> _ = prepare("corpus", tokenizer, "shards", progress=False, **sizes)
        prepared corpus: 2 documents, 83 tokens in 2 shard(s) (0.0 MB), ... tokens/s
        >>> tokens = Shards("shards", tokenizer)
        >>> len(tokens), tokens.documents, [s["tokens"] for s in tokens.index["shards"]]
        (83, 2, [44, 39])
        >>> tokenizer.decode(tokens[38:50])   # a slice across the two shards, EOS between documents
        'ion.\\n<|endoftext|>Tomorr'
        >>> from odeify.train.data import Batches
        >>> Batches(tokens, batch_size=4, seq_len=16).get(0)[0].shape
        torch.Size([4, 16])
    """

    def __init__(self, folder: str | Path, tokenizer=None):
        self.folder = Path(folder)
        self.index = index = _read_index(self.folder)
        if index is None:
            raise FileNotFoundError(f"{self.folder} holds no prepared shards (no index.json)")
        if not index["complete"]:
            raise ValueError(
                f"{self.folder} holds an unfinished preparation; run prepare again to resume it"
            )
        if tokenizer is not None and tokenizer_identity(tokenizer) != index["tokenizer"]:
            raise ValueError(
                f"the shards in {self.folder} were written by another tokenizer (its vocabulary "
                "differs from this one's); prepare them again with this tokenizer"
            )
        self.dtype = np.dtype(index["dtype"])
        self.files = [self.folder / s["file"] for s in index["shards"]]
        sizes = [f.stat().st_size // self.dtype.itemsize for f in self.files]
        if sizes != [s["tokens"] for s in index["shards"]]:
            raise ValueError(
                f"{self.folder}: the shard files do not hold the token counts their index lists "
                "(a file was truncated or replaced); prepare the shards again"
            )
        self.starts = np.cumsum([0, *sizes]).tolist()

    @property
    def documents(self) -> int:
        return self.index["documents"]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("shards are read in contiguous slices, tokens[a:b]")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_right(self.starts, stop - 1) - 1
        pieces = [
            self._read(i, max(start, self.starts[i]) - self.starts[i], stop - self.starts[i])
            for i in range(first, last + 1)
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _read(self, i: int, a: int, b: int) -> np.ndarray:
        """Tokens a:b of shard i, read at their offset (a fresh array).

        Not through a memory map kept open: every page a read touches stays mapped (and the
        kernel maps cached neighbours with each fault), so random windows grow the process's
        RSS towards the size of the shards (300 batches of 16 x 1025 tokens over 2 GB of text
        took it from 486 to 1,145 MiB). A positional read costs about what a slice of the map
        did (3 us a window) and leaves nothing mapped.
        """
        size = self.dtype.itemsize
        count = min(b, self.starts[i + 1] - self.starts[i]) - a
        fd = os.open(self.files[i], os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            if hasattr(os, "pread"):
                data = os.pread(fd, count * size, a * size)
            else:  # Windows: no pread; this descriptor is ours alone, so seek and read
                os.lseek(fd, a * size, os.SEEK_SET)
                data = os.read(fd, count * size)
        finally:
            os.close(fd)
        if len(data) != count * size:
            raise ValueError(f"{self.files[i]} ended early; prepare the shards again")
        return np.frombuffer(data, dtype=self.dtype).copy()


def prepare(
    spec: str | Documents,
    tokenizer,
    out_dir: str | Path,
    workers: int = 1,
    part: Part | None = None,
    shard_tokens: int = SHARD_TOKENS,
    batch_chars: int = BATCH_CHARS,
    progress: bool = True,
) -> Shards:
    """Tokenise a corpus into token shards in ``out_dir`` (resuming an unfinished run there, or
    reusing a finished one of the same corpus and tokenizer), and open them.

    ``workers`` processes tokenise (1: this process) batches of about ``batch_chars`` characters
    of text; ``part`` keeps one side of a :class:`~odeify.train.data.Split` (default: every
    document). A shard closes after the batch that fills it. Prints a summary.

    Example:
        >>> from odeify.train.data import char_tokenizer
        >>> Path("corpus").mkdir()
        >>> _ = Path("corpus/a.txt").write_text("To be, or not to be, that is the question.\\n")
        >>> _ = Path("corpus/b.txt").write_text("Tomorrow, and tomorrow, and tomorrow.\\n")
        >>> tokenizer = char_tokenizer(text for _, text in Documents("corpus"))
        >>> tokens = prepare("corpus", tokenizer, "data/corpus", workers=2, progress=False)
        prepared corpus: 2 documents, 83 tokens in 1 shard(s) (0.0 MB), ... tokens/s
        >>> tokens = prepare("corpus", tokenizer, "data/corpus")   # finished: reused, no work
        >>> len(tokens), sorted(os.listdir("data/corpus"))
        (83, ['index.json', 'shard-00000.uint16'])
    """
    docs = spec if isinstance(spec, Documents) else Documents(spec)
    out = Path(out_dir)
    identity = {
        "format": FORMAT,
        "corpus": docs.spec,
        "source": docs.fingerprint(),
        "part": None if part is None else part.key,
        "tokenizer": tokenizer_identity(tokenizer),
        "dtype": np.dtype(_dtype(tokenizer)).name,
        "shard_tokens": shard_tokens,
    }
    index = _start(out, identity)
    if index["complete"]:
        return Shards(out)  # _start matched its identity, the tokenizer's included
    writer = _Writer(out, index, shard_tokens)
    began, tokens_before = time.perf_counter(), index["tokens"]
    bar = tqdm(
        desc="tokenising" + (" the held-out part" if part is not None and part.held else ""),
        unit="tok",
        unit_scale=True,
        initial=index["tokens"],
        disable=not progress,
        dynamic_ncols=True,
    )
    done = 0
    batches = _batches(docs, part, index["read"], batch_chars)
    for tokens, documents, read in _tokenised(batches, tokenizer, workers):
        writer.append(tokens, documents, read)
        done += documents
        bar.update(len(tokens))
        rate = done / max(time.perf_counter() - began, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} docs/s", refresh=False)
    bar.close()
    if not writer.pending and not writer.index["shards"]:
        raise ValueError(
            f"corpus {docs.spec!r} has no text to tokenise"
            + (" on the held-out side of the split" if part is not None and part.held else "")
            + (f" ({len(docs.skipped)} file(s) skipped as not UTF-8 text)" if docs.skipped else "")
        )
    writer.finish(docs.skipped)
    _summarise(docs.spec, writer.index, time.perf_counter() - began, tokens_before)
    return Shards(out)  # written just now, with this tokenizer


def cached(
    docs: Documents,
    tokenizer,
    part: Part | None = None,
    root: str | Path = CACHE,
    workers: int = 1,
    progress: bool = True,
) -> Shards:
    """:func:`prepare` into a folder of ``root`` named by the corpus, its source files, the
    split side and the tokenizer, so a later run with the same data reuses the shards.

    Example:
        >>> from odeify.train.data import char_tokenizer
        >>> Path("corpus").mkdir()
        >>> _ = Path("corpus/a.txt").write_text("To be, or not to be, that is the question.\\n")
        >>> _ = Path("corpus/b.txt").write_text("Tomorrow, and tomorrow, and tomorrow.\\n")
        >>> tokenizer = char_tokenizer(text for _, text in Documents("corpus"))
        >>> from odeify.train.data import Split
        >>> docs = Documents("corpus")
        >>> split = Split(docs.names(), heldout=["b"])
        >>> train = cached(docs, tokenizer, split.train, root="cache", progress=False)
        prepared corpus: 1 documents, 44 tokens in 1 shard(s) (0.0 MB), ... tokens/s
        >>> cached(docs, tokenizer, split.train, root="cache").folder == train.folder   # reused
        True
        >>> held = cached(docs, tokenizer, split.held, root="cache", progress=False)
        prepared corpus: 1 documents, 39 tokens in 1 shard(s) (0.0 MB), ... tokens/s
        >>> len(os.listdir("cache"))   # one folder per side of the split
        2
    """
    key = [docs.spec, docs.fingerprint(), part and part.key, tokenizer_identity(tokenizer)]
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    return prepare(docs, tokenizer, Path(root) / name, workers, part, progress=progress)


# ------------------------------------------------------------------------------ tokenising
def _dtype(tokenizer) -> type:
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32


class _Encoder:
    """Texts -> one token array with EOS after each text, by the tokenizer's batch call (the
    Rust backend directly for fast tokenizers, its truncation and padding switched off)."""

    def __init__(self, tokenizer):
        self.dtype, self.eos = _dtype(tokenizer), tokenizer.eos_token_id
        self.backend, self.tokenizer = None, tokenizer
        if getattr(tokenizer, "is_fast", False):
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.backend is not None:
            ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        else:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        extra = self.eos is not None
        out = np.empty(sum(map(len, ids)) + extra * len(ids), dtype=self.dtype)
        at = 0
        for row in ids:
            out[at : at + len(row)] = row
            at += len(row)
            if extra:
                out[at] = self.eos
                at += 1
        return out


_worker_encoder: _Encoder | None = None


def _init_worker(tokenizer) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(tokenizer)


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    return _worker_encoder(texts)


def _batches(docs: Documents, part: Part | None, skip: int, size: int):
    """(texts, source documents read so far) of about ``size`` characters, after the first
    ``skip`` source documents (those already in shards)."""
    texts, chars, read = [], 0, 0
    for read, (name, text) in enumerate(docs, 1):
        if read <= skip:
            continue
        kept = text if part is None else part(name, text)
        if kept:
            texts.append(kept)
            chars += len(kept)
        if chars >= size:
            yield texts, read
            texts, chars = [], 0
    if texts or read > skip:
        yield texts, read


def _tokenised(batches, tokenizer, workers: int):
    """(tokens, documents, source documents read) per batch of texts, in corpus order."""
    if workers <= 1:
        encode = _Encoder(tokenizer)
        for texts, read in batches:
            yield encode(texts), len(texts), read
        return
    # Fork: the workers inherit the tokenizer; a bounded queue keeps a few batches in flight
    # (Pool.imap would read the whole corpus ahead into its task queue).
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, _init_worker, (tokenizer,)) as pool:
        pending: deque = deque()
        for texts, read in batches:
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), len(texts), read))
            if len(pending) >= 2 * workers:
                result, count, done = pending.popleft()
                yield result.get(), count, done
        while pending:
            result, count, done = pending.popleft()
            yield result.get(), count, done


# -------------------------------------------------------------------------------- writing
def _read_index(folder: Path) -> dict[str, Any] | None:
    path = folder / "index.json"
    if not path.exists():
        return None
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(
            f"{folder} holds shards of format version {index.get('format')}, this odeify reads "
            f"version {FORMAT}; delete the folder (or prepare into another) to write them again"
        )
    return index


def _start(out: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The index to continue: a finished or unfinished one of the same identity, else a fresh
    one (an unfinished run of another identity is discarded; a finished one is an error)."""
    index = _read_index(out)
    if index is not None and {k: index.get(k) for k in identity} == identity:
        if not index["complete"]:
            for stray in out.glob("*.tmp"):  # the shard being written when the run stopped
                stray.unlink()
        return index
    if index is not None and index["complete"]:
        changed = sorted(k for k in identity if index.get(k) != identity[k])
        raise ValueError(
            f"{out} already holds shards of another preparation (different {', '.join(changed)}); "
            "delete it or prepare into another folder"
        )
    if index is not None:
        for shard in index["shards"]:
            (out / shard["file"]).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for stray in out.glob("*.tmp"):
        stray.unlink()
    fresh = {**identity, "complete": False, "shards": [], "documents": 0, "tokens": 0}
    return {**fresh, "read": 0, "skipped": [], "digest": None}


class _Writer:
    """Appends token arrays to the open shard; closes it (fsync, rename, index) once it holds
    ``shard_tokens``, at a batch boundary, so every listed shard ends after a whole batch."""

    def __init__(self, out: Path, index: dict[str, Any], shard_tokens: int):
        self.out, self.index, self.shard_tokens = out, index, shard_tokens
        self.file = self.hash = None
        self.pending = self.pending_docs = 0
        self.read = index["read"]

    def append(self, tokens: np.ndarray, documents: int, read: int) -> None:
        if self.file is None and len(tokens):
            self.name = f"shard-{len(self.index['shards']):05d}.{self.index['dtype']}"
            # Open across appends until the shard is full; close_shard closes it.
            self.file = open(self.out / (self.name + ".tmp"), "wb")  # noqa: SIM115
            self.hash = hashlib.sha256()
        if len(tokens):
            data = tokens.tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.pending += len(tokens)
            self.pending_docs += documents
        self.read = read
        if self.pending >= self.shard_tokens:
            self.close_shard()

    def close_shard(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.out / (self.name + ".tmp"), self.out / self.name)
            digest = self.hash.hexdigest()
            index = self.index
            shard = {"file": self.name, "tokens": self.pending, "documents": self.pending_docs}
            index["shards"].append({**shard, "sha256": digest})
            chain = (index["digest"] or "") + digest
            index["digest"] = hashlib.sha256(chain.encode()).hexdigest()
            index["tokens"] += self.pending
            index["documents"] += self.pending_docs
            self.file, self.pending, self.pending_docs = None, 0, 0
        self.index["read"] = self.read
        self._write_index()

    def finish(self, skipped: list[str]) -> None:
        self.close_shard()
        self.index["skipped"] = sorted(set(self.index["skipped"]) | set(skipped))
        self.index["complete"] = True
        self._write_index()

    def _write_index(self) -> None:
        write_text(self.out / "index.json", json.dumps(self.index, indent=1))


def _summarise(spec: str, index: dict[str, Any], seconds: float, tokens_before: int) -> None:
    size = sum(s["tokens"] for s in index["shards"]) * np.dtype(index["dtype"]).itemsize
    skipped = index["skipped"]
    rate = (index["tokens"] - tokens_before) / max(seconds, 1e-9)
    print(
        f"prepared {spec}: {index['documents']:,} documents, {index['tokens']:,} tokens in "
        f"{len(index['shards'])} shard(s) ({size / 1e6:,.1f} MB), {rate:,.0f} tokens/s"
        + (
            f"; skipped {len(skipped)} file(s) that are not UTF-8 text: {', '.join(skipped[:5])}"
            if skipped
            else ""
        )
    )
