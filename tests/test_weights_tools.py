"""weights_tools: make_tiny, inspect, convert_original.

Expected values come from elsewhere: transformers reads make_tiny's folder, inspect's counts are compared with numel
sums over a transformers model, convert_original's output is compared tensor by tensor with its source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ref.weights import CheckpointError, load_model, open_checkpoint
from weights_tools import convert_original, inspect, make_tiny

transformers = pytest.importorskip("transformers", reason="these tests need transformers (tests/requirements.txt)")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# make_tiny


def test_make_tiny_writes_a_checkpoint_our_loader_and_transformers_read(tiny_dir):
    model = load_model(tiny_dir)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = model.state_dict()
    for key, tensor in hf.state_dict().items():
        assert torch.equal(ours[key.removeprefix("model.")], tensor), key
    image_tokens = [model.config.image_token_index] * model.config.image_seq_length
    logits = model(torch.tensor([[1] + image_tokens + [5, 6]]), pixel_values=torch.randn(1, 3, 28, 28))
    assert logits.shape == (1, 1 + model.config.image_seq_length + 2, model.config.text.vocab_size)
    assert torch.isfinite(logits).all()


def test_make_tiny_tokenizer_follows_llama_conventions(tiny_dir):
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    config = json.loads((tiny_dir / "config.json").read_text())
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tokenizer.token_to_id("<image>") == config["image_token_index"]
    assert tokenizer.token_to_id("<pad>") == config["pad_token_id"]
    assert config["text_config"]["vocab_size"] >= tokenizer.get_vocab_size(with_added_tokens=True)
    assert config["text_config"]["vocab_size"] % 64 == 0
    text = "USER: <image>\nWhat is in the image? ASSISTANT: Sorry, I can't help with that."
    encoding = tokenizer.encode(text)
    assert encoding.ids[0] == 1 and encoding.ids.count(config["image_token_index"]) == 1
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == "<s>" + text
    assert tokenizer.decode(tokenizer.encode("naïve café 東京").ids) == "naïve café 東京"  # bytes: nothing unknown
    # transformers reads the same files and agrees on the ids
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    assert hf_tokenizer(text).input_ids == encoding.ids
    assert hf_tokenizer.pad_token_id == config["pad_token_id"]


def test_make_tiny_is_deterministic_from_the_seed(tiny_dir, tmp_path):
    same = make_tiny.write_tiny_checkpoint(tmp_path / "same", seed=0)
    other = make_tiny.write_tiny_checkpoint(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (same / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_make_tiny_sizes_and_cli(tmp_path, capsys):
    make_tiny.main([str(tmp_path), "--text-layers", "1", "--image-size", "56", "--seed", "3"])
    assert "wrote" in capsys.readouterr().out
    config = open_checkpoint(tmp_path).config
    assert config.text.num_hidden_layers == 1 and config.image_seq_length == 16
    with pytest.raises(ValueError, match="unknown size"):
        make_tiny.write_tiny_checkpoint(tmp_path / "x", text_depth=3)


# ---------------------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_counts_match_an_independent_count(tmp_path, capsys):
    text = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=28, patch_size=7)
    hf = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=94, pad_token_id=95))
    hf.to(torch.float16).save_pretrained(tmp_path, max_shard_size="30KB")
    counts = {"vision_tower": 0, "projector": 0, "decoder": 0, "lm_head": 0}
    prefixes = {"model.vision_tower.": "vision_tower", "model.multi_modal_projector.": "projector",
                "model.language_model.": "decoder", "lm_head.": "lm_head"}
    for name, param in hf.named_parameters():
        counts[next(part for prefix, part in prefixes.items() if name.startswith(prefix))] += param.numel()

    summary = inspect.describe(tmp_path)
    assert summary["parameters"] == {**counts, "total": sum(counts.values())}
    assert summary["tensors"] == len(list(hf.named_parameters()))
    assert summary["dtypes"] == {"F16": len(list(hf.named_parameters()))}
    assert summary["layout"] == "hf-5-saved" and len(summary["files"]) > 1
    assert summary["config"]["image_seq_length"] == 16

    inspect.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "layout       hf-5-saved" in out and f"total {sum(counts.values()):,}" in out
    inspect.main([str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out)["parameters"]["decoder"] == counts["decoder"]


def test_inspect_describes_a_text_only_checkpoint(tmp_path):
    """A LlamaForCausalLM folder (the LLM judges, SmolLM2) has no vision tower: said so, not a crash."""
    folder = make_tiny.write_tiny_checkpoint(tmp_path / "text", text_only=True, text_layers=1)
    summary = inspect.describe(folder)
    assert summary["config"]["vision"].startswith("none")
    assert summary["parameters"]["vision_tower"] == summary["parameters"]["projector"] == 0
    assert "vision: none" in inspect.format_summary(summary)


def test_inspect_reports_errors_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inspect.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config.json: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("tool", [inspect, make_tiny, convert_original])
def test_every_tool_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m weights_tools." in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# convert_original


ORIGINAL_VOCAB = 100  # -> <image> 100, <pad> 101, padded to 128 rows


def original_folders(root: Path, fmt: str) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An original-release folder and a CLIP folder with random weights, in .bin or safetensors files.

    Returns (llava dir, clip dir, the llava tensors by original key, the CLIP vision tensors by CLIP key).
    """
    generator = torch.Generator().manual_seed(0)
    d, m, v, dv, mv, layers = 32, 48, ORIGINAL_VOCAB, 16, 24, 2

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(torch.float16)

    llava = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": rand(d), "lm_head.weight": rand(v, d),
             "model.mm_projector.0.weight": rand(d, dv), "model.mm_projector.0.bias": rand(d),
             "model.mm_projector.2.weight": rand(d, d), "model.mm_projector.2.bias": rand(d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        llava.update({p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(d // 2, d),
                      p + "self_attn.v_proj.weight": rand(d // 2, d), p + "self_attn.o_proj.weight": rand(d, d),
                      p + "mlp.gate_proj.weight": rand(m, d), p + "mlp.up_proj.weight": rand(m, d),
                      p + "mlp.down_proj.weight": rand(d, m), p + "input_layernorm.weight": rand(d),
                      p + "post_attention_layernorm.weight": rand(d),
                      p + "self_attn.rotary_emb.inv_freq": torch.rand(4)})  # old checkpoints saved it; ignored
    clip = {"vision_model.embeddings.class_embedding": rand(dv),
            "vision_model.embeddings.patch_embedding.weight": rand(dv, 3, 14, 14),
            "vision_model.embeddings.position_embedding.weight": rand(5, dv),
            "vision_model.embeddings.position_ids": torch.arange(5)[None],
            "vision_model.pre_layrnorm.weight": rand(dv), "vision_model.pre_layrnorm.bias": rand(dv),
            "vision_model.post_layernorm.weight": rand(dv), "vision_model.post_layernorm.bias": rand(dv)}
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            clip.update({p + f"self_attn.{proj}.weight": rand(dv, dv), p + f"self_attn.{proj}.bias": rand(dv)})
        clip.update({p + "mlp.fc1.weight": rand(mv, dv), p + "mlp.fc1.bias": rand(mv),
                     p + "mlp.fc2.weight": rand(dv, mv), p + "mlp.fc2.bias": rand(dv)})
        for norm in ("layer_norm1", "layer_norm2"):
            clip.update({p + f"{norm}.weight": rand(dv), p + f"{norm}.bias": rand(dv)})
    text_extras = {"text_model.embeddings.token_embedding.weight": rand(10, 8), "logit_scale": torch.tensor(2.5),
                   "text_projection.weight": rand(4, 8), "visual_projection.weight": rand(4, dv)}

    llava_dir, clip_dir = root / "llava", root / "clip"
    llava_dir.mkdir()
    clip_dir.mkdir()
    (llava_dir / "config.json").write_text(json.dumps({
        "model_type": "llava", "vocab_size": v, "hidden_size": d, "intermediate_size": m, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "pad_token_id": 0,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": dv}))
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {
        "hidden_size": dv, "intermediate_size": mv, "num_hidden_layers": layers, "num_attention_heads": 2,
        "image_size": 28, "patch_size": 14}}))
    if fmt == "bin":  # the release's format: two shards and an index, as pytorch_model-0000x-of-00002.bin
        keys = sorted(llava)
        halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, part in halves.items():
            torch.save({k: llava[k] for k in part}, llava_dir / name)
        weight_map = {k: name for name, part in halves.items() for k in part}
        (llava_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        torch.save({**clip, **text_extras}, clip_dir / "pytorch_model.bin")
    else:
        save_file(llava, llava_dir / "model.safetensors")
        save_file({**clip, **text_extras}, clip_dir / "model.safetensors")
    return llava_dir, clip_dir, llava, clip


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_convert_original_keeps_every_weight_and_pads_the_vocab_with_the_mean(tmp_path, fmt):
    llava_dir, clip_dir, llava, clip = original_folders(tmp_path, fmt)
    out = convert_original.convert_original(llava_dir, clip_dir, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "text_config" in config and "mm_vision_tower" not in config
    assert config["image_token_index"] == ORIGINAL_VOCAB and config["pad_token_id"] == ORIGINAL_VOCAB + 1
    assert config["text_config"]["vocab_size"] == 128
    assert open_checkpoint(out).layout == "llava-hf"

    state = load_model(out, dtype=torch.float16).state_dict()
    # Every original tensor, under its llava-hf name (mapping written out here, independently of the converter).
    embed, lm_head = llava["model.embed_tokens.weight"], llava["lm_head.weight"]
    mean_row = embed.float().mean(dim=0).to(torch.float16)
    assert torch.equal(state["language_model.embed_tokens.weight"][:ORIGINAL_VOCAB], embed)
    assert torch.equal(state["lm_head.weight"][:ORIGINAL_VOCAB], lm_head)
    for name in ("language_model.embed_tokens.weight", "lm_head.weight"):  # new rows: the mean embedding (documented)
        assert torch.equal(state[name][ORIGINAL_VOCAB:], mean_row.expand(128 - ORIGINAL_VOCAB, -1)), name
    checked = 2
    for key, tensor in llava.items():
        if key.startswith("model.layers.") and not key.endswith("inv_freq"):
            assert torch.equal(state["language_model." + key.removeprefix("model.")], tensor), key
            checked += 1
    assert torch.equal(state["language_model.norm.weight"], llava["model.norm.weight"])
    for index, linear in (("0", "linear_1"), ("2", "linear_2")):
        for part in ("weight", "bias"):
            stored = llava[f"model.mm_projector.{index}.{part}"]
            assert torch.equal(state[f"multi_modal_projector.{linear}.{part}"], stored)
    for key, tensor in clip.items():
        if not key.endswith("position_ids"):
            assert torch.equal(state["vision_tower." + key.removeprefix("vision_model.")], tensor), key
            checked += 1
    assert checked + 5 == len(state)  # norm + 4 projector tensors


def test_convert_original_output_is_read_by_transformers(tmp_path):
    llava_dir, clip_dir, llava, _ = original_folders(tmp_path, "safetensors")
    out = convert_original.convert_original(llava_dir, clip_dir, tmp_path / "out", dtype=torch.float32)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    embed = hf.state_dict()["model.language_model.embed_tokens.weight"]
    assert embed.shape == (128, 32) and torch.equal(embed[:ORIGINAL_VOCAB], llava["model.embed_tokens.weight"].float())


def test_convert_original_refuses_a_pickle_with_objects(tmp_path):
    llava_dir, clip_dir, _, _ = original_folders(tmp_path, "bin")
    torch.save({"weights": Path("not a tensor")}, clip_dir / "pytorch_model.bin")  # needs a full unpickler
    with pytest.raises(CheckpointError, match=r"clip/pytorch_model\.bin: not a readable PyTorch weights file"):
        convert_original.convert_original(llava_dir, clip_dir, tmp_path / "out")


def test_convert_original_checks_shapes_like_the_loader(tmp_path, capsys):
    llava_dir, clip_dir, llava, clip = original_folders(tmp_path, "safetensors")
    save_file({**llava, "model.norm.weight": torch.zeros(31, dtype=torch.float16)}, llava_dir / "model.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        convert_original.main([str(llava_dir), str(clip_dir), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'model.norm.weight' has shape [31], expected [32]" in err and "model.safetensors" in err


def test_padded_vocab_matches_llava_hf():
    assert convert_original.padded_vocab(32000) == 32064
    assert math.ceil((ORIGINAL_VOCAB + 2) / 64) * 64 == convert_original.padded_vocab(ORIGINAL_VOCAB)
