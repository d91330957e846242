"""NPO, the bounded harm term (--harm-loss npo): its value against a float64 computation from full logits, its value
and gradient at step 0, the step's normalisation per sequence, and train.py's options and log.

    L_NPO = mean over harmful sequences of (2 / beta) * softplus(beta * (log pi_theta(y|x) - log pi_ref(y|x)))

with log pi(y|x) summed over the response tokens and pi_ref the model with its adapters off (ref.losses.npo).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import train
from ref import kernels as kernel_registry
from ref.data import IGNORE_INDEX
from ref.losses import (Batch, LossWeights, StepCounts, TermBatches, add_token_sums, npo, step_shares, step_terms,
                        tokens_in_step, unlearning_backward)
from ref.lora import adapters_disabled
from harness.train_options import OptionError
from test_host_syncs import build, state, syncs, term_batches  # noqa: F401 (state: the fixture build takes)
from test_losses import float64_response_logprobs, lora_model, make_batch
from weights_tools.make_tiny import build_tokenizer, random_model, tiny_config

KERNEL_PRESETS = ["reference", "chunked"]
LENGTHS, PROMPTS = (9, 14, 11), (4, 6, 3)  # three harmful sequences of 5, 8 and 8 response tokens


@pytest.fixture(scope="module")
def base_model():
    return random_model(tiny_config(build_tokenizer(), text_layers=2), seed=3)


def float64_sequence_logprobs(model, batch: Batch) -> torch.Tensor:
    """log pi(y|x) of each row from the float64 model's full logits: the response tokens' log-probs summed, (B,)."""
    logprobs, targets = float64_response_logprobs(model, batch)  # (N, V), (N,): the response positions, row-major
    token = logprobs.gather(1, targets[:, None]).squeeze(1)  # (N,)
    rows = (batch.labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # (N,) the row of each response position
    return torch.zeros(batch.labels.shape[0], dtype=token.dtype).index_add(0, rows, token)


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("preset", KERNEL_PRESETS)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_equals_a_float64_computation_from_the_models_log_probs(base_model, preset, beta):
    model = lora_model(base_model, seed=1)
    batch = make_batch(model, LENGTHS, PROMPTS, seed=0)
    current = float64_sequence_logprobs(model, batch)
    with adapters_disabled(model):
        reference = float64_sequence_logprobs(model, batch)
    assert (current - reference).abs().min() > 1e-3  # the adapters moved every sequence: the ratio is not 1
    ratio = torch.exp(current - reference)  # pi_theta(y|x) / pi_ref(y|x)
    expected = ((2 / beta) * torch.log1p(ratio**beta)).mean()  # the paper's form, not softplus
    loss, harm_nll = npo(model, batch, kernel_registry.resolve(preset), beta, lambda: adapters_disabled(model))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    n_tokens = sum(n - p for n, p in zip(LENGTHS, PROMPTS))
    torch.testing.assert_close(harm_nll.double(), -current.sum() / n_tokens, rtol=1e-5, atol=1e-6)
    assert not harm_nll.requires_grad and loss.requires_grad


@pytest.mark.parametrize("preset", KERNEL_PRESETS)
def test_at_step_zero_npo_is_2_log_2_over_beta_and_its_gradient_is_ascent_on_the_sequence_nll(base_model, preset):
    """pi_theta = pi_ref (LoRA's B = 0): L = (2/beta) log 2, and d/dtheta (2/beta) softplus(beta d) = 2 sigmoid(0) d'
    = d': the gradient of the mean over sequences of log pi_theta(y|x) (minimising it is ascent on the NLL)."""
    beta = 0.1
    model = lora_model(base_model, seed=None)
    batch = make_batch(model, LENGTHS, PROMPTS, seed=1)
    loss, _ = npo(model, batch, kernel_registry.resolve(preset), beta, lambda: adapters_disabled(model))
    assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    loss.backward()
    got = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    # mean over sequences of log pi_theta(y|x), from the model's full float32 logits (no loss code of ref.losses)
    logprobs = torch.log_softmax(model(batch.input_ids, attention_mask=batch.attention_mask)[:, :-1], dim=-1)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    token = logprobs.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    torch.where(keep, token, torch.zeros_like(token)).sum(1).mean().backward()
    expected = trainable_grads(model)
    assert got.keys() == expected.keys() and any(g.abs().max() > 1e-4 for g in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def rows(batch: Batch, keep: list[int]) -> Batch:
    """The rows `keep` of a right-padded batch, cut to their own width (less padding than in the whole batch)."""
    width = int(batch.attention_mask[keep].sum(1).max())
    return Batch(batch.input_ids[keep, :width], batch.attention_mask[keep, :width], batch.labels[keep, :width])


def accumulate(model, micro: list[TermBatches], weights: LossWeights, kernels, shares=step_shares):
    """train.py's step over `micro`: the step's counts, each batch's backward with its shares, the logged terms."""
    model.zero_grad(set_to_none=True)
    step_counts = tokens_in_step(micro, terms=weights.terms)
    sums = {}
    for batches in micro:
        means = unlearning_backward(model, batches.harmful, batches.helpful, batches.normal, weights, kernels,
                                    lambda: adapters_disabled(model), shares(batches, step_counts))
        add_token_sums(sums, means, batches)
    return trainable_grads(model), step_terms(sums, step_counts, weights)


def test_two_micro_batches_give_the_gradient_of_the_mean_over_all_the_steps_sequences(base_model):
    """NPO is a mean per sequence: 1 + 2 sequences accumulated weigh their means 1/3 and 2/3 (the harmful tokens,
    5 and 16 of 21, would not), the helpful NLL stays a mean per token; the logged terms are the whole batch's."""
    model = lora_model(base_model, seed=2)
    kernels = kernel_registry.resolve("reference")
    weights = LossWeights(harm=0.5, helpful=1.0, utility=0.0, harm_loss="npo", npo_beta=0.1)
    harmful, helpful = make_batch(model, LENGTHS, PROMPTS, seed=2), make_batch(model, LENGTHS, PROMPTS, seed=3)
    whole = [TermBatches(harmful, helpful, None)]
    split = [TermBatches(rows(harmful, [0]), rows(helpful, [0]), None),
             TermBatches(rows(harmful, [1, 2]), rows(helpful, [1, 2]), None)]
    assert tokens_in_step(split, terms=weights.terms) == {"harm_nll": 21, "harm_npo": 3, "helpful_nll": 21,
                                                          "utility_kl": 0}
    assert step_shares(split[0], tokens_in_step(split, terms=weights.terms))["harm_npo"] == 1 / 3
    one_grads, one_terms = accumulate(model, whole, weights, kernels)
    two_grads, two_terms = accumulate(model, split, weights, kernels)
    assert list(one_terms) == ["harm_nll", "harm_npo", "helpful_nll", "total"]
    assert one_terms["total"] == pytest.approx(0.5 * one_terms["harm_npo"] + one_terms["helpful_nll"], rel=1e-6)
    assert two_terms == pytest.approx(one_terms, rel=1e-5)
    for name in one_grads:
        torch.testing.assert_close(two_grads[name], one_grads[name], rtol=1e-4, atol=1e-7, msg=name)

    def by_tokens(batches, counts):  # the per-token weighting of the other terms, wrongly applied to NPO
        shares = step_shares(batches, counts)
        return {**shares, "harm_npo": shares["harm_nll"]}

    wrong, _ = accumulate(model, split, weights, kernels, by_tokens)
    assert max((wrong[n] - one_grads[n]).abs().max() for n in one_grads) > 1e-4  # the test tells the two apart


@pytest.mark.parametrize("preset", ["reference", "fast"])
def test_an_npo_step_reads_the_device_once(state, preset):
    """The per-sequence sums are split by the host's counts (ref.losses.Positions): the step with NPO reads its
    device once, as the ascent's does (tests/test_host_syncs.py), and its bookkeeping never."""
    model = build(state, preset)
    batches = term_batches(model, images=False)
    weights = LossWeights(harm=0.5, helpful=1.0, utility=2.0, harm_loss="npo")
    counts = tokens_in_step([batches], terms=weights.terms)
    shares = step_shares(batches, counts)
    step = syncs(lambda: unlearning_backward(model, batches.harmful, batches.helpful, batches.normal, weights,
                                             model.kernels, lambda: adapters_disabled(model), shares))
    assert step == ["Tensor.tolist"]

    def bookkeeping():
        add_token_sums({}, dict.fromkeys(weights.terms, 1.0), batches)
        StepCounts().add(model, batches, harm_reference_pass=True)

    assert syncs(bookkeeping) == []


def test_ascent_is_the_default_and_unchanged(tmp_path):
    """The default LossWeights and the command line's are ascent: harm_nll with -eps1, no harm_npo anywhere."""
    assert LossWeights().harm_loss == "ascent" and LossWeights().terms == ("harm_nll", "helpful_nll", "utility_kl")
    assert LossWeights(harm=0.5).signs == {"harm_nll": -0.5, "helpful_nll": 1.0, "utility_kl": 1.0}
    assert LossWeights(harm=0.5, harm_loss="npo").signs == {"harm_npo": 0.5, "helpful_nll": 1.0, "utility_kl": 1.0}
    options, _ = train.read_command_line(["--max-steps", "1", "--out", str(tmp_path / "run")])
    assert options.harm_loss == "ascent" and options.npo_beta == 0.1


def test_train_py_with_npo_logs_harm_npo_and_resume_refuses_a_change(tmp_path):
    out = tmp_path / "npo"
    summary = train.train(*train.read_command_line(["--max-steps", "2", "--out", str(out), "--harm-loss", "npo",
                                                    "--threads", "1"]))
    assert summary["steps"] == 2
    args = json.loads((out / "args.json").read_text())
    assert args["harm_loss"] == "npo" and args["npo_beta"] == 0.1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    eps1, eps2, eps3 = args["eps"]
    for record in log:
        assert {"harm_nll", "harm_npo", "helpful_nll", "utility_kl"} <= set(record)
        assert record["total"] == pytest.approx(eps1 * record["harm_npo"] + eps2 * record["helpful_nll"]
                                                + eps3 * record["utility_kl"], rel=1e-6)
    assert log[0]["harm_npo"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)  # step 0: pi_theta = pi_ref
    assert log[0]["utility_kl"] == 0.0
    for change in (["--harm-loss", "ascent"], ["--npo-beta", "0.2"]):
        with pytest.raises(OptionError, match=f"{change[0]} .* in the run"):
            train.read_command_line(["--out", str(out), "--resume", "--max-steps", "3", *change])


def test_npo_options_that_would_change_nothing_are_refused(tmp_path):
    with pytest.raises(OptionError, match="--mode sft has no harm term"):
        train.read_command_line(["--mode", "sft", "--harm-loss", "npo", "--out", str(tmp_path / "a")])
    with pytest.raises(OptionError, match="--npo-beta 0.5 is NPO's beta.*--harm-loss ascent.*add --harm-loss npo"):
        train.read_command_line(["--npo-beta", "0.5", "--out", str(tmp_path / "b")])
    with pytest.raises(OptionError, match=r"none \(--mode sft\)"):
        train.read_command_line(["--mode", "sft", "--npo-beta", "0.5", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit):  # argparse: beta must be > 0
        train.read_command_line(["--harm-loss", "npo", "--npo-beta", "0", "--out", str(tmp_path / "d")])
    assert not any(tmp_path.iterdir())
