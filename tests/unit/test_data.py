"""Unit tests for harness.corpus and harness.data on small generated folder corpora.

Covers dedupe, the hash-based train/val/test split, the fingerprint, skipped non-UTF-8 files, the
errors for empty, undecodable, unknown and hub corpora, the tokenizer and chunk caches, the
max_train_tokens cap, split_texts, and batch_iterator's determinism and resume.
Run with `pytest tests/unit/test_data.py`.
"""

import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness.config import DataConfig
from harness.corpus import load_corpus, split_files
from harness.data import batch_iterator, load_tokenizer, prepare_data, split_texts

WORDS = "def return class import self value list dict print lambda yield async await none true false".split()


def write_corpus(folder, n_files=30, words_per_file=300, prefix="doc"):
    """Write n_files text files of seeded random words into folder and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        rng = random.Random(f"{prefix}{i}")
        text = " ".join(rng.choice(WORDS) for _ in range(words_per_file)) + "\n"
        (folder / f"{prefix}_{i:03d}.txt").write_text(text)
    return folder


def data_config(tmp_path, corpus, **overrides):
    fields = dict(corpus=str(corpus), context_length=16, vocab_size=300, cache_dir=str(tmp_path / "cache"),
                  val_fraction=0.2, test_fraction=0.2)
    fields.update(overrides)
    return DataConfig(**fields)


# --- corpus ---------------------------------------------------------------------------------


def test_corpus_dedupes_by_content(tmp_path):
    folder = write_corpus(tmp_path / "docs", n_files=5)
    (folder / "zz_copy.txt").write_bytes((folder / "doc_002.txt").read_bytes())
    corpus = load_corpus(data_config(tmp_path, folder))
    assert len(corpus.files) == 5
    assert "doc_002.txt" in corpus.files
    assert "zz_copy.txt" not in corpus.files
    assert corpus.files == sorted(corpus.files)


def test_corpus_split_is_stable(tmp_path):
    folder = write_corpus(tmp_path / "docs", n_files=40)
    cfg = data_config(tmp_path, folder)
    before = load_corpus(cfg)
    assert before.splits == load_corpus(cfg).splits
    assert sorted(f for files in before.splits.values() for f in files) == before.files

    # Adding files leaves every old file in its split
    write_corpus(folder, n_files=20, prefix="extra")
    after = load_corpus(cfg)
    for split, files in before.splits.items():
        assert set(files) <= set(after.splits[split])


def test_split_does_not_use_python_hash(tmp_path):
    files = [f"pkg/module_{i}.py" for i in range(200)]
    expected = split_files(files, 0.1, 0.1)
    code = (
        "import json, sys; from harness.corpus import split_files; "
        "print(json.dumps(split_files(json.loads(sys.argv[1]), 0.1, 0.1)))"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [sys.executable, "-c", code, json.dumps(files)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == expected


def test_split_fills_empty_eval_splits():
    splits = split_files(["a.txt", "b.txt", "c.txt"], 0.01, 0.01)
    assert len(splits["val"]) == 1
    assert len(splits["test"]) == 1
    assert len(splits["train"]) == 1


def test_fingerprint_tracks_file_set(tmp_path):
    folder = write_corpus(tmp_path / "docs", n_files=6)
    cfg = data_config(tmp_path, folder)
    first = load_corpus(cfg).fingerprint
    assert load_corpus(cfg).fingerprint == first

    # A changed file changes the fingerprint
    (folder / "doc_001.txt").write_text("changed text\n")
    changed = load_corpus(cfg).fingerprint
    assert changed != first

    # Other split fractions change it too
    assert load_corpus(data_config(tmp_path, folder, val_fraction=0.1)).fingerprint != changed


def test_undecodable_files_skipped_and_counted(tmp_path, caplog):
    folder = write_corpus(tmp_path / "docs", n_files=4)
    (folder / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    (folder / "blob.bin").write_bytes(bytes(range(256)))
    with caplog.at_level(logging.INFO, logger="harness.corpus"):
        corpus = load_corpus(data_config(tmp_path, folder))
    assert corpus.skipped == 2
    assert "latin1.txt" not in corpus.files
    skip_lines = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(skip_lines) == 1
    assert "skipped 2 files" in skip_lines[0]


def test_empty_folder_rejected(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ValueError, match="contains no files") as err:
        load_corpus(data_config(tmp_path, folder))
    assert str(folder) in str(err.value)


def test_all_undecodable_folder_rejected(tmp_path):
    folder = tmp_path / "binary"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\xff\xfe\xfa")
    (folder / "b.txt").write_bytes("\xe9t\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        load_corpus(data_config(tmp_path, folder))


def test_unknown_corpus_rejected(tmp_path):
    with pytest.raises(ValueError, match="stdlib-python") as err:
        load_corpus(data_config(tmp_path, "no-such-corpus"))
    assert "no-such-corpus" in str(err.value)
    assert "hf:" in str(err.value)


def test_single_file_corpus_rejected(tmp_path):
    folder = write_corpus(tmp_path / "docs", n_files=1)
    with pytest.raises(ValueError, match="at least 3"):
        load_corpus(data_config(tmp_path, folder / "doc_000.txt"))


def test_glob_corpus_selects_matches(tmp_path):
    folder = write_corpus(tmp_path / "docs" / "sub", n_files=5)
    (folder / "notes.md").write_text("not matched\n")
    corpus = load_corpus(data_config(tmp_path, tmp_path / "docs" / "**" / "*.txt"))
    assert corpus.root == str((tmp_path / "docs").resolve())
    assert corpus.files == [f"sub/doc_{i:03d}.txt" for i in range(5)]


def test_hub_corpus_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="unreachable") as err:
        load_corpus(data_config(tmp_path, "hf:wikitext:wikitext-2-raw-v1"))
    assert "stdlib-python" in str(err.value)


# --- tokenizer and chunks -------------------------------------------------------------------


def test_bpe_vocab_too_small_rejected(tmp_path):
    cfg = data_config(tmp_path, write_corpus(tmp_path / "docs", n_files=5), vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size=100"):
        load_tokenizer(cfg, load_corpus(cfg))


def test_tokenizer_special_tokens(tmp_path):
    cfg = data_config(tmp_path, write_corpus(tmp_path / "docs", n_files=5))
    tokenizer = load_tokenizer(cfg, load_corpus(cfg))
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 16
    assert len(tokenizer) <= 300
    assert tokenizer.decode(tokenizer.encode("def  return\n\tyield")) == "def  return\n\tyield"


def test_prepare_data_cache_hit(tmp_path):
    cfg = data_config(tmp_path, write_corpus(tmp_path / "docs"))
    first = prepare_data(cfg)
    assert not first.cache_hit
    assert first.train.ndim == 2
    assert first.train.shape[1] == 16
    assert first.train.dtype == np.uint16
    assert int(first.train.max()) < len(first.tokenizer)
    assert len(first.val) > 0
    assert len(first.test) > 0
    cache = tmp_path / "cache"
    tokenizer_file = next((cache / "tokenizers").glob("*-bpe300/tokenizer.json"))
    chunk_file = next((cache / "chunks").glob("*-bpe300-T16/train.npy"))
    mtimes = (tokenizer_file.stat().st_mtime_ns, chunk_file.stat().st_mtime_ns)

    # The second call loads both caches and retrains nothing
    second = prepare_data(cfg)
    assert second.cache_hit
    assert (tokenizer_file.stat().st_mtime_ns, chunk_file.stat().st_mtime_ns) == mtimes
    assert isinstance(second.train, np.memmap)
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    assert not list(cache.rglob(".tmp-*"))


def test_chunks_pack_documents_in_order(tmp_path):
    cfg = data_config(tmp_path, write_corpus(tmp_path / "docs"))
    data = prepare_data(cfg)
    eos = data.tokenizer.eos_token_id
    first_doc = split_texts(cfg, "train")[0]
    expected = data.tokenizer.encode(first_doc) + [eos]
    packed = np.asarray(data.train).reshape(-1)
    np.testing.assert_array_equal(packed[: len(expected)], expected)

    # One eos per document, except in the dropped remainder
    n_docs = len(data.corpus.splits["train"])
    assert n_docs - 1 <= int((packed == eos).sum()) <= n_docs


def test_max_train_tokens_caps_chunks(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    full = prepare_data(data_config(tmp_path, folder))
    capped = prepare_data(data_config(tmp_path, folder, max_train_tokens=16 * 10 + 5))
    assert capped.train.shape == (10, 16)
    assert len(full.train) > 10
    assert capped.val.shape == full.val.shape
    rows = {tuple(row) for row in np.asarray(full.train)}
    assert all(tuple(row) in rows for row in capped.train)
    with pytest.raises(ValueError, match="max_train_tokens=5"):
        prepare_data(data_config(tmp_path, folder, max_train_tokens=5))


def test_split_texts_returns_documents(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    cfg = data_config(tmp_path, folder)
    corpus = load_corpus(cfg)
    texts = split_texts(cfg, "val")
    assert texts == [(folder / f).read_text() for f in corpus.splits["val"]]
    with pytest.raises(ValueError, match="validation"):
        split_texts(cfg, "validation")


# --- batches --------------------------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batch_iterator_deterministic():
    chunks = np.arange(10 * 4, dtype=np.uint16).reshape(10, 4)
    first = take(batch_iterator(chunks, 3, seed=7), 8)
    again = take(batch_iterator(chunks, 3, seed=7), 8)
    other = take(batch_iterator(chunks, 3, seed=8), 8)
    assert first[0].shape == (3, 4)
    assert first[0].dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_batch_iterator_covers_each_epoch():
    chunks = np.arange(12 * 2, dtype=np.uint16).reshape(12, 2)
    batches = take(batch_iterator(chunks, 4, seed=0), 6)
    for epoch in (batches[:3], batches[3:]):
        rows = torch.cat(epoch)[:, 0].tolist()
        assert sorted(rows) == list(range(0, 24, 2))


def test_batch_iterator_resume_matches():
    chunks = np.arange(10 * 4, dtype=np.uint16).reshape(10, 4)
    full = take(batch_iterator(chunks, 3, seed=5), 12)
    resumed = take(batch_iterator(chunks, 3, seed=5, start_step=7), 5)
    assert all(torch.equal(a, b) for a, b in zip(full[7:], resumed))


def test_batch_iterator_batch_larger_than_split():
    chunks = np.arange(3 * 2, dtype=np.uint16).reshape(3, 2)
    batch = next(batch_iterator(chunks, 5, seed=0))
    assert batch.shape == (5, 2)
    with pytest.raises(ValueError, match="at least one chunk"):
        next(batch_iterator(chunks[:0], 2, seed=0))
