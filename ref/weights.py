"""Checkpoint loading and saving: safetensors in any of LLaVA's key layouts -> `ref.llava.Llava`, strictly, streaming.

A model folder holds `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json`. The same weights circulate under several key layouts (the sub-names below each prefix
are the same everywhere); each maps onto our INTERNAL names (`Llava().state_dict()` keys):

    layout          vision tower                      projector                       decoder / lm_head
    llava-hf        vision_tower.vision_model.*       multi_modal_projector.*         language_model.model.*
                                                                                      language_model.lm_head.*
    hf-5-saved      vision_tower.*                    multi_modal_projector.*         (as llava-hf)
    hf-4.52-memory  model.vision_tower.vision_model.* model.multi_modal_projector.*   model.language_model.*, lm_head.*
    hf-5-memory     model.vision_tower.*              model.multi_modal_projector.*   (as hf-4.52-memory)
    original        CLIP folder: vision_model.*       model.mm_projector.{0,2}.*      model.{embed_tokens,layers,norm}.*
                    (or bare embeddings.*, ...)                                       lm_head.*

"llava-hf" is the published llava-hf/llava-1.5-7b-hf (and what transformers <= 4.51 `save_pretrained` writes);
"hf-5-saved" is what the installed transformers 5.x `LlavaForConditionalGeneration.save_pretrained` writes (checked:
`vision_tower.*` without `vision_model.`, `language_model.model.*`, `language_model.lm_head.weight`). The layout is
detected from the keys: the one that maps the most keys onto expected names wins, and then every key must map.
The original release keeps its CLIP tower in a separate folder (`vision_dir`), an openai CLIP checkpoint: a CLIPModel
(`vision_model.*`, plus text_model/projection/logit_scale keys, which are ignored: a known, listed ignore set for that
folder only) or a CLIPVisionModel as transformers 5.x saves it (bare `embeddings.*`, `encoder.*`, ...).
Everywhere `*.position_ids` and `*.rotary_emb.inv_freq` keys (constants some versions saved) are ignored.

Strictness: every tensor consumed, every parameter filled, every shape equal to the config's, every dtype a float;
otherwise a `CheckpointError` (a ValueError) naming the key, the expected and found shape and the file. All of this is
checked from the safetensors headers before any tensor data is read.

Streaming: the model is built on the meta device (no memory), then tensors are read one at a time, cast to the loading
dtype, moved to the target device and put in place, so peak memory is the model plus one tensor.

Quantization hook protocol (for 4-bit QLoRA linears, see `load_model`)
------------------------------------------------------------------
1. `prepare(model)` (optional) runs on the meta model before any tensor is read. It may swap modules, e.g. replace the
   decoder's `nn.Linear`s by 4-bit linears. The checkpoint is checked against the names and shapes of the model as
   built, before `prepare`, so swapping does not change what the checkpoint must contain.
2. Each checkpoint tensor then goes, one at a time, already cast to `dtype` and on `device`, to
   `place_tensor(module, param_name, tensor)`, where `module = model.get_submodule(owner)` (after `prepare`) and
   `param_name` is the last dotted component of the internal name ("weight", "bias", "class_embedding").
   Without `place_tensor`, `place_tensor_default` does: if the module has a method `load_weight_(param_name, tensor)`,
   call it (a 4-bit linear quantizes the weight there and keeps no full-precision copy; a wrapper module that owns a
   `base_layer` may forward the call); otherwise the tensor becomes the module's parameter, `requires_grad=False`.
3. After the last tensor no parameter or buffer may still be on the meta device (a swapped module must create all its
   state in `load_weight_`), else `CheckpointError`. Then the model is put in eval mode with every parameter frozen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ref.config import LlavaConfig, load_config
from ref.kernels import Kernels
from ref.llava import Llava


class CheckpointError(ValueError):
    """A checkpoint whose files, keys, shapes or dtypes do not match the model its config.json describes."""


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")  # constants, not weights: some versions saved them
# The original release's CLIP folder is a full CLIP model; LLaVA uses only its vision half.
CLIP_IGNORED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------------------
# Key layouts


@dataclass(frozen=True)
class Layout:
    """A key layout: prefix rewrites (external prefix -> internal prefix), the first matching rule wins."""

    name: str
    rules: tuple[tuple[str, str], ...]

    def to_internal(self, key: str) -> str | None:
        for external, internal in self.rules:
            if key.startswith(external):
                return internal + key[len(external):]
        return None

    def to_external(self, name: str) -> str | None:
        for external, internal in self.rules:
            if name.startswith(internal):
                return external + name[len(internal):]
        return None


_PROJ = ("multi_modal_projector.", "multi_modal_projector.")
_MODEL_PROJ = ("model.multi_modal_projector.", "multi_modal_projector.")
_SAVED_DECODER = (("language_model.model.", "language_model."), ("language_model.lm_head.", "lm_head."))
_MEMORY_DECODER = (("model.language_model.", "language_model."), ("lm_head.", "lm_head."))

LAYOUTS = {
    "llava-hf": Layout("llava-hf", (("vision_tower.vision_model.", "vision_tower."), _PROJ) + _SAVED_DECODER),
    "hf-5-saved": Layout("hf-5-saved", (("vision_tower.", "vision_tower."), _PROJ) + _SAVED_DECODER),
    "hf-4.52-memory": Layout("hf-4.52-memory",
                             (("model.vision_tower.vision_model.", "vision_tower."), _MODEL_PROJ) + _MEMORY_DECODER),
    "hf-5-memory": Layout("hf-5-memory", (("model.vision_tower.", "vision_tower."), _MODEL_PROJ) + _MEMORY_DECODER),
    # The original release: no vision keys here (they come from the CLIP folder, `CLIP_LAYOUTS`).
    "original": Layout("original", (
        ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "multi_modal_projector.linear_2."),  # index 1 is the GELU of an nn.Sequential
        ("model.embed_tokens.", "language_model.embed_tokens."),
        ("model.layers.", "language_model.layers."),
        ("model.norm.", "language_model.norm."),
        ("lm_head.", "lm_head."),
    )),
}
CLIP_LAYOUTS = {
    "clip": Layout("clip", (("vision_model.", "vision_tower."),)),  # CLIPModel (openai release), older CLIPVisionModel
    "clip-vision-bare": Layout("clip-vision-bare", (("", "vision_tower."),)),  # transformers 5.x CLIPVisionModel
}


# ---------------------------------------------------------------------------------------------------------------------
# Reading safetensors headers (no tensor data)


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what its header says."""

    key: str  # the name in the file
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "F16", "BF16", "F32", ...


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Keys, shapes and dtypes of one safetensors file, from its header only."""
    try:
        with safe_open(file, framework="pt") as f:
            infos = {}
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                infos[key] = TensorInfo(key, file, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
            return infos
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupted?): {err}") from err


def read_index(index_file: Path) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index_file}: not valid JSON ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: expected a 'weight_map' object mapping tensor names to shard files")
    return weight_map


def read_headers(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder (single file or sharded), from the headers; the index and shards must agree."""
    folder = Path(folder)
    index_file, single_file = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_file.is_file():
        weight_map = read_index(index_file)
        infos: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            if not path.is_file():
                raise CheckpointError(f"{index_file}: shard {shard!r} is listed but {path} does not exist")
            for key, info in read_header(path).items():
                if weight_map.get(key) != shard:
                    where = f"listed in {weight_map[key]!r}" if key in weight_map else "not listed in the index"
                    raise CheckpointError(f"{path}: tensor {key!r} is in this shard but {where} ({index_file})")
                infos[key] = info
        missing = sorted(set(weight_map) - set(infos))
        if missing:
            raise CheckpointError(f"{index_file}: {len(missing)} tensor(s) listed but absent from their shard, e.g. "
                                  f"{missing[0]!r} (index says {folder / weight_map[missing[0]]})")
        return infos
    if single_file.is_file():
        return read_header(single_file)
    pickles = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    hint = (f" (found {', '.join(pickles)}: PyTorch pickles are not loaded; convert them to safetensors, e.g. "
            f"python -m weights_tools.convert_original)") if pickles else ""
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


