"""Tables of a study report, each written as Markdown, LaTeX and CSV.

- table2_perplexity: perplexity mean and std over seeds, the change against SM+LN+G, the effect of the
  entropy regularizer (Welch t-test and a bootstrap interval) and the published perplexity.
- table3_cost: nonlinear operations, FLOPs and the estimated private-inference cost (harness.pi_cost).
- entropy_bins: the share of heads per head-entropy bin, beside the published shares.
- significance: each regularized group against the unregularized group of its architecture.
- gamma_sweep: regularized groups of one architecture that differ in entropy.tolerance.
Markdown and LaTeX cells are formatted for reading, and CSV cells hold the numbers with 6 significant digits.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from harness import pi_cost
from harness.published import (
    PUBLISHED_BINS,
    PUBLISHED_GAMMA,
    PUBLISHED_SOURCE,
    PUBLISHED_TOP_BIN_HEADS,
    REFERENCE_SETTING,
    published_cost,
    published_ppl,
    published_ppl_header,
    published_setting,
)

if TYPE_CHECKING:
    from harness.report import Group

BASELINE = "SM+LN+G"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
BIN_NAMES = ("[0, M/4)", "[M/4, M/2)", "[M/2, 3M/4)", "[3M/4, M]")



@dataclass
class Table:
    """A table: display cells for Markdown and LaTeX, and numeric records for CSV."""

    name: str
    title: str
    caption: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)


# -----------------------------------------------------------------------------
# Statistics

def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Return the mean and the sample std (ddof=1) of the finite values, NaN where undefined."""
    values = _finite(values)
    mean = float(values.mean()) if len(values) else math.nan
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return mean, std


