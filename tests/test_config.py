"""config.json parsing: defaults filled in the way transformers fills them, both LLaVA formats, clear errors."""

from __future__ import annotations

import json

import pytest

from ref.config import ConfigError, load_config, parse_llava_hf

# llava-hf/llava-1.5-7b-hf's config.json as published: most fields are left to LLaMA's and CLIP's defaults.
LLAVA_15_7B_HF = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

# liuhaotian/llava-v1.5-7b's config.json (the original release), abridged to the fields that matter.
ORIGINAL_7B = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "model_type": "llava",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "vocab_size": 32000,
    "pad_token_id": 0,
    "image_aspect_ratio": "pad",
    "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
}

CLIP_L_336 = {"model_type": "clip", "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                                       "num_attention_heads": 16, "num_hidden_layers": 24,
                                                       "patch_size": 14, "projection_dim": 768}}


def write(folder, raw):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_published_7b_config_takes_llama_and_clip_defaults(tmp_path):
    config = load_config(write(tmp_path, LLAVA_15_7B_HF))
    t, v = config.text, config.vision
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (4096, 11008, 32)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (32, 32, 128)
    assert (t.vocab_size, t.max_position_embeddings, t.rms_norm_eps, t.rope_theta) == (32064, 4096, 1e-5, 10000.0)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, v.hidden_act, v.layer_norm_eps) == (336, 14, "quick_gelu", 1e-5)
    assert (config.image_token_index, config.pad_token_id, config.image_seq_length) == (32000, 32001, 576)
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"


def test_defaults_agree_with_transformers():
    transformers = pytest.importorskip("transformers", reason="compares against transformers' own config parsing")
    ours = parse_llava_hf(LLAVA_15_7B_HF, "test")
    theirs = transformers.LlavaConfig(**LLAVA_15_7B_HF)
    t, tt = ours.text, theirs.text_config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act"):
        assert getattr(t, field) == getattr(tt, field), field
    rope = getattr(tt, "rope_parameters", None) or {}
    assert t.rope_theta == rope.get("rope_theta", getattr(tt, "rope_theta", None))
    v, tv = ours.vision, theirs.vision_config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "hidden_act", "layer_norm_eps", "num_channels"):
        assert getattr(v, field) == getattr(tv, field), field


def test_round_trip_through_llava_hf_dict():
    config = parse_llava_hf(LLAVA_15_7B_HF, "test")
    assert parse_llava_hf(config.to_llava_hf_dict(), "round trip") == config


def test_rope_theta_in_either_place_and_scaling_refused():
    new_style = {**LLAVA_15_7B_HF, "text_config": {**LLAVA_15_7B_HF["text_config"],
                                                    "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}}
    old_style = {**LLAVA_15_7B_HF, "text_config": {**LLAVA_15_7B_HF["text_config"], "rope_theta": 5e5}}
    assert parse_llava_hf(new_style, "new").text.rope_theta == parse_llava_hf(old_style, "old").text.rope_theta == 5e5
    scaled = {**LLAVA_15_7B_HF, "text_config": {**LLAVA_15_7B_HF["text_config"],
                                                 "rope_scaling": {"type": "linear", "factor": 2.0}}}
    with pytest.raises(ConfigError, match="RoPE scaling"):
        parse_llava_hf(scaled, "scaled")


def test_original_release_with_its_clip_folder(tmp_path):
    model_dir, clip_dir = write(tmp_path / "llava", ORIGINAL_7B), write(tmp_path / "clip", CLIP_L_336)
    config = load_config(model_dir, vision_dir=clip_dir)
    assert config.source_format == "original"
    assert config.text.vocab_size == 32000 and config.image_token_index == 32000
    assert config.vision.image_size == 336 and config.image_seq_length == 576
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    with pytest.raises(ConfigError, match="needs its CLIP vision folder"):
        load_config(model_dir)


def test_bad_configs_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: no such file"):
        load_config(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken")
    with pytest.raises(ConfigError, match="model_type 'mistral' is neither a LLaVA model"):
        load_config(write(tmp_path / "mistral", {"model_type": "mistral", "hidden_size": 64}))
    no_text = {k: v for k, v in LLAVA_15_7B_HF.items() if k != "text_config"}
    with pytest.raises(ConfigError, match="missing field 'text_config'"):
        load_config(write(tmp_path / "no_text", no_text))
    mistral = {**LLAVA_15_7B_HF, "text_config": {**LLAVA_15_7B_HF["text_config"], "model_type": "mistral"}}
    with pytest.raises(ConfigError, match="'mistral' is not supported"):
        load_config(write(tmp_path / "mistral", mistral))
