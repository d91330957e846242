"""The `fast` preset (train.py's default on every model but the toy) against the `reference` one, op by op and on a
whole model, in float32 and bfloat16, forward and backward; and the per-term backward train.py takes against one
backward through the total.

The ops' own comparisons with float64 are in test_kernels.py and test_kernel_lora.py; here the question is whether a
model built with `fast` computes what the same model built with `reference` computes: the losses, the logits at
every real position, and every adapter's gradient, on right-padded batches (the training layout, where `fast` runs
causal attention without the mask) and on left-padded ones (generation's, where it keeps the mask).
"""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_adapters
from ref import kernels as kernel_registry
from ref.data import IGNORE_INDEX
from ref.kernels.attention import attention, attention_sdpa
from ref.llama import causal_mask, is_right_padded
from ref.llava import Llava
from ref.lora import LoraConfig, adapters_disabled, add_lora
from ref.losses import Batch, LossWeights, kl_to_original, nll, unlearning_backward, unlearning_loss
from ref.quant import QuantConfig, quantize_model
from weights_tools.make_tiny import build_tokenizer, random_model, tiny_config

DTYPES = [torch.float32, torch.bfloat16]
# bfloat16 keeps 8 bits of mantissa: two orders of computation agree to about 1e-2 relative after a few layers.
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.fixture(scope="module")
def state():
    """One random tiny LLaVA's weights (2 decoder layers), shared by every model built here."""
    return random_model(tiny_config(build_tokenizer(), text_layers=2), seed=11).state_dict()


def build(state, preset: str, dtype: torch.dtype, base: str, adapter_seed: int | None = 5) -> Llava:
    """The same model under `preset`: dense or NF4 decoder linears, LoRA r=4 (random B unless adapter_seed is None)."""
    config = tiny_config(build_tokenizer(), text_layers=2)
    model = Llava(config, kernel_registry.resolve(preset))
    model.load_state_dict(state)
    model.to(dtype).requires_grad_(False)
    if base == "nf4":
        quantize_model(model, QuantConfig())
    torch.manual_seed(0)  # LoRA's A comes from the global generator: the same A under both presets
    add_lora(model, LoraConfig(r=4, alpha=8.0))
    if adapter_seed is not None:
        randomize_adapters(model, adapter_seed, scale=0.05)
    return model.train()


def right_padded(model, lengths=(9, 14, 5), seed=0) -> Batch:
    """Rows of real tokens then padding; labels on everything after a 3-token prompt."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), model.config.pad_token_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, model.config.image_token_index, (n,), generator=g)
        mask[row, :n] = 1
        labels[row, 3:n] = ids[row, 3:n]
    return Batch(ids, mask, labels)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_close_dicts(got: dict, want: dict, **tolerance) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name, **tolerance)


# --- the attention op under the `causal` promise -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sdpa_with_causal_promise_matches_reference_with_mask_at_real_queries(dtype):
    """On right-padded rows the sdpa op drops the mask for plain causal attention: outputs and input gradients at
    every real query equal the reference's (which applies the padding mask); padding queries are not compared."""
    g = torch.Generator().manual_seed(3)
    b, h, t, d = 2, 4, 7, 8
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    assert is_right_padded(attention_mask)
    mask = causal_mask(attention_mask, t, dtype)
    real = attention_mask.bool()[:, None, :, None].expand(b, h, t, d)  # (B, H, T, d): real query positions
    upstream = torch.randn(b, h, t, d, generator=g).to(dtype) * real  # no gradient flows from padding queries
    want = attention(q, k, v, mask, d**-0.5)
    want_grads = torch.autograd.grad(want, (q, k, v), upstream)
    got = attention_sdpa(q, k, v, mask, d**-0.5, causal=True)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[real], want[real], **tolerance)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, **tolerance)


def spied_model(state) -> tuple[Llava, list[bool]]:
    """A two-layer fast model whose attention records the `causal` flag it is told (a spy in this test's own kernel
    table), and the list it records into."""
    calls = []
    kernels = kernel_registry.resolve("fast")

    def spy(q, k, v, mask, scale, causal=False):
        calls.append(causal)
        return attention_sdpa(q, k, v, mask, scale, causal)

    kernels.attention = spy
    model = Llava(tiny_config(build_tokenizer(), text_layers=2), kernels)
    model.load_state_dict(state)
    return model, calls


def test_the_decoder_gives_the_causal_promise_on_right_padded_batches_only(state):
    """Every attention call of a training batch (right padded, no cache) is told `causal`; a left-padded prompt and
    generation's cached steps are not. (A spy in this test's own kernel table records the flag.)"""
    model, calls = spied_model(state)
    batch = right_padded(model)
    nll(model, batch, model.kernels)
    assert calls == [True, True]  # two decoder layers
    calls.clear()
    ids, mask = torch.tensor([[0, 0, 5, 9], [4, 8, 15, 16]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=-1, pad_token_id=0)
    assert calls == [False] * 6  # the left-padded prompt, then two cached steps, per layer


def test_the_decoder_takes_the_callers_word_on_padding_and_checks_without_it(state):
    """right_padded=True or False is what the attention is told (a training batch's padding, found on the host by
    ref.losses.Positions); None: the decoder checks the mask itself, right padding causal, left padding not."""
    model, calls = spied_model(state)
    batch = right_padded(model)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    cases = ((batch.attention_mask, None, True), (batch.attention_mask, False, False),
             (batch.attention_mask, True, True), (left, None, False))
    with torch.no_grad():
        for mask, told, causal in cases:
            calls.clear()
            model.hidden_states(torch.full(mask.shape, 5), attention_mask=mask, right_padded=told)
            assert calls == [causal, causal], (told, mask)


def test_right_padding_is_recognised_and_left_padding_is_not():
    assert is_right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not is_right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding: the mask is needed
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))  # a hole


