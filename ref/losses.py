"""The three unlearning losses of textual unlearning (Chakraborty et al. 2024, after Yao et al. 2023).

    L_total = - eps1 * L_harm  +  eps2 * L_helpful  +  eps3 * L_utility

    L_harm    = NLL(harmful response | harmful prompt)                    gradient ASCENT: the minus sign above
    L_helpful = NLL(helpful response | harmful prompt)                    a refusal that redirects, learnt as usual
    L_utility = KL( p_orig(. | normal) || p_cur(. | normal) )             keep normal behaviour where it was

Plain ascent on L_harm is unbounded (pushed far, the model collapses into gibberish). `LossWeights.harm_loss = "npo"`
puts Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868) in its place, a bounded loss that is
minimised and enters L_total with +eps1 (`npo`): a mean per harmful SEQUENCE, not per token, with log pi(y|x) summed
over the response tokens and pi_ref the adapters-off model, as for the KL. The harmful NLL is still logged beside it.

Every term is an average per response token over all response tokens of its batch (prompt, image and padding tokens
are masked out by `labels == IGNORE_INDEX`; a long response weighs more than a short one). p_orig is the same model
with its LoRA adapters switched off, run under no_grad: the 4-bit base is the original model, so no second copy is
needed, and at step 0 (LoRA's B = 0) the KL is exactly 0. A step made of several batches (gradient accumulation,
ranks) takes each term's mean over all its response tokens in the step (`step_shares`, `step_terms`), so that however
the step is split the gradient is the same.

The lm_head and the vocabulary-sized softmax run through the kernel table (`linear_cross_entropy`, `linear_kl`), and
only on hidden states gathered at response positions: prompt and image tokens never produce logits. Those positions,
the batch's padding and its token counts are found on the host when the batch is made (`Positions`), so a step reads
nothing back from its device but the term means it returns for the log. `batch_flops` counts what each term costs,
the measure behind the paper's compute comparison of textual and multimodal unlearning.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch

from ref.data import IGNORE_INDEX
from ref.kernels import Kernels
from ref.kernels.cross_entropy import LossInputError


@dataclass(frozen=True)
class Positions:
    """Where a batch's tokens are, found on the host from CPU tensors when the batch is made (`Positions.of`).

    The training step needs these facts as Python values and index tensors: read from the batch's device tensors in
    the step, each would make the host wait for the device (a synchronisation: the queue of kernels runs dry). Found
    once on the host, where the collated batch is made, they move to the device with it (`Batch.to`), and the step
    reads nothing back (tests/test_host_syncs.py counts). Flat position p = b * T + t indexes the (B, T) grid.
    """

    right_padded: bool  # every row's real tokens come first: causal attention without the mask is exact (ref.llama)
    tokens: int  # real tokens (attention_mask == 1)
    target_range: tuple[int, int] | None  # smallest and largest response token id; None without response tokens
    response: torch.Tensor  # (N,) int64: flat positions that predict a response token (t predicts t + 1)
    targets: torch.Tensor  # (N,) int64: the response token each of them predicts
    sequence_tokens: tuple[int, ...]  # response tokens of each row: `response` holds them row after row

    @property
    def response_tokens(self) -> int:
        return self.response.shape[0]

    @classmethod
    def of(cls, attention_mask: torch.Tensor, labels: torch.Tensor) -> Positions:
        """From a batch's (B, T) mask and labels, on the CPU (device tensors are copied to the host first, once)."""
        mask, labels = attention_mask.cpu(), labels.cpu()
        width = labels.shape[1]
        rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,) each, in reading order
        targets = labels[rows, cols + 1].long()  # (N,)
        target_range = (int(targets.min()), int(targets.max())) if len(targets) else None
        per_row = tuple(torch.bincount(rows, minlength=labels.shape[0]).tolist())
        return cls(right_padded=bool((mask[:, 1:] <= mask[:, :-1]).all()), tokens=int(mask.sum()),
                   target_range=target_range, response=rows * width + cols, targets=targets, sequence_tokens=per_row)

    def to(self, device: torch.device) -> Positions:
        return dataclasses.replace(self, response=self.response.to(device), targets=self.targets.to(device))


