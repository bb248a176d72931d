"""Read the trial runs of a study from MLflow into TrialRun records: config, perplexity and entropy.

A study's trial runs are the runs tagged `harness.role=trial` and `harness.study=<name>` in any active
experiment of the tracking store (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db). A run counts as
COMPLETE when its `harness.trial_state` tag is COMPLETE and its status FINISHED, and as FAIL when the tag
is FAIL. Pruned and running trials are not read.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

# one artifact download per file and run: MLflow's progress bar for each would flood the terminal
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from harness.config import RunConfig, TrackingConfig, apply_dict, flatten  # noqa: E402

log = logging.getLogger(__name__)

# the tables' perplexity: the whole test split at the end of training (val/ppl covers only train.eval_batches)
PPL_METRIC = "test/ppl"
FALLBACK_PPL_METRIC = "val/ppl"
STUDY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
HEAD_METRIC = re.compile(r"^entropy/head/L(\d+)_H(\d+)$")


@dataclass
class TrialRun:
    """One trial run of the study: its config, final perplexity and the arrays the figures need."""

    run_id: str
    trial: int
    preset: str
    state: str  # COMPLETE or FAIL
    cfg: RunConfig
    ppl: float = float("nan")
    val_ppl: float = float("nan")
    bins: np.ndarray | None = None  # (4,) share of heads per entropy bin at the last evaluation
    head_entropy: np.ndarray | None = None  # (L, H) at the last evaluation
    entropy_steps: np.ndarray | None = None  # (S,)
    layer_entropy: np.ndarray | None = None  # (S, L) mean head entropy per layer
    thresholds: np.ndarray | None = None  # (L, H) learned theta, a fraction of E_max
    eval_steps: np.ndarray | None = None  # (E,)
    eval_loss: np.ndarray | None = None  # (E,) val/ce in nats

    @property
    def seed(self) -> int:
        return self.cfg.train.seed


# -----------------------------------------------------------------------------
# Reading runs from MLflow

def _config_from_tree(tree: dict, run_id: str) -> RunConfig:
    """Build a RunConfig from a logged config, key by key, skipping keys this version does not have."""
    cfg = RunConfig()
    for key, value in flatten(tree).items():
        node = value
        for part in reversed(key.split(".")):
            node = {part: node}
        try:
            apply_dict(cfg, node)
        except ValueError as err:
            log.warning("run %s: config key %s skipped: %s", run_id, key, err)
    return cfg


def _read_config(client, run, names: set[str], folder: Path) -> RunConfig:
    """Return the run's resolved config from config.yaml, else from its params."""
    if "config.yaml" in names:
        path = client.download_artifacts(run.info.run_id, "config.yaml", str(folder))
        tree = yaml.safe_load(Path(path).read_text()) or {}
        return _config_from_tree(tree, run.info.run_id)
    log.warning("run %s has no config.yaml artifact, so its config is rebuilt from params", run.info.run_id)
    return _config_from_tree(dict(run.data.params), run.info.run_id)


def _history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Return (steps, values) of a metric, keeping the last value logged at each step."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp, m.value))
    if not points:
        return None
    latest = {m.step: m.value for m in points}
    steps = np.array(sorted(latest), dtype=np.int64)
    return steps, np.array([latest[s] for s in steps.tolist()], dtype=np.float64)


def _final_head_entropy(run) -> np.ndarray | None:
    """Return the (L, H) head entropy from the latest `entropy/head/L{l}_H{h}` metrics, or None."""
    heads = [(int(m[1]), int(m[2]), value) for key, value in run.data.metrics.items() if (m := HEAD_METRIC.match(key))]
    if not heads:
        return None
    values = np.full((max(h[0] for h in heads) + 1, max(h[1] for h in heads) + 1), np.nan)
    for layer, head, value in heads:
        values[layer, head] = value
    return values


