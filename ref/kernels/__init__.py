"""Kernel ops behind one registry; importing this package registers every implementation.

Ops, one file each: rms_norm, rope, swiglu, attention (the model), lora_linear (LoRA over a dense or 4-bit base),
linear_cross_entropy and linear_kl (the losses). Presets: reference, chunked, fast. See `registry.py`.
"""

from ref.kernels import attention, cross_entropy, kl, lora, rms_norm, rope, swiglu  # noqa: F401  (registration side effect)
from ref.kernels.registry import IMPLEMENTATIONS, PRESETS, Kernels, register, resolve

__all__ = ["IMPLEMENTATIONS", "PRESETS", "Kernels", "register", "resolve"]
