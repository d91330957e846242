"""Adapter files. Our adapter format is peft's, so that an adapter trained here loads with `PeftModel.from_pretrained`
on transformers' LlavaForConditionalGeneration unchanged, and an adapter trained with peft loads here:

    <folder>/adapter_config.json        peft's LoraConfig fields: r, lora_alpha, lora_dropout, use_rslora,
                                        target_modules, base_model_name_or_path, ...
    <folder>/adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in)
                                        base_model.model.<module>.lora_B.weight  (out, r)

<module> is a module name of transformers' LLaVA: `model.language_model.layers.0.self_attn.q_proj` (transformers
>= 4.52), `language_model.model.layers.0...` (older releases); the vision tower's linears too, where peft's
target_modules reached them (["q_proj", "v_proj"] does). Reading maps the names onto ours through the checkpoint key
layouts of ref/weights.py, and puts an adapter on exactly the modules peft would: those the config's
`target_modules` selects, by peft's rule (`check_target_module_exists`: a list names modules by their full name or
its last components, "q_proj" selects every "...q_proj"; a string is a regular expression that must match a whole
module name). The file's tensors of modules it does not select are left out, as peft leaves them; a selected module
the file holds no tensors for, a selection that matches nothing, and anything peft can store that this LoRA does not
compute (DoRA, biases, modules_to_save, per-module rank or alpha patterns, layers_to_transform, exclude_modules, ...)
are refused by name. Adapter tensors must be floats (an int8 tensor is refused, not cast).

The format of earlier versions of this code (lora.json + lora.safetensors under our module names) still loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ref.config import DTYPES, nonfinite_problem, read_json, show_value
from ref.distributed import full_tensor
from ref.lora import (DEFAULT_TARGETS, PEFT_KEYS, LoraConfig, LoraError, add_lora_to, check_settings, lora_modules,
                      lora_target_names)
from ref.weights import LAYOUTS

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
LEGACY_WEIGHTS = "lora.safetensors"  # the format of earlier versions
LEGACY_CONFIG = "lora.json"
PEFT_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B")

# peft LoraConfig settings this LoRA does not compute: field -> the values that mean "not used" (besides null/absent).
# Each is compared by type and value, so that layers_to_transform 0 (layer 0 only) is not taken for false.
UNSUPPORTED = {"use_dora": (False,), "bias": ("none",), "lora_bias": (False,), "fan_in_fan_out": (False,),
               "modules_to_save": ([],), "rank_pattern": ({},), "alpha_pattern": ({},),
               "trainable_token_indices": ([], {}), "target_parameters": ([],), "layer_replication": ([],),
               "layers_to_transform": ([],), "layers_pattern": ([], ""), "exclude_modules": ([], ""),
               "megatron_config": ({},), "alora_invocation_tokens": ([],), "use_qalora": (False,),
               "use_bdlora": (False, {}), "arrow_config": ({},), "kasa_config": ({},), "monteclora_config": ({},),
               "velora_config": ({},)}
ALL_LINEAR = "all-linear"  # peft's shorthand, resolved against the model when an adapter is created
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # safetensors' floating-point dtypes
# The LLaVA layouts whose module names transformers' LLaVA has had in memory (older releases saved as they held).
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors' codes -> LoraConfig.dtype
PEFT_DEFAULTS = {"r": 8, "alpha": 8, "dropout": 0.0, "use_rslora": False}  # peft LoraConfig's, for absent keys
HF_LAYOUTS = ("hf-5-memory", "hf-4.52-memory", "llava-hf", "hf-5-saved")
WRITE_LAYOUT = "hf-5-memory"  # the names of the installed transformers 5.x


def is_adapter_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / PEFT_CONFIG).is_file() or (folder / LEGACY_CONFIG).is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def hf_module_name(name: str) -> str:
    """Our module name -> transformers 5.x LlavaForConditionalGeneration's."""
    external = LAYOUTS[WRITE_LAYOUT].to_external(f"{name}.weight")
    if external is None:
        raise LoraError(f"{name}: no transformers module name for it")
    return external.removesuffix(".weight")


