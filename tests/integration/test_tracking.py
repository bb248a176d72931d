"""Integration tests for harness.tracking: RunTracker against a real MLflow SQLite store in a temp folder.

Covers params, buffered metrics, per-head entropy metrics and their history, and the run record
(config.yaml, environment.json). Covers the final artifacts (heatmaps, npz, thresholds, the model in
transformers format) and load_run_model. Covers run status on errors, nested runs, resume, metric-name
sanitizing, tracking-URI resolution, and three processes creating one new store at once.

Run: pytest -m integration tests/integration/test_tracking.py
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from harness.config import TrackingConfig, flatten, to_dict
from harness.modeling import EntropyGPTConfig, EntropyGPTForCausalLM
from harness.tracking import (
    DEFAULT_TRACKING_URI,
    RunTracker,
    load_run_model,
    make_client,
    resolve_tracking_uri,
    sanitize_metric_name,
)

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_TEXT = "the cat sat on the mat and the dog sat on the log " * 20


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its tables takes seconds, so tests share it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def run_config(tiny_config, store_uri):
    """Return a factory: run_config(*overrides) -> a tiny RunConfig that logs to the module's store."""

    def make(*overrides):
        cfg = tiny_config(overrides=overrides)
        cfg.tracking.tracking_uri = store_uri
        return cfg

    return make


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a word-level BPE of at most 64 tokens on a fixed text, offline."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    backend.train_from_iterator([TOKENIZER_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>",
                                   pad_token="<|endoftext|>")


def build_model() -> EntropyGPTForCausalLM:
    config = EntropyGPTConfig(vocab_size=64, n_positions=8, n_layer=2, n_head=2, n_embd=16)
    return EntropyGPTForCausalLM(config).eval()


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    """Return every artifact file path of a run, recursively."""
    paths = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            paths |= artifact_paths(client, run_id, info.path)
        else:
            paths.add(info.path)
    return paths


