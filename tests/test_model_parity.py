"""Our LLaVA against transformers' LlavaForConditionalGeneration on the same tiny random weights (float32).

The weights go from the transformers model to ours through a plain name mapping written here, not through our loader,
so a loader bug cannot hide a model bug (the loader has its own tests, and one end-to-end test below).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (tests/requirements.txt)")

from ref.config import parse_llava_hf  # noqa: E402
from ref.llava import Llava  # noqa: E402

IMAGE_TOKEN, PAD_TOKEN, VOCAB = 126, 127, 128

CONFIGS = {
    # grouped-query attention (4 query heads share 2 key/value heads), the LLaVA-1.5 defaults otherwise
    "gqa": dict(text=dict(num_key_value_heads=2), vision=dict(image_size=30, patch_size=6), layer=-2, select="default"),
    # the last vision layer and the CLS token kept ("full"), plain multi-head attention
    "last_layer_full": dict(text=dict(num_key_value_heads=4), vision=dict(image_size=30, patch_size=6), layer=-1,
                            select="full"),
    # an image size the patch does not divide: the convolution drops the remainder
    "odd_image": dict(text=dict(num_key_value_heads=4, rope_theta=500.0), vision=dict(image_size=29, patch_size=6),
                      layer=-2, select="default"),
}


def make_hf_model(name: str, seed: int = 0):
    spec = CONFIGS[name]
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
                                    **spec["text"])
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=4, **spec["vision"])
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                                      pad_token_id=PAD_TOKEN, vision_feature_layer=spec["layer"],
                                      vision_feature_select_strategy=spec["select"])
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    # Our reference attention is the textbook formula, which is transformers' "eager" path; its default "sdpa" path
    # differs from eager by float32 rounding (about 1e-5 on these logits), ours from eager by nothing.
    model.set_attn_implementation("eager")
    # transformers initialises some weights to constants (norms to 1, biases to 0): randomise everything so that a
    # mix-up between two same-shaped tensors cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale_around_one = "norm" in name and name.endswith("weight")  # norm gains near 1 keep activations sane
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if scale_around_one else 0.0))
    return model


def ours_from_hf(hf_model) -> Llava:
    config = parse_llava_hf(hf_model.config.to_dict(), "test config")
    model = Llava(config).eval()
    # transformers 5.x in-memory names are ours with a leading "model." (lm_head aside).
    state = {name.removeprefix("model."): tensor for name, tensor in hf_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def prompt_ids(n_text: int, n_images: int, seq_len: int, seed: int) -> list[int]:
    """BOS, some text, each image as seq_len image tokens, more text."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, IMAGE_TOKEN, (n_text,), generator=g).tolist()
    ids = [1] + words[: n_text // 2]
    for _ in range(n_images):
        ids += [IMAGE_TOKEN] * seq_len + words[:3]
    return ids + words[n_text // 2:]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD_TOKEN] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pixels(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    hf = make_hf_model(request.param)
    return hf, ours_from_hf(hf)


@torch.no_grad()
def test_text_only_logits(pair):
    hf, ours = pair
    ids = torch.tensor([prompt_ids(17, 0, 0, seed=1)])
    torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits)


@torch.no_grad()
@pytest.mark.parametrize("n_text, n_images, seed", [(9, 1, 2), (8, 2, 9)], ids=["one_image", "two_images"])
def test_image_prompt_logits(pair, n_text, n_images, seed):
    hf, ours = pair
    ids = torch.tensor([prompt_ids(n_text, n_images, ours.config.image_seq_length, seed=seed)])
    pv = pixels(n_images, ours.config.vision.image_size, seed=seed + 1)
    torch.testing.assert_close(ours(ids, pixel_values=pv), hf(input_ids=ids, pixel_values=pv).logits)


@torch.no_grad()
@pytest.mark.parametrize("rows, seed", [(((6, 1), (21, 1)), 4), (((12, 0), (7, 1)), 11)],
                         ids=["two_image_rows", "text_and_image_rows"])
def test_left_padded_batch_logits(pair, rows, seed):
    """Rows of different lengths and image counts, (text tokens, images) each; compared on real positions.

    transformers' forward numbers positions 0..T-1 whatever the padding; generation (and our default) counts real
    tokens only, so we pass those position ids to transformers. Padding positions attend to nothing real and their
    outputs are meaningless in both implementations, so they are left out of the comparison.
    """
    hf, ours = pair
    seq = ours.config.image_seq_length
    ids, mask = left_pad([prompt_ids(n_text, n_images, seq, seed=seed + i)
                          for i, (n_text, n_images) in enumerate(rows)])
    pv = pixels(sum(n for _, n in rows), ours.config.vision.image_size, seed=seed + len(rows))
    got = ours(ids, pixel_values=pv, attention_mask=mask)
    want = hf(input_ids=ids, pixel_values=pv, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real])


