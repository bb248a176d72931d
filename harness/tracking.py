"""MLflow run tracking: one RunTracker per training run or Optuna trial.

A RunTracker talks to MLflow through its own `MlflowClient`, never through the fluent `mlflow.start_run`
state, so a parent study run and its child trial runs can be open in one process at once. At the start
it logs the flattened config as params, the resolved config YAML and the environment (package versions,
device, git commit and diff, command line). During training it buffers metrics and per-head attention
entropy. At the end it logs heatmaps, the entropy history and the model in transformers format.

Artifacts of a SQLite store go to `mlartifacts/<experiment>/` next to the database file. MLflow 3.17's
own default for a client is `./mlruns` under the current directory, which scatters artifacts when
processes start in different directories.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import sqlalchemy.exc  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from harness.config import RunConfig, TrackingConfig, dump_yaml, flatten, to_dict  # noqa: E402
from harness.environment import _git, environment_record  # noqa: E402
from harness.plots import plot_layer_head_heatmap  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow 3.17 limits (mlflow/utils/validation.py)
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250

STORE_RETRIES = 5
HEAD_METRIC = re.compile(r"^entropy/head/L(\d+)_H(\d+)$")


# -----------------------------------------------------------------------------
# Tracking URI and client

def _absolute_sqlite_uri(uri: str) -> str:
    """Resolve a relative `sqlite:///path` against the current directory; other URIs are returned as is."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return uri
    path, mark, query = uri[len("sqlite:///"):].partition("?")
    return "sqlite:///" + str(Path(path).resolve()) + mark + query


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """Return cfg.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (sqlite paths made absolute)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return _absolute_sqlite_uri(uri)


def _sqlite_path(uri: str) -> Path | None:
    """Return the database file of an absolute `sqlite:////path[?query]` URI, else None."""
    if not uri.startswith("sqlite:////"):
        return None
    return Path(uri[len("sqlite:///"):].partition("?")[0])


def _with_retries(action, description: str):
    """Call action(), retrying on database errors such as a locked SQLite file or a lost creation race."""
    for attempt in range(1, STORE_RETRIES + 1):
        try:
            return action()
        except (sqlalchemy.exc.SQLAlchemyError, MlflowException) as err:
            if attempt == STORE_RETRIES:
                raise
            log.warning("%s failed (attempt %d of %d): %s; retrying", description, attempt, STORE_RETRIES, err)
            time.sleep(0.2 * attempt)


def make_client(uri: str) -> MlflowClient:
    """Create an MlflowClient, creating the tables of a new SQLite database under a file lock.

    MLflow 3.17 creates the tables of an empty SQLite database without a lock, so two processes opening
    a new database at once fail with "table ... already exists" or an out-of-date schema error. The
    lock serializes the processes of this harness, and the retries cover other MLflow processes.
    """
    db_path = _sqlite_path(uri)
    if db_path is None:
        return MlflowClient(uri)
    digest = hashlib.sha256(str(db_path).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"harness-mlflow-{digest}.lock"

    def open_locked() -> MlflowClient:
        with open(lock_path, "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            return MlflowClient(uri)

    return _with_retries(open_locked, f"opening MLflow store {uri}")


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Return `<db folder>/mlartifacts/<experiment>` for a SQLite store, else None (the store's default)."""
    db_path = _sqlite_path(uri)
    if db_path is None:
        # NOTE: other database stores fall back to MLflow's ./mlruns under the current directory
        return None
    folder = re.sub(r"[^\w.-]", "_", experiment)
    return (db_path.parent / "mlartifacts" / folder).as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Return the id of experiment `name`, creating it when missing; safe when processes race to create it."""

    def lookup_or_create() -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            # a process that loses the race to create it gets an error here, and the retry finds it
            return client.create_experiment(name, artifact_location=artifact_location)
        if experiment.lifecycle_stage == "deleted":
            log.warning("restoring deleted MLflow experiment %r (id %s)", name, experiment.experiment_id)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    return _with_retries(lookup_or_create, f"creating MLflow experiment {name!r}")


# -----------------------------------------------------------------------------
# Metric names

def sanitize_metric_name(name: str) -> str:
    """Map a name onto MLflow's allowed characters (alphanumerics, _ - . space /) and a normalized path."""
    cleaned = re.sub(r"[^\w.\- /]", "_", str(name))
    parts = [("__" if part == ".." else part) for part in cleaned.split("/") if part not in ("", ".")]
    cleaned = "/".join(parts) or "_"
    return cleaned[:MAX_KEY_LENGTH]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# -----------------------------------------------------------------------------
