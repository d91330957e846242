"""LoRA (ref.lora) against the formula computed by hand, against the base it wraps, and against peft on transformers.

The peft tests are the independent check of the whole adapter, both ways: trained by our code and saved (peft's format)
then loaded by peft onto transformers' LlavaForConditionalGeneration holding the same dense weights, and trained with
peft on transformers' LLaVA then loaded into ours: the logits must agree.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import random_linear, randomize_adapters, tiny_config, tiny_llava
from ref import adapters, lora, quant, weights
from ref.config import LlavaConfig, TextConfig
from ref.lora import LoraConfig, LoraError, LoraLinear
from ref.quant import Linear4bit

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- one LoraLinear ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_kind", ["dense", "4bit"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_is_base_plus_scaled_BAx_by_hand(base_kind, use_rslora):
    dense = random_linear(64, 48)
    base = dense if base_kind == "dense" else Linear4bit.from_linear(dense)
    module = LoraLinear(base, r=4, alpha=8, use_rslora=use_rslora)
    with torch.no_grad():
        module.lora_B.weight.normal_()
    x = torch.randn(2, 5, 64)
    scaling = 8 / math.sqrt(4) if use_rslora else 8 / 4
    w = dense.weight if base_kind == "dense" else base.dequantize()
    a, b = module.lora_A.weight, module.lora_B.weight
    by_hand = F.linear(x, w, dense.bias) + scaling * (x @ a.T @ b.T)  # (2, 5, 48)
    torch.testing.assert_close(module(x), by_hand)


def test_initialisation_kaiming_A_zero_B_and_fresh_adapter_changes_nothing():
    base = random_linear(256, 32)
    module = LoraLinear(base, r=16, alpha=32)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
    a = module.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # uniform(-b, b) has std b / sqrt(3)
    assert torch.count_nonzero(module.lora_B.weight) == 0
    x = torch.randn(3, 256)
    assert torch.equal(module(x), base(x))


def test_adapter_dtype_is_its_own():
    """bf16 base, fp32 adapter: x is cast to fp32 for the adapter and the update back to bf16."""
    base = random_linear(64, 32).to(torch.bfloat16)
    module = LoraLinear(base, r=4, alpha=4, dtype=torch.float32)
    with torch.no_grad():
        module.lora_B.weight.normal_()
    assert module.lora_A.weight.dtype == torch.float32
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    update = (x.float() @ module.lora_A.weight.T @ module.lora_B.weight.T).to(torch.bfloat16)
    torch.testing.assert_close(y, base(x) + update)


def test_merge_unmerge_dense_restores_weights_and_merged_equals_adapted():
    base = random_linear(64, 48)
    original = base.weight.detach().clone()
    module = LoraLinear(base, r=4, alpha=8)
    with torch.no_grad():
        module.lora_B.weight.normal_()
    x = torch.randn(3, 64)
    adapted = module(x)
    module.merge()
    torch.testing.assert_close(base(x), adapted)  # the base alone now carries the update
    torch.testing.assert_close(module(x), adapted)  # and the wrapper does not add it twice
    module.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    with pytest.raises(LoraError, match="not merged"):
        module.unmerge()


def test_merge_into_4bit_is_refused_and_leaves_the_base_untouched():
    """W + s B A re-quantized to 4 bits would be neither the adapted model nor, after unmerging, the base (adapters
    off would stop being the original model): merging into a 4-bit base is refused before anything changes."""
    base = Linear4bit.from_linear(random_linear(128, 64))
    packed = {name: buffer.clone() for name, buffer in base.named_buffers()}
    module = LoraLinear(base, r=4, alpha=8)
    with torch.no_grad():
        module.lora_B.weight.normal_()
    x = torch.randn(3, 128)
    adapted = module(x)
    with pytest.raises(LoraError, match="cannot merge a LoRA adapter into a 4-bit base.*merge_adapter"):
        module.merge()
    dense = LoraLinear(random_linear(128, 128, seed=1), r=4, alpha=8)  # merged first if nothing checked ahead
    dense_weight = dense.base_layer.weight.detach().clone()
    with torch.no_grad():
        dense.lora_B.weight.normal_()
    for merge in (lora.merge_lora, lora.merge_and_unload):
        mixed = nn.Sequential(dense, module)
        with pytest.raises(LoraError, match=r"^1: cannot merge a LoRA adapter into a 4-bit base"):
            merge(mixed)
        assert mixed[0] is dense and not dense.merged and torch.equal(dense.base_layer.weight, dense_weight)
    assert not module.merged and all(torch.equal(b, packed[n]) for n, b in base.named_buffers())
    torch.testing.assert_close(module(x), adapted, rtol=0, atol=0)


# --- on a tiny LLaVA --------------------------------------------------------------------------------------------------


def token_batch(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def image_batch(config: LlavaConfig, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt with an image: text, the image's tokens, text; and random pixels."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = torch.full((config.image_seq_length,), config.image_token_index)
    ids = torch.cat([torch.randint(3, 100, (4,), generator=generator), image_tokens,
                     torch.randint(3, 100, (5,), generator=generator)])[None]  # (1, T)
    size = config.vision.image_size
    return ids, torch.randn(1, 3, size, size, generator=generator)  # (1, 3, S, S)


def train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        ids = token_batch(seed=100 + step)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_targets_are_the_decoder_linears_only():
    model = tiny_llava()
    names = lora.add_lora(model, LoraConfig(r=4))
    assert len(names) == 2 * 7
    assert all(n.startswith("language_model.layers.") and n.rpartition(".")[2] in TARGETS for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}.weight" for n in names for part in ("lora_A", "lora_B")}


def test_only_adapter_tensors_change_when_training_over_a_4bit_base():
    model = tiny_llava()
    quant.quantize_model(model)
    lora.add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter_keys = set(lora.lora_state_dict(model))
    assert changed == adapter_keys  # every adapter tensor moved, nothing else did


@torch.no_grad()
def test_adapters_disabled_is_the_base_exactly():
    base = tiny_llava()
    model = tiny_llava()
    quant.quantize_model(base)
    quant.quantize_model(model)
    lora.add_lora(model, LoraConfig(r=4))
    randomize_adapters(model)
    ids = token_batch()
    adapted = model(ids)
    with lora.adapters_disabled(model):
        assert torch.equal(model(ids), base(ids))
    assert torch.equal(model(ids), adapted)  # switched back on
    assert not torch.allclose(adapted, base(ids))


@torch.no_grad()
def test_merged_dense_model_equals_adapted_model_and_unmerge_restores():
    model = tiny_llava()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, LoraConfig(r=4, alpha=16))
    randomize_adapters(model)
    ids = token_batch()
    adapted = model(ids)
    lora.merge_lora(model)
    with pytest.raises(LoraError, match="merged"):
        with lora.adapters_disabled(model):
            pass
    torch.testing.assert_close(model(ids), adapted)
    lora.unmerge_lora(model)
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            torch.testing.assert_close(value, original[key.replace(".base_layer", "")], rtol=0, atol=1e-6)
    lora.merge_and_unload(model)
    assert not lora.lora_modules(model)
    assert set(model.state_dict()) == set(original)  # a plain Llava again
    torch.testing.assert_close(model(ids), adapted)


# --- adapter files (peft's format; ref.adapters) ----------------------------------------------------------------------


def test_save_and_load_adapter_round_trip(tmp_path):
    config = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True)
    model = tiny_llava()
    lora.add_lora(model, config)
    randomize_adapters(model)
    adapters.save_adapter(model, tmp_path, config, base_model="/models/tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (raw["peft_type"], raw["r"], raw["lora_alpha"], raw["use_rslora"], raw["base_model_name_or_path"]) == \
        ("LORA", 4, 8, True, "/models/tiny")
    loaded = tiny_llava()
    assert adapters.load_adapter(loaded, tmp_path) == config
    for key, value in lora.lora_state_dict(model).items():
        assert torch.equal(lora.lora_state_dict(loaded)[key], value)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_adapters_of_earlier_versions_still_load(tmp_path):
    """lora.json + lora.safetensors under our module names, as train.py wrote them before peft's format."""
    config = LoraConfig(r=4, alpha=8)
    model = tiny_llava()
    lora.add_lora(model, config)
    randomize_adapters(model)
    save_file({k: v.contiguous() for k, v in lora.lora_state_dict(model).items()}, str(tmp_path / "lora.safetensors"))
    (tmp_path / "lora.json").write_text(json.dumps(config.to_dict()))
    loaded = tiny_llava()
    assert adapters.load_adapter(loaded, tmp_path) == config
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    raw = config.to_dict()
    (tmp_path / "lora.json").write_text(json.dumps({**raw, "targets": ["q_proj", "k_proj"]}))
    with pytest.raises(LoraError, match="does not fit this model.*unexpected"):
        adapters.load_adapter(tiny_llava(), tmp_path)
    (tmp_path / "lora.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "alpha"}))
    with pytest.raises(LoraError, match=r"lora.json: missing field\(s\) \['alpha'\]"):
        adapters.load_adapter(tiny_llava(), tmp_path)


@pytest.fixture()
def saved_adapter(tmp_path):
    config = LoraConfig(r=4, alpha=8)
    model = tiny_llava()
    lora.add_lora(model, config)
    adapters.save_adapter(model, tmp_path, config)
    return tmp_path


def test_adapter_for_another_base_is_refused(saved_adapter):
    wider = tiny_config()
    wider = LlavaConfig(vision=wider.vision, image_token_index=126, pad_token_id=127,
                        text=TextConfig(**{**wider.text.__dict__, "intermediate_size": 128}))
    model = tiny_llava(config=wider)
    with pytest.raises(LoraError, match=r"down_proj.lora_A.weight has shape \(4, 96\), this model needs \(4, 128\)"):
        adapters.load_adapter(model, saved_adapter)
    assert not lora.lora_modules(model)  # refused before the model was touched
    shallower = tiny_config()
    shallower = LlavaConfig(vision=shallower.vision, image_token_index=126, pad_token_id=127,
                            text=TextConfig(**{**shallower.text.__dict__, "num_hidden_layers": 1}))
    with pytest.raises(LoraError, match=r"not all linears of this model.*adapter for another base"):
        adapters.load_adapter(tiny_llava(config=shallower), saved_adapter)


@pytest.mark.parametrize("change, match", [
    ({"use_dora": True}, r"uses \['use_dora'\], which this LoRA does not compute"),
    ({"bias": "all"}, r"uses \['bias'\]"),
    ({"modules_to_save": ["lm_head"]}, r"uses \['modules_to_save'\]"),
    ({"rank_pattern": {"q_proj": 8}}, r"uses \['rank_pattern'\]"),
    ({"peft_type": "IA3"}, r"peft_type 'IA3'; only LORA"),
    ({"r": 0}, r"adapter_config.json: r must be a positive integer, got 0"),
    ({"r": 2}, r"has shape \(4, 96\), this model needs \(2, 96\)"),
])
def test_peft_settings_this_lora_does_not_compute_are_refused(saved_adapter, change, match):
    config_file = saved_adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(LoraError, match=match):
        adapters.load_adapter(tiny_llava(), saved_adapter)


def test_broken_adapter_files_are_refused(saved_adapter):
    config_file = saved_adapter / "adapter_config.json"
    config_file.write_text("{not json")
    with pytest.raises(LoraError, match="not valid JSON"):
        adapters.load_adapter(tiny_llava(), saved_adapter)
    config_file.unlink()
    with pytest.raises(LoraError, match="not an adapter folder"):
        adapters.load_adapter(tiny_llava(), saved_adapter)
    stored = load_file(saved_adapter / "adapter_model.safetensors")
    key = next(iter(stored))
    save_file({**stored, key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(3)},  # DoRA's
              str(saved_adapter / "adapter_model.safetensors"))
    config_file.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    with pytest.raises(LoraError, match="is not a LoRA A or B weight"):
        adapters.load_adapter(tiny_llava(), saved_adapter)


def test_bad_settings_are_refused():
    for bad in (dict(r=0), dict(r=-2), dict(r=2.5), dict(alpha=0), dict(dropout=1.0), dict(targets=()),
                dict(targets="q_proj"), dict(dtype="float64")):
        with pytest.raises(LoraError):
            LoraConfig(**bad)
    with pytest.raises(LoraError, match=r"\['qproj'\] match no linear module"):
        lora.add_lora(tiny_llava(), LoraConfig(targets=("q_proj", "qproj")))
    with pytest.raises(LoraError, match="match no linear module under 'vision'"):
        lora.add_lora(tiny_llava(), LoraConfig(scope="vision"))
    model = tiny_llava()
    lora.add_lora(model)
    with pytest.raises(LoraError, match="already has LoRA adapters"):
        lora.add_lora(model)


# --- peft interoperability --------------------------------------------------------------------------------------------


def transformers_llava(ours):
    """transformers' LLaVA holding the same weights as our model (its in-memory names, transformers 5.x)."""
    transformers = pytest.importorskip("transformers", reason="PEFT interop compares against transformers' LLaVA")
    hf = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(**{k: v for k, v in ours.config.to_llava_hf_dict().items()
                                    if k not in ("architectures", "model_type")})).eval()
    hf.set_attn_implementation("eager")
    internal_to_hf = weights.LAYOUTS["hf-5-memory"].to_external
    missing, unexpected = hf.load_state_dict({internal_to_hf(k): v for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and not missing
    return hf


def test_train_py_adapter_loads_in_peft_on_transformers_llava_with_same_logits(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT interop needs peft (tests/requirements.txt)")
    ours = tiny_llava(seed=3)
    hf = transformers_llava(ours)
    config = LoraConfig(r=4, alpha=8, dropout=0.05)
    names = lora.add_lora(ours, config)
    train_steps(ours, steps=3)
    adapters.save_adapter(ours, tmp_path, config)  # what train.py writes

    stored = load_file(tmp_path / adapters.PEFT_WEIGHTS)
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in stored
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == {adapters.hf_module_name(n) for n in names}  # target_modules picks exactly our modules
    ids = token_batch(seed=7)
    with torch.no_grad():
        ours_logits = ours(ids)
        peft_logits = peft_model(input_ids=ids).logits
        with lora.adapters_disabled(ours):
            base_logits = ours(ids)
    assert (ours_logits - base_logits).abs().max() > 1e-3  # the trained adapter does change the logits
    torch.testing.assert_close(ours_logits, peft_logits)


def test_adapter_trained_with_peft_on_transformers_llava_loads_into_ours_with_same_logits(tmp_path):
    """peft's own adapter, target_modules ["q_proj", "v_proj"] (which reaches the vision tower's attention too),
    rsLoRA, random B so that it changes the output: our model with it gives transformers' logits, image included."""
    peft = pytest.importorskip("peft", reason="PEFT interop needs peft (tests/requirements.txt)")
    ours = tiny_llava(seed=5)
    hf = transformers_llava(ours)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                         use_rslora=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path)
    config = adapters.load_adapter(ours, tmp_path)
    assert (config.r, config.alpha, config.use_rslora) == (4, 16, True)
    assert any(name.startswith("vision_tower.") for name in lora.lora_modules(ours))
    ids, pixels = image_batch(ours.config)
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(ours.eval()(ids, pixel_values=pixels), theirs)


# --- weights_tools: merge an adapter into a dense checkpoint, quantize ahead of time ----------------------------------


def test_merge_adapter_tool_writes_a_dense_checkpoint_equal_to_the_adapted_model(tmp_path):
    from weights_tools import merge_adapter

    model = tiny_llava()
    weights.save_model(model, tmp_path / "base")
    config = LoraConfig(r=4, alpha=8)
    lora.add_lora(model, config)
    randomize_adapters(model)
    adapters.save_adapter(model, tmp_path / "adapter", config)
    merge_adapter.main([str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"),
                        "--dtype", "float32"])
    merged = weights.load_model(tmp_path / "merged")
    assert not lora.lora_modules(merged)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids))


