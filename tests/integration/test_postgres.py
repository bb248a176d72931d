"""Integration tests of scale-out against a real PostgreSQL server and a real MLflow tracking server.

Covers:
- three `harness study FILE --worker` processes on one study in PostgreSQL finish the trial budget,
  and every trial is recorded once in Optuna and once in MLflow;
- a worker killed with SIGKILL mid-trial leaves its trial failed through the heartbeat, and a live
  worker runs its retry and closes its MLflow run;
- `make server` serves MLflow on 127.0.0.1 with a PostgreSQL backend store. A run logged over HTTP
  by RunTracker reads back with its metrics and artifacts, and stopping the server's process group
  leaves no process behind.

The server comes from `make test` (scripts/postgres.sh start). Run alone, the module starts it with
the same script when the default URL does not respond, and stops it at the end. When no server can
start, every test here is skipped with the error. Each test gets its own database, dropped afterwards.
The corpus is the `email` package of the running interpreter's standard library (real code, small).
"""

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.config import load_config
from harness.study import budget_counts, main_study
from harness.tracking import RunTracker

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "email")
PGPORT = os.environ.get("PGPORT", "55432")
DEFAULT_URL = f"postgresql://postgres@127.0.0.1:{PGPORT}/harness_test"
STATE_TO_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


# -----------------------------------------------------------------------------
# PostgreSQL server and databases

