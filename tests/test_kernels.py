"""Kernel ops: every implementation against the reference and against independent float64 computations.

The float64 ground truths below are written out from the equations (log-softmax as z - max - log(sum(exp(z - max))),
explicit loops over heads and rotary pairs) and differentiated by autograd in float64; none of them calls the code
under test. Loss ops are checked on outputs and on every input gradient, in float32 (and the reference in bfloat16),
at odd shapes, with an upstream gradient of -1 (gradient ascent), with a frozen lm_head weight, with ignored rows,
and KL = 0 exactly at identical inputs. The chunked loss ops' 16-bit path, whose logits come from a 16-bit matmul, is
held to the error bounds of its dtype policy in tests/test_loss_kernels_16bit.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from ref.kernels import IMPLEMENTATIONS, PRESETS, Kernels, register, resolve
from ref.kernels.attention import attention, attention_sdpa
from ref.kernels.cross_entropy import LossInputError, default_chunk_rows
from ref.kernels.rms_norm import rms_norm
from ref.kernels.rope import rope
from ref.kernels.swiglu import swiglu, swiglu_fused

IGNORE = -100


# ----------------------------------------------------------------------------------------------------------------
# float64 ground truths, written out from the equations


def log_softmax64(z: torch.Tensor) -> torch.Tensor:
    """log softmax over the last axis: z - max - log(sum(exp(z - max)))."""
    m = z.max(dim=-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))


def ce64(hidden, weight, targets, reduction="mean"):
    """Mean (or sum) over non-ignored rows of -log softmax(hidden @ weight^T)[target], all in float64."""
    z = hidden.double() @ weight.double().T  # (N, V)
    rows = (targets != IGNORE).nonzero().squeeze(1)  # (M,)
    terms = -log_softmax64(z)[rows, targets[rows]]  # (M,) each kept row's -log p(target); none: an empty sum, 0
    total = terms.sum()
    return total / max(len(terms), 1) if reduction == "mean" else total


def kl64(hidden, ref_hidden, weight, mask=None, reduction="mean"):
    """Sum over masked rows of sum_v p_orig (log p_orig - log p_cur), p_orig a constant, divided by the row count."""
    logq = log_softmax64(hidden.double() @ weight.double().T)  # (N, V) current
    logp = log_softmax64(ref_hidden.double() @ weight.double().detach().T).detach()  # (N, V) original, no gradient
    per_token = (logp.exp() * (logp - logq)).sum(-1)  # (N,)
    keep = torch.ones(len(per_token), dtype=torch.bool) if mask is None else mask
    total = per_token[keep].sum()
    return total / max(int(keep.sum()), 1) if reduction == "mean" else total


def leaf64(t: torch.Tensor) -> torch.Tensor:
    """A float64 leaf with the same values (bf16 values are exact in float64), requiring grad like `t`."""
    return t.detach().double().requires_grad_(t.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# loss-op fixtures


def loss_impls(op: str) -> list:
    """(id, fn): every registered implementation; chunked ones also with a chunk that does not divide N."""
    out = []
    for name, fn in sorted(IMPLEMENTATIONS[op].items()):
        out.append((name, fn))
        if name != "reference":
            out.append((f"{name}-chunk5", functools.partial(fn, chunk_size=5)))
    return out


CE_IMPLS = loss_impls("linear_cross_entropy")
KL_IMPLS = loss_impls("linear_kl")
SHAPES = [(1, 1009, 24), (37, 1009, 24), (37, 50, 24)]  # (N, V, D): one token, odd N, prime V
DTYPES = [torch.float32, torch.bfloat16]


def float32_logit_cases(impls: list) -> list:
    """(id, fn, dtype): every implementation in float32, and the reference in bfloat16 too, whose logits are float32
    whatever the input dtype. The chunked ops multiply 16-bit inputs in 16 bits: tests/test_loss_kernels_16bit.py."""
    cases = [pytest.param(impl_id, fn, torch.float32, id=f"fp32-{impl_id}") for impl_id, fn in impls]
    return cases + [pytest.param(impl_id, fn, torch.bfloat16, id=f"bf16-{impl_id}") for impl_id, fn in impls
                    if impl_id == "reference"]


def make_inputs(n, v, d, dtype, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.5 * torch.randn(n, d, generator=g)).to(dtype)
    weight = (0.3 * torch.randn(v, d, generator=g)).to(dtype).requires_grad_(weight_grad)
    targets = torch.randint(0, v, (n,), generator=g)
    if n > 12:  # a few ignored rows, in the middle and at the end
        targets[[3, 10, 11, n - 1]] = IGNORE
    mask = targets != IGNORE
    return hidden, ref_hidden, weight, targets, mask


def tolerances(dtype):
    """(loss rtol, loss atol, grad rtol, grad atol factor). With float32 logits (the reference upcasts bf16 inputs)
    the loss is tight even for bf16 inputs; gradients come back in the input dtype."""
    if dtype == torch.float32:
        return 1e-5, 1e-6, 1e-4, 1e-5
    return 1e-5, 1e-6, 2e-2, 1e-2


def assert_grad_close(actual, expected, dtype):
    _, _, rtol, atol_factor = tolerances(dtype)
    assert actual is not None and actual.dtype == dtype
    atol = atol_factor * expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def grads(loss, tensors, upstream):
    loss.backward(gradient=torch.tensor(upstream, dtype=loss.dtype))
    return [t.grad for t in tensors]


# ----------------------------------------------------------------------------------------------------------------
# linear_cross_entropy


@pytest.mark.parametrize("impl_id,fn,dtype", float32_logit_cases(CE_IMPLS))
@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight-grad", "weight-frozen"])
@pytest.mark.parametrize("upstream", [1.0, -1.0], ids=["descent", "ascent"])
def test_linear_cross_entropy_matches_float64_and_reference(impl_id, fn, n, v, d, dtype, weight_grad, upstream):
    hidden, _, weight, targets, _ = make_inputs(n, v, d, dtype, weight_grad)
    loss_rtol, loss_atol, _, _ = tolerances(dtype)

    loss = fn(hidden, weight, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    got_h, got_w = grads(loss, [hidden, weight], upstream)

    h64, w64 = leaf64(hidden), leaf64(weight)
    want = ce64(h64, w64, targets)
    want_h, want_w = grads(want, [h64, w64], upstream)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(got_h, want_h, dtype)
    if weight_grad:
        assert_grad_close(got_w, want_w, dtype)
    else:
        assert got_w is None

    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_(weight_grad)
    ref_loss = IMPLEMENTATIONS["linear_cross_entropy"]["reference"](h_ref, w_ref, targets)
    ref_h, ref_w = grads(ref_loss, [h_ref, w_ref], upstream)
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(got_h, ref_h.double(), dtype)
    if weight_grad:
        assert_grad_close(got_w, ref_w.double(), dtype)


@pytest.mark.parametrize("impl_id,fn", CE_IMPLS, ids=[i for i, _ in CE_IMPLS])
def test_linear_cross_entropy_sum_reduction(impl_id, fn):
    hidden, _, weight, targets, _ = make_inputs(37, 1009, 24, torch.float32)
    loss = fn(hidden, weight, targets, reduction="sum")
    got_h, got_w = grads(loss, [hidden, weight], 1.0)
    h64, w64 = leaf64(hidden), leaf64(weight)
    want = ce64(h64, w64, targets, reduction="sum")
    want_h, want_w = grads(want, [h64, w64], 1.0)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert_grad_close(got_h, want_h, torch.float32)
    assert_grad_close(got_w, want_w, torch.float32)


@pytest.mark.parametrize("impl_id,fn", CE_IMPLS, ids=[i for i, _ in CE_IMPLS])
def test_linear_cross_entropy_ignored_rows_contribute_nothing(impl_id, fn):
    hidden, _, weight, targets, mask = make_inputs(37, 1009, 24, torch.float32)
    loss = fn(hidden, weight, targets)
    got_h, got_w = grads(loss, [hidden, weight], 1.0)

    moved = hidden.detach().clone()
    moved[~mask] = 100.0 * torch.randn(int((~mask).sum()), moved.shape[1])  # wild values at ignored rows only
    moved.requires_grad_()
    weight2 = weight.detach().clone().requires_grad_()
    loss2 = fn(moved, weight2, targets)
    moved_h, moved_w = grads(loss2, [moved, weight2], 1.0)

    assert torch.equal(loss, loss2)
    assert torch.equal(got_h, moved_h)
    assert torch.equal(got_w, moved_w)
    assert torch.all(got_h[~mask] == 0)


@pytest.mark.parametrize("impl_id,fn", CE_IMPLS, ids=[i for i, _ in CE_IMPLS])
def test_linear_cross_entropy_all_ignored_is_zero_not_nan(impl_id, fn):
    hidden, _, weight, targets, _ = make_inputs(7, 50, 24, torch.float32)
    loss = fn(hidden, weight, torch.full_like(targets, IGNORE))
    got_h, got_w = grads(loss, [hidden, weight], 1.0)
    assert loss.item() == 0.0
    assert torch.all(got_h == 0) and torch.all(got_w == 0)


@pytest.mark.parametrize("impl_id,fn", CE_IMPLS, ids=[i for i, _ in CE_IMPLS])
def test_linear_cross_entropy_no_grad_gives_same_loss(impl_id, fn):
    hidden, _, weight, targets, _ = make_inputs(37, 1009, 24, torch.float32)
    with torch.no_grad():
        loss = fn(hidden, weight, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), ce64(hidden, weight, targets).detach(), rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_frozen_weight_computes_no_weight_gradient():
    hidden, _, weight, targets, _ = make_inputs(37, 1009, 24, torch.float32, weight_grad=False)
    loss = IMPLEMENTATIONS["linear_cross_entropy"]["chunked"](hidden, weight, targets)
    grad_hidden, grad_weight = loss.grad_fn.saved_tensors  # what forward stored for backward
    assert grad_hidden.shape == hidden.shape and grad_weight is None


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl_id,fn", CE_IMPLS, ids=[i for i, _ in CE_IMPLS])
def test_linear_cross_entropy_told_all_targets_count_computes_the_same_without_reading_them(impl_id, fn, dtype):
    """all_valid=True (the caller checked the ids on the host, none ignored): loss and both gradients bit for bit
    those of the checking mode, and no op that would make the host wait for an accelerator (the checking mode has
    some: it reads the ids to check them and, chunked, to find the rows that count)."""
    from benchmarks.host_syncs import HostSyncCounter

    hidden, _, weight, _, _ = make_inputs(37, 1009, 24, dtype)
    targets = torch.randint(0, 1009, (37,), generator=torch.Generator().manual_seed(1))  # none ignored
    results = []
    for all_valid in (False, True):
        with HostSyncCounter() as counter:
            loss = fn(hidden, weight, targets, all_valid=all_valid)
            grads = torch.autograd.grad(loss, (hidden, weight))
        results.append((loss, grads, counter.count))
    (want, want_grads, checking_syncs), (got, got_grads, syncs) = results
    assert torch.equal(got, want) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    assert syncs == 0 and checking_syncs > 0


@pytest.mark.parametrize("impl_id,fn", CE_IMPLS, ids=[i for i, _ in CE_IMPLS])
def test_linear_cross_entropy_rejects_bad_inputs(impl_id, fn):
    hidden, _, weight, targets, _ = make_inputs(5, 50, 24, torch.float32)
    with pytest.raises(LossInputError, match="target id 50 outside the vocabulary"):
        fn(hidden, weight, torch.tensor([1, 2, 50, 3, 4]))
    with pytest.raises(LossInputError, match="target id -1"):
        fn(hidden, weight, torch.tensor([1, 2, -1, 3, 4]))
    with pytest.raises(LossInputError, match="targets must be"):
        fn(hidden, weight, targets[:4])
    with pytest.raises(LossInputError, match=r"weight must be \(V, D=24\)"):
        fn(hidden, weight[:, :20], targets)
    with pytest.raises(LossInputError, match="reduction"):
        fn(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError):  # LossInputError is a ValueError
        fn(hidden[None], weight, targets)


# ----------------------------------------------------------------------------------------------------------------
# linear_kl


@pytest.mark.parametrize("impl_id,fn,dtype", float32_logit_cases(KL_IMPLS))
@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight-grad", "weight-frozen"])
@pytest.mark.parametrize("upstream", [1.0, -1.0], ids=["descent", "ascent"])
@pytest.mark.parametrize("use_mask", [True, False], ids=["mask", "no-mask"])
def test_linear_kl_matches_float64_and_reference(impl_id, fn, n, v, d, dtype, weight_grad, upstream, use_mask):
    hidden, ref_hidden, weight, _, mask = make_inputs(n, v, d, dtype, weight_grad)
    mask = mask if use_mask else None
    loss_rtol, loss_atol, _, _ = tolerances(dtype)

    loss = fn(hidden, ref_hidden, weight, mask)
    assert loss.dtype == torch.float32 and loss.shape == ()
    got_h, got_w = grads(loss, [hidden, weight], upstream)

    h64, w64 = leaf64(hidden), leaf64(weight)
    want = kl64(h64, ref_hidden, w64, mask)
    want_h, want_w = grads(want, [h64, w64], upstream)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(got_h, want_h, dtype)
    if weight_grad:
        assert_grad_close(got_w, want_w, dtype)
    else:
        assert got_w is None
    assert ref_hidden.grad is None

    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_(weight_grad)
    ref_loss = IMPLEMENTATIONS["linear_kl"]["reference"](h_ref, ref_hidden, w_ref, mask)
    ref_h, ref_w = grads(ref_loss, [h_ref, w_ref], upstream)
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(got_h, ref_h.double(), dtype)
    if weight_grad:
        assert_grad_close(got_w, ref_w.double(), dtype)


@pytest.mark.parametrize("impl_id,fn", KL_IMPLS, ids=[i for i, _ in KL_IMPLS])
def test_linear_kl_sum_reduction(impl_id, fn):
    hidden, ref_hidden, weight, _, mask = make_inputs(37, 1009, 24, torch.float32)
    loss = fn(hidden, ref_hidden, weight, mask, reduction="sum")
    got_h, got_w = grads(loss, [hidden, weight], 1.0)
    h64, w64 = leaf64(hidden), leaf64(weight)
    want = kl64(h64, ref_hidden, w64, mask, reduction="sum")
    want_h, want_w = grads(want, [h64, w64], 1.0)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert_grad_close(got_h, want_h, torch.float32)
    assert_grad_close(got_w, want_w, torch.float32)


@pytest.mark.parametrize("impl_id,fn", KL_IMPLS, ids=[i for i, _ in KL_IMPLS])
@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_linear_kl_is_exactly_zero_at_identical_inputs(impl_id, fn, n, v, d, dtype):
    hidden, _, weight, _, mask = make_inputs(n, v, d, dtype)
    ref_hidden = hidden.detach().clone()  # the original model's hidden states equal the current ones (step 0)
    loss = fn(hidden, ref_hidden, weight, mask)
    got_h, got_w = grads(loss, [hidden, weight], 1.0)
    assert loss.item() == 0.0
    if impl_id == "reference":
        # autograd's log_softmax backward is g - softmax * sum(g) with g = -p_orig / M: zero up to sum(p) != 1
        # rounding, so only tiny here; the chunked op forms p_cur - p_orig directly, which is exactly 0.
        assert got_h.abs().max() < 1e-6 and got_w.abs().max() < 1e-6  # real gradients here are ~1e-2
    else:
        assert torch.all(got_h == 0) and torch.all(got_w == 0)


@pytest.mark.parametrize("impl_id,fn", KL_IMPLS, ids=[i for i, _ in KL_IMPLS])
def test_linear_kl_masked_rows_contribute_nothing(impl_id, fn):
    hidden, ref_hidden, weight, _, mask = make_inputs(37, 1009, 24, torch.float32)
    loss = fn(hidden, ref_hidden, weight, mask)
    got_h, got_w = grads(loss, [hidden, weight], 1.0)

    moved, moved_ref = hidden.detach().clone(), ref_hidden.clone()
    moved[~mask] = 100.0 * torch.randn(int((~mask).sum()), moved.shape[1])
    moved_ref[~mask] = -100.0 * torch.randn(int((~mask).sum()), moved.shape[1])
    moved.requires_grad_()
    weight2 = weight.detach().clone().requires_grad_()
    loss2 = fn(moved, moved_ref, weight2, mask)
    moved_h, moved_w = grads(loss2, [moved, weight2], 1.0)

    assert torch.equal(loss, loss2)
    assert torch.equal(got_h, moved_h)
    assert torch.equal(got_w, moved_w)
    assert torch.all(got_h[~mask] == 0)


@pytest.mark.parametrize("impl_id,fn", KL_IMPLS, ids=[i for i, _ in KL_IMPLS])
def test_linear_kl_empty_mask_is_zero_not_nan(impl_id, fn):
    hidden, ref_hidden, weight, _, _ = make_inputs(7, 50, 24, torch.float32)
    loss = fn(hidden, ref_hidden, weight, torch.zeros(7, dtype=torch.bool))
    got_h, got_w = grads(loss, [hidden, weight], 1.0)
    assert loss.item() == 0.0
    assert torch.all(got_h == 0) and torch.all(got_w == 0)


def test_chunked_kl_frozen_weight_computes_no_weight_gradient():
    hidden, ref_hidden, weight, _, mask = make_inputs(37, 1009, 24, torch.float32, weight_grad=False)
    loss = IMPLEMENTATIONS["linear_kl"]["chunked"](hidden, ref_hidden, weight, mask)
    grad_hidden, grad_weight = loss.grad_fn.saved_tensors
    assert grad_hidden.shape == hidden.shape and grad_weight is None


@pytest.mark.parametrize("impl_id,fn", KL_IMPLS, ids=[i for i, _ in KL_IMPLS])
def test_linear_kl_rejects_bad_inputs(impl_id, fn):
    hidden, ref_hidden, weight, _, mask = make_inputs(5, 50, 24, torch.float32)
    with pytest.raises(LossInputError, match="ref_hidden must have hidden's shape"):
        fn(hidden, ref_hidden[:4], weight, None)
    with pytest.raises(LossInputError, match="mask must be a bool tensor"):
        fn(hidden, ref_hidden, weight, mask.long())
    with pytest.raises(LossInputError, match="mask must be a bool tensor"):
        fn(hidden, ref_hidden, weight, mask[:3])
    with pytest.raises(LossInputError, match=r"weight must be \(V, D=24\)"):
        fn(hidden, ref_hidden, weight[:, :3], None)


def test_default_chunk_rows():
    assert default_chunk_rows(32064) == 2**23 // 32064 == 261
    assert default_chunk_rows(2**30) == 1  # never zero rows


# ----------------------------------------------------------------------------------------------------------------
# model ops against hand computations


def test_rms_norm_matches_float64():
    g = torch.Generator().manual_seed(1)
    x, w, eps = torch.randn(2, 3, 16, generator=g), torch.randn(16, generator=g), 1e-5
    want = torch.empty(2, 3, 16, dtype=torch.float64)
    for i in range(2):
        for t in range(3):
            row = x[i, t].double()
            want[i, t] = w.double() * row / math.sqrt(float((row * row).mean()) + eps)
    torch.testing.assert_close(rms_norm(x, w, eps).double(), want, rtol=1e-5, atol=1e-6)
    # bf16: the statistic in float32, then cast back before the weight multiply (LLaMA's order)
    xb, wb = x.bfloat16(), w.bfloat16()
    normed = (xb.double() / torch.sqrt(xb.double().pow(2).mean(-1, keepdim=True) + eps)).bfloat16()
    torch.testing.assert_close(rms_norm(xb, wb, eps), wb * normed, rtol=0, atol=0)


def test_rope_matches_float64_pairs():
    g = torch.Generator().manual_seed(2)
    b, h, hkv, t, d, base = 1, 4, 2, 5, 8, 10000.0
    q, k = torch.randn(b, h, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    positions = torch.tensor([[0, 1, 2, 7, 30]])  # not 0..T-1: left padding shifts positions
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angles = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)  # (B, T, d)
    got_q, got_k = rope(q, k, angles.cos().float(), angles.sin().float())

    def rotate(x):  # pair (i, i + d/2) rotated by angle p * inv_freq[i]
        out = torch.empty_like(x, dtype=torch.float64)
        for bi, hi, ti, i in ((bi, hi, ti, i) for bi in range(x.shape[0]) for hi in range(x.shape[1])
                              for ti in range(t) for i in range(d // 2)):
            a = float(positions[bi, ti]) * float(inv_freq[i])
            x1, x2 = float(x[bi, hi, ti, i]), float(x[bi, hi, ti, i + d // 2])
            out[bi, hi, ti, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[bi, hi, ti, i + d // 2] = x2 * math.cos(a) + x1 * math.sin(a)
        return out

    torch.testing.assert_close(got_q.double(), rotate(q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k.double(), rotate(k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [swiglu, swiglu_fused], ids=["reference", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_output_and_gradients_match_float64(fn, dtype):
    """silu(g) * u and its gradients, against float64 autograd of the formula written out (silu(g) = g sigmoid(g))."""
    g = torch.Generator().manual_seed(3)
    gate, up, upstream = (torch.randn(3, 5, 11, generator=g) * 3 for _ in range(3))
    gate64, up64 = gate.double().requires_grad_(), up.double().requires_grad_()
    want = gate64 / (1.0 + torch.exp(-gate64)) * up64
    want_grads = torch.autograd.grad(want, (gate64, up64), upstream.double())
    gate_in, up_in = gate.to(dtype).requires_grad_(), up.to(dtype).requires_grad_()
    got = fn(gate_in, up_in)
    got_grads = torch.autograd.grad(got, (gate_in, up_in), upstream.to(dtype))
    # bfloat16: the inputs themselves are rounded; compare against float64 at bf16's resolution of the values (~1e-2)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-2, atol=1e-1)
    assert got.dtype == dtype and all(grad.dtype == dtype for grad in got_grads)
    torch.testing.assert_close(got.double(), want.detach(), **tolerance)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad.double(), want_grad, **tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_fused_matches_reference_outputs_and_gradients(dtype):
    g = torch.Generator().manual_seed(4)
    gate, up, upstream = (torch.randn(2, 7, 13, generator=g).to(dtype) for _ in range(3))
    results = []
    for fn in (swiglu, swiglu_fused):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = fn(a, b)
        results.append((out, *torch.autograd.grad(out, (a, b), upstream)))
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **tolerance)


def causal_mask(t: int) -> torch.Tensor:
    return torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), diagonal=1)[None, None]  # (1, 1, T, T)


def attention64(q, k, v, mask, scale):
    """Per query head h, key/value head h // (H / Hkv); softmax written out in float64."""
    b, h, tq, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            scores = q[bi, hi].double() @ k[bi, hi // group].double().T * scale  # (Tq, Tk)
            if mask is not None:
                scores = scores + mask[0, 0].double()
            weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
            out[bi, hi] = (weights / weights.sum(-1, keepdim=True)) @ v[bi, hi // group].double()
    return out


def attention_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, t, d = 2, 4, 2, 6, 8
    q = torch.randn(b, h, t, d, generator=g).requires_grad_()
    k = torch.randn(b, hkv, t, d, generator=g).requires_grad_()
    v = torch.randn(b, hkv, t, d, generator=g).requires_grad_()
    return q, k, v, 1.0 / math.sqrt(d)


@pytest.mark.parametrize("masked", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("fn", [attention, attention_sdpa], ids=["reference", "sdpa"])
def test_attention_matches_float64(fn, masked):
    q, k, v, scale = attention_inputs()
    mask = causal_mask(q.shape[2]) if masked else None
    torch.testing.assert_close(fn(q, k, v, mask, scale).double(), attention64(q, k, v, mask, scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [True, False], ids=["causal", "full"])
def test_attention_sdpa_matches_reference_outputs_and_grads(masked):
    q, k, v, scale = attention_inputs(seed=5)
    mask = causal_mask(q.shape[2]) if masked else None
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    out_ref = attention(q, k, v, mask, scale)
    ref_grads = torch.autograd.grad(out_ref, (q, k, v), upstream)
    out_sdpa = attention_sdpa(q, k, v, mask, scale)
    sdpa_grads = torch.autograd.grad(out_sdpa, (q, k, v), upstream)
    torch.testing.assert_close(out_sdpa, out_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(sdpa_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# the registry


def test_resolve_default_is_reference_everywhere():
    kernels = resolve()
    assert set(kernels.choice) == set(IMPLEMENTATIONS)
    assert {"rms_norm", "rope", "swiglu", "attention", "linear_cross_entropy", "linear_kl"} <= set(kernels.choice)
    assert all(name == "reference" for name in kernels.choice.values())
    assert kernels.rms_norm is rms_norm and kernels.attention is attention


def test_resolve_chunked_preset_and_overrides():
    kernels = resolve("chunked")
    assert kernels.linear_cross_entropy is IMPLEMENTATIONS["linear_cross_entropy"]["chunked"]
    assert kernels.linear_kl is IMPLEMENTATIONS["linear_kl"]["chunked"]
    assert kernels.choice["attention"] == "reference"  # ops the preset leaves out stay reference
    kernels = resolve("chunked", {"attention": "sdpa", "linear_kl": "reference"})
    assert kernels.attention is attention_sdpa
    assert kernels.linear_kl is IMPLEMENTATIONS["linear_kl"]["reference"]
    assert kernels.linear_cross_entropy is IMPLEMENTATIONS["linear_cross_entropy"]["chunked"]
    assert "linear_kl             reference" in kernels.table()
    assert "chunked" in PRESETS


def test_resolve_errors_name_what_is_known():
    with pytest.raises(ValueError, match=r"unknown kernel preset 'turbo'.*'chunked'"):
        resolve("turbo")
    with pytest.raises(ValueError, match=r"unknown kernel op 'layer_norm'.*'rms_norm'"):
        resolve(overrides={"layer_norm": "reference"})
    with pytest.raises(ValueError, match=r"unknown implementation 'triton' of attention.*'sdpa'"):
        resolve(overrides={"attention": "triton"})


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="rms_norm/reference registered twice"):
        register("rms_norm", "reference")(lambda x, w, eps: x)
    assert IMPLEMENTATIONS["rms_norm"]["reference"] is rms_norm
    assert isinstance(resolve(), Kernels)
