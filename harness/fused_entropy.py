"""Causal attention and its row entropy without keeping a (B, nh, T, T) tensor for the backward pass.

For query row i with scores s_ij = scale * q_i.k_j and probabilities p_ij:

    H_i = lse_i - sum_j p_ij s_ij = lse_i - scale * q_i.u_i,    u_i = sum_j p_ij k_j

so u is an attention output with the keys as values, and lse (the row log-sum-exp) comes out of the same
pass. Attention over the values [v, k - mu] gives y and u together; mu, the mean key of the sequence, is a
constant shift: H_i = (lse_i - scale * q_i.mu) - scale * q_i.u'_i with u' the output for k - mu. H is
the difference of two large terms. The shift keeps a common key offset out of u', so the error from
rounding u' to bf16 (in the CUDA kernel) does not grow with that offset.

Gradient: dH_i/ds_ij = -p_ij (s_ij - sum_k p_ik s_ik). The gradient of -scale * q_i.u'_i that flows only
through the scores (q held constant in the product, the values k - mu detached) equals it, because the
gradients of the lse term and of the two direct terms cancel. So y and H need one attention backward
pass, with grad_out = [dL/dy, -dL/dH * scale * q], and no gradient to lse.

Kernels: BlockwiseAttention (any device, fp32 or fp64 arithmetic) runs over blocks of query rows in
plain PyTorch; on CUDA, the memory-efficient SDPA kernel, which accepts a value wider than q and k,
runs instead and BlockwiseAttention is the fallback.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

BLOCK_ROWS = 64  # query rows per block of BlockwiseAttention
BLOCK_ELEMENTS = 2**18  # target scores per block step and CPU thread (heads x rows x keys), 1 MiB in fp32


# -----------------------------------------------------------------------------
# Blockwise causal attention in plain PyTorch

def _head_chunk(n_heads: int, n_keys: int) -> int:
    """Return how many (batch, head) pairs one block step covers: about BLOCK_ELEMENTS scores per thread.

    Fewer, larger steps also mean fewer thread synchronizations, which stall when other processes load the CPUs.
    """
    budget = BLOCK_ELEMENTS * torch.get_num_threads()
    return max(1, min(n_heads, budget // (BLOCK_ROWS * n_keys)))


def _future_mask(n: int, dtype, device) -> torch.Tensor:
    """Return an (n, n) additive mask, -inf above the diagonal: the causal part of a diagonal block."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)


class BlockwiseAttention(torch.autograd.Function):
    """Causal attention over values [v, extra] with the row lse, one block of query rows at a time.

    q, k, v, extra: (N, T, hs) with N = batch x heads; extra gets no gradient. Returns the output
    (N, T, 2 hs) and lse (N, T), which is not differentiable. Each step builds the scores of at most
    BLOCK_ROWS query rows of a few heads. The backward pass recomputes them from q, k and lse.
    """

    @staticmethod
    def forward(ctx, q, k, v, extra, scale):
        N, T, _ = q.shape
        values = torch.cat([v, extra], dim=-1)  # (N, T, 2 hs)
        q_scaled, k_t = q * scale, k.transpose(1, 2)
        mask = _future_mask(BLOCK_ROWS, q.dtype, q.device)
        chunk = _head_chunk(N, T)

        # block results are concatenated at the end: writing into slices would add a copy per block
        out_chunks, max_chunks, sum_chunks = [], [], []
        for h0 in range(0, N, chunk):
            heads = slice(h0, h0 + chunk)
            out_blocks, max_blocks, sum_blocks = [], [], []
            for r0 in range(0, T, BLOCK_ROWS):
                r1 = min(r0 + BLOCK_ROWS, T)
                rows = slice(r0, r1)

                # scores of these rows against keys 0..r1-1, with the causal mask on the diagonal block
                scores = torch.bmm(q_scaled[heads, rows], k_t[heads, :, :r1])  # (n, rows, r1)
                scores[:, :, rows] += mask[: r1 - r0, : r1 - r0]

                # unnormalized softmax times the values, normalized after the loop
                row_max = scores.amax(dim=-1, keepdim=True)  # (n, rows, 1)
                weights = scores.sub_(row_max).exp_()
                max_blocks.append(row_max)
                sum_blocks.append(weights.sum(dim=-1, keepdim=True))
                out_blocks.append(torch.bmm(weights, values[heads, :r1]))  # (n, rows, 2 hs)
            out_chunks.append(torch.cat(out_blocks, dim=1))
            max_chunks.append(torch.cat(max_blocks, dim=1))
            sum_chunks.append(torch.cat(sum_blocks, dim=1))

        row_sum = torch.cat(sum_chunks)  # (N, T, 1)
        out = torch.cat(out_chunks).div_(row_sum)  # (N, T, 2 hs)
        lse = (torch.cat(max_chunks) + row_sum.log()).squeeze(-1)  # (N, T)
        ctx.save_for_backward(q, k, values, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, values, out, lse = ctx.saved_tensors
        N, T, hs = q.shape
        scale = ctx.scale
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(k)
        q_scaled, k_t, values_t = q * scale, k.transpose(1, 2), values.transpose(1, 2)

        # D_i = grad_out_i . out_i, the softmax backward's row term
        grad_out = grad_out.contiguous()
        row_dot = (grad_out * out).sum(dim=-1, keepdim=True)  # (N, T, 1)
        neg_lse = -lse.unsqueeze(-1)  # (N, T, 1)
        mask = _future_mask(BLOCK_ROWS, q.dtype, q.device)
        chunk = _head_chunk(N, T)
        grad_q_chunks = []
        for h0 in range(0, N, chunk):
            heads = slice(h0, h0 + chunk)
            grad_q_blocks = []
            for r0 in range(0, T, BLOCK_ROWS):
                r1 = min(r0 + BLOCK_ROWS, T)
                rows = slice(r0, r1)

                # recompute probabilities from the saved lse
                probs = torch.baddbmm(neg_lse[heads, rows], q_scaled[heads, rows], k_t[heads, :, :r1])  # (n, rows, r1)
                probs[:, :, rows] += mask[: r1 - r0, : r1 - r0]
                probs.exp_()

                # value gradient for v only, because extra gets none
                grad_v[heads, :r1] += torch.bmm(probs.transpose(1, 2), grad_out[heads, rows, :hs])

                # score gradient p * (grad_out . values - D), then query and key gradients
                grad_scores = torch.baddbmm(row_dot[heads, rows], grad_out[heads, rows], values_t[heads, :, :r1], beta=-1)
                grad_scores.mul_(probs)  # (n, rows, r1)
                grad_q_blocks.append(torch.bmm(grad_scores, k[heads, :r1]))  # (n, rows, hs)
                grad_k[heads, :r1] += torch.bmm(grad_scores.transpose(1, 2), q_scaled[heads, rows])
            grad_q_chunks.append(torch.cat(grad_q_blocks, dim=1))

        grad_q = torch.cat(grad_q_chunks)  # (N, T, hs)
        return grad_q.mul_(scale), grad_k, grad_v, None, None


def _blockwise_attention(q, k, v, extra, scale):
    """Run BlockwiseAttention on (B, nh, T, hs) inputs in fp32 (fp64 stays fp64), autocast off."""
    B, nh, T, hs = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    flat = [x.to(dtype).reshape(B * nh, T, hs) for x in (q, k, v, extra)]
    with torch.autocast(q.device.type, enabled=False):
        out, lse = BlockwiseAttention.apply(*flat, scale)  # (B*nh, T, 2 hs), (B*nh, T)
    return out.view(B, nh, T, 2 * hs), lse.view(B, nh, T)


# -----------------------------------------------------------------------------
# The memory-efficient SDPA kernel on CUDA

class _CUDAEfficientAttention(torch.autograd.Function):
    """Causal attention through aten's memory-efficient kernel, returning (out, lse) with lse not differentiable."""

    @staticmethod
    def forward(ctx, q, k, values, scale):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, values, None, True, 0.0, True, scale=scale
        )
        ctx.save_for_backward(q, k, values, out, lse, seed, offset)
        ctx.scale = scale

        # the kernel pads lse to a multiple of 32 query rows, and its backward pass takes the padded tensor
        lse_rows = lse[..., : q.shape[-2]].clone()
        ctx.mark_non_differentiable(lse_rows)
        return out, lse_rows  # (B, nh, T, 2 hs), (B, nh, T) fp32

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, values, out, lse, seed, offset = ctx.saved_tensors
        grad_q, grad_k, grad_values, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out.contiguous(), q, k, values, None, out, lse, seed, offset, 0.0, [True, True, True, False], True,
            scale=ctx.scale,
        )
        return grad_q, grad_k, grad_values, None


