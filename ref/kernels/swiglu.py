"""SwiGLU gating of LLaMA's MLP: down(silu(gate(x)) * up(x)); this op is the middle part, silu(g) * u."""

import torch
import torch.nn.functional as F

from ref.kernels.registry import register


@register("swiglu", "reference")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
