"""The checkpoint loader (ref/weights.py): every key layout, sharding, strictness errors, the quantization hook.

Every layout is written from the SAME tiny random transformers LlavaForConditionalGeneration: the installed version's
own `save_pretrained` output and in-memory state_dict, and the other layouts by renaming those keys here. The expected
tensors come from the transformers model through a name mapping written in this file, not through the loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers", reason="weights tests need transformers (tests/requirements.txt)")

from ref.config import ConfigError  # noqa: E402
from ref.weights import CheckpointError, load_model, load_state_dict, open_checkpoint, save_model  # noqa: E402

VOCAB, IMAGE_TOKEN, PAD_TOKEN = 64, 62, 63


def make_hf_model(seed: int = 0, tie: bool = False):
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    rms_norm_eps=1e-5, tie_word_embeddings=tie)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                                      pad_token_id=PAD_TOKEN, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # no constant tensors (norms = 1, biases = 0): a mix-up of two tensors must show
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    return model


def internal_from_hf_memory(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x in-memory names -> our internal names (written independently of ref/weights.py)."""
    return {key.removeprefix("model."): tensor for key, tensor in state.items()}


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model()


@pytest.fixture(scope="module")
def reference(hf_model) -> dict[str, torch.Tensor]:
    return internal_from_hf_memory(hf_model.state_dict())


@pytest.fixture(scope="module")
def saved_dir(hf_model, tmp_path_factory) -> Path:
    """What the installed transformers' save_pretrained writes."""
    folder = tmp_path_factory.mktemp("hf_saved")
    hf_model.save_pretrained(folder)
    return folder


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def renamed(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {(new + key[len(old):] if key.startswith(old) else key): t for key, t in tensors.items()}


def original_config(hf_model) -> dict:
    """The original release's flat config.json (LLaMA fields + mm_* keys)."""
    text = hf_model.config.text_config
    return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
            "max_position_embeddings": text.max_position_embeddings, "pad_token_id": 0,
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 16,
            "image_aspect_ratio": "pad", "mm_use_im_start_end": False}


