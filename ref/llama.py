"""The LLaMA decoder (Vicuna-7B in LLaVA-1.5): RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU MLP.

    embeddings (B, T, D)
      -> L blocks: h = x + attn(rms_norm(x)); out = h + mlp(rms_norm(h))
      -> final rms_norm                                                    # (B, T, D), the lm_head is the caller's
Every performance-critical op goes through the kernel table (`self.kernels.<op>`), so each hook point is visible here.
The linears are plain `nn.Linear` modules; QLoRA replaces them by module swap (anything with forward(x) will do).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ref.config import TextConfig
from ref.kernels import Kernels, resolve


class KVCache:
    """Keys and values of every layer for the positions seen so far: (B, Hkv, T_past, hd) each.

    `reserve`: room for that many positions past the first update (generation's new tokens), allocated once with it:
    each later update writes into the buffer in place and the layer reads a view, instead of copying the whole cache
    into a new tensor per token. Past the reserve, and whenever gradients are on (an in-place write would change a
    tensor an earlier step's graph saved), updates fall back to concatenation.
    """

    def __init__(self, num_layers: int, reserve: int = 0):
        self.reserve = reserve
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # (B, Hkv, capacity, hd) buffers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers  # positions filled in each layer's buffers

    @property
    def length(self) -> int:
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v (B, Hkv, T_new, hd) and return all of them so far (B, Hkv, T_past + T_new, hd)."""
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if self.keys[layer] is None:
            shape = (*k.shape[:2], end + self.reserve, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        elif end > self.keys[layer].shape[2] or torch.is_grad_enabled():  # grow by concatenation
            self.keys[layer] = torch.cat([self.keys[layer][:, :, :start], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer][:, :, :start], v], dim=2)
            self.lengths[layer] = end
            return self.keys[layer], self.values[layer]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of the rotary angles, (B, T, hd), in the `cat(freqs, freqs)` layout of `rotate_half`.

    inv_freq_i = 1 / theta^(2i / hd) for i < hd / 2; angle(p, i) = p * inv_freq_i. Computed in float32 whatever the
    model dtype (16-bit positions lose whole units beyond 2048), then cast, as LLaMA does.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,)
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def causal_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, Tq, Tk): 0 where query i may attend key j, the dtype's minimum elsewhere.

    Keys are the cached positions followed by the Tq new ones, so query i sits at key index Tk - Tq + i and may see
    keys j <= that index that are not padding. A query that is itself left padding sees no key at all; we let it see
    itself so its softmax stays finite (its output is never used: padded positions are masked out of every loss).
    """
    b, tk = attention_mask.shape
    device = attention_mask.device
    query_index = torch.arange(tk - query_len, tk, device=device)  # (Tq,)
    key_index = torch.arange(tk, device=device)  # (Tk,)
    allowed = (key_index[None, :] <= query_index[:, None])[None] & attention_mask[:, None, :].bool()  # (B, Tq, Tk)
    allowed |= key_index[None, None, :] == query_index[None, :, None]  # padding queries see themselves
    mask = torch.zeros(b, 1, query_len, tk, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row's real tokens come first (1s, then only 0s): then each real query's keys are exactly those at or
    before it, the causal pattern, and the padding keys matter only to padding queries (training batches). Reads the
    mask: on an accelerator, a host-device synchronisation (the decoder skips it when told `right_padded`)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: Kernels):
        super().__init__()
        self.kernels, self.eps = kernels, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_index: int, kernels: Kernels):
        super().__init__()
        self.kernels, self.layer_index = kernels, layer_index
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, causal: bool = False) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = self.kernels.rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, Hkv, T_past + T, hd)
        out = self.kernels.attention(q, k, v, mask, self.head_dim**-0.5, causal)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        d, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(d, m, bias=bias), nn.Linear(d, m, bias=bias)
        self.down_proj = nn.Linear(m, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_index: int, kernels: Kernels):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.self_attn = Attention(config, layer_index, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.mlp = MLP(config, kernels)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    def __init__(self, config: TextConfig, kernels: Kernels | None = None):
        super().__init__()
        kernels = kernels or resolve()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, kernels) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.gradient_checkpointing = False  # recompute each layer in backward instead of keeping its activations

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                right_padded: bool | None = None) -> torch.Tensor:
        """inputs_embeds (B, T, D); attention_mask (B, T_past + T), 1 = real token; returns normed hidden (B, T, D).

        right_padded: whether the mask is right padded (`is_right_padded`), when the caller knows it without reading
        the mask (a training batch: ref.losses.Positions found it on the host); None: checked here, which on an
        accelerator makes the host wait for the device once per forward. True with a mask that is not right padded
        is a broken promise: kernels that take the causal shortcut (sdpa) would let real queries see padding keys.
        """
        b, t, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (b, past + t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + t)} "
                             f"(batch, cached + new tokens)")
        if position_ids is None:
            # Count real tokens only, so a left-padded row gets the same positions as the same row unpadded.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        limit = self.config.max_position_embeddings
        if past + t > limit:
            raise ValueError(f"sequence of {past + t} tokens exceeds the model's context of {limit} "
                             f"(max_position_embeddings)")
        cos, sin = rope_angles(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        mask = causal_mask(attention_mask, t, inputs_embeds.dtype)  # (B, 1, T, T_past + T)
        if past == 0 and right_padded is None:
            right_padded = is_right_padded(attention_mask)
        causal = past == 0 and right_padded  # the mask is plain causal for every real query
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, causal)
        return self.norm(x)  # (B, T, D)