def entropy_bins(head_entropy: np.ndarray) -> np.ndarray:
    """Return the share of heads in [0, M/4), [M/4, M/2), [M/2, 3M/4), [3M/4, M], M the largest head entropy.

    Heads without a finite value (never measured) are left out.
    """
    values = np.asarray(head_entropy, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.full(4, np.nan)
    top = values.max()
    if top <= 0:
        return np.array([1.0, 0.0, 0.0, 0.0])
    index = np.minimum(np.floor(values / top * 4).astype(np.int64), 3)
    return np.bincount(index, minlength=4) / values.size


def _read_entropy(client, run, names: set[str], folder: Path, trial_run: TrialRun) -> None:
    """Fill head entropy, its history per layer, the bins and the thresholds from artifacts and metrics."""
    run_id = run.info.run_id
    if "entropy_history.npz" in names:
        with np.load(client.download_artifacts(run_id, "entropy_history.npz", str(folder))) as data:
            steps, history = data["steps"], data["head_entropy"]  # (S,), (S, L, H)
        if len(steps):
            trial_run.entropy_steps, trial_run.layer_entropy = steps, history.mean(axis=2)  # (S, L)
            trial_run.head_entropy = history[-1]  # (L, H)
    if trial_run.head_entropy is None:
        trial_run.head_entropy = _final_head_entropy(run)
    if trial_run.layer_entropy is None:
        _read_layer_history(client, run, trial_run)

    # bins as the run logged them at its last evaluation, else recomputed from the final head entropy
    logged = [run.data.metrics.get(f"entropy/bin_{i}") for i in range(4)]
    if all(value is not None for value in logged):
        trial_run.bins = np.array(logged, dtype=np.float64)
    elif trial_run.head_entropy is not None:
        trial_run.bins = entropy_bins(trial_run.head_entropy)
    if "thresholds.npy" in names:
        trial_run.thresholds = np.load(client.download_artifacts(run_id, "thresholds.npy", str(folder)))


def _read_layer_history(client, run, trial_run: TrialRun) -> None:
    """Fill the per-layer entropy history from the `entropy/layer_{i}` metric histories."""
    n_layer = sum(1 for key in run.data.metrics if re.fullmatch(r"entropy/layer_\d+", key))
    histories = [_history(client, run.info.run_id, f"entropy/layer_{i}") for i in range(n_layer)]
    if not histories or any(h is None for h in histories) or len({len(h[0]) for h in histories}) > 1:
        return
    trial_run.entropy_steps = histories[0][0]
    trial_run.layer_entropy = np.stack([h[1] for h in histories], axis=1)  # (S, L)


def read_trial_run(client, run, folder: Path) -> TrialRun:
    """Read one MLflow trial run: config, perplexity, evaluation curve, entropy and thresholds."""
    run_id = run.info.run_id
    names = {info.path for info in client.list_artifacts(run_id)}
    tags = run.data.tags
    state = "COMPLETE" if tags.get("harness.trial_state") == "COMPLETE" and run.info.status == "FINISHED" else "FAIL"
    trial_run = TrialRun(run_id=run_id, trial=int(tags.get("harness.trial", "-1")),
                         preset=tags.get("harness.preset", ""), state=state,
                         cfg=_read_config(client, run, names, folder))
    if state != "COMPLETE":
        return trial_run

    # perplexity, and the evaluation loss against the step for the loss curves
    metrics = run.data.metrics
    trial_run.val_ppl = metrics.get(FALLBACK_PPL_METRIC, float("nan"))
    trial_run.ppl = metrics.get(PPL_METRIC, trial_run.val_ppl)
    if PPL_METRIC not in metrics:
        log.warning("run %s has no %s metric, so its table perplexity is %s", run_id, PPL_METRIC, FALLBACK_PPL_METRIC)
    curve = _history(client, run_id, "val/ce")
    if curve is not None:
        trial_run.eval_steps, trial_run.eval_loss = curve
    _read_entropy(client, run, names, folder, trial_run)
    return trial_run


# -----------------------------------------------------------------------------
# Finding the study's runs

class StudyRunsNotFound(ValueError):
    """The tracking store has no finished trial runs of the requested study."""


def _open_client(study: str):
    """Return (client, tracking URI), without creating a SQLite store that does not exist yet."""
    from harness.tracking import make_client, resolve_tracking_uri

    uri = resolve_tracking_uri(TrackingConfig())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise StudyRunsNotFound(
            f"no MLflow store at {uri} for study {study!r}: produce runs with "
            f"`make study STUDY=studies/{study}.yaml`, or set MLFLOW_TRACKING_URI to the study's store"
        )
    return make_client(uri), uri


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_study_runs(client, study: str) -> list:
    """Return the MLflow trial runs of a study (every state) from all active experiments."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    return _search_all(client, experiment_ids, f"tags.`harness.study` = '{study}' and tags.`harness.role` = 'trial'")


def _known_studies(client) -> list[str]:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    parents = _search_all(client, experiment_ids, "tags.`harness.role` = 'parent'")
    return sorted({run.data.tags.get("harness.study", "") for run in parents} - {""})


def load_study_runs(study: str) -> list[TrialRun]:
    """Read the COMPLETE and FAIL trial runs of a study, or raise StudyRunsNotFound when none is COMPLETE."""
    if not STUDY_NAME.match(study):
        raise ValueError(f"invalid study name {study!r}: use letters, digits, '_', '-' and '.', "
                         "as in the name key of a study file")
    client, uri = _open_client(study)
    found = find_study_runs(client, study)
    used = [run for run in found if run.data.tags.get("harness.trial_state") in ("COMPLETE", "FAIL")]
    complete = [run for run in used
                if run.data.tags["harness.trial_state"] == "COMPLETE" and run.info.status == "FINISHED"]
    if not complete:
        known = _known_studies(client)
        raise StudyRunsNotFound(
            f"study {study!r} has no finished trial runs in {uri} ({len(found)} trial runs in any state); "
            f"studies in this store: {known or 'none'}. Produce runs with `make study STUDY=studies/{study}.yaml`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        runs = [read_trial_run(client, run, Path(tmp) / run.info.run_id) for run in used]
    log.info("study %s: %d complete and %d failed trial runs from %s", study, len(complete),
             len(runs) - len(complete), uri)
    return runs
