"""Model configuration: dataclasses parsed from a checkpoint's config.json.

Two formats exist for LLaVA-1.5 and we read both, and a third kind of model, text only:

- llava-hf (`LlavaForConditionalGeneration`): a top-level dict with `text_config` and `vision_config`. The published
  config lists only the fields that differ from transformers' defaults, so every missing field takes the default of
  LLaMA (text) or CLIP (vision) below, exactly as transformers fills them in.
- the original LLaVA release (liuhaotian/llava-v1.5-*): a flat LLaMA config plus `mm_*` keys; its CLIP tower is a
  separate folder with its own config.json (a `CLIPConfig` with a `vision_config`, or a bare `CLIPVisionConfig`).
- a text-only LLaMA (`LlamaForCausalLM`, model_type "llama", no `mm_*` keys), such as the LLM judges LlamaGuard and
  HarmBench's classifier: the same decoder with no vision tower (`LlavaConfig.vision` is None).

Both have `model_type` "llava"; we tell them apart by their keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ConfigError(ValueError):
    """A config.json that is missing, unreadable, or describes a model we do not implement."""


# The floating-point dtypes by the names config.json ("torch_dtype") and every command line use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str) -> None:
    """A --device that this torch cannot use, refused with what to do, before anything is read or loaded."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r}: not a torch device ({err})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = (f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
               if torch.version.cuda is None else "torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)")
        raise ConfigError(f"--device {device}: {why}, or run with --device cpu")


# Two kinds of defaults live in this file. These two tables are transformers' CLIPVisionConfig and LlamaConfig defaults:
# what a field means when a config.json leaves it out, applied by the parsers below. The dataclass defaults further
# down describe LLaVA-1.5-7B itself (what `LlavaConfig()` builds) and never fill in a parsed config.

# transformers' CLIPVisionConfig defaults (what a field means when config.json leaves it out).
CLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

# transformers' LlamaConfig defaults.
LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,  # None means "= num_attention_heads" (multi-head attention)
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    head_dim=None,  # None means hidden_size // num_attention_heads
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision transformer as LLaVA uses it."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """The LLaMA decoder (Vicuna-7B in LLaVA-1.5)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2


@dataclass(frozen=True)
class LlavaConfig:
    """Vision tower + projector + decoder, and how image features enter the token sequence (vision None: text only)."""

    vision: VisionConfig | None = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int | None = 32000  # None for a text-only model
    pad_token_id: int = 32001
    # Which vision hidden state feeds the projector: index into the 1 + num_layers hidden states (0 = embeddings after
    # pre_layrnorm). A tuple concatenates several layers' features along the channel axis.
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops the CLS token, "full" keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    source_format: str = "llava-hf"  # "llava-hf", "original" or "llama": which config.json format this was parsed from

    @property
    def text_only(self) -> bool:
        return self.vision is None

    @property
    def image_seq_length(self) -> int:
        """How many tokens one image becomes in the decoder's sequence (0 for a text-only model)."""
        if self.vision is None:
            return 0
        n = self.vision.num_patches
        return n if self.vision_feature_select_strategy == "default" else n + 1

    @property
    def projector_in_features(self) -> int:
        n_layers = len(self.vision_feature_layer) if isinstance(self.vision_feature_layer, tuple) else 1
        return self.vision.hidden_size * n_layers

    def to_dict(self) -> dict:
        """The config.json that describes this model: llava-hf's, or LlamaForCausalLM's for a text-only model."""
        if self.vision is None:
            return {"architectures": ["LlamaForCausalLM"], **self.text_dict()}
        return self.to_llava_hf_dict()

    def text_dict(self) -> dict:
        """The decoder's fields as transformers' LlamaConfig writes them (every field written out)."""
        t = self.text
        return {
            "model_type": "llama",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "attention_bias": t.attention_bias,
            "mlp_bias": t.mlp_bias,
            "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def to_llava_hf_dict(self) -> dict:
        """The llava-hf config.json that describes this model (every field written out)."""
        v, t = self.vision, self.text
        layer = list(self.vision_feature_layer) if isinstance(self.vision_feature_layer, tuple) else self.vision_feature_layer
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_index,
            "pad_token_id": self.pad_token_id,
            "vision_feature_layer": layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.projector_bias,
            "image_seq_length": self.image_seq_length,
            "tie_word_embeddings": t.tie_word_embeddings,
            "text_config": self.text_dict(),
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "num_channels": v.num_channels,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "hidden_act": v.hidden_act,
                "layer_norm_eps": v.layer_norm_eps,
            },
        }


# ---------------------------------------------------------------------------------------------------------------------
# Parsing


def _with_defaults(raw: dict, defaults: dict) -> dict:
    return {key: raw.get(key, default) for key, default in defaults.items()}


