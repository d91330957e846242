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
checked from the safetensors headers before any tensor data is read. Then every tensor is checked for NaN and inf as it
streams in, in the dtype it is loaded in (a float32 value past float16's range is refused too): a single non-finite
weight makes every logit NaN. Writing (`save_model`, `save_quantized`) refuses a non-finite tensor the same way.

Streaming: the model is built on the meta device (no memory), then tensors are read one at a time with plain file
reads (`TensorReader`), cast to the loading dtype, moved to the target device and put in place, so peak memory is the
model plus one tensor.

4-bit decoders (`load_model(..., quantize="nf4")`): the decoder's `nn.Linear`s are swapped for empty
`ref.quant.Linear4bit` shells on the meta model, and each dense weight is quantized as it streams in and then dropped,
so peak memory is the 4-bit model plus about one tensor. A folder written by `save_quantized` (config.json with a
bitsandbytes `quantization_config`, packed weights under bitsandbytes' own keys, the layout transformers writes for
bnb-4bit checkpoints) is read as stored, without quantizing again.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from bitsandbytes.utils import unpack_tensor_to_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ref.config import DTYPES, LlavaConfig, load_config, nonfinite_problem, read_json
from ref.kernels import Kernels
from ref.llava import Llava
from ref.lora import LoraLinear
from ref.quant import QUANT_SUFFIXES, Linear4bit, QuantConfig, QuantError, as_quant_config, quantize_model


class CheckpointError(ValueError):
    """A checkpoint whose files, keys, shapes or dtypes do not match the model its config.json describes."""


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")  # constants, not weights: some versions saved them
# The original release's CLIP folder is a full CLIP model; LLaVA uses only its vision half.
CLIP_IGNORED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
# safetensors' dtype codes; model weights may be stored in the float ones, 4-bit states use the others
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                      "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}
FLOAT_DTYPES = {code: dtype for code, dtype in SAFETENSORS_DTYPES.items() if dtype.is_floating_point}
LOAD_DTYPES = tuple(DTYPES.values())  # what a model is loaded in


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
_LLAMA_DECODER = (("model.embed_tokens.", "language_model.embed_tokens."), ("model.layers.", "language_model.layers."),
                  ("model.norm.", "language_model.norm."), ("lm_head.", "lm_head."))
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
    ) + _LLAMA_DECODER),
    # A text-only LlamaForCausalLM (an LLM judge): the decoder alone, under the keys transformers saves.
    "llama": Layout("llama", _LLAMA_DECODER),
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
    index = read_json(index_file, CheckpointError, "a sharded checkpoint needs its index")
    weight_map = index.get("weight_map")
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
    if config.text_only:
        layout, entries, ignored = match_keys(infos, expected, {"llama": LAYOUTS["llama"]}, where, optional=optional)
        return layout, _untie(entries, config), ignored
    if config.source_format != "original":
        llava_layouts = {name: layout for name, layout in LAYOUTS.items() if name not in ("original", "llama")}
        layout, entries, ignored = match_keys(infos, expected, llava_layouts, where, optional=optional)
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
# Reading tensor data


