"""Unit tests for harness/entropy.py: row entropy, the entropy regularization loss, head statistics and the
compatibility class.

The loss is checked against slow references written here with Python loops in fp64, one for the harness
formulas and one for the arithmetic of the authors' released `EntropyRegularization`
(Nandan91/entropy-guided-attention-llm). Run with `pytest tests/unit/test_entropy.py`.
"""

import math

import pytest
import torch

from harness.entropy import (
    EntropyRegularization,
    attention_entropy,
    entropy_bins,
    entropy_from_scores,
    entropy_regularization_loss,
    entropy_summary,
    head_entropy,
    layer_entropy_penalty,
    max_entropy,
    overload_collapse_fractions,
    uniform_causal_entropy,
)

REDUCTION_MODES = [(r, m) for r in ("row_sum", "head_mean") for m in ("log_t", "causal")]


# -----------------------------------------------------------------------------
# Helpers and slow references

def causal_softmax(batch: int, n_head: int, n_rows: int, spread: float = 2.0) -> torch.Tensor:
    """Return real causal attention probabilities (B, H, T, T) from random scores."""
    scores = torch.randn(batch, n_head, n_rows, n_rows) * spread
    mask = torch.ones(n_rows, n_rows, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def reference_e_max(row: int, context_length: int, mode: str) -> float:
    """Return E_max for 0-based query row `row`: log T, or log(row + 1) for the causal mode."""
    return math.log(context_length) if mode == "log_t" else math.log(row + 1)


def reference_layer_penalty(row_entropy, thresholds, context_length, tolerance, reduction, mode, e_max_rows=None):
    """Return (L_layer, number of penalized entries, number of entries checked), with Python loops in fp64.

    e_max_rows: E_max per query row; None computes it with math.log.
    """
    ent = row_entropy.detach().double().tolist()  # [B][H][T]
    theta = thresholds.detach().double().tolist()  # [H]
    n_batch, n_head, n_rows = len(ent), len(ent[0]), len(ent[0][0])
    if e_max_rows is None:
        e_max_rows = [reference_e_max(i, context_length, mode) for i in range(n_rows)]
    penalized, total = 0, 0
    head_penalties = []
    for h in range(n_head):
        if reduction == "row_sum":
            head_sum = 0.0
            for b in range(n_batch):
                for i in range(n_rows):
                    e_max = e_max_rows[i]
                    delta = ent[b][h][i] - theta[h] * e_max
                    hit = abs(delta) > tolerance * e_max
                    head_sum += delta**2 if hit else 0.0
                    penalized, total = penalized + hit, total + 1
            head_penalties.append(head_sum)
            continue
        e_head = sum(ent[b][h][i] for b in range(n_batch) for i in range(n_rows)) / (n_batch * n_rows)
        e_ref = sum(e_max_rows) / n_rows
        delta = e_head - theta[h] * e_ref
        hit = abs(delta) > tolerance * e_ref
        head_penalties.append(delta**2 if hit else 0.0)
        penalized, total = penalized + hit, total + 1
    return sum(head_penalties) / n_head, penalized, total


def released_entropy(attn: torch.Tensor) -> torch.Tensor:
    """The released compute_entropy: -nansum(A * log(A + 1e-9)) over keys."""
    return -torch.nansum(attn * torch.log(attn + 1e-9), dim=-1)


def released_compute_loss(attentions, weights, num_heads, num_layers, loss_coeff, factor, context_size=None):
    """The released compute_loss arithmetic; `weights` is one (H,) vector or one per layer."""
    total = 0.0
    for layer, attn in enumerate(attentions):
        ent = released_entropy(attn)  # (B, H, T)
        e_max = math.log(context_size or attn.shape[-1])
        tol = factor * e_max
        w = weights[layer] if torch.as_tensor(weights[0]).dim() == 1 else weights
        layer_loss = 0.0
        for h in range(num_heads):
            deviation = ent[:, h, :] - w[h] * e_max
            penalty = torch.square(torch.where(deviation.abs() > tol, deviation, torch.zeros_like(deviation)))
            layer_loss = layer_loss + penalty.sum()
        total = total + layer_loss / num_heads
    return loss_coeff * (total / num_layers)


def random_thresholds(*shape) -> torch.Tensor:
    return 0.1 + 0.8 * torch.rand(*shape)


# -----------------------------------------------------------------------------
# Row entropy on hand-computed rows

@pytest.mark.parametrize("n", [1, 2, 4, 7, 128])
def test_attention_entropy_uniform_row(n):
    probs = torch.full((n,), 1.0 / n)
    assert attention_entropy(probs).item() == pytest.approx(math.log(n), abs=1e-5)


def test_attention_entropy_one_hot_is_zero():
    probs = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(attention_entropy(probs), torch.zeros(2))


def test_attention_entropy_zero_entries_add_nothing():
    probs = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])
    assert attention_entropy(probs).item() == pytest.approx(math.log(2), abs=1e-6)


