"""config.json parsing: defaults filled in the way transformers fills them, both LLaVA formats, clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

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


# --- every value checked for type and range, before any module is built ----------------------------------------------


def edited(raw: dict, path: str, value) -> dict:
    """A deep copy of `raw` with the key at `path` ("text_config.hidden_size") set to `value`."""
    raw = json.loads(json.dumps(raw))
    *parents, key = path.split(".")
    node = raw
    for parent in parents:
        node = node[parent]
    node[key] = value
    return raw


def refused(path, **kwargs) -> str:
    """load_config's ConfigError message for the config.json in `path`, checked to be one line naming the file."""
    with pytest.raises(ConfigError) as err:
        load_config(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


NAN, INF = float("nan"), float("inf")  # json.dumps writes them as NaN and Infinity, which Python's json reads back


@pytest.mark.parametrize("key, value, message", [
    ("text_config.hidden_size", "128", 'text_config.hidden_size must be an integer, got "128" (a string)'),
    ("text_config.hidden_size", [4096], "text_config.hidden_size must be an integer, got [4096] (a list)"),
    ("text_config.hidden_size", True, "text_config.hidden_size must be an integer, got true (a boolean)"),
    ("text_config.hidden_size", None, "text_config.hidden_size must be an integer, got null"),
    ("text_config.hidden_size", 4001, "text_config.hidden_size 4001 is not a multiple of "
                                      "text_config.num_attention_heads 32"),
    ("text_config.num_hidden_layers", 0, "text_config.num_hidden_layers must be >= 1, got 0"),
    ("text_config.num_hidden_layers", 1e8, "text_config.num_hidden_layers must be an integer, got 100000000.0"),
    ("text_config.num_hidden_layers", 100000000, "text_config.num_hidden_layers is 100000000, too large (at most 1024"),
    ("text_config.num_attention_heads", 0, "text_config.num_attention_heads must be >= 1, got 0"),
    ("text_config.num_key_value_heads", 5, "text_config.num_attention_heads 32 is not a multiple of "
                                           "text_config.num_key_value_heads 5"),
    ("text_config.head_dim", 127, "text_config.head_dim 127 is odd (RoPE rotates pairs of dimensions)"),
    ("text_config.intermediate_size", -1, "text_config.intermediate_size must be >= 1, got -1"),
    ("text_config.vocab_size", 10**13, "describes a model of 8.19e+16 parameters (decoder 8.19e+16, vision tower "
                                       "3.04e+08, projector 2.1e+07), more than the 1e+12 this code accepts"),
    ("text_config.rms_norm_eps", NAN, "text_config.rms_norm_eps must be a finite number > 0, got NaN"),
    ("text_config.rms_norm_eps", 0, "text_config.rms_norm_eps must be a finite number > 0, got 0"),
    ("text_config.rms_norm_eps", -1e-5, "text_config.rms_norm_eps must be a finite number > 0, got -1e-05"),
    ("text_config.rope_theta", NAN, "text_config.rope_theta must be a finite number > 0, got NaN"),
    ("text_config.rope_theta", -10000.0, "text_config.rope_theta must be a finite number > 0, got -10000.0"),
    ("text_config.tie_word_embeddings", "no", 'text_config.tie_word_embeddings must be true or false, got "no" '
                                              '(a string)'),
    ("text_config.eos_token_id", "2", 'text_config.eos_token_id must be an integer, got "2" (a string)'),
    ("vision_config.layer_norm_eps", INF, "vision_config.layer_norm_eps must be a finite number > 0, got Infinity"),
    ("vision_config.num_attention_heads", 0, "vision_config.num_attention_heads must be >= 1, got 0"),
    ("vision_config.hidden_size", 1000, "vision_config.hidden_size 1000 is not a multiple of "
                                        "vision_config.num_attention_heads 16"),
    ("vision_config.patch_size", 0, "vision_config.patch_size must be >= 1, got 0"),
    ("vision_config.patch_size", 400, "vision_config.patch_size 400 is larger than vision_config.image_size 336"),
    ("vision_config.num_hidden_layers", 5000, "vision_config.num_hidden_layers is 5000, too large"),
    ("vision_config.image_size", 10**7, "describes a model of 5.22e+14 parameters (decoder 6.74e+09, vision tower "
                                        "5.22e+14"),
    ("vision_feature_layer", -26, "vision_feature_layer -26 is out of range for a vision tower of 24 layers "
                                  "(hidden states -25..24)"),
    ("vision_feature_layer", True, "vision_feature_layer must be an int or a list of ints, got true (a boolean)"),
    ("pad_token_id", "<pad>", 'pad_token_id must be an integer, got "<pad>" (a string)'),
    ("image_token_index", -1, "image_token_index must be >= 0, got -1"),
    ("multimodal_projector_bias", 1, "multimodal_projector_bias must be true or false, got 1"),
])
def test_llava_hf_values_of_a_wrong_type_or_range_are_refused_by_key(tmp_path, key, value, message):
    folder = write(tmp_path, edited(LLAVA_15_7B_HF, key, value))
    assert refused(folder).startswith(f"{folder / 'config.json'}: {message}")  # the file, then the key


def test_rope_theta_in_rope_parameters_and_nan_literals_in_the_file(tmp_path):
    new_style = edited(LLAVA_15_7B_HF, "text_config.rope_parameters", {"rope_theta": -1, "rope_type": "default"})
    assert "text_config.rope_parameters.rope_theta must be a finite number > 0, got -1" in \
        refused(write(tmp_path / "new", new_style))
    text = json.dumps(LLAVA_15_7B_HF).replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": Infinity')
    (tmp_path / "literal").mkdir()
    (tmp_path / "literal" / "config.json").write_text(text)
    assert "text_config.rms_norm_eps must be a finite number > 0, got Infinity" in refused(tmp_path / "literal")


def test_original_release_values_are_refused_naming_its_file_or_the_clip_folders(tmp_path):
    clip = write(tmp_path / "clip", CLIP_L_336)
    llava = write(tmp_path / "llava", edited(ORIGINAL_7B, "num_attention_heads", 0))
    assert refused(llava, vision_dir=clip) == f"{llava / 'config.json'}: num_attention_heads must be >= 1, got 0"
    llava = write(tmp_path / "llava", edited(ORIGINAL_7B, "mm_vision_select_layer", 30))
    assert "mm_vision_select_layer 30 is out of range" in refused(llava, vision_dir=clip)
    llava = write(tmp_path / "llava", ORIGINAL_7B)
    clip = write(tmp_path / "clip", edited(CLIP_L_336, "vision_config.hidden_size", "1024"))
    assert refused(llava, vision_dir=clip) == \
        f'{clip / "config.json"}: vision_config.hidden_size must be an integer, got "1024" (a string)'
    bare_clip = write(tmp_path / "bare", {**CLIP_L_336["vision_config"], "layer_norm_eps": NAN})
    assert refused(llava, vision_dir=bare_clip) == \
        f"{bare_clip / 'config.json'}: layer_norm_eps must be a finite number > 0, got NaN"


def test_text_only_llama_values_are_refused_by_key(tmp_path):
    llama = {**LLAVA_15_7B_HF["text_config"], "model_type": "llama"}
    assert load_config(write(tmp_path / "ok", llama)).text_only
    folder = write(tmp_path / "bad", {**llama, "num_hidden_layers": 100000000})
    assert refused(folder).startswith(f"{folder / 'config.json'}: num_hidden_layers is 100000000, too large")
    folder = write(tmp_path / "nan", {**llama, "rope_theta": NAN})
    assert refused(folder) == f"{folder / 'config.json'}: rope_theta must be a finite number > 0, got NaN"


def test_parameter_count_from_the_config_is_what_the_model_holds():
    """The bound on a config's size is computed without building anything; it must count what Llava builds."""
    from dataclasses import replace

    from conftest import tiny_config
    from ref.llava import Llava

    base = tiny_config()
    configs = [base, replace(base, vision_feature_layer=(-2, 0), projector_bias=False),
               replace(base, text=replace(base.text, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
               replace(base, vision=None, image_token_index=None)]
    for config in configs:
        with torch.device("meta"):
            model = Llava(config)
        assert config.num_parameters == sum(p.numel() for p in model.parameters())
    assert parse_llava_hf(LLAVA_15_7B_HF, "7b").num_parameters == 7_063_427_072  # LLaVA-1.5-7B's published 7.06B


def test_absurd_sizes_are_refused_before_any_module_is_built(tmp_path, monkeypatch):
    from ref import weights
    from weights_tools.make_tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "tiny")
    raw = json.loads((folder / "config.json").read_text())

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(weights, "Llava", no_model)
    for key, value in (("text_config.num_hidden_layers", 100000000), ("text_config.vocab_size", 10**12),
                       ("text_config.intermediate_size", -1), ("vision_config.hidden_size", "64")):
        (folder / "config.json").write_text(json.dumps(edited(raw, key, value)))
        with pytest.raises(ConfigError, match=f"^{re.escape(str(folder / 'config.json'))}: "):
            weights.load_model(folder)