class TensorReader:
    """Reads safetensors tensors with plain file reads into fresh memory, one at a time.

    safetensors' `safe_open` memory-maps the file: each tensor read maps its pages into the process, and they stay
    mapped (and counted in its resident memory) until the file is closed, so streaming a whole checkpoint through one
    `safe_open` shows the whole file in the peak RSS. Reading each tensor with `readinto` keeps only the tensor itself.
    The headers were checked by `read_header` (through safetensors) before any reader opens a file.
    """

    def __init__(self):
        self.files: dict[Path, tuple] = {}  # path -> (open file, data start, header)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle, _, _ in self.files.values():
            handle.close()
        self.files.clear()

    def read(self, file: Path, key: str) -> torch.Tensor:
        if file not in self.files:
            handle = open(file, "rb")
            (header_len,) = struct.unpack("<Q", handle.read(8))
            self.files[file] = (handle, 8 + header_len, json.loads(handle.read(header_len)))
        handle, data_start, header = self.files[file]
        entry = header[key]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        handle.seek(data_start + start)
        if handle.readinto(buffer.numpy()) != end - start:  # the file changed since its header was read
            raise CheckpointError(f"{file}: tensor {key!r} is truncated")
        return buffer.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def iter_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(internal name, tensor as stored, on CPU), one at a time, each checked for NaN and inf."""
    with TensorReader() as reader:
        for name, info in checkpoint.entries.items():
            tensor = reader.read(info.file, info.key)
            check_finite(tensor, info)
            yield name, tensor


def check_finite(tensor: torch.Tensor, info: TensorInfo, stored: torch.Tensor | None = None) -> None:
    """Refuse a tensor holding NaN or inf (or, cast from `stored`, overflowing its dtype), by file and key: the model
    would load without complaint and every response would then come out empty."""
    problem = nonfinite_problem(tensor, stored)
    if problem:
        raise CheckpointError(f"{info.file}: tensor {info.key!r} {problem}")


# ---------------------------------------------------------------------------------------------------------------------
# Loading: one streaming loop for dense and 4-bit decoders


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               vision_dir: str | Path | None = None, kernels: Kernels | None = None,
               quantize: str | QuantConfig | None = None, progress: LoadProgress | None = None) -> Llava:
    """Load a LLaVA checkpoint folder into `ref.llava.Llava`, in eval mode, every parameter requires_grad=False.

    path: a folder with config.json and safetensors (any layout in the module docstring); vision_dir: the CLIP folder
    for an original-format checkpoint. dtype: float32, bfloat16 or float16 (every dense tensor is cast to it).
    quantize: None (dense), "nf4", "fp4" or a `ref.quant.QuantConfig`: the decoder's linears become 4-bit as they
    stream in. A folder written by `save_quantized` is read as stored, quantize given or not (it then only sets the
    compute dtype). progress: told of each tensor as it is read (a program's progress line), if given.
    """
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"loading dtype must be one of {LOAD_DTYPES}, got {dtype}")
    if is_quantized_checkpoint(path):
        return _load_prequantized(Path(path), dtype, device, quantize, kernels, progress or LoadProgress())
    checkpoint = open_checkpoint(path, vision_dir, kernels)  # every check that needs no tensor data, first
    with torch.device("meta"):
        model = Llava(checkpoint.config, kernels)
    if quantize is not None:
        quantize_model(model, as_quant_config(quantize))  # empty 4-bit shells in place of the decoder's linears
    progress = progress or LoadProgress()
    progress.start(checkpoint.folder, len(checkpoint.entries))
    with TensorReader() as reader:
        stream_tensors(model, checkpoint.entries, reader, dtype, device, progress)
    progress.close()
    return _finished(model, checkpoint.folder)


class LoadProgress:
    """What the loaders report to as tensors stream in: nothing here. A program that shows progress passes its own
    (harness.console.LoadProgressLine: tensors and bytes read as one line on stderr)."""

    def start(self, folder: Path, n_tensors: int) -> None:
        pass

    def update(self, tensor: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


def stream_tensors(model: nn.Module, entries: dict[str, TensorInfo], reader: TensorReader, dtype: torch.dtype,
                   device: str | torch.device, progress: LoadProgress) -> None:
    """The streaming loop: one stored tensor at a time, read, cast to `dtype` on `device`, checked for NaN and inf
    (before a 4-bit linear quantizes it), put in place."""
    for name, info in entries.items():
        stored = reader.read(info.file, info.key)
        progress.update(stored)
        tensor = stored.to(device=device, dtype=dtype)
        check_finite(tensor, info, stored)  # in the loading dtype: a cast that overflows is caught too
        del stored  # peak memory: the model plus this one tensor (twice while casting)
        place_tensor(model, name, tensor)


def place_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put one checkpoint tensor in place. A 4-bit linear quantizes its weight and keeps no dense copy (the caller's
    tensor is dropped at the next one: peak memory is the model plus this tensor); anything else takes the tensor as
    its parameter, frozen."""
    owner, _, param_name = name.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module, Linear4bit) and param_name == "weight":
        module.set_weight(tensor)
    else:
        setattr(module, param_name, nn.Parameter(tensor, requires_grad=False))


def _finished(model: nn.Module, folder: Path) -> nn.Module:
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{folder}: {len(still_meta)} parameter(s)/buffer(s) were never filled, "
                              f"e.g. {still_meta[0]!r}")
    model.eval()
    model.requires_grad_(False)
    return model