def test_quantize_tool_matches_quantize_on_load(tmp_path):
    from weights_tools import quantize

    weights.save_model(tiny_llava(), tmp_path / "dense")
    quantize.main([str(tmp_path / "dense"), str(tmp_path / "q4"), "--dtype", "float32"])
    assert weights.is_quantized_checkpoint(tmp_path / "q4")
    streamed = weights.load_model(tmp_path / "dense", quantize="nf4")
    loaded = weights.load_model(tmp_path / "q4")
    for key, value in streamed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # an adapter trains on the pre-quantized model as on any other
    lora.add_lora(loaded, LoraConfig(r=2))
    train_steps(loaded, steps=1)


def test_adapters_added_to_a_model_in_eval_mode_have_dropout_off():
    """Dropout must not leak into evaluation: a loaded adapter follows the model's train/eval mode."""
    model = tiny_llava(seed=5).eval()
    lora.add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.5))
    randomize_adapters(model, seed=6)
    ids = token_batch(seed=7)
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
    model.train()
    assert all(m.training for m in lora.lora_modules(model).values())


# --- values that would make every output NaN: refused by file and key or tensor ---------------------------------------


NAN, INF = float("nan"), float("inf")  # json.dumps writes NaN and Infinity, which Python's json reads back


@pytest.mark.parametrize("key, value, problem", [
    ("lora_alpha", NAN, "lora_alpha must be a finite number > 0, got NaN"),
    ("lora_alpha", INF, "lora_alpha must be a finite number > 0, got Infinity"),
    ("lora_alpha", 0, "lora_alpha must be a finite number > 0, got 0"),
    ("lora_alpha", -8, "lora_alpha must be a finite number > 0, got -8"),
    ("lora_alpha", "8", 'lora_alpha must be a finite number > 0, got "8" (a string)'),
    ("lora_alpha", 1e30, "lora_alpha 1e+30 at r 4 scales the update by 2.5e+29, more than 10000 (no LoRA setting "
                         "comes near; the update would overflow)"),
    ("r", -4, "r must be a positive integer, got -4"),
    ("r", 4.0, "r must be a positive integer, got 4.0"),
    ("r", True, "r must be a positive integer, got true (a boolean)"),
    ("lora_dropout", NAN, "lora_dropout must be in [0, 1), got NaN"),
    ("lora_dropout", "0.1", 'lora_dropout must be in [0, 1), got "0.1" (a string)'),
    ("use_rslora", "yes", 'use_rslora must be true or false, got "yes" (a string)'),
])
def test_adapter_config_values_are_refused_by_file_and_key(saved_adapter, key, value, problem):
    config_file = saved_adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), key: value}))
    for load in (lambda: adapters.load_adapter(tiny_llava(), saved_adapter),
                 lambda: adapters.read_adapter_config(saved_adapter)):  # the merge tool's check before loading
        with pytest.raises(LoraError) as err:
            load()
        assert str(err.value) == f"{config_file}: {problem}"


