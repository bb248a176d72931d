"""Optuna studies whose trials are MLflow child runs under one parent run per study.

Each trial samples its params, builds its config (preset < study overrides < params), trains with a
pruning report at every eval interval, evaluates, and closes its MLflow run with the trial's state.
A failing trial never stops the study. A worker that dies leaves its trial RUNNING only until the
heartbeat grace period passes. Then a live worker or the next start marks it failed and enqueues a retry.

Any number of worker processes, on any machines that reach the storage, join one study. The process
that creates the study creates its MLflow parent run and enqueues the reference trials. The other
workers wait for that parent run and share it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import time
import warnings

import optuna
import sqlalchemy.exc

from harness import study_report
from harness.study_config import PRESET_KEY, StudySpec, load_study, trial_config

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 15
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
STORAGE_FORMS = ("sqlite:///<path>, postgresql://<user>[:<password>]@<host>[:<port>]/<database>, "
                 "mysql://... or journal://<path>")
STORAGE_RETRIES = 5
# how long a worker that loaded a new study waits for the creating process's MLflow parent run
PARENT_WAIT_SECONDS = 60


# -----------------------------------------------------------------------------
# Optuna pieces: storage, sampler, pruner

def redact_url(url: str) -> str:
    """Return the URL with the password of its user info replaced by ***, for logs and messages."""
    return re.sub(r"://([^/:@]*):[^/@]*@", r"://\1:***@", url)


def create_storage(url: str):
    """Return Optuna storage for a URL: an RDB (sqlite, postgresql, mysql) with heartbeat, or journal://<path>.

    postgresql:// uses SQLAlchemy 2.1's default driver psycopg (version 3); postgresql+psycopg2:// needs
    psycopg2 installed. A journal file suits a shared file system without a database server.
    """
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url[len("journal://"):]
        if not path:
            raise ValueError(f"invalid study storage {url!r}: a journal URL needs a file path, e.g. journal://optuna.log")
        # NOTE: journal storage has no heartbeat, so a killed worker's trial stays RUNNING until failed by hand
        return JournalStorage(JournalFileBackend(path))
    scheme = url.partition("://")[0].partition("+")[0]
    if "://" not in url or scheme not in RDB_SCHEMES:
        raise ValueError(f"invalid study storage {redact_url(url)!r}: accepted forms are {STORAGE_FORMS}")
    engine_kwargs = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else {"pool_pre_ping": True}

    # processes that open a new database at once race to create Optuna's tables, so a failed open is retried
    for attempt in range(1, STORAGE_RETRIES + 1):
        try:
            return _rdb_storage(url, engine_kwargs)
        except ImportError as err:
            raise ValueError(f"study storage {redact_url(url)!r} needs a database driver that is not installed "
                             f"({err}); for postgresql:// install psycopg[binary]") from err
        except sqlalchemy.exc.SQLAlchemyError as err:
            if attempt == STORAGE_RETRIES:
                raise
            log.warning("opening study storage %s failed (attempt %d of %d): %s; retrying",
                        redact_url(url), attempt, STORAGE_RETRIES, str(err).splitlines()[0])
            time.sleep(0.5 * attempt)


def _rdb_storage(url: str, engine_kwargs: dict) -> optuna.storages.RDBStorage:
    """Open an RDB storage whose trials send heartbeats; a stale trial is failed and retried once."""
    # Optuna 5 marks the heartbeat options experimental, and workers need them to recover trials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )


def _grid(spec: StudySpec) -> dict[str, list]:
    grid = {}
    for p in spec.search_space:
        if p.type == "categorical":
            grid[p.key] = list(p.choices)
        elif p.type == "fixed":
            grid[p.key] = [p.value]
        else:
            count = int(round((p.high - p.low) / p.step)) + 1
            values = [p.low + i * p.step for i in range(count)]
            grid[p.key] = [int(v) for v in values] if p.type == "int" else [round(v, 12) for v in values]
    return grid


def create_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    opts = dict(spec.sampler)
    kind, seed = opts.pop("type"), opts.pop("seed", None)
    if kind == "grid":
        return optuna.samplers.GridSampler(_grid(spec), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, **opts)


def create_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    opts = dict(spec.pruner)
    kind = opts.pop("type")
    if kind == "none" or len(spec.objectives) > 1:
        return optuna.pruners.NopPruner()
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(**opts)
    return optuna.pruners.MedianPruner(**opts)


def _outside(p, value) -> bool:
    """Check whether an enqueued value lies outside a numeric dimension (e.g. lambda = 0 on a log range)."""
    if p.type not in ("float", "int") or not isinstance(value, (int, float)):
        return False
    return value < p.low or value > p.high or (p.log and value <= 0)


def suggest(trial: optuna.Trial, spec: StudySpec) -> dict:
    """Sample one value per search dimension.

    An enqueued value outside its dimension (the unregularized reference trial, lambda = 0, on a log
    range) is used as given and stored as the user attribute `reference.<key>`, not as a sampled param.
    """
    # Optuna 5 keeps an enqueued trial's values only in its frozen trial's system attributes
    enqueued = trial.study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params", {})
    params = {}
    for p in spec.search_space:
        if p.key in enqueued and _outside(p, enqueued[p.key]):
            params[p.key] = enqueued[p.key]
            trial.set_user_attr(f"reference.{p.key}", enqueued[p.key])
        elif p.type == "float":
            value = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
            # a stepped float comes back as low + k * step (0.15000000000000002); log the value meant
            params[p.key] = round(value, 12) if p.step is not None else value
        elif p.type == "int":
            params[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        elif p.type == "categorical":
            params[p.key] = trial.suggest_categorical(p.key, p.choices)
        else:
            params[p.key] = p.value
            trial.set_user_attr(f"fixed.{p.key}", p.value)
    return params


def create_or_load_study(spec: StudySpec) -> tuple[optuna.Study, bool]:
    """Return (study, created): created is True in the one process whose create_study made it.

    The storage makes creation atomic (a unique study name), so among processes that start together
    on a new study exactly one gets created=True.
    """
    kwargs = {"study_name": spec.name, "storage": create_storage(spec.storage), "sampler": create_sampler(spec),
              "pruner": create_pruner(spec)}
    try:
        return optuna.create_study(directions=spec.directions, **kwargs), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kwargs), False


def open_study(spec: StudySpec) -> optuna.Study:
    """Create or load the study (the reference trials are enqueued by join_study)."""
    return create_or_load_study(spec)[0]


def join_study(spec: StudySpec) -> tuple[optuna.Study, str]:
    """Open the study and return it with the run id of its MLflow parent run.

    The process that created the study creates the parent run, then enqueues the reference trials.
    A process that loaded a new study (no trial yet) waits for that parent run, so workers started
    together share one parent run. After PARENT_WAIT_SECONDS it creates the run itself.
    """
    study, created = create_or_load_study(spec)
    if not created:
        deadline = time.time() + PARENT_WAIT_SECONDS
        while study_report.find_parent(spec) is None and not study.get_trials(deepcopy=False):
            if time.time() >= deadline:
                log.warning("study %s has no MLflow parent run after %d s; creating it", spec.name, PARENT_WAIT_SECONDS)
                break
            time.sleep(1.0)
    parent_run_id = study_report.find_or_create_parent(spec)
    if created:
        for row in spec.enqueue:
            study.enqueue_trial(row, skip_if_exists=True)
    return study, parent_run_id


# -----------------------------------------------------------------------------
# One trial

def _objective_values(spec: StudySpec, result, cfg) -> list[float]:
    values = []
    for obj in spec.objectives:
        metric = obj["metric"]
        if metric.startswith("pi/"):
            from harness.pi_cost import estimate_cost

            cost = estimate_cost(cfg)
            values.append(cost.comm_gb if metric == "pi/comm_gb" else cost.latency_min)
        else:
            values.append(result.metrics[metric])
    return values


def _pruning_callback(trial: optuna.Trial, multi_objective: bool):
    def on_eval(step: int, metrics: dict) -> None:
        if multi_objective:
            return
        value = metrics["val/ppl"]
        trial.report(value if math.isfinite(value) else float("inf"), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: val_ppl={value:.3f} worse than the pruner's cut")

    return on_eval


def run_trial(trial: optuna.Trial, spec: StudySpec, parent_run_id: str, data_cache: dict):
    """Train and evaluate one trial inside its own MLflow child run; return the objective value(s)."""
    from harness.data import prepare_data
    from harness.tracking import RunTracker
    from harness.train import NonFiniteLossError, train

    params = suggest(trial, spec)
    cfg = trial_config(spec, params, trial.number)
    cfg.tracking.tracking_uri = spec.tracking_uri or cfg.tracking.tracking_uri
    tags = {"harness.study": spec.name, "harness.trial": str(trial.number), "harness.role": "trial",
            "harness.preset": params.get(PRESET_KEY, spec.preset)}
    tracker = RunTracker(cfg, run_name=f"trial_{trial.number}", tags=tags, parent_run_id=parent_run_id)
    trial.set_user_attr("mlflow_run_id", tracker.start())
    key = tuple(sorted(vars(cfg.data).items()))
    try:
        if key not in data_cache:
            data_cache[key] = prepare_data(cfg.data)
        result = train(cfg, data_cache[key], tracker, on_eval=_pruning_callback(trial, len(spec.objectives) > 1))
        if spec.evaluation.tasks:
            from harness.evaluate import evaluate_trial

            evaluate_trial(result.model, result.tokenizer, cfg, spec.evaluation, tracker)
        values = _objective_values(spec, result, cfg)
    except optuna.TrialPruned as err:
        tracker.set_tags({"harness.trial_state": "PRUNED"})
        tracker.end("KILLED", reason=str(err))
        raise
    except NonFiniteLossError as err:
        tracker.set_tags({"harness.trial_state": "FAIL"})
        tracker.end("FAILED", reason=f"non_finite_loss at step {err.step}")
        trial.set_user_attr("fail_reason", str(err))
        raise
    except BaseException as err:
        tracker.set_tags({"harness.trial_state": "FAIL"})
        tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", reason=repr(err)[:500])
        trial.set_user_attr("fail_reason", repr(err)[:500])
        raise
    tracker.set_tags({"harness.trial_state": "COMPLETE"})
    tracker.end("FINISHED")
    return values[0] if len(values) == 1 else tuple(values)


# -----------------------------------------------------------------------------
# Workers and the launcher

FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
# set in the environment of the workers that a launcher starts: the launcher finishes the parent run
LAUNCHER_ENV = "HARNESS_STUDY_LAUNCHER_PID"


def budget_counts(study: optuna.Study) -> tuple[int, int]:
    """Return (finished, running) trial counts for the budget.

    A failed trial that the heartbeat retry enqueued again counts through its retry only, so a
    worker killed mid-trial costs no trial of the budget.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    finished = sum(1 for t in trials if t.state in FINISHED_STATES
                   and not (t.state == optuna.trial.TrialState.FAIL and t.number in retried))
    running = sum(1 for t in trials if t.state == optuna.trial.TrialState.RUNNING)
    return finished, running