def load_state_dict(path: str | Path, vision_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Every parameter under its internal name, as stored (dtype unchanged), checked like `load_model`."""
    return dict(iter_tensors(open_checkpoint(path, vision_dir)))


# ---------------------------------------------------------------------------------------------------------------------
# Pre-quantized checkpoints (written by save_quantized)


def is_quantized_checkpoint(path: str | Path) -> bool:
    """A folder written by `save_quantized` (its config.json says bitsandbytes 4-bit)."""
    file = Path(path) / "config.json"
    try:
        quantization = read_json(file).get("quantization_config")
    except ValueError:
        return False  # the loader reports a missing or broken config.json itself
    return isinstance(quantization, dict) and quantization.get("quant_method") == "bitsandbytes" \
        and bool(quantization.get("load_in_4bit"))


def _split_quant_keys(infos: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], dict[str, dict[str, TensorInfo]]]:
    """Stored keys -> (dense tensors, {packed weight key: {suffix: TensorInfo}}) by bitsandbytes' suffixes."""
    quant: dict[str, dict[str, TensorInfo]] = {}
    for key, info in infos.items():
        for suffix in QUANT_SUFFIXES:
            if key.endswith(".weight." + suffix):
                quant.setdefault(key[: -len(suffix) - 1], {})[suffix] = info
    dense = {key: info for key, info in infos.items()
             if key not in quant and not any(key.endswith(".weight." + s) for s in QUANT_SUFFIXES)}
    return dense, quant


def _load_prequantized(folder: Path, dtype: torch.dtype, device, quantize, kernels, progress: LoadProgress) -> Llava:
    config = load_config(folder)
    infos = read_headers(folder)
    dense_infos, quant_infos = _split_quant_keys(infos)
    for key in quant_infos:
        if key not in infos:
            raise CheckpointError(f"{folder}: quant state for {key!r} but no packed weight {key!r}")
    with torch.device("meta"):
        model = Llava(config, kernels)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    # The layout that maps every packed weight onto a parameter names them; the dense rest is checked as usual.
    quantized_names: dict[str, str] = {}
    for layout in LAYOUTS.values():
        mapped = {layout.to_internal(key): key for key in quant_infos}
        if all(name in expected for name in mapped):
            quantized_names = mapped
            break
    if quant_infos and not quantized_names:
        raise CheckpointError(f"{folder}: packed 4-bit weights under keys no layout maps, e.g. "
                              f"{sorted(quant_infos)[0]!r}")
    dense_expected = {n: s for n, s in expected.items() if n not in quantized_names}
    _, entries, _ = match_keys(dense_infos, dense_expected, LAYOUTS, str(folder))

    compute_dtype = None if quantize is None else as_quant_config(quantize).compute_dtype
    for name, key in sorted(quantized_names.items()):  # empty 4-bit linears shaped as the file says
        state = _read_quant_state(infos[key].file, key, quant_infos[key])
        owner = name.removesuffix(".weight")
        linear = model.get_submodule(owner)
        if not isinstance(linear, nn.Linear) or tuple(state["shape"]) != tuple(linear.weight.shape):
            raise CheckpointError(f"{infos[key].file}: {key!r} holds a 4-bit weight of shape {state['shape']}, but "
                                  f"{owner!r} is {type(linear).__name__} {tuple(linear.weight.shape)}")
        if state["dtype"] not in DTYPES:
            raise CheckpointError(f"{infos[key].file}: {key!r}: its quant state names dtype {state['dtype']!r}, "
                                  f"expected one of {sorted(DTYPES)}")
        model.set_submodule(owner, Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                              state["quant_type"], state["blocksize"], "nested_blocksize" in state,
                                              compute_dtype, DTYPES[state["dtype"]], device="meta"))
    progress.start(folder, len(entries) + len(quantized_names))
    with TensorReader() as reader:
        stream_tensors(model, entries, reader, dtype, device, progress)
        for name, key in sorted(quantized_names.items()):  # one 4-bit linear at a time
            packed = reader.read(infos[key].file, key).to(device)
            parts = {suffix: reader.read(info.file, info.key).to(device) for suffix, info in quant_infos[key].items()}
            for suffix, part in parts.items():  # absmax, quant_map, nested_*: the scales every 4-bit value goes through
                check_finite(part, quant_infos[key][suffix])
            try:
                model.get_submodule(name.removesuffix(".weight")).load_packed(packed, parts)
            except (QuantError, ValueError, KeyError, AssertionError) as err:
                raise CheckpointError(f"{infos[key].file}: {key!r}: {err}") from err
            progress.update(packed)
    progress.close()
    return _finished(model, folder)