def test_attention_entropy_hand_computed_row():
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0])
    expected = 0.5 * math.log(2) + 2 * 0.25 * math.log(4)
    assert attention_entropy(probs).item() == pytest.approx(expected, abs=1e-6)


def test_attention_entropy_fully_masked_row_is_zero():
    out = attention_entropy(torch.zeros(3, 6))
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros(3))


def test_attention_entropy_bf16_input_is_fp32():
    probs = torch.full((2, 8), 1.0 / 8, dtype=torch.bfloat16)
    out = attention_entropy(probs)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full((2,), math.log(8)), atol=1e-5)


def test_entropy_from_scores_masked_uniform_row():
    # Four visible keys with equal scores give entropy log 4, and the masked keys get probability 0.
    scores = torch.zeros(1, 6)
    mask = torch.tensor([[True, True, False, True, True, False]])
    probs, ent = entropy_from_scores(scores, mask)
    assert ent.item() == pytest.approx(math.log(4), abs=1e-6)
    assert torch.equal(probs[0, ~mask[0]], torch.zeros(2))
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_entropy_from_scores_extreme_rows():
    scores = torch.tensor([[1.0e4, 0.0, 0.0], [0.0, 1.0e4, -1.0e4], [0.3, 0.2, 0.1]])
    mask = torch.tensor([[True, True, True], [True, True, True], [False, False, False]])
    probs, ent = entropy_from_scores(scores, mask)
    assert torch.isfinite(ent).all()
    assert torch.isfinite(probs).all()
    assert ent[0].item() == pytest.approx(0.0, abs=1e-6)
    assert ent[1].item() == pytest.approx(0.0, abs=1e-6)
    assert ent[2].item() == 0.0
    assert torch.equal(probs[2], torch.zeros(3))


def test_entropy_from_scores_matches_attention_entropy():
    scores = torch.randn(2, 3, 8, 8) * 3
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    probs, ent = entropy_from_scores(scores, mask)
    reference = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    assert torch.allclose(probs, reference, atol=1e-6)
    assert torch.allclose(ent, attention_entropy(reference), atol=1e-5)


def test_entropy_from_scores_gradient_finite_for_extreme_rows():
    # Rows: 0 ordinary with one masked key, 1 one-hot-like (logit gap 1e4), 2 fully masked, 3 one visible key.
    scores = torch.tensor(
        [[0.5, -1.0, 2.0, 0.1], [1.0e4, 0.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0], [0.7, 0.0, 0.0, 0.0]],
        requires_grad=True,
    )
    mask = torch.tensor([[True, True, True, False], [True] * 4, [False] * 4, [True, False, False, False]])
    _, ent = entropy_from_scores(scores, mask)
    ent.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[2], torch.zeros(4))
    assert torch.equal(scores.grad[0, 3], torch.tensor(0.0))
    assert scores.grad[1].abs().max().item() < 1e-6


def test_entropy_from_scores_gradient_matches_naive_formula():
    scores = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True, False, True, False, True]])
    _, ent = entropy_from_scores(scores, mask)
    (grad,) = torch.autograd.grad(ent.sum(), scores)

    # naive: -sum p log p over the visible keys only
    naive_scores = scores.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax(naive_scores.masked_fill(~mask, float("-inf")), dim=-1)
    naive = -(log_p.exp() * log_p.masked_fill(~mask, 0.0)).sum()
    (naive_grad,) = torch.autograd.grad(naive, naive_scores)
    assert torch.allclose(grad, naive_grad, atol=1e-5)


# -----------------------------------------------------------------------------
# Reference maximum entropy

def test_max_entropy_log_t_and_causal():
    assert max_entropy(128).item() == pytest.approx(math.log(128), rel=1e-6)
    causal = max_entropy(16, "causal", n_rows=5)
    assert causal.tolist() == pytest.approx([math.log(i) for i in range(1, 6)], rel=1e-6)
    assert max_entropy(4, "causal").shape == (4,)


def test_uniform_causal_entropy_is_mean_log_i():
    n = 16
    expected = sum(math.log(i) for i in range(1, n + 1)) / n
    assert uniform_causal_entropy(n) == pytest.approx(expected, rel=1e-12)


# -----------------------------------------------------------------------------
# The loss against the slow reference

