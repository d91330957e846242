"""The chunked loss ops' dtype policy (ref/kernels/cross_entropy.py, "Dtypes"): 16-bit matmuls, float32 reductions.

- 16-bit inputs (bfloat16, float16) against the float64 ground truths of test_kernels.py (written out from the
  equations, differentiated by autograd in float64), within the error the policy itself allows, bounded to first
  order from the ground truth's own probabilities (`policy_bounds`): odd shapes, ignored rows, an upstream gradient of
  -1, a frozen lm_head weight.
- The KL is exactly 0, with exactly zero gradients, at identical current and original hidden states in 16 bits.
- The dtypes the ops really run, from a trace of their aten ops (TorchDispatchMode, which only observes): every
  matmul in the input dtype, the vocabulary-wide reductions in float32, the weight gradient summed in float32.
- float32 inputs: bit for bit the float32 computation the ops did before the policy, written out below op by op.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ref.kernels import IMPLEMENTATIONS
from ref.kernels.cross_entropy import default_chunk_rows
from test_kernels import IGNORE, ce64, grads, kl64, leaf64, log_softmax64, make_inputs

CE = IMPLEMENTATIONS["linear_cross_entropy"]["chunked"]
KL = IMPLEMENTATIONS["linear_kl"]["chunked"]
DTYPES16 = [torch.bfloat16, torch.float16]
# (N, V, D): one token, odd N with ignored rows, a prime V smaller than a chunk, and 150 rows (30 chunks of 5)
SHAPES = [(1, 1009, 24), (37, 1009, 24), (37, 50, 24), (150, 2003, 48)]


# ----------------------------------------------------------------------------------------------------------------
# the error the policy allows, to first order in the unit roundoff u of the input dtype


def policy_bounds(terms_p, g, hidden, weight, eta, dtype, chunks):
    """Elementwise bounds on |16-bit result - exact| of d/d hidden (N, D) and d/d weight (V, D), all float64.

    A rounding to the input dtype turns y into y (1 + d) + e, |d| <= u and |e| <= tiny (half the smallest subnormal:
    float16's small gradients underflow). The policy rounds (1) every logit once, |dz| <= eta = u * max|z|, which
    moves each softmax probability by at most 2 eta p and so d/d logits by 2 eta * terms_p (terms_p: p for the cross
    entropy, p_cur + p_orig for the KL); (2) d/d logits g once, to the input dtype; (3) each gradient matmul's output
    once: d/d hidden's, and d/d weight's product per chunk plus once more at the final cast.
    """
    u, tiny = unit_roundoff(dtype), torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2  # subnormal spacing / 2
    dg = 2 * eta * terms_p + u * g.abs() + tiny  # (N, V)
    h, w = hidden.abs(), weight.abs()  # (N, D), (V, D)
    bound_h = dg @ w + u * (g.abs() @ w) + tiny  # (N, D)
    bound_w = dg.T @ h + 2 * u * (g.abs().T @ h) + (chunks + 1) * tiny  # (V, D)
    return bound_h, bound_w


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def chunk_count(rows: int, chunk: int | None, vocab: int) -> int:
    return -(-rows // (chunk or default_chunk_rows(vocab)))


def assert_within(got, want, bound, what):
    err = (got.double() - want).abs()
    worst = (err / bound.clamp(min=1e-300)).max().item()
    assert torch.all(err <= bound), f"{what}: error up to {worst:.2f}x the policy's bound"


def ce_bounds(hidden, weight, targets, dtype, chunk):
    """(loss bound, d/d hidden bound, d/d weight bound) for the mean cross entropy."""
    h, w = hidden.detach().double(), weight.detach().double()
    z = h @ w.T  # (N, V) exact logits of the 16-bit inputs
    u, keep = unit_roundoff(dtype), targets != IGNORE
    eta = u * z.abs().max().item()
    p = log_softmax64(z).exp() * keep[:, None] / max(int(keep.sum()), 1)  # (N, V) softmax * s, 0 on ignored rows
    g = p.clone()
    g[keep.nonzero().squeeze(1), targets[keep]] -= 1.0 / max(int(keep.sum()), 1)  # (N, V) (softmax - onehot) * s
    # the loss: logsumexp and the target's logit each move by at most eta
    return (2 * eta, *policy_bounds(p, g, h, w, eta, dtype, chunk_count(int(keep.sum()), chunk, len(w))))


def kl_bounds(hidden, ref_hidden, weight, mask, dtype, chunk):
    """(loss bound, d/d hidden bound, d/d weight bound) for the mean KL(p_orig || p_cur)."""
    h, r, w = hidden.detach().double(), ref_hidden.double(), weight.detach().double()
    keep = torch.ones(len(h), dtype=torch.bool) if mask is None else mask
    s = keep[:, None] / max(int(keep.sum()), 1)  # (N, 1)
    log_cur, log_orig = log_softmax64(h @ w.T), log_softmax64(r @ w.T)  # (N, V) each
    u = unit_roundoff(dtype)
    eta = u * torch.cat([h @ w.T, r @ w.T]).abs().max().item()
    p_cur, p_orig = log_cur.exp(), log_orig.exp()
    # sum p (a - b): the log-probabilities a, b move by at most 2 eta, p by 2 eta p
    per_row = 2 * eta * (2 + (p_orig * (log_orig - log_cur).abs()).sum(-1))  # (N,)
    loss_bound = (per_row * s[:, 0]).sum().item()
    chunks = chunk_count(int(keep.sum()), chunk, len(w))
    return (loss_bound, *policy_bounds((p_cur + p_orig) * s, (p_cur - p_orig) * s, h, w, eta, dtype, chunks))


# ----------------------------------------------------------------------------------------------------------------
# 16-bit inputs against float64


@pytest.mark.parametrize("chunk", [None, 5], ids=["default-chunk", "chunk5"])
@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES16, ids=["bf16", "fp16"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight-grad", "weight-frozen"])
@pytest.mark.parametrize("upstream", [1.0, -1.0], ids=["descent", "ascent"])
def test_cross_entropy_16bit_matches_float64(chunk, n, v, d, dtype, weight_grad, upstream):
    hidden, _, weight, targets, _ = make_inputs(n, v, d, dtype, weight_grad)
    loss = CE(hidden, weight, targets, chunk_size=chunk)
    got_h, got_w = grads(loss, [hidden, weight], upstream)

    h64, w64 = leaf64(hidden), leaf64(weight)
    want = ce64(h64, w64, targets)
    want_h, want_w = grads(want, [h64, w64], upstream)
    loss_bound, bound_h, bound_w = ce_bounds(hidden, weight, targets, dtype, chunk)

    assert loss.dtype == torch.float32 and got_h.dtype == dtype
    assert abs(loss.item() - want.item()) <= loss_bound
    assert_within(got_h, want_h, bound_h, "d/d hidden")
    assert torch.all(got_h[targets == IGNORE] == 0)
    if weight_grad:
        assert got_w.dtype == dtype
        assert_within(got_w, want_w, bound_w, "d/d weight")
    else:
        assert got_w is None


@pytest.mark.parametrize("chunk", [None, 5], ids=["default-chunk", "chunk5"])
@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES16, ids=["bf16", "fp16"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight-grad", "weight-frozen"])
@pytest.mark.parametrize("upstream", [1.0, -1.0], ids=["descent", "ascent"])
@pytest.mark.parametrize("use_mask", [True, False], ids=["mask", "no-mask"])
def test_kl_16bit_matches_float64(chunk, n, v, d, dtype, weight_grad, upstream, use_mask):
    hidden, ref_hidden, weight, _, mask = make_inputs(n, v, d, dtype, weight_grad)
    mask = mask if use_mask else None
    loss = KL(hidden, ref_hidden, weight, mask, chunk_size=chunk)
    got_h, got_w = grads(loss, [hidden, weight], upstream)

    h64, w64 = leaf64(hidden), leaf64(weight)
    want = kl64(h64, ref_hidden, w64, mask)
    want_h, want_w = grads(want, [h64, w64], upstream)
    loss_bound, bound_h, bound_w = kl_bounds(hidden, ref_hidden, weight, mask, dtype, chunk)

    assert loss.dtype == torch.float32 and got_h.dtype == dtype
    assert abs(loss.item() - want.item()) <= loss_bound
    assert_within(got_h, want_h, bound_h, "d/d hidden")
    if weight_grad:
        assert got_w.dtype == dtype
        assert_within(got_w, want_w, bound_w, "d/d weight")
    else:
        assert got_w is None


@pytest.mark.parametrize("chunk", [None, 5], ids=["default-chunk", "chunk5"])
@pytest.mark.parametrize("dtype", DTYPES16, ids=["bf16", "fp16"])
def test_kl_16bit_is_exactly_zero_at_step_zero(chunk, dtype):
    """Training's step 0 (LoRA's B = 0): the current hidden states equal the original ones, at LLaVA's vocabulary."""
    hidden, _, weight, _, mask = make_inputs(37, 32064, 64, dtype)
    ref_hidden = hidden.detach().clone()
    loss = KL(hidden, ref_hidden, weight, mask, chunk_size=chunk)
    got_h, got_w = grads(loss, [hidden, weight], 1.0)
    assert loss.item() == 0.0
    assert torch.all(got_h == 0) and torch.all(got_w == 0)


