"""The training step reads nothing back from its device but the term means it returns for the log.

On an accelerator every read of a device tensor's data (a number, a data-dependent shape) makes the host wait for the
device. Which ops do that does not depend on the device, so benchmarks/host_syncs.py counts them on a CPU: first the
counter itself (it sees each kind of read, and nothing else), then one `unlearning_backward` call and the step's
bookkeeping on batches made as train.py makes them (collate_for_training, on the host), and last the same step
against the way it was computed before the positions were found on the host (boolean masks on the device, the
decoder checking the padding, the loss op finding its rows): equal bit for bit, loss and every gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.host_syncs import HostSyncCounter
from conftest import randomize_adapters
from ref import kernels as kernel_registry
from ref.data import IGNORE_INDEX, TrainingExample, collate_for_training
from ref.kernels.cross_entropy import LossInputError
from ref.llava import Llava
from ref.lora import LoraConfig, adapters_disabled, add_lora
from ref.losses import (Batch, LossWeights, Positions, StepCounts, TermBatches, add_token_sums, nll, step_shares,
                        tokens_in_step, unlearning_backward)
from ref.quant import QuantConfig, quantize_model
from weights_tools.make_tiny import build_tokenizer, random_model, tiny_config

WEIGHTS = LossWeights(harm=0.5, helpful=1.0, utility=2.0)
SHARES = {"harm_nll": 0.5, "helpful_nll": 1.5, "utility_kl": 0.75}


def syncs(run) -> list[str]:
    with HostSyncCounter() as counter:
        run()
    return counter.ops


# --- the counter ---------------------------------------------------------------------------------------------------


def test_the_counter_sees_each_kind_of_read_once():
    t, mask = torch.arange(6.0), torch.arange(6) > 2

    def mask_index_with_backward():
        x = t.clone().requires_grad_()
        x[mask].sum().backward()  # the gather, then its backward: an index_put with the same mask

    reads = {"item": lambda: t[0].item(), "int": lambda: int(t.sum()), "if": lambda: 1 if (t > 0).any() else 0,
             "tolist": t.tolist, "numpy": t.numpy, "nonzero": mask.nonzero, "mask index": lambda: t[mask],
             "masked_select": lambda: t.masked_select(mask), "equal": lambda: torch.equal(t, t)}
    for name, read in reads.items():
        assert len(syncs(read)) == 1, name
    assert syncs(mask_index_with_backward) == ["aten.index.Tensor", "aten.index_put.default"]


def test_the_counter_ignores_what_runs_on_the_device_alone():
    t, rows = torch.arange(12.0).reshape(4, 3), torch.tensor([0, 2])

    def work():
        x = t.clone().requires_grad_()
        y = x.index_select(0, rows) @ x.T + x[rows].sum()  # gathers by index tensors, forward and backward
        y.masked_fill(y > 3, 0.0).sum().backward()  # a mask used as values, not as an index
        torch.arange(5) * t.shape[0]

    assert syncs(work) == []


# --- the step --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state():
    return random_model(tiny_config(build_tokenizer(), text_layers=2), seed=11).state_dict()


def build(state, preset: str, base: str = "nf4") -> Llava:
    """The tiny LLaVA under `preset`, float32, dense or NF4 decoder linears, LoRA r=4 with random B."""
    model = Llava(tiny_config(build_tokenizer(), text_layers=2), kernel_registry.resolve(preset))
    model.load_state_dict(state)
    model.requires_grad_(False)
    if base == "nf4":
        quantize_model(model, QuantConfig())
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, alpha=8.0))
    randomize_adapters(model, 5, scale=0.05)
    return model.train()


def make_batch(model, seed: int, images: bool = False) -> Batch:
    """Three records of different lengths, collated as train.py's batches are (ref.batches.BatchMaker): BOS, a
    prompt (after one image's tokens when `images`), then a response that is labelled."""
    config, g = model.config, torch.Generator().manual_seed(seed)
    examples = []
    for prompt, response in ((3, 6), (5, 9), (2, 4)):
        image = [config.image_token_index] * config.image_seq_length if images else []
        words = torch.randint(3, config.image_token_index, (prompt + response,), generator=g).tolist()
        ids = [1] + image + words
        labels = [IGNORE_INDEX] * (1 + len(image) + prompt) + words[prompt:]
        pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, generator=g) if images else None
        examples.append(TrainingExample(ids, labels, pixels))
    return Batch(**collate_for_training(examples, config.pad_token_id, config.image_token_index))