# ---------------------------------------------------------------------------------------------------------------------
# Matching a checkpoint's keys to the model's parameters


def expected_shapes(config: LlavaConfig, kernels: Kernels | None = None) -> dict[str, tuple[int, ...]]:
    """Internal parameter name -> shape, from a model built on the meta device (costs no memory)."""
    with torch.device("meta"):
        model = Llava(config, kernels)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _is_ignored(key: str, ignored_prefixes: tuple[str, ...]) -> bool:
    return key.endswith(IGNORED_SUFFIXES) or key.startswith(ignored_prefixes)


def _detect_layout(keys: list[str], layouts: dict[str, Layout], expected: dict[str, tuple[int, ...]]) -> Layout:
    """The layout that maps the most keys onto expected names (ties: the first listed)."""
    def score(layout: Layout) -> int:
        return sum(layout.to_internal(key) in expected for key in keys)
    best = max(layouts.values(), key=score)  # max keeps the first of equal scores
    if score(best) == 0:
        raise CheckpointError(f"no known key layout ({', '.join(layouts)}) matches these keys, e.g. {sorted(keys)[:3]}")
    return best


def match_keys(infos: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], layouts: dict[str, Layout],
               where: str, ignored_prefixes: tuple[str, ...] = (),
               optional: frozenset[str] = frozenset()) -> tuple[str, dict[str, TensorInfo], list[str]]:
    """Map the stored keys onto the expected internal names, strictly (names in `optional` may be absent).

    Returns (layout name, internal name -> TensorInfo, ignored keys). Raises CheckpointError for an unexpected key, a
    missing name, two keys for one name, a wrong shape or a non-float dtype, naming the key and the file.
    """
    keys = [key for key in infos if not _is_ignored(key, ignored_prefixes)]
    ignored = sorted(set(infos) - set(keys))
    if not keys:
        raise CheckpointError(f"{where}: holds no weights")
    layout = _detect_layout(keys, layouts, expected)
    entries: dict[str, TensorInfo] = {}
    for key in sorted(keys):
        info, name = infos[key], layout.to_internal(key)
        if name not in expected:
            raise CheckpointError(f"{info.file}: unexpected key {key!r} for layout {layout.name!r} "
                                  f"(maps to {name!r}, which the model does not have)")
        if name in entries:
            raise CheckpointError(f"{info.file}: keys {entries[name].key!r} and {key!r} both map to {name!r}")
        if info.shape != expected[name]:
            raise CheckpointError(f"{info.file}: key {key!r} has shape {list(info.shape)}, expected "
                                  f"{list(expected[name])} (parameter {name!r}, from the config)")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: key {key!r} has dtype {info.dtype}, expected a floating-point "
                                  f"dtype ({', '.join(FLOAT_DTYPES)})")
        entries[name] = info
    missing = sorted(set(expected) - set(entries) - optional)
    if missing:
        example = layout.to_external(missing[0])
        raise CheckpointError(f"{where}: {len(missing)} weight(s) missing for layout {layout.name!r}, e.g. key "
                              f"{example!r} (parameter {missing[0]!r}, shape {list(expected[missing[0]])})")
    return layout.name, entries, ignored