def _cuda_attention(q, k, v, extra, scale):
    """Run the memory-efficient kernel on values [v, extra] in the model's dtype.

    NOTE: in bf16 the kernel rounds the probabilities to bf16 before the value product. An estimate on CPU
    that rounds P and u' the same way puts the error of H at about 1e-3 nats on average and up to 0.15 for
    heads with scores near 30. It was not measured on a GPU. fp32 inputs get fp32 accuracy.
    """
    values = torch.cat([v, extra.to(v.dtype)], dim=-1)  # (B, nh, T, 2 hs)
    return _CUDAEfficientAttention.apply(q, k, values, scale)


# -----------------------------------------------------------------------------
# Output and row entropy

_warned_dtypes = set()  # dtypes for which the CUDA kernel failed and a warning was logged


def fused_attention_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (causal attention output (B, nh, T, hs) in v's dtype, row entropy (B, nh, T) in fp32).

    q, k, v: (B, nh, T, hs). Exact in value and gradient up to rounding. The backward pass keeps
    O(T * hs) per head, never the T x T probabilities. fp64 inputs give fp64 outputs (for gradcheck).
    """
    hs = q.shape[-1]
    scale = 1.0 / math.sqrt(hs)
    k, v = k.to(q.dtype), v.to(q.dtype)

    # the keys, shifted by their mean and detached, are the extra values
    exact = torch.float64 if q.dtype == torch.float64 else torch.float32
    key_shift = k.detach().to(exact).mean(dim=-2, keepdim=True)  # (B, nh, 1, hs)
    extra = k.detach().to(exact) - key_shift  # (B, nh, T, hs)

    # one attention pass gives y, u' and lse
    out = None
    if q.device.type == "cuda":
        try:
            out, lse = _cuda_attention(q, k, v, extra, scale)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            if q.dtype not in _warned_dtypes:
                _warned_dtypes.add(q.dtype)
                logger.warning("memory-efficient attention failed for %s (%s); using BlockwiseAttention", q.dtype, err)
    if out is None:
        out, lse = _blockwise_attention(q, k, v, extra, scale)
    y, u = out.split([hs, hs], dim=-1)  # (B, nh, T, hs) each

    # H = (lse - scale * q.mu) - scale * q.u' in fp32 (fp64 for fp64 inputs), with the gradient through u' only
    q_exact = q.detach().to(exact)
    offset = lse.to(exact) - scale * (q_exact * key_shift).sum(dim=-1)  # (B, nh, T)
    entropy = offset - scale * (q_exact * u.to(exact)).sum(dim=-1)  # (B, nh, T)
    return y.to(v.dtype), entropy