def welch_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """Return the two-sided Welch t-test p-value of a against b, NaN with fewer than 2 values or no variance."""
    a, b = _finite(a), _finite(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def bootstrap_interval(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Return the percentile bootstrap 95% interval of mean(a) - mean(b), resampling each group apart."""
    a, b = _finite(a), _finite(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means_a = a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1)  # (resamples,)
    means_b = b[rng.integers(0, len(b), (resamples, len(b)))].mean(axis=1)  # (resamples,)
    low, high = np.percentile(means_a - means_b, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class Comparison:
    """Comparison of a regularized group with the unregularized group of the same architecture."""

    regularized: Group | None
    reference: Group | None
    difference: float  # mean PPL of the regularized group minus that of the reference
    ci_low: float
    ci_high: float
    p_value: float


# the placeholder for a group without a regularized/unregularized pair
NO_COMPARISON = Comparison(None, None, math.nan, math.nan, math.nan, math.nan)


def compare_pairs(groups: list[Group]) -> dict[str, Comparison]:
    """Compare each regularized group with the unregularized group of its architecture and setting, if any."""
    comparisons = {}
    for group in groups:
        if not group.regularized:
            continue
        reference = next((g for g in groups if g.arch == group.arch and not g.regularized and g.runs
                          and g.setting == group.setting), None)
        if reference is None or not group.runs:
            continue
        a, b = group.ppl(), reference.ppl()
        low, high = bootstrap_interval(a, b)
        difference = mean_std(a)[0] - mean_std(b)[0]
        comparisons[group.label] = Comparison(group, reference, difference, low, high, welch_p_value(a, b))
    return comparisons


# -----------------------------------------------------------------------------
# Cell formats

MISSING = "–"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _cell(value, spec: str) -> str:
    return MISSING if _missing(value) else format(value, spec)


def _number(value) -> str:
    """Format a CSV number: 6 significant digits, "nan" for a missing float, "" for None."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, np.integer, str)):
        return str(value)
    return f"{value:.6g}" if math.isfinite(value) else "nan"


def _ppl_cell(group: Group) -> str:
    mean, std = mean_std(group.ppl())
    if _missing(mean):
        return "NaN (diverged)" if group.failed else MISSING
    return f"{mean:.3f}" if _missing(std) else f"{mean:.3f} ± {std:.3f}"


def _p_cell(p: float) -> str:
    if _missing(p):
        return MISSING
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _percent_cell(fraction: float) -> str:
    return MISSING if _missing(fraction) else f"{100 * fraction:+.1f}%"


def _effect_cell(comparison: Comparison) -> str:
    """Format "difference [low, high]" of a comparison."""
    if _missing(comparison.difference):
        return MISSING
    return f"{comparison.difference:+.3f} [{_cell(comparison.ci_low, '+.3f')}, {_cell(comparison.ci_high, '+.3f')}]"


def _published_cell(ppl: float | None) -> str:
    if ppl is not None and math.isnan(ppl):
        return "NaN (diverged)"
    return _cell(ppl, ".2f")


def _share_cell(mean: float, std: float) -> str:
    """Format a bin share in percent, with the std over seeds when there is one."""
    if _missing(mean):
        return MISSING
    if _missing(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _heads_cell(count: float, n_heads: int) -> str:
    return MISSING if _missing(count) else f"{count:.1f} of {n_heads}"


def _factor_cell(factor: float | None) -> str:
    return MISSING if _missing(factor) else f"{factor:.2f}x"


def _flops_cell(flops: float) -> str:
    return pi_cost.format_flops(flops) if flops >= 1e8 else f"{flops / 1e6:.1f}M"


# -----------------------------------------------------------------------------
# Tables

def _baseline(groups: list[Group]) -> Group | None:
    return next((g for g in groups if g.name == BASELINE and g.runs), None)


def perplexity_table(groups: list[Group], comparisons: dict[str, Comparison]) -> Table:
    """Build the Table 2 analogue: perplexity over seeds, change against SM+LN+G, EReg effect, published PPL."""
    setting, matched = published_setting(groups)
    baseline = _baseline(groups)
    baseline_mean = mean_std(baseline.ppl())[0] if baseline else math.nan
    header = ["model", "seeds", "failed", "PPL (mean ± std)", f"change vs {BASELINE}",
              "EReg - unregularized PPL (95% CI)", "p (Welch)", published_ppl_header(setting, matched)]
    caption = (f"Perplexity on the test split over seeds (std with ddof=1). The EReg columns compare with the "
               f"same architecture at lambda=0: bootstrap {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}. "
               f"Published: {PUBLISHED_SOURCE}, EReg at gamma={PUBLISHED_GAMMA}.")
    table = Table("table2_perplexity", "Perplexity by architecture", caption, header)
    for group in groups:
        mean, std = mean_std(group.ppl())
        change = (mean / baseline_mean - 1.0) if baseline else math.nan
        effect = comparisons.get(group.label, NO_COMPARISON)
        published = published_ppl(group, setting)
        table.rows.append([group.label, str(len(group.runs)), str(len(group.failed)), _ppl_cell(group),
                           _percent_cell(change), _effect_cell(effect), _p_cell(effect.p_value),
                           _published_cell(published)])
        table.records.append({
            "model": group.label, "architecture": group.arch, "loss_coeff": group.loss_coeff,
            "tolerance": group.tolerance, "seeds": len(group.runs), "failed": len(group.failed),
            "ppl_mean": mean, "ppl_std": std, "ppl_change_vs_baseline": change, "ereg_difference": effect.difference,
            "ereg_ci_low": effect.ci_low, "ereg_ci_high": effect.ci_high, "ereg_p_value": effect.p_value,
            "published_ppl": published, "published_setting_matches": matched,
        })
    return table


def reference_cost(group: Group) -> pi_cost.PiCost:
    """Estimate the cost of the group's architecture at GPT-2 small, T=128, with the 50K CodeParrot vocabulary."""
    model = dataclasses.replace(group.cfg.model, size="gpt2-small", n_layer=None, n_head=None, n_embd=None)
    return pi_cost.estimate_cost(model, REFERENCE_SETTING[3], pi_cost.CODEPARROT_VOCAB_SIZE)


def cost_table(groups: list[Group]) -> Table:
    """Build the Table 3 analogue: nonlinear operations, FLOPs, estimated comm and latency, savings.

    When the study ran at another size than GPT-2 small, T=128, two more columns estimate each
    architecture's cost at that size, the setting of the published costs.
    """
    setting, matched = published_setting(groups)
    baseline = _baseline(groups)
    where = "same model and T" if matched else f"GPT-2 small, T={setting[3]}, {setting[0]} layers: a different setting"
    header = ["model", "nonlinear ops", "FFN FLOPs", "attention FLOPs", "comm GB (est.)", "latency min (est.)",
              f"comm saving vs {BASELINE}", f"latency saving vs {BASELINE}"]
    if not matched:
        header += ["comm GB at GPT-2 small, T=128 (est.)", "latency min at GPT-2 small, T=128 (est.)"]
    header += [f"published comm GB ({where})", f"published latency min ({where})"]
    caption = ("One forward pass over T tokens at each group's own model size and T. Comm and latency are "
               "estimates of harness.pi_cost, a linear model fitted to the published SecretFlow measurements "
               "(GPT-2 small width), so estimates at other widths extrapolate.")
    table = Table("table3_cost", "Nonlinear operations, FLOPs and private-inference cost", caption, header)
    for group in groups:
        row = pi_cost.cost_row(group.cfg, group.label)
        saving = pi_cost.savings(group.cfg, baseline.cfg) if baseline else {}
        published = published_cost(group, setting)
        comm, latency = (published.comm_gb, published.latency_min) if published else (None, None)
        reference = reference_cost(group)

        # display cells
        cells = [group.label, row["nonlinear_ops"], _flops_cell(row["ffn_flops"]), _flops_cell(row["attention_flops"]),
                 f"{row['comm_gb']:.2f}", f"{row['latency_min']:.2f}", _factor_cell(saving.get("comm_factor")),
                 _factor_cell(saving.get("latency_factor"))]
        if not matched:
            cells += [f"{reference.comm_gb:.2f}", f"{reference.latency_min:.2f}"]
        table.rows.append(cells + [_cell(comm, ".2f"), _cell(latency, ".2f")])

        # CSV record, with the GPT-2 small estimates in every case
        n_layer, n_head, n_embd, T = group.setting
        table.records.append({
            "model": group.label, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "context_length": T,
            "vocab_size": group.cfg.data.vocab_size, "nonlinear_ops": row["nonlinear_ops"],
            "ffn_flops": row["ffn_flops"], "attention_flops": row["attention_flops"], "comm_gb": row["comm_gb"],
            "latency_min": row["latency_min"], "comm_factor": saving.get("comm_factor"),
            "latency_factor": saving.get("latency_factor"), "gpt2_small_t128_comm_gb": reference.comm_gb,
            "gpt2_small_t128_latency_min": reference.latency_min, "published_comm_gb": comm,
            "published_latency_min": latency, "published_setting_matches": matched,
        })
    return table


def _bin_cells(group: Group) -> tuple[np.ndarray, np.ndarray, int]:
    """Return the mean and std over seeds of the bin shares, and the number of heads (L*H)."""
    bins = group.stacked("bins")  # (n, 4)
    n_layer, n_head, _ = group.cfg.model.dims()
    if bins is None:
        return np.full(4, math.nan), np.full(4, math.nan), n_layer * n_head
    std = bins.std(axis=0, ddof=1) if len(bins) > 1 else np.full(4, math.nan)
    return bins.mean(axis=0), std, n_layer * n_head


def bins_table(groups: list[Group]) -> Table:
    """Build the table of head-entropy bins (Figure 2a as numbers), with the published shares."""
    header = ["model", "seeds", *(f"{name} %" for name in BIN_NAMES), "top-bin heads", "published % (Figure 2a)"]
    caption = ("Share of all heads whose entropy at the last evaluation falls in each quarter of [0, M], M the "
               "largest head entropy of that run; mean ± std over seeds. Published: GPT-2 small, 144 heads.")
    table = Table("entropy_bins", "Head-entropy bins", caption, header)
    for group in groups:
        mean, std, n_heads = _bin_cells(group)
        shares = [_share_cell(m, s) for m, s in zip(mean.tolist(), std.tolist())]
        published = [MISSING if p is None else str(p) for p in PUBLISHED_BINS.get(group.name, ())]
        top = mean[3] * n_heads
        table.rows.append([group.label, str(len(group.runs)), *shares, _heads_cell(top, n_heads),
                           " / ".join(published) or MISSING])
        table.records.append({"model": group.label, "seeds": len(group.runs), "heads": n_heads,
                              **{f"bin_{i}_mean": mean[i] for i in range(4)},
                              **{f"bin_{i}_std": std[i] for i in range(4)},
                              "top_bin_heads": top})
    return table


def significance_table(comparisons: dict[str, Comparison]) -> Table:
    """Build the table of regularized against unregularized groups: means, difference, interval, p-value."""
    header = ["model", "reference", "seeds", "reference seeds", "PPL", "reference PPL", "difference",
              "95% CI (bootstrap)", "p (Welch)"]
    caption = (f"Difference of mean perplexity, regularized minus lambda=0, per architecture. Percentile bootstrap "
               f"with {BOOTSTRAP_RESAMPLES} resamples per group (seed {BOOTSTRAP_SEED}); two-sided Welch t-test.")
    table = Table("significance", "Effect of the entropy regularizer", caption, header)
    for label, c in comparisons.items():
        table.rows.append([label, c.reference.label, str(len(c.regularized.runs)), str(len(c.reference.runs)),
                           _ppl_cell(c.regularized), _ppl_cell(c.reference), _cell(c.difference, "+.3f"),
                           f"[{_cell(c.ci_low, '+.3f')}, {_cell(c.ci_high, '+.3f')}]", _p_cell(c.p_value)])
        table.records.append({"model": label, "reference": c.reference.label, "seeds": len(c.regularized.runs),
                              "reference_seeds": len(c.reference.runs), "ppl_mean": mean_std(c.regularized.ppl())[0],
                              "reference_ppl_mean": mean_std(c.reference.ppl())[0], "difference": c.difference,
                              "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value})
    return table


def gamma_groups(groups: list[Group]) -> list[Group]:
    """Return the regularized groups of each architecture that has more than one gamma, sorted by gamma."""
    swept = []
    for arch in dict.fromkeys(g.arch for g in groups):
        regularized = [g for g in groups if g.arch == arch and g.regularized]
        if len({g.tolerance for g in regularized}) > 1:
            swept += sorted(regularized, key=lambda g: (g.tolerance, g.loss_coeff))
    return swept


def gamma_table(groups: list[Group], comparisons: dict[str, Comparison]) -> Table:
    """Build the gamma sweep: perplexity, effect against lambda=0 and head-entropy bins per gamma."""
    header = ["model", "gamma", "lambda", "seeds", "PPL (mean ± std)", "difference vs lambda=0", "p (Welch)",
              *(f"{name} %" for name in BIN_NAMES), "top-bin heads", "published top-bin heads of 144 (Figure 7)"]
    caption = "Regularized runs by tolerance gamma (deviations within gamma * E_max are not penalized)."
    table = Table("gamma_sweep", "Gamma sweep", caption, header)
    for group in gamma_groups(groups):
        mean, _, n_heads = _bin_cells(group)
        effect = comparisons.get(group.label, NO_COMPARISON)
        published = None
        if group.name == "EReg(SM(t)+ScFuFFN)":
            published = PUBLISHED_TOP_BIN_HEADS.get(round(group.tolerance, 2))
        table.rows.append([group.label, f"{group.tolerance:.2f}", f"{group.loss_coeff:g}", str(len(group.runs)),
                           _ppl_cell(group), _cell(effect.difference, "+.3f"), _p_cell(effect.p_value),
                           *(_cell(100 * m, ".1f") for m in mean.tolist()), _heads_cell(mean[3] * n_heads, n_heads),
                           _cell(published, "d")])
        ppl_mean, ppl_std = mean_std(group.ppl())
        table.records.append({"model": group.label, "tolerance": group.tolerance, "loss_coeff": group.loss_coeff,
                              "seeds": len(group.runs), "ppl_mean": ppl_mean, "ppl_std": ppl_std,
                              "difference": effect.difference, "p_value": effect.p_value,
                              **{f"bin_{i}_mean": mean[i] for i in range(4)}, "top_bin_heads": mean[3] * n_heads,
                              "published_top_bin_heads": published})
    return table


# -----------------------------------------------------------------------------
# Writers

LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "–": "--"}


def to_markdown(table: Table) -> str:
    lines = [f"### {table.title}", "", table.caption, "",
             "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)


def to_latex(table: Table) -> str:
    """Format a table environment scaled to the text width (needs the booktabs and graphicx packages)."""
    caption = f"{_latex_escape(table.title)}. {_latex_escape(table.caption)}"
    columns = "l" + "r" * (len(table.header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", rf"\label{{tab:{table.name}}}",
             r"\resizebox{\textwidth}{!}{%", rf"\begin{{tabular}}{{{columns}}}", r"\toprule",
             " & ".join(_latex_escape(h) for h in table.header) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(cell) for cell in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(records: list[dict]) -> str:
    if not records:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: _number(value) for key, value in record.items()})
    return buffer.getvalue()


def write_table(table: Table, folder: Path) -> list[Path]:
    """Write <name>.md, <name>.tex and <name>.csv and return their paths."""
    paths = []
    for suffix, text in ((".md", to_markdown(table)), (".tex", to_latex(table)), (".csv", to_csv(table.records))):
        path = folder / f"{table.name}{suffix}"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def write_tables(groups: list[Group], folder: Path) -> list[Path]:
    """Write every table that the groups support and return the paths written."""
    comparisons = compare_pairs(groups)
    tables = [perplexity_table(groups, comparisons), cost_table(groups), bins_table(groups)]
    if comparisons:
        tables.append(significance_table(comparisons))
    if gamma_groups(groups):
        tables.append(gamma_table(groups, comparisons))
    return [path for table in tables for path in write_table(table, folder)]


def write_runs_csv(groups: list[Group], path: Path) -> Path:
    """Write the runs behind the tables, in table order: run id, trial, preset, group, seed, state, perplexity."""
    records = []
    for group in groups:
        for run in group.runs + group.failed:
            records.append({"run_id": run.run_id, "trial": run.trial, "preset": run.preset, "model": group.label,
                            "seed": run.seed, "loss_coeff": run.cfg.entropy.loss_coeff,
                            "tolerance": run.cfg.entropy.tolerance, "state": run.state, "ppl": run.ppl,
                            "val_ppl": run.val_ppl})
    path.write_text(to_csv(records), encoding="utf-8")
    return path
