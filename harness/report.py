"""Tables and figures from the finished trial runs of one study, in the layout of the results of Jha and
Reagen, "Entropy-Guided Attention for Private LLMs" (arXiv 2501.03489), whose numbers harness.published holds.

`harness tables --study NAME` reads the study's trial runs from every experiment of the MLflow store,
groups them by architecture and entropy setting, and writes into <out>/<study>/:
- table2_perplexity, table3_cost, entropy_bins, significance (when a regularized and an unregularized
  group share an architecture) and gamma_sweep (when regularized runs differ in entropy.tolerance),
  each as .md, .tex and .csv (harness.tables);
- the figures of harness.figures as .png and .pdf;
- runs.csv (the runs used) and manifest.json (the sha256 of every file written).
harness.study_runs reads the runs. Same runs in, byte-identical files out: groups and runs are sorted,
floats have fixed formats, and no file contains a timestamp or a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.config import ModelConfig, RunConfig, flatten, to_dict
from harness.study_runs import PPL_METRIC, StudyRunsNotFound, TrialRun, load_study_runs

log = logging.getLogger(__name__)

# the published architecture names, in the order of the published tables
ARCHITECTURES = ("SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM+R", "SM", "SM+ScFFN", "SM+ScFuFFN",
                 "SM(t)+ScFuFFN", "SM+WNorm(FFN)", "SM+SNorm(FFN)")
NORM_NAMES = {"weight": "WNorm", "spectral": "SNorm"}
NORM_TARGETS = {"ffn": "FFN", "qk": "QK", "qk_ffn": "QK+FFN", "qkv_ffn": "QKV+FFN", "qkvo_ffn": "QKVO+FFN"}

# config keys that may differ between the seeds of one group without making them different models
BOOKKEEPING_KEYS = {"name", "train.seed", "train.out_dir", "train.device", "train.compile", "tracking.tracking_uri",
                    "tracking.log_model", "tracking.experiment", "data.cache_dir"}


# -----------------------------------------------------------------------------
# Runs and groups

@dataclass
class Group:
    """The seeds of one architecture and entropy setting: one row of the tables."""

    arch: str
    loss_coeff: float  # lambda, 0 for an unregularized group
    tolerance: float | None  # gamma, None for an unregularized group
    setting: tuple[int, int, int, int]  # (n_layer, n_head, n_embd, T)
    label: str = ""
    runs: list[TrialRun] = field(default_factory=list)  # COMPLETE runs, sorted by seed
    failed: list[TrialRun] = field(default_factory=list)

    @property
    def regularized(self) -> bool:
        return self.loss_coeff > 0

    @property
    def name(self) -> str:
        """Return the published name: the architecture, wrapped in EReg(...) when regularized."""
        return f"EReg({self.arch})" if self.regularized else self.arch

    @property
    def cfg(self) -> RunConfig:
        return (self.runs or self.failed)[0].cfg

    def ppl(self) -> np.ndarray:
        return np.array([r.ppl for r in self.runs], dtype=np.float64)  # (n,)

    def stacked(self, attribute: str) -> np.ndarray | None:
        """Stack one per-run array over the seeds that have it, or None when none has it."""
        arrays = [getattr(r, attribute) for r in self.runs if getattr(r, attribute) is not None]
        shapes = {a.shape for a in arrays}
        if not arrays or len(shapes) > 1:
            return None
        return np.stack(arrays)  # (n, ...)

    def mean_curve(self, steps_attribute: str, values_attribute: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Average a per-run curve over seeds at the steps that every seed logged."""
        curves = [(getattr(r, steps_attribute), getattr(r, values_attribute)) for r in self.runs]
        curves = [(s, v) for s, v in curves if s is not None and v is not None and len(s)]
        if not curves:
            return None
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
        if not common:
            return None
        rows = [v[np.searchsorted(s, common)] for s, v in curves]
        return np.array(common), np.mean(np.stack(rows), axis=0)


def architecture_name(model: ModelConfig) -> str:
    """Return the published name of an architecture from its model config, e.g. "SM(t)+ScFuFFN".

    The name follows the switches the run trained with, not its preset's file name, so a preset with
    overrides gets the name of what it became. final_ln is not part of the names.
    """
    name = "SM(t)" if model.temperature.mode != "off" else "SM"
    if model.block_ln:
        name += "+LN"
    if model.norm != "none":
        name += f"+{NORM_NAMES[model.norm]}({NORM_TARGETS[model.norm_on]})"
    if model.ffn_scale:
        name += "+ScFuFFN" if model.ffn_fused else "+ScFFN"
    elif model.ffn_fused:
        name += "+FuFFN"
    if not model.ffn_fused and model.ffn_act != "none":
        name += {"gelu": "+G", "relu": "+R"}[model.ffn_act]
    return name


def _group_order(group: Group) -> tuple:
    rank = ARCHITECTURES.index(group.arch) if group.arch in ARCHITECTURES else len(ARCHITECTURES)
    return (rank, group.arch, group.setting, group.regularized, group.loss_coeff, group.tolerance or 0.0)


