"""Expected memory per GPU for one textual-unlearning training step of LLaVA-1.5-7B and -13B. Not a test.

    python benchmarks/memory_plan.py                            # Markdown; batch 2, 512 tokens, LoRA r=8
    python benchmarks/memory_plan.py --tokens 1024 --checkpointing on --json

Every number comes from the models' shapes and our own modules, nothing from a rule of thumb:

- parameters: ref.config's `parameter_counts()`, checked against `ref.llava.Llava` built on the meta device;
- weight bytes: the meta model's parameters and buffers. For NF4, `ref.quant.quantize_model` puts `Linear4bit` shells
  in place of the decoder's linears, and their buffers have the exact shapes bitsandbytes fills (packed codes, 8-bit
  absmax codes, fp32 nested absmax, code tables), so the packed size is the real one;
- activations: one `ref.llama.DecoderLayer` at full width, built with the preset's kernels (--kernels), runs on the
  meta device under `torch.autograd.graph.saved_tensors_hooks`; every distinct storage autograd keeps for backward is
  counted once (parameters, buffers, and the rotary and mask tensors that all layers share are left out of the
  per-layer count and counted once per graph). That is scaled by the number of layers. On meta, PyTorch's sdpa takes
  its math path (it keeps the (B, H, T, T) probabilities); on a GPU a right-padded training batch runs FlashAttention
  (`causal`, ref/kernels/attention.py). So for the `sdpa` op the math path's saved set is replaced by the one autograd
  keeps for aten's FlashAttention op, also measured on meta;
- the loss: what the `chunked` kernels (ref/kernels/cross_entropy.py, kl.py) keep and allocate, read off their code.

Assumptions (printed with the tables):
- --batch is per GPU (data parallel: each rank runs its own batch), and each of the three terms (harmful, helpful,
  KL) has such a batch of --tokens tokens. train.py takes each term's backward before the next term's forward
  (ref.losses.unlearning_backward), so one term's graph is alive at a time. Every position but the last is counted
  as a response token (an upper bound).
- Kernels: --kernels fast (train.py's default on a real model: sdpa attention, the fused LoRA op, fused SwiGLU,
  chunked losses) or chunked (reference attention, which keeps the (B, H, T, T) probabilities, so activations grow
  with T^2, and the reference LoRA op). The reference preset's losses materialise the whole logits and are not
  planned here. Adapters are float32.
- (a) DDP + LoRA: every rank holds the whole base; DDP's gradient buckets are one more copy of the gradients.
  (b) FSDP + LoRA: the decoder layers (base and adapters) are sharded per layer; embeddings, lm_head, final norm,
  vision tower and projector are replicated on every rank. (c) FSDP full-parameter training of the decoder layers:
  float32 master weights, gradients and AdamW's two moments, sharded, plus the frozen reference copy of the layers for
  the KL term (sharded, in the compute dtype); embeddings and lm_head stay frozen. NF4 has no (c): 4-bit weights
  cannot be trained. An FSDP rank also holds one layer's unsharded parameters (and for (c) its unsharded gradients)
  while it computes; N = 1 is one GPU, with no DDP buckets.
- NF4: the decoder's linears in 4 bits (blocksize 64, double quantization), everything else in bfloat16.
- Working set: the larger of the loss kernel's temporaries and backward's (one layer's saved bytes, plus one
  decoder linear's weight dequantized to the compute dtype, which both LoRA ops and bitsandbytes make in backward).
- Not counted: the CUDA context and the caching allocator's fragmentation (leave about 1 GiB for them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import asdict, dataclass

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # run from anywhere

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ref.config import LlavaConfig, TextConfig  # noqa: E402
from ref.kernels import resolve  # noqa: E402
from ref.kernels.cross_entropy import default_chunk_rows  # noqa: E402
from ref.llama import DecoderLayer, RMSNorm, causal_mask, rope_angles  # noqa: E402
from ref.llava import Llava  # noqa: E402
from ref.lora import LoraConfig, add_lora  # noqa: E402
from ref.quant import QuantConfig, quantize_model  # noqa: E402

GIB = 2**30
CARD_24GB = 24 * GIB  # an RTX 3090 / 4090 reports 24 GiB
GPUS = (1, 2, 4, 8)
BASES = ("float32", "bfloat16", "nf4")  # the base weights' format; NF4 computes in bfloat16
STRATEGIES = {"ddp-lora": "(a) DDP + LoRA", "fsdp-lora": "(b) FSDP + LoRA", "fsdp-full": "(c) FSDP full"}
ADAM_BYTES = 8  # AdamW: two float32 moments per trainable parameter
LORA_BYTES = 4  # LoraConfig's default adapter dtype is float32
MASTER_BYTES = 4  # (c) keeps float32 master weights and gradients whatever the compute dtype
PLANNED_KERNELS = ("fast", "chunked")  # the presets for a GPU; `reference` materialises the whole logits

MODELS = {
    "LLaVA-1.5-7B": LlavaConfig(),  # the dataclass defaults are LLaVA-1.5-7B (Vicuna-7B, CLIP ViT-L/336)
    "LLaVA-1.5-13B": LlavaConfig(text=TextConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                                 num_attention_heads=40, num_key_value_heads=40)),
}

# Where each parameter of ref.llava.Llava belongs; only the decoder layers are sharded or adapted.
PARTS = (("language_model.layers.", "decoder layers"), ("language_model.embed_tokens.", "embeddings"),
         ("language_model.norm.", "final norm"), ("lm_head.", "lm_head"), ("vision_tower.", "vision tower"),
         ("multi_modal_projector.", "projector"))


def compute_dtype(base: str) -> torch.dtype:
    return torch.bfloat16 if base == "nf4" else getattr(torch, base)


def part_of(name: str) -> str:
    return next(part for prefix, part in PARTS if name.startswith(prefix))


# ---------------------------------------------------------------------------------------------------------------------
# Parameters and weight bytes, from a model built on the meta device (no memory, exact shapes)


def meta_model(config: LlavaConfig, base: str = "float32", lora_r: int | None = None) -> Llava:
    """Llava as train.py builds it (dense tensors in the compute dtype, 4-bit decoder linears, LoRA), on meta."""
    with torch.device("meta"):
        model = Llava(config)  # the weights do not depend on the kernels
    model.to(compute_dtype(base))
    if base == "nf4":
        quantize_model(model, QuantConfig())  # empty Linear4bit shells whose buffers have the packed shapes
    if lora_r:
        add_lora(model, LoraConfig(r=lora_r))  # freezes the rest
    return model


def meta_parameter_counts(config: LlavaConfig) -> dict[str, int]:
    """Parameters by ref.config's parts ("decoder" includes embeddings, final norm and lm_head), counted on meta."""
    counts = {"decoder": 0, "vision tower": 0, "projector": 0}
    for name, p in meta_model(config).named_parameters():
        part = part_of(name)
        counts[part if part in counts else "decoder"] += p.numel()
    return counts


