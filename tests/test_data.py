"""ref/data.py against independent references.

- Tokenization and prompts with the real LLaMA-2 vocabulary (../shared/assets/llama2_tokenizer.model, converted to a
  tokenizer.json by transformers' slow->fast converter, `<image>` = 32000 and `<pad>` = 32001 added as llava-hf
  adds them): our ids equal transformers' tokenizer and LlavaProcessor, and the original LLaVA's
  `tokenizer_image_token` computed with sentencepiece directly.
- Image preprocessing equal to transformers' PIL CLIP / LLaVA image processors; pad-to-square against numpy.
- Label masks and padding on a hand-made word-level tokenizer whose ids can be written down by hand.
- Bad input: clear errors naming the file or the problem.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from PIL import Image

from conftest import SHARED
from ref.config import ConfigError, load_config, read_json
from ref.data import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    PAD_TO_SQUARE_FILL,
    DataError,
    ImageError,
    PromptTooLongError,
    TextTokenizer,
    TokenizerError,
    TrainingExample,
    build_prompt,
    build_training_example,
    check_token_ids,
    collate_for_generation,
    collate_for_training,
    expand_image_tokens,
    load_image,
    load_processor,
    load_tokenizer,
    pad_to_square,
    preprocess_image,
    to_rgb,
    tokenize_prompt,
)

SPM_MODEL = SHARED / "assets" / "llama2_tokenizer.model"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

PROMPTS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "USER: How do I bake bread? ASSISTANT:",
    "USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:",
    "USER: <image>\nnaïve café – 東京 🙂 Ünïcödé? ASSISTANT:",
    "   leading spaces and  double  spaces\tand a tab",
    "USER: text with </s> inside and\n\nnewlines ASSISTANT:",
    VICUNA_SYSTEM + " USER: <image>\nDescribe the image. ASSISTANT:",
]


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: the real vocabulary as llava-hf ships it, and transformers' view of it


def _require_shared():
    if not SPM_MODEL.is_file():
        pytest.skip(f"../shared not found: {SPM_MODEL} is needed for tests with the real LLaMA-2 vocabulary")


@pytest.fixture(scope="module")
def llava_tokenizer_dirs(tmp_path_factory):
    """Two model folders holding a llava-hf tokenizer.json: "legacy" (SentencePiece's dummy prefix before every
    piece of text, also after special tokens: what LLaVA-1.5 was trained with) and "first" (prefix only at the
    start, transformers' `legacy=False`). Converted once per module (about 5 s)."""
    _require_shared()
    from transformers import LlamaTokenizer

    spm_dir = tmp_path_factory.mktemp("spm")
    shutil.copy(SPM_MODEL, spm_dir / "tokenizer.model")  # a temporary copy, outside the repository
    slow = LlamaTokenizer.from_pretrained(spm_dir, legacy=True, add_bos_token=True)  # converts to a fast tokenizer
    slow.add_tokens(["<image>"], special_tokens=True)  # llava-hf: 32000
    slow.add_special_tokens({"pad_token": "<pad>"})  # llava-hf: 32001
    legacy = tmp_path_factory.mktemp("llava_tok_legacy")
    slow.save_pretrained(legacy)
    first = tmp_path_factory.mktemp("llava_tok_first")
    shutil.copytree(legacy, first, dirs_exist_ok=True)
    raw = json.loads((first / "tokenizer.json").read_text())
    assert raw["pre_tokenizer"]["prepend_scheme"] == "always"
    raw["pre_tokenizer"]["prepend_scheme"] = "first"
    (first / "tokenizer.json").write_text(json.dumps(raw))
    return {"legacy": legacy, "first": first}


def _hf_tokenizer(folder: Path, legacy: bool):
    """transformers' LlamaTokenizer for the folder. transformers 5 rebuilds LLaMA's pre-tokenizer from the `legacy`
    flag instead of reading tokenizer.json's, so the flag must match the file for a like-for-like comparison."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, legacy=legacy, add_bos_token=True)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module", params=["legacy", "first"])
def tokenizer_pair(request, llava_tokenizer_dirs):
    folder = llava_tokenizer_dirs[request.param]
    return load_tokenizer(folder), _hf_tokenizer(folder, legacy=request.param == "legacy")


@pytest.fixture(scope="module")
def llava_model_dir(llava_tokenizer_dirs, tmp_path_factory):
    """A model folder with a llava-hf config.json written by transformers (CLIP 336/14 -> 576 image tokens, context
    2048) and the legacy tokenizer.json."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    folder = tmp_path_factory.mktemp("llava_model")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=336, patch_size=14),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                vocab_size=32064, max_position_embeddings=2048),
        image_token_index=32000, pad_token_id=32001,
    )
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llava_tokenizer_dirs["legacy"] / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def hf_llava_processor(llava_model_dir):
    """transformers' LlavaProcessor configured as llava-hf/llava-1.5-7b-hf's processor_config (CLIP 336, no pad)."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    # llava-hf's processor_config: patch 14, strategy "default", one additional (CLS) token -> 24 * 24 = 576 tokens
    return LlavaProcessor(image_processor=image_processor, tokenizer=_hf_tokenizer(llava_model_dir, legacy=True),
                          patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization with the real vocabulary


def test_special_token_ids_read_from_vocabulary(tokenizer_pair):
    ours, hf = tokenizer_pair
    assert (ours.bos_id, ours.eos_id, ours.image_token_id, ours.pad_id) == (1, 2, 32000, 32001)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.image_token_id == hf.convert_tokens_to_ids("<image>")
    assert ours.vocab_size == len(hf) == 32002


@pytest.mark.parametrize("text", PROMPTS)
def test_encode_and_decode_match_transformers(tokenizer_pair, text):
    ours, hf = tokenizer_pair
    assert ours.encode(text, add_bos=True) == hf(text).input_ids
    assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids
    ids = hf(text).input_ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_legacy_and_first_prefix_differ_after_image_token(llava_tokenizer_dirs):
    """The two tokenizer.json variants really are different (so the parametrised tests cover two behaviours): the
    legacy one puts SentencePiece's "▁" (29871) before the newline that follows <image>."""
    legacy = load_tokenizer(llava_tokenizer_dirs["legacy"]).encode("<image>\nHi")
    first = load_tokenizer(llava_tokenizer_dirs["first"]).encode("<image>\nHi")
    assert legacy[:3] == [32000, 29871, 13] and first[:2] == [32000, 13]


