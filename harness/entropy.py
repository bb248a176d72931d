"""Attention entropy, the entropy regularization loss, and head statistics.

Method: Jha and Reagen, "Entropy-Guided Attention for Private LLMs" (arXiv 2501.03489). For head h of
layer l with learnable threshold theta(l, h), E_max the reference maximum and Tol = gamma * E_max:

    delta   = E - theta(l, h) * E_max
    penalty = delta^2 if |delta| > Tol else 0
    L_ent   = mean over layers of (mean over heads of penalty)

`row_sum` takes E per (batch, query) row and sums the penalties over rows, as the authors' released code
does (so their lambda = 1e-5 keeps its meaning); `head_mean` takes E as the head entropy (mean over rows
and batch), as the paper's algorithm does. This module imports no training, tracking or study code.
"""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("row_sum", "head_mean")
MAX_ENTROPY_MODES = ("log_t", "causal")

# A head is in overload when its entropy is at least this fraction of the entropy of uniform causal
# attention (the largest head entropy a causal head can reach), and in collapse when it is at most
# COLLAPSE_FRACTION of it. The bins of the paper's figures use another reference: see entropy_bins.
OVERLOAD_FRACTION = 0.9
COLLAPSE_FRACTION = 0.1


# -----------------------------------------------------------------------------
# Entropy of attention rows

def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Return the Shannon entropy (nats) of each row of attention probabilities, summed over the last dim.

    Exact: no epsilon in the log, zero entries contribute zero, fp32 accumulation for bf16/fp16 inputs.
    A one-hot row gives 0 and a fully masked (all-zero) row gives 0. The log is taken on p > 0 only, so
    the zero probabilities of masked keys get a zero gradient (xlogy's backward would give NaN there).
    """
    probs = probs.float()
    positive = probs > 0
    log_probs = torch.log(torch.where(positive, probs, torch.ones_like(probs)))
    return -(probs * log_probs).sum(dim=-1)


def entropy_from_scores(scores: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (probabilities, row entropy) of softmax over the last dim of attention scores.

    scores: (..., T_q, T_k) logits; mask: bool, True where a key is visible to the query (broadcastable).
    Uses H = logsumexp(s) - sum_j p_j s_j with masked scores set to zero after the softmax, so neither the
    value nor the gradient meets 0 * log 0. Fully masked rows give zero probabilities and zero entropy.
    """
    scores = scores.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))

    # rows with no visible key get a finite stand-in, then zeroed
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isinf(row_max) & (row_max < 0)
    safe = scores.masked_fill(empty, 0.0)

    # log-sum-exp and probabilities
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)  # (..., T_q, 1)
    probs = torch.exp(safe - lse)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)
    probs = probs.masked_fill(empty, 0.0)

    # H = lse - E_p[s], with masked scores zeroed so 0 * (-inf) never appears
    finite_scores = safe.masked_fill(torch.isinf(safe), 0.0)
    entropy = lse.squeeze(-1) - (probs * finite_scores).sum(dim=-1)
    entropy = entropy.masked_fill(empty.squeeze(-1), 0.0)
    return probs, entropy


# -----------------------------------------------------------------------------
# Reference maximum entropy

def max_entropy(context_length: int, mode: str = "log_t", n_rows: int | None = None, device=None) -> torch.Tensor:
    """Return E_max: a scalar log T for `log_t`, or log(i) for query rows i = 1..n_rows for `causal`."""
    if mode not in MAX_ENTROPY_MODES:
        raise ValueError(f"invalid max_entropy mode {mode!r}: accepted values are {list(MAX_ENTROPY_MODES)}")
    if context_length < 1:
        raise ValueError(f"invalid context length {context_length}: must be >= 1")
    if mode == "log_t":
        return torch.tensor(math.log(context_length), device=device)
    rows = n_rows or context_length
    return torch.log(torch.arange(1, rows + 1, device=device, dtype=torch.float32))  # (T,)


def uniform_causal_entropy(n_rows: int) -> float:
    """Return the head entropy of uniform causal attention over n_rows queries: mean of log i."""
    return math.lgamma(n_rows + 1) / n_rows


# -----------------------------------------------------------------------------
# The regularization loss

def check_loss_args(loss_coeff: float, tolerance: float, reduction: str) -> None:
    """Raise ValueError for a negative lambda, gamma outside [0, 1] or an unknown reduction."""
    if loss_coeff < 0:
        raise ValueError(f"invalid loss coefficient lambda={loss_coeff}: must be >= 0")
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"invalid tolerance gamma={tolerance}: must be in [0, 1]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"invalid reduction {reduction!r}: accepted values are {list(REDUCTIONS)}")