@dataclass(frozen=True)
class Weights:
    """Bytes per part of one model in one base format; decoder layers split into frozen base and trainable adapters."""

    layers: int  # number of decoder layers
    layer_numel: int  # dense parameters of all decoder layers (what (c) trains)
    layers_frozen: int  # bytes of the decoder layers' frozen base (dense, or packed 4-bit + norms)
    replicated: int  # bytes of everything outside the decoder layers (never sharded here)
    lora_numel: int  # trainable adapter parameters (all inside the decoder layers)

    @property
    def layer_bytes(self) -> int:
        """One decoder layer, base and adapters: what FSDP all-gathers for it."""
        return (self.layers_frozen + LORA_BYTES * self.lora_numel) // self.layers


@functools.lru_cache(maxsize=None)
def weights(config: LlavaConfig, base: str, lora_r: int) -> Weights:
    model = meta_model(config, base, lora_r)
    frozen = {"layers": 0, "rest": 0}
    lora_numel = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.requires_grad:
            lora_numel += tensor.numel()
            continue
        frozen["layers" if part_of(name) == "decoder layers" else "rest"] += tensor.numel() * tensor.element_size()
    layer_numel = sum(p.numel() for p in meta_model(config).language_model.layers.parameters())
    return Weights(config.text.num_hidden_layers, layer_numel, frozen["layers"], frozen["rest"], lora_numel)