# Run tracker

class RunTracker:
    """One MLflow run: params, metrics, per-head entropy and artifacts, with buffered metric logging.

    run_id=None creates a new run (nested under parent_run_id when given); a run_id resumes that run,
    which keeps its params and appends metrics. Use as a context manager or call start() and end().
    """

    def __init__(self, cfg: RunConfig, run_name: str | None = None, tags: dict | None = None,
                 parent_run_id: str | None = None, run_id: str | None = None):
        self.cfg = cfg
        self.run_name = run_name or cfg.name
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self.run_id = run_id
        self.resumed = run_id is not None
        self.resume_index = 0  # k of the k-th resume of this run; its record goes to resume_<k>/
        self.tracking_uri = resolve_tracking_uri(cfg.tracking)
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self._metric_buffer: list[Metric] = []
        self._metric_names: dict[str, str] = {}
        self._entropy_steps: list[int] = []
        self._entropy_history: list[np.ndarray] = []  # each (L, H)
        self._started = False
        self._ended = False

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> str:
        """Create or resume the run, log params, config and environment, and return the run id."""
        if self._started:
            return self.run_id
        self.client = make_client(self.tracking_uri)
        if self.resumed:
            self._resume_run()
        else:
            self._create_run()
        self._started = True

        # a run that fails while its record is written is closed as FAILED, not left RUNNING
        try:
            if not self.resumed:
                self._log_params()
            self._log_run_record()
        except Exception as err:
            self.end("FAILED", reason=f"start failed: {err!r}")
            raise
        log.info("MLflow run %s (%s) %s in %s", self.run_id, self.run_name,
                 "resumed" if self.resumed else "started", self.tracking_uri)
        return self.run_id

    def _create_run(self) -> None:
        if not self.cfg.tracking.experiment:
            raise ValueError("invalid tracking.experiment='': set an MLflow experiment name, e.g. entropy-harness")
        location = _artifact_location(self.tracking_uri, self.cfg.tracking.experiment)
        self.experiment_id = get_or_create_experiment(self.client, self.cfg.tracking.experiment, location)
        run = self.client.create_run(self.experiment_id, tags=self._start_tags(), run_name=self.run_name)
        self.run_id = run.info.run_id

    def _log_params(self) -> None:
        """Log the flattened config as params, at most 100 per request."""
        flat = flatten(to_dict(self.cfg))
        params = [Param(key, str(value)[:MAX_PARAM_VALUE_LENGTH]) for key, value in flat.items()]
        for batch in _batches(params, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)

    def _resume_run(self) -> None:
        try:
            run = self.client.get_run(self.run_id)
        except MlflowException as err:
            raise ValueError(f"cannot resume MLflow run {self.run_id!r}: not found in {self.tracking_uri}") from err
        self.experiment_id = run.info.experiment_id
        # NOTE: steps logged before the stop and run again after it get a second metric point each
        self.client.update_run(self.run_id, status="RUNNING")
        self.resume_index = self._resume_count(run) + 1
        tags = {**self.tags, "harness.resume_count": self.resume_index}

        # the reason the run stopped before no longer describes it, so it moves to another tag
        previous_reason = run.data.tags.get("harness.status_reason")
        if previous_reason is not None:
            tags["harness.previous_status_reason"] = previous_reason
            self.client.delete_tag(self.run_id, "harness.status_reason")
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, _tag_value(value))

        # params cannot be re-logged with another value, so a changed config is only reported
        flat = {key: str(value)[:MAX_PARAM_VALUE_LENGTH] for key, value in flatten(to_dict(self.cfg)).items()}
        changed = sorted(key for key, value in run.data.params.items() if key in flat and flat[key] != value)
        if changed:
            log.warning("resumed run %s: config differs from its logged params in %s; params are kept",
                        self.run_id, changed)
        self._load_entropy_history(run)

    def _start_tags(self) -> dict[str, str]:
        commit = (_git("rev-parse", "HEAD") or "").strip() or "unknown"
        tags = {
            "harness.config_name": self.cfg.name,
            "harness.code_version": commit,
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else "python",
        }
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        tags.update({key: _tag_value(value) for key, value in self.tags.items()})
        return tags

    @staticmethod
    def _resume_count(run) -> int:
        try:
            return int(run.data.tags.get("harness.resume_count", "0"))
        except ValueError:
            return 0

    def _log_run_record(self) -> None:
        """Log config.yaml, environment.json and git.diff (when the tree is dirty); under resume_<k>/ on resume."""
        record, diff = environment_record()
        prefix = f"resume_{self.resume_index}" if self.resumed else None
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.yaml").write_text(dump_yaml(self.cfg))
            (folder / "environment.json").write_text(json.dumps(record, indent=2) + "\n")
            if diff:
                (folder / "git.diff").write_text(diff)
            self.client.log_artifacts(self.run_id, tmp, artifact_path=prefix)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Flush metrics, tag the reason when given, and terminate the run with FINISHED, FAILED or KILLED."""
        if status not in RUN_STATUSES:
            raise ValueError(f"invalid run status {status!r}: accepted values are {list(RUN_STATUSES)}")
        if not self._started or self._ended:
            return
        try:
            self.flush()
            if reason:
                self.client.set_tag(self.run_id, "harness.status_reason", _tag_value(reason))
        finally:
            self.client.set_terminated(self.run_id, status=status)
            self._ended = True
        log.info("MLflow run %s ended: %s%s", self.run_id, status, f" ({reason})" if reason else "")

    def __enter__(self) -> RunTracker:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
            return False

        # the exception from the block propagates, even when closing the run fails too
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.end(status, reason="interrupted" if status == "KILLED" else repr(exc))
        except Exception:
            log.exception("closing MLflow run %s as %s failed", self.run_id, status)
        return False

    # --- metrics -----------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("RunTracker.start() must be called before logging")

    def _metric_name(self, name: str) -> str:
        cleaned = self._metric_names.get(name)
        if cleaned is None:
            cleaned = self._metric_names[name] = sanitize_metric_name(name)
            if cleaned != name:
                log.warning("metric name %r is logged as %r (MLflow allows alphanumerics, _ - . space /)",
                            name, cleaned)
        return cleaned

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics for `step`; they are written at the next flush() or when 1000 are buffered."""
        self._require_started()
        timestamp = int(time.time() * 1000)
        for name, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"invalid metric {name!r}={value!r}: expected a number") from err
            self._metric_buffer.append(Metric(self._metric_name(name), value, timestamp, int(step)))
        if len(self._metric_buffer) >= MAX_METRICS_PER_BATCH:
            self.flush()

    def log_head_entropy(self, head_entropy: np.ndarray, step: int) -> None:
        """Record an (L, H) head entropy array in the history and buffer it as `entropy/head/L{l}_H{h}` metrics."""
        self._require_started()
        values = np.array(head_entropy, dtype=np.float64)  # (L, H), a copy
        if values.ndim != 2:
            raise ValueError(f"invalid head entropy: expected an (n_layer, n_head) array, got shape {values.shape}")

        # a step at or before the last recorded one (a resumed run) replaces the history from there on
        while self._entropy_steps and self._entropy_steps[-1] >= step:
            self._entropy_steps.pop()
            self._entropy_history.pop()
        self._entropy_steps.append(int(step))
        self._entropy_history.append(values)
        metrics = {f"entropy/head/L{layer}_H{head}": values[layer, head] for layer, head in np.ndindex(values.shape)}
        self.log_metrics(metrics, step)

    def _load_entropy_history(self, run) -> None:
        """Rebuild the per-head entropy history of a resumed run from its logged metrics."""
        heads = [(int(m[1]), int(m[2]), key) for key in run.data.metrics if (m := HEAD_METRIC.match(key))]
        if not heads:
            return
        shape = (max(h[0] for h in heads) + 1, max(h[1] for h in heads) + 1)
        by_step: dict[int, np.ndarray] = {}
        for layer, head, key in heads:
            for metric in self.client.get_metric_history(self.run_id, key):
                by_step.setdefault(metric.step, np.full(shape, np.nan))[layer, head] = metric.value
        self._entropy_steps = sorted(by_step)
        self._entropy_history = [by_step[step] for step in self._entropy_steps]

    def flush(self) -> None:
        """Write buffered metrics with one log_batch request per 1000 metrics."""
        if not self._metric_buffer:
            return
        self._require_started()
        pending, self._metric_buffer = self._metric_buffer, []
        for batch in _batches(pending, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_json(self, obj, artifact_file: str) -> None:
        """Log a JSON-serializable object as an artifact file (e.g. lmeval/results.json)."""
        self._require_started()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            folder = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), artifact_path=None if folder == "." else folder)

    def set_tags(self, tags: dict) -> None:
        """Set run tags; values are converted to strings."""
        self._require_started()
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, _tag_value(value))

    # --- final artifacts ---------------------------------------------------

    def log_final_artifacts(self, head_entropy: np.ndarray, thresholds: np.ndarray | None,
                            model=None, tokenizer=None) -> None:
        """Log heatmaps, the entropy history, the thresholds and (with tracking.log_model) the model."""
        self._require_started()
        head_entropy = np.asarray(head_entropy, dtype=np.float64)  # (L, H)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            plot_layer_head_heatmap(head_entropy, folder / "plots" / "head_entropy.png",
                                    title=f"{self.run_name}: attention entropy per head",
                                    colorbar_label="entropy (nats)")
            self._save_entropy_history(folder / "entropy_history.npz", head_entropy.shape)
            if thresholds is not None:
                thresholds = np.asarray(thresholds, dtype=np.float64)  # (L, H)
                np.save(folder / "thresholds.npy", thresholds)
                plot_layer_head_heatmap(thresholds, folder / "plots" / "thresholds.png",
                                        title=f"{self.run_name}: learned entropy thresholds",
                                        colorbar_label="theta (fraction of E_max)")
            self.client.log_artifacts(self.run_id, tmp)

        if model is not None and self.cfg.tracking.log_model:
            self._log_model(model, tokenizer)

    def _save_entropy_history(self, path: Path, shape: tuple[int, int]) -> None:
        steps = np.asarray(self._entropy_steps, dtype=np.int64)  # (S,)
        if self._entropy_history:
            history = np.stack(self._entropy_history)  # (S, L, H)
        else:
            history = np.zeros((0, *shape))
        np.savez(path, steps=steps, head_entropy=history)

    def _log_model(self, model, tokenizer) -> None:
        """Save the model (safetensors) and tokenizer in transformers format under the artifact path model/."""
        with tempfile.TemporaryDirectory() as tmp:
            # transformers 5 always writes safetensors; it has no safe_serialization switch
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            else:
                log.warning("run %s: model logged without a tokenizer; load_run_model will return None for it",
                            self.run_id)
            self.client.log_artifacts(self.run_id, tmp, artifact_path="model")