def _check_shapes(row_entropy: torch.Tensor, thresholds: torch.Tensor, context_length: int) -> None:
    if row_entropy.dim() != 3:
        raise ValueError(f"invalid row entropy shape {tuple(row_entropy.shape)}: expected (B, H, T)")
    n_head, n_rows = row_entropy.shape[1], row_entropy.shape[2]
    if tuple(thresholds.shape) != (n_head,):
        raise ValueError(f"invalid thresholds shape {tuple(thresholds.shape)}: expected ({n_head},), one per head")
    if n_rows > context_length:
        raise ValueError(
            f"context length {context_length} does not match the attention shape: it has {n_rows} query rows; "
            "set the context length to the training context (at least the sequence length)"
        )


def layer_entropy_penalty(
    row_entropy: torch.Tensor,
    thresholds: torch.Tensor,
    context_length: int,
    tolerance: float = 0.2,
    reduction: str = "row_sum",
    max_entropy_mode: str = "log_t",
) -> torch.Tensor:
    """Return one layer's L_layer: the mean over heads of the gated squared deviation (no lambda).

    row_entropy: (B, H, T) entropy of each query row; thresholds: (H,) theta as fractions of E_max.
    """
    _check_shapes(row_entropy, thresholds, context_length)
    check_loss_args(0.0, tolerance, reduction)
    n_rows = row_entropy.shape[-1]
    e_max = max_entropy(context_length, max_entropy_mode, n_rows, row_entropy.device)  # () or (T,)
    theta = thresholds.float()

    if reduction == "row_sum":
        # deviation of every (batch, query) row, penalties summed over rows
        target = theta[:, None] * e_max  # (H, 1) or (H, T)
        delta = row_entropy.float() - target  # (B, H, T)
        tol = tolerance * e_max
        penalty = torch.where(delta.abs() > tol, delta.square(), torch.zeros_like(delta))
        return penalty.sum(dim=(0, 2)).mean()

    # head_mean: one entropy per head; the causal reference is then the mean of log i over rows
    head_entropy = row_entropy.float().mean(dim=(0, 2))  # (H,)
    e_ref = e_max.mean() if e_max.dim() else e_max
    delta = head_entropy - theta * e_ref
    penalty = torch.where(delta.abs() > tolerance * e_ref, delta.square(), torch.zeros_like(delta))
    return penalty.mean()


def entropy_regularization_loss(
    row_entropies: list[torch.Tensor],
    thresholds: torch.Tensor | list[torch.Tensor],
    context_length: int,
    tolerance: float = 0.2,
    reduction: str = "row_sum",
    max_entropy_mode: str = "log_t",
) -> torch.Tensor:
    """Return L_ent, the mean over layers of layer_entropy_penalty (multiply by lambda yourself).

    thresholds: (L, H), a list of L (H,) tensors, or one (H,) tensor shared by all layers.
    """
    if not row_entropies:
        raise ValueError("no attention layers given: row_entropies is empty")
    per_layer = _per_layer_thresholds(thresholds, len(row_entropies))
    penalties = [
        layer_entropy_penalty(h, t, context_length, tolerance, reduction, max_entropy_mode)
        for h, t in zip(row_entropies, per_layer)
    ]
    return torch.stack(penalties).mean()


def _per_layer_thresholds(thresholds, n_layer: int) -> list[torch.Tensor]:
    """Expand thresholds given as (H,), (L, H) or a list of L (H,) tensors into a list of L (H,)."""
    if isinstance(thresholds, (list, tuple)):
        thresholds = torch.stack([torch.as_tensor(t) for t in thresholds]) if len(thresholds) else torch.empty(0)
    thresholds = torch.as_tensor(thresholds)
    if thresholds.dim() == 1:
        return [thresholds] * n_layer
    if thresholds.dim() == 2 and thresholds.shape[0] == n_layer:
        return list(thresholds.unbind(0))
    raise ValueError(
        f"invalid thresholds shape {tuple(thresholds.shape)}: expected (H,) shared by all layers or ({n_layer}, H)"
    )


# -----------------------------------------------------------------------------
# Head statistics for tracking and tables

def head_entropy(row_entropies: list[torch.Tensor]) -> torch.Tensor:
    """Return the L x H head entropy: the mean of row entropy over batch and query rows, per layer."""
    return torch.stack([h.float().mean(dim=(0, 2)) for h in row_entropies])  # (L, H)


