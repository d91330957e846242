"""LoRA over a frozen base linear (dense or 4-bit):  y = base(x) + s * B A dropout(x).

    x (..., in); A (r, in); B (out, r); s = alpha / r;  base(x) = x W^T + b with W frozen (possibly stored in 4 bits)

- `reference`: the two modules as written, autograd does the rest. The one to audit.
- `fused`: one custom autograd function in the spirit of unsloth's fast_lora. W is dequantized (or read) inside
  forward and AGAIN inside backward instead of being kept, and the base's matmul is a plain dense matmul, so nothing
  of size (out, in) outlives a call and only x, the dropped-out x and x A^T are saved. The base's matmul runs in the
  4-bit layer's compute dtype when it has one (as `Linear4bit.forward` does), and its result is cast back to x's.
  The chain rule it implements, with g = dL/dy (..., out) and u = s * (x_d A^T) (..., r), x_d = dropout(x):
      dL/dx   = g W                                      (through the frozen base)
      dL/dB   = s * g^T (x_d A^T)                        (out, r)
      dL/dA   = (s * g B)^T x_d                          (r, in)
      dL/dx_d = (s * g B) A                              (through the adapter; dropout's own backward follows)
  On a CPU, bitsandbytes' matmul_4bit also dequantizes W per call, so the fused form does the same work in fewer
  autograd nodes; on a GPU it trades bitsandbytes' fused 4-bit kernels for a dequantize + dense matmul.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.kernels.registry import register
from ref.quant import Linear4bit


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base's (out, in) weight as a fresh dense tensor: dequantized for a 4-bit linear, cast for nn.Linear."""
    if isinstance(base, Linear4bit):
        return base.dequantize(dtype)
    return base.weight.to(dtype)


def base_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the base's matmul runs in: a 4-bit layer's compute_dtype when set, else the input's."""
    return (base.compute_dtype if isinstance(base, Linear4bit) else None) or x.dtype


@register("lora_linear", "reference")
def lora_linear(x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout: nn.Module) -> torch.Tensor:
    out = base(x)  # (..., out)
    adapter_x = dropout(x.to(lora_A.dtype))  # the adapter has its own dtype: cast in ...
    update = (adapter_x @ lora_A.T) @ lora_B.T * scaling  # (..., out)
    return out + update.to(out.dtype)  # ... and cast back


class FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, adapter_x, lora_A, lora_B, base, scaling):
        compute_dtype = base_compute_dtype(base, x)
        weight = dense_weight(base, compute_dtype)  # (out, in), dropped at the end of forward
        bias = None if base.bias is None else base.bias.to(compute_dtype)
        out = F.linear(x.to(compute_dtype), weight, bias).to(x.dtype)  # (..., out), one rounding as the base's own
        down = adapter_x @ lora_A.T  # (..., r)
        out = out + ((down @ lora_B.T) * scaling).to(out.dtype)  # (..., out)
        ctx.save_for_backward(adapter_x, down, lora_A, lora_B)
        ctx.base, ctx.scaling, ctx.x_dtype, ctx.compute_dtype = base, scaling, x.dtype, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        adapter_x, down, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        weight = dense_weight(ctx.base, ctx.compute_dtype)  # (out, in): W dequantized again, not kept
        grad_x = (grad_out.to(ctx.compute_dtype) @ weight).to(ctx.x_dtype)  # (..., in)
        g = grad_out.to(lora_B.dtype)
        grad_B = s * (g.reshape(-1, g.shape[-1]).T @ down.reshape(-1, down.shape[-1]))  # (out, r)
        grad_down = s * (g @ lora_B)  # (..., r)
        grad_A = grad_down.reshape(-1, grad_down.shape[-1]).T @ adapter_x.reshape(-1, adapter_x.shape[-1])  # (r, in)
        grad_adapter_x = grad_down @ lora_A  # (..., in)
        return grad_x, grad_adapter_x, grad_A, grad_B, None, None


@register("lora_linear", "fused")
def lora_linear_fused(x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      dropout: nn.Module) -> torch.Tensor:
    adapter_x = dropout(x.to(lora_A.dtype))  # dropout stays outside: autograd handles its mask
    return FusedLoraLinear.apply(x, adapter_x, lora_A, lora_B, base, scaling)
