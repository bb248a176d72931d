"""Causal attention that also returns the entropy of every query row.

Two implementations with one contract, `causal_attention(q, k, v, need_entropy, impl)`:
- `explicit`: materializes the (B, nh, T, T) probabilities in fp32; the reference path in tests.
- `fused`: scaled_dot_product_attention for the output; see fused_row_entropy for the entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.entropy import entropy_from_scores

ATTENTION_IMPLS = ("fused", "explicit")


def causal_mask(n_query: int, n_key: int, device) -> torch.Tensor:
    """Return a bool (T_q, T_k) mask, True where query i may attend to key j (j <= i, aligned at the end)."""
    offset = n_key - n_query
    rows = torch.arange(n_query, device=device)[:, None]
    cols = torch.arange(n_key, device=device)[None, :]
    return cols <= rows + offset


def explicit_attention(q, k, v, need_entropy: bool = True):
    """Return (output, row entropy) from materialized probabilities; q, k, v are (B, nh, T, hs)."""
    scale = 1.0 / math.sqrt(q.shape[-1])

    # scores in fp32, then masked softmax and exact entropy
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T)
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    probs, entropy = entropy_from_scores(scores, mask)  # (B, nh, T, T), (B, nh, T)

    # weighted sum of values in the model's dtype
    y = probs.to(v.dtype) @ v  # (B, nh, T, hs)
    return y, (entropy if need_entropy else None)


def fused_row_entropy(q, k) -> torch.Tensor:
    """Return the (B, nh, T) row entropy without keeping a (B, nh, T, T) tensor for the backward pass."""
    # TODO: replace with a route whose forward and backward never materialize T x T probabilities.
    _, entropy = explicit_attention(q, k, k, need_entropy=True)
    return entropy


def causal_attention(q, k, v, need_entropy: bool, impl: str = "fused"):
    """Return (output (B, nh, T, hs), row entropy (B, nh, T) or None)."""
    if impl == "explicit":
        return explicit_attention(q, k, v, need_entropy)
    if impl != "fused":
        raise ValueError(f"invalid attention implementation {impl!r}: accepted values are {list(ATTENTION_IMPLS)}")
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    entropy = fused_row_entropy(q, k) if need_entropy else None
    return y, entropy
