"""LoRA adapters over any base linear (dense nn.Linear or 4-bit `ref.quant.Linear4bit`).

A frozen base y = base(x) gets a trainable low-rank update (Hu et al. 2021):

    y = base(x) + s * B A dropout(x)        A (r, in), B (out, r), s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts kaiming-uniform (a = sqrt(5), as nn.Linear and peft do) and B at zero, so a fresh adapter changes nothing.
The adapter has its own dtype (float32 by default, whatever the base): x is cast to it on the way in and the update is
cast back to the base output's dtype, as peft does, so bf16 bases still train fp32 adapters.

Wrapping a module keeps the base as a child named `base_layer` (peft's name), so quantizing the base and adding LoRA are
independent steps. Also here: switching every adapter off (`adapters_disabled`, how the unlearning losses get the
original model without a second copy) and merging into a dense base (a 4-bit base is refused: re-quantizing rounds the
merged weight, and the base could not be restored). Adapter files (peft's format) are ref/adapters.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from ref.config import DTYPES, nonfinite_problem, show_value
from ref.kernels import Kernels, resolve
from ref.quant import Linear4bit


class LoraError(ValueError):
    """A LoRA setting, adapter file or model that do not fit together."""


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_SCOPE = "language_model.layers."  # only the decoder's linears: not the vision tower, projector or lm_head


# W + s B A rounded back to 4 bits is neither the adapted model nor, after unmerging, the base: "adapters off" would no
# longer be the original model.
MERGE_INTO_4BIT = ("cannot merge a LoRA adapter into a 4-bit base: re-quantizing W + s B A rounds it, and unmerging "
                   "would not restore the base; merge into the dense checkpoint "
                   "(python -m weights_tools.merge_adapter)")


# peft accepts any positive lora_alpha. The scaling s = alpha / r (rsLoRA: alpha / sqrt(r)) multiplies every update, and
# common settings keep it near 1 (QLoRA's alpha 16 at r 64: s = 0.25; train.py's alpha 16 at r 8: s = 2). A bound of
# 1e4 is far past any of them, yet refuses the alphas (1e30, inf) for which s B A x overflows and every output is NaN.
MAX_SCALING = 1e4
# The names of LoraConfig's settings in messages, and the same settings as peft's adapter_config.json spells them.
OUR_KEYS = {"r": "LoRA rank r", "alpha": "LoRA alpha", "dropout": "LoRA dropout", "use_rslora": "use_rslora"}
PEFT_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_settings(r, alpha, dropout, use_rslora, keys: dict[str, str] = OUR_KEYS) -> None:
    """LoRA's numeric settings, each refused by its name in `keys` (ours, or peft's file keys): a rank that is not a
    positive integer, an alpha that is not a finite number > 0 or scales the update past MAX_SCALING, a dropout outside
    [0, 1). Python's json reads NaN and Infinity, so finiteness is checked, not assumed."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LoraError(f"{keys['r']} must be a positive integer, got {show_value(r)}")
    if not _is_number(alpha) or alpha <= 0:
        raise LoraError(f"{keys['alpha']} must be a finite number > 0, got {show_value(alpha)}")
    if not isinstance(use_rslora, bool):
        raise LoraError(f"{keys['use_rslora']} must be true or false, got {show_value(use_rslora)}")
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    if scaling > MAX_SCALING:
        raise LoraError(f"{keys['alpha']} {alpha:g} at {keys['r']} {r} scales the update by {scaling:.3g}, more than "
                        f"{MAX_SCALING:g} (no LoRA setting comes near; the update would overflow)")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise LoraError(f"{keys['dropout']} must be in [0, 1), got {show_value(dropout)}")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # last component of the module name (e.g. "q_proj")
    scope: str = DEFAULT_SCOPE  # module names must start with this
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)
    dtype: str = "float32"  # the adapter weights' dtype

    def __post_init__(self):
        check_settings(self.r, self.alpha, self.dropout, self.use_rslora)
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise LoraError(f"LoRA targets must be a non-empty list of module names, got {self.targets!r}")
        if self.dtype not in DTYPES:
            raise LoraError(f"LoRA dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "targets", tuple(self.targets))  # JSON gives lists

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, raw: dict, where: str = "LoRA config") -> "LoraConfig":
        if not isinstance(raw, dict):
            raise LoraError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in raw]
        unknown = sorted(set(raw) - set(names))
        if missing:
            raise LoraError(f"{where}: missing field(s) {missing} (a LoRA config needs {names})")
        if unknown:
            raise LoraError(f"{where}: unknown field(s) {unknown} (expected {names})")
        try:
            return cls(**raw)
        except LoraError as err:
            raise LoraError(f"{where}: {err}") from None


def _weight_of(base: nn.Module) -> torch.Tensor:
    """Any tensor of the base that tells its device (the dense weight, or the 4-bit packed codes)."""
    return base.weight