@pytest.mark.parametrize("reduction,mode", REDUCTION_MODES)
@pytest.mark.parametrize("context_length", [8, 12])
def test_layer_entropy_penalty_matches_reference(reduction, mode, context_length):
    row_entropy = attention_entropy(causal_softmax(2, 3, 8))  # (B, H, T)
    if reduction == "row_sum":
        thresholds = random_thresholds(3)
    else:
        # head 0 exactly on target (no penalty), head 1 far below it (penalized), head 2 random
        e_head = row_entropy.double().mean(dim=(0, 2))
        e_ref = sum(reference_e_max(i, context_length, mode) for i in range(8)) / 8
        thresholds = torch.tensor([e_head[0] / e_ref, e_head[1] / e_ref + 0.5, 0.3], dtype=torch.float32)

    got = layer_entropy_penalty(row_entropy, thresholds, context_length, 0.2, reduction, mode)
    expected, penalized, total = reference_layer_penalty(row_entropy, thresholds, context_length, 0.2, reduction, mode)
    assert 0 < penalized < total, "the data must exercise both sides of the gate"
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("reduction,mode", REDUCTION_MODES)
@pytest.mark.parametrize("form", ["stacked", "list", "shared"])
def test_entropy_regularization_loss_matches_reference(reduction, mode, form):
    n_layer, n_head, n_rows, context_length = 3, 2, 8, 8
    rows = [attention_entropy(causal_softmax(2, n_head, n_rows)) for _ in range(n_layer)]
    per_layer = random_thresholds(n_layer, n_head)
    thresholds = {"stacked": per_layer, "list": list(per_layer.unbind(0)), "shared": per_layer[0]}[form]

    got = entropy_regularization_loss(rows, thresholds, context_length, 0.2, reduction, mode)
    layer_thresholds = per_layer if form != "shared" else per_layer[0].expand(n_layer, n_head)
    expected = sum(
        reference_layer_penalty(r, t, context_length, 0.2, reduction, mode)[0] for r, t in zip(rows, layer_thresholds)
    ) / n_layer
    assert expected > 0
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_layer_entropy_penalty_threshold_gradient_matches_reference():
    context_length, tolerance = 8, 0.2
    row_entropy = attention_entropy(causal_softmax(2, 3, 8))
    thresholds = random_thresholds(3).requires_grad_(True)
    layer_entropy_penalty(row_entropy, thresholds, context_length, tolerance).backward()

    # d/dtheta_h of mean_h sum_rows delta^2 is -2 * E_max * (sum of penalized deltas) / H
    e_max = math.log(context_length)
    ent = row_entropy.double()
    expected = []
    for h, theta in enumerate(thresholds.detach().double().tolist()):
        delta = ent[:, h, :] - theta * e_max
        gated = torch.where(delta.abs() > tolerance * e_max, delta, torch.zeros_like(delta))
        expected.append(-2.0 * e_max * gated.sum().item() / 3)
    assert torch.allclose(thresholds.grad.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4)
    assert thresholds.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction,mode", REDUCTION_MODES)
def test_penalty_zero_exactly_at_margin(reduction, mode):
    # gamma = 0.25 and theta in {0.25, 0.5} keep every product and difference exact in fp32:
    # head 0 has E = 0.25 E_max with theta 0.5 (delta = -Tol), head 1 E = 0.5 E_max with theta 0.25 (delta = +Tol)
    context_length = 16
    n_rows = 8 if reduction == "row_sum" else 2  # the mean of two equal fp32 values is exact
    e_max = max_entropy(context_length, mode, n_rows)  # () or (T,)
    if reduction == "head_mean" and mode == "causal":
        e_max = e_max.mean()
    row = e_max.expand(n_rows) if e_max.dim() == 0 else e_max  # (T,)
    row_entropy = torch.stack([0.25 * row, 0.5 * row])[None].repeat(2, 1, 1)  # (B, 2, T)
    thresholds = torch.tensor([0.5, 0.25])

    at_margin = layer_entropy_penalty(row_entropy, thresholds, context_length, 0.25, reduction, mode)
    assert at_margin.item() == 0.0

    # the fp64 reference on the harness's fp32 E_max values agrees that the gate is strict
    rows = max_entropy(context_length, mode, n_rows).expand(n_rows).tolist()
    reference = reference_layer_penalty(row_entropy, thresholds, context_length, 0.25, reduction, mode, rows)
    assert reference[0] == 0.0

    # a slightly smaller tolerance puts both heads past the margin
    past = layer_entropy_penalty(row_entropy, thresholds, context_length, 0.2499, reduction, mode)
    expected = reference_layer_penalty(row_entropy, thresholds, context_length, 0.2499, reduction, mode, rows)[0]
    assert past.item() > 0
    assert past.item() == pytest.approx(expected, rel=1e-5)


