"""The three unlearning losses of textual unlearning (Chakraborty et al. 2024, after Yao et al. 2023).

    L_total = - eps1 * L_harm  +  eps2 * L_helpful  +  eps3 * L_utility

    L_harm    = NLL(harmful response | harmful prompt)                    gradient ASCENT: the minus sign above
    L_helpful = NLL(helpful response | harmful prompt)                    a refusal that redirects, learnt as usual
    L_utility = KL( p_orig(. | normal) || p_cur(. | normal) )             keep normal behaviour where it was

Every term is an average per response token over all response tokens of its batch (prompt, image and padding tokens
are masked out by `labels == -100`; a long response weighs more than a short one). p_orig is the same model with its
LoRA adapters switched off, run under no_grad: the 4-bit base is the original model, so no second copy is needed, and
at step 0 (LoRA's B = 0) the KL is exactly 0.

The lm_head and the vocabulary-sized softmax run through the kernel table (`linear_cross_entropy`, `linear_kl`), and
only on hidden states gathered at response positions: prompt and image tokens never produce logits.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch

from ref.kernels import Kernels

IGNORE = -100  # label of every position that is not a response token


@dataclass
class Batch:
    """A training batch: right-padded token ids with response-only labels (see ref.data.collate_for_training)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    labels: torch.Tensor  # (B, T), the token id at response positions, IGNORE elsewhere
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S) for the image tokens in input_ids, in order

    def to(self, device: torch.device) -> "Batch":
        pixels = None if self.pixel_values is None else self.pixel_values.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), pixels)

    @property
    def response_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def response_hidden(model, batch: Batch, image_features: torch.Tensor | None = None):
    """Final hidden states at the positions that predict response tokens, and those tokens.

    The hidden state at position t predicts token t + 1, so labels shift left by one. Returns hidden (N, D) and
    targets (N,), N = number of response tokens in the batch.
    """
    if image_features is None and batch.pixel_values is not None:
        image_features = frozen_image_features(model, batch.pixel_values)
    hidden = model.hidden_states(batch.input_ids, attention_mask=batch.attention_mask,
                                 image_features=image_features)  # (B, T, D)
    targets = batch.labels[:, 1:]  # (B, T-1): what each position must predict
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]  # (N, D), (N,)


def frozen_image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower and projector are frozen in every mode: no activations kept for backward."""
    with torch.no_grad():
        return model.image_features(pixel_values)  # (N_img, P, D)


def nll(model, batch: Batch, kernels: Kernels) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the batch's response tokens."""
    hidden, targets = response_hidden(model, batch)
    return kernels.linear_cross_entropy(hidden, model.lm_head.weight, targets)


def kl_to_original(model, batch: Batch, kernels: Kernels,
                   adapters_off: Callable[[], AbstractContextManager]) -> torch.Tensor:
    """Mean per-token KL(p_orig || p_cur) over the batch's response tokens.

    `adapters_off()` is a context manager under which the model is the original (e.g. ref.lora.adapters_disabled).
    """
    image_features = None
    if batch.pixel_values is not None:  # shared by both passes: the frozen tower gives the same features twice
        image_features = frozen_image_features(model, batch.pixel_values)
    with torch.no_grad(), adapters_off():
        ref_hidden, _ = response_hidden(model, batch, image_features)  # (N, D), the original model
    hidden, _ = response_hidden(model, batch, image_features)  # (N, D), the model being trained
    return kernels.linear_kl(hidden, ref_hidden, model.lm_head.weight)


@dataclass(frozen=True)
class LossWeights:
    harm: float = 0.5  # eps1 (Yao et al.'s default)
    helpful: float = 1.0  # eps2
    utility: float = 1.0  # eps3


def unlearning_loss(model, harmful: Batch | None, helpful: Batch | None, normal: Batch | None,
                    weights: LossWeights, kernels: Kernels,
                    adapters_off: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, dict[str, float]]:
    """L_total = -eps1 L_harm + eps2 L_helpful + eps3 L_utility; a term whose batch is None (or weight 0) is skipped.

    Returns the total (a scalar to backpropagate) and each term's value for the log.
    """
    total = torch.zeros((), device=model.lm_head.weight.device)
    terms: dict[str, float] = {}
    if harmful is not None and weights.harm:
        harm_nll = nll(model, harmful, kernels)
        total = total - weights.harm * harm_nll  # ascent: raising the harmful NLL lowers the total
        terms["harm_nll"] = harm_nll.item()
    if helpful is not None and weights.helpful:
        helpful_nll = nll(model, helpful, kernels)
        total = total + weights.helpful * helpful_nll
        terms["helpful_nll"] = helpful_nll.item()
    if normal is not None and weights.utility:
        kl = kl_to_original(model, normal, kernels, adapters_off)
        total = total + weights.utility * kl
        terms["utility_kl"] = kl.item()
    terms["total"] = total.item()
    return total, terms