def target_modules(model: nn.Module, config: LoraConfig) -> str | list[str]:
    """peft's target_modules for the adapters `model` holds: the regex peft full-matches against module names when
    `config` (targets under a scope) selects exactly them, as train.py's adapters are; else the list of their names."""
    names = sorted(lora_modules(model))
    try:
        selected = sorted(lora_target_names(model, config, include_wrapped=True))
    except LoraError:
        selected = []
    if selected == names and config.scope:
        prefix = re.escape(hf_module_name(config.scope.rstrip(".")) + ".")
        return rf"{prefix}(?:.*\.)?(?:{'|'.join(re.escape(t) for t in config.targets)})"
    return [hf_module_name(name) for name in names]


def save_adapter(model: nn.Module, folder: str | Path, config: LoraConfig, base_model: str | None = None,
                 write: bool = True) -> Path:
    """Write the model's adapters in peft's format (the two files are written under temporary names and renamed into
    place, config last: a folder with a config holds a whole adapter). With sharded adapters (FSDP) every rank calls
    this to gather them, and only the one with `write` writes."""
    state = {f"{PEFT_PREFIX}{hf_module_name(name)}.{part}.weight":
             full_tensor(getattr(module, part).weight.detach()).contiguous().cpu()
             for name, module in lora_modules(model).items() for part in LORA_PARTS}
    if not state:
        raise LoraError("the model has no LoRA adapters to save")
    if not write:
        return Path(folder)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": target_modules(model, config), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_dora": False,
        "lora_bias": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "exclude_modules": None,
    }
    weights_tmp, config_tmp = folder / (PEFT_WEIGHTS + ".tmp"), folder / (PEFT_CONFIG + ".tmp")
    save_file(state, str(weights_tmp), metadata={"format": "pt"})
    config_tmp.write_text(json.dumps(peft_config, indent=2) + "\n")
    weights_tmp.replace(folder / PEFT_WEIGHTS)
    config_tmp.replace(folder / PEFT_CONFIG)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_adapter(folder: str | Path, model: nn.Module) -> tuple[LoraConfig, dict[str, str], Path]:
    """(the adapter's settings, {our module name: the tensor key prefix in the file}, the weights file), checked against
    `model` from the config and the safetensors header alone: an adapter for another model fails here, by name."""
    folder = Path(folder)
    if (folder / PEFT_CONFIG).is_file():
        return _read_peft(folder, model)
    if (folder / LEGACY_CONFIG).is_file():
        return _read_legacy(folder, model)
    raise LoraError(f"{folder}: not an adapter folder (no {PEFT_CONFIG}, nor {LEGACY_CONFIG} of earlier versions)")


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype name)} from the safetensors header alone; a tensor that is not a float (an int8 one, say:
    casting it would turn its integers into weights) is refused by its key."""
    if not path.is_file():
        raise LoraError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            header = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
    except (OSError, SafetensorError) as err:
        raise LoraError(f"{path}: not a readable safetensors file ({err})") from err
    for key, (_, code) in header.items():
        if code not in FLOAT_CODES:
            raise LoraError(f"{path}: tensor {key!r} is stored as {code}, not a floating-point type; LoRA's A and B "
                            f"are float tensors (a quantized adapter is not supported)")
    return {key: (shape, DTYPE_NAMES.get(code, code)) for key, (shape, code) in header.items()}


def _read_peft(folder: Path, model: nn.Module) -> tuple[LoraConfig, dict[str, str], Path]:
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    raw = _checked_peft_config(config_path)
    settings = _peft_settings(raw, config_path)  # before the weights file: a bad config is refused by its key
    header = _header(weights_path)
    stored = sorted({_peft_module(key, weights_path) for key in header})
    layout, _ = _layout_of(stored, model, weights_path)
    hf_names = _selected_modules(raw["target_modules"], stored, model, layout, config_path, weights_path)
    names = [LAYOUTS[layout].to_internal(f"{name}.weight").removesuffix(".weight") for name in hf_names]
    dtypes = {header[f"{PEFT_PREFIX}{name}.{part}.weight"][1] for name in hf_names for part in LORA_PARTS
              if f"{PEFT_PREFIX}{name}.{part}.weight" in header}
    try:
        config = LoraConfig(**settings, targets=_targets_of(names), scope=_scope_of(names),
                            dtype=dtypes.pop() if dtypes <= set(DTYPE_NAMES.values()) and len(dtypes) == 1
                            else "float32")
    except LoraError as err:
        raise LoraError(f"{config_path}: {err}") from None
    prefixes = {ours: f"{PEFT_PREFIX}{hf}" for hf, ours in zip(hf_names, names)}
    _check_shapes(model, config, prefixes, header, weights_path)
    return config, prefixes, weights_path


def _checked_peft_config(config_path: Path) -> dict:
    """adapter_config.json read, with every setting this LoRA cannot apply refused by name: another peft_type, the
    settings of UNSUPPORTED in use, and a target_modules that is neither a list of names nor a regular expression."""
    raw = read_json(config_path, LoraError)
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{config_path}: peft_type {raw.get('peft_type')!r}; only LORA adapters load here")
    used = [name for name, unused in UNSUPPORTED.items() if not _is_unused(raw.get(name), unused)]
    if used:
        raise LoraError(f"{config_path}: uses {used}, which this LoRA does not compute")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            raise LoraError(f"{config_path}: target_modules {targets!r} is resolved against the model by peft when "
                            f"the adapter is made; list the module names instead (peft saves them so)")
        try:
            re.compile(targets)
        except re.error as err:
            raise LoraError(f"{config_path}: target_modules {targets!r} is not a valid regular expression "
                            f"({err})") from None
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise LoraError(f"{config_path}: target_modules must be a non-empty list of module names or a regular "
                        f"expression (a string), got {show_value(targets)}")
    return raw


def _is_unused(value, unused: tuple) -> bool:
    return value is None or any(type(value) is type(off) and value == off for off in unused)


def _selects(targets: str | list[str], name: str) -> bool:
    """peft's rule (tuners_utils.check_target_module_exists, without the settings refused above): a string is a
    regular expression that must match the whole module name; a list names modules by their full name or by its last
    dot-separated components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{target}") for target in targets)