# -----------------------------------------------------------------------------
# Compatibility with the released class

@pytest.mark.parametrize("context_size", [None, 16, 128])
@pytest.mark.parametrize("loss_coeff", [1e-5, 1.0])
def test_compat_loss_matches_released_shared_thresholds(context_size, loss_coeff):
    n_layer, n_head = 3, 4
    attentions = [causal_softmax(2, n_head, 16) for _ in range(n_layer)]
    weights = random_thresholds(n_head)
    reg = EntropyRegularization(loss_coeff=loss_coeff, tolerance_margin_factor=0.2, context_size=context_size)

    got = reg.compute_loss(attentions, weights, num_heads=n_head, num_layers=n_layer)
    expected = released_compute_loss(attentions, weights, n_head, n_layer, loss_coeff, 0.2, context_size)
    assert expected.item() > 0
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("form", ["stacked", "list"])
def test_compat_loss_matches_released_per_layer_thresholds(form):
    n_layer, n_head = 2, 3
    attentions = [causal_softmax(2, n_head, 16) for _ in range(n_layer)]
    weights = random_thresholds(n_layer, n_head)
    reg = EntropyRegularization(loss_coeff=1.0)

    passed = weights if form == "stacked" else list(weights.unbind(0))
    got = reg.compute_loss(attentions, passed, num_heads=n_head, num_layers=n_layer)
    expected = released_compute_loss(attentions, weights, n_head, n_layer, 1.0, 0.2)
    assert expected.item() > 0
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_compat_loss_gradient_reaches_thresholds():
    attentions = [causal_softmax(2, 2, 16) for _ in range(2)]
    weights = torch.nn.Parameter(torch.full((2,), 0.5))
    EntropyRegularization(loss_coeff=1.0).compute_loss(attentions, weights, 2, 2).backward()
    assert torch.isfinite(weights.grad).all()
    assert weights.grad.abs().sum() > 0


def test_compat_compute_entropy_matches_released():
    attn = causal_softmax(2, 3, 16)
    got = EntropyRegularization.compute_entropy(attn)
    assert got.shape == (2, 3, 16)
    assert torch.allclose(got, released_entropy(attn), atol=1e-5)


def test_compat_log_entropy_metrics_keys_and_logger():
    class RecordingLogger:
        def __init__(self):
            self.logged = []

        def log(self, metrics):
            self.logged.append(metrics)

    n_layer, n_head = 2, 3
    attentions = [causal_softmax(2, n_head, 16) for _ in range(n_layer)]
    logger = RecordingLogger()
    metrics = EntropyRegularization.log_entropy_metrics(attentions, step=7, logger=logger)

    expected_keys = {f"attn.{layer}.head.{head}.entropy" for layer in range(n_layer) for head in range(n_head)}
    assert set(metrics) == expected_keys
    assert logger.logged == [metrics]
    for layer, attn in enumerate(attentions):
        per_head = released_entropy(attn).mean(dim=(0, 2))
        for head in range(n_head):
            assert metrics[f"attn.{layer}.head.{head}.entropy"].item() == pytest.approx(per_head[head].item(), abs=1e-5)


def test_compat_log_entropy_metrics_without_logger():
    metrics = EntropyRegularization.log_entropy_metrics([causal_softmax(1, 2, 4)], step=0)
    assert set(metrics) == {"attn.0.head.0.entropy", "attn.0.head.1.entropy"}


# -----------------------------------------------------------------------------
# Head statistics

def test_head_entropy_shape_and_values():
    rows = [attention_entropy(causal_softmax(2, 3, 8)) for _ in range(4)]
    out = head_entropy(rows)
    assert out.shape == (4, 3)
    assert torch.allclose(out[2], rows[2].mean(dim=(0, 2)))


def test_entropy_bins_hand_made():
    # With M = 4, the bins are [0, 1), [1, 2), [2, 3) and [3, 4], so 1.0 lands in the second bin and 4.0 in the last.
    head_ent = torch.tensor([[0.0, 1.0], [2.0, 3.9], [4.0, 0.5]])
    shares = entropy_bins(head_ent)
    assert torch.allclose(shares, torch.tensor([2.0, 1.0, 1.0, 2.0]) / 6)
    assert shares.sum().item() == pytest.approx(1.0)


