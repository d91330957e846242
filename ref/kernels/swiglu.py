"""SwiGLU gating of LLaMA's MLP: down(silu(gate(x)) * up(x)); this op is the middle part, silu(g) * u."""

import torch
import torch.nn.functional as F

from ref.kernels.registry import register


@register("swiglu", "reference")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class FusedSwiGLU(torch.autograd.Function):
    """silu(g) * u keeping only g and u for backward (autograd's version also keeps silu(g), a third (..., M) tensor).

    With s = sigmoid(g):  silu(g) = g s,  d silu / d g = s (1 + g (1 - s)), so for an upstream gradient y:
        dL/du = y silu(g),   dL/dg = y u s (1 + g (1 - s))
    computed in float32 for 16-bit inputs (as autograd's silu backward does) and cast back.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        g, u, y = gate.float(), up.float(), grad_out.float()
        sig = torch.sigmoid(g)
        silu = g * sig
        grad_up = (y * silu).to(up.dtype)
        grad_gate = (y * u * sig * (1 + g * (1 - sig))).to(gate.dtype)
        return grad_gate, grad_up


@register("swiglu", "fused")
def swiglu_fused(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return FusedSwiGLU.apply(gate, up)
