"""Tests for `harness tables`: harness.report, study_runs, tables, published and figures.

The integration tests write real MLflow trial runs with RunTracker into a SQLite store in a temp folder.
One study has SM+LN+G, SM(t)+ScFuFFN and EReg(SM(t)+ScFuFFN) at 3 seeds each, one diverged (FAIL) and
one PRUNED run. A second study has the regularized model at another gamma (2 seeds), and a third has a
single failed run. The tests check that every table and figure of the first two studies pooled is
written, that repeated calls give byte-identical files, and that a study without finished runs gives one
clear error line and a non-zero exit code. The unit tests check the
architecture names of the presets, the statistics and the Markdown table without MLflow.

Run: pytest tests/integration/test_report.py
"""

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.config import PRESET_DIR, load_config
from harness.report import Group, architecture_name, group_runs, main_tables
from harness.study_runs import TrialRun, entropy_bins
from harness.tables import (
    Table,
    bootstrap_interval,
    compare_pairs,
    perplexity_table,
    to_latex,
    to_markdown,
    welch_p_value,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STUDY = "paper_test"
GAMMA_STUDY = "paper_test_gamma"
POOLED = f"{STUDY},{GAMMA_STUDY}"
POOLED_FOLDER = f"{STUDY}+{GAMMA_STUDY}"
STEPS = (10, 20, 30)

# (study, preset, overrides, final test perplexity by seed)
TRIALS = [
    (STUDY, "sm_ln_g", [], {1: 20.1, 2: 20.4, 3: 19.8}),
    (STUDY, "sm_t_scfuffn", [], {1: 31.0, 2: 30.2, 3: 31.5}),
    (STUDY, "ereg_sm_t_scfuffn", [], {1: 27.9, 2: 28.3, 3: 27.5}),
    (GAMMA_STUDY, "ereg_sm_t_scfuffn", ["entropy.tolerance=0.1"], {1: 28.8, 2: 29.1}),
]
TABLES = ("table2_perplexity", "table3_cost", "entropy_bins", "significance", "gamma_sweep")
FIGURES = ("fig2a_entropy_bins", "fig2b_eval_loss", "fig3_head_entropy", "fig5_layer_entropy",
           "fig6_thresholds_ereg_sm_t_scfuffn_gamma_0_10", "fig6_thresholds_ereg_sm_t_scfuffn_gamma_0_20",
           "fig7_gamma_bins")


# -----------------------------------------------------------------------------
# Writing trial runs

def log_trial(uri: str, study: str, trial: int, preset: str, overrides: list[str], state: str, ppl: float) -> None:
    """Log one trial run in the layout of harness.study: tags, metrics per eval step, final artifacts."""
    from harness.tracking import RunTracker

    cfg = load_config(preset, ["model.size=tiny", "data.context_length=16", "data.vocab_size=64", *overrides])
    cfg.tracking.tracking_uri = uri
    tags = {"harness.study": study, "harness.trial": str(trial), "harness.role": "trial", "harness.preset": preset}
    tracker = RunTracker(cfg, run_name=f"trial_{trial}", tags=tags)
    tracker.start()

    # evaluations: head entropy drifts with the step and differs by seed and architecture
    rng = np.random.default_rng(1000 * trial + cfg.train.seed)
    n_layer, n_head, _ = cfg.model.dims()
    head_entropy = rng.uniform(0.5, 2.7, size=(n_layer, n_head))  # (L, H)
    for step in STEPS:
        head_entropy = head_entropy + rng.normal(0.0, 0.05, size=head_entropy.shape)
        metrics = {"val/ce": math.log(ppl) + 1.0 / step, "val/ppl": ppl * math.exp(1.0 / step)}
        metrics.update({f"entropy/layer_{i}": float(v) for i, v in enumerate(head_entropy.mean(axis=1))})
        metrics.update({f"entropy/bin_{i}": float(v) for i, v in enumerate(entropy_bins(head_entropy))})
        tracker.log_metrics(metrics, step)
        tracker.log_head_entropy(head_entropy, step)
        if state == "FAIL":
            break

    # final test perplexity and artifacts for a complete trial, while a failed or pruned one just ends
    if state == "COMPLETE":
        tracker.log_metrics({"test/ppl": ppl, "test/ce": math.log(ppl)}, STEPS[-1])
        thresholds = 0.4 + 0.1 * rng.random((n_layer, n_head))  # (L, H)
        tracker.log_final_artifacts(head_entropy, thresholds)
    tracker.set_tags({"harness.trial_state": state})
    tracker.end({"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}[state])


def log_parent(uri: str, study: str) -> None:
    from harness.tracking import RunTracker

    cfg = load_config("tiny")
    cfg.tracking.tracking_uri = uri
    tracker = RunTracker(cfg, run_name=f"study:{study}", tags={"harness.study": study, "harness.role": "parent"})
    tracker.start()
    tracker.end("FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A SQLite MLflow store with the trial runs of STUDY, GAMMA_STUDY and a study whose only run failed."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    log_parent(uri, STUDY)
    log_parent(uri, GAMMA_STUDY)
    trial = 0
    for study, preset, overrides, ppl_by_seed in TRIALS:
        for seed, ppl in ppl_by_seed.items():
            log_trial(uri, study, trial, preset, [*overrides, f"train.seed={seed}"], "COMPLETE", ppl)
            trial += 1
    log_trial(uri, STUDY, trial, "sm", ["train.seed=1"], "FAIL", math.nan)
    log_trial(uri, STUDY, trial + 1, "sm_ln_r", ["train.seed=1"], "PRUNED", 40.0)
    log_parent(uri, "failed_only")
    log_trial(uri, "failed_only", 0, "sm", ["train.seed=1"], "FAIL", math.nan)
    return uri


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# -----------------------------------------------------------------------------
# Integration: tables and figures from MLflow runs

@pytest.mark.integration
def test_tables_written_and_byte_identical(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main_tables(POOLED, str(tmp_path / "a")) == 0
    folder = tmp_path / "a" / POOLED_FOLDER
    names = {p.name for p in folder.iterdir()}
    for table in TABLES:
        for suffix in (".md", ".tex", ".csv"):
            assert f"{table}{suffix}" in names
    for figure in FIGURES:
        for suffix in (".png", ".pdf"):
            assert f"{figure}{suffix}" in names
    assert {"runs.csv", "manifest.json"} <= names

    # a second call over the same folder and a call into another folder give the same bytes
    first = file_hashes(folder)
    assert main_tables(POOLED, str(tmp_path / "a")) == 0
    assert file_hashes(folder) == first
    assert main_tables(POOLED, str(tmp_path / "b")) == 0
    assert file_hashes(tmp_path / "b" / POOLED_FOLDER) == first


@pytest.mark.integration
def test_tables_content(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main_tables(POOLED, str(tmp_path)) == 0
    folder = tmp_path / POOLED_FOLDER

    # one row per architecture and entropy setting: the diverged SM run is counted, the pruned run is not
    table = (folder / "table2_perplexity.md").read_text()
    for label in ("SM+LN+G", "SM(t)+ScFuFFN", "EReg(SM(t)+ScFuFFN) gamma=0.10", "EReg(SM(t)+ScFuFFN) gamma=0.20"):
        assert f"| {label} |" in table
    assert "| SM | 0 | 1 | NaN (diverged) |" in table
    assert "SM+LN+R" not in table
    assert "20.100 ± 0.300" in table
    assert "a different setting" in table

    # runs.csv lists the 11 complete runs and the failed one
    rows = (folder / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 11 + 1
    assert sum(",FAIL," in row for row in rows) == 1

    # the significance table pairs both regularized groups with the unregularized model
    significance = (folder / "significance.csv").read_text().splitlines()
    assert len(significance) == 3
    assert all(",SM(t)+ScFuFFN," in row for row in significance[1:])

    # one study alone has a single gamma: no gamma table, and the EReg row keeps its plain name
    assert main_tables(STUDY, str(tmp_path)) == 0
    names = {p.name for p in (tmp_path / STUDY).iterdir()}
    assert "gamma_sweep.md" not in names
    assert "fig7_gamma_bins.png" not in names
    assert "| EReg(SM(t)+ScFuFFN) |" in (tmp_path / STUDY / "table2_perplexity.md").read_text()


@pytest.mark.integration
def test_failed_only_study_message(store, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main_tables("failed_only", str(tmp_path)) == 2
    message = caplog.records[-1].getMessage()
    assert "'failed_only'" in message
    assert "make study STUDY=studies/failed_only.yaml" in message
    assert not (tmp_path / "failed_only").exists()


@pytest.mark.integration
def test_unknown_study_cli_one_line(store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    done = subprocess.run([sys.executable, "-m", "harness.cli", "tables", "--study", "nope", "--out", str(tmp_path)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "'nope'" in errors[0]
    assert STUDY in errors[0]
    assert "make study STUDY=studies/nope.yaml" in errors[0]


@pytest.mark.integration
def test_missing_store_not_created(tmp_path, monkeypatch):
    database = tmp_path / "absent.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    assert main_tables(STUDY, str(tmp_path)) == 2
    assert not database.exists()


# -----------------------------------------------------------------------------
# Unit: names, statistics and the Markdown table without MLflow

def test_architecture_names_of_presets():
    expected = {
        "sm_ln_g": "SM+LN+G", "sm_ln_r": "SM+LN+R", "sm_ln": "SM+LN", "sm_g": "SM+G", "sm_r": "SM+R", "sm": "SM",
        "sm_scffn": "SM+ScFFN", "sm_scfuffn": "SM+ScFuFFN", "sm_t_scfuffn": "SM(t)+ScFuFFN",
        "ereg_sm_t_scfuffn": "SM(t)+ScFuFFN", "sm_wnorm_ffn": "SM+WNorm(FFN)", "sm_snorm_ffn": "SM+SNorm(FFN)",
    }
    for preset, name in expected.items():
        assert (PRESET_DIR / f"{preset}.yaml").is_file()
        assert architecture_name(load_config(preset).model) == name


def test_statistics_deterministic():
    a, b = np.array([27.9, 28.3, 27.5]), np.array([31.0, 30.2, 31.5])
    assert bootstrap_interval(a, b) == bootstrap_interval(a, b)
    low, high = bootstrap_interval(a, b)
    assert low < a.mean() - b.mean() < high
    assert welch_p_value(a, b) < 0.01
    assert math.isnan(welch_p_value(a[:1], b))
    assert math.isnan(bootstrap_interval(a[:1], b)[0])


def make_group(preset: str, overrides: list[str], ppls: list[float]) -> Group:
    """Build a Group of complete runs at GPT-2 small, T=128, the published setting of Tables 2 and 3."""
    runs = []
    for seed, ppl in enumerate(ppls):
        all_overrides = ["model.size=gpt2-small", "data.context_length=128", f"train.seed={seed}", *overrides]
        cfg = load_config(preset, all_overrides)
        runs.append(TrialRun(run_id=f"{preset}-{seed}", trial=seed, preset=preset, state="COMPLETE", cfg=cfg, ppl=ppl))
    cfg = runs[0].cfg
    tolerance = cfg.entropy.tolerance if cfg.entropy.loss_coeff > 0 else None
    setting = (*cfg.model.dims(), cfg.data.context_length)
    group = Group(architecture_name(cfg.model), cfg.entropy.loss_coeff, tolerance, setting, runs=runs)
    group.label = group.name
    return group


def test_markdown_names_and_published():
    groups = [
        make_group("sm_ln_g", [], [2.70, 2.72, 2.71]),
        make_group("sm_scfuffn", [], [3.50, 3.47, 3.49]),
        make_group("sm_t_scfuffn", ["entropy.loss_coeff=0"], [3.40, 3.42, 3.41]),
        make_group("sm_t_scfuffn", ["entropy.loss_coeff=1e-5", "entropy.tolerance=0.2"], [3.22, 3.20, 3.23]),
    ]
    text = to_markdown(perplexity_table(groups, compare_pairs(groups)))
    for label, published in (("SM+LN+G", "2.69"), ("SM+ScFuFFN", "3.48"), ("EReg(SM(t)+ScFuFFN)", "3.21")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert row.endswith(f"| {published} |")
    assert "same model and T" in text
    assert "a different setting" not in text


def test_groups_split_by_model_setting():
    runs = []
    for size, ppl in (("tiny", 40.0), ("cpu-small", 30.0)):
        for loss_coeff in (0.0, 1e-5):
            cfg = load_config("sm_t_scfuffn", [f"model.size={size}", f"entropy.loss_coeff={loss_coeff}"])
            runs.append(TrialRun(run_id=f"{size}-{loss_coeff}", trial=len(runs), preset="sm_t_scfuffn",
                                 state="COMPLETE", cfg=cfg, ppl=ppl))
    groups = group_runs(runs)
    labels = [g.label for g in groups]
    assert len(set(labels)) == 4
    assert "SM(t)+ScFuFFN [L=2 H=2 d=32 T=128]" in labels
    assert "EReg(SM(t)+ScFuFFN) [L=4 H=4 d=128 T=128]" in labels

    # each regularized group is compared with the unregularized group of its own size
    comparisons = compare_pairs(groups)
    assert len(comparisons) == 2
    for comparison in comparisons.values():
        assert comparison.reference.setting == comparison.regularized.setting


def test_latex_escapes_special_characters():
    table = Table("t", "Title", "5% of a_b", ["model", "PPL (mean ± std)"], [["SM+LN+G", "2.1 ± 0.1"], ["SM", "–"]])
    text = to_latex(table)
    assert r"5\% of a\_b" in text
    assert r"PPL (mean $\pm$ std) \\" in text
    assert r"SM & -- \\" in text
    assert text.count("{") == text.count("}")