@dataclass(frozen=True)
class Batch:
    """A training batch: right-padded token ids with response-only labels (see ref.data.collate_for_training).

    Frozen: `positions` is found from the tensors once, when the batch is made (on the host for a batch made from CPU
    tensors, as collate_for_training's are), and must stay theirs."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    labels: torch.Tensor  # (B, T), the token id at response positions, IGNORE_INDEX elsewhere
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S) for the image tokens in input_ids, in order
    image_tokens: int | None = None  # image tokens in input_ids, counted on the host; None: counted when needed
    positions: Positions | None = None  # None: found from attention_mask and labels here

    def __post_init__(self):
        if self.positions is None:
            object.__setattr__(self, "positions", Positions.of(self.attention_mask, self.labels))

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device`, with its positions: what the host knows about it moves, nothing is read back."""
        pixels = None if self.pixel_values is None else self.pixel_values.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), pixels,
                     self.image_tokens, self.positions.to(device))

    @property
    def response_tokens(self) -> int:
        return self.positions.response_tokens

    @property
    def sequences(self) -> int:
        """Rows with at least one response token: what a per-sequence mean (NPO's) is taken over."""
        return sum(1 for n in self.positions.sequence_tokens if n)

    def count_image_tokens(self, image_token_index: int | None) -> int:
        """Image tokens in input_ids: the host's count when the batch has one, else counted (a synchronisation)."""
        if image_token_index is None:
            return 0
        if self.image_tokens is not None:
            return self.image_tokens
        return int((self.input_ids == image_token_index).sum())


TERMS = ("harm_nll", "helpful_nll", "utility_kl")  # the log's names of L_harm, L_helpful, L_utility
NPO_TERMS = ("harm_nll", "harm_npo", "helpful_nll", "utility_kl")  # --harm-loss npo: harm_nll is logged, not trained


@dataclass
class TermBatches:
    """The batch of each term for one piece of a step (one micro-batch of one rank); a term without one is None."""

    harmful: Batch | None  # prompts with their harmful responses (L_harm)
    helpful: Batch | None  # the same prompts with helpful responses (L_helpful)
    normal: Batch | None  # normal data (L_utility)

    def to(self, device: torch.device) -> TermBatches:
        return TermBatches(*(None if b is None else b.to(device) for b in (self.harmful, self.helpful, self.normal)))

    def response_tokens(self) -> dict[str, int]:
        """Each term's response tokens in these batches (what its mean is taken over)."""
        batches = (self.harmful, self.helpful, self.normal)
        return {term: 0 if b is None else b.response_tokens for term, b in zip(TERMS, batches)}

    def harmful_sequences(self) -> int:
        """The harmful sequences in these batches (what NPO's mean is taken over)."""
        return 0 if self.harmful is None else self.harmful.sequences


def response_hidden(model, batch: Batch, image_features: torch.Tensor | None = None):
    """Final hidden states at the positions that predict response tokens, and those tokens.

    The hidden state at position t predicts token t + 1 (`Positions.of` pairs them). Returns hidden (N, D) and
    targets (N,), N = number of response tokens in the batch, in reading order. What the host knows of the batch
    (its padding, its image tokens, its response positions) goes with the call, so nothing is read from the device.
    """
    if image_features is None and batch.pixel_values is not None:
        image_features = frozen_image_features(model, batch.pixel_values)
    positions = batch.positions
    hidden = model.hidden_states(batch.input_ids, attention_mask=batch.attention_mask, image_features=image_features,
                                 right_padded=positions.right_padded, image_tokens=batch.image_tokens)  # (B, T, D)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T, D)
    return flat.index_select(0, positions.response), positions.targets  # (N, D), (N,)


def frozen_image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower and projector are frozen in every mode: no activations kept for backward."""
    with torch.no_grad():
        return model.image_features(pixel_values)  # (N_img, P, D)


def nll(model, batch: Batch, kernels: Kernels) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the batch's response tokens."""
    check_vocabulary(batch, model.lm_head.weight.shape[0])
    hidden, targets = response_hidden(model, batch)
    return kernels.linear_cross_entropy(hidden, model.lm_head.weight, targets, all_valid=True)


