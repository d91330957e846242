"""Merge a LoRA adapter (ours, from `ref.lora.save_adapter`) into a dense checkpoint and write a llava-hf folder.

    python -m weights_tools.merge_adapter BASE_DIR ADAPTER_DIR OUT_DIR [--dtype float16] [--peft-out PEFT_DIR]

The base is loaded dense in float32, the adapter added and merged (W <- W + s B A, in float32), and the merged model
written in the llava-hf layout (config.json + model.safetensors) in `--dtype` (default: float16, as llava-hf ships).
Tokenizer and processor files of BASE_DIR are copied along. `--peft-out` also writes the adapter in peft's format
(adapter_config.json + adapter_model.safetensors) for transformers' LlavaForConditionalGeneration.
A 4-bit base is refused: merging into 4 bits rounds the result (train on 4 bits, merge into the dense original).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ref import lora, weights
from ref.config import DTYPES
from ref.console import exit_on_user_error


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float16,
          peft_out: Path | None = None) -> Path:
    lora.read_adapter_config(adapter_dir)  # a missing or broken adapter fails before the (slow) model load
    if weights.is_quantized_checkpoint(base_dir):
        raise ValueError(f"{base_dir}: a 4-bit checkpoint; merge into the dense checkpoint it was quantized from")
    model = weights.load_model(base_dir, dtype=torch.float32, show_progress=True)
    config = lora.load_adapter(model, adapter_dir)
    if peft_out is not None:
        lora.export_peft(model, peft_out, config, base_model_name_or_path=str(base_dir))
    lora.merge_and_unload(model)
    weights.save_model(model, out_dir, dtype=dtype)
    weights.copy_side_files(base_dir, out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.merge_adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("base_dir", type=Path, help="dense LLaVA checkpoint folder the adapter was trained on")
    parser.add_argument("adapter_dir", type=Path, help="folder with lora.json + lora.safetensors")
    parser.add_argument("out_dir", type=Path, help="where to write the merged llava-hf checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="dtype of the written weights")
    parser.add_argument("--peft-out", type=Path, default=None, help="also export the adapter in peft's format here")
    args = parser.parse_args(argv)
    with exit_on_user_error("merge_adapter"):
        out = merge(args.base_dir, args.adapter_dir, args.out_dir, DTYPES[args.dtype], args.peft_out)
    print(f"merged {args.adapter_dir} into {args.base_dir} -> {out} ({args.dtype})"
          + (f"; peft adapter -> {args.peft_out}" if args.peft_out else ""))


if __name__ == "__main__":
    main()
