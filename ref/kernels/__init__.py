"""Kernel ops behind one registry; importing this package registers every implementation.

Ops: rms_norm, rope, swiglu, attention (model), and the loss ops added beside them. See `registry.py`.
"""

from ref.kernels import attention, cross_entropy, kl, lora, rms_norm, rope, swiglu  # noqa: F401  (registration side effect)
from ref.kernels.registry import IMPLEMENTATIONS, PRESETS, Kernels, register, resolve

__all__ = ["IMPLEMENTATIONS", "PRESETS", "Kernels", "register", "resolve"]
