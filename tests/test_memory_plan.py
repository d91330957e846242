"""benchmarks/memory_plan.py: its parameter counts against a meta-device model, its NF4 bytes against a hand count, its
sharded strategies against the number of GPUs, and its saved-activation measurement against the tensors a decoder
layer keeps, counted by hand from ref/llama.py, ref/kernels and ref/lora.py at a tiny width. CPU only, no weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ref.config import TextConfig

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
                                           ("fsdp-full", "float32"), ("fsdp-full", "bfloat16")])
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
    assert plan.layer_saved_bytes(TINY, "bfloat16", 4, 2, 8) == hand_count_lora_bf16(TINY, 4, 2, 8)
    assert plan.layer_saved_bytes(TINY, "nf4", 4, 2, 8) == hand_count_lora_bf16(TINY, 4, 2, 8)  # 4-bit saves alike
    assert plan.layer_saved_bytes(TINY, "bfloat16", None, 2, 8) == hand_count_full_bf16(TINY, 2, 8)
    assert plan.layer_saved_bytes(TINY, "float32", 4, 2, 8) == hand_count_lora_fp32(TINY, 4, 2, 8)


def test_saved_bytes_scale_with_batch_and_tokens():
    one = plan.layer_saved_bytes(TINY, "nf4", 4, 1, 16)
    assert one > 0 and plan.layer_saved_bytes(TINY, "nf4", 4, 3, 16) == 3 * one
    a, b = plan.per_token_terms(TINY, "nf4", 4, 8)  # fitted at 8 and 16 tokens ...
    assert b == TINY.num_attention_heads * (4 + 2)  # the (H, T, T) probabilities: float32 and their bf16 cast
    assert plan.layer_saved_bytes(TINY, "nf4", 4, 1, 24) == a * 24 + b * 24**2  # ... predicts 24 exactly


def test_checkpointed_graph_keeps_only_layer_inputs():
    off = plan.graph_bytes(TINY, "bfloat16", 4, 2, 8, checkpointing=False)
    on = plan.graph_bytes(TINY, "bfloat16", 4, 2, 8, checkpointing=True)
    assert off - on == TINY.num_hidden_layers * (plan.layer_saved_bytes(TINY, "bfloat16", 4, 2, 8) - 2 * 8 * 16 * 2)


# --- the program ------------------------------------------------------------------------------------------------------


def test_json_output_and_the_readme_command_verdict(capsys):
    plan.main(["--json", "--tokens", "64", "--checkpointing", "on"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["models"]) == set(plan.MODELS)
    table = out["models"]["LLaVA-1.5-7B"]["bytes_per_GPU"]["fsdp-lora/bfloat16/checkpointing"]
    assert table["8"]["total"] < table["1"]["total"]
    assert out["readme_7b_command"]["fits_24GB"]["with_checkpointing"] is True