def test_entropy_bins_random_shares_sum_to_one():
    shares = entropy_bins(torch.rand(12, 12) * 5)
    assert shares.shape == (4,)
    assert shares.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_entropy_bins_all_zero_heads():
    assert torch.equal(entropy_bins(torch.zeros(2, 3)), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_overload_on_uniform_causal_attention():
    n_rows = 16
    uniform = torch.ones(n_rows, n_rows).tril()
    uniform = (uniform / uniform.sum(dim=-1, keepdim=True)).expand(2, 3, n_rows, n_rows)  # (B, H, T, T)
    head_ent = head_entropy([attention_entropy(uniform)] * 2)
    overload, collapse = overload_collapse_fractions(head_ent, n_rows)
    assert overload == 1.0
    assert collapse == 0.0


def test_collapse_on_one_hot_attention():
    n_rows = 16
    one_hot = torch.eye(n_rows).expand(2, 3, n_rows, n_rows)  # every query attends to itself only
    head_ent = head_entropy([attention_entropy(one_hot)] * 2)
    overload, collapse = overload_collapse_fractions(head_ent, n_rows)
    assert collapse == 1.0
    assert overload == 0.0


def test_entropy_summary_keys():
    stats = entropy_summary(torch.rand(3, 2), n_rows=16)
    expected = {f"entropy/layer_{i}" for i in range(3)} | {f"entropy/bin_{i}" for i in range(4)}
    expected |= {"entropy/mean", "entropy/overload_fraction", "entropy/collapse_fraction"}
    assert set(stats) == expected


# -----------------------------------------------------------------------------
# Bad input

def test_negative_loss_coeff_rejected():
    with pytest.raises(ValueError, match=r"lambda=-1"):
        EntropyRegularization(loss_coeff=-1)


def test_tolerance_outside_unit_interval_rejected():
    with pytest.raises(ValueError, match=r"gamma=1\.5"):
        EntropyRegularization(tolerance_margin_factor=1.5)
    row_entropy = attention_entropy(causal_softmax(1, 2, 4))
    with pytest.raises(ValueError, match=r"gamma=1\.5"):
        layer_entropy_penalty(row_entropy, torch.full((2,), 0.5), 4, tolerance=1.5)


def test_compat_context_shorter_than_attention_rejected():
    attentions = [causal_softmax(1, 2, 16)]
    reg = EntropyRegularization(context_size=8)
    with pytest.raises(ValueError, match=r"context length 8 .*16 query rows"):
        reg.compute_loss(attentions, torch.full((2,), 0.5), num_heads=2, num_layers=1)


def test_penalty_context_shorter_than_rows_rejected():
    row_entropy = attention_entropy(causal_softmax(1, 2, 16))
    with pytest.raises(ValueError, match=r"context length 15 .*16 query rows"):
        layer_entropy_penalty(row_entropy, torch.full((2,), 0.5), context_length=15)


def test_thresholds_wrong_length_rejected():
    row_entropy = attention_entropy(causal_softmax(1, 3, 8))
    with pytest.raises(ValueError, match=r"thresholds shape \(4,\)"):
        layer_entropy_penalty(row_entropy, torch.full((4,), 0.5), 8)


def test_thresholds_wrong_layer_count_rejected():
    rows = [attention_entropy(causal_softmax(1, 3, 8)) for _ in range(2)]
    with pytest.raises(ValueError, match=r"thresholds shape \(3, 3\)"):
        entropy_regularization_loss(rows, torch.full((3, 3), 0.5), 8)


def test_unknown_reduction_and_mode_rejected():
    row_entropy = attention_entropy(causal_softmax(1, 2, 4))
    with pytest.raises(ValueError, match=r"'row_mean'"):
        layer_entropy_penalty(row_entropy, torch.full((2,), 0.5), 4, reduction="row_mean")
    with pytest.raises(ValueError, match=r"'log_n'"):
        layer_entropy_penalty(row_entropy, torch.full((2,), 0.5), 4, max_entropy_mode="log_n")


def test_empty_layer_list_rejected():
    with pytest.raises(ValueError, match="empty"):
        entropy_regularization_loss([], torch.full((2,), 0.5), 4)


def test_compat_layer_and_head_count_mismatch_rejected():
    attentions = [causal_softmax(1, 2, 4)]
    reg = EntropyRegularization()
    with pytest.raises(ValueError, match=r"num_layers=2"):
        reg.compute_loss(attentions, torch.full((2,), 0.5), num_heads=2, num_layers=2)
    with pytest.raises(ValueError, match=r"num_heads=3"):
        reg.compute_loss(attentions, torch.full((2,), 0.5), num_heads=3, num_layers=1)
