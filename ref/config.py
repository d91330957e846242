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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ConfigError(ValueError):
    """A config.json that is missing, unreadable, or describes a model we do not implement."""


# The floating-point dtypes by the names config.json ("torch_dtype") and every command line use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------------
# Tensor values, checked by every loader and writer (ref.weights, ref.adapters, ref.lora, ref.quant): a single NaN or
# inf weight makes every logit NaN, and then every response comes out empty, with no error anywhere.


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no inf in `tensor` (integer, empty and meta tensors pass).

    One min-max reduction decides it, because min and max propagate NaN: on a 4096 x 11008 weight with 2 CPU threads it
    costs 3-10 ms (a tenth to a fifth of reading and casting it), where torch.isfinite(t).all() (a bool per element,
    then a reduction) costs 100-220 ms."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.is_meta:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def nonfinite_problem(tensor: torch.Tensor, source: torch.Tensor | None = None) -> str | None:
    """None when `tensor` is all finite; else what is wrong, for an error message: how many NaN and inf it holds, or,
    when the `source` it was cast from is finite, that the cast overflowed. Counting runs only on this failure path."""
    if all_finite(tensor):
        return None
    if source is not None and source is not tensor and all_finite(source):
        largest = source.abs().max().item()
        return (f"overflows {str(tensor.dtype).removeprefix('torch.')} (largest |value| {largest:.3g} in "
                f"{str(source.dtype).removeprefix('torch.')}): use bfloat16 or float32")
    n_nan, n_inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    return f"holds non-finite values ({n_nan} NaN, {n_inf} inf among {tensor.numel()})"


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

    @property
    def num_parameters(self) -> int:
        """Parameters of the tower `ref.vision` builds from this config, counted without building it."""
        d, m = self.hidden_size, self.intermediate_size
        embeddings = self.num_channels * self.patch_size**2 * d + d + (self.num_patches + 1) * d  # conv, CLS, positions
        layer = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)  # 2 LayerNorms, q/k/v/out_proj, fc1, fc2
        return embeddings + 2 * 2 * d + self.num_hidden_layers * layer  # pre_layrnorm and post_layernorm


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

    @property
    def num_parameters(self) -> int:
        """Parameters of the decoder and lm_head `ref.llama` / `ref.llava` build from this config, counted without
        building them."""
        d, m = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = 2 * d * q + 2 * d * kv + (q + 2 * kv + d) * self.attention_bias  # q/o_proj, k/v_proj, biases
        mlp = 3 * d * m + (2 * m + d) * self.mlp_bias  # gate/up/down_proj
        layer = 2 * d + attention + mlp  # two RMSNorm gains
        return 2 * self.vocab_size * d + self.num_hidden_layers * layer + d  # embeddings and lm_head, final norm


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

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part ("decoder" includes the lm_head), counted from the sizes alone: nothing is built."""
        counts = {"decoder": self.text.num_parameters}
        if self.vision is not None:
            d = self.text.hidden_size
            counts["vision tower"] = self.vision.num_parameters
            counts["projector"] = self.projector_in_features * d + d * d + 2 * d * self.projector_bias
        return counts

    @property
    def num_parameters(self) -> int:
        return sum(self.parameter_counts().values())

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
        layer = self.vision_feature_layer
        layer = list(layer) if isinstance(layer, tuple) else layer
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
#
# Every value is checked for its type and range here, before any module is built: a size that is a string, null, zero
# or absurd would otherwise surface as a TypeError or ZeroDivisionError deep inside torch, or as a module skeleton so
# large that building it hangs the process. Python's json reads NaN and Infinity literals, so floats are checked for
# finiteness too. Each error names the file and the key as the file spells it ("text_config.hidden_size").

# The largest model a config.json may describe. LLaVA-1.5-13B has 1.3e10 parameters and LLaMA-3.1-405B 4.1e11; 1e12
# (2 TB in bfloat16) is past any machine this code runs on, so a larger count means a size in the file is wrong.
MAX_PARAMETERS = 10**12
# Building the module skeleton (on the meta device) costs about 1 ms per layer whatever the width: 1e6 narrow layers
# pass the parameter bound yet take a quarter of an hour to build. The deepest LLaMA has 126 layers, CLIP 48.
MAX_LAYERS = 1024
LAYERS_WHY = f"at most {MAX_LAYERS}: no published LLaMA or CLIP has more than 126 layers"


def _with_defaults(raw: dict, defaults: dict) -> dict:
    return {key: raw.get(key, default) for key, default in defaults.items()}


def show_value(value) -> str:
    """A config value as the JSON file spells it, with its kind where that is the problem: '"128" (a string)'."""
    text = json.dumps(value, default=repr)
    text = text if len(text) <= 40 else text[:37] + "..."
    kinds = ((bool, "a boolean"), (str, "a string"), (list, "a list"), (dict, "an object"))
    kind = next((name for kind, name in kinds if isinstance(value, kind)), None)
    return f"{text} ({kind})" if kind else text


def _integer(value, where: str, key: str, minimum: int = 1, maximum: int | None = None, why: str = "") -> int:
    """An integer config value >= minimum (and <= maximum). JSON's true/false and 64.0 are not integers here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be an integer, got {show_value(value)}")
    if value < minimum:
        raise ConfigError(f"{where}: {key} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: {key} is {value}, too large ({why or f'at most {maximum}'})")
    return value