def _fail_stale_trials(study: optuna.Study) -> None:
    """Fail trials whose heartbeat is older than the grace period; their retries are enqueued."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_worker(spec: StudySpec, parent_run_id: str, reseed: bool = False) -> list[int]:
    """Run trials until the study's budget is used: n_trials finished in total (over restarts) or the time.

    A worker starts a trial only while finished + running trials stay below n_trials. When the rest
    of the budget is running in other workers, it waits and fails trials whose heartbeat went stale,
    then runs their retries. So the study ends with n_trials finished trials.
    reseed=True draws the sampler's seed from the OS, so parallel workers do not sample the same params.
    Returns the numbers of the trials this worker ran.
    """
    study = open_study(spec)
    if reseed:
        study.sampler.reseed_rng()
    data_cache: dict = {}
    numbers: list[int] = []

    def objective(trial: optuna.Trial):
        numbers.append(trial.number)
        return run_trial(trial, spec, parent_run_id, data_cache)
    deadline = time.time() + spec.timeout_minutes * 60 if spec.timeout_minutes else None
    waits_for_others = not spec.storage.startswith("journal://")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while deadline is None or time.time() < deadline:
        finished, running = budget_counts(study)
        if spec.n_trials and finished >= spec.n_trials:
            log.info("study %s has %d finished trials of n_trials=%d; worker done", spec.name, finished, spec.n_trials)
            return numbers
        if spec.n_trials and finished + running >= spec.n_trials:
            if not waits_for_others:
                # NOTE: journal storage has no heartbeat, so a dead worker's trial stays RUNNING and waiting would not end
                return numbers
            # the rest of the budget runs elsewhere: wait, failing trials whose worker died
            time.sleep(HEARTBEAT_SECONDS)
            _fail_stale_trials(study)
            continue
        # NOTE: two workers that pass the check above at the same moment may run one trial over n_trials
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
    return numbers


def finish_study(spec: StudySpec, parent_run_id: str) -> optuna.Study:
    """Fail trials left RUNNING by dead workers, close their MLflow runs and finish the parent run."""
    study = open_study(spec)
    study_report.recover_stale_trials(study, wait_seconds=0)
    study_report.finish_parent(spec, study, parent_run_id)
    return study


def _finish_as_last_worker(spec: StudySpec, parent_run_id: str, numbers: list[int]) -> None:
    """Finish the parent run when this worker is the last one: no trial is RUNNING and this worker ran
    the trial that finished last (or ran none). Workers started by a launcher leave it to the launcher.
    """
    if os.environ.get(LAUNCHER_ENV):
        return
    study = open_study(spec)
    _fail_stale_trials(study)
    finished, running = budget_counts(study)
    if running:
        log.info("study %s: %d trials still running in other workers; the last worker finishes the parent run",
                 spec.name, running)
        return
    done = [t for t in study.get_trials(deepcopy=False, states=FINISHED_STATES) if t.datetime_complete is not None]
    last = max(done, key=lambda t: t.datetime_complete, default=None)
    if numbers and last is not None and last.number not in numbers:
        log.info("study %s: trial %d finished last in another worker, which finishes the parent run",
                 spec.name, last.number)
        return
    finish_study(spec, parent_run_id)
    log.info("study %s: %d finished trials; parent run %s finished", spec.name, finished, parent_run_id)


def _spawn_workers(spec_path: str, overrides: list[str], workers: int) -> int:
    """Start worker processes on the same study and wait for all of them."""
    cmd = [sys.executable, "-m", "harness.cli", "study", spec_path, *overrides, "--worker"]
    env = {**os.environ, LAUNCHER_ENV: str(os.getpid())}
    procs = [subprocess.Popen(cmd, env=env) for _ in range(workers)]
    log.info("started %d workers: pids %s", workers, [p.pid for p in procs])
    codes = [p.wait() for p in procs]
    return max(codes)


def _ui_hint(spec: StudySpec) -> str:
    uri = study_report.tracking_uri(spec)
    if uri.startswith(("http://", "https://")):
        return f"open the MLflow UI: {uri}"
    return f"open the MLflow UI: make ui   (or: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)"


def main_study(study_file: str, overrides: list[str], workers: int = 1, worker: bool = False) -> int:
    """Entry point of `harness study`: validate, open study and parent run, run trials, report."""
    spec = load_study(study_file, overrides)
    if spec.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = spec.tracking_uri
    study, parent_run_id = join_study(spec)
    log.info("study %s in %s, MLflow parent run %s", spec.name, redact_url(spec.storage), parent_run_id)

    # a worker joins the study; the launcher also clears trials that a dead worker left RUNNING
    if worker:
        # workers with one seed would sample the same params, so each draws its own seed
        numbers = run_worker(spec, parent_run_id, reseed=True)
        _finish_as_last_worker(spec, parent_run_id, numbers)
        return 0
    study_report.recover_stale_trials(study, wait_seconds=GRACE_SECONDS + HEARTBEAT_SECONDS)
    started = time.time()
    if workers > 1:
        code = _spawn_workers(study_file, overrides, workers)
    else:
        run_worker(spec, parent_run_id)
        code = 0

    # parent run: study config, best trial, plots; then the summary table
    study = finish_study(spec, parent_run_id)
    print(study_report.summary_table(spec, study))
    print(f"\nstudy {spec.name!r}: {len(study.trials)} trials in {(time.time() - started) / 60:.1f} min")
    print(_ui_hint(spec))
    return code
