"""Cross-modal safety alignment by textual unlearning: a minimal, readable LLaVA-1.5 reference.

The public API for scripts and notebooks:

    model = ref.load_model(path, dtype=torch.float32, device="cpu", quantize=None)   # ref.llava.Llava
    processor = ref.load_processor(path)                                             # ref.data.Processor
    inputs = processor(ref.build_prompt("What is this?", num_images=1), images=[image])
    logits = model(**inputs)                       # (B, T, vocab), as transformers' LLaVA
    out = model.generate(**inputs, max_new_tokens=32, tokenizer=processor)          # out.sequences, out.text
"""

from ref.config import LlavaConfig, load_config
from ref.data import build_prompt, load_processor
from ref.llava import Llava
from ref.weights import load_model  # load_model(path, dtype, device, vision_dir, kernels, quantize=None | "nf4" | "fp4")

__all__ = ["Llava", "LlavaConfig", "build_prompt", "load_config", "load_model", "load_processor"]