def test_vicuna_v1_ids_match_original_llava_tokenizer_image_token(llava_tokenizer_dirs):
    """Independent of transformers: the original LLaVA code splits the prompt at <image>, tokenizes each chunk with
    SentencePiece (which adds its dummy prefix to every chunk), drops each chunk's BOS but the first and joins them
    with the image id. The legacy tokenizer.json gives the same ids, with our image expansion on top."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(SPM_MODEL))
    prompt = build_prompt("What is unusual about this image?", num_images=1, prompt_format="vicuna_v1")
    expected = [1]
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            expected += [32000] * 5
        expected += sp.encode(chunk)
    ours = load_tokenizer(llava_tokenizer_dirs["legacy"])
    assert tokenize_prompt(ours, prompt, image_seq_length=5) == expected


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if "<image>" in p])
def test_processor_single_prompt_matches_llava_processor(llava_model_dir, hf_llava_processor, prompt):
    n_images = prompt.count("<image>")
    images = [_random_image(40 + 13 * i, 90 - 7 * i, seed=i) for i in range(n_images)]
    ours = load_processor(llava_model_dir)(prompt, images)
    theirs = hf_llava_processor(text=prompt, images=images, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert int((ours["input_ids"] == 32000).sum()) == 576 * n_images
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)


def test_processor_batch_is_left_padded_like_llava_processor(llava_model_dir, hf_llava_processor):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # 1, 0 and 2 images: different lengths
    images = [_random_image(50, 30, seed=1), _random_image(20, 70, seed=2), _random_image(64, 64, seed=3)]
    ours = load_processor(llava_model_dir)(prompts, images)
    theirs = hf_llava_processor(text=prompts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["input_ids"][1, 0] == 32001 and ours["attention_mask"][1, 0] == 0  # the short row is padded left
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)


def test_processor_text_only_prompt_matches_tokenizer(llava_model_dir):
    ours = load_processor(llava_model_dir)(PROMPTS[1])
    theirs = _hf_tokenizer(llava_model_dir, legacy=True)(PROMPTS[1], return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and "pixel_values" not in ours


@pytest.mark.parametrize("response", ["Sure, here is how to do it.", "I cannot help with that.", "1. First\n2. Then",
                                      "Ünïcödé ✓", "ok"])
@pytest.mark.parametrize("prompt_format", ["llava-hf", "vicuna_v1"])
def test_training_example_equals_joint_tokenization(tokenizer_pair, response, prompt_format):
    """Our split tokenization (prompt, then response, then EOS) equals transformers tokenizing the whole training
    text `prompt + " " + response + "</s>"` at once, for these responses; the prompt part equals the generation
    input exactly; labels cover the response and EOS only."""
    ours, hf = tokenizer_pair
    prompt = build_prompt("Tell me something.", num_images=1, prompt_format=prompt_format)
    example = build_training_example(ours, prompt, response, image_seq_length=3)
    joint = expand_image_tokens(hf(prompt + " " + response + "</s>").input_ids, 32000, 3)
    generation_input = expand_image_tokens(hf(prompt).input_ids, 32000, 3)
    assert example.input_ids == joint
    assert example.input_ids[: len(generation_input)] == generation_input
    n_prompt = len(generation_input)
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == joint[n_prompt:] and example.labels[-1] == 2


def test_training_example_drops_leading_space_of_response(tokenizer_pair):
    """The format already puts one space after "ASSISTANT:"; a response written with its own leading spaces gives
    the same ids as the joint text with a single space (otherwise SentencePiece would emit extra "▁" tokens)."""
    ours, hf = tokenizer_pair
    prompt = build_prompt("Hi?")
    example = build_training_example(ours, prompt, "   Sure thing.")
    assert example.input_ids == hf(prompt + " Sure thing.</s>").input_ids


# ---------------------------------------------------------------------------------------------------------------------
# Prompt formats (literal strings written out by hand)


def test_llava_hf_prompt_format():
    assert build_prompt("What is this?") == "USER: What is this? ASSISTANT:"
    assert build_prompt("What is this?", num_images=1) == "USER: <image>\nWhat is this? ASSISTANT:"
    assert build_prompt("Compare.", num_images=2) == "USER: <image>\n<image>\nCompare. ASSISTANT:"


def test_vicuna_v1_prompt_format_and_history():
    assert build_prompt("Q?", num_images=1, prompt_format="vicuna_v1") == (
        VICUNA_SYSTEM + " USER: <image>\nQ? ASSISTANT:")
    assert build_prompt("Q2?", num_images=1, prompt_format="vicuna_v1", history=[("Q1?", "A1.")]) == (
        VICUNA_SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT:")


def test_unknown_prompt_format_is_an_error():
    with pytest.raises(DataError, match="unknown prompt format 'alpaca'"):
        build_prompt("hi", prompt_format="alpaca")


# ---------------------------------------------------------------------------------------------------------------------
# Label masks and batching on a word-level tokenizer (ids written by hand)

WORDS = ["<unk>", "<s>", "</s>", "<image>", "<pad>", "USER:", "ASSISTANT:", "hi", "go", "away", "now"]


@pytest.fixture
def word_tokenizer(tmp_path):
    """Each word is one id (its index in WORDS), so expected ids can be written down."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    return load_tokenizer(tmp_path)


