"""The three unlearning loss terms against float64 computations written out here from full logits.

The losses under test gather hidden states at response positions and go through the kernel ops; the references below
run the whole float64 model to (B, T, vocab) logits and apply the textbook formulas, so they share no loss code.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_adapters
from ref import kernels as kernel_registry
from ref.data import IGNORE_INDEX
from ref.losses import Batch, LossWeights, kl_to_original, nll, total_loss, unlearning_loss
from ref.lora import LoraConfig, add_lora, adapters_disabled
from weights_tools.make_tiny import build_tokenizer, random_model, tiny_config

KERNEL_PRESETS = ["reference", "chunked"]


@pytest.fixture(scope="module")
def base_model():
    return random_model(tiny_config(build_tokenizer(), text_layers=2), seed=3)


def lora_model(base, seed: int | None):
    """The base with LoRA on every decoder linear; B drawn at random when `seed` is given (else 0, as at step 0)."""
    model = copy.deepcopy(base)
    add_lora(model, LoraConfig(r=4, alpha=8.0))
    if seed is not None:
        randomize_adapters(model, seed, scale=0.05)
    return model


def make_batch(model, lengths=(9, 14), prompt_lengths=(4, 6), seed=0) -> Batch:
    """Right-padded random token rows; labels = the token on response positions (after the prompt), IGNORE elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.image_token_index  # ordinary tokens only
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), model.config.pad_token_id)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    for row, (n, n_prompt) in enumerate(zip(lengths, prompt_lengths)):
        input_ids[row, :n] = torch.randint(3, vocab, (n,), generator=generator)
        attention_mask[row, :n] = 1
        labels[row, n_prompt:n] = input_ids[row, n_prompt:n]
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def float64_response_logprobs(model, batch: Batch):
    """log softmax of the float64 model's full logits, at the positions that predict response tokens."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(batch.input_ids, attention_mask=batch.attention_mask)  # (B, T, V) float64
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return logprobs[keep], targets[keep]  # (N, V), (N,)


@pytest.mark.parametrize("preset", KERNEL_PRESETS)
def test_nll_equals_float64_mean_per_token(base_model, preset):
    model = lora_model(base_model, seed=1)
    batch = make_batch(model)
    logprobs, targets = float64_response_logprobs(model, batch)
    expected = -logprobs.gather(1, targets[:, None]).mean()
    got = nll(model, batch, kernel_registry.resolve(preset))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", KERNEL_PRESETS)
def test_kl_equals_float64_forward_kl_from_the_adapter_free_model(base_model, preset):
    model = lora_model(base_model, seed=2)
    batch = make_batch(model, seed=1)
    current, _ = float64_response_logprobs(model, batch)
    with adapters_disabled(model):
        original, _ = float64_response_logprobs(model, batch)
    expected = (original.exp() * (original - current)).sum(-1).mean()  # KL(p_orig || p_cur) per token, averaged
    assert expected > 1e-4  # the adapters really moved the model, so the comparison means something
    got = kl_to_original(model, batch, kernel_registry.resolve(preset), lambda: adapters_disabled(model))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("preset", KERNEL_PRESETS)
def test_kl_is_exactly_zero_at_step_zero(base_model, preset):
    model = lora_model(base_model, seed=None)  # fresh adapters: B = 0
    kl = kl_to_original(model, make_batch(model, seed=2), kernel_registry.resolve(preset),
                        lambda: adapters_disabled(model))
    assert kl.item() == 0.0


def test_padding_tokens_do_not_move_any_term(base_model):
    """Right padding (attention_mask 0, label IGNORE) may hold anything: every term stays bit-for-bit the same."""
    model = lora_model(base_model, seed=3)
    kernels = kernel_registry.resolve("reference")
    batch = make_batch(model, seed=3)
    garbage = batch.input_ids.clone()
    padding = batch.attention_mask == 0
    garbage[padding] = torch.randint(3, model.config.image_token_index, (int(padding.sum()),),
                                     generator=torch.Generator().manual_seed(9))
    changed = Batch(garbage, batch.attention_mask, batch.labels)
    off = lambda: adapters_disabled(model)  # noqa: E731
    assert nll(model, batch, kernels).item() == nll(model, changed, kernels).item()
    assert kl_to_original(model, batch, kernels, off).item() == kl_to_original(model, changed, kernels, off).item()


def test_prompt_labels_are_not_scored(base_model):
    """Masking one more prompt token out of the labels changes the NLL; unmasked tokens are the only ones scored."""
    model = lora_model(base_model, seed=4)
    kernels = kernel_registry.resolve("reference")
    batch = make_batch(model, seed=4)
    logprobs, targets = float64_response_logprobs(model, batch)
    per_token = -logprobs.gather(1, targets[:, None]).squeeze(1)
    fewer = batch.labels.clone()
    fewer[0, 4] = IGNORE_INDEX  # the first response token of row 0 becomes "prompt"
    got = nll(model, Batch(batch.input_ids, batch.attention_mask, fewer), kernels)
    torch.testing.assert_close(got.double(), per_token[1:].mean(), rtol=1e-5, atol=1e-6)


def test_total_combines_the_terms_with_the_minus_sign_on_harm(base_model):
    model = lora_model(base_model, seed=5)
    kernels = kernel_registry.resolve("reference")
    harmful, helpful, normal = make_batch(model, seed=5), make_batch(model, seed=6), make_batch(model, seed=7)
    off = lambda: adapters_disabled(model)  # noqa: E731
    weights = LossWeights(harm=0.5, helpful=1.0, utility=2.0)
    total, terms = unlearning_loss(model, harmful, helpful, normal, weights, kernels, off)
    expected = (-0.5 * nll(model, harmful, kernels) + 1.0 * nll(model, helpful, kernels)
                + 2.0 * kl_to_original(model, normal, kernels, off))
    torch.testing.assert_close(total, expected)
    assert set(terms) == {"harm_nll", "helpful_nll", "utility_kl"}
    assert total_loss(terms, weights) == pytest.approx(float(expected.detach()), rel=1e-6)
    shares = {"harm_nll": 0.25, "helpful_nll": 2.0, "utility_kl": 0.5}  # each term's mean weighed by its share
    shared, _ = unlearning_loss(model, harmful, helpful, normal, weights, kernels, off, shares)
    torch.testing.assert_close(shared, -0.5 * 0.25 * nll(model, harmful, kernels) + 2.0 * nll(model, helpful, kernels)
                               + 2.0 * 0.5 * kl_to_original(model, normal, kernels, off))


def test_one_step_of_pure_harm_term_raises_the_harmful_nll(base_model):
    """Gradient ascent: minimising -L_harm must make the harmful responses less likely."""
    model = lora_model(base_model, seed=6)
    kernels = kernel_registry.resolve("reference")
    harmful = make_batch(model, seed=8)
    before = nll(model, harmful, kernels).item()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05)
    total, _ = unlearning_loss(model, harmful, None, None, LossWeights(harm=1.0, helpful=0.0, utility=0.0), kernels,
                               lambda: adapters_disabled(model))
    total.backward()
    optimizer.step()
    assert nll(model, harmful, kernels).item() > before


def test_activation_checkpointing_gives_the_same_loss_and_gradients(base_model):
    """Recomputing each decoder layer in backward must change memory, not results."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # LoRA's A is drawn from the global generator: the same A both times
        model = lora_model(base_model, seed=7).train()
        model.language_model.gradient_checkpointing = checkpointing
        calls = []
        model.language_model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        loss = nll(model, make_batch(model, seed=9), kernel_registry.resolve("reference"))
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing reruns the layer in backward
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