def group_runs(runs: list[TrialRun]) -> list[Group]:
    """Group runs by architecture, model size and T, lambda, and gamma when regularized.

    The groups come in the row order of the published tables.
    """
    groups: dict[tuple, Group] = {}
    for run in runs:
        arch = architecture_name(run.cfg.model)
        setting = (*run.cfg.model.dims(), run.cfg.data.context_length)
        loss_coeff = run.cfg.entropy.loss_coeff
        tolerance = run.cfg.entropy.tolerance if loss_coeff > 0 else None
        key = (arch, setting, loss_coeff, tolerance)
        group = groups.setdefault(key, Group(arch, loss_coeff, tolerance, setting))
        (group.runs if run.state == "COMPLETE" else group.failed).append(run)
    ordered = sorted(groups.values(), key=_group_order)
    for group in ordered:
        group.runs.sort(key=lambda r: (r.seed, r.trial, r.run_id))
        group.failed.sort(key=lambda r: (r.seed, r.trial, r.run_id))
        _warn_mixed_configs(group)
    _set_labels(ordered)
    return ordered


def _set_labels(groups: list[Group]) -> None:
    """Label each group with its published name, plus what distinguishes it from groups of the same name.

    That is lambda and gamma where one architecture has several regularized groups, and the model size
    and T where the groups differ in them.
    """
    several_settings = len({g.setting for g in groups}) > 1
    for group in groups:
        group.label = group.name
        if several_settings:
            n_layer, n_head, n_embd, T = group.setting
            group.label += f" [L={n_layer} H={n_head} d={n_embd} T={T}]"
        if not group.regularized:
            continue
        siblings = [g for g in groups if g.arch == group.arch and g.setting == group.setting and g.regularized]
        if len({g.loss_coeff for g in siblings}) > 1:
            group.label += f" lambda={group.loss_coeff:g}"
        if len({g.tolerance for g in siblings}) > 1:
            group.label += f" gamma={group.tolerance:.2f}"


def _warn_mixed_configs(group: Group) -> None:
    """Log the config keys, other than the seed and bookkeeping, whose values differ within one group."""
    flats = [flatten(to_dict(r.cfg)) for r in group.runs + group.failed]
    mixed = sorted(key for key in flats[0] if key not in BOOKKEEPING_KEYS and len({str(f.get(key)) for f in flats}) > 1)

    # the entropy settings have no effect without the regularizer
    if not group.regularized:
        mixed = [key for key in mixed if not key.startswith("entropy.")]
    if mixed:
        log.warning("group %s mixes runs whose configs differ in %s, and its mean and std pool them", group.name, mixed)
    seeds = [r.seed for r in group.runs]
    if len(set(seeds)) < len(seeds):
        log.warning("group %s has complete runs with the same train.seed %s, which count as separate samples",
                    group.name, sorted(seeds))


# -----------------------------------------------------------------------------
# Output folder and entry point

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(folder: Path, studies: list[str], runs: list[TrialRun], written: list[Path]) -> Path:
    """Write manifest.json (studies, settings, run counts, sha256 of each file), removing files of an older manifest."""
    manifest_path = folder / "manifest.json"
    names = sorted(p.name for p in written)
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text()).get("files", {})
        for stale in sorted(set(previous) - set(names)):
            if (folder / stale).is_file() and "/" not in stale:
                (folder / stale).unlink()
    from harness.tables import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

    manifest = {
        "studies": studies,
        "ppl_metric": PPL_METRIC,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
        "runs": {"complete": sum(r.state == "COMPLETE" for r in runs), "failed": sum(r.state == "FAIL" for r in runs)},
        "files": {name: _sha256(folder / name) for name in names},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest_path


def write_report(study: str, out: str | Path = "results") -> Path:
    """Write the tables, figures, runs.csv and manifest.json of a study into <out>/<study>/ and return that folder.

    `study` may name several studies separated by commas, e.g. "paper,paper_gamma": their runs are pooled
    into one report in <out>/paper+paper_gamma/.
    """
    from harness import figures, tables

    studies = study.split(",")
    runs = [run for name in studies for run in load_study_runs(name)]
    groups = group_runs(runs)
    folder = Path(out) / "+".join(studies)
    folder.mkdir(parents=True, exist_ok=True)

    # tables, then figures, then the list of runs
    written = tables.write_tables(groups, folder)
    written += figures.write_figures(groups, folder)
    written.append(tables.write_runs_csv(groups, folder / "runs.csv"))
    write_manifest(folder, studies, runs, written)
    log.info("wrote %d files for study %s into %s", len(written) + 1, study, folder)
    return folder


def main_tables(study: str, out: str = "results") -> int:
    """Run `harness tables` and return its exit code: 2, with one error line, when a study has no finished runs."""
    try:
        folder = write_report(study, out)
    except StudyRunsNotFound as err:
        log.error("%s", err)
        return 2
    print(f"tables and figures of study {study!r} written to {folder}/")
    return 0
