"""RMSNorm, as LLaMA computes it: y = w * (x / sqrt(mean(x^2) + eps)), the statistic in float32."""

import torch

from ref.kernels.registry import register


@register("rms_norm", "reference")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    input_dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)  # (..., 1)
    normed = x32 * torch.rsqrt(variance + eps)
    # Cast back before the weight multiply: this is the order LLaMA (and transformers) use, and it matters in 16-bit.
    return weight * normed.to(input_dtype)
