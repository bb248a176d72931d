"""The study's parent MLflow run: creation, recovery of dead trials, plots and the summary table."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import yaml
from mlflow.tracking import MlflowClient

from harness.study_config import StudySpec, study_as_dict, trial_config

log = logging.getLogger(__name__)
# fail_stale_trials and the matplotlib plots are marked experimental in Optuna 5.1; the warning is noise here
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
TrialState = optuna.trial.TrialState


def tracking_uri(spec: StudySpec) -> str:
    from harness.tracking import resolve_tracking_uri

    cfg = trial_config(spec, {})
    cfg.tracking.tracking_uri = spec.tracking_uri or cfg.tracking.tracking_uri
    return resolve_tracking_uri(cfg.tracking)


def _client_and_experiment(spec: StudySpec) -> tuple[MlflowClient, str | None]:
    cfg = trial_config(spec, {})
    client = MlflowClient(tracking_uri=tracking_uri(spec))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, (experiment.experiment_id if experiment else None)


def find_parent(spec: StudySpec) -> str | None:
    """Return the run id of this study's parent run, or None."""
    client, experiment_id = _client_and_experiment(spec)
    if experiment_id is None:
        return None
    runs = client.search_runs(
        [experiment_id], f"tags.`harness.study` = '{spec.name}' and tags.`harness.role` = 'parent'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_or_create_parent(spec: StudySpec) -> str:
    """Return the parent run of the study, creating it (with the base config as params) if missing."""
    from harness.tracking import RunTracker

    run_id = find_parent(spec)
    if run_id is not None:
        client, _ = _client_and_experiment(spec)
        client.update_run(run_id, status="RUNNING")
        return run_id
    cfg = trial_config(spec, {})
    cfg.name = spec.name
    cfg.tracking.tracking_uri = spec.tracking_uri or cfg.tracking.tracking_uri
    tags = {"harness.study": spec.name, "harness.role": "parent", "mlflow.note.content": f"Optuna study {spec.name}"}
    tracker = RunTracker(cfg, run_name=f"study:{spec.name}", tags=tags)
    return tracker.start()


def recover_stale_trials(study: optuna.Study, wait_seconds: float) -> None:
    """Mark trials whose worker died as failed (a retry is enqueued) and close their MLflow runs.

    Waits up to wait_seconds for a RUNNING trial's heartbeat to go stale, so a live worker elsewhere
    keeps its trial. Then every MLflow run of a finished Optuna trial that is still RUNNING is closed.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running and wait_seconds > 0:
        log.info("%d trials are RUNNING; waiting %.0f s to tell a live worker from a dead one", len(running), wait_seconds)
        time.sleep(wait_seconds)
    optuna.storages.fail_stale_trials(study)
    client = MlflowClient()
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if trial.state == TrialState.RUNNING or run_id is None:
            continue
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":
            client.set_tag(run_id, "harness.trial_state", trial.state.name)
            client.set_tag(run_id, "harness.status_reason", "the worker stopped during the trial (stale heartbeat)")
            client.set_terminated(run_id, status="FAILED")
            log.warning("closed MLflow run %s of trial %d left RUNNING by a dead worker", run_id, trial.number)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(spec: StudySpec, study: optuna.Study) -> str:
    """Return a Markdown table: trial, params, objective value(s), state."""
    keys = [p.key for p in spec.search_space if p.type != "fixed"]
    names = [o["metric"] for o in spec.objectives]
    header = ["trial", *keys, *names, "state"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in sorted(study.trials, key=lambda t: t.number):
        values = t.values or [None] * len(names)
        if t.state == TrialState.PRUNED and t.intermediate_values:
            values = [t.intermediate_values[max(t.intermediate_values)]] + [None] * (len(names) - 1)
        row = [str(t.number), *(_format_value(t.params.get(k, t.user_attrs.get(f"reference.{k}", ""))) for k in keys),
               *(_format_value(v) if v is not None else "-" for v in values), t.state.name]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _save_plots(study: optuna.Study, folder: Path) -> list[str]:
    """Write Optuna's matplotlib plots as PNG; a plot that needs more trials is skipped with a log line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
        "intermediate_values": ovm.plot_intermediate_values,
    }
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    written = []
    for name, plot in plots.items():
        try:
            kwargs = {"target": lambda t: t.values[0], "target_name": "val/ppl"} if len(study.directions) > 1 and name != "intermediate_values" else {}
            ax = plot(study, **kwargs)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=110)
            plt.close(fig)
            written.append(name)
        except Exception as err:  # e.g. importances need two completed trials
            log.info("plot %s skipped: %s", name, err)
    return written


def finish_parent(spec: StudySpec, study: optuna.Study, parent_run_id: str) -> None:
    """Log the study config, best trial, summary and plots to the parent run and close it."""
    client = MlflowClient()
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "study.yaml").write_text(yaml.safe_dump(study_as_dict(spec), sort_keys=False))
        (folder / "summary.md").write_text(summary_table(spec, study) + "\n")
        best = _best_trials(study, completed)
        (folder / "best_trial.json").write_text(json.dumps(best, indent=2, default=str))
        plot_dir = folder / "plots"
        plot_dir.mkdir()
        _save_plots(study, plot_dir)
        client.log_artifacts(parent_run_id, str(folder))
    metrics = {f"study/n_{k}": float(v) for k, v in counts.items()}
    if best and len(study.directions) == 1:
        metrics["study/best_value"] = float(best[0]["values"][0])
        client.set_tag(parent_run_id, "harness.best_trial", str(best[0]["number"]))
    for key, value in metrics.items():
        if math.isfinite(value):
            client.log_metric(parent_run_id, key, value)
    client.set_terminated(parent_run_id, status="FINISHED")


def _best_trials(study: optuna.Study, completed) -> list[dict]:
    if not completed:
        return []
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    return [{"number": t.number, "values": t.values, "params": t.params,
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in best]
