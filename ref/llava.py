"""LLaVA-1.5: CLIP vision tower -> MLP projector -> image features take the place of the image tokens -> LLaMA.

    input_ids (B, T) with each image already expanded to `image_seq_length` image tokens (llava-hf convention)
    pixel_values (N, 3, S, S), one per image, in the order the images appear in the batch (row by row)
      vision hidden state [feature layer]  (N, 1 + P, Dv) -> drop CLS ("default")  (N, P, Dv)
      projector: linear -> GELU -> linear                                          (N, P, D)
      token embeddings (B, T, D), image-token rows replaced by the features in order
      decoder -> final norm -> lm_head                                            (B, T, vocab)

Textual unlearning only ever feeds this model text, so the vision tower and projector never run in training; they are
what carries the decoder's new behaviour over to images at test time. A text-only config (`config.vision` None, a
LlamaForCausalLM such as an LLM judge) builds the decoder and lm_head alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.config import LlavaConfig
from ref.kernels import Kernels, resolve
from ref.llama import KVCache, LlamaDecoder
from ref.vision import CLIPVisionTower


class Projector(nn.Module):
    """The two-layer MLP that maps vision features into the decoder's embedding space."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        d_text = config.text.hidden_size
        self.linear_1 = nn.Linear(config.projector_in_features, d_text, bias=config.projector_bias)
        self.linear_2 = nn.Linear(d_text, d_text, bias=config.projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(features)))  # exact (erf) GELU, not the tanh approximation


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, n_new): the generated tokens only; after a row's EOS, the pad id
    text: list[str] | None  # decoded `sequences` (special tokens skipped) when a tokenizer was given


class Llava(nn.Module):
    def __init__(self, config: LlavaConfig, kernels: Kernels | None = None):
        super().__init__()
        self.config = config
        self.kernels = kernels or resolve()
        if config.vision is not None:
            self.vision_tower = CLIPVisionTower(config.vision, self.kernels)
            self.multi_modal_projector = Projector(config)
        self.language_model = LlamaDecoder(config.text, self.kernels)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    # --- images -----------------------------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, image_seq_length, D): what replaces each image's tokens."""
        if self.config.vision is None:
            raise ValueError("a text-only model has no vision tower: it takes no images")
        layer = self.config.vision_feature_layer
        layers = layer if isinstance(layer, tuple) else (layer,)
        n_states = self.config.vision.num_hidden_layers + 1  # the embeddings, then each layer's output
        indices = [range(n_states)[i] for i in layers]  # negative indices count from the last layer
        states = self.vision_tower.hidden_states(pixel_values, up_to=max(indices))  # later layers never run
        features = torch.cat([states[i] for i in indices], dim=-1)  # (N, 1 + P, Dv * len(layers))
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop CLS: (N, P, Dv)
        return self.multi_modal_projector(features)  # (N, P, D)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None, image_tokens: int | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with the image tokens' rows replaced by image features, in order.

        Pass `image_features` (from `image_features()`) to reuse them between two passes over the same images.
        `image_tokens`: how many image tokens input_ids hold, when the caller counted them on the host (a training
        batch: ref.data.collate_for_training); None: counted here, which on an accelerator makes the host wait for the
        device once per call.
        """
        if self.config.image_token_index is None:  # text only
            if pixel_values is not None or image_features is not None:
                raise ValueError("a text-only model has no vision tower: it takes no images")
            return self.language_model.embed_tokens(input_ids)  # (B, T, D)
        is_image = input_ids == self.config.image_token_index  # (B, T)
        # The image token may lie outside the embedding table (the original release's 32000-row vocabulary); its row is
        # replaced anyway, so look up token 0 there.
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        n_image_tokens = int(is_image.sum()) if image_tokens is None else image_tokens
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        if image_features is None:
            if n_image_tokens:
                raise ValueError(f"input_ids hold {n_image_tokens} image tokens but no pixel_values were given")
            return embeds
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_image_tokens != n_features:
            raise ValueError(f"input_ids hold {n_image_tokens} image tokens but {image_features.shape[0]} image(s) give "
                             f"{n_features} features ({image_features.shape[1]} per image): expand each <image> to "
                             f"{self.config.image_seq_length} tokens")
        # masked_scatter fills the True positions row-major, i.e. in reading order across the batch.
        return embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))

    # --- forward ----------------------------------------------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None, image_features: torch.Tensor | None = None,
                      right_padded: bool | None = None, image_tokens: int | None = None) -> torch.Tensor:
        """The decoder's final-normed hidden states (B, T, D), before the lm_head. `right_padded` and `image_tokens`:
        what the caller knows of the batch on the host (LlamaDecoder.forward, embed); None: found from the tensors."""
        embeds = self.embed(input_ids, pixel_values, image_features, image_tokens)
        return self.language_model(embeds, attention_mask, position_ids, cache, right_padded)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) over every position, as transformers' LlavaForConditionalGeneration returns them."""
        return self.lm_head(self.hidden_states(input_ids, pixel_values, attention_mask, position_ids, cache))

    # --- generation -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, use_cache: bool = True,
                 tokenizer=None) -> GenerationOutput:
        """Greedy (default) or temperature / top-p sampling, batched over left-padded prompts.

        Each row stops at its EOS (kept in the output) and is filled with the pad id after it; generation stops when
        every row has finished or after `max_new_tokens`. With `use_cache` the prompt runs once and each new token
        attends to cached keys and values; without it every step reruns the whole sequence (same result, slower).
        """
        eos = self.config.text.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask[:, -1].eq(0).any():
            raise ValueError("generate() needs left padding: a row's last prompt position is padding")
        context = self.config.text.max_position_embeddings
        if input_ids.shape[1] + max_new_tokens > context:
            raise ValueError(f"a prompt of {input_ids.shape[1]} positions (padding included) and {max_new_tokens} new "
                             f"tokens exceed the model's context of {context} (max_position_embeddings)")
        generator = None
        if do_sample:
            generator = torch.Generator(device=input_ids.device)
            generator.manual_seed(0 if seed is None else seed)
        image_features = self.image_features(pixel_values) if pixel_values is not None else None
        cache = KVCache(len(self.language_model.layers), reserve=max_new_tokens) if use_cache else None

        ids, mask = input_ids, attention_mask
        step_ids = input_ids  # what goes through the decoder this step: the whole prompt first
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            features = image_features if (cache is None or cache.length == 0) else None
            hidden = self.hidden_states(step_ids, attention_mask=mask, cache=cache, image_features=features)
            logits = self.lm_head(hidden[:, -1]).float()  # (B, vocab): only the last position is needed
            if self.config.image_token_index is not None and self.config.image_token_index < logits.shape[-1]:
                logits[:, self.config.image_token_index] = float("-inf")  # an image token with no image behind it
            token = self._next_token(logits, do_sample, temperature, top_p, generator)  # (B,)
            token = torch.where(finished, torch.full_like(token, pad), token)
            new_tokens.append(token)
            finished |= token == eos
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids = token[:, None] if cache is not None else ids
            if finished.all():
                break
        sequences = torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(input_ids.shape[0], 0)
        text = None if tokenizer is None else [tokenizer.decode(row.tolist()) for row in sequences]
        return GenerationOutput(sequences=sequences, text=text)

    @staticmethod
    def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                    generator: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        probs = torch.softmax(logits / temperature, dim=-1)  # (B, vocab)
        if top_p < 1.0:
            # Nucleus: keep the most likely tokens until their mass reaches top_p (always at least the first).
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