def term_batches(model, images: bool) -> TermBatches:
    """Text harmful and helpful batches; the normal one with images when `images` (the multimodal baselines)."""
    return TermBatches(make_batch(model, 1), make_batch(model, 2), make_batch(model, 3, images))


def bookkeeping(model, batches: TermBatches) -> None:
    """What train.py does with a step's batches besides the backward: token counts, shares, sums, FLOPs."""
    step_tokens = tokens_in_step([batches])
    step_shares(batches, step_tokens)
    add_token_sums({}, {"harm_nll": 1.0, "helpful_nll": 1.0, "utility_kl": 1.0}, batches)
    StepCounts().add(model, batches)


@pytest.mark.parametrize("preset,images,checkpointing", [("reference", False, False), ("fast", False, False),
                                                         ("fast", True, False), ("fast", False, True)],
                         ids=["reference", "fast", "fast-images", "fast-checkpointing"])
def test_one_step_reads_the_device_once(state, preset, images, checkpointing):
    """All three terms forward and backward: one synchronisation, the read of the term means the call returns (the
    code before this test read the device 26 times under `reference` and 28 under `fast`). The step's bookkeeping
    reads it never."""
    model = build(state, preset)
    model.language_model.gradient_checkpointing = checkpointing
    batches = term_batches(model, images)
    off = lambda: adapters_disabled(model)  # noqa: E731
    step = syncs(lambda: unlearning_backward(model, batches.harmful, batches.helpful, batches.normal, WEIGHTS,
                                             model.kernels, off, SHARES))
    assert step == ["Tensor.tolist"]
    assert syncs(lambda: bookkeeping(model, batches)) == []


def test_the_model_reads_the_device_only_for_what_it_is_not_told(state):
    """Without the batch's host facts the decoder checks the padding and the embedding counts the image tokens (one
    read each, every forward); told them, neither reads."""
    model = build(state, "fast")
    batch = make_batch(model, 1)
    with torch.no_grad():
        unaware = syncs(lambda: model.hidden_states(batch.input_ids, attention_mask=batch.attention_mask))
        told = syncs(lambda: model.hidden_states(batch.input_ids, attention_mask=batch.attention_mask,
                                                 right_padded=True, image_tokens=0))
    assert unaware == ["aten._local_scalar_dense.default"] * 2 and told == []


# --- the same numbers as before --------------------------------------------------------------------------------------


def masked_response_hidden(model, batch: Batch, features):
    """The gather as it was: the decoder checks the padding and counts image tokens itself, boolean masks pick the
    positions that predict response tokens."""
    hidden = model.hidden_states(batch.input_ids, attention_mask=batch.attention_mask, image_features=features)
    targets = batch.labels[:, 1:]  # (B, T - 1)
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]  # (N, D), (N,)