# --- the whole model ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_fast_model_matches_reference_losses_and_adapter_gradients(state, dtype, base):
    """The NLL and the KL, and every adapter's gradient of each, under `fast` and under `reference`."""
    results = {}
    for preset in ("reference", "fast"):
        model = build(state, preset, dtype, base)
        kernels = model.kernels
        batch = right_padded(model)
        terms = {}
        for name, loss in (("nll", lambda: nll(model, batch, kernels)),
                           ("kl", lambda: kl_to_original(model, batch, kernels, lambda: adapters_disabled(model)))):
            model.zero_grad(set_to_none=True)
            value = loss()
            value.backward()
            terms[name] = (value.detach().float(), gradients(model))
        results[preset] = terms
    for name in ("nll", "kl"):
        (want, want_grads), (got, got_grads) = results["reference"][name], results["fast"][name]
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
        scale = max(g.abs().max() for g in want_grads.values())  # compare gradients relative to their size
        assert_close_dicts({n: g / scale for n, g in got_grads.items()},
                           {n: g / scale for n, g in want_grads.items()}, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fast_model_matches_reference_logits_on_left_padded_prompts(state, dtype):
    """Generation's layout (left padding, no causal shortcut): logits at every real position agree."""
    ids = torch.tensor([[0, 0, 5, 9, 12, 7], [4, 8, 15, 16, 23, 42]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    logits = {}
    for preset in ("reference", "fast"):
        model = build(state, preset, dtype, "nf4").eval()
        with torch.no_grad():
            logits[preset] = model(ids, attention_mask=mask).float()[mask.bool()]  # (real tokens, V)
    torch.testing.assert_close(logits["fast"], logits["reference"], **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fast_kl_is_exactly_zero_at_step_zero_on_a_4bit_base(state, dtype):
    """The fused LoRA op computes the base through the base module's own forward, as the adapters-off pass does: with
    B = 0 the two passes are the same computation, so the KL is 0 exactly, not merely small."""
    model = build(state, "fast", dtype, "nf4", adapter_seed=None)
    kl = kl_to_original(model, right_padded(model), model.kernels, lambda: adapters_disabled(model))
    assert kl.item() == 0.0


# --- one term's graph at a time ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["reference", "fast"])
def test_per_term_backward_equals_one_backward_through_the_total(state, preset):
    """unlearning_backward (train.py's step) accumulates exactly the gradient of unlearning_loss's total, and reports
    the same term means."""
    weights = LossWeights(harm=0.5, helpful=1.0, utility=2.0)
    shares = {"harm_nll": 0.5, "helpful_nll": 1.5, "utility_kl": 0.75}
    results = []
    for per_term in (False, True):
        model = build(state, preset, torch.float32, "nf4")
        batches = [right_padded(model, seed=s) for s in (1, 2, 3)]
        off = lambda: adapters_disabled(model)  # noqa: E731
        if per_term:
            means = unlearning_backward(model, *batches, weights, model.kernels, off, shares)
        else:
            total, means = unlearning_loss(model, *batches, weights, model.kernels, off, shares)
            total.backward()
        results.append((means, gradients(model)))
    (means_total, grads_total), (means_each, grads_each) = results
    assert means_each == pytest.approx(means_total, rel=1e-6)
    assert_close_dicts(grads_each, grads_total, rtol=1e-5, atol=1e-7)


def test_per_term_backward_keeps_one_terms_activations_at_a_time(state):
    """The saved tensors alive at once: one backward through the total keeps all three terms' graphs; the per-term
    step never more than the largest single term's (counted through autograd's saved-tensor hooks)."""
    model = build(state, "reference", torch.float32, "nf4")
    batches = [right_padded(model, seed=s) for s in (1, 2, 3)]
    off = lambda: adapters_disabled(model)  # noqa: E731
    weights = LossWeights()

    def peak_saved_bytes(run) -> int:
        alive, peak = {}, [0]

        def pack(tensor):
            alive[id(tensor)] = tensor.untyped_storage().nbytes()
            peak[0] = max(peak[0], sum(alive.values()))
            return id(tensor), tensor

        def unpack(packed):
            key, tensor = packed
            alive.pop(key, None)  # unpacked in backward: counted as released (an upper bound on what is alive)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            run()
        return peak[0]

    def total_step():
        total, _ = unlearning_loss(model, *batches, weights, model.kernels, off)
        total.backward()

    one_backward = peak_saved_bytes(total_step)
    per_term = peak_saved_bytes(lambda: unlearning_backward(model, *batches, weights, model.kernels, off))
    assert per_term < 0.5 * one_backward  # three similar terms: about a third
