"""Convert the original LLaVA release (liuhaotian/llava-v1.5-*) + its CLIP folder into a llava-hf layout folder.

Inputs: the LLaVA folder (flat LLaMA config.json with `mm_*` keys; weights as safetensors or PyTorch .bin, single or
sharded) and the CLIP folder (openai/clip-vit-large-patch14-336: config.json and weights). PyTorch .bin files are read
with `torch.load(..., weights_only=True)` only (no arbitrary pickles), here and nowhere else.

Output: config.json in llava-hf format and the weights in the llava-hf published layout; one output file per input
file (so memory stays at one input file): `model.safetensors` when that is one file, else shards with
`model.safetensors.index.json`. Keys, shapes and dtypes are checked exactly as the loader checks them.

Vocabulary: like llava-hf, `<image>` gets id V and `<pad>` id V + 1 (V = the original vocab, 32000), and embed_tokens
and lm_head are padded to a multiple of 64 rows (32064). New rows, embed_tokens and lm_head alike, are the MEAN of the
original embed_tokens rows. (llava-hf's converter draws each new row from a normal distribution with that mean and
covariance 1e-5 * the rows' covariance, for lm_head too; the mean is that distribution's expected value, and
deterministic.) The tokenizer is not converted: add "<image>" and "<pad>" to it with those ids.

    python -m weights_tools.convert_original LLAVA_DIR CLIP_DIR OUT_DIR [--dtype keep|float16|bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ref.config import DTYPES, load_config, nonfinite_problem
from harness.console import add_debug_option, exit_on_user_error
from harness.files import check_new_folder, new_folder
from ref.weights import (FLOAT_DTYPES, INDEX_FILE, LAYOUTS, SINGLE_FILE, CheckpointError, TensorInfo, match_checkpoint,
                         open_checkpoint, read_headers, read_index)

BIN_FILE, BIN_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"
PAD_MULTIPLE = 64
EMBED, LM_HEAD = "language_model.embed_tokens.weight", "lm_head.weight"
OUTPUT_DTYPES = {"keep": None, **DTYPES}
_TORCH_TO_SAFETENSORS = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Reading the inputs: safetensors through the loader, .bin through torch.load(weights_only=True)


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # an unpickling refusal, a truncated zip, ...: all mean "not a plain state_dict file"
        raise CheckpointError(f"{file}: not a readable PyTorch weights file (weights_only=True): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state_dict)")
    return state


class Source:
    """The tensors of one input folder: headers up front, data on demand, one file open at a time."""

    def __init__(self, folder: Path):
        self.folder, self.is_bin = folder, False
        has_safetensors = (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
        if has_safetensors or not ((folder / BIN_FILE).is_file() or (folder / BIN_INDEX_FILE).is_file()):
            self.infos = read_headers(folder)  # safetensors (or the loader's "no weights here" error)
            return
        self.is_bin = True
        files = [folder / BIN_FILE]
        if (folder / BIN_INDEX_FILE).is_file():
            weight_map = read_index(folder / BIN_INDEX_FILE)
            files = [folder / name for name in sorted(set(weight_map.values()))]
        self.infos = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{folder / BIN_INDEX_FILE}: shard {file.name!r} is listed but does not exist")
            for key, tensor in _load_bin(file).items():  # mmap: only the headers are touched here
                dtype = _TORCH_TO_SAFETENSORS.get(tensor.dtype, str(tensor.dtype))
                self.infos[key] = TensorInfo(key, file, tuple(tensor.shape), dtype)

    def read(self, file: Path, keys: list[str]) -> dict[str, torch.Tensor]:
        if self.is_bin:
            state = _load_bin(file)
            return {key: state[key] for key in keys}
        with safe_open(file, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in keys}


# ---------------------------------------------------------------------------------------------------------------------
# Conversion


def padded_vocab(vocab_size: int) -> int:
    """V + 2 added tokens (<image>, <pad>), rounded up to a multiple of 64: 32000 -> 32064."""
    return math.ceil((vocab_size + 2) / PAD_MULTIPLE) * PAD_MULTIPLE


def pad_rows(table: torch.Tensor, rows: int, new_row: torch.Tensor) -> torch.Tensor:
    """(V, D) -> (rows, D), the new rows all equal to `new_row`."""
    extra = new_row.to(table.dtype).expand(rows - table.shape[0], -1)
    return torch.cat([table, extra], dim=0)


def convert_original(model_dir: str | Path, clip_dir: str | Path, out_dir: str | Path,
                     dtype: torch.dtype | None = None) -> Path:
    """Write the llava-hf version of an original-format LLaVA checkpoint to `out_dir`; return `out_dir`."""
    model_dir, clip_dir, out_dir = Path(model_dir), Path(clip_dir), Path(out_dir)
    check_new_folder(out_dir, (model_dir, clip_dir))  # never into an input, never over files
    config = load_config(model_dir, clip_dir)
    if config.source_format != "original":
        raise CheckpointError(f"{model_dir / 'config.json'}: already in llava-hf format; nothing to convert")
    text_source, clip_source = Source(model_dir), Source(clip_dir)
    _, entries, _ = match_checkpoint(config, text_source.infos, str(model_dir), clip_source.infos, str(clip_dir))
    text_entries = {name: info for name, info in entries.items() if not name.startswith("vision_tower.")}
    vision_entries = {name: info for name, info in entries.items() if name.startswith("vision_tower.")}

    vocab = config.text.vocab_size
    new_config = replace(config, text=replace(config.text, vocab_size=padded_vocab(vocab)), image_token_index=vocab,
                         pad_token_id=vocab + 1, source_format="llava-hf")
    embed_info = text_entries[EMBED]
    embed = text_source.read(embed_info.file, [embed_info.key])[embed_info.key]
    new_row = embed.float().mean(dim=0)  # (D,): the mean embedding, for every new row of embed_tokens and lm_head
    del embed

    # One output file per input file, in a fixed order: the LLaVA files, then the CLIP files.
    jobs = [(text_source, file, {n: i for n, i in text_entries.items() if i.file == file})
            for file in sorted({i.file for i in text_entries.values()})]
    jobs += [(clip_source, file, {n: i for n, i in vision_entries.items() if i.file == file})
             for file in sorted({i.file for i in vision_entries.values()})]
    with new_folder(out_dir, (model_dir, clip_dir)) as partial:  # renamed to out_dir once complete and checked
        to_external = LAYOUTS["llava-hf"].to_external
        names = [SINGLE_FILE] if len(jobs) == 1 else [f"model-{i + 1:05d}-of-{len(jobs):05d}.safetensors"
                                                      for i in range(len(jobs))]
        weight_map, total_bytes = {}, 0
        for (source, file, entries), out_name in zip(jobs, names):
            stored = source.read(file, sorted({info.key for info in entries.values()}))
            tensors = {}
            for name, info in entries.items():
                tensor = stored[info.key]
                if name in (EMBED, LM_HEAD):
                    tensor = pad_rows(tensor, new_config.text.vocab_size, new_row)
                cast = tensor.to(dtype or tensor.dtype).contiguous()
                problem = nonfinite_problem(cast, tensor)  # what the loader would refuse is not written
                if problem:
                    raise CheckpointError(f"{source.folder / file}: tensor {info.key!r} {problem}")
                tensor = cast
                tensors[to_external(name)] = tensor
                weight_map[to_external(name)] = out_name
                total_bytes += tensor.numel() * tensor.element_size()
            save_file(tensors, partial / out_name, metadata={"format": "pt"})
            del stored, tensors
        if len(jobs) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (partial / "config.json").write_text(json.dumps(new_config.to_llava_hf_dict(), indent=2) + "\n")
        open_checkpoint(partial)  # the result must pass the loader's checks
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.convert_original",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="original LLaVA folder (config.json with mm_* keys, weights)")
    parser.add_argument("clip_dir", type=Path, help="CLIP folder (openai/clip-vit-large-patch14-336)")
    parser.add_argument("out_dir", type=Path, help="output folder (llava-hf layout)")
    parser.add_argument("--dtype", choices=list(OUTPUT_DTYPES), default="keep",
                        help="cast the weights (default: keep the stored dtypes)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error("convert_original", args.debug):
        out = convert_original(args.model_dir, args.clip_dir, args.out_dir, OUTPUT_DTYPES[args.dtype])
    print(f"wrote {out} (llava-hf layout)")


if __name__ == "__main__":
    main()
