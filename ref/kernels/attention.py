"""Scaled dot-product attention: softmax(q k^T * scale + mask) v, with grouped-query heads.

q: (B, H, Tq, d); k, v: (B, Hkv, Tk, d) with H a multiple of Hkv (each key/value head serves H / Hkv query heads);
mask: additive, broadcastable to (B, H, Tq, Tk), 0 where attending is allowed and a large negative number where not,
or None for full (bidirectional) attention. Returns (B, H, Tq, d).

causal: the caller's promise that, for every query whose output is used, `mask` allows exactly the keys at or before
the query (Tq == Tk, no cache): the decoder gives it for right-padded batches, whose padding keys all come after every
real query. An implementation may then use a causal kernel instead of the mask (FlashAttention needs that: it takes no
mask), which differs only at padding queries, whose outputs no loss reads. The reference always applies the mask.
"""

import torch
import torch.nn.functional as F

from ref.kernels.registry import register


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, d) -> (B, Hkv * n_rep, T, d), each key/value head repeated for its group of query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


@register("attention", "reference")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              causal: bool = False) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores + mask
    # Softmax in float32 whatever the compute dtype: 16-bit exponent sums lose too much.
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)  # (B, H, Tq, d)


@register("attention", "sdpa")
def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                   causal: bool = False) -> torch.Tensor:
    """PyTorch's fused attention (flash / memory-efficient kernels where the device has them): it never keeps the
    (B, H, Tq, Tk) probabilities for backward, only the output and a log-sum-exp per query."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if causal and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # FlashAttention where it exists
    mask = None if mask is None else mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