def _rope_theta(raw: dict, where: str) -> float:
    """Older transformers write `rope_theta`; 5.x writes `rope_parameters: {rope_theta, rope_type}`."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling or rope_type not in ("default", None):
        raise ConfigError(f"{where}: RoPE scaling ({scaling or params}) is not implemented; only plain RoPE is")
    return float(params.get("rope_theta", raw.get("rope_theta", LLAMA_DEFAULTS["rope_theta"])))


def parse_text_config(raw: dict, where: str) -> TextConfig:
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{where}: text model_type {model_type!r} is not supported (only 'llama')")
    values = _with_defaults(raw, LLAMA_DEFAULTS)
    values["rope_theta"] = _rope_theta(raw, where)
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values["hidden_act"] != "silu":
        raise ConfigError(f"{where}: text hidden_act {values['hidden_act']!r} is not supported (only 'silu')")
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise ConfigError(f"{where}: num_attention_heads {values['num_attention_heads']} is not a multiple of "
                          f"num_key_value_heads {values['num_key_value_heads']}")
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(values[key], list):  # some configs list several EOS ids; the first is the one we stop on
            values[key] = values[key][0]
    return TextConfig(**values)


def parse_vision_config(raw: dict, where: str) -> VisionConfig:
    if "vision_config" in raw:  # a full CLIPConfig (the original release's CLIP folder)
        raw = raw["vision_config"]
    values = _with_defaults(raw, CLIP_VISION_DEFAULTS)
    if values["hidden_act"] not in ("quick_gelu", "gelu"):
        raise ConfigError(f"{where}: vision hidden_act {values['hidden_act']!r} is not supported")
    return VisionConfig(**values)


def _first_int(*candidates) -> int:
    return next(int(c) for c in candidates if c is not None)


def _feature_layer(value, where: str) -> int | tuple[int, ...]:
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: vision_feature_layer must be an int or a list of ints, got {value!r}")


def parse_llava_hf(raw: dict, where: str) -> LlavaConfig:
    """A llava-hf config.json (`text_config` + `vision_config`)."""
    for key in ("text_config", "vision_config"):
        if not isinstance(raw.get(key), dict):
            raise ConfigError(f"{where}: missing field {key!r}")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"{where}: vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
    act = raw.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{where}: projector_hidden_act {act!r} is not supported (only 'gelu')")
    text_raw = dict(raw["text_config"])
    if "vocab_size" not in text_raw and "vocab_size" in raw:  # very old llava-hf configs kept it at the top
        text_raw["vocab_size"] = raw["vocab_size"]
    text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    return LlavaConfig(
        vision=parse_vision_config(raw["vision_config"], where),
        text=parse_text_config(text_raw, where),
        image_token_index=int(raw.get("image_token_index", raw.get("image_token_id", 32000))),
        pad_token_id=_first_int(raw.get("pad_token_id"), text_raw.get("pad_token_id"), 32001),
        vision_feature_layer=_feature_layer(raw.get("vision_feature_layer", -2), where),
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        source_format="llava-hf",
    )


def parse_original(raw: dict, vision_raw: dict, where: str) -> LlavaConfig:
    """The original LLaVA release: a flat LLaMA config with `mm_*` keys, plus the CLIP folder's config."""
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConfigError(f"{where}: mm_projector_type {raw['mm_projector_type']!r} is not supported (only mlp2x_gelu)")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConfigError(f"{where}: mm_vision_select_feature {feature!r} is not 'patch' or 'cls_patch'")
    text = parse_text_config({**raw, "model_type": "llama"}, where)
    return LlavaConfig(
        vision=parse_vision_config(vision_raw, where),
        text=text,
        # The original code splices images in at a placeholder id (-200) that never reaches the embedding table; we use
        # the id llava-hf gives `<image>`, which is always just past the 32000-piece LLaMA vocabulary.
        image_token_index=32000,
        # Its vocabulary has no <pad> (32000 rows); it pads with <unk> = 0 where its config says nothing.
        pad_token_id=_first_int(raw.get("pad_token_id"), 0),
        vision_feature_layer=_feature_layer(raw.get("mm_vision_select_layer", -2), where),
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        source_format="original",
    )


def read_json(path: str | Path, error: type[ValueError] = ConfigError,
              missing_hint: str = "a model folder needs a config.json") -> dict:
    """A JSON file holding one object (config.json, adapter configs, a run's args.json); anything else is an `error`
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file ({missing_hint})")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise error(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return raw


def is_original_format(raw: dict) -> bool:
    return "text_config" not in raw and any(key.startswith("mm_") for key in raw)


def parse_llama(raw: dict, where: str) -> LlavaConfig:
    """A text-only LlamaForCausalLM: the decoder alone."""
    text = parse_text_config(raw, where)
    return LlavaConfig(vision=None, text=text, image_token_index=None,
                       pad_token_id=_first_int(raw.get("pad_token_id"), 0), source_format="llama")


def load_config(model_dir: str | Path, vision_dir: str | Path | None = None) -> LlavaConfig:
    """Parse `model_dir/config.json` (llava-hf, the original release with its CLIP tower in `vision_dir`, or a
    text-only LLaMA)."""
    path = Path(model_dir) / "config.json"
    raw = read_json(path)
    model_type = raw.get("model_type")
    if model_type == "llama" and not is_original_format(raw):
        if vision_dir is not None:
            raise ConfigError(f"{path}: a text-only LLaMA has no vision tower; vision_dir is for original LLaVA")
        return parse_llama(raw, str(path))
    if model_type not in ("llava", "llava_llama"):
        raise ConfigError(f"{path}: model_type {model_type!r} is neither a LLaVA model ('llava') nor a text-only "
                          f"LLaMA ('llama')")
    if not is_original_format(raw):
        return parse_llava_hf(raw, str(path))
    if vision_dir is None:
        raise ConfigError(f"{path}: an original-format LLaVA checkpoint needs its CLIP vision folder "
                          f"(mm_vision_tower = {raw.get('mm_vision_tower')!r}); pass vision_dir=")
    return parse_original(raw, read_json(Path(vision_dir) / "config.json"), str(path))
