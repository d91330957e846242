"""Linear + forward KL from the original model to the current one: the utility term of the unlearning loss.

    log p_orig = log_softmax(ref_hidden @ weight^T)           (N, V), float32; the original model, a constant
    log p_cur  = log_softmax(hidden @ weight^T)               (N, V), float32; the model being trained
    (the matmuls: float32 in `reference`, the inputs' dtype in `chunked`; see Dtypes below)
    kl_i       = sum_v p_orig(v) (log p_orig(v) - log p_cur(v))
    loss       = sum_{i: mask_i} kl_i / n_masked   ("mean")    or    sum_{i: mask_i} kl_i   ("sum")

hidden (N, D) are the current model's final-normed hidden states at response positions (requires grad); ref_hidden
(N, D) the original model's at the same positions (the same 4-bit base with adapters off, under no_grad); weight (V, D)
the lm_head weight, shared by both because the lm_head is not adapted. mask (N,) bool, True for tokens that count, or
None for all. The original distribution is a target, not a path for gradients: nothing flows into ref_hidden, and
the weight gets gradient only through the current logits.

Averaging: "mean" is per token, over all masked tokens of the batch, the same rule as the NLL terms in
`cross_entropy.py`; an empty mask gives 0 with zero gradients.

Exactly 0 at identical inputs: both log-softmaxes are computed by the same code on logits from the same matmul of
same-shaped operands of the same dtype, so equal hidden states give bitwise-equal log-probabilities and every term
p * (a - a) is exactly 0 (what "KL = 0 at step 0" of training relies on), in float32 and in bfloat16 alike.

Gradient with respect to the current logits z_i (p_orig fixed, sum_v p_orig = 1):
    d kl_i / d z_i = softmax(z_i) - p_orig_i
The `chunked` implementation computes that, and from it d/d hidden and d/d weight, in the forward pass chunk by chunk
(the same store-gradients design as `linear_cross_entropy_chunked`, see there for why, and the same chunk loop,
`chunked_linear_loss`); backward scales by the upstream scalar.

Dtypes: as for the cross entropy (cross_entropy.py's docstring), `reference` computes in float32 throughout and
`chunked` takes Liger-Kernel's policy: both models' (C, V) logits come from matmuls in the inputs' dtype (bfloat16's
fast path: the lm_head is a bfloat16 model's largest matmul), and are upcast to float32 for the log-softmaxes, the KL
and its sum; d/d logits = p_cur - p_orig is formed in float32 and cast back to the input dtype for the two gradient
matmuls, d/d weight accumulating in float32 across chunks.
"""

from __future__ import annotations

import torch

from ref.kernels.cross_entropy import (ChunkBlocks, LossInputError, check_linear_inputs, chunked_linear_loss,
                                       default_chunk_rows, matmul_dtype, scaled_by_upstream, stored_gradients)
from ref.kernels.registry import register


def check_kl_inputs(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor,
                    mask: torch.Tensor | None, reduction: str) -> None:
    check_linear_inputs("linear_kl", hidden, weight, reduction)
    if ref_hidden.shape != hidden.shape:
        raise LossInputError(f"linear_kl: ref_hidden must have hidden's shape {tuple(hidden.shape)}, "
                             f"got {tuple(ref_hidden.shape)}")
    if mask is not None and (mask.shape != hidden.shape[:1] or mask.dtype != torch.bool):
        raise LossInputError(f"linear_kl: mask must be a bool tensor of shape (N={hidden.shape[0]},), "
                             f"got {mask.dtype} {tuple(mask.shape)}")


@register("linear_kl", "reference")
def linear_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor,
              mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """hidden, ref_hidden (N, D), weight (V, D), mask (N,) bool or None -> scalar float32 KL(p_orig || p_cur)."""
    check_kl_inputs(hidden, ref_hidden, weight, mask, reduction)
    if mask is not None:
        hidden, ref_hidden = hidden[mask], ref_hidden[mask]  # (M, D): only the tokens that count
    with torch.no_grad():  # the original model is a fixed target
        ref_logprobs = torch.log_softmax(ref_hidden.float() @ weight.float().T, dim=-1)  # (M, V)
    cur_logprobs = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1)  # (M, V)
    per_token = (ref_logprobs.exp() * (ref_logprobs - cur_logprobs)).sum(-1)  # (M,)
    total = per_token.sum()
    return total if reduction == "sum" else total / max(hidden.shape[0], 1)


def kl_chunk(xc: torch.Tensor, rc: torch.Tensor, w: torch.Tensor, want_grad: bool, blocks: ChunkBlocks
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: sum_i KL(p_orig_i || p_cur_i) and, when asked, its gradient p_cur - p_orig. Three float32 blocks:
    the logits of one model at a time (0), then p_orig (0); log p_orig (1); log p_cur (2)."""
    logits, ref_logprobs, cur_logprobs = (block[:len(xc)] for block in blocks.f32)  # (C, V) each
    torch.log_softmax(blocks.logits(rc, w, 0), dim=-1, out=ref_logprobs)
    torch.log_softmax(blocks.logits(xc, w, 0), dim=-1, out=cur_logprobs)
    ref_probs = torch.exp(ref_logprobs, out=logits)  # (C, V), the logits are no longer needed
    # p_orig * (log p_orig - log p_cur), in place in the ref_logprobs block: no further (C, V) block
    loss_sum = ref_logprobs.sub_(cur_logprobs).mul_(ref_probs).sum()
    if not want_grad:
        return loss_sum, None
    return loss_sum, cur_logprobs.exp_().sub_(ref_probs)  # (C, V) p_cur - p_orig


class ChunkedLinearKL(torch.autograd.Function):
    """Forward computes the KL and, when asked, d/d hidden and d/d weight chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, mask, reduction, chunk_size, need_hidden_grad, need_weight_grad):
        n = hidden.shape[0]
        rows = torch.arange(n, device=hidden.device) if mask is None else mask.nonzero().squeeze(1)  # (M,)
        dtype = matmul_dtype(hidden, weight)
        x = hidden[rows].to(dtype)  # (M, D) current
        r = ref_hidden[rows].to(dtype)  # (M, D) original; a fresh copy like x, so both matmuls see alike operands
        w = weight.detach().to(dtype)  # (V, D)
        loss, grad_x, grad_w = chunked_linear_loss(x, r, w, kl_chunk, 3, chunk_size, reduction, need_hidden_grad,
                                                   need_weight_grad)
        ctx.save_for_backward(*stored_gradients(hidden, weight, rows, grad_x, grad_w))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = scaled_by_upstream(ctx.saved_tensors, grad_loss)
        return grad_hidden, None, grad_weight, None, None, None, None, None


@register("linear_kl", "chunked")
def linear_kl_chunked(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor,
                      mask: torch.Tensor | None = None, reduction: str = "mean",
                      chunk_size: int | None = None) -> torch.Tensor:
    """Same contract as `linear_kl`; never builds more than (chunk_size, V) logits of either model at a time. 16-bit
    inputs: matmuls in their dtype, reductions in float32 (Liger-Kernel's policy, module docstring)."""
    check_kl_inputs(hidden, ref_hidden, weight, mask, reduction)
    chunk_size = chunk_size or default_chunk_rows(weight.shape[0])
    grad_on = torch.is_grad_enabled()  # ctx.needs_input_grad ignores grad mode
    return ChunkedLinearKL.apply(hidden, ref_hidden.detach(), weight, mask, reduction, chunk_size,
                                 grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
