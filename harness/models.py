"""The base model as both programs load it: one call, the options' names mapped to ref.weights.load_model's."""

from __future__ import annotations

from pathlib import Path

from harness.console import LoadProgressLine
from ref.config import DTYPES
from ref.kernels import Kernels
from ref.llava import Llava
from ref.weights import load_model


def load_base(model: str | Path, dtype: str, device: str, vision_dir: str | None, kernels: Kernels, quantize: str,
              show_progress: bool = True) -> Llava:
    """The base model (dense, or with 4-bit decoder linears: `quantize` "nf4"/"fp4"; "none" is dense), in eval mode
    with every weight frozen; a progress line on stderr while it loads, where `show_progress` (the main rank)."""
    return load_model(model, dtype=DTYPES[dtype], device=device, vision_dir=vision_dir, kernels=kernels,
                      quantize=None if quantize == "none" else quantize,
                      progress=LoadProgressLine() if show_progress else None)