def _libpq_url(url: str) -> str:
    """Return a SQLAlchemy URL (postgresql+driver://...) as a libpq connection URI."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgresql") else url


def _connect_error(url: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=5):
            return None
    except psycopg.Error as err:
        return str(err).strip()


def _postgres_script(command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPORT": PGPORT, "PG_INSTALL": "0"}
    return subprocess.run(["bash", "scripts/postgres.sh", command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def postgres_url():
    """Return the URL of a reachable test database, starting the local server when it is down."""
    url = os.environ.get("HARNESS_TEST_POSTGRES_URL", DEFAULT_URL)
    error = _connect_error(url)
    started = False
    if error is not None:
        if url != DEFAULT_URL:
            pytest.skip(f"PostgreSQL at HARNESS_TEST_POSTGRES_URL is not reachable: {error}")
        result = _postgres_script("start")
        if result.returncode != 0:
            pytest.skip(f"no PostgreSQL server on 127.0.0.1:{PGPORT} ({error}) and scripts/postgres.sh start "
                        f"failed: {(result.stderr or result.stdout).strip()[-500:]}")
        started = True
        error = _connect_error(url)
        if error is not None:
            pytest.skip(f"PostgreSQL started on 127.0.0.1:{PGPORT} but {url} is not reachable: {error}")
    yield url
    if started:
        _postgres_script("stop")


@pytest.fixture
def postgres_db(postgres_url):
    """Return the SQLAlchemy URL of a new, empty database; it is dropped after the test."""
    import psycopg
    from psycopg import sql

    name = f"harness_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq_url(postgres_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = postgres_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(_libpq_url(postgres_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# -----------------------------------------------------------------------------
# Study files and worker processes

def _write_study(folder: Path, storage: str, tracking_uri: str, **changes) -> Path:
    study = {
        "name": "pg",
        "preset": "tiny",
        "overrides": {
            "data.corpus": CORPUS, "data.vocab_size": 300, "data.cache_dir": str(folder / "cache"),
            "train.max_steps": 6, "train.eval_interval": 3, "train.out_dir": str(folder / "runs"),
            "tracking.log_model": False,
        },
        "search_space": {"entropy.loss_coeff": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True}},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "n_trials": 3,
        "storage": storage,
        "tracking_uri": tracking_uri,
    }
    study.update(changes)
    path = folder / "pg.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _start_worker(path: Path, folder: Path, log_name: str, overrides=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "harness.cli", "study", str(path), *overrides, "--worker"]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    with open(folder / log_name, "w") as log:
        return subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _runs(tracking_uri: str, study: str = "pg"):
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("entropy-harness")
    runs = client.search_runs([experiment.experiment_id], f"tags.`harness.study` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("harness.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    return parents, children


def _check_trials_match_runs(study: optuna.Study, parents, children) -> None:
    """Every trial has one MLflow child run under the one parent run, with a matching state."""
    assert len(parents) == 1
    run_ids = [t.user_attrs["mlflow_run_id"] for t in study.trials]
    assert len(run_ids) == len(set(run_ids))
    assert sorted(r.info.run_id for r in children) == sorted(run_ids)
    by_run = {r.info.run_id: r for r in children}
    for trial in study.trials:
        run = by_run[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == STATE_TO_STATUS[trial.state.name]
        assert run.data.tags["harness.trial"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"


def test_three_workers_fill_one_study(tmp_path, postgres_db, mlflow_db):
    tracking_uri = mlflow_db(tmp_path)
    n_trials = 5
    path = _write_study(tmp_path, postgres_db, tracking_uri, n_trials=n_trials)

    # three workers start together on a study that does not exist yet
    workers = [_start_worker(path, tmp_path, f"worker_{i}.log") for i in range(3)]
    try:
        codes = [w.wait(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
    logs = "\n".join((tmp_path / f"worker_{i}.log").read_text()[-2000:] for i in range(3))
    assert codes == [0, 0, 0], logs

    study = optuna.load_study(study_name="pg", storage=postgres_db)
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states
    assert "FAIL" not in states, logs
    assert budget_counts(study)[0] >= n_trials
    # two workers that check the budget at the same moment may each start the last trial
    assert len(study.trials) <= n_trials + 2
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    # each worker draws its own sampler seed, so no two trials sample the same lambda
    assert len({t.params["entropy.loss_coeff"] for t in study.trials}) == len(study.trials)
    parents, children = _runs(tracking_uri)
    _check_trials_match_runs(study, parents, children)


def _wait_for_running_trial(storage: str, deadline: float) -> bool:
    """Wait until a trial is RUNNING with its MLflow run created."""
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name="pg", storage=storage)
            if any(t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in study.trials):
                return True
        except KeyError:
            pass
        time.sleep(0.5)
    return False


def test_killed_worker_trial_failed_and_retried(tmp_path, postgres_db, mlflow_db, monkeypatch):
    tracking_uri = mlflow_db(tmp_path)
    path = _write_study(tmp_path, postgres_db, tracking_uri, n_trials=2)

    # worker A starts a long trial and is killed in the middle of it
    worker = _start_worker(path, tmp_path, "worker_a.log", ["train.max_steps=5000", "train.eval_interval=1000"])
    try:
        assert _wait_for_running_trial(postgres_db, time.time() + 120), (tmp_path / "worker_a.log").read_text()[-3000:]
        time.sleep(1)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    # worker B (this process) runs a trial, waits for A's heartbeat to go stale, then runs the retry
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    assert main_study(str(path), ["train.max_steps=6", "train.eval_interval=3"], worker=True) == 0

    study = optuna.load_study(study_name="pg", storage=postgres_db)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].system_attrs.get("failed_trial") == 0
    assert trials[2].params == trials[0].params
    parents, children = _runs(tracking_uri)
    _check_trials_match_runs(study, parents, children)
    killed = next(r for r in children if r.info.run_id == trials[0].user_attrs["mlflow_run_id"])
    assert killed.data.tags["harness.trial_state"] == "FAIL"
    assert "stale heartbeat" in killed.data.tags["harness.status_reason"]


# -----------------------------------------------------------------------------
# make server

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, deadline: float) -> bool:
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(pgid: int) -> None:
    """Stop a process group with SIGTERM, then SIGKILL after 15 s."""
    if not _group_alive(pgid):
        return
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + 15
    while time.time() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


def test_make_server_logs_over_http(tmp_path, postgres_db):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts = tmp_path / "artifacts"
    # -o keeps make from reinstalling the venv when pyproject.toml is newer than its stamp
    cmd = ["make", "--no-print-directory", "-o", ".venv/.installed", "server", f"PORT={port}",
           f"SERVER_BACKEND_URI={postgres_db}", f"ARTIFACT_ROOT={artifacts}"]
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert _wait_healthy(url, server, time.time() + 180), log_path.read_text()[-3000:]

        # log a run over HTTP, as a worker with MLFLOW_TRACKING_URI=http://127.0.0.1:PORT does
        cfg = load_config("tiny", [f"tracking.tracking_uri={url}", "tracking.log_model=false"])
        with RunTracker(cfg, run_name="over_http", tags={"harness.role": "smoke"}) as tracker:
            tracker.log_metrics({"val/ppl": 12.5}, step=3)
            tracker.log_head_entropy(np.full((2, 2), 1.5), step=3)
            tracker.log_final_artifacts(np.full((2, 2), 1.5), np.full((2, 2), 0.5))

        # read it back through the server
        client = MlflowClient(url)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert run.data.metrics["val/ppl"] == 12.5
        assert run.data.metrics["entropy/head/L1_H1"] == 1.5
        names = {a.path for a in client.list_artifacts(tracker.run_id)}
        assert {"config.yaml", "environment.json", "entropy_history.npz", "thresholds.npy", "plots"} <= names
        stored = list(artifacts.rglob("thresholds.npy"))
        assert len(stored) == 1
        np.testing.assert_allclose(np.load(stored[0]), np.full((2, 2), 0.5))
    finally:
        _stop_group(server.pid)
        server.wait(timeout=30)
    assert not _group_alive(server.pid)
