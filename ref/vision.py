"""The CLIP vision transformer, as much of it as LLaVA uses.

    pixels (N, 3, S, S)
      -> conv patch embedding (no bias), prepend CLS, add learned positions   # (N, 1 + P, D), P = (S // patch)^2
      -> pre_layrnorm                                                         # hidden state 0
      -> L pre-LN encoder layers, bidirectional attention, quick_gelu MLP     # hidden state i = output of layer i - 1
LLaVA takes one of these hidden states (feature layer -2: the output of the second-to-last layer), so the layers after
it never need to run, and `post_layernorm` (CLIP's pooled output) is never applied. We still hold those weights: the
checkpoint has them and the loader is strict.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.config import VisionConfig
from ref.kernels import Kernels, resolve


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (N, P, D)
        cls = self.class_embedding.expand(n, 1, -1)  # (N, 1, D)
        x = torch.cat([cls, patches], dim=1)  # (N, 1 + P, D)
        return x + self.position_embedding.weight  # learned absolute positions, one per token


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, hd)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = self.kernels.attention(q, k, v, None, self.head_dim**-0.5)  # (N, H, T, hd), no mask: bidirectional
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: VisionConfig, kernels: Kernels):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config, kernels)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, kernels: Kernels):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config, kernels) for _ in range(config.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, config: VisionConfig, kernels: Kernels | None = None):
        super().__init__()
        kernels = kernels or resolve()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: CLIP's spelling
        self.encoder = VisionEncoder(config, kernels)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # unused by LLaVA

    def hidden_states(self, pixel_values: torch.Tensor, up_to: int | None = None) -> list[torch.Tensor]:
        """The 1 + L hidden states (each (N, 1 + P, D)), as transformers' `output_hidden_states` lists them.

        `up_to` (an index into that list, negative allowed) stops after the state it names: the later layers are
        skipped and their entries left out of the returned list.
        """
        n_states = len(self.encoder.layers) + 1
        last = n_states - 1 if up_to is None else range(n_states)[up_to]  # IndexError for an out-of-range layer
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (N, 1 + P, D)
        states = [x]
        for layer in self.encoder.layers[:last]:
            x = layer(x)
            states.append(x)
        return states