def _positive(value, where: str, key: str) -> float:
    """A finite number > 0 (an epsilon, RoPE's base): NaN, Infinity, 0 and negatives are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a finite number > 0, got {show_value(value)}")
    return float(value)


def _boolean(value, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {show_value(value)}")
    return value


def _token_id(value, where: str, key: str) -> int | None:
    """bos/eos: an id, a list of ids (some configs list several EOS ids; the first is the one we stop on), or null."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: {key} is an empty list; expected a token id or a list of them")
        value = value[0]
    return None if value is None else _integer(value, where, key, minimum=0)


def _first_id(raw_values: list[tuple[str, object]], default: int, where: str) -> int:
    """The first (key, value) given (not null), checked as a token id; `default` when none is."""
    for key, value in raw_values:
        if value is not None:
            return _integer(value, where, key, minimum=0)
    return default


def _rope_theta(raw: dict, where: str, section: str) -> float:
    """Older transformers write `rope_theta`; 5.x writes `rope_parameters: {rope_theta, rope_type}`."""
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: {section}rope_parameters must be an object, got {show_value(params)}")
    scaling = raw.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling or rope_type not in ("default", None):
        raise ConfigError(f"{where}: RoPE scaling ({scaling or params}) is not implemented; only plain RoPE is")
    if "rope_theta" in params:
        return _positive(params["rope_theta"], where, f"{section}rope_parameters.rope_theta")
    return _positive(raw.get("rope_theta", LLAMA_DEFAULTS["rope_theta"]), where, f"{section}rope_theta")


TEXT_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings")


def parse_text_config(raw: dict, where: str, section: str = "") -> TextConfig:
    """The decoder's fields; `section` is where they sit in the file ("text_config." in llava-hf's), for messages."""
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{where}: text model_type {model_type!r} is not supported (only 'llama')")
    values = _with_defaults(raw, LLAMA_DEFAULTS)
    for key in TEXT_SIZES:
        _integer(values[key], where, section + key)
    _integer(values["num_hidden_layers"], where, section + "num_hidden_layers", maximum=MAX_LAYERS, why=LAYERS_WHY)
    for key in ("num_key_value_heads", "head_dim"):  # null means "derive it", as in transformers
        if values[key] is not None:
            _integer(values[key], where, section + key)
    values["rms_norm_eps"] = _positive(values["rms_norm_eps"], where, section + "rms_norm_eps")
    values["rope_theta"] = _rope_theta(raw, where, section)
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        _boolean(values[key], where, section + key)
    for key in ("bos_token_id", "eos_token_id"):
        values[key] = _token_id(values[key], where, section + key)
    if values["hidden_act"] != "silu":
        raise ConfigError(f"{where}: text hidden_act {values['hidden_act']!r} is not supported (only 'silu')")
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    if hidden % heads:
        raise ConfigError(f"{where}: {section}hidden_size {hidden} is not a multiple of {section}num_attention_heads "
                          f"{heads}")
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = heads
    if values["head_dim"] is None:
        values["head_dim"] = hidden // heads
    if values["head_dim"] % 2:
        raise ConfigError(f"{where}: {section}head_dim {values['head_dim']} is odd (RoPE rotates pairs of dimensions)")
    if heads % values["num_key_value_heads"]:
        raise ConfigError(f"{where}: {section}num_attention_heads {heads} is not a multiple of "
                          f"{section}num_key_value_heads {values['num_key_value_heads']}")
    return TextConfig(**values)


VISION_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels", "image_size", "patch_size")


def parse_vision_config(raw: dict, where: str, section: str = "") -> VisionConfig:
    """CLIP's vision fields; `section` is where they sit in the file ("vision_config." in llava-hf's)."""
    if "vision_config" in raw:  # a full CLIPConfig (the original release's CLIP folder)
        raw, section = raw["vision_config"], section + "vision_config."
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: {section.rstrip('.')} must be an object, got {show_value(raw)}")
    values = _with_defaults(raw, CLIP_VISION_DEFAULTS)
    for key in VISION_SIZES:
        _integer(values[key], where, section + key)
    _integer(values["num_hidden_layers"], where, section + "num_hidden_layers", maximum=MAX_LAYERS, why=LAYERS_WHY)
    values["layer_norm_eps"] = _positive(values["layer_norm_eps"], where, section + "layer_norm_eps")
    if values["hidden_act"] not in ("quick_gelu", "gelu"):
        raise ConfigError(f"{where}: vision hidden_act {values['hidden_act']!r} is not supported")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ConfigError(f"{where}: {section}hidden_size {values['hidden_size']} is not a multiple of "
                          f"{section}num_attention_heads {values['num_attention_heads']}")
    if values["patch_size"] > values["image_size"]:
        raise ConfigError(f"{where}: {section}patch_size {values['patch_size']} is larger than {section}image_size "
                          f"{values['image_size']} (the image would have no patches)")
    return VisionConfig(**values)