@dataclass
class Checkpoint:
    """A checked checkpoint: its config, its layout, and where each of the model's parameters is stored."""

    folder: Path
    vision_dir: Path | None
    config: LlavaConfig
    layout: str
    entries: dict[str, TensorInfo]  # internal name -> stored tensor (two names may share one: tied embeddings)
    ignored: list[str]  # stored keys that are deliberately not loaded

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.entries.values()})


def open_checkpoint(path: str | Path, vision_dir: str | Path | None = None,
                    kernels: Kernels | None = None) -> Checkpoint:
    """Read config.json and every safetensors header; check keys, shapes and dtypes. Reads no tensor data."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (no such directory)")
    config = load_config(folder, vision_dir)  # ConfigError (a ValueError) for a missing or bad config.json
    if config.source_format != "original" and vision_dir is not None:
        raise CheckpointError(f"{folder}: vision_dir is only for original-format LLaVA checkpoints; this llava-hf "
                              f"checkpoint holds its own vision tower")
    vision_infos = read_headers(vision_dir) if config.source_format == "original" else None
    layout, entries, ignored = match_checkpoint(config, read_headers(folder), str(folder), vision_infos,
                                                str(vision_dir), kernels)
    return Checkpoint(folder, None if vision_dir is None else Path(vision_dir), config, layout, entries, ignored)


def match_checkpoint(config: LlavaConfig, infos: dict[str, TensorInfo], where: str,
                     vision_infos: dict[str, TensorInfo] | None = None, vision_where: str = "",
                     kernels: Kernels | None = None) -> tuple[str, dict[str, TensorInfo], list[str]]:
    """`match_keys` for a whole model: one folder (llava-hf formats), or the original release's folder + CLIP folder."""
    expected = expected_shapes(config, kernels)
    optional = _optional(config)
    if config.source_format != "original":
        layout, entries, ignored = match_keys(infos, expected, LAYOUTS, where, optional=optional)
        return layout, _untie(entries, config), ignored
    # The original release: decoder + projector here, the vision tower in the CLIP folder.
    vision = {name: shape for name, shape in expected.items() if name.startswith("vision_tower.")}
    rest = {name: shape for name, shape in expected.items() if name not in vision}
    _, text_entries, text_ignored = match_keys(infos, rest, {"original": LAYOUTS["original"]}, where,
                                               optional=optional)
    _, vision_entries, vision_ignored = match_keys(vision_infos, vision, CLIP_LAYOUTS, vision_where,
                                                   ignored_prefixes=CLIP_IGNORED_PREFIXES)
    return "original", {**_untie(text_entries, config), **vision_entries}, text_ignored + vision_ignored


def _optional(config: LlavaConfig) -> frozenset[str]:
    """With tied embeddings a checkpoint may leave lm_head out (transformers does); `_untie` then fills it."""
    return frozenset({"lm_head.weight"}) if config.text.tie_word_embeddings else frozenset()