class LoraLinear(nn.Module):
    """base(x) + scaling * lora_B(lora_A(dropout(x))), with the base frozen."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or resolve()  # the `lora_linear` op computes the adapted forward
        if r <= 0:
            raise LoraError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = _weight_of(base).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: behave exactly as the base (see adapters_disabled)
        self.merged = False  # True: the update lives inside the base weight
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and peft
        nn.init.zeros_(self.lora_B.weight)  # so the adapted model starts as the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base_layer(x)  # (..., out)
        # base(x) + s * B A dropout(x), through the kernel table (ref/kernels/lora.py holds the reference formula)
        return self.kernels.lora_linear(x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                        self.dropout)  # (..., out)

    # --- merging ----------------------------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """s * B A (out, in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _add_to_base(self, sign: float) -> None:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            raise LoraError(MERGE_INTO_4BIT)
        if not isinstance(base, nn.Linear):
            raise LoraError(f"cannot merge into a base of type {type(base).__name__} (nn.Linear)")
        with torch.no_grad():
            merged = base.weight.float() + sign * self.delta_weight().to(base.weight.device)
            cast = merged.to(base.weight.dtype)
            problem = nonfinite_problem(cast, merged)  # a NaN adapter, or a sum past the base dtype's range
            if problem:  # refused before the weight changes: a merged checkpoint must never hold NaN or inf
                raise LoraError(f"not {'merged' if sign > 0 else 'unmerged'}: W {'+' if sign > 0 else '-'} s B A "
                                f"{problem}")
            base.weight.copy_(cast)

    def merge(self) -> None:
        """W <- W + s B A; the adapter then adds nothing in forward."""
        if self.merged:
            raise LoraError("adapter is already merged")
        self._add_to_base(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - s B A (exact up to the base dtype's rounding)."""
        if not self.merged:
            raise LoraError("adapter is not merged")
        self._add_to_base(-1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dtype={self.lora_A.weight.dtype}"


# ---------------------------------------------------------------------------------------------------------------------
# Adding adapters to a model, switching them off, merging


def lora_target_names(model: nn.Module, config: LoraConfig, include_wrapped: bool = False) -> list[str]:
    """Names of the modules `config` puts adapters on; every target name must match at least one. include_wrapped:
    count linears already wrapped in LoraLinear (to ask which modules a config selects on an adapted model)."""
    names, matched = [], set()
    for name, module in model.named_modules():
        last = name.rpartition(".")[2]
        wrapped_ok = include_wrapped or not isinstance(module, LoraLinear)
        if name.startswith(config.scope) and last in config.targets and hasattr(module, "in_features") and wrapped_ok:
            names.append(name)
            matched.add(last)
    unmatched = [t for t in config.targets if t not in matched]
    if unmatched:
        raise LoraError(f"LoRA target(s) {unmatched} match no linear module under {config.scope!r} "
                        f"(targets are last name components such as 'q_proj')")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_lora(model: nn.Module, config: LoraConfig = LoraConfig()) -> list[str]:
    """Wrap the target linears in LoraLinear (in place); freeze everything but the adapters; return their names."""
    if lora_modules(model):
        raise LoraError("the model already has LoRA adapters")
    names = lora_target_names(model, config)
    add_lora_to(model, names, config)
    return names


def add_lora_to(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """Wrap exactly the linears `names` (an adapter file's modules) with `config`'s rank, alpha, dropout and dtype;
    freeze everything but the adapters."""
    if lora_modules(model):
        raise LoraError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        wrapper = LoraLinear(model.get_submodule(name), config.r, config.alpha, config.dropout, config.use_rslora,
                             DTYPES[config.dtype], kernels=getattr(model, "kernels", None))  # the model's kernels
        wrapper.train(model.training)  # a new module starts in training mode: follow the model's (dropout off in eval)
        model.set_submodule(name, wrapper)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: {"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return state


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model is its base: every adapter is switched off (and back on afterwards)."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise LoraError("cannot switch adapters off while they are merged into the base; unmerge first")
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.enabled = was


def _check_mergeable(modules: dict[str, LoraLinear]) -> None:
    """Refuse before anything changes, so that a model is never left half merged."""
    for name, module in modules.items():
        if isinstance(module.base_layer, Linear4bit):
            raise LoraError(f"{name}: {MERGE_INTO_4BIT}")


def _merge_all(modules: dict[str, LoraLinear], skip_merged: bool) -> None:
    """Merge each adapter. One that cannot be merged (its W + s B A is not finite) is refused by its weight's name,
    after the ones merged so far are unmerged: the model is left as it was, up to the base dtype's rounding."""
    done = []
    for name, module in modules.items():
        if skip_merged and module.merged:
            continue
        try:
            module.merge()
        except LoraError as err:
            for merged in reversed(done):
                merged.unmerge()
            raise LoraError(f"{name}.weight: {err}") from None
        done.append(module)


def merge_lora(model: nn.Module) -> None:
    modules = lora_modules(model)
    _check_mergeable(modules)
    _merge_all(modules, skip_merged=False)


def unmerge_lora(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.unmerge()


def merge_and_unload(model: nn.Module) -> list[str]:
    """Merge every adapter into its base and put the bases back in place of the wrappers (in place)."""
    modules = lora_modules(model)
    _check_mergeable(modules)
    _merge_all(modules, skip_merged=True)  # every merge succeeds before any wrapper is removed
    for name, module in modules.items():
        model.set_submodule(name, module.base_layer)
    return list(modules)


def remove_adapters(model: nn.Module) -> None:
    """Put every LoRA-wrapped linear's base back in its place: the model is exactly the base again."""
    for name, module in lora_modules(model).items():
        if module.merged:
            raise LoraError(f"{name}: adapter is merged into the base; cannot remove it")
        model.set_submodule(name, module.base_layer)