def _read_quant_state(file: Path, key: str, parts: dict[str, TensorInfo]) -> dict:
    """The JSON half of a packed QuantState (quant_type, blocksize, dtype, shape, nested_*)."""
    keys = [s for s in parts if s.startswith("quant_state.")]
    if len(keys) != 1:
        raise CheckpointError(f"{file}: 4-bit weight {key!r} needs exactly one "
                              f"{key}.quant_state.bitsandbytes__<nf4|fp4> tensor, found {keys}")
    info = parts[keys[0]]
    with TensorReader() as reader:
        state = unpack_tensor_to_dict(reader.read(info.file, info.key))
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in state]
    if missing:
        raise CheckpointError(f"{info.file}: {info.key!r} lacks {missing}")
    offset = state.get("nested_offset", 0.0)  # the one number of the state outside a tensor (JSON reads NaN too)
    if not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise CheckpointError(f"{info.file}: tensor {info.key!r} holds nested_offset {offset!r}, expected a finite "
                              f"number")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def _external_tensors(model: nn.Module, layout: str | None, state: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The state dict (`state`, or the model's own) under `layout`'s keys (default: llava-hf as published; "llama"
    for a text-only model)."""
    if model.config.text_only:
        allowed = ["llama"]
    else:
        allowed = [name for name in LAYOUTS if name not in ("original", "llama")]
    layout = layout or allowed[0]
    if layout not in allowed:
        raise ValueError(f"layout must be one of {allowed} for this model, got {layout!r}")
    to_external = LAYOUTS[layout].to_external
    state = model.state_dict() if state is None else state
    return {to_external(name): t.detach().cpu().contiguous() for name, t in state.items()}


def _write_folder(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})  # transformers requires format=pt
    return folder


def save_model(model: Llava, folder: str | Path, layout: str | None = None, dtype: torch.dtype | None = None,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json and model.safetensors in `layout` (default: llava-hf as published; a text-only model as
    transformers' LlamaForCausalLM saves it). `state`: the model's whole state dict, where its own holds shards
    (FSDP: ref.distributed.full_state_dict gathers it).

    The model must be a plain `Llava` (no swapped or quantized modules): its state_dict names must be the internal ones.
    """
    expected = expected_shapes(model.config)
    own = model.state_dict() if state is None else state
    if set(own) != set(expected):
        odd = sorted(set(own) ^ set(expected))
        raise ValueError(f"save_model needs a plain Llava; its state_dict differs from the internal names at {odd[:3]}")
    state = _external_tensors(model, layout, own)
    tensors = {key: t.to(dtype or t.dtype) for key, t in state.items()}
    _refuse_nonfinite(folder, tensors, state)
    return _write_folder(folder, model.config.to_dict(), tensors)


def _refuse_nonfinite(folder: str | Path, tensors: dict[str, torch.Tensor],
                      sources: dict[str, torch.Tensor] | None = None) -> None:
    """A checkpoint with a NaN or inf tensor is never written (nothing is, when one is found): the loader would refuse
    it, and any other reader would load a model whose every output is NaN. `sources`: what each tensor was cast from."""
    for key, tensor in tensors.items():
        problem = nonfinite_problem(tensor, None if sources is None else sources[key])
        if problem:
            raise CheckpointError(f"{Path(folder) / SINGLE_FILE}: not written: tensor {key!r} {problem}")


def save_quantized(model: nn.Module, folder: str | Path, layout: str | None = None) -> Path:
    """config.json (with a bitsandbytes `quantization_config`) + model.safetensors: packed weights and quant state.

    Keys follow `layout` like `save_model`, with bitsandbytes' per-weight suffixes for the 4-bit linears
    (`...q_proj.weight`, `...q_proj.weight.absmax`, ...), the layout transformers uses for bnb-4bit checkpoints.
    """
    modules = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not modules:
        raise QuantError("the model has no 4-bit linears: save it with ref.weights.save_model")
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise QuantError("the model has LoRA adapters: save them with ref.adapters.save_adapter (or merge them first)")
    settings = {(m.quant_type, m.blocksize, m.double_quant) for m in modules.values()}
    if len(settings) != 1:
        raise QuantError(f"mixed 4-bit settings {sorted(settings)} cannot be described by one quantization_config")
    (quant_type, blocksize, double_quant), = settings
    config = model.config.to_dict()
    config["quantization_config"] = {  # transformers' BitsAndBytesConfig fields
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_compute_dtype": "float32",  # informative only: our modules compute in the input's dtype
        "blocksize": blocksize,  # not a transformers field; the packed quant state carries it too
    }
    tensors = _external_tensors(model, layout)
    _refuse_nonfinite(folder, tensors)
    return _write_folder(folder, config, tensors)


WEIGHT_FILES = {"config.json", SINGLE_FILE, INDEX_FILE}


def copy_side_files(source: str | Path, target: str | Path) -> list[str]:
    """Tokenizer, processor and other small files of a model folder: everything but the weights and config.json."""
    copied = []
    for file in sorted(Path(source).iterdir()):
        if file.is_file() and file.name not in WEIGHT_FILES and file.suffix != ".safetensors":
            shutil.copy2(file, Path(target) / file.name)
            copied.append(file.name)
    return copied
