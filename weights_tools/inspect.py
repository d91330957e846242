"""Describe a LLaVA checkpoint folder without loading its tensors (headers only).

Prints the detected key layout, the number of stored tensors, the parameter count of each part (vision tower,
projector, decoder, lm_head), the stored dtypes, the files and a config summary. Every strictness check of the loader
runs too, so a checkpoint that `inspect` accepts loads.

    python -m weights_tools.inspect MODEL_DIR [--vision-dir CLIP_DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from harness.console import add_debug_option, exit_on_user_error
from ref.weights import open_checkpoint

PARTS = {"vision_tower.": "vision_tower", "multi_modal_projector.": "projector", "language_model.": "decoder",
         "lm_head.": "lm_head"}


def part_of(name: str) -> str:
    return next(part for prefix, part in PARTS.items() if name.startswith(prefix))


def describe(path: str | Path, vision_dir: str | Path | None = None) -> dict:
    """A checkpoint's summary as a dict (what `inspect` prints)."""
    checkpoint = open_checkpoint(path, vision_dir)
    params = dict.fromkeys(PARTS.values(), 0)
    for name, info in checkpoint.entries.items():  # per model parameter (a tied lm_head counts once more)
        params[part_of(name)] += math.prod(info.shape)
    stored = {(info.file, info.key): info for info in checkpoint.entries.values()}  # distinct stored tensors
    config = checkpoint.config
    return {
        "folder": str(checkpoint.folder),
        "vision_dir": None if checkpoint.vision_dir is None else str(checkpoint.vision_dir),
        "layout": checkpoint.layout,
        "files": [str(file) for file in checkpoint.files],
        "tensors": len(stored),
        "ignored_keys": len(checkpoint.ignored),
        "parameters": {**params, "total": sum(params.values())},
        "dtypes": dict(sorted(Counter(info.dtype for info in stored.values()).items())),
        "config": {
            "source_format": config.source_format,
            "vision": vision_line(config.vision),
            "text": f"LLaMA {config.text.num_hidden_layers} layers, hidden {config.text.hidden_size}, "
                    f"{config.text.num_attention_heads} heads ({config.text.num_key_value_heads} KV), "
                    f"MLP {config.text.intermediate_size}, vocab {config.text.vocab_size}",
            "image_token_index": config.image_token_index,
            "pad_token_id": config.pad_token_id,
            "image_seq_length": config.image_seq_length,
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "tie_word_embeddings": config.text.tie_word_embeddings,
        },
    }


def vision_line(vision) -> str:
    if vision is None:
        return "none (a text-only LLaMA)"
    return (f"CLIP {vision.num_hidden_layers} layers, hidden {vision.hidden_size}, {vision.num_attention_heads} heads, "
            f"image {vision.image_size}, patch {vision.patch_size}")


def format_summary(summary: dict) -> str:
    p = summary["parameters"]
    lines = [f"checkpoint   {summary['folder']}" + (f"  (vision: {summary['vision_dir']})" if summary['vision_dir']
                                                     else ""),
             f"layout       {summary['layout']}",
             f"tensors      {summary['tensors']} stored ({summary['ignored_keys']} ignored keys)",
             "parameters   " + ", ".join(f"{part} {p[part]:,}" for part in PARTS.values()) + f"; total {p['total']:,}",
             "dtypes       " + ", ".join(f"{dtype} x{count}" for dtype, count in summary["dtypes"].items()),
             "files        " + "\n             ".join(summary["files"])]
    lines += [f"config       {key}: {value}" for key, value in summary["config"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="folder with config.json and model safetensors")
    parser.add_argument("--vision-dir", type=Path, default=None, help="CLIP folder (original-format checkpoints)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error("inspect", args.debug):
        summary = describe(args.model_dir, args.vision_dir)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


if __name__ == "__main__":
    main()