def _feature_layer(value, where: str, key: str) -> int | tuple[int, ...]:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if is_int(value):
        return value
    if isinstance(value, list) and value and all(is_int(v) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: {key} must be an int or a list of ints, got {show_value(value)}")


def _scientific(n: int) -> str:
    """1.23e+13 for a count (a Python int can be too large for a float)."""
    return f"{n:.3g}" if n.bit_length() < 1000 else f"about 1e{len(str(n)) - 1}"


def _checked(config: LlavaConfig, where: str, layer_key: str) -> LlavaConfig:
    """What only the whole config can tell: the vision feature layer exists, and the model is not absurdly large
    (checked before anything builds it: the count comes from the config's sizes alone)."""
    if config.vision is not None:
        n_states = config.vision.num_hidden_layers + 1  # the embeddings, then each layer's output
        layers = config.vision_feature_layer
        for index in layers if isinstance(layers, tuple) else (layers,):
            if not -n_states <= index < n_states:
                raise ConfigError(f"{where}: {layer_key} {index} is out of range for a vision tower of "
                                  f"{n_states - 1} layers (hidden states {-n_states}..{n_states - 1})")
    total = config.num_parameters
    if total > MAX_PARAMETERS:
        parts = ", ".join(f"{name} {_scientific(n)}" for name, n in config.parameter_counts().items())
        raise ConfigError(f"{where}: describes a model of {_scientific(total)} parameters ({parts}), more than the "
                          f"{MAX_PARAMETERS:.0e} this code accepts: a size in it is wrong")
    return config


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
    image_key = "image_token_index" if "image_token_index" in raw or "image_token_id" not in raw else "image_token_id"
    config = LlavaConfig(
        vision=parse_vision_config(raw["vision_config"], where, "vision_config."),
        text=parse_text_config(text_raw, where, "text_config."),
        image_token_index=_integer(raw.get(image_key, 32000), where, image_key, minimum=0),
        pad_token_id=_first_id([("pad_token_id", raw.get("pad_token_id")),
                                ("text_config.pad_token_id", text_raw.get("pad_token_id"))], 32001, where),
        vision_feature_layer=_feature_layer(raw.get("vision_feature_layer", -2), where, "vision_feature_layer"),
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
        projector_bias=_boolean(raw.get("multimodal_projector_bias", True), where, "multimodal_projector_bias"),
        source_format="llava-hf",
    )
    return _checked(config, where, "vision_feature_layer")


def parse_original(raw: dict, vision_raw: dict, where: str, vision_where: str | None = None) -> LlavaConfig:
    """The original LLaVA release: a flat LLaMA config with `mm_*` keys (`where`), plus the CLIP folder's config
    (`vision_where`, its config.json)."""
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConfigError(f"{where}: mm_projector_type {raw['mm_projector_type']!r} is not supported (only mlp2x_gelu)")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConfigError(f"{where}: mm_vision_select_feature {feature!r} is not 'patch' or 'cls_patch'")
    text = parse_text_config({**raw, "model_type": "llama"}, where)
    config = LlavaConfig(
        vision=parse_vision_config(vision_raw, vision_where or where),
        text=text,
        # The original code splices images in at a placeholder id (-200) that never reaches the embedding table; we use
        # the id llava-hf gives `<image>`, which is always just past the 32000-piece LLaMA vocabulary.
        image_token_index=32000,
        # Its vocabulary has no <pad> (32000 rows); it pads with <unk> = 0 where its config says nothing.
        pad_token_id=_first_id([("pad_token_id", raw.get("pad_token_id"))], 0, where),
        vision_feature_layer=_feature_layer(raw.get("mm_vision_select_layer", -2), where, "mm_vision_select_layer"),
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        source_format="original",
    )
    return _checked(config, where, "mm_vision_select_layer")


def read_json(path: str | Path, error: type[ValueError] = ConfigError,
              missing_hint: str = "a model folder needs a config.json") -> dict:
    """A JSON file holding one object (config.json, adapter configs, a run's args.json); anything else is an `error`
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file ({missing_hint})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))  # JSON is UTF-8, whatever the locale says
    except RecursionError as err:  # json's message would speak of Python, not of the file
        raise error(f"{path}: not valid JSON (nested deeper than Python's JSON reader can follow)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return raw


def is_original_format(raw: dict) -> bool:
    return "text_config" not in raw and any(key.startswith("mm_") for key in raw)


def parse_llama(raw: dict, where: str) -> LlavaConfig:
    """A text-only LlamaForCausalLM: the decoder alone."""
    text = parse_text_config(raw, where)
    config = LlavaConfig(vision=None, text=text, image_token_index=None,
                         pad_token_id=_first_id([("pad_token_id", raw.get("pad_token_id"))], 0, where),
                         source_format="llama")
    return _checked(config, where, "")


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
    vision_path = Path(vision_dir) / "config.json"
    return parse_original(raw, read_json(vision_path), str(path), str(vision_path))