def _selected_modules(targets: str | list[str], stored: list[str], model: nn.Module, layout: str, config_path: Path,
                      weights_path: Path) -> list[str]:
    """The modules (transformers' names, as the file spells them) that `target_modules` selects among this model's
    linears and the file holds tensors for. The file's other tensors are left out, as peft leaves them; a selected
    module without tensors is left as it is, as peft's fresh adapter (B = 0) leaves it. A selection that matches no
    module, or none the file holds, is refused: the adapter would change nothing."""
    to_external = LAYOUTS[layout].to_external
    linears = sorted(to_external(f"{name}.weight").removesuffix(".weight")
                     for name, module in model.named_modules()
                     if hasattr(module, "in_features") and to_external(f"{name}.weight"))
    selected = [name for name in linears if _selects(targets, name)]
    if not selected:
        raise LoraError(f"{config_path}: target_modules {show_value(targets)} selects no linear module of this model "
                        f"(module names are spelled like {linears[0]!r}); peft refuses such an adapter too")
    held = [name for name in selected if name in stored]
    if not held:
        raise LoraError(f"{weights_path}: holds no tensors for the {len(selected)} module(s) target_modules "
                        f"{show_value(targets)} selects (e.g. {selected[0]!r}): the adapter would change nothing")
    return held


def _peft_settings(raw: dict, config_path: Path) -> dict:
    """r, alpha, dropout and use_rslora from peft's keys (peft's defaults where absent), each checked under its key."""
    values = {ours: raw.get(PEFT_KEYS[ours], default) for ours, default in PEFT_DEFAULTS.items()}
    if values["use_rslora"] is None:  # null: peft's default
        values["use_rslora"] = False
    try:
        check_settings(**values, keys=PEFT_KEYS)
    except LoraError as err:
        raise LoraError(f"{config_path}: {err}") from None
    return values


def _peft_module(key: str, path: Path) -> str:
    """"base_model.model.<module>.lora_A.weight" -> "<module>"; any other tensor is one this LoRA cannot use."""
    for part in LORA_PARTS:
        suffix = f".{part}.weight"
        if key.startswith(PEFT_PREFIX) and key.endswith(suffix):
            return key[len(PEFT_PREFIX):-len(suffix)]
    raise LoraError(f"{path}: tensor {key!r} is not a LoRA A or B weight (DoRA magnitudes, biases and embedding "
                    f"adapters are not supported)")


