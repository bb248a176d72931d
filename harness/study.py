"""Optuna studies whose trials are MLflow child runs under one parent run per study.

Each trial samples its params, builds its config (preset < study overrides < params), trains with a
pruning report at every eval interval, evaluates, and closes its MLflow run with the trial's state.
A failing trial never stops the study. A worker that dies leaves its trial RUNNING only until the
heartbeat grace period passes; the next start marks it failed and enqueues a retry.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time

import optuna

from harness import study_report
from harness.study_config import PRESET_KEY, StudySpec, load_study, trial_config

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 15


# -----------------------------------------------------------------------------
# Optuna pieces: storage, sampler, pruner

def create_storage(url: str):
    """Return Optuna storage for a URL: sqlite:///, postgresql://... (RDB with heartbeat) or journal://<path>."""
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal://"):]))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
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
    """Whether an enqueued value lies outside a numeric dimension (e.g. lambda = 0 on a log range)."""
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
            params[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            params[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        elif p.type == "categorical":
            params[p.key] = trial.suggest_categorical(p.key, p.choices)
        else:
            params[p.key] = p.value
            trial.set_user_attr(f"fixed.{p.key}", p.value)
    return params


def open_study(spec: StudySpec) -> optuna.Study:
    """Create or load the study; enqueue the reference trials once, when the study is new."""
    study = optuna.create_study(
        study_name=spec.name, storage=create_storage(spec.storage), sampler=create_sampler(spec),
        pruner=create_pruner(spec), directions=spec.directions, load_if_exists=True,
    )
    if not study.trials:
        for row in spec.enqueue:
            study.enqueue_trial(row, skip_if_exists=True)
    return study


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


def run_worker(spec: StudySpec, parent_run_id: str) -> None:
    """Run trials until the study's budget is used: n_trials finished in total (over restarts) or the time."""
    study = open_study(spec)
    if spec.n_trials and len(study.get_trials(deepcopy=False, states=FINISHED_STATES)) >= spec.n_trials:
        log.info("study %s already has %d finished trials; nothing to run", spec.name, spec.n_trials)
        return
    data_cache: dict = {}
    timeout = spec.timeout_minutes * 60 if spec.timeout_minutes else None
    callbacks = [optuna.study.MaxTrialsCallback(spec.n_trials, states=FINISHED_STATES)] if spec.n_trials else []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(
        lambda trial: run_trial(trial, spec, parent_run_id, data_cache),
        timeout=timeout, catch=(Exception,), callbacks=callbacks, gc_after_trial=True,
    )


def _spawn_workers(spec_path: str, overrides: list[str], workers: int) -> int:
    """Start worker processes on the same study and wait for all of them."""
    cmd = [sys.executable, "-m", "harness.cli", "study", spec_path, *overrides, "--worker"]
    procs = [subprocess.Popen(cmd) for _ in range(workers)]
    log.info("started %d workers: pids %s", workers, [p.pid for p in procs])
    codes = [p.wait() for p in procs]
    return max(codes)


def main_study(study_file: str, overrides: list[str], workers: int = 1, worker: bool = False) -> int:
    """Entry point of `harness study`: validate, open study and parent run, run trials, report."""
    spec = load_study(study_file, overrides)
    if spec.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = spec.tracking_uri
    study = open_study(spec)
    parent_run_id = study_report.find_or_create_parent(spec)

    # a worker joins the study; the launcher also clears trials that a dead worker left RUNNING
    if worker:
        run_worker(spec, parent_run_id)
        return 0
    study_report.recover_stale_trials(study, wait_seconds=GRACE_SECONDS + HEARTBEAT_SECONDS)
    started = time.time()
    if workers > 1:
        code = _spawn_workers(study_file, overrides, workers)
    else:
        run_worker(spec, parent_run_id)
        code = 0

    # parent run: study config, best trial, plots; then the summary table
    study = open_study(spec)
    study_report.recover_stale_trials(study, wait_seconds=0)
    study_report.finish_parent(spec, study, parent_run_id)
    print(study_report.summary_table(spec, study))
    print(f"\nstudy {spec.name!r}: {len(study.trials)} trials in {(time.time() - started) / 60:.1f} min")
    print(f"open the MLflow UI: make ui   (or: mlflow ui --backend-store-uri {study_report.tracking_uri(spec)} --host 127.0.0.1)")
    return code
