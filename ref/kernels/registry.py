"""The hook registry: every performance-critical op is called through one table, at an explicit call site.

Each op has a plain-PyTorch `reference` implementation, the one a reader audits. Faster variants register under the
same op name and are tested against the reference (outputs and input gradients). A `Kernels` table is resolved once,
from a preset plus per-op overrides, and handed to the model and the losses at construction: nothing here is global
state that changes behaviour behind a caller's back, only a catalogue of what exists.
"""

from __future__ import annotations

from typing import Callable

# op name -> implementation name -> function
IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}

# preset name -> op name -> implementation name (ops a preset leaves out use "reference")
PRESETS: dict[str, dict[str, str]] = {
    "reference": {},
    # the loss ops chunked over tokens: never the full [tokens x vocab] logits (ref/kernels/cross_entropy.py, kl.py)
    "chunked": {"linear_cross_entropy": "chunked", "linear_kl": "chunked"},
    # every faster variant there is: chunked losses, the fused LoRA-over-4-bit function, PyTorch's fused attention
    # (causal FlashAttention on training batches), SwiGLU keeping two tensors instead of three. train.py's and
    # eval.py's default on every model but the toy (tests/test_fast_preset.py holds it to the reference)
    "fast": {"linear_cross_entropy": "chunked", "linear_kl": "chunked", "lora_linear": "fused", "attention": "sdpa",
             "swiglu": "fused"},
}


def register(op: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` available as implementation `name` of `op`."""

    def add(fn: Callable) -> Callable:
        impls = IMPLEMENTATIONS.setdefault(op, {})
        if name in impls:
            raise ValueError(f"kernel {op}/{name} registered twice")
        impls[name] = fn
        return fn

    return add


class Kernels:
    """A resolved table: `kernels.rms_norm(x, w, eps)` calls the implementation chosen for `rms_norm`."""

    def __init__(self, choice: dict[str, str]):
        self.choice = dict(choice)  # op -> implementation name, kept for printing and for run folders
        for op, name in self.choice.items():
            setattr(self, op, IMPLEMENTATIONS[op][name])

    def table(self) -> str:
        width = max(len(op) for op in self.choice)
        return "\n".join(f"  {op:<{width}}  {name}" for op, name in sorted(self.choice.items()))

    def __repr__(self) -> str:
        return f"Kernels({self.choice})"


def resolve(preset: str = "reference", overrides: dict[str, str] | None = None) -> Kernels:
    """Pick one implementation per op: the preset's choice, then `overrides` (op -> name) on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown kernel preset {preset!r}; known: {sorted(PRESETS)}")
    choice = {op: "reference" for op in IMPLEMENTATIONS}
    choice.update(PRESETS[preset])
    for op, name in (overrides or {}).items():
        if op not in IMPLEMENTATIONS:
            raise ValueError(f"unknown kernel op {op!r}; known: {sorted(IMPLEMENTATIONS)}")
        if name not in IMPLEMENTATIONS[op]:
            raise ValueError(f"unknown implementation {name!r} of {op}; known: {sorted(IMPLEMENTATIONS[op])}")
        choice[op] = name
    return Kernels(choice)