def test_label_mask_text_only(word_tokenizer):
    example = build_training_example(word_tokenizer, "USER: hi ASSISTANT:", "go away")
    #                      <s> USER: hi ASSISTANT:  go  away </s>
    assert example.input_ids == [1, 5, 7, 6, 8, 9, 2]
    assert example.labels == [-100, -100, -100, -100, 8, 9, 2]
    assert example.num_response_tokens == 3


def test_label_mask_with_image_tokens(word_tokenizer):
    example = build_training_example(word_tokenizer, "USER: <image> hi ASSISTANT:", "  go", image_seq_length=3)
    #                      <s> USER: <image> x 3  hi ASSISTANT: go </s>
    assert example.input_ids == [1, 5, 3, 3, 3, 7, 6, 8, 2]
    assert example.labels == [-100] * 7 + [8, 2]


def test_training_example_truncates_response_to_context(word_tokenizer):
    example = build_training_example(word_tokenizer, "USER: hi ASSISTANT:", "go away now", max_length=6)
    assert example.input_ids == [1, 5, 7, 6, 8, 9] and example.labels == [-100] * 4 + [8, 9]
    with pytest.raises(PromptTooLongError, match="no room for the response"):
        build_training_example(word_tokenizer, "USER: hi ASSISTANT:", "go", max_length=4)