def check_vocabulary(batch: Batch, vocab_size: int) -> None:
    """The response tokens are ids of the vocabulary, checked on the host (the range was found with the positions):
    the loss op is then told so, and does not check them on the device (`all_valid`)."""
    span = batch.positions.target_range
    if span is not None and (span[0] < 0 or span[1] >= vocab_size):
        bad = span[0] if span[0] < 0 else span[1]
        raise LossInputError(f"linear_cross_entropy: target id {bad} outside the vocabulary [0, {vocab_size})")


def kl_to_original(model, batch: Batch, kernels: Kernels, adapters_off: Callable[[], AbstractContextManager],
                   original=None) -> torch.Tensor:
    """Mean per-token KL(p_orig || p_cur) over the batch's response tokens.

    `adapters_off()` is a context manager under which the model is the original (e.g. ref.lora.adapters_disabled).
    Without adapters (full-parameter training) the original is a frozen copy of the model, `original`.
    """
    image_features = None
    if batch.pixel_values is not None:  # shared by both passes: the frozen tower gives the same features twice
        image_features = frozen_image_features(model, batch.pixel_values)
    with torch.no_grad(), adapters_off():
        ref_hidden, _ = response_hidden(original or model, batch, image_features)  # (N, D), the original model
    hidden, _ = response_hidden(model, batch, image_features)  # (N, D), the model being trained
    return kernels.linear_kl(hidden, ref_hidden, model.lm_head.weight)


