"""Causal attention that also returns the entropy of every query row.

Two implementations with one contract, `causal_attention(q, k, v, need_entropy, impl)`:
- `explicit`: materializes the (B, nh, T, T) probabilities in fp32; the reference path in tests.
- `fused`: fused kernels for the output and, when requested, the entropy (harness.fused_entropy); nothing
  of size T x T is kept for the backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.entropy import entropy_from_scores
from harness.fused_entropy import fused_attention_entropy

ATTENTION_IMPLS = ("fused", "explicit")


def causal_mask(n_query: int, n_key: int, device) -> torch.Tensor:
    """Return a bool (T_q, T_k) mask, True where query i may attend to key j (j <= i, aligned at the end)."""
    offset = n_key - n_query
    rows = torch.arange(n_query, device=device)[:, None]
    cols = torch.arange(n_key, device=device)[None, :]
    return cols <= rows + offset


def explicit_attention_probs(q, k, v):
    """Return (output, row entropy, probabilities) from materialized (B, nh, T, T) fp32 probabilities."""
    scale = 1.0 / math.sqrt(q.shape[-1])

    # scores in fp32 (autocast would run this matmul in bf16/fp16), then masked softmax and exact entropy
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T)
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    probs, entropy = entropy_from_scores(scores, mask)  # (B, nh, T, T), (B, nh, T)

    # weighted sum of values in the model's dtype
    y = probs.to(v.dtype) @ v  # (B, nh, T, hs)
    return y, entropy, probs


def explicit_attention(q, k, v, need_entropy: bool = True):
    """Return (output, row entropy) from materialized probabilities; q, k, v are (B, nh, T, hs)."""
    y, entropy, _ = explicit_attention_probs(q, k, v)
    return y, (entropy if need_entropy else None)


def fused_attention(q, k, v, need_entropy: bool = True):
    """Return (output, row entropy or None) from fused kernels; q, k, v are (B, nh, T, hs)."""
    if not need_entropy:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), None  # (B, nh, T, hs)
    return fused_attention_entropy(q, k, v)


def causal_attention(q, k, v, need_entropy: bool, impl: str = "fused"):
    """Return (output (B, nh, T, hs), row entropy (B, nh, T) fp32 or None)."""
    if impl == "explicit":
        return explicit_attention(q, k, v, need_entropy)
    if impl != "fused":
        raise ValueError(f"invalid attention implementation {impl!r}: accepted values are {list(ATTENTION_IMPLS)}")
    return fused_attention(q, k, v, need_entropy)