def _tag_value(value) -> str:
    return str(value)[:MAX_TAG_VALUE_LENGTH]


# -----------------------------------------------------------------------------
# Loading a logged model

def load_run_model(run_id: str, tracking_uri: str | None = None):
    """Download the `model/` artifact of a run and return (model, tokenizer); tokenizer is None if not logged."""
    import harness.modeling  # noqa: F401  registers entropy_gpt with AutoConfig and AutoModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    uri = _absolute_sqlite_uri(tracking_uri) if tracking_uri else resolve_tracking_uri(TrackingConfig())
    client = make_client(uri)
    names = {info.path for info in client.list_artifacts(run_id, "model")}
    if "model/config.json" not in names:
        raise ValueError(f"MLflow run {run_id!r} has no model/ artifact: it ran with tracking.log_model=false "
                         "or stopped before the end")
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, "model", tmp)
        model = AutoModelForCausalLM.from_pretrained(local)
        tokenizer = AutoTokenizer.from_pretrained(local) if "model/tokenizer_config.json" in names else None
    return model.eval(), tokenizer


def load_run_config(run_id: str, tracking_uri: str | None = None) -> RunConfig:
    """Return the resolved RunConfig logged with a run (artifact config.yaml)."""
    import yaml

    from harness.config import apply_dict

    uri = _absolute_sqlite_uri(tracking_uri) if tracking_uri else resolve_tracking_uri(TrackingConfig())
    client = make_client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "config.yaml", tmp)
        tree = yaml.safe_load(Path(path).read_text())
    cfg = RunConfig()
    apply_dict(cfg, tree)
    return cfg
