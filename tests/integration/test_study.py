"""Integration tests of `harness study` with real Optuna storage (SQLite) and a real MLflow store.

Covers: a micro study gives one parent run and one child run per trial with states matching Optuna's;
a trial that raises is recorded as failed and the study goes on; a study process killed mid-trial and
started again ends with every trial recorded once in Optuna and once in MLflow, none left RUNNING.
The corpus is the `email` package of the running interpreter's standard library (real code, small).
"""

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.study import main_study

pytestmark = pytest.mark.integration

CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "email")
STATE_TO_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _write_study(folder: Path, **changes) -> Path:
    study = {
        "name": "micro",
        "preset": "tiny",
        "overrides": {
            "data.corpus": CORPUS, "data.vocab_size": 300, "data.cache_dir": str(folder / "cache"),
            "train.max_steps": 6, "train.eval_interval": 3, "train.out_dir": str(folder / "runs"),
            "tracking.log_model": False,
        },
        "search_space": {"entropy.loss_coeff": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True}},
        "sampler": {"type": "tpe", "seed": 0},
        "pruner": {"type": "none"},
        "n_trials": 3,
        "storage": f"sqlite:///{folder / 'optuna.db'}",
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
    }
    study.update(changes)
    path = folder / "micro.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _child_runs(folder: Path, study: str = "micro"):
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("entropy-harness")
    runs = client.search_runs([experiment.experiment_id], f"tags.`harness.study` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("harness.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    return client, parents, children


@pytest.fixture
def isolated(tmp_path, monkeypatch, mlflow_db):
    mlflow_db(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_micro_study_parent_and_children(isolated):
    path = _write_study(isolated)
    assert main_study(str(path), []) == 0

    study = optuna.load_study(study_name="micro", storage=f"sqlite:///{isolated / 'optuna.db'}")
    client, parents, children = _child_runs(isolated)
    assert len(study.trials) == 3
    assert len(parents) == 1
    assert len(children) == 3
    by_trial = {int(r.data.tags["harness.trial"]): r for r in children}
    for trial in study.trials:
        run = by_trial[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.info.status == STATE_TO_STATUS[trial.state.name]
        assert run.data.tags["harness.trial_state"] == trial.state.name
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "val/ppl" in run.data.metrics
        assert float(run.data.params["entropy.loss_coeff"]) == pytest.approx(trial.params["entropy.loss_coeff"])
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"study.yaml", "summary.md", "best_trial.json", "plots"} <= artifacts
    assert parents[0].info.status == "FINISHED"


def test_failing_trial_recorded_and_study_continues(isolated):
    space = {
        "data.corpus": {"type": "categorical", "choices": [CORPUS, str(isolated / "missing-corpus")]},
        "entropy.loss_coeff": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    }
    enqueue = [{"data.corpus": CORPUS}, {"data.corpus": str(isolated / "missing-corpus")}, {"data.corpus": CORPUS}]
    path = _write_study(isolated, search_space=space, enqueue=enqueue)
    assert main_study(str(path), []) == 0

    study = optuna.load_study(study_name="micro", storage=f"sqlite:///{isolated / 'optuna.db'}")
    states = [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    _, _, children = _child_runs(isolated)
    failed = [r for r in children if r.data.tags["harness.trial"] == "1"]
    assert len(failed) == 1
    assert failed[0].info.status == "FAILED"
    assert "missing-corpus" in failed[0].data.tags["harness.status_reason"]


def _running_trial_with_steps(storage: str, deadline: float) -> bool:
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name="micro", storage=storage)
            running = [t for t in study.trials if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs]
            if running:
                return True
        except KeyError:
            pass
        time.sleep(0.5)
    return False


def test_killed_study_resumes_without_duplicates(isolated):
    overrides = {"train.max_steps": 400, "train.eval_interval": 100}
    path = _write_study(isolated, n_trials=2)
    tree = yaml.safe_load(path.read_text())
    tree["overrides"].update(overrides)
    path.write_text(yaml.safe_dump(tree))
    storage = f"sqlite:///{isolated / 'optuna.db'}"

    # start the study in its own process and kill it while a trial is running
    cmd = [sys.executable, "-m", "harness.cli", "study", str(path)]
    proc = subprocess.Popen(cmd, cwd=isolated, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _running_trial_with_steps(storage, time.time() + 120)
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # start again with short trials: the dead trial is failed (and retried), the budget is completed
    tree["overrides"].update({"train.max_steps": 6, "train.eval_interval": 3})
    path.write_text(yaml.safe_dump(tree))
    assert main_study(str(path), []) == 0

    study = optuna.load_study(study_name="micro", storage=storage)
    assert all(t.state.name != "RUNNING" for t in study.trials)
    assert study.trials[0].state.name == "FAIL"
    run_ids = [t.user_attrs["mlflow_run_id"] for t in study.trials]
    assert len(run_ids) == len(set(run_ids))
    _, _, children = _child_runs(isolated)
    assert sorted(r.info.run_id for r in children) == sorted(run_ids)
    assert all(r.info.status != "RUNNING" for r in children)
    statuses = {r.info.run_id: r.info.status for r in children}
    assert statuses[run_ids[0]] == "FAILED"