def test_collate_for_training_pads_right(word_tokenizer):
    a = TrainingExample(input_ids=[1, 5, 8, 2], labels=[-100, -100, 8, 2])
    b = TrainingExample(input_ids=[1, 8], labels=[-100, 8], pixel_values=torch.zeros(2, 3, 4, 4))
    batch = collate_for_training([a, b], pad_id=word_tokenizer.pad_id)
    assert batch["input_ids"].tolist() == [[1, 5, 8, 2], [1, 8, 4, 4]]
    assert batch["labels"].tolist() == [[-100, -100, 8, 2], [-100, 8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert "pixel_values" not in collate_for_training([a], pad_id=4)


def test_collate_for_generation_pads_left():
    batch = collate_for_generation([[1, 5, 7], [1], [1, 7]], pad_id=4)
    assert batch["input_ids"].tolist() == [[1, 5, 7], [4, 4, 1], [4, 1, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_expand_image_tokens():
    assert expand_image_tokens([1, 9, 5, 9, 2], image_token_id=9, image_seq_length=2) == [1, 9, 9, 5, 9, 9, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Images against transformers' PIL image processors


IMAGES = {
    "wide": lambda: _random_image(61, 143, seed=1),
    "tall": lambda: _random_image(150, 47, seed=2),
    "small": lambda: _random_image(9, 13, seed=3),
    "square": lambda: _random_image(40, 40, seed=4),
    "rgba": lambda: _random_image(70, 52, mode="RGBA", seed=5),
    "gray": lambda: _random_image(33, 80, mode="L", seed=6),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("size", [336, 30])
def test_preprocess_image_matches_clip_image_processor(name, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = IMAGES[name]()
    reference = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    expected = reference(image, return_tensors="pt")["pixel_values"][0]
    ours = preprocess_image(image, image_size=size)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["wide", "tall", "rgba", "square"])
def test_pad_to_square_preprocess_matches_llava_image_processor(name):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image = IMAGES[name]()
    reference = LlavaImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, do_pad=True)
    expected = reference(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(preprocess_image(image, image_size=48, pad_square=True), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("height,width", [(3, 8), (8, 3), (4, 7), (5, 5)])
def test_pad_to_square_against_numpy_padding(height, width):
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    side = max(height, width)
    before_h, before_w = (side - height) // 2, (side - width) // 2
    expected = np.stack([
        np.pad(pixels[..., c], ((before_h, side - height - before_h), (before_w, side - width - before_w)),
               constant_values=fill)
        for c, fill in enumerate((122, 116, 104))
    ], axis=-1)
    assert PAD_TO_SQUARE_FILL == (122, 116, 104)
    np.testing.assert_array_equal(pad_to_square(pixels), expected)


def test_load_image_converts_from_file(tmp_path):
    path = tmp_path / "picture.png"
    _random_image(20, 30, mode="RGBA").save(path)
    from_file = preprocess_image(path, image_size=16)
    torch.testing.assert_close(from_file, preprocess_image(load_image(path), image_size=16), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: no such file"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json_names_the_path(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_image_token_id_disagreeing_with_config_is_an_error(word_tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="'<image>' has id 3 but the model config says image_token_index = 32000"):
        load_tokenizer(tmp_path, image_token_id=32000)


def test_unopenable_image_names_the_file(tmp_path):
    path = tmp_path / "not_an_image.png"
    path.write_text("this is text, not a PNG")
    with pytest.raises(ImageError, match="not_an_image.png: cannot be read as an image"):
        load_image(path)
    with pytest.raises(ImageError, match="missing.png: no such image file"):
        preprocess_image(tmp_path / "missing.png")


def test_prompt_longer_than_context_is_an_error(word_tokenizer):
    with pytest.raises(PromptTooLongError, match="the prompt is 7 tokens .* context holds 6"):
        tokenize_prompt(word_tokenizer, "USER: <image> hi ASSISTANT:", image_seq_length=3, max_length=6)


def test_processor_rejects_too_long_prompt_and_image_count_mismatch(llava_model_dir):
    processor = load_processor(llava_model_dir)
    with pytest.raises(PromptTooLongError, match="context holds 2048"):
        processor("USER: " + "<image>" * 4 + " ASSISTANT:", [_random_image(8, 8)] * 4)  # 4 * 576 > 2048
    with pytest.raises(DataError, match=r"1 <image> marker\(s\) but 2 image\(s\)"):
        processor(PROMPTS[0], [_random_image(8, 8)] * 2)


def test_vocabulary_without_image_token_gets_it_added_after_the_last_id(tmp_path):
    """The original release's 32000-piece vocabulary has no <image>: it is added as one special token right after
    the last id (where llava-hf puts it), and the pad id falls back to the config's value."""
    words = ["<unk>", "<s>", "</s>", "hi"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, image_token_id=4, pad_token_id=5)
    assert (tok.image_token_id, tok.pad_id) == (4, 5)
    assert tok.encode("hi <image> hi", add_bos=True) == [1, 3, 4, 3]
    assert load_tokenizer(tmp_path).pad_id == 0  # no <pad>, no config value: <unk>, as the original LLaVA pads


def test_check_token_ids_refuses_ids_beyond_the_embedding_rows(tmp_path):
    """make_tiny's checkpoint: its own tokenizer fits its rows (the config rounds them up to a multiple of 64); the
    same tokenizer with tokens added past the rows is refused, naming the file and both numbers."""
    from weights_tools.make_tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "tiny", text_layers=1, vision_layers=1)
    rows = load_config(folder).text.vocab_size
    tokenizer = load_tokenizer(folder)
    check_token_ids(tokenizer, rows, f"{folder}/model.safetensors")
    extra = rows - tokenizer.vocab_size  # the last added token gets id rows, one past the last row
    tokenizer.backend.add_tokens([f"word{i}" for i in range(extra + 1)])
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    grown = load_tokenizer(tmp_path)
    check_token_ids(grown, rows + 1, "a model with one row more")
    with pytest.raises(TokenizerError, match=rf"{tmp_path}/tokenizer\.json: the largest token id is {rows} "
                                             rf"\('word{extra}'\) but .*model\.safetensors has {rows} embedding rows"):
        check_token_ids(grown, rows, f"{folder}/model.safetensors")


def test_check_token_ids_exempts_the_image_token(word_tokenizer):
    """The original release: 32000 rows and `<image>` added as id 32000, which never reaches the embedding."""
    words = ["<unk>", "<s>", "</s>", "hi"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer = TextTokenizer(backend)  # adds <image> as id 4
    assert tokenizer.image_token_id == 4
    check_token_ids(tokenizer, 4, "a 4-row model")
    with pytest.raises(TokenizerError, match=r"the largest token id is 3 \('hi'\) but a 3-row model has 3 embedding"):
        check_token_ids(tokenizer, 3, "a 3-row model")


# ---------------------------------------------------------------------------------------------------------------------
# Images that are not 8-bit: scaled by their value range, not clipped at 255


def _grey_of(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and (rgb == rgb[..., :1]).all()  # grey in all three channels
    return rgb[..., 0]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    image = load_image(tmp_path / "grey16.png")
    assert image.mode == "I;16"
    # v * 255 / 65535, rounded: 257 -> 1, 1000 -> 3.89 -> 4, 32768 -> 127.5019 -> 128
    np.testing.assert_array_equal(_grey_of(image), [[0, 1, 4, 128, 255]])
    for value, grey in ((65535, 255), (32768, 128)):  # through preprocessing: white stays white, mid-grey mid-grey
        Image.fromarray(np.full((6, 6), value, dtype=np.uint16)).save(tmp_path / "flat.png")
        expected = (grey / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        torch.testing.assert_close(preprocess_image(tmp_path / "flat.png", image_size=4),
                                   expected[:, None, None].expand(3, 4, 4))


def test_16_bit_big_endian_32_bit_and_float_images(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values.astype(">u2")).save(tmp_path / "big_endian.tif")
    image = load_image(tmp_path / "big_endian.tif")
    assert image.mode == "I;16B"
    np.testing.assert_array_equal(_grey_of(image), [[0, 4, 128, 255]])
    # "I": 16-bit values (what older Pillow makes of a 16-bit PNG) by the 16-bit range; 8-bit values as they are
    np.testing.assert_array_equal(_grey_of(Image.fromarray(values.astype(np.int32))), [[0, 4, 128, 255]])
    np.testing.assert_array_equal(_grey_of(Image.fromarray(np.array([[0, 7, 128, 255, -5]], np.int32))),
                                  [[0, 7, 128, 255, 0]])
    full = np.array([[0, 2**30, 2**31 - 1]], np.int32)  # beyond 16 bits: the int32 range (2**30 -> 127.5 -> 128)
    np.testing.assert_array_equal(_grey_of(Image.fromarray(full)), [[0, 128, 255]])
    # "F": [0, 1] scaled to 255; anything above 1 taken as 0..255 and clipped
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(_grey_of(load_image(tmp_path / "unit.tif")), [[0, 64, 128, 255]])
    np.testing.assert_array_equal(_grey_of(Image.fromarray(np.array([[-3.0, 0.5, 100.4, 300.0]], np.float32))),
                                  [[0, 0, 100, 255]])


def test_16_bit_transparent_value_becomes_white(tmp_path):
    Image.fromarray(np.array([[0, 65535, 1000]], dtype=np.uint16)).save(tmp_path / "t.png", transparency=0)
    np.testing.assert_array_equal(_grey_of(load_image(tmp_path / "t.png")), [[255, 255, 4]])


# ---------------------------------------------------------------------------------------------------------------------
# Image bombs: refused by their header, before decoding


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height 1-bit grey pixels but holds a single tiny IDAT: Image.open reads the
    header alone, so whatever decoding would cost, opening it costs nothing."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))
    return path


def test_image_with_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("L", (1, 5000)).save(strip)  # 90 bytes; CLIP's resize would make it 336 x 1,680,000
    assert strip.stat().st_size < 200
    with pytest.raises(ImageError, match=rf"strip\.png: 1 x 5000 pixels has an aspect ratio of 5000:1, beyond the "
                                         rf"{MAX_ASPECT_RATIO}:1 this pipeline accepts; crop or pad the image"):
        preprocess_image(strip)
    with pytest.raises(ImageError, match=r"an in-memory image: 5000 x 1 pixels has an aspect ratio of 5000:1"):
        preprocess_image(Image.new("RGB", (5000, 1)))
    Image.new("L", (20, 400)).save(tmp_path / "twenty.png")  # exactly at the bound: accepted
    assert preprocess_image(tmp_path / "twenty.png", image_size=8).shape == (3, 8, 8)


def test_image_with_too_many_pixels_is_refused_before_decoding(tmp_path):
    big = _png_header(tmp_path / "big.png", 9000, 9000)
    with pytest.raises(ImageError, match=rf"big\.png: 9000 x 9000 pixels is more than the {MAX_IMAGE_PIXELS} "
                                         r"\(8192 x 8192\) this pipeline decodes; downscale the image"):
        load_image(big)
    huge = _png_header(tmp_path / "huge.png", 20000, 20000)  # so large that Pillow refuses it in Image.open
    with pytest.raises(ImageError, match=rf"huge\.png: more than the {MAX_IMAGE_PIXELS} pixels this pipeline decodes"):
        load_image(huge)