def masked_step(model, batches: TermBatches) -> dict[str, float]:
    """unlearning_backward as it was computed before the positions were found on the host: the same loss ops, in
    their checking mode (they look for ignored rows and check the ids on the device)."""
    def features(batch):
        if batch.pixel_values is None:
            return None
        with torch.no_grad():
            return model.image_features(batch.pixel_values)

    weight, means = model.lm_head.weight, {}
    for name, coefficient, batch in (("harm_nll", -WEIGHTS.harm, batches.harmful),
                                     ("helpful_nll", WEIGHTS.helpful, batches.helpful)):
        hidden, targets = masked_response_hidden(model, batch, features(batch))
        means[name] = model.kernels.linear_cross_entropy(hidden, weight, targets)
        (coefficient * (means[name] * SHARES[name])).backward()
    image_features = features(batches.normal)
    with torch.no_grad(), adapters_disabled(model):
        ref_hidden, _ = masked_response_hidden(model, batches.normal, image_features)
    hidden, _ = masked_response_hidden(model, batches.normal, image_features)
    means["utility_kl"] = model.kernels.linear_kl(hidden, ref_hidden, weight)
    (WEIGHTS.utility * (means["utility_kl"] * SHARES["utility_kl"])).backward()
    return {name: mean.item() for name, mean in means.items()}


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("preset,images", [("reference", False), ("fast", False), ("reference", True),
                                           ("fast", True)], ids=["reference", "fast", "reference-images",
                                                                 "fast-images"])
def test_the_step_computes_what_the_masked_gather_computed_bit_for_bit(state, preset, images, base):
    results = []
    for step in (masked_step, None):
        model = build(state, preset, base)
        batches = term_batches(model, images)
        if step is None:
            means = unlearning_backward(model, batches.harmful, batches.helpful, batches.normal, WEIGHTS,
                                        model.kernels, lambda: adapters_disabled(model), SHARES)
        else:
            means = step(model, batches)
        results.append((means, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want_means, want), (got_means, got) = results
    assert got_means == want_means and len(got_means) == 3
    assert got.keys() == want.keys() and len(want) > 0
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert all(g.abs().sum() > 0 for g in got.values())  # every adapter got a gradient: the comparison means something


# --- what the host finds ---------------------------------------------------------------------------------------------


def test_positions_are_found_on_the_host_in_reading_order():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 9, 4, -100, -100]])
    positions = Positions.of(mask, labels)
    # position t predicts label t + 1: row 0 t = 1, 2; row 1 t = 0, 1 (flat b * 5 + t)
    assert positions.response.tolist() == [1, 2, 5, 6] and positions.targets.tolist() == [7, 8, 9, 4]
    assert positions.response_tokens == 4 and positions.tokens == 7 and positions.target_range == (4, 9)
    assert positions.right_padded
    assert not Positions.of(torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.full((2, 3), -100)).right_padded
    assert not Positions.of(torch.tensor([[1, 0, 1]]), torch.full((1, 3), -100)).right_padded  # a hole
    nothing = Positions.of(torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), -100))
    assert nothing.response_tokens == 0 and nothing.target_range is None


def test_a_batch_keeps_its_positions_and_cannot_change_under_them():
    batch = Batch(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[-100, 6, 7]]))
    moved = batch.to(torch.device("cpu"))
    assert moved.positions.response.tolist() == [0, 1] and moved.response_tokens == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.labels = torch.full((1, 3), -100)


def test_collate_counts_image_tokens_on_the_host():
    a = TrainingExample(input_ids=[1, 9, 9, 5, 2], labels=[-100, -100, -100, 5, 2])
    b = TrainingExample(input_ids=[1, 9, 9, 9, 9, 8], labels=[-100] * 5 + [8])
    assert collate_for_training([a, b], pad_id=0, image_token_id=9)["image_tokens"] == 6
    assert "image_tokens" not in collate_for_training([a, b], pad_id=0)


def test_nll_refuses_a_response_token_outside_the_vocabulary_before_any_forward(state):
    """The ids are checked on the host (the loss op is told they were, and checks nothing on the device)."""
    model = build(state, "fast")
    vocab = model.lm_head.weight.shape[0]
    batch = Batch(torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[-100, 5, vocab]]))
    with pytest.raises(LossInputError, match=f"target id {vocab} outside the vocabulary"):
        nll(model, batch, model.kernels)