def _layout_of(hf_names: list[str], model: nn.Module, path: Path) -> tuple[str, list[str]]:
    """(the first layout under which every one of transformers' module names is a linear of `model`, our names)."""
    linears = {name for name, module in model.named_modules() if hasattr(module, "in_features")}
    for layout in HF_LAYOUTS:
        mapped = [LAYOUTS[layout].to_internal(f"{name}.weight") for name in hf_names]
        names = [m.removesuffix(".weight") if m else None for m in mapped]
        if all(name in linears for name in names):
            return layout, names
    raise LoraError(f"{path}: its modules are not all linears of this model under any LLaVA naming (adapter for "
                    f"another base?); its modules: {hf_names[:3]}{' ...' if len(hf_names) > 3 else ''}")


def _targets_of(names: list[str]) -> tuple[str, ...]:
    last = {name.rpartition(".")[2] for name in names}
    return tuple([t for t in DEFAULT_TARGETS if t in last] + sorted(last - set(DEFAULT_TARGETS)))


def _scope_of(names: list[str]) -> str:
    """The longest common prefix of the names that ends at a '.'."""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind(".") + 1]


def _read_legacy(folder: Path, model: nn.Module) -> tuple[LoraConfig, dict[str, str], Path]:
    config_path, weights_path = folder / LEGACY_CONFIG, folder / LEGACY_WEIGHTS
    config = LoraConfig.from_dict(read_json(config_path, LoraError, f"an adapter folder holds {LEGACY_CONFIG} and "
                                                                    f"{LEGACY_WEIGHTS}"), str(config_path))
    header = _header(weights_path)
    prefixes = {name: name for name in lora_target_names(model, config)}
    expected = {f"{prefix}.{part}.weight" for prefix in prefixes.values() for part in LORA_PARTS}
    missing, unexpected = sorted(expected - set(header)), sorted(set(header) - expected)
    if missing or unexpected:
        raise LoraError(f"{weights_path}: adapter does not fit this model: {len(missing)} tensor(s) missing "
                        f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    _check_shapes(model, config, prefixes, header, weights_path)
    return config, prefixes, weights_path


def _check_shapes(model: nn.Module, config: LoraConfig, prefixes: dict[str, str], header: dict, path: Path) -> None:
    for name, prefix in prefixes.items():
        base = model.get_submodule(name)
        for part, shape in (("lora_A", (config.r, base.in_features)), ("lora_B", (base.out_features, config.r))):
            key = f"{prefix}.{part}.weight"
            if key not in header:
                raise LoraError(f"{path}: {key} is missing")
            if header[key][0] != shape:
                raise LoraError(f"{path}: {key} has shape {header[key][0]}, this model needs {shape} (adapter "
                                f"trained for another base, or r differs from the config's)")


def read_adapter_config(folder: str | Path) -> None:
    """Check that `folder` holds an adapter's config (before a slow model load); the full check needs the model."""
    folder = Path(folder)
    if (folder / PEFT_CONFIG).is_file():
        _peft_settings(_checked_peft_config(folder / PEFT_CONFIG), folder / PEFT_CONFIG)
    elif (folder / LEGACY_CONFIG).is_file():
        LoraConfig.from_dict(read_json(folder / LEGACY_CONFIG, LoraError), str(folder / LEGACY_CONFIG))
    else:
        raise LoraError(f"{folder}: not an adapter folder (no {PEFT_CONFIG}, nor {LEGACY_CONFIG} of earlier versions)")


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Add the adapters stored in `folder` (peft's format or ours of earlier versions) to `model` and load their
    weights; everything is checked first, the tensors' values included, so a model is never left half adapted."""
    config, prefixes, path = read_adapter(folder, model)
    keys = [f"{prefix}.{part}.weight" for prefix in prefixes.values() for part in LORA_PARTS]
    tensors = _read_tensors(path, keys, DTYPES[config.dtype])
    add_lora_to(model, list(prefixes), config)
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            for part in LORA_PARTS:
                getattr(module, part).weight.copy_(tensors[f"{prefixes[name]}.{part}.weight"])
    return config


def _read_tensors(path: Path, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every adapter tensor in the adapters' dtype, each refused by name if it holds NaN or inf (one NaN in an adapter
    makes every output NaN: each response then comes out empty). All are read before the model is touched; an adapter
    is small, r * (in + out) values per linear (80 MB for r = 8 on every linear of a 7B decoder, in float32)."""
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in keys:
            stored = f.get_tensor(key)
            tensors[key] = stored.to(dtype)
            problem = nonfinite_problem(tensors[key], stored)
            if problem:
                raise LoraError(f"{path}: tensor {key!r} {problem}")
    return tensors
