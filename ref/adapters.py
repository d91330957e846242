"""Adapter files. Our adapter format is peft's, so that an adapter trained here loads with `PeftModel.from_pretrained`
on transformers' LlavaForConditionalGeneration unchanged, and an adapter trained with peft loads here:

    <folder>/adapter_config.json        peft's LoraConfig fields: r, lora_alpha, lora_dropout, use_rslora,
                                        target_modules, base_model_name_or_path, ...
    <folder>/adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in)
                                        base_model.model.<module>.lora_B.weight  (out, r)

<module> is a module name of transformers' LLaVA: `model.language_model.layers.0.self_attn.q_proj` (transformers
>= 4.52), `language_model.model.layers.0...` (older releases); the vision tower's linears too, where peft's
target_modules reached them (["q_proj", "v_proj"] does). Reading maps the names onto ours through the checkpoint key
layouts of ref/weights.py, and puts an adapter on exactly the modules the file holds. Anything peft can store that
this LoRA does not compute (DoRA, biases, modules_to_save, per-module rank or alpha patterns) is refused by name.

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

from ref.config import DTYPES, nonfinite_problem, read_json
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

# peft LoraConfig settings this LoRA does not compute: (field, the value that means "not used")
UNSUPPORTED = (("use_dora", False), ("bias", "none"), ("lora_bias", False), ("fan_in_fan_out", False),
               ("modules_to_save", None), ("rank_pattern", {}), ("alpha_pattern", {}),
               ("trainable_token_indices", None), ("target_parameters", None), ("layer_replication", None))
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
    """{key: (shape, dtype name)} from the safetensors header alone."""
    if not path.is_file():
        raise LoraError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            return {key: (tuple(s.get_shape()), DTYPE_NAMES.get(s.get_dtype(), s.get_dtype()))
                    for key, s in slices.items()}
    except (OSError, SafetensorError) as err:
        raise LoraError(f"{path}: not a readable safetensors file ({err})") from err


def _read_peft(folder: Path, model: nn.Module) -> tuple[LoraConfig, dict[str, str], Path]:
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    raw = read_json(config_path, LoraError)
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{config_path}: peft_type {raw.get('peft_type')!r}; only LORA adapters load here")
    used = [name for name, unused in UNSUPPORTED if raw.get(name) not in (unused, None, {}, [], False)]
    if used:
        raise LoraError(f"{config_path}: uses {used}, which this LoRA does not compute")
    settings = _peft_settings(raw, config_path)  # before the weights file: a bad config is refused by its key
    header = _header(weights_path)
    hf_names = sorted({_peft_module(key, weights_path) for key in header})
    names = _our_module_names(hf_names, model, weights_path)
    dtypes = {dtype for _, dtype in header.values()}
    try:
        config = LoraConfig(**settings, targets=_targets_of(names), scope=_scope_of(names),
                            dtype=dtypes.pop() if dtypes <= set(DTYPE_NAMES.values()) and len(dtypes) == 1
                            else "float32")
    except LoraError as err:
        raise LoraError(f"{config_path}: {err}") from None
    prefixes = {ours: f"{PEFT_PREFIX}{hf}" for hf, ours in zip(hf_names, names)}
    _check_shapes(model, config, prefixes, header, weights_path)
    return config, prefixes, weights_path


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


def _our_module_names(hf_names: list[str], model: nn.Module, path: Path) -> list[str]:
    """Map transformers' module names onto ours with the first layout under which every one is a linear of `model`."""
    linears = {name for name, module in model.named_modules() if hasattr(module, "in_features")}
    for layout in HF_LAYOUTS:
        mapped = [LAYOUTS[layout].to_internal(f"{name}.weight") for name in hf_names]
        names = [m.removesuffix(".weight") if m else None for m in mapped]
        if all(name in linears for name in names):
            return names
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
        _peft_settings(read_json(folder / PEFT_CONFIG, LoraError), folder / PEFT_CONFIG)
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
