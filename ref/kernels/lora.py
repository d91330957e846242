"""LoRA over a frozen base linear (dense or 4-bit):  y = base(x) + s * B A dropout(x).

    x (..., in); A (r, in); B (out, r); s = alpha / r;  base(x) = x W^T + b with W frozen (possibly stored in 4 bits)

- `reference`: the two modules as written, autograd does the rest. The one to audit.
- `fused`: one custom autograd function in the spirit of unsloth's fast_lora. The base's output is the base module's
  own forward, run inside the function (so no graph of its own): the very computation the adapters-off pass of the
  KL term makes, on every device and for every input shape, so the KL is exactly 0 at step 0, and generation keeps
  bitsandbytes' one-row kernels. W is dequantized (or read) again in backward instead of being kept, so nothing of size
  (out, in) outlives a call. Without dropout only x itself is saved, and the adapter's float32 copy of it is made
  again in backward: the q, k and v projections of a layer read the same x, so one tensor is kept for the three of
  them instead of three float32 copies. With dropout, the dropped-out x (its own tensor per adapter) is saved.
  The chain rule it implements, with g = dL/dy (..., out) and u = s * (x_d A^T) (..., r), x_d = dropout(x):
      dL/dx   = g W                                      (through the frozen base)
      dL/dB   = s * g^T (x_d A^T)                        (out, r)
      dL/dA   = (s * g B)^T x_d                          (r, in)
      dL/dx_d = (s * g B) A                              (through the adapter; dropout's own backward follows)
"""

from __future__ import annotations

import torch
import torch.nn as nn

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
    def forward(ctx, x, dropped_x, lora_A, lora_B, base, scaling):
        """dropped_x: dropout(x) in the adapters' dtype, or None without dropout (the adapter then reads x, cast)."""
        adapter_x = x.to(lora_A.dtype) if dropped_x is None else dropped_x  # (..., in)
        out = base(x)  # (..., out): the base module's own forward, as with the adapters off
        down = adapter_x @ lora_A.T  # (..., r)
        out = out + ((down @ lora_B.T) * scaling).to(out.dtype)  # (..., out)
        ctx.save_for_backward(x if dropped_x is None else dropped_x, down, lora_A, lora_B)
        ctx.base, ctx.scaling, ctx.x_dtype, ctx.no_dropout = base, scaling, x.dtype, dropped_x is None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved_x, down, lora_A, lora_B = ctx.saved_tensors
        adapter_x = saved_x.to(lora_A.dtype) if ctx.no_dropout else saved_x  # (..., in)
        s, compute_dtype = ctx.scaling, base_compute_dtype(ctx.base, grad_out)
        grad_x = None
        if ctx.needs_input_grad[0]:  # not for the first layer's q, k, v: their input comes from frozen embeddings
            weight = dense_weight(ctx.base, compute_dtype)  # (out, in): W dequantized again, not kept
            grad_x = (grad_out.to(compute_dtype) @ weight).to(ctx.x_dtype)  # (..., in)
        g = grad_out.to(lora_B.dtype)
        grad_B = s * (g.reshape(-1, g.shape[-1]).T @ down.reshape(-1, down.shape[-1]))  # (out, r)
        grad_down = s * (g @ lora_B)  # (..., r)
        grad_A = grad_down.reshape(-1, grad_down.shape[-1]).T @ adapter_x.reshape(-1, adapter_x.shape[-1])  # (r, in)
        if ctx.no_dropout:  # x reached the adapter directly: both paths' gradients are x's
            if grad_x is not None:
                grad_x = grad_x + (grad_down @ lora_A).to(ctx.x_dtype)  # (..., in)
            return grad_x, None, grad_A, grad_B, None, None
        grad_adapter_x = grad_down @ lora_A if ctx.needs_input_grad[1] else None  # (..., in)
        return grad_x, grad_adapter_x, grad_A, grad_B, None, None


def has_dropout(dropout: nn.Module) -> bool:
    """Whether `dropout` changes its input now (an nn.Dropout with p > 0, in training mode)."""
    return isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training


@register("lora_linear", "fused")
def lora_linear_fused(x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      dropout: nn.Module) -> torch.Tensor:
    if torch.is_grad_enabled() and any(p.requires_grad for p in base.parameters(recurse=False)):
        # the base runs inside the function, where autograd does not see it: a trainable base would get no gradient
        raise ValueError("the fused LoRA op needs a frozen base (add_lora freezes it); use the reference op")
    dropped_x = dropout(x.to(lora_A.dtype)) if has_dropout(dropout) else None  # autograd handles dropout's mask
    return FusedLoraLinear.apply(x, dropped_x, lora_A, lora_B, base, scaling)