# ----------------------------------------------------------------------------------------------------------------
# the dtypes the ops run


class OpTrace(TorchDispatchMode):
    """Every aten op run inside the `with`: (op name, its tensor operands' dtypes, their shapes). Only observes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, tuple(t.dtype for t in tensors),
                           tuple(tuple(t.shape) for t in tensors)))
        return func(*args, **(kwargs or {}))

    def named(self, *names):
        return [call for call in self.calls if call[0] in names]


def run_traced(op: str, dtype: torch.dtype) -> tuple[OpTrace, int]:
    """Forward and backward of a chunked op on 37 rows (33 counted) in chunks of 5; returns the trace and V."""
    hidden, ref_hidden, weight, targets, mask = make_inputs(37, 1009, 24, dtype)
    with OpTrace() as trace:
        loss = CE(hidden, weight, targets, chunk_size=5) if op == "ce" else KL(hidden, ref_hidden, weight, mask,
                                                                               chunk_size=5)
        loss.backward()
    return trace, weight.shape[0]


@pytest.mark.parametrize("dtype", DTYPES16, ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", ["ce", "kl"])
def test_16bit_matmuls_run_in_the_input_dtype_and_the_reductions_in_float32(op, dtype):
    trace, v = run_traced(op, dtype)
    chunks, logits_per_chunk = 7, 1 if op == "ce" else 2  # 33 rows in chunks of 5; the KL has two models' logits
    products = trace.named("mm", "addmm", "addmm_")
    assert len(products) == chunks * (logits_per_chunk + 2)  # the logits, d/d hidden, d/d weight
    assert all(operands == (dtype, dtype) for _, operands, _ in products)
    logits = [shapes for _, _, shapes in products if shapes[1][1] == v]  # (C, D) @ (D, V)
    assert len(logits) == chunks * logits_per_chunk
    # the vocabulary-wide reductions: the max of logsumexp (cross entropy), log-softmax (KL, written into a block),
    # the exponentials, the loss sums
    reductions = trace.named("amax", "log_softmax", "exp", "exp_", "sum")
    assert len(trace.named("amax", "log_softmax")) == chunks * logits_per_chunk
    assert all(operands == (torch.float32,) for _, operands, _ in reductions)
    # each chunk's 16-bit (V, D) product is added to a float32 (V, D) sum
    sums = [(operands, shapes) for _, operands, shapes in trace.named("add_") if shapes[0] == (v, 24)]
    assert sums == [((torch.float32, dtype), ((v, 24), (v, 24)))] * chunks


@pytest.mark.parametrize("op", ["ce", "kl"])
def test_float32_matmuls_stay_float32_and_accumulate_in_place(op):
    trace, v = run_traced(op, torch.float32)
    products = trace.named("mm", "addmm", "addmm_")
    assert all(set(operands) == {torch.float32} for _, operands, _ in products)
    assert len(trace.named("addmm_")) == 7  # d/d weight += g^T x, in place, once per chunk


# ----------------------------------------------------------------------------------------------------------------
# float32: bit for bit the float32 computation of before the 16-bit policy


def ce_float32_ops(hidden, weight, targets, chunk, reduction, upstream):
    """The chunked cross entropy's float32 ops in their order: loss, d/d hidden, d/d weight (None if frozen)."""
    rows = (targets != IGNORE).nonzero().squeeze(1)
    x, t, w = hidden.detach()[rows].float(), targets[rows], weight.detach().float()  # (M, D), (M,), (V, D)
    scale = 1.0 / max(len(rows), 1) if reduction == "mean" else 1.0
    total = torch.zeros(())
    grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(w)
    for start in range(0, len(x), chunk):
        xc, tc = x[start:start + chunk], t[start:start + chunk]
        logits = xc @ w.T  # (C, V)
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
        g = (logits - lse[:, None]).exp()
        g[torch.arange(len(tc)), tc] -= 1.0
        g = g * scale
        grad_x[start:start + chunk] = g @ w
        grad_w.addmm_(g.T, xc)
    return finish(total * scale, hidden, weight, rows, grad_x, grad_w, upstream)