def original_tensors(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original release's key names for the decoder and projector (no vision keys)."""
    out = {}
    for name, tensor in reference.items():
        if name.startswith("language_model."):
            out["model." + name.removeprefix("language_model.")] = tensor
        elif name.startswith("multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[name.split(".")[1][-1]]
            out[f"model.mm_projector.{index}." + name.split(".")[-1]] = tensor
        elif name == "lm_head.weight":
            out[name] = tensor
    return out


def write_clip_model_folder(folder: Path, hf_model, reference) -> Path:
    """An openai-CLIP-like CLIPModel folder: vision_model.* plus text keys and projections that must be ignored."""
    tensors = {"vision_model." + n.removeprefix("vision_tower."): t
               for n, t in reference.items() if n.startswith("vision_tower.")}
    tensors.update({"text_model.embeddings.token_embedding.weight": torch.randn(10, 8),
                    "text_model.embeddings.position_ids": torch.arange(7)[None],
                    "vision_model.embeddings.position_ids": torch.arange(5)[None],
                    "text_projection.weight": torch.randn(4, 8), "visual_projection.weight": torch.randn(4, 16),
                    "logit_scale": torch.tensor(2.6592)})
    config = {"model_type": "clip", "vision_config": hf_model.config.vision_config.to_dict(),
              "text_config": {"hidden_size": 8}, "projection_dim": 4}
    return write_folder(folder, tensors, config)


def write_clip_vision_folder(folder: Path, hf_model, reference) -> Path:
    """The installed transformers' own CLIPVisionModel.save_pretrained, with the reference vision weights."""
    clip = transformers.CLIPVisionModel(hf_model.config.vision_config)
    vision = {n.removeprefix("vision_tower."): t for n, t in reference.items() if n.startswith("vision_tower.")}
    # transformers 5.x flattens CLIPVisionModel (no .vision_model); older versions nest the tower under it
    getattr(clip, "vision_model", clip).load_state_dict(vision)
    clip.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def layouts(hf_model, reference, saved_dir, tmp_path_factory) -> dict[str, tuple[Path, Path | None]]:
    """Layout name -> (model folder, CLIP folder or None), all holding the same weights."""
    root = tmp_path_factory.mktemp("layouts")
    saved = saved_tensors(saved_dir)
    config = json.loads((saved_dir / "config.json").read_text())
    memory = hf_model.state_dict()
    folders = {
        "hf-5-saved": (saved_dir, None),
        "llava-hf": (write_folder(root / "llava_hf", renamed(saved, "vision_tower.", "vision_tower.vision_model."),
                                  config), None),
        "hf-4.52-memory": (write_folder(root / "hf452", renamed(memory, "model.vision_tower.",
                                                                "model.vision_tower.vision_model."), config), None),
        "hf-5-memory": (write_folder(root / "hf5mem", memory, config), None),
    }
    sharded = root / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    folders["sharded"] = (sharded, None)
    original = write_folder(root / "original", original_tensors(reference), original_config(hf_model))
    folders["original+CLIPModel"] = (original, write_clip_model_folder(root / "clip_model", hf_model, reference))
    folders["original+CLIPVisionModel"] = (original, write_clip_vision_folder(root / "clip_vision", hf_model,
                                                                             reference))
    return folders


EXPECTED_LAYOUT = {"hf-5-saved": "hf-5-saved", "llava-hf": "llava-hf", "hf-4.52-memory": "hf-4.52-memory",
                   "hf-5-memory": "hf-5-memory", "sharded": "hf-5-saved", "original+CLIPModel": "original",
                   "original+CLIPVisionModel": "original"}


def assert_equal_to_reference(model, reference, dtype=torch.float32):
    state = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert state[name].dtype == dtype, name
        assert torch.equal(state[name], tensor.to(dtype)), name


# ---------------------------------------------------------------------------------------------------------------------
# Layouts


def test_installed_transformers_save_pretrained_layout(saved_dir):
    keys = set(saved_tensors(saved_dir))
    # What transformers 5.x save_pretrained writes (checked here, not assumed): no "vision_model." in the tower.
    assert "vision_tower.embeddings.class_embedding" in keys
    assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
    assert open_checkpoint(saved_dir).layout == "hf-5-saved"


@pytest.mark.parametrize("name", list(EXPECTED_LAYOUT))
def test_every_layout_loads_the_same_weights(layouts, reference, name):
    folder, vision_dir = layouts[name]
    assert open_checkpoint(folder, vision_dir).layout == EXPECTED_LAYOUT[name]
    model = load_model(folder, vision_dir=vision_dir)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    if name.startswith("original"):
        assert model.config.source_format == "original"
    assert_equal_to_reference(model, reference)


def test_sharded_checkpoint_reads_every_shard(layouts):
    checkpoint = open_checkpoint(layouts["sharded"][0])
    assert len(checkpoint.files) > 1
    index = json.loads((layouts["sharded"][0] / "model.safetensors.index.json").read_text())
    assert len(checkpoint.files) == len(set(index["weight_map"].values()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loading_dtype_casts_every_tensor(layouts, reference, dtype):
    assert_equal_to_reference(load_model(layouts["llava-hf"][0], dtype=dtype), reference, dtype)


def test_rejects_an_unsupported_loading_dtype(layouts):
    with pytest.raises(ValueError, match="loading dtype"):
        load_model(layouts["llava-hf"][0], dtype=torch.float64)


def test_position_ids_and_inv_freq_are_ignored(layouts, reference, tmp_path):
    source = layouts["llava-hf"][0]
    tensors = saved_tensors(source)
    tensors["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(5)[None]  # int64: ignored, not checked
    tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    folder = write_folder(tmp_path / "extra", tensors, json.loads((source / "config.json").read_text()))
    checkpoint = open_checkpoint(folder)
    assert len(checkpoint.ignored) == 2
    assert_equal_to_reference(load_model(folder), reference)


def test_tied_embeddings_fill_lm_head_from_the_embedding(tmp_path):
    hf_tied = make_hf_model(seed=1, tie=True)
    hf_tied.save_pretrained(tmp_path)
    assert "language_model.lm_head.weight" not in saved_tensors(tmp_path)  # transformers drops the tied copy
    model = load_model(tmp_path)
    embed = hf_tied.state_dict()["model.language_model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, embed)


def test_load_state_dict_keeps_the_stored_dtype(layouts, reference):
    state = load_state_dict(layouts["llava-hf"][0])
    assert set(state) == set(reference)
    assert all(torch.equal(state[n], reference[n]) for n in reference)


# ---------------------------------------------------------------------------------------------------------------------
# save_model


def test_save_model_writes_the_published_layout_transformers_reads(layouts, reference, tmp_path):
    model = load_model(layouts["hf-5-memory"][0])
    save_model(model, tmp_path)
    assert open_checkpoint(tmp_path).layout == "llava-hf"
    assert "vision_tower.vision_model.embeddings.class_embedding" in saved_tensors(tmp_path)
    assert_equal_to_reference(load_model(tmp_path), reference)
    # An independent reader: transformers loads our folder with nothing missing or unexpected.
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(torch.equal(t, reference[n]) for n, t in internal_from_hf_memory(hf.state_dict()).items())


def test_save_model_rejects_an_unknown_layout(layouts, tmp_path):
    with pytest.raises(ValueError, match="layout"):
        save_model(load_model(layouts["llava-hf"][0]), tmp_path, layout="original")


# ---------------------------------------------------------------------------------------------------------------------
# Strictness: each error names the key and the file


@pytest.fixture
def hf_folder(layouts, tmp_path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """A writable copy of the llava-hf layout: (folder, tensors, config)."""
    source = layouts["llava-hf"][0]
    return tmp_path / "bad", saved_tensors(source), json.loads((source / "config.json").read_text())


def test_missing_key(hf_folder):
    folder, tensors, config = hf_folder
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    write_folder(folder, tensors, config)
    with pytest.raises(CheckpointError, match=r"missing.*language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_unexpected_key(hf_folder):
    folder, tensors, config = hf_folder
    tensors["language_model.model.layers.2.mlp.up_proj.weight"] = torch.zeros(48, 32)  # a third layer: not in config
    write_folder(folder, tensors, config)
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert "unexpected key 'language_model.model.layers.2.mlp.up_proj.weight'" in str(err.value)
    assert str(folder / "model.safetensors") in str(err.value)


def test_wrong_shape_names_key_shapes_and_file_before_reading_data(hf_folder, monkeypatch):
    folder, tensors, config = hf_folder
    tensors["multi_modal_projector.linear_2.weight"] = torch.zeros(32, 31)
    write_folder(folder, tensors, config)

    def no_data_reads(*args, **kwargs):
        raise AssertionError("tensor data was read before the header checks failed")

    monkeypatch.setattr("ref.weights.TensorReader.read", no_data_reads)
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    message = str(err.value)
    assert "'multi_modal_projector.linear_2.weight'" in message and str(folder / "model.safetensors") in message
    assert "[32, 31]" in message and "expected [32, 32]" in message


def test_integer_dtype_is_rejected(hf_folder):
    folder, tensors, config = hf_folder
    tensors["language_model.model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    write_folder(folder, tensors, config)
    with pytest.raises(CheckpointError, match=r"'language_model\.model\.norm\.weight' has dtype I32"):
        load_model(folder)


def test_truncated_file(hf_folder):
    folder, tensors, config = hf_folder
    write_folder(folder, tensors, config)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{file}: not a readable safetensors file"):
        load_model(folder)


def test_corrupted_header(hf_folder):
    folder, tensors, config = hf_folder
    write_folder(folder, tensors, config)
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[9:14] = b"#####"  # inside the JSON header, right after its 8-byte length
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{file}: not a readable safetensors file"):
        load_model(folder)


def test_missing_config_field(hf_folder):
    folder, tensors, config = hf_folder
    del config["text_config"]
    write_folder(folder, tensors, config)
    with pytest.raises(ConfigError, match="config.json: missing field 'text_config'"):
        load_model(folder)


def test_no_config_json(hf_folder):
    folder, tensors, config = hf_folder
    write_folder(folder, tensors, config)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json: no such file"):
        load_model(folder)


def test_config_of_another_model_type(hf_folder):
    folder, tensors, config = hf_folder
    write_folder(folder, tensors, {**config["text_config"], "model_type": "mistral"})
    with pytest.raises(ConfigError, match="model_type 'mistral' is neither a LLaVA model"):
        load_model(folder)
    # a LLaVA checkpoint under a text-only LLaMA config: its keys fit no text-only layout
    write_folder(folder, tensors, {**config["text_config"], "model_type": "llama"})
    with pytest.raises(CheckpointError, match="no known key layout \\(llama\\)"):
        load_model(folder)


def test_no_safetensors_points_at_the_converter(hf_folder):
    folder, tensors, config = hf_folder
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin.*convert_original"):
        load_model(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_model(tmp_path / "nowhere")


def test_original_needs_its_clip_folder_and_llava_hf_refuses_one(layouts):
    original, clip = layouts["original+CLIPModel"]
    with pytest.raises(ConfigError, match="vision_dir"):
        load_model(original)
    with pytest.raises(CheckpointError, match="vision_dir is only for original-format"):
        load_model(layouts["llava-hf"][0], vision_dir=clip)


def test_clip_folder_with_a_wrong_vision_key(layouts, tmp_path):
    original, clip = layouts["original+CLIPModel"]
    tensors = saved_tensors(clip)
    tensors["vision_model.encoder.layers.0.mlp.fc3.weight"] = torch.zeros(2, 2)
    bad_clip = write_folder(tmp_path / "clip", tensors, json.loads((clip / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key 'vision_model\.encoder\.layers\.0"
                                              r"\.mlp\.fc3\.weight'"):
        load_model(original, vision_dir=bad_clip)


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], config: dict, weight_map: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for shard in sorted(set(weight_map.values())):
        save_file({k: tensors[k] for k, s in weight_map.items() if s == shard}, folder / shard)
    return folder


def test_sharded_index_and_shards_must_agree(hf_folder, reference):
    _, tensors, config = hf_folder
    keys = sorted(tensors)
    weight_map = {k: ("a.safetensors" if i % 2 else "b.safetensors") for i, k in enumerate(keys)}

    good = write_sharded(hf_folder[0] / "good", tensors, config, weight_map)
    (good / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_equal_to_reference(load_model(good), reference)

    missing_shard = hf_folder[0] / "missing_shard"
    shutil.copytree(good, missing_shard)
    (missing_shard / "a.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard 'a.safetensors' is listed but .* does not exist"):
        load_model(missing_shard)

    moved = hf_folder[0] / "moved"  # the index says b, the tensor sits in a
    shutil.copytree(good, moved)
    index = {"weight_map": {**weight_map, keys[1]: "b.safetensors"}}
    (moved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"a.safetensors: tensor '{keys[1]}' is in this shard but listed in "
                                              f"'b.safetensors'"):
        load_model(moved)

    ghost = hf_folder[0] / "ghost"  # the index lists a tensor no shard holds
    shutil.copytree(good, ghost)
    index = {"weight_map": {**weight_map, "language_model.model.extra.weight": "a.safetensors"}}
    (ghost / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="listed but absent from their shard, e.g. "
                                              "'language_model.model.extra.weight'"):
        load_model(ghost)

    (ghost / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json: not valid JSON"):
        load_model(ghost)


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite values: each tensor checked as it loads, in the dtype it is loaded in; never written


def with_value(tensor: torch.Tensor, value: float, index: int = 3) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[index] = value
    return tensor


@pytest.mark.parametrize("bad, counts", [(float("nan"), "1 NaN, 0 inf"), (float("inf"), "0 NaN, 1 inf"),
                                         (-float("inf"), "0 NaN, 1 inf")])
@pytest.mark.parametrize("key, quantize", [
    ("language_model.model.layers.1.mlp.up_proj.weight", None),
    ("language_model.model.layers.1.mlp.up_proj.weight", "nf4"),  # quantized as it streams in
    ("language_model.model.norm.weight", "nf4"),  # a dense tensor of a 4-bit model
    ("vision_tower.vision_model.embeddings.class_embedding", None),
])
def test_non_finite_weight_is_refused_by_file_and_key(hf_folder, key, quantize, bad, counts):
    folder, tensors, config = hf_folder
    tensors[key] = with_value(tensors[key], bad)
    write_folder(folder, tensors, config)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, quantize=quantize)
    assert str(err.value) == (f"{folder / 'model.safetensors'}: tensor {key!r} holds non-finite values ({counts} "
                              f"among {tensors[key].numel()})")
    with pytest.raises(CheckpointError, match=f"tensor '{key}' holds non-finite values"):
        load_state_dict(folder)


def test_a_weight_that_overflows_the_loading_dtype_is_refused(hf_folder):
    folder, tensors, config = hf_folder
    key = "language_model.model.layers.0.self_attn.o_proj.weight"
    tensors[key] = with_value(tensors[key], 1e5)  # finite in float32, past float16's 65504
    write_folder(folder, tensors, config)
    load_model(folder, dtype=torch.bfloat16)  # bfloat16 has float32's range
    with pytest.raises(CheckpointError) as err:
        load_model(folder, dtype=torch.float16)
    assert str(err.value) == (f"{folder / 'model.safetensors'}: tensor {key!r} overflows float16 (largest |value| "
                              f"1e+05 in float32): use bfloat16 or float32")


def test_save_model_never_writes_a_non_finite_tensor(layouts, tmp_path):
    model = load_model(layouts["llava-hf"][0])
    with torch.no_grad():
        model.language_model.layers[0].mlp.down_proj.weight[2, 1] = float("nan")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as err:
        save_model(model, out)
    key = "language_model.model.layers.0.mlp.down_proj.weight"
    assert str(err.value) == (f"{out / 'model.safetensors'}: not written: tensor {key!r} holds non-finite values "
                              f"(1 NaN, 0 inf among {32 * 48})")
    assert not out.exists()
    with torch.no_grad():
        model.language_model.layers[0].mlp.down_proj.weight[2, 1] = 1e5
    save_model(model, out, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=f"not written: tensor '{key}' overflows float16 .*1e\\+05 in float32"):
        save_model(model, tmp_path / "out16", dtype=torch.float16)
    assert not (tmp_path / "out16").exists()
