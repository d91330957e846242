"""The lora_linear op: reference and fused, against a float64 formula, over dense and 4-bit bases."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ref.kernels import IMPLEMENTATIONS
from ref.quant import Linear4bit

IMPLS = sorted(IMPLEMENTATIONS["lora_linear"])
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make_base(kind: str, n_in: int, n_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dense = nn.Linear(n_in, n_out, bias=True)
    dense.requires_grad_(False)
    return Linear4bit.from_linear(dense) if kind == "nf4" else dense


def float64_formula(x, base, A, B, scaling, keep_mask):
    """y = x W^T + b + s * ((x * mask) A^T) B^T, all in float64 (W dequantized for a 4-bit base)."""
    W = base.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight
    x64 = x.double()
    out = x64 @ W.double().T + base.bias.double()
    return out + scaling * ((x64 * keep_mask.double()) @ A.double().T) @ B.double().T


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 64, 48), (2, 7, 64, 40)], ids=["one_token", "odd"])
@pytest.mark.parametrize("upstream", [1.0, -1.0], ids=["descent", "ascent"])
def test_output_and_gradients_match_float64(impl, kind, dtype, shape, upstream):
    batch, tokens, n_in, n_out = shape
    base = make_base(kind, n_in, n_out, seed=0)
    if kind == "dense":
        base = base.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, n_in, generator=g).to(dtype).requires_grad_()
    A = (0.1 * torch.randn(4, n_in, generator=g)).requires_grad_()  # adapters stay float32, as ref.lora keeps them
    B = (0.1 * torch.randn(n_out, 4, generator=g)).requires_grad_()
    scaling = 2.0
    out = IMPLEMENTATIONS["lora_linear"][impl](x, base, A, B, scaling, nn.Identity())
    (out.float() * upstream).sum().backward()

    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    want = float64_formula(x64, base, A64, B64, scaling, torch.ones(n_in))
    (want * upstream).sum().backward()
    tol = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(A.grad.double(), A64.grad, **tol)
    torch.testing.assert_close(B.grad.double(), B64.grad, **tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_mask_applies_to_the_adapter_only(impl):
    base = make_base("nf4", 64, 32, seed=2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    A = (0.1 * torch.randn(4, 64)).requires_grad_()
    B = (0.1 * torch.randn(32, 4)).requires_grad_()
    dropout = nn.Dropout(0.5)
    torch.manual_seed(7)
    out = IMPLEMENTATIONS["lora_linear"][impl](x, base, A, B, 1.5, dropout)
    torch.manual_seed(7)
    keep = dropout(torch.ones(3, 64))  # the same mask, scaled by 1 / (1 - p) as dropout scales
    want = float64_formula(x.detach(), base, A.detach(), B.detach(), 1.5, keep)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_adapter_matrix_gets_no_gradient(impl):
    base = make_base("dense", 16, 8, seed=4)
    x = torch.randn(5, 16, requires_grad=True)
    A = torch.randn(2, 16)  # frozen
    B = torch.randn(8, 2, requires_grad=True)
    IMPLEMENTATIONS["lora_linear"][impl](x, base, A, B, 1.0, nn.Identity()).sum().backward()
    assert A.grad is None and B.grad is not None and x.grad is not None
    assert base.weight.grad is None


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_base_matmul_runs_in_the_4bit_layers_compute_dtype(compute_dtype):
    """A 4-bit layer with a compute dtype multiplies in that dtype (Linear4bit.forward casts x to it): the fused op
    must too, so the `fast` preset and the reference agree on outputs and input gradients."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 128, bias=True).requires_grad_(False)
    with torch.no_grad():
        dense.weight.normal_(0, 256 ** -0.5)  # unit-scale outputs for unit-scale inputs
    base = Linear4bit.from_linear(dense, compute_dtype=compute_dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 256, generator=g)  # float32 activations, as train.py feeds a float32 model
    A, B = 0.1 * torch.randn(4, 256, generator=g), 0.1 * torch.randn(128, 4, generator=g)
    upstream = torch.randn(3, 5, 128, generator=g)
    results = {}
    for impl in ("reference", "fused"):
        xi = x.clone().requires_grad_()
        out = IMPLEMENTATIONS["lora_linear"][impl](xi, base, A, B, 2.0, nn.Identity())
        (out * upstream).sum().backward()
        results[impl] = (out.detach(), xi.grad)
    (out_ref, grad_ref), (out_fused, grad_fused) = results["reference"], results["fused"]
    assert out_fused.dtype == torch.float32
    torch.testing.assert_close(out_fused, out_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_fused, grad_ref, rtol=0, atol=1e-6)
    # ... and both differ from a float32 matmul by the compute dtype's rounding (the check is not vacuous)
    float32_out = x @ base.dequantize(torch.float32).T + dense.bias + 2.0 * (x @ A.T) @ B.T
    assert (out_ref - float32_out).abs().max() > 1e-3