def entropy_bins(head_ent: torch.Tensor) -> torch.Tensor:
    """Return the share of heads in [0, M/4), [M/4, M/2), [M/2, 3M/4), [3M/4, M], M the largest head entropy.

    M is the maximum observed in this model, not log T, as in the paper's bin figures.
    """
    values = head_ent.detach().float().flatten()
    top = values.max()
    if top <= 0:
        return torch.tensor([1.0, 0.0, 0.0, 0.0])
    index = torch.clamp((values / top * 4).floor().long(), max=3)
    return torch.bincount(index, minlength=4).float() / values.numel()


def overload_collapse_fractions(head_ent: torch.Tensor, n_rows: int) -> tuple[float, float]:
    """Return the fractions of heads in entropic overload and in entropy collapse.

    Reference: the head entropy of uniform causal attention over n_rows queries (mean of log i).
    Overload: E >= OVERLOAD_FRACTION * reference; collapse: E <= COLLAPSE_FRACTION * reference.
    """
    reference = uniform_causal_entropy(n_rows)
    values = head_ent.detach().float().flatten()
    overload = (values >= OVERLOAD_FRACTION * reference).float().mean().item()
    collapse = (values <= COLLAPSE_FRACTION * reference).float().mean().item()
    return overload, collapse


def entropy_summary(head_ent: torch.Tensor, n_rows: int) -> dict[str, float]:
    """Return the scalar statistics logged at every evaluation: per-layer means, bins, overload, collapse."""
    stats = {f"entropy/layer_{i}": v.item() for i, v in enumerate(head_ent.float().mean(dim=1))}
    stats["entropy/mean"] = head_ent.float().mean().item()
    for i, share in enumerate(entropy_bins(head_ent).tolist()):
        stats[f"entropy/bin_{i}"] = share
    stats["entropy/overload_fraction"], stats["entropy/collapse_fraction"] = overload_collapse_fractions(head_ent, n_rows)
    return stats


# -----------------------------------------------------------------------------
# Compatibility with the authors' released class

class EntropyRegularization:
    """Drop-in replacement for the released `EntropyRegularization` (Nandan91/entropy-guided-attention-llm).

    Same constructor and methods; `compute_loss` returns loss_coeff * L_ent with the `row_sum` reduction and
    E_max = log(context_size), as the released code does, but with exact entropy (no 1e-9 inside the log).
    `reg_threshold_weights` may be one (H,) vector shared by all layers, as the released example passes,
    or (L, H) / a list of L vectors, one per layer.
    """

    def __init__(self, loss_coeff: float = 1e-5, tolerance_margin_factor: float = 0.20, context_size: int | None = None):
        check_loss_args(loss_coeff, tolerance_margin_factor, "row_sum")
        if context_size is not None and context_size < 1:
            raise ValueError(f"invalid context_size={context_size}: must be >= 1 or None")
        self.loss_coeff = loss_coeff
        self.tolerance_margin_factor = tolerance_margin_factor
        self.context_size = context_size

    def compute_loss(self, attentions, reg_threshold_weights, num_heads: int, num_layers: int) -> torch.Tensor:
        """Return loss_coeff * L_ent for a list of (B, H, T, T) attention probability tensors."""
        if len(attentions) != num_layers:
            raise ValueError(f"got {len(attentions)} attention tensors for num_layers={num_layers}")
        if attentions[0].shape[1] != num_heads:
            raise ValueError(f"attention has {attentions[0].shape[1]} heads, num_heads={num_heads}")
        context = self.context_size or attentions[0].shape[-1]
        rows = [self.compute_entropy(a) for a in attentions]  # L x (B, H, T)
        device = attentions[0].device
        thresholds = reg_threshold_weights
        if isinstance(thresholds, (list, tuple)):
            thresholds = [torch.as_tensor(t, device=device) for t in thresholds]
        loss = entropy_regularization_loss(rows, thresholds, context, self.tolerance_margin_factor, "row_sum", "log_t")
        return self.loss_coeff * loss

    @staticmethod
    def compute_entropy(attention_matrix: torch.Tensor) -> torch.Tensor:
        """Return the entropy of each attention row, shape (B, H, T)."""
        return attention_entropy(attention_matrix)

    @staticmethod
    def log_entropy_metrics(attention_matrices, step: int, logger=None) -> dict[str, torch.Tensor]:
        """Return {attn.{layer}.head.{head}.entropy: mean row entropy} and pass it to logger.log if given."""
        metrics = {}
        for layer, attn in enumerate(attention_matrices):
            per_head = attention_entropy(attn).mean(dim=(0, 2))  # (H,)
            for head, value in enumerate(per_head):
                metrics[f"attn.{layer}.head.{head}.entropy"] = value
        if logger is not None:
            logger.log(metrics)
        return metrics
