"""Linear + cross entropy over response tokens: the NLL terms of the unlearning loss, lm_head included.

    logits = hidden @ weight^T                              (N, V), reduced in float32 (dtypes: see below)
    loss   = sum_{i: t_i != ignore} (logsumexp(logits_i) - logits_i[t_i])  /  n_valid     ("mean")
             sum_{i: t_i != ignore} (...)                                                     ("sum")

hidden (N, D) holds the final-normed hidden states ALREADY GATHERED at response positions (the caller gathers before
the lm_head, so prompt, image and padding tokens never produce vocabulary-sized logits); rows whose target is
`ignore_index` are still allowed and contribute nothing. weight (V, D) is the lm_head weight. `all_valid=True` is the
caller's word that no target is `ignore_index` and every one is a vocabulary id, checked on the host: the op then reads
no value of `targets` (reading them to check, or to find the rows that count, makes the host wait for an accelerator;
ref.losses gathers the response tokens and checks them before the batch reaches the device).

Averaging: "mean" is per token, over all non-ignored tokens of the batch (every response token weighs the same, long
responses weigh more than short ones). With no valid token at all the mean is 0 (sum over an empty set divided by
max(n_valid, 1)), with zero gradients, rather than torch's 0/0 = nan: a batch without response tokens must not poison
the optimizer state.

Two implementations:
- `reference`: builds the full (N, V) float32 logits and lets autograd differentiate. The one to audit.
- `chunked`: a custom autograd function that walks over tokens in chunks of `chunk_size` rows and never holds more
  than a few (chunk, V) blocks, allocated once per call and reused by every chunk (`ChunkBlocks`). The gradient is
  computed in the forward pass (as Liger-Kernel's fused linear cross entropy does), because for a scalar loss the only
  unknown in backward is the upstream scalar g:
      d loss / d logits_i = (softmax(logits_i) - onehot(t_i)) * s          s = 1/n_valid ("mean") or 1 ("sum")
      d loss / d hidden_i = (d loss / d logits_i) @ weight                 (D,)
      d loss / d weight   = sum_i (d loss / d logits_i)^T hidden_i         (V, D)
  and backward only multiplies the stored gradients by g. The alternative, keeping only the per-row logsumexp and
  recomputing each chunk's logits in backward, saves the stored (N, D) hidden gradient (small) but costs a fourth
  (N x D x V) matmul, i.e. ~1.33x the compute of the reference; storing keeps the matmul count at three, the same as
  the reference's forward + backward. The gradients are only computed when autograd will need them (grad mode on and
  the input requires grad), so evaluation under no_grad pays for the loss alone.

Dtypes. `reference` upcasts hidden and weight to float32 before its matmul and stays in float32 throughout, whatever
the inputs' dtype. `chunked` (like the chunked KL, through the shared `chunked_linear_loss`) takes Liger-Kernel's
policy for its fused linear cross entropy: the matmuls run in the inputs' dtype, everything that sums over the
vocabulary or over tokens runs in float32.
    logits (C, V)      xc @ W^T in the input dtype, then upcast to float32
    logsumexp, softmax, the loss sum, d loss / d logits (C, V): float32
    d/d hidden (C, D)  (d/d logits cast to the input dtype) @ W, in the input dtype (each row is written once)
    d/d weight (V, D)  += (d/d logits)^T @ xc, each chunk's product in the input dtype, accumulated in float32
                       (Liger's accum_dtype=float32) and cast to the weight's dtype once at the end
Why: a bfloat16 model's lm_head is its largest matmul, and multiplied in float32 it runs at float32's speed (a
bfloat16 (261 x 512) @ (512 x 32064) took 41 ms against float32's 138 ms on 2 cores of an AVX512-BF16 CPU; tensor
cores widen the gap), besides costing a (V, D) float32 copy of the weight. The price is the logits' rounding to the input dtype (relative
2**-9 for bfloat16), the precision the model's own matmuls already have; the float32 reductions keep the softmax from
losing more. For float32 inputs the two agree bit for bit with the float32 computation, and hidden and weight of
different dtypes (a float32 lm_head over bfloat16 hidden states) are both upcast to float32. float16 follows the same
rule; on a CPU without AVX512-FP16 its matmuls are slower than float32's, as are the model's own.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ref.kernels.registry import register

REDUCTIONS = ("mean", "sum")

# Rows per chunk when the caller does not choose: a chunk's logits hold about 2**23 float32 values (32 MiB), so the
# working set is a few such blocks whatever the vocabulary; 261 rows at LLaVA's V = 32064. Measured on 2 CPU cores
# (benchmarks/bench_loss_kernels.py, D=512, N=2048): 64 or 130 rows make the matmuls too thin and run 1.3-2x slower
# than the reference; 256-512 rows match it.
CHUNK_ELEMENTS = 2**23


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class LossInputError(ValueError):
    """A loss op got inputs of the wrong shape, dtype or range."""


def check_linear_inputs(op: str, hidden: torch.Tensor, weight: torch.Tensor, reduction: str) -> None:
    if hidden.dim() != 2:
        raise LossInputError(f"{op}: hidden must be (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise LossInputError(f"{op}: weight must be (V, D={hidden.shape[1]}), got shape {tuple(weight.shape)}")
    if reduction not in REDUCTIONS:
        raise LossInputError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_targets(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  all_valid: bool = False) -> None:
    """Shape and dtype always; the ids' range only when the caller has not checked it (`all_valid`): reading the
    targets' values makes the host wait for an accelerator, three times here."""
    op = "linear_cross_entropy"
    if targets.shape != hidden.shape[:1]:
        raise LossInputError(f"{op}: targets must be (N={hidden.shape[0]},), got shape {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise LossInputError(f"{op}: targets must be int64 or int32 token ids, got {targets.dtype}")
    if all_valid:
        return
    valid = targets[targets != ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= weight.shape[0]):
        bad = valid[(valid < 0) | (valid >= weight.shape[0])][0].item()
        raise LossInputError(f"{op}: target id {bad} outside the vocabulary [0, {weight.shape[0]}) "
                             f"(ignore_index is {ignore_index})")


@register("linear_cross_entropy", "reference")
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", all_valid: bool = False) -> torch.Tensor:
    """hidden (N, D), weight (V, D), targets (N,) -> scalar float32 loss (see the module docstring; `all_valid`
    there too)."""
    check_linear_inputs("linear_cross_entropy", hidden, weight, reduction)
    check_targets(hidden, weight, targets, ignore_index, all_valid)
    logits = hidden.float() @ weight.float().T  # (N, V) float32
    total = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    n_valid = (targets != ignore_index).sum()
    return total / n_valid.clamp(min=1)


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the chunked ops' matmuls: the inputs' own when both are the same 16-bit type, else float32."""
    if hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden.dtype
    return torch.float32


class ChunkBlocks:
    """The (C, V) blocks one call of a chunked op writes, allocated once for the call and reused by every chunk.

    Why: a fresh block per chunk costs more than the arithmetic done in it. At V = 32064 a chunk's float32 block is
    32 MiB, at glibc's largest mmap threshold, so a block allocated and freed per chunk comes back as fresh pages,
    zero-filled by the kernel on first touch: measured on 2 cores (bfloat16, D = 512), one cross-entropy chunk took
    100 ms with fresh blocks and 65 ms with reused ones, 49 of them its two matmuls. The ops write into the blocks
    with `out=` and in place; the values are the same as with fresh tensors, bit for bit.

        f32[i]  (rows, V) float32 blocks, as many as the op needs at once
        low     (rows, V) in the matmul dtype when it is 16-bit (the logits before their upcast, the gradient after
                its downcast), else None

    Memory: the 16-bit block now lives for the whole call, half a float32 block more at the peak than before (cross
    entropy 2.5 float32 blocks, KL 3.5), within the 4 that benchmarks/memory_plan.py counts.
    """

    def __init__(self, rows: int, w: torch.Tensor, count: int):
        shape = (rows, w.shape[0])
        self.f32 = [torch.empty(shape, dtype=torch.float32, device=w.device) for _ in range(count)]
        self.low = None if w.dtype == torch.float32 else torch.empty(shape, dtype=w.dtype, device=w.device)

    def logits(self, xc: torch.Tensor, w: torch.Tensor, i: int) -> torch.Tensor:
        """A chunk's logits (C, V) in float32, in block i, from a matmul in the operands' dtype (for float32, the
        product itself)."""
        out = self.f32[i][:len(xc)]  # (C, V)
        if self.low is None:
            return torch.mm(xc, w.T, out=out)
        return out.copy_(torch.mm(xc, w.T, out=self.low[:len(xc)]))  # 16-bit product, upcast

    def in_matmul_dtype(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """d loss / d logits (C, V) cast to the matmul dtype (the same tensor for float32)."""
        return grad_logits if self.low is None else self.low[:len(grad_logits)].copy_(grad_logits)


def logsumexp_rows(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(z_v) for each row of logits (C, V) -> (C,), shifted by the row's max as torch.logsumexp does,
    with the same ops (bit for bit its result), its (C, V) temporary written into `scratch`."""
    top = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    top.masked_fill_(top.abs() == float("inf"), 0.0)  # as torch: an infinite max is not subtracted
    total = torch.sub(logits, top, out=scratch).exp_().sum(dim=-1)  # (C,) sum_v exp(z_v - max)
    return total.log_().add_(top.squeeze(1))


def add_chunk_gradients(grad_logits: torch.Tensor, xc: torch.Tensor, w: torch.Tensor, blocks: ChunkBlocks,
                        start: int, grad_x: torch.Tensor | None, grad_w: torch.Tensor | None) -> None:
    """From one chunk's d loss / d logits (C, V), float32: its rows of d/d hidden = g W, and d/d weight += g^T x, the
    matmuls in the operands' dtype and d/d weight accumulated in float32."""
    g = blocks.in_matmul_dtype(grad_logits)  # (C, V)
    if grad_x is not None:
        torch.mm(g, w, out=grad_x[start:start + len(xc)])  # (C, D), written in place
    if grad_w is None:
        return
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.T, xc)  # (V, D) += (V, C) @ (C, D), float32 in place
    else:
        grad_w += g.T @ xc  # (V, D): a 16-bit product (addmm_ cannot mix dtypes) added to the float32 sum


