"""Quantize a dense LLaVA checkpoint to 4 bits ahead of time, so that later loads skip quantization.

    python -m weights_tools.quantize DENSE_DIR OUT_DIR [--quant-type nf4|fp4] [--blocksize 64] [--no-double-quant]
                                     [--dtype float16] [--vision-dir CLIP_DIR]

The checkpoint streams in tensor by tensor (peak memory: the 4-bit model plus one tensor); the decoder's linears are
quantized from `--dtype` (default float16, the dtype LLaVA ships in) and the rest kept in it. OUT_DIR gets config.json
with a bitsandbytes `quantization_config` and model.safetensors with the packed weights and bitsandbytes' quant state
(`ref.weights.save_quantized`); `ref.weights.load_model(OUT_DIR)` reads it back bit for bit. Tokenizer and processor
files are copied along.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ref import quant, weights
from ref.config import DTYPES
from harness.console import LoadProgressLine, add_debug_option, exit_on_user_error
from harness.files import check_new_folder, new_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="dense LLaVA checkpoint folder")
    parser.add_argument("out_dir", type=Path, help="where to write the 4-bit checkpoint")
    parser.add_argument("--quant-type", choices=quant.QUANT_TYPES, default="nf4")
    parser.add_argument("--blocksize", type=int, choices=quant.BLOCKSIZES, default=64)
    parser.add_argument("--no-double-quant", action="store_true", help="keep the per-block maxima in float32")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                        help="dtype the weights are cast to before quantizing (and the dense parts are kept in)")
    parser.add_argument("--vision-dir", type=Path, default=None, help="CLIP folder (original-format checkpoints)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    config = quant.QuantConfig(args.quant_type, args.blocksize, not args.no_double_quant)
    start = time.perf_counter()
    inputs = [args.model_dir] + ([args.vision_dir] if args.vision_dir else [])
    with exit_on_user_error("quantize", args.debug):
        check_new_folder(args.out_dir, inputs)  # before the load: never into an input, never over files
        model = weights.load_model(args.model_dir, DTYPES[args.dtype], vision_dir=args.vision_dir, quantize=config,
                                   progress=LoadProgressLine())
        with new_folder(args.out_dir, inputs) as partial:  # renamed to OUT_DIR once complete
            weights.save_quantized(model, partial)
            weights.copy_side_files(args.model_dir, partial)
    n_4bit = sum(isinstance(m, quant.Linear4bit) for m in model.modules())
    print(f"quantized {n_4bit} linears ({args.quant_type}, blocksize {args.blocksize}, double quant "
          f"{not args.no_double_quant}) in {time.perf_counter() - start:.1f}s: {args.out_dir} holds "
          f"{quant.model_nbytes(model) / 2**20:.1f} MiB of weights")


if __name__ == "__main__":
    main()