def metric_values(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_run_round_trip(run_config, store_uri, tmp_path):
    cfg = run_config("train.max_steps=3")
    model, tokenizer = build_model(), build_tokenizer()
    head_entropy = [np.arange(6, dtype=np.float64).reshape(2, 3) + step for step in range(3)]  # (L=2, H=3)

    # log three steps, then the final artifacts
    tracker = RunTracker(cfg, run_name="round-trip", tags={"harness.kind": "test"})
    run_id = tracker.start()
    for step in range(3):
        # numpy and torch scalars are accepted as metric values
        tracker.log_metrics({"train/loss": torch.tensor(3.0 - step), "entropy/layer_0": np.float32(0.5 * step)}, step)
        tracker.log_head_entropy(head_entropy[step], step)
        tracker.flush()
    thresholds = model.entropy_thresholds().numpy()  # (L, H)
    tracker.log_final_artifacts(head_entropy[-1], thresholds, model=model, tokenizer=tokenizer)
    tracker.end()

    # run, params and tags
    client = make_client(store_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "round-trip"
    expected_params = {key: str(value) for key, value in flatten(to_dict(cfg)).items()}
    assert run.data.params == expected_params
    assert run.data.tags["harness.config_name"] == cfg.name
    assert run.data.tags["harness.kind"] == "test"
    assert run.data.tags["harness.code_version"]
    assert "harness.status_reason" not in run.data.tags

    # metric histories
    assert metric_values(client, run_id, "train/loss") == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert metric_values(client, run_id, "entropy/layer_0") == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert metric_values(client, run_id, "entropy/head/L1_H2") == [(s, 5.0 + s) for s in range(3)]
    head_keys = {key for key in run.data.metrics if key.startswith("entropy/head/")}
    assert head_keys == {f"entropy/head/L{layer}_H{head}" for layer in range(2) for head in range(3)}

    # artifact list
    paths = artifact_paths(client, run_id)
    for expected in ("config.yaml", "environment.json", "plots/head_entropy.png", "plots/thresholds.png",
                     "entropy_history.npz", "thresholds.npy", "model/config.json", "model/model.safetensors",
                     "model/tokenizer.json", "model/tokenizer_config.json"):
        assert expected in paths, f"{expected} missing from {sorted(paths)}"

    # artifacts sit next to the database file, not under the current directory
    artifact_uri = run.info.artifact_uri
    db_folder = Path(store_uri[len("sqlite:///"):]).parent
    assert artifact_uri.startswith((db_folder / "mlartifacts").as_uri())

    # artifact contents
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "download")))
    assert yaml.safe_load((local / "config.yaml").read_text()) == to_dict(cfg)
    environment = json.loads((local / "environment.json").read_text())
    assert environment["packages"]["mlflow"] == "3.17.2"
    assert environment["cuda_available"] == torch.cuda.is_available()
    assert environment["device_name"]
    assert environment["argv"] == sys.argv
    history = np.load(local / "entropy_history.npz")
    assert history["steps"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(history["head_entropy"], np.stack(head_entropy))
    np.testing.assert_allclose(np.load(local / "thresholds.npy"), thresholds)
    assert (local / "plots" / "head_entropy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the logged model reproduces the original logits
    loaded_model, loaded_tokenizer = load_run_model(run_id, store_uri)
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.eos_token == "<|endoftext|>"


def test_exception_marks_run_failed(run_config, store_uri):
    with pytest.raises(RuntimeError, match="loss exploded"):
        with RunTracker(run_config()) as tracker:
            tracker.log_metrics({"train/loss": 1.0}, 0)
            raise RuntimeError("loss exploded")

    run = make_client(store_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert "loss exploded" in run.data.tags["harness.status_reason"]
    assert run.data.metrics["train/loss"] == 1.0  # buffered metrics are flushed on failure


def test_keyboard_interrupt_marks_run_killed(run_config, store_uri):
    with pytest.raises(KeyboardInterrupt):
        with RunTracker(run_config()) as tracker:
            raise KeyboardInterrupt

    run = make_client(store_uri).get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["harness.status_reason"] == "interrupted"


def test_end_inside_with_keeps_status(run_config, store_uri):
    with RunTracker(run_config()) as tracker:
        tracker.end("KILLED", reason="pruned at step 10")

    run = make_client(store_uri).get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["harness.status_reason"] == "pruned at step 10"


def test_nested_run_has_parent_tag(run_config, store_uri):
    with RunTracker(run_config(), run_name="study") as parent:
        with RunTracker(run_config(), run_name="trial_0", parent_run_id=parent.run_id) as child:
            child.log_metrics({"val/ppl": 12.5}, 1)

    client = make_client(store_uri)
    child_run = client.get_run(child.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child_run.info.experiment_id == client.get_run(parent.run_id).info.experiment_id
    assert "mlflow.parentRunId" not in client.get_run(parent.run_id).data.tags


def test_resume_continues_same_run(run_config, store_uri, tmp_path):
    cfg = run_config("train.max_steps=4")
    first = RunTracker(cfg)
    run_id = first.start()
    for step in range(3):
        first.log_metrics({"train/loss": 10.0 - step}, step)
        first.log_head_entropy(np.full((2, 3), float(step)), step)
    first.end("FAILED", reason="crashed")

    # resume from a checkpoint at step 2 with a changed config: step 2 is logged again
    resumed_cfg = run_config("train.max_steps=6")
    second = RunTracker(resumed_cfg, run_id=run_id)
    assert second.start() == run_id
    for step in range(2, 5):
        second.log_metrics({"train/loss": 20.0 - step}, step)
        second.log_head_entropy(np.full((2, 3), 10.0 + step), step)
    second.log_final_artifacts(np.full((2, 3), 14.0), None)
    second.end()

    client = make_client(store_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4"  # the first start's params are kept
    assert run.data.tags["harness.resume_count"] == "1"
    assert run.data.tags["harness.previous_status_reason"] == "crashed"
    assert "harness.status_reason" not in run.data.tags
    steps = [step for step, _ in metric_values(client, run_id, "train/loss")]
    assert steps == [0, 1, 2, 2, 3, 4]

    # the resume record is logged beside the original, and the history has one entry per step
    paths = artifact_paths(client, run_id)
    assert {"config.yaml", "resume_1/config.yaml", "resume_1/environment.json"} <= paths
    assert "thresholds.npy" not in paths
    local = client.download_artifacts(run_id, "entropy_history.npz", str(tmp_path))
    history = np.load(local)
    assert history["steps"].tolist() == [0, 1, 2, 3, 4]
    assert history["head_entropy"][:, 0, 0].tolist() == [0.0, 1.0, 12.0, 13.0, 14.0]


def test_empty_experiment_name_raises(run_config):
    cfg = run_config()
    cfg.tracking.experiment = ""
    with pytest.raises(ValueError, match="invalid tracking.experiment"):
        RunTracker(cfg).start()


def test_resume_unknown_run_raises(run_config):
    with pytest.raises(ValueError, match="cannot resume MLflow run"):
        RunTracker(run_config(), run_id="0" * 32).start()


def test_metrics_split_into_batches(run_config, store_uri):
    metrics = {f"probe/m{i}": float(i) for i in range(2500)}
    with RunTracker(run_config()) as tracker:
        tracker.log_metrics(metrics, 0)

    logged = make_client(store_uri).get_run(tracker.run_id).data.metrics
    assert logged == metrics


def test_metric_names_sanitized(run_config, store_uri):
    with RunTracker(run_config()) as tracker:
        tracker.log_metrics({"val/ppl@T=128": 3.0, "entropy/layer_0": 1.0}, 0)

    logged = make_client(store_uri).get_run(tracker.run_id).data.metrics
    assert logged == {"val/ppl_T_128": 3.0, "entropy/layer_0": 1.0}


@pytest.mark.parametrize("name, expected", [
    ("train/loss", "train/loss"),
    ("entropy/head/L0_H1", "entropy/head/L0_H1"),
    ("lm eval.arc-easy/acc", "lm eval.arc-easy/acc"),
    ("a:b", "a_b"),
    ("/x//y/", "x/y"),
    ("../up", "__/up"),
    ("./here", "here"),
    ("", "_"),
])
def test_sanitize_metric_name(name, expected):
    assert sanitize_metric_name(name) == expected


def test_log_head_entropy_rejects_1d(run_config):
    with RunTracker(run_config()) as tracker:
        with pytest.raises(ValueError, match="n_layer, n_head"):
            tracker.log_head_entropy(np.zeros(3), 0)


def test_log_metrics_rejects_non_number(run_config):
    with RunTracker(run_config()) as tracker:
        with pytest.raises(ValueError, match="invalid metric 'val/ppl'='high'"):
            tracker.log_metrics({"val/ppl": "high"}, 0)


def test_logging_before_start_raises(run_config):
    tracker = RunTracker(run_config())
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"train/loss": 1.0}, 0)
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_head_entropy(np.zeros((2, 3)), 0)


def test_end_rejects_unknown_status(run_config):
    with RunTracker(run_config()) as tracker:
        with pytest.raises(ValueError, match="invalid run status 'DONE'"):
            tracker.end("DONE")


def test_load_run_model_without_model(run_config, store_uri):
    with RunTracker(run_config("tracking.log_model=false")) as tracker:
        tracker.log_final_artifacts(np.zeros((2, 3)), None, model=build_model(), tokenizer=build_tokenizer())

    assert not any(path.startswith("model/") for path in artifact_paths(make_client(store_uri), tracker.run_id))
    with pytest.raises(ValueError, match="has no model/ artifact"):
        load_run_model(tracker.run_id, store_uri)


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/env.db")
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/stores/env.db"

    with_query = TrackingConfig(tracking_uri="sqlite:///runs.db?timeout=30")
    assert resolve_tracking_uri(with_query) == f"sqlite:///{tmp_path.resolve()}/runs.db?timeout=30"

    explicit = TrackingConfig(tracking_uri="sqlite:////data/runs.db")
    assert resolve_tracking_uri(explicit) == "sqlite:////data/runs.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"


def test_concurrent_start_on_new_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh.db"
    script = textwrap.dedent(f"""
        from harness.config import load_config
        from harness.tracking import RunTracker
        cfg = load_config(None, ["model.size=tiny"])
        cfg.tracking.tracking_uri = {uri!r}
        with RunTracker(cfg) as tracker:
            tracker.log_metrics({{"train/loss": 1.0}}, 0)
        print(tracker.run_id)
    """)

    # three processes create the tables and the experiment of the same new database at once
    processes = [
        subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-2000:]

    client = make_client(uri)
    experiments = [e for e in client.search_experiments() if e.name == "entropy-harness"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(stdout.strip() for stdout, _ in outputs)
    assert all(run.info.status == "FINISHED" for run in runs)