@torch.no_grad()
def test_left_padding_does_not_change_a_row(pair):
    _, ours = pair
    short, long = prompt_ids(5, 0, 0, seed=7), prompt_ids(19, 0, 0, seed=8)
    ids, mask = left_pad([short, long])
    alone = ours(torch.tensor([short]))
    torch.testing.assert_close(ours(ids, attention_mask=mask)[0, -len(short):], alone[0])


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_generation_matches(pair, use_cache):
    hf, ours = pair
    seq = ours.config.image_seq_length
    ids, mask = left_pad([prompt_ids(5, 1, seq, seed=14), prompt_ids(13, 1, seq, seed=15)])
    pv = pixels(2, ours.config.vision.image_size, seed=16)
    # Our generate() never emits the image token (it would stand for an image that does not exist); tell
    # transformers the same.
    want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=20, do_sample=False,
                       eos_token_id=2, pad_token_id=PAD_TOKEN, suppress_tokens=[IMAGE_TOKEN])[:, ids.shape[1]:]
    got = ours.generate(ids, attention_mask=mask, pixel_values=pv, max_new_tokens=20, eos_token_id=2,
                        pad_token_id=PAD_TOKEN, use_cache=use_cache).sequences
    assert got.tolist() == want.tolist()


@torch.no_grad()
def test_vision_hidden_states_match_clip_vision_model(pair):
    hf, ours = pair
    clip = transformers.CLIPVisionModel(hf.config.vision_config).eval()
    clip.load_state_dict(hf.model.vision_tower.state_dict())
    pv = pixels(2, ours.config.vision.image_size, seed=17)
    want = clip(pixel_values=pv, output_hidden_states=True).hidden_states
    got = ours.vision_tower.hidden_states(pv)
    assert len(got) == len(want) == ours.config.vision.num_hidden_layers + 1
    for layer, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, msg=lambda m, layer=layer: f"hidden state {layer}: {m}")


@torch.no_grad()
def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(pair):
    _, ours = pair
    ids, mask = left_pad([prompt_ids(5, 0, 0, seed=18), prompt_ids(9, 0, 0, seed=19)])
    sample = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=-1)
    first = ours.generate(ids, seed=7, **sample).sequences
    assert torch.equal(first, ours.generate(ids, seed=7, **sample).sequences)
    assert not torch.equal(first, ours.generate(ids, seed=8, **sample).sequences)  # 24 draws at temperature 1.5
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=-1).sequences
    nucleus_of_one = ours.generate(ids, seed=7, top_p=1e-6, **{**sample, "temperature": 1.0}).sequences
    assert torch.equal(nucleus_of_one, greedy)


def test_bad_inputs_raise_clear_errors(pair):
    _, ours = pair
    limit = ours.config.text.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ours(torch.ones(1, limit + 1, dtype=torch.long))
    seq = ours.config.image_seq_length
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(torch.tensor([prompt_ids(4, 1, seq, seed=20)]))
    with pytest.raises(ValueError, match="image tokens but 2 image"):
        ours(torch.tensor([prompt_ids(4, 1, seq, seed=21)]), pixel_values=pixels(2, ours.config.vision.image_size, 22))
    with pytest.raises(ValueError, match="exceed the model's context"):
        ours.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=limit)
    right_padded = torch.tensor([[1, 5, 6], [1, 5, PAD_TOKEN]])
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(right_padded, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2)