# ---------------------------------------------------------------------------------------------------------------------
# Activations: what autograd saves, measured on the meta device


def storage_key(tensor: torch.Tensor) -> int:
    """The storage a tensor views (views of one tensor share it): the unit autograd keeps alive."""
    return tensor.untyped_storage()._cdata


def saved_tensor_bytes(fn, *args, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn(*args) runs, those of `exclude` left out.

    The tensors are held until counted, so no storage is freed and reused under the same key in between."""
    skip = {storage_key(t) for t in exclude}
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor):
        key = storage_key(tensor)
        if key not in skip:
            kept[key] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args)
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def shared_inputs(text: TextConfig, batch: int, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin and the causal mask, as LlamaDecoder.forward builds them once for all its layers."""
    attention_mask = torch.ones(batch, tokens, dtype=torch.long, device="meta")
    positions = torch.arange(tokens, device="meta")[None].expand(batch, tokens)
    cos, sin = rope_angles(positions, text.head_dim, text.rope_theta, dtype)
    return cos, sin, causal_mask(attention_mask, tokens, dtype)


def meta_layer(text: TextConfig, base: str, lora_r: int | None, kernels: str) -> DecoderLayer:
    """One decoder layer under the names quantize_model and add_lora look for; without LoRA every weight trains."""
    holder = nn.Module()
    holder.kernels = resolve(kernels)  # add_lora gives the adapters the model's kernels, as it does on a Llava
    holder.language_model = nn.Module()
    with torch.device("meta"):
        holder.language_model.layers = nn.ModuleList([DecoderLayer(text, 0, holder.kernels)])
    holder.to(compute_dtype(base))
    if base == "nf4":
        quantize_model(holder, QuantConfig())
    if lora_r:
        add_lora(holder, LoraConfig(r=lora_r))
    return holder.language_model.layers[0]


@functools.lru_cache(maxsize=None)
def layer_saved_bytes(text: TextConfig, base: str, lora_r: int | None, batch: int, tokens: int,
                      kernels: str = "fast") -> int:
    """Bytes one decoder layer keeps for backward, for a (batch, tokens) input that requires grad (a middle layer;
    the first layer, whose input does not, keeps a little less), on a right-padded training batch (the decoder's
    `causal` promise). lora_r None: full-parameter training."""
    layer = meta_layer(text, base, lora_r, kernels)
    dtype = compute_dtype(base)
    x = torch.empty(batch, tokens, text.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    cos, sin, mask = shared_inputs(text, batch, tokens, dtype)
    frozen = tuple(layer.parameters()) + tuple(layer.buffers()) + (cos, sin, mask)  # counted elsewhere
    saved = saved_tensor_bytes(layer, x, cos, sin, mask, None, True, exclude=frozen)
    if resolve(kernels).choice["attention"] == "sdpa":
        saved += flash_attention_correction(text, batch, tokens, dtype)
    return saved


def flash_attention_correction(text: TextConfig, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """FlashAttention's saved bytes minus those of sdpa's math path (what the meta device runs), both measured on
    meta through autograd at the layer's shapes. q, k and v are saved by both and cancel; what differs is the math
    path's (B, H, T, T) probabilities against FlashAttention's output and float32 log-sum-exp per query."""
    shape = (batch, text.num_attention_heads, tokens, text.head_dim)  # k, v after repeat_kv: H heads
    q, k, v = (torch.empty(shape, dtype=dtype, device="meta", requires_grad=True) for _ in range(3))
    scale = text.head_dim**-0.5
    math_path = saved_tensor_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
    flash = saved_tensor_bytes(lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                                                          scale=scale))
    return flash - math_path


def per_token_terms(text: TextConfig, base: str, lora_r: int | None, tokens: int,
                    kernels: str = "fast") -> tuple[float, float]:
    """(a, b) with layer bytes = batch * (a * T + b * T^2): b is the attention probabilities of the reference kernel
    (0 for FlashAttention).

    Every saved tensor has B*T or B*H*T*T elements, so two lengths determine both coefficients."""
    one, two = (layer_saved_bytes(text, base, lora_r, 1, t, kernels) for t in (tokens, 2 * tokens))
    b = (two - 2 * one) / (2 * tokens**2)
    return (one - b * tokens**2) / tokens, b


def final_norm_saved_bytes(text: TextConfig, base: str, batch: int, tokens: int) -> int:
    with torch.device("meta"):
        norm = RMSNorm(text.hidden_size, text.rms_norm_eps, resolve()).to(compute_dtype(base))
    norm.requires_grad_(False)
    x = torch.empty(batch, tokens, text.hidden_size, dtype=compute_dtype(base), device="meta", requires_grad=True)
    return saved_tensor_bytes(norm, x, exclude=tuple(norm.parameters()))


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def graph_bytes(text: TextConfig, base: str, lora_r: int | None, batch: int, tokens: int,
                checkpointing: bool, kernels: str = "fast") -> int:
    """What one loss term's graph keeps until backward: every layer's saved tensors (or, checkpointed, only each
    layer's input), the tensors all layers share, the final norm, and the loss's own keep."""
    dtype = compute_dtype(base)
    if checkpointing:  # a checkpointed layer keeps its input (B, T, D) and recomputes the rest in backward
        layers = text.num_hidden_layers * batch * tokens * text.hidden_size * dtype.itemsize
    else:
        layers = text.num_hidden_layers * layer_saved_bytes(text, base, lora_r, batch, tokens, kernels)
    shared = sum(nbytes(t) for t in shared_inputs(text, batch, tokens, dtype))
    responses = batch * (tokens - 1)
    gather = 2 * responses * 8  # hidden[:, :-1][keep] keeps two int64 index vectors for its backward
    loss_keep = responses * text.hidden_size * dtype.itemsize  # the chunked kernels store d loss / d hidden (N, D)
    return layers + shared + final_norm_saved_bytes(text, base, batch, tokens) + gather + loss_keep


def loss_working_bytes(text: TextConfig, base: str, batch: int, tokens: int) -> int:
    """Peak temporaries inside the chunked KL kernel (the larger of the two loss kernels), read off its code: a float32
    copy of the lm_head weight (none in float32), float32 copies of both hidden sets and their gradient (M, D), and
    about four (chunk, V) float32 blocks (both log-softmaxes, p_orig, and one matmul output in flight)."""
    d, v = text.hidden_size, text.vocab_size
    weight_copy = 0 if compute_dtype(base) == torch.float32 else v * d * 4
    rows = batch * (tokens - 1)
    return weight_copy + 3 * rows * d * 4 + 4 * default_chunk_rows(v) * v * 4


def backward_working_bytes(text: TextConfig, base: str, lora_r: int | None, batch: int, tokens: int,
                           checkpointing: bool, kernels: str = "fast") -> int:
    """Backward's temporaries, estimated as one layer's saved bytes (the gradients of a layer's intermediates have
    their shapes) plus the largest decoder linear's weight dequantized to the compute dtype (a 4-bit base: both LoRA
    ops and bitsandbytes make it for d loss / d x); a checkpointed step also holds one layer's recomputed
    activations."""
    layer = layer_saved_bytes(text, base, lora_r, batch, tokens, kernels)
    dequantized = text.hidden_size * text.intermediate_size * compute_dtype(base).itemsize if base == "nf4" else 0
    return layer * (2 if checkpointing else 1) + dequantized


# ---------------------------------------------------------------------------------------------------------------------
# The plan: per-GPU bytes of one step, by component


COMPONENTS = ("weights (frozen)", "trainable parameters", "gradients", "optimizer (AdamW)", "activations (saved)",
              "working set (peak temporaries)", "communication buffers")


def static_bytes(w: Weights, strategy: str, gpus: int) -> dict[str, float]:
    """Weights, trainable parameters, gradients, optimizer state and communication buffers on one of `gpus` ranks.
    For (c), `w` is a dense base: its frozen layers are the reference copy, its layer_numel what trains."""
    n = gpus
    if strategy == "ddp-lora":
        adapters = LORA_BYTES * w.lora_numel
        return {"weights (frozen)": w.replicated + w.layers_frozen, "trainable parameters": adapters,
                "gradients": adapters, "optimizer (AdamW)": ADAM_BYTES * w.lora_numel,
                "communication buffers": adapters if n > 1 else 0}  # DDP's buckets: a copy of every gradient
    if strategy == "fsdp-lora":
        adapters = LORA_BYTES * w.lora_numel
        layer_grads = adapters / w.layers  # one layer's unsharded adapter gradients before the reduce-scatter
        return {"weights (frozen)": w.replicated + w.layers_frozen / n, "trainable parameters": adapters / n,
                "gradients": adapters / n, "optimizer (AdamW)": ADAM_BYTES * w.lora_numel / n,
                "communication buffers": w.layer_bytes + layer_grads}
    # fsdp-full: float32 master weights and gradients, AdamW moments, all sharded; a frozen reference copy, sharded
    one_layer = w.layers_frozen / w.layers  # all-gathered in the compute dtype, its gradients likewise
    return {"weights (frozen)": w.replicated + w.layers_frozen / n,
            "trainable parameters": MASTER_BYTES * w.layer_numel / n,
            "gradients": MASTER_BYTES * w.layer_numel / n,
            "optimizer (AdamW)": ADAM_BYTES * w.layer_numel / n,
            "communication buffers": 2 * one_layer}


def step_plan(config: LlavaConfig, strategy: str, base: str, gpus: int, batch: int, tokens: int, lora_r: int,
              checkpointing: bool, kernels: str = "fast") -> dict[str, float] | None:
    """Per-GPU bytes by component and their total; None where the combination does not exist: NF4 full training,
    and FSDP over an NF4 base (train.py shards dense weights only; a 4-bit base runs under DDP), and full training
    in a 16-bit dtype (train.py refuses it: the weights are updated in the compute dtype, with no float32 master)."""
    if strategy.startswith("fsdp") and base == "nf4":
        return None
    if strategy == "fsdp-full" and base != "float32":  # train.py refuses it: no float32 master weights to update
        return None
    text = config.text
    adapter_r = None if strategy == "fsdp-full" else lora_r
    plan = static_bytes(weights(config, base, lora_r), strategy, gpus)
    # one term's graph at a time: train.py backpropagates each term before the next one's forward
    plan["activations (saved)"] = graph_bytes(text, base, adapter_r, batch, tokens, checkpointing, kernels)
    # The loss kernels run in forward, backward after: their temporaries are never alive together.
    plan["working set (peak temporaries)"] = max(loss_working_bytes(text, base, batch, tokens),
                                                 backward_working_bytes(text, base, adapter_r, batch, tokens,
                                                                        checkpointing, kernels))
    plan = {name: plan[name] for name in COMPONENTS}
    plan["total"] = sum(plan.values())
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Output


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def checkpoint_modes(choice: str) -> tuple[bool, ...]:
    return {"off": (False,), "on": (True,), "both": (False, True)}[choice]


def parameter_table(name: str, config: LlavaConfig, lora_r: int) -> list[str]:
    counted, built = config.parameter_counts(), meta_parameter_counts(config)
    lines = [f"### {name}: parameters", "", "| part | ref.config | Llava on meta | equal |", "|---|---|---|---|"]
    for part in counted:
        lines.append(f"| {part} | {counted[part]:,} | {built[part]:,} | {counted[part] == built[part]} |")
    lines.append(f"| total | {sum(counted.values()):,} | {sum(built.values()):,} | {counted == built} |")
    w = weights(config, "nf4", lora_r)
    t = config.text
    linears = t.num_hidden_layers * t.hidden_size * (4 * t.hidden_size + 3 * t.intermediate_size)  # q,k,v,o; MLP
    packed_other = t.num_hidden_layers * 2 * t.hidden_size * 2  # the layers' two RMSNorm gains, bfloat16
    per_weight = (w.layers_frozen - packed_other) / linears
    lines += ["", f"LoRA r={lora_r} on q,k,v,o,gate,up,down: {w.lora_numel:,} trainable parameters. NF4: "
              f"{per_weight:.5f} bytes per decoder-linear weight (0.5 + absmax codes + nested absmax + code tables); "
              f"4-bit decoder layers {gib(w.layers_frozen)} GiB, the rest in bfloat16 {gib(w.replicated)} GiB.", ""]
    return lines


def activation_table(name: str, config: LlavaConfig, batch: int, tokens: int, lora_r: int, kernels: str) -> list[str]:
    text = config.text
    lines = [f"### {name}: saved activations of one decoder layer (kernels {kernels}; measured on meta, batch {batch}, "
             f"{tokens} tokens)",
             "", "| variant | MiB per layer | bytes per token = a + b * T | per graph, all layers (GiB) |",
             "|---|---|---|---|"]
    variants = [(f"LoRA r={lora_r}, NF4 base, bf16", "nf4", lora_r), (f"LoRA r={lora_r}, dense bf16 base", "bfloat16",
                lora_r), (f"LoRA r={lora_r}, dense fp32 base", "float32", lora_r),
                ("full training, bf16", "bfloat16", None), ("full training, fp32", "float32", None)]
    for label, base, r in variants:
        layer = layer_saved_bytes(text, base, r, batch, tokens, kernels)
        a, b = per_token_terms(text, base, r, tokens, kernels)
        lines.append(f"| {label} | {layer / 2**20:.1f} | {a:,.0f} + {b:,.0f} * T | "
                     f"{gib(text.num_hidden_layers * layer)} |")
    note = ("The 4-bit and the dense base keep the same: a frozen nn.Linear and bitsandbytes' MatMul4Bit save nothing "
            "but their weight. A b * T part is the reference attention's (B, H, T, T) probabilities (float32, plus "
            "their bfloat16 cast; kernels chunked), none with FlashAttention (fast). The reference LoRA op keeps a "
            "float32 copy of each adapted linear's input; the fused one keeps the input itself, shared by q, k, v.")
    return lines + ["", note, ""]


def strategy_table(name: str, config: LlavaConfig, args) -> list[str]:
    modes = checkpoint_modes(args.checkpointing)
    cell_note = " (without / with activation checkpointing)" if len(modes) == 2 else (
        " (with activation checkpointing)" if modes[0] else " (without activation checkpointing)")
    lines = [f"### {name}: GiB per GPU{cell_note}, batch {args.batch} x {args.tokens} tokens per term", "",
             "| strategy | base | " + " | ".join(f"N={n}" for n in GPUS) + " |", "|---|---|" + "---|" * len(GPUS)]
    for strategy, label in STRATEGIES.items():
        for base in BASES:
            cells = []
            for n in GPUS:
                plans = [step_plan(config, strategy, base, n, args.batch, args.tokens, args.lora_r, c, args.kernels)
                         for c in modes]
                cells.append("n/a" if plans[0] is None else " / ".join(gib(p["total"]) for p in plans))
            lines.append(f"| {label} | {base} | " + " | ".join(cells) + " |")
    return lines + [""]


def breakdown(args) -> tuple[list[str], dict]:
    """README's 7B command: NF4 + LoRA, bfloat16, one GPU; each component with and without checkpointing."""
    config = MODELS["LLaVA-1.5-7B"]
    plans = {c: step_plan(config, "ddp-lora", "nf4", 1, args.batch, args.tokens, args.lora_r, c, args.kernels)
             for c in (False, True)}
    lines = [f"### README's 7B command on one GPU: NF4 + LoRA r={args.lora_r}, bfloat16, kernels {args.kernels}, "
             f"batch {args.batch}, {args.tokens} tokens per term", "",
             "| component | without checkpointing (GiB) | with (GiB) |",
             "|---|---|---|"]
    for component in (*COMPONENTS, "total"):
        lines.append(f"| {component} | {gib(plans[False][component])} | {gib(plans[True][component])} |")
    verdicts = {c: plans[c]["total"] + GIB <= CARD_24GB for c in plans}
    _, b = per_token_terms(config.text, "nf4", args.lora_r, args.tokens, args.kernels)
    attention = max(0.0, config.text.num_hidden_layers * args.batch * b * args.tokens**2)  # the T^2 part of a graph
    lines += ["", "Fits a 24 GB card (24 GiB, 1 GiB left for the CUDA context and fragmentation): "
              f"without checkpointing {'yes' if verdicts[False] else 'no'} ({gib(plans[False]['total'])} GiB), "
              f"with checkpointing {'yes' if verdicts[True] else 'no'} ({gib(plans[True]['total'])} GiB; "
              "train.py --activation-checkpointing). Of the saved activations without checkpointing, "
              f"{gib(attention)} GiB are attention probabilities (B, H, T, T).", ""]
    return lines, {"without_checkpointing": plans[False], "with_checkpointing": plans[True],
                   "fits_24GB": {"without_checkpointing": verdicts[False], "with_checkpointing": verdicts[True]}}


def as_json(args) -> dict:
    out = {"batch": args.batch, "tokens": args.tokens, "lora_r": args.lora_r, "kernels": args.kernels, "models": {}}
    for name, config in MODELS.items():
        tables = {}
        for strategy in STRATEGIES:
            for base in BASES:
                for c in checkpoint_modes(args.checkpointing):
                    key = f"{strategy}/{base}/{'checkpointing' if c else 'no-checkpointing'}"
                    tables[key] = {n: step_plan(config, strategy, base, n, args.batch, args.tokens, args.lora_r, c,
                                                args.kernels) for n in GPUS}
        out["models"][name] = {"parameters": config.parameter_counts(),
                               "parameters_meta": meta_parameter_counts(config),
                               "weights": {b: asdict(weights(config, b, args.lora_r)) for b in BASES},
                               "bytes_per_GPU": tables}
    out["readme_7b_command"] = breakdown(args)[1]
    return out


def markdown(args) -> str:
    lines = ["## Memory per GPU for one textual-unlearning step", "",
             "Assumptions: see this script's docstring. --batch is per GPU; one loss term's graph is alive at a time "
             f"(train.py backpropagates each term before the next); kernels `{args.kernels}`. "
             "(b) and (c) shard the decoder layers only: embeddings, lm_head, vision tower and projector are "
             "replicated on every rank. (c) trains float32 master weights with float32 gradients and AdamW moments "
             "and keeps a frozen reference copy of the layers for the KL term. CUDA context and fragmentation are "
             "not counted.", ""]
    for name, config in MODELS.items():
        lines += parameter_table(name, config, args.lora_r)
        lines += activation_table(name, config, args.batch, args.tokens, args.lora_r, args.kernels)
        lines += strategy_table(name, config, args)
    lines += breakdown(args)[0]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=positive_int, default=2, help="records per loss term per GPU (default 2)")
    parser.add_argument("--tokens", type=positive_int, default=512, help="tokens per record (default 512)")
    parser.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--kernels", choices=PLANNED_KERNELS, default="fast",
                        help="kernel preset (default fast, train.py's on a real model)")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="activation checkpointing in the strategy tables (default both: 'without / with')")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (a position predicts the next token)")
    print(json.dumps(as_json(args), indent=1) if args.json else markdown(args))


if __name__ == "__main__":
    main()