def test_legacy_lora_json_values_are_refused_by_file_and_key(tmp_path):
    raw = LoraConfig(r=4, alpha=8).to_dict()
    for key, value, problem in (("alpha", NAN, "LoRA alpha must be a finite number > 0, got NaN"),
                                ("alpha", 1e30, "LoRA alpha 1e+30 at LoRA rank r 4 scales the update by 2.5e+29"),
                                ("r", 0, "LoRA rank r must be a positive integer, got 0")):
        (tmp_path / "lora.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(LoraError) as err:
            adapters.load_adapter(tiny_llava(), tmp_path)
        assert str(err.value).startswith(f"{tmp_path / 'lora.json'}: {problem}")
    for bad in (dict(alpha=NAN), dict(alpha=INF), dict(alpha=True), dict(r=True), dict(alpha=1e5, r=1),
                dict(alpha=1e5, r=4, use_rslora=True), dict(dropout=NAN), dict(use_rslora=1)):
        with pytest.raises(LoraError):
            LoraConfig(**bad)
    assert LoraConfig(alpha=1e4, r=1).scaling == 1e4  # the bound itself is allowed


def adapter_file_with(folder, key_part: str, value: float):
    """Put `value` into the first stored tensor whose key contains `key_part`; return that key."""
    file = next(folder.glob("*.safetensors"))
    tensors = load_file(file)
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(file))
    return file, key, tensors[key].numel()