def kl_float32_ops(hidden, ref_hidden, weight, mask, chunk, reduction, upstream):
    """The chunked KL's float32 ops in their order: loss, d/d hidden, d/d weight (None if frozen)."""
    rows = torch.arange(len(hidden)) if mask is None else mask.nonzero().squeeze(1)
    x, r, w = hidden.detach()[rows].float(), ref_hidden[rows].float(), weight.detach().float()  # (M, D) x2, (V, D)
    scale = 1.0 / max(len(rows), 1) if reduction == "mean" else 1.0
    total = torch.zeros(())
    grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(w)
    for start in range(0, len(x), chunk):
        xc, rc = x[start:start + chunk], r[start:start + chunk]
        ref_logprobs = torch.log_softmax(rc @ w.T, dim=-1)  # (C, V)
        cur_logprobs = torch.log_softmax(xc @ w.T, dim=-1)  # (C, V)
        ref_probs = ref_logprobs.exp()
        total += ((ref_logprobs - cur_logprobs) * ref_probs).sum()
        g = (cur_logprobs.exp() - ref_probs) * scale
        grad_x[start:start + chunk] = g @ w
        grad_w.addmm_(g.T, xc)
    return finish(total * scale, hidden, weight, rows, grad_x, grad_w, upstream)


def finish(loss, hidden, weight, rows, grad_x, grad_w, upstream):
    """The counted rows' gradients scattered back to all rows, cast to the inputs' dtypes, times the upstream."""
    full = torch.zeros(hidden.shape, dtype=hidden.dtype).index_copy_(0, rows, grad_x.to(hidden.dtype))  # (N, D)
    up = torch.tensor(upstream)
    grad_w = grad_w.to(weight.dtype) * up.to(weight.dtype) if weight.requires_grad else None
    return loss, full * up.to(hidden.dtype), grad_w


