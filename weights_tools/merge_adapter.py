"""Merge a LoRA adapter into a dense checkpoint and write a llava-hf folder.

    python -m weights_tools.merge_adapter BASE_DIR ADAPTER_DIR OUT_DIR [--dtype float16]

The adapter is any adapter folder our loader reads: train.py's (peft's format), one trained with peft on transformers'
LLaVA, or the lora.json format of earlier versions. The base is loaded dense in float32, the adapter added and merged
(W <- W + s B A, in float32), and the merged model written in the llava-hf layout (config.json + model.safetensors) in
`--dtype` (default: float16, as llava-hf ships). Tokenizer and processor files of BASE_DIR are copied along.

A 4-bit base is refused: merging into 4 bits rounds the result. Merging into the dense original is what this tool does,
and the result is not the model that was trained when the adapter was trained on a 4-bit base (QLoRA, train.py's
default): the adapter learnt to correct the 4-bit weights, and the dense weights differ from them by the quantization
error. README ("Weights tools") gives the measured size of the difference on the toy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ref import adapters, lora, weights
from ref.config import DTYPES
from harness.console import LoadProgressLine, add_debug_option, exit_on_user_error
from harness.files import check_new_folder, new_folder


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    inputs = (base_dir, adapter_dir)
    check_new_folder(out_dir, inputs)  # before the (slow) model load: never into an input, never over files
    adapters.read_adapter_config(adapter_dir)  # a missing or broken adapter fails before the model load too
    if weights.is_quantized_checkpoint(base_dir):
        raise ValueError(f"{base_dir}: a 4-bit checkpoint; merge into the dense checkpoint it was quantized from")
    model = weights.load_model(base_dir, dtype=torch.float32, progress=LoadProgressLine())
    adapters.load_adapter(model, adapter_dir)
    lora.merge_and_unload(model)
    with new_folder(out_dir, inputs) as partial:  # renamed to out_dir once complete
        weights.save_model(model, partial, dtype=dtype)
        weights.copy_side_files(base_dir, partial)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.merge_adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("base_dir", type=Path, help="dense LLaVA checkpoint folder the adapter was trained on")
    parser.add_argument("adapter_dir", type=Path,
                        help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out_dir", type=Path, help="where to write the merged llava-hf checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="dtype of the written weights")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error("merge_adapter", args.debug):
        out = merge(args.base_dir, args.adapter_dir, args.out_dir, DTYPES[args.dtype])
    print(f"merged {args.adapter_dir} into {args.base_dir} -> {out} ({args.dtype})")


if __name__ == "__main__":
    main()