@pytest.mark.parametrize("fmt", ["peft", "lora.json"])
@pytest.mark.parametrize("bad, counts", [(NAN, "1 NaN, 0 inf"), (-INF, "0 NaN, 1 inf")])
def test_non_finite_adapter_tensors_are_refused_by_file_and_tensor(tmp_path, fmt, bad, counts):
    config = LoraConfig(r=4, alpha=8)
    model = tiny_llava()
    lora.add_lora(model, config)
    if fmt == "peft":
        adapters.save_adapter(model, tmp_path, config)
    else:
        state = {k: v.contiguous() for k, v in lora.lora_state_dict(model).items()}
        save_file(state, str(tmp_path / "lora.safetensors"))
        (tmp_path / "lora.json").write_text(json.dumps(config.to_dict()))
    file, key, numel = adapter_file_with(tmp_path, "layers.1.mlp.up_proj.lora_B", bad)
    target = tiny_llava()
    with pytest.raises(LoraError) as err:
        adapters.load_adapter(target, tmp_path)
    assert str(err.value) == f"{file}: tensor {key!r} holds non-finite values ({counts} among {numel})"
    assert not lora.lora_modules(target)  # checked before the model was touched


def test_merge_never_makes_a_weight_non_finite_and_leaves_the_model_as_it_was():
    model = tiny_llava()
    lora.add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_adapters(model)
    name = "language_model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        model.get_submodule(name).lora_A.weight[0, 0] = float("nan")  # a diverged adapter, in memory
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for merge in (lora.merge_and_unload, lora.merge_lora):
        with pytest.raises(LoraError) as err:
            merge(model)
        n_nan = model.get_submodule(name).base_layer.weight.shape[0]  # NaN in A's column 0 reaches every output row
        assert str(err.value) == f"{name}.weight: not merged: W + s B A holds non-finite values ({n_nan} NaN, 0 inf " \
                                 f"among {n_nan * 64})"
        assert set(lora.lora_modules(model)) and not any(m.merged for m in lora.lora_modules(model).values())
        for key, value in model.state_dict().items():  # the modules merged before it were unmerged
            torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, equal_nan=True)


def test_merge_into_a_half_precision_base_that_would_overflow_is_refused(tmp_path):
    model = tiny_llava().half()
    lora.add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_adapters(model, scale=1e6)  # s B A reaches ~1e6, past float16's 65504
    with pytest.raises(LoraError, match=r"^language_model\.layers\.0\.self_attn\.q_proj\.weight: not merged: "
                                        r"W \+ s B A overflows float16 \(largest \|value\| .* in float32\): use "
                                        r"bfloat16 or float32"):
        lora.merge_and_unload(model)
    # merged in float32 the weights are finite, but saving them in float16 would write inf: refused by the writer
    model = tiny_llava()
    weights.save_model(model, tmp_path / "base")
    lora.add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_adapters(model, scale=1e6)
    lora.merge_and_unload(model)
    with pytest.raises(weights.CheckpointError, match=r"model\.safetensors: not written: tensor "
                                                      r"'language_model\.model\.layers\.0\..*' overflows float16"):
        weights.save_model(model, tmp_path / "merged", dtype=torch.float16)
    assert not (tmp_path / "merged").exists()
