"""Integration tests of `harness train`: real corpus, real MLflow store, checkpoints and resume.

Covers: a 30-step training of the tiny preset on the stdlib corpus leaves one MLflow run with the
flattened config as params, the training and entropy metrics and the artifacts, and its validation
perplexity falls; a run stopped after a checkpoint and resumed matches the uninterrupted run's loss;
bad corpora and a non-finite loss end with a clear message and a non-zero exit code.
"""

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from harness.config import flatten, load_config, to_dict
from harness.tracking import RunTracker
from harness.train import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _config(tmp_path, cache_dir, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config("tiny", [
        "data.corpus=stdlib-python", "data.vocab_size=512", f"data.cache_dir={cache_dir}",
        f"train.out_dir={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides,
    ])


def _metric_history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_train_30_steps_records_run(tmp_path, cache_dir, mlflow_db):
    mlflow_db(tmp_path)
    cfg = _config(tmp_path, cache_dir, "train.max_steps=30", "train.eval_interval=10", "optim.lr=3e-3")
    with RunTracker(cfg, run_name="tiny-30") as tracker:
        result = train(cfg, tracker=tracker)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    run = client.get_run(result.run_id)

    # params: the flattened resolved config
    expected = {k: str(v) for k, v in flatten(to_dict(cfg)).items()}
    for key in ("train.max_steps", "train.batch_size", "data.corpus", "data.context_length", "entropy.loss_coeff",
                "entropy.tolerance", "entropy.threshold_init", "entropy.reduction", "model.size"):
        assert run.data.params[key] == expected[key]

    # metrics: training, validation and entropy statistics
    for key in ("train/loss", "train/ce", "train/entropy_loss", "train/lr", "train/tok_per_s", "val/ppl",
                "entropy/layer_0", "entropy/bin_0", "entropy/overload_fraction", "entropy/collapse_fraction",
                "entropy/head/L0_H0", "test/ppl"):
        assert key in run.data.metrics, key
    val_ppl = _metric_history(client, result.run_id, "val/ppl")
    assert val_ppl[30] < val_ppl[0]

    # artifacts
    names = {a.path for a in client.list_artifacts(result.run_id)}
    names |= {a.path for a in client.list_artifacts(result.run_id, "plots")}
    names |= {a.path for a in client.list_artifacts(result.run_id, "model")}
    for name in ("config.yaml", "environment.json", "entropy_history.npz", "thresholds.npy",
                 "plots/head_entropy.png", "plots/thresholds.png", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json"):
        assert name in names, name
    assert run.info.status == "FINISHED"


class StopAt(Exception):
    """Raised by the on_eval hook to stop a run after its checkpoint, like a killed process."""


def test_resume_matches_uninterrupted_run(tmp_path, cache_dir, mlflow_db):
    mlflow_db(tmp_path / "ref")
    mlflow_db(tmp_path / "resumed")
    common = ["train.max_steps=20", "train.eval_interval=10", "train.checkpoint_interval=10", "tracking.log_model=false"]

    # uninterrupted reference
    ref_cfg = _config(tmp_path / "ref", cache_dir, *common)
    with RunTracker(ref_cfg, run_name="ref") as tracker:
        ref = train(ref_cfg, tracker=tracker)
    client = MlflowClient(tracking_uri=ref_cfg.tracking.tracking_uri)
    ref_loss = _metric_history(client, ref.run_id, "train/loss")

    # stop right after the step-10 checkpoint, then resume in the same run
    cfg = _config(tmp_path / "resumed", cache_dir, *common)
    tracker = RunTracker(cfg, run_name="resumed")
    run_id = tracker.start()

    def stop(step, metrics):
        if step == 10:
            raise StopAt()

    with pytest.raises(StopAt):
        train(cfg, tracker=tracker, on_eval=stop)
    tracker.end("KILLED", reason="stopped by the test")
    tracker = RunTracker(cfg, run_name="resumed", run_id=run_id)
    tracker.start()
    train(cfg, tracker=tracker, resume=True)
    tracker.end("FINISHED")

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    resumed_loss = _metric_history(client, run_id, "train/loss")
    for step in (11, 15, 20):
        assert resumed_loss[step] == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-6)


def _harness_train(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "harness.cli", "train", "tiny", f"train.out_dir={tmp_path / 'runs'}",
           f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"data.cache_dir={tmp_path / 'cache'}",
           "data.vocab_size=300", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_empty_corpus_folder_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    done = _harness_train(tmp_path, f"data.corpus={tmp_path / 'empty'}")
    assert done.returncode == 2
    assert "empty" in done.stderr
    assert "Traceback" not in done.stderr


def test_undecodable_corpus_clear_error(tmp_path):
    folder = tmp_path / "binary"
    folder.mkdir()
    for i in range(3):
        (folder / f"blob{i}.txt").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x81]) * 50)
    done = _harness_train(tmp_path, f"data.corpus={folder}")
    assert done.returncode == 2
    assert "UTF-8" in done.stderr
    assert "Traceback" not in done.stderr


def test_hub_name_offline_clear_error(tmp_path):
    done = _harness_train(tmp_path, "data.corpus=hf:codeparrot/codeparrot-clean")
    assert done.returncode == 2
    assert "offline" in done.stderr.lower() or "unreachable" in done.stderr.lower()
    assert "Traceback" not in done.stderr


def test_non_finite_loss_exits_nonzero(tmp_path):
    corpus = str(__import__("sysconfig").get_paths()["stdlib"]) + "/email"
    done = _harness_train(tmp_path, f"data.corpus={corpus}", "optim.lr=1e6", "optim.warmup_fraction=0",
                          "optim.grad_clip=1e9", "model.ffn_scale=false", "train.max_steps=30")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "non-finite loss" in done.stderr
