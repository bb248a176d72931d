"""The released repository's loss arithmetic, shared by the benchmarks as the baseline to beat.

EntropyRegularization.compute_loss in Nandan91/entropy-guided-attention-llm computes entropy with
log(p + 1e-9) and a nansum, then loops over heads in Python; this module restates that arithmetic.
"""

from __future__ import annotations

import math

import torch


def released_entropy_loss(attentions, thresholds, n_head: int, context_size: int, loss_coeff: float,
                          tolerance: float = 0.2) -> torch.Tensor:
    """Compute loss_coeff * L_ent from per-layer (B, H, T, T) probabilities as the released code does."""
    max_entropy = math.log(context_size)
    margin = tolerance * max_entropy
    total = 0.0
    for layer, attn in enumerate(attentions):
        ent = -torch.nansum(attn * torch.log(attn + 1e-9), dim=-1)  # (B, H, T)
        layer_loss = 0.0
        for head in range(n_head):
            deviation = ent[:, head, :] - thresholds[layer][head] * max_entropy
            penalty = torch.where(deviation.abs() > margin, deviation.square(), torch.zeros_like(deviation))
            layer_loss = layer_loss + penalty.sum()
        total = total + layer_loss / n_head
    return loss_coeff * total / len(attentions)