def chunked_linear_loss(x: torch.Tensor, per_row: torch.Tensor, w: torch.Tensor, chunk_loss: Callable,
                        blocks_needed: int, chunk_size: int, reduction: str, need_x_grad: bool, need_w_grad: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop shared by the chunked loss ops: walk over the M rows of x (M, D) in chunks of `chunk_size`.

    `chunk_loss(xc, pc, w, want_grad, blocks)` gets a chunk's rows of x (C, D) and of `per_row` (C, ...), the op's
    other per-row input (targets, or the original model's hidden states), and the call's `ChunkBlocks` (with
    `blocks_needed` float32 blocks), and returns the chunk's loss summed over its rows (a float32 scalar) and, when
    want_grad, d (that sum) / d logits (C, V) (in one of the blocks), or None. The loop scales the gradient by
    s = 1/M ("mean", 1 for M = 0) or 1 ("sum"), turns it into the chunk's rows of d/d x and its share of d/d w, and
    returns (s * total, grad_x (M, D) or None, grad_w (V, D) or None).
    """
    scale = 1.0 / max(x.shape[0], 1) if reduction == "mean" else 1.0
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.zeros_like(x) if need_x_grad else None  # (M, D)
    grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w_grad else None  # (V, D)
    blocks = ChunkBlocks(min(chunk_size, x.shape[0]), w, blocks_needed)
    for start in range(0, x.shape[0], chunk_size):
        xc, pc = x[start:start + chunk_size], per_row[start:start + chunk_size]  # (C, D), (C, ...)
        loss_sum, grad_logits = chunk_loss(xc, pc, w, need_x_grad or need_w_grad, blocks)
        total += loss_sum
        if grad_logits is not None:
            add_chunk_gradients(grad_logits.mul_(scale), xc, w, blocks, start, grad_x, grad_w)
    return total * scale, grad_x, grad_w


def stored_gradients(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, grad_x: torch.Tensor | None,
                     grad_w: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients to keep for backward, in the inputs' dtypes: the M counted rows scattered back to all N rows,
    so rows that do not count get exactly zero gradient."""
    if grad_x is not None:
        full = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)  # (N, D)
        grad_x = full.index_copy_(0, rows, grad_x.to(hidden.dtype))
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return grad_x, grad_w


def scaled_by_upstream(saved: tuple, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of a scalar loss whose gradients were stored in forward: the chain rule is a multiply by g."""
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in saved)


def cross_entropy_chunk(xc: torch.Tensor, tc: torch.Tensor, w: torch.Tensor, want_grad: bool, blocks: ChunkBlocks
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: sum_i (logsumexp(z_i) - z_i[t_i]) and, when asked, its gradient softmax(z_i) - onehot(t_i)."""
    logits = blocks.logits(xc, w, 0)  # (C, V) float32
    lse = logsumexp_rows(logits, scratch=blocks.f32[1][:len(xc)])  # (C,)
    loss_sum = (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
    if not want_grad:
        return loss_sum, None
    grad_logits = logits.sub_(lse[:, None]).exp_()  # (C, V) softmax, built in place in the logits block
    grad_logits[torch.arange(len(tc), device=tc.device), tc] -= 1.0
    return loss_sum, grad_logits


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when asked, d loss / d hidden and d loss / d weight chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, need_hidden_grad, need_weight_grad,
                all_valid):
        valid_rows = valid_target_rows(targets, ignore_index, all_valid)  # (M,) rows that count
        dtype = matmul_dtype(hidden, weight)
        x = hidden[valid_rows].to(dtype)  # (M, D) a copy of the valid rows only
        t = targets[valid_rows].long()  # (M,)
        w = weight.to(dtype)  # (V, D): the tensor itself, or a float32 copy for mixed dtypes
        loss, grad_x, grad_w = chunked_linear_loss(x, t, w, cross_entropy_chunk, 2, chunk_size, reduction,
                                                   need_hidden_grad, need_weight_grad)
        ctx.save_for_backward(*stored_gradients(hidden, weight, valid_rows, grad_x, grad_w))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = scaled_by_upstream(ctx.saved_tensors, grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def valid_target_rows(targets: torch.Tensor, ignore_index: int, all_valid: bool) -> torch.Tensor:
    """(M,) the rows whose target counts: every row when the caller says so (`all_valid`), else those whose target is
    not ignore_index (a nonzero: the host waits for the device to learn M)."""
    if all_valid:
        return torch.arange(targets.shape[0], device=targets.device)
    return (targets != ignore_index).nonzero().squeeze(1)


@register("linear_cross_entropy", "chunked")
def linear_cross_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 chunk_size: int | None = None, all_valid: bool = False) -> torch.Tensor:
    """Same contract as `linear_cross_entropy`; never builds more than (chunk_size, V) logits at a time. 16-bit
    inputs: matmuls in their dtype, reductions in float32 (Liger-Kernel's policy, module docstring)."""
    check_linear_inputs("linear_cross_entropy", hidden, weight, reduction)
    check_targets(hidden, weight, targets, ignore_index, all_valid)
    chunk_size = chunk_size or default_chunk_rows(weight.shape[0])
    # ctx.needs_input_grad ignores grad mode, so decide here what autograd will actually ask for.
    grad_on = torch.is_grad_enabled()
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, chunk_size,
                                           grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                                           all_valid)
