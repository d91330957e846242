"""Cross-modal safety alignment by textual unlearning: a minimal, readable LLaVA-1.5 reference.

The public API for scripts and notebooks:

    model = ref.load_model(path, dtype=torch.float32, device="cpu", quantize=None)   # ref.llava.Llava
    processor = ref.load_processor(path)                                             # ref.data.Processor
    inputs = processor(ref.build_prompt("What is this?", num_images=1), images=[image])
    logits = model(**inputs)                       # (B, T, vocab), as transformers' LLaVA
    out = model.generate(**inputs, max_new_tokens=32, tokenizer=processor)          # out.sequences, out.text
"""

from __future__ import annotations

from pathlib import Path

import torch

from ref.config import LlavaConfig, load_config
from ref.data import build_prompt, load_processor
from ref.kernels import Kernels
from ref.llava import Llava


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantize: str | None = None, vision_dir: str | Path | None = None,
               kernels: Kernels | None = None) -> Llava:
    """Load a LLaVA model folder, frozen, in eval mode.

    quantize: None keeps every weight dense (in `dtype`); "nf4" or "fp4" quantizes the decoder's linears to 4 bits as
    they stream in (peak memory: the 4-bit model plus about one tensor). A folder written by
    `weights_tools.quantize` is already 4-bit and loads as stored. `dtype` is the compute dtype either way.
    """
    from ref import quant, weights  # imported here: quant pulls in bitsandbytes, which a dense load does not need

    if quantize is None and not quant.is_quantized_checkpoint(path):
        return weights.load_model(path, dtype=dtype, device=device, vision_dir=vision_dir, kernels=kernels)
    return quant.load_quantized_model(path, quantize, dtype=dtype, device=device, vision_dir=vision_dir,
                                      kernels=kernels)


__all__ = ["Llava", "LlavaConfig", "build_prompt", "load_config", "load_model", "load_processor"]