def _untie(entries: dict[str, TensorInfo], config: LlavaConfig) -> dict[str, TensorInfo]:
    if config.text.tie_word_embeddings and "lm_head.weight" not in entries:
        # lm_head reads the embedding table (our lm_head is a separate parameter: it starts as a copy)
        entries["lm_head.weight"] = entries["language_model.embed_tokens.weight"]
    return entries


# ---------------------------------------------------------------------------------------------------------------------
# Streaming the tensors into a model


def iter_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(internal name, tensor as stored, on CPU), one at a time, each file opened once, in file order."""
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for name, info in checkpoint.entries.items():
        by_file.setdefault(info.file, []).append((name, info))
    for file in sorted(by_file):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name, info in by_file[file]:
                    yield name, f.get_tensor(info.key)
        except SafetensorError as err:  # the file changed since its header was read
            raise CheckpointError(f"{file}: could not read tensor data: {err}") from err


PlaceTensor = Callable[[nn.Module, str, torch.Tensor], None]


def place_tensor_default(module: nn.Module, param_name: str, tensor: torch.Tensor) -> None:
    """The default hook: the module's own `load_weight_` if it has one, else the tensor becomes its parameter."""
    if hasattr(module, "load_weight_"):
        module.load_weight_(param_name, tensor)
        return
    if param_name not in module._parameters:
        raise CheckpointError(f"{type(module).__name__} has no parameter {param_name!r} and no load_weight_ method "
                              f"to receive it (a module swapped in by prepare() must implement load_weight_)")
    setattr(module, param_name, nn.Parameter(tensor, requires_grad=False))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               vision_dir: str | Path | None = None, kernels: Kernels | None = None,
               place_tensor: PlaceTensor | None = None,
               prepare: Callable[[nn.Module], None] | None = None, quantize=None) -> Llava:
    """Load a LLaVA checkpoint folder into `ref.llava.Llava`, in eval mode, every parameter requires_grad=False.

    path: a folder with config.json and safetensors (any layout in the module docstring); vision_dir: the CLIP folder
    for an original-format checkpoint. dtype: float32, bfloat16 or float16 (every tensor is cast to it). `prepare` and
    `place_tensor` are the quantization hooks described in the module docstring. quantize: "nf4", "fp4" or a
    `ref.quant.QuantConfig`: the decoder's linears become 4-bit as they stream in (`ref.quant.load_quantized_model`);
    a folder written by `ref.quant.save_quantized` is read as stored, quantize given or not.
    """
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"loading dtype must be one of {LOAD_DTYPES}, got {dtype}")
    from ref import quant  # imported here: ref.quant builds on this module

    if quantize is not None or quant.is_quantized_checkpoint(path):
        if prepare is not None or place_tensor is not None:
            raise ValueError("quantize= sets the prepare/place_tensor hooks itself; pass one or the other")
        return quant.load_quantized_model(path, quantize, dtype=dtype, device=device, vision_dir=vision_dir,
                                          kernels=kernels)
    checkpoint = open_checkpoint(path, vision_dir, kernels)  # every check that needs no tensor data, first
    with torch.device("meta"):
        model = Llava(checkpoint.config, kernels)
    if prepare is not None:
        prepare(model)
    place = place_tensor or place_tensor_default
    for name, stored in iter_tensors(checkpoint):
        owner, _, param_name = name.rpartition(".")
        tensor = stored.to(device=device, dtype=dtype)
        del stored  # peak memory: the model plus this one tensor (twice while casting)
        place(model.get_submodule(owner), param_name, tensor)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{checkpoint.folder}: {len(still_meta)} parameter(s)/buffer(s) were never filled, "
                              f"e.g. {still_meta[0]!r} (a module swapped in by prepare() left state on meta)")
    model.eval()
    model.requires_grad_(False)
    return model


def load_state_dict(path: str | Path, vision_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Every parameter under its internal name, as stored (dtype unchanged), checked like `load_model`."""
    return dict(iter_tensors(open_checkpoint(path, vision_dir)))


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def save_model(model: Llava, folder: str | Path, layout: str = "llava-hf", dtype: torch.dtype | None = None) -> Path:
    """Write config.json (llava-hf format) and model.safetensors in `layout` (default: llava-hf as published).

    The model must be a plain `Llava` (no swapped or quantized modules): its state_dict names must be the internal ones.
    """
    if layout not in LAYOUTS or layout == "original":
        raise ValueError(f"save_model layout must be one of {[n for n in LAYOUTS if n != 'original']}, got {layout!r}")
    expected = expected_shapes(model.config)
    state = model.state_dict()
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        raise ValueError(f"save_model needs a plain Llava; its state_dict differs from the internal names at {odd[:3]}")
    to_external = LAYOUTS[layout].to_external
    tensors = {to_external(name): t.detach().to("cpu", dtype or t.dtype).contiguous() for name, t in state.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_llava_hf_dict(), indent=2) + "\n")
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})  # transformers requires format=pt
    return folder