FLOAT32_CASES = [  # (N, V, D, hidden dtype, chunk, reduction, weight trained, upstream)
    (37, 1009, 24, torch.float32, 5, "mean", True, 1.0),
    (37, 1009, 24, torch.float32, None, "sum", True, -1.0),
    (300, 5003, 64, torch.float32, 64, "mean", False, -1.0),
    (37, 50, 24, torch.bfloat16, 5, "mean", True, 1.0),  # a float32 weight over bfloat16 hidden states: float32
]


@pytest.mark.parametrize("n,v,d,hidden_dtype,chunk,reduction,weight_grad,upstream", FLOAT32_CASES)
def test_float32_is_bit_for_bit_the_float32_computation(n, v, d, hidden_dtype, chunk, reduction, weight_grad,
                                                        upstream):
    hidden, ref_hidden, weight, targets, mask = make_inputs(n, v, d, torch.float32, weight_grad)
    hidden = hidden.detach().to(hidden_dtype).requires_grad_()
    ref_hidden = ref_hidden.to(hidden_dtype)
    rows = chunk or default_chunk_rows(v)
    cases = [(lambda: CE(hidden, weight, targets, reduction=reduction, chunk_size=chunk),
              ce_float32_ops(hidden, weight, targets, rows, reduction, upstream)),
             (lambda: KL(hidden, ref_hidden, weight, mask, reduction=reduction, chunk_size=chunk),
              kl_float32_ops(hidden, ref_hidden, weight, mask, rows, reduction, upstream))]
    for run, (want, want_h, want_w) in cases:
        hidden.grad = weight.grad = None
        loss = run()
        got_h, got_w = grads(loss, [hidden, weight], upstream)
        assert torch.equal(loss, want)
        assert got_h.dtype == want_h.dtype and torch.equal(got_h, want_h)
        assert (got_w is None) == (want_w is None)
        assert got_w is None or torch.equal(got_w, want_w)
