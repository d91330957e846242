"""Rotary position embedding in the `rotate_half` layout that LLaMA's published weights are permuted for.

For a head vector x = [x1, x2] (two halves of head_dim d) at position p, with angles theta_i = p / base^(2i/d):
    rope(x) = x * cos(theta) + rotate_half(x) * sin(theta),  rotate_half([x1, x2]) = [-x2, x1]
where cos and sin are repeated over both halves (`emb = cat(freqs, freqs)`).
"""

import torch

from ref.kernels.registry import register


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register("rope", "reference")
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, H, T, d), k: (B, Hkv, T, d), cos/sin: (B, T, d). Returns rotated q and k."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
