"""benchmarks/memory_plan.py: its parameter counts against a meta-device model, its NF4 bytes against a hand count, its
sharded strategies against the number of GPUs, and its saved-activation measurement against the tensors a decoder
layer keeps, counted by hand from ref/llama.py, ref/kernels and ref/lora.py at a tiny width. CPU only, no weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ref.config import TextConfig
from ref.kernels import resolve
from ref.llama import DecoderLayer, causal_mask, rope_angles
from ref.lora import LoraConfig, add_lora
from ref.quant import QuantConfig, quantize_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_plan.py"


def load_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


plan = load_plan()
SEVEN_B = plan.MODELS["LLaVA-1.5-7B"]
TINY = TextConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


# --- parameters and weight bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(plan.MODELS))
def test_parameter_counts_equal_a_meta_instantiation(name):
    config = plan.MODELS[name]
    assert config.parameter_counts() == plan.meta_parameter_counts(config)
    t = config.text
    # LoRA r=8: r * (in + out) per adapted linear; q, k, v, o are D x D here, gate and up D -> M, down M -> D.
    lora = t.num_hidden_layers * 8 * (4 * 2 * t.hidden_size + 3 * (t.hidden_size + t.intermediate_size))
    assert plan.weights(config, "bfloat16", 8).lora_numel == lora


def test_model_sizes_are_the_published_ones():
    assert SEVEN_B.num_parameters == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    assert plan.MODELS["LLaVA-1.5-13B"].num_parameters == 13_351_494_656  # llava-hf/llava-1.5-13b-hf


def test_7b_nf4_weight_bytes_match_a_hand_count():
    t = SEVEN_B.text
    linears = t.num_hidden_layers * (4 * t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size)
    # 4-bit codes, plus one 8-bit absmax code per block of 64 (double quantization); everything else in 16 bits.
    hand = linears * (0.5 + 1 / 64) + (SEVEN_B.num_parameters - linears) * 2
    w = plan.weights(SEVEN_B, "nf4", 8)
    assert abs(w.layers_frozen + w.replicated - hand) / hand < 0.01
    dense = plan.weights(SEVEN_B, "bfloat16", 8)
    assert dense.layers_frozen + dense.replicated == 2 * SEVEN_B.num_parameters


# --- strategies against the number of GPUs ----------------------------------------------------------------------------


def plans(strategy, base, checkpointing=False):
    return [plan.step_plan(SEVEN_B, strategy, base, n, 2, 64, 8, checkpointing) for n in plan.GPUS]


@pytest.mark.parametrize("strategy,base", [("fsdp-lora", "float32"), ("fsdp-lora", "bfloat16"),
                                           ("fsdp-full", "float32")])
def test_sharded_strategies_fall_with_the_number_of_gpus(strategy, base):
    per_n = plans(strategy, base)
    for component in ("weights (frozen)", "trainable parameters", "gradients", "optimizer (AdamW)", "total"):
        values = [p[component] for p in per_n]
        assert all(a > b for a, b in zip(values, values[1:])), component
    assert len({p["activations (saved)"] for p in per_n}) == 1  # the batch is per GPU


def test_ddp_holds_the_whole_model_on_every_gpu():
    per_n = plans("ddp-lora", "nf4")
    for component in ("weights (frozen)", "trainable parameters", "gradients", "optimizer (AdamW)"):
        assert len({p[component] for p in per_n}) == 1, component
    assert per_n[0]["communication buffers"] == 0 < per_n[1]["communication buffers"]


def test_full_training_of_a_4bit_base_does_not_exist_and_checkpointing_saves_memory():
    assert plan.step_plan(SEVEN_B, "fsdp-full", "nf4", 8, 2, 64, 8, False) is None
    assert plan.step_plan(SEVEN_B, "fsdp-full", "bfloat16", 8, 2, 64, 8, False) is None  # no float32 master copy
    off, on = plans("ddp-lora", "nf4")[0], plans("ddp-lora", "nf4", checkpointing=True)[0]
    assert on["activations (saved)"] < off["activations (saved)"]


# --- saved activations, against a hand count of what the layer keeps -------------------------------------------------


def hand_count_lora_bf16(t: TextConfig, r: int, batch: int, tokens: int) -> int:
    """What a bf16 decoder layer with LoRA over a frozen base keeps (bytes), read off the code."""
    n, d, m = batch * tokens, t.hidden_size, t.intermediate_size
    norms = 2 * (n * d * 4 + n * 4)  # each RMSNorm: its float32 copy of x and the rsqrt (n, 1)
    lora_inputs = 6 * n * d * 4 + n * m * 4  # each of 7 LoRA linears casts its input to float32 (down's is (n, M))
    lora_downs = 7 * n * r * 4  # x A^T (n, r), float32, saved by the multiply with B
    # attention: the rotated q and k, the softmax output in float32 and its bfloat16 cast, v
    attention = 2 * n * d * 2 + batch * t.num_attention_heads * tokens**2 * (4 + 2) + n * d * 2
    swiglu = 3 * n * m * 2  # gate, silu(gate), up
    return norms + lora_inputs + lora_downs + attention + swiglu


def hand_count_full_bf16(t: TextConfig, batch: int, tokens: int) -> int:
    """The same layer trained in full (every weight requires grad, no LoRA)."""
    n, d, m = batch * tokens, t.hidden_size, t.intermediate_size
    norms = 2 * (n * d * 4 + n * 4 + n * d * 2)  # + the normed bf16 input of the gain multiply (the gain trains)
    linear_inputs = n * d * 2 + n * d * 2 + n * d * 2 + n * m * 2  # q/k/v share one input, o, gate/up share, down
    attention = 2 * n * d * 2 + batch * t.num_attention_heads * tokens**2 * (4 + 2) + n * d * 2
    return norms + linear_inputs + attention + 3 * n * m * 2


def hand_count_lora_fp32(t: TextConfig, r: int, batch: int, tokens: int) -> int:
    """In float32 the casts are no-ops: the norms keep their input itself, q/k/v (and gate/up) share one input."""
    n, d, m = batch * tokens, t.hidden_size, t.intermediate_size
    residual_and_normed = 2 * (n * d * 4 + n * 4) + 2 * n * d * 4  # x, rsqrt; the normed output the LoRAs share
    attention = 2 * n * d * 4 + batch * t.num_attention_heads * tokens**2 * 4 + n * d * 4 + n * d * 4  # + o's input
    mlp = 3 * n * m * 4 + n * m * 4  # gate, silu(gate), up; down's input
    return residual_and_normed + attention + mlp + 7 * n * r * 4


def test_saved_bytes_of_a_tiny_layer_equal_the_hand_count():
    """The `chunked` preset: reference attention and the reference LoRA op."""
    def saved(base, r):
        return plan.layer_saved_bytes(TINY, base, r, 2, 8, "chunked")
    assert saved("bfloat16", 4) == hand_count_lora_bf16(TINY, 4, 2, 8)
    assert saved("nf4", 4) == hand_count_lora_bf16(TINY, 4, 2, 8)  # 4-bit saves alike
    assert saved("bfloat16", None) == hand_count_full_bf16(TINY, 2, 8)
    assert saved("float32", 4) == hand_count_lora_fp32(TINY, 4, 2, 8)


def hand_count_fast_bf16(t: TextConfig, r: int, batch: int, tokens: int) -> int:
    """The `fast` preset's bf16 layer over a 4-bit base, on a GPU: FlashAttention keeps q, k, v, its output and a
    float32 log-sum-exp per query (plus a philox seed and offset, 16 + 8 bytes); the fused LoRA op keeps its input
    itself (q, k, v share one: the normed x) and x A^T; fused SwiGLU keeps gate and up."""
    n, d, m = batch * tokens, t.hidden_size, t.intermediate_size
    norms = 2 * (n * d * 4 + n * 4)  # each RMSNorm: its float32 copy of x and the rsqrt (n, 1)
    lora_inputs = n * d * 2 + n * d * 2 + n * d * 2 + n * m * 2  # q/k/v's normed x, o's, gate/up's normed h, down's
    lora_downs = 7 * n * r * 4  # x A^T (n, r), float32
    attention = 3 * n * d * 2 + n * d * 2 + batch * t.num_attention_heads * tokens * 4 + 24  # q, k, v; out; lse
    swiglu = 2 * n * m * 2  # gate, up
    return norms + lora_inputs + lora_downs + attention + swiglu


def test_fast_saved_bytes_of_a_tiny_layer_equal_the_hand_count():
    assert plan.layer_saved_bytes(TINY, "nf4", 4, 2, 8, "fast") == hand_count_fast_bf16(TINY, 4, 2, 8)


def test_saved_bytes_scale_with_batch_and_tokens():
    one = plan.layer_saved_bytes(TINY, "nf4", 4, 1, 16, "chunked")
    assert one > 0 and plan.layer_saved_bytes(TINY, "nf4", 4, 3, 16, "chunked") == 3 * one
    a, b = plan.per_token_terms(TINY, "nf4", 4, 8, "chunked")  # fitted at 8 and 16 tokens ...
    assert b == TINY.num_attention_heads * (4 + 2)  # the (H, T, T) probabilities: float32 and their bf16 cast
    assert plan.layer_saved_bytes(TINY, "nf4", 4, 1, 24, "chunked") == a * 24 + b * 24**2  # ... predicts 24 exactly
    _, b_fast = plan.per_token_terms(TINY, "nf4", 4, 8, "fast")
    assert abs(b_fast) < 1  # FlashAttention keeps nothing of size T x T (the fit absorbs the 24-byte philox state)


def test_checkpointed_graph_keeps_only_layer_inputs():
    off = plan.graph_bytes(TINY, "bfloat16", 4, 2, 8, checkpointing=False)
    on = plan.graph_bytes(TINY, "bfloat16", 4, 2, 8, checkpointing=True)
    assert off - on == TINY.num_hidden_layers * (plan.layer_saved_bytes(TINY, "bfloat16", 4, 2, 8) - 2 * 8 * 16 * 2)


# --- the count on meta against the tensors a real layer keeps on the CPU ------------------------------------------


def cpu_layer_saved_bytes(text: TextConfig, base: str, r: int, batch: int, tokens: int, kernels: str) -> int:
    """The same layer with real weights and inputs, run on the CPU, its saved storages counted the same way."""
    holder = nn.Module()
    holder.kernels = resolve(kernels)
    holder.language_model = nn.Module()
    holder.language_model.layers = nn.ModuleList([DecoderLayer(text, 0, holder.kernels)])
    dtype = plan.compute_dtype(base)
    holder.to(dtype)
    if base == "nf4":
        quantize_model(holder, QuantConfig())
    add_lora(holder, LoraConfig(r=r))
    layer = holder.language_model.layers[0]
    x = torch.randn(batch, tokens, text.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens)[None].expand(batch, tokens)
    cos, sin = rope_angles(positions, text.head_dim, text.rope_theta, dtype)
    mask = causal_mask(torch.ones(batch, tokens, dtype=torch.long), tokens, dtype)
    frozen = tuple(layer.parameters()) + tuple(layer.buffers()) + (cos, sin, mask)
    return plan.saved_tensor_bytes(layer, x, cos, sin, mask, None, True, exclude=frozen)


@pytest.mark.parametrize("base", ["float32", "bfloat16", "nf4"])
def test_meta_count_equals_the_bytes_a_cpu_layer_saves_chunked(base):
    assert plan.layer_saved_bytes(TINY, base, 4, 2, 8, "chunked") == cpu_layer_saved_bytes(TINY, base, 4, 2, 8,
                                                                                            "chunked")


@pytest.mark.parametrize("base", ["bfloat16", "nf4"])
def test_meta_count_equals_the_bytes_a_cpu_layer_saves_fast(base):
    """The CPU runs its own FlashAttention for sdpa: it keeps what CUDA's does but the philox seed and offset (24
    bytes). And its output comes in a layout whose (B, T, H * hd) reshape for o_proj is a view, where the meta
    device's is a copy: the plan counts that one (B, T, D) tensor more per layer than the CPU keeps, an upper bound."""
    planned = plan.layer_saved_bytes(TINY, base, 4, 2, 8, "fast")
    o_proj_input = 2 * 8 * TINY.hidden_size * 2  # (B, T, D) in bfloat16
    assert planned == cpu_layer_saved_bytes(TINY, base, 4, 2, 8, "fast") + 24 + o_proj_input


# --- the program ------------------------------------------------------------------------------------------------------


def test_json_output_and_the_readme_command_verdict(capsys):
    plan.main(["--json", "--tokens", "64", "--checkpointing", "on"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["models"]) == set(plan.MODELS)
    table = out["models"]["LLaVA-1.5-7B"]["bytes_per_GPU"]["fsdp-lora/bfloat16/checkpointing"]
    assert table["8"]["total"] < table["1"]["total"]
    assert out["readme_7b_command"]["fits_24GB"]["with_checkpointing"] is True