def sequence_nlls(model, batch: Batch, kernels: Kernels, image_features: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """-log pi(y|x) of each sequence with a response: its response tokens' NLLs SUMMED, (S,) float32, in row order.

    The kernel op reduces over the rows it is given (a mean or a sum), so it is called once per sequence, with
    reduction "sum", on that sequence's rows (contiguous: `response` holds them row after row). A harmful batch has a
    few sequences, and the op's chunking and dtype policy hold as for the other terms."""
    check_vocabulary(batch, model.lm_head.weight.shape[0])
    hidden, targets = response_hidden(model, batch, image_features)  # (N, D), (N,)
    counts = list(batch.positions.sequence_tokens)
    sums = [kernels.linear_cross_entropy(h, model.lm_head.weight, t, reduction="sum", all_valid=True)
            for h, t, n in zip(hidden.split(counts), targets.split(counts), counts) if n]
    return torch.stack(sums) if sums else hidden.float().sum(-1)  # no response: an empty (0,), still on the graph


def npo(model, batch: Batch, kernels: Kernels, beta: float, adapters_off: Callable[[], AbstractContextManager],
        original=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative Preference Optimization (Zhang, Lin, Bai, Mei 2024, arXiv 2404.05868) on the harmful responses:

        L_NPO = mean over sequences (x, y) of  (2 / beta) * log(1 + (pi_theta(y|x) / pi_ref(y|x)) ** beta)
              = mean over sequences of         (2 / beta) * softplus(beta * (log pi_theta(y|x) - log pi_ref(y|x)))

    MINIMISED (it enters L_total with +eps1). log pi(y|x) is the sum of the response tokens' log-probs; pi_ref is
    the original model, the adapters switched off (`original` without adapters), under no_grad, as for the KL. At
    pi_theta = pi_ref (step 0) it is (2/beta) log 2 and its gradient that of mean log pi_theta(y|x): gradient ascent
    on the sequence NLL; as pi_theta(y|x) -> 0 the weight sigmoid(beta * (log pi_theta - log pi_ref)) on that
    gradient goes to 0, so the loss is bounded below by 0 where plain ascent is not bounded at all.

    Returns the loss (with its graph) and the harmful NLL per token, detached (what the log and the stopping rule
    read as harm_nll)."""
    image_features = None
    if batch.pixel_values is not None:  # shared by both passes, as in kl_to_original
        image_features = frozen_image_features(model, batch.pixel_values)
    with torch.no_grad(), adapters_off():
        reference = sequence_nlls(original or model, batch, kernels, image_features)  # -log pi_ref(y|x), (S,)
    current = sequence_nlls(model, batch, kernels, image_features)  # -log pi_theta(y|x), (S,)
    per_sequence = (2.0 / beta) * torch.nn.functional.softplus(beta * (reference - current))  # (S,)
    loss = per_sequence.sum() / max(batch.sequences, 1)  # the mean over the sequences (0 without any)
    return loss, current.detach().sum() / max(batch.response_tokens, 1)


HARM_LOSSES = ("ascent", "npo")


@dataclass(frozen=True)
class LossWeights:
    """The weights of L_total's terms, and which loss its harm term is."""

    harm: float = 0.5  # eps1 (Yao et al.'s default)
    helpful: float = 1.0  # eps2
    utility: float = 1.0  # eps3
    harm_loss: str = "ascent"  # "ascent": -eps1 * L_harm (the paper's); "npo": +eps1 * L_NPO (`npo`)
    npo_beta: float = 0.1  # NPO's beta (Zhang et al.'s default)

    def __post_init__(self):
        if self.harm_loss not in HARM_LOSSES:
            raise ValueError(f"harm_loss must be one of {HARM_LOSSES}, got {self.harm_loss!r}")
        if not self.npo_beta > 0:
            raise ValueError(f"npo_beta must be > 0, got {self.npo_beta}")

    @property
    def terms(self) -> tuple[str, ...]:
        """The names a step logs, in order: with NPO, harm_npo beside the harmful NLL."""
        return NPO_TERMS if self.harm_loss == "npo" else TERMS

    @property
    def signs(self) -> dict[str, float]:
        """Each trained term's signed coefficient in L_total (harm_nll is only logged under NPO)."""
        harm = {"harm_npo": self.harm} if self.harm_loss == "npo" else {"harm_nll": -self.harm}
        return {**harm, "helpful_nll": self.helpful, "utility_kl": self.utility}


def loss_terms(model, harmful: Batch | None, helpful: Batch | None, normal: Batch | None, weights: LossWeights,
               kernels: Kernels, adapters_off: Callable[[], AbstractContextManager], original=None
               ) -> list[tuple[str, float, Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]]]:
    """The terms of L_total that run, as (name, coefficient, compute): coefficient is the term's signed eps
    (-eps1 for the ascent on L_harm, +eps1 for NPO) and compute() builds the term's mean over its batch, with its
    graph, and what is logged beside it (NPO: the harmful NLL, detached). A term whose batch is None or whose weight
    is 0 is left out."""
    def alone(mean: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return mean, {}

    def harm_npo() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, harm_nll = npo(model, harmful, kernels, weights.npo_beta, adapters_off, original)
        return loss, {"harm_nll": harm_nll}

    if weights.harm_loss == "npo":
        harm_name, harm_compute = "harm_npo", harm_npo
    else:
        harm_name, harm_compute = "harm_nll", lambda: alone(nll(model, harmful, kernels))
    signs = weights.signs
    plan = [(harm_name, signs[harm_name], harmful, harm_compute),
            ("helpful_nll", signs["helpful_nll"], helpful, lambda: alone(nll(model, helpful, kernels))),
            ("utility_kl", signs["utility_kl"], normal,
             lambda: alone(kl_to_original(model, normal, kernels, adapters_off, original)))]
    return [(name, coefficient, compute) for name, coefficient, batch, compute in plan
            if batch is not None and coefficient]


def unlearning_loss(model, harmful: Batch | None, helpful: Batch | None, normal: Batch | None,
                    weights: LossWeights, kernels: Kernels, adapters_off: Callable[[], AbstractContextManager],
                    shares: dict[str, float] | None = None, original=None
                    ) -> tuple[torch.Tensor | None, dict[str, float]]:
    """L_total = -eps1 L_harm + eps2 L_helpful + eps3 L_utility (with NPO: +eps1 L_NPO in place of -eps1 L_harm); a
    term whose batch is None (or weight 0) is skipped.

    `shares[term]` multiplies the term's mean over this batch (default 1): a step made of several batches (gradient
    accumulation, ranks) gives each batch's mean the share of the step's response tokens (NPO: harmful sequences) it
    holds, so that the step's gradient is that of each term's mean over all of them (`step_shares` below).
    `original`: the frozen copy the KL (and NPO) compares with when there are no adapters to switch off
    (full-parameter training).

    Returns the total (a scalar to backpropagate) and each term's mean over this batch, for the log. With no term at
    all (a batch of harmful-only records in a run that only matches helpful responses, say) the total is None.
    The three graphs are alive together until the total's backward; train.py takes the same gradient with one graph
    at a time (`unlearning_backward`).
    """
    shares = shares or {}
    total, means = None, {}
    for name, coefficient, compute in loss_terms(model, harmful, helpful, normal, weights, kernels, adapters_off,
                                                 original):
        mean, beside = compute()
        term = coefficient * (mean * shares.get(name, 1.0))
        total = term if total is None else total + term
        means.update(beside)
        means[name] = mean.detach()
    return total, read_means(means)


def unlearning_backward(model, harmful: Batch | None, helpful: Batch | None, normal: Batch | None,
                        weights: LossWeights, kernels: Kernels, adapters_off: Callable[[], AbstractContextManager],
                        shares: dict[str, float] | None = None, original=None) -> dict[str, float]:
    """Add the gradient of `unlearning_loss`'s total to every trainable parameter's .grad, one term at a time.

    d L_total = -eps1 d L_harm + eps2 d L_helpful + eps3 d L_utility: a sum of gradients, so each term runs forward
    and backward before the next one starts, and only one term's activations are ever kept (a third of the memory of
    one backward through the total). Returns each term's mean over this batch, as `unlearning_loss` does.
    """
    shares = shares or {}
    means = {}
    for name, coefficient, compute in loss_terms(model, harmful, helpful, normal, weights, kernels, adapters_off,
                                                 original):
        mean, beside = compute()
        (coefficient * (mean * shares.get(name, 1.0))).backward()
        means.update(beside)
        means[name] = mean.detach()
    return read_means(means)


def read_means(means: dict[str, torch.Tensor]) -> dict[str, float]:
    """The terms' values as floats, read from the device in one transfer (one synchronisation, not one per term)."""
    if not means:
        return {}
    values = torch.stack([m.float() for m in means.values()]).tolist()
    return dict(zip(means, values))


def total_loss(terms: dict[str, float], weights: LossWeights) -> float:
    """-eps1 L_harm (or +eps1 L_NPO) + eps2 L_helpful + eps3 L_utility from the terms' values (those present)."""
    signed = weights.signs
    return sum(signed[name] * value for name, value in terms.items() if name in signed)


# ---------------------------------------------------------------------------------------------------------------------
# One normalisation for every split of a step. Each term is the mean over all its response tokens in the step:
#
#     L_term = sum over the step's batches b (every micro-batch of every rank) of  n_b * mean_b / N_step
#
# with n_b the term's response tokens in batch b and N_step their sum. Each batch's backward therefore weighs its mean
# by n_b / N_step (times the number of ranks, which the gradient all-reduce's mean divides out again), so that
# --grad-accum 2 x batch 4, 2 ranks x batch 4 and one batch of 8 records give the same gradient, and a term missing
# from one batch does not lose weight in the others. NPO (harm_npo) is a mean per harmful SEQUENCE: its n_b counts
# the batch's harmful sequences, the same rule otherwise (`term_counts`). `sum_over_ranks` adds a few numbers over the
# ranks (the run's all-reduce, ref.distributed.Distributed.sum_floats); one process adds nothing to them.

SumOverRanks = Callable[[list[float]], list[float]]


def one_process(values: list[float]) -> list[float]:
    return list(values)


def term_counts(batches: TermBatches, terms) -> dict[str, int]:
    """n_b of each of `terms` in this batch: its response tokens; for harm_npo, the harmful sequences."""
    counts = dict(batches.response_tokens())
    if "harm_npo" in terms:
        counts["harm_npo"] = batches.harmful_sequences()
    return {term: counts[term] for term in terms}


def tokens_in_step(micro_batches: list[TermBatches], sum_over_ranks: SumOverRanks = one_process,
                   terms: tuple[str, ...] = TERMS) -> dict[str, float]:
    """N_step of each term (`LossWeights.terms`): its response tokens (harm_npo: harmful sequences) in every batch of
    the step, on every rank."""
    local = [sum(term_counts(b, terms)[term] for b in micro_batches) for term in terms]
    return dict(zip(terms, sum_over_ranks(local)))


def step_shares(batches: TermBatches, step_tokens: dict[str, float], ranks: int = 1) -> dict[str, float]:
    """n_b / N_step of each term of this batch, times the ranks (the gradient all-reduce takes their mean)."""
    return {term: ranks * n / step_tokens[term] for term, n in term_counts(batches, step_tokens).items() if n}


def add_token_sums(sums: dict[str, float], means: dict[str, float], batches: TermBatches) -> None:
    """n_b * mean_b of each term this batch computed, added to the step's sums (for the log)."""
    counts = term_counts(batches, means)
    for term, mean in means.items():
        sums[term] = sums.get(term, 0.0) + mean * counts[term]


def step_terms(sums: dict[str, float], step_tokens: dict[str, float], weights: LossWeights,
               sum_over_ranks: SumOverRanks = one_process) -> dict[str, float]:
    """L_term = sum_b n_b * mean_b / N_step of each term of `step_tokens` (what the log and the stopping rule read),
    and the total; a term no batch of the step computed, on any rank, is absent."""
    names = list(step_tokens)
    computed = sum_over_ranks([1.0 if term in sums else 0.0 for term in names])
    active = [term for term, flag in zip(names, computed) if flag]
    totals = sum_over_ranks([sums.get(term, 0.0) for term in active])
    terms = {term: total / step_tokens[term] for term, total in zip(active, totals)}
    if terms:
        terms["total"] = total_loss(terms, weights)
    return terms


# ---------------------------------------------------------------------------------------------------------------------
# The compute of a term: the count behind the paper's "multimodal unlearning costs up to 6x the compute"


def decoder_params(model) -> int:
    """Parameters a token's forward pass multiplies through in the decoder layers (4-bit ones counted unpacked)."""
    t = model.config.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_hidden_layers * (attn + mlp)


def vision_params(model) -> int:
    """Parameters an image token's forward pass multiplies through in the vision tower and the projector."""
    v = model.config.vision
    if v is None:
        return 0
    layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    projector = model.config.projector_in_features * model.config.text.hidden_size + model.config.text.hidden_size**2
    return v.num_hidden_layers * layer + projector


def batch_flops(model, batch: Batch | None, backward: bool, reference_pass: bool) -> float:
    """Matmul FLOPs of one term's passes (2 per multiply-add), the count a reader can check by hand.

    Forward through the decoder: 2 * P_decoder per token; the lm_head only at response tokens: 2 * D * V each.
    Backward through a frozen base computes input gradients only: about the forward's cost again (LoRA's own weight
    gradients are negligible). The original model's pass for the KL term is one more forward. The frozen vision tower
    runs forward only, 2 * P_vision per image token (1 + patches per image).
    """
    if batch is None:
        return 0.0
    t = model.config.text
    tokens, responses = batch.positions.tokens, batch.response_tokens
    forward = 2 * decoder_params(model) * tokens + 2 * t.hidden_size * t.vocab_size * responses
    passes = 1 + (1 if backward else 0) + (1 if reference_pass else 0)
    vision = 0.0
    if batch.pixel_values is not None:
        vision = 2 * vision_params(model) * batch.pixel_values.shape[0] * (model.config.vision.num_patches + 1)
    return passes * forward + vision


@dataclass
class StepCounts:
    """Tokens, image tokens and estimated FLOPs (`batch_flops`) of one optimizer step's batches: what each step logs,
    and the run's totals add up."""

    tokens: int = 0
    image_tokens: int = 0
    flops: float = 0.0

    def add(self, model, batches: TermBatches, harm_reference_pass: bool = False) -> None:
        """`harm_reference_pass`: the harm term also runs the original model (NPO's pi_ref), as the KL term does."""
        for batch, reference_pass in ((batches.harmful, harm_reference_pass), (batches.helpful, False),
                                      (batches.normal, True)):
            if batch is not None:
                self.tokens += batch.positions.tokens
                self.image_tokens += batch.count_image_tokens(model.config.image_token_index)
                self.flops += batch_flops(model, batch, backward=True, reference_pass=reference_pass)

    def over_ranks(self, sum_over_ranks: SumOverRanks = one_process) -> StepCounts:
        tokens, image_tokens, flops = sum_over_ranks([self.tokens, self.image_tokens, self.flops])
        return StepCounts(int(tokens), int(image_tokens), flops)
