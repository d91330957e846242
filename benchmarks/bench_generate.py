"""Benchmark: greedy generation speed and memory, ours (`Llava.generate`) against transformers'
`LlavaForConditionalGeneration.generate`, on the same checkpoint and the same prompts. Not a test.

    python benchmarks/bench_generate.py                           # hidden 512, 4 layers, vocab 32064; batch 1 and 16
    python benchmarks/bench_generate.py --batch 1 4 16 --new-tokens 32 --image --threads 1

The checkpoint is written by `weights_tools.make_tiny.write_tiny_checkpoint` into a temporary folder: a LLaVA of width
`--hidden` (MLP 2.6875 x, heads of 64), `--layers` decoder layers, the tiny default vision tower, float32, and a
tokenizer padded with synthetic words up to `--vocab` entries (LLaVA-1.5's 32064 by default, so the embedding and the
LM head cost what they cost in the real model). The prompts are chat-format text questions of different lengths
(`--image`: one `<image>` each, with a random image), tokenized by `ref.data.load_processor` once in the parent and
left-padded; both sides read the same ids from a file.

Each (side, batch) runs in a FRESH subprocess with `torch.set_num_threads(--threads)`: load the checkpoint (ours:
`ref.weights.load_model` with the `fast` kernels, eval.py's default on a real model; transformers:
`from_pretrained(folder, dtype=float32)`; with --quantize nf4 both put the decoder's linears in NF4 with double
quantization through bitsandbytes), one warm-up generation, then
`--repeats` timed generations (the median is reported). Greedy, KV cache, EOS disabled on both sides so every row
generates exactly `--new-tokens` tokens; transformers is told to suppress the image token, as ours never emits it.
tok/s = batch x new tokens / wall seconds of one generate() call. Peak MiB = the subprocess's VmHWM after the timed
runs (interpreter, imports, model and generation). "same ids" = the fraction of rows whose new tokens are identical on
both sides (greedy: they should be, up to float ties between near-equal logits).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

MiB = 2**20
QUESTIONS = [
    "What is the capital of France?",
    "How do I make a cup of tea?",
    "Describe the image in one sentence.",
    "Write a short poem about the sea and the wind that blows over it at night.",
    "What is two plus two?",
    "Give me three tips for a good night of sleep, and say why each one helps.",
    "How can I help a friend who is sad?",
    "What is this?",
    "Explain how a bicycle works to a child who has never seen one before, in simple words.",
    "Name a fruit.",
    "How do plants make food from light?",
    "Tell me a story about a cat, a dog and a small red boat on a long river.",
    "Why is the sky blue?",
    "What do you do with flour, eggs and milk?",
    "Summarize the history of the printing press in a few lines, with the main dates.",
    "Hi.",
]


def vm_hwm() -> int:
    """Peak resident set size of this process (VmHWM from /proc/self/status), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmHWM")


def write_checkpoint(folder: Path, hidden: int, layers: int, vocab: int, intermediate: int | None = None) -> int:
    """The benchmark's checkpoint in `folder`; returns its vocabulary size (the config's, a multiple of 64).
    intermediate: the MLP width (default int(2.6875 x hidden), LLaVA-7B's ratio)."""
    from weights_tools.make_tiny import build_tokenizer, write_tiny_checkpoint

    # Each synthetic word " w<i>" adds about one token (its shorter prefixes are words too); the config's vocabulary
    # is the tokenizer's size rounded up to a multiple of 64, so aim just under `vocab`.
    n_words, extra = 0, ()
    for _ in range(4):
        size = build_tokenizer(extra).get_vocab_size(with_added_tokens=True)
        if vocab - 64 < size <= vocab or size > vocab:
            break
        n_words += vocab - 8 - size
        extra = tuple(f"\u0120w{i}" for i in range(n_words))
    heads = max(1, hidden // 64)
    write_tiny_checkpoint(folder, seed=0, extra_words=extra, text_hidden_size=hidden,
                          text_intermediate_size=intermediate or int(hidden * 2.6875), text_layers=layers,
                          text_heads=heads,
                          text_kv_heads=heads, max_position_embeddings=4096)  # LLaVA-1.5's context
    return json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]


def write_inputs(folder: Path, batch: int, with_image: bool, path: Path) -> None:
    """Left-padded ids, mask (and images) of the first `batch` prompts, saved to `path` for both sides."""
    from ref.data import build_prompt, load_processor

    processor = load_processor(folder)
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    ids = [processor.tokenize_prompt(build_prompt(p, num_images=int(with_image))) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.full((batch, width), processor.tokenizer.pad_id, dtype=torch.long)  # (B, T), left padded
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt_ids in enumerate(ids):
        input_ids[row, width - len(prompt_ids):] = torch.tensor(prompt_ids)
        mask[row, width - len(prompt_ids):] = 1
    inputs = {"input_ids": input_ids, "attention_mask": mask, "pad": processor.tokenizer.pad_id}
    if with_image:
        size = processor.image_size
        generator = torch.Generator().manual_seed(1)
        inputs["pixel_values"] = torch.randn((batch, 3, size, size), generator=generator)  # (B, 3, S, S)
    torch.save(inputs, path)


def run_child(side: str, folder: Path, inputs_path: Path, new_tokens: int, repeats: int, threads: int,
              out_path: Path, quantize: str = "none") -> dict:
    """In a fresh process: load, warm up, time `repeats` greedy generations; save the ids; return the numbers."""
    torch.set_num_threads(threads)
    inputs = torch.load(inputs_path)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values")
    if side == "ours":
        from ref.kernels import resolve
        from ref.weights import load_model

        model = load_model(folder, dtype=torch.float32, kernels=resolve("fast"),  # eval.py's default on a real model
                           quantize=None if quantize == "none" else quantize)

        def generate() -> torch.Tensor:
            return model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                                  eos_token_id=-1, pad_token_id=inputs["pad"]).sequences
        info = {}
    elif side == "transformers":
        import transformers

        quant = {}
        if quantize != "none":  # the decoder's linears in 4 bits, as ours (transformers also quantizes the tower's)
            quant["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32)
        model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                           **quant).eval()
        image_token = model.config.image_token_index

        def generate() -> torch.Tensor:
            images = {} if pixels is None else {"pixel_values": pixels}  # an explicit None fails in transformers 5
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=inputs["pad"], suppress_tokens=[image_token],
                                 use_cache=True, **images)
            return out[:, ids.shape[1]:]
        info = {"attn": model.config._attn_implementation, "version": transformers.__version__}
    else:
        raise ValueError(f"unknown side {side!r}")
    with torch.inference_mode():
        generate()  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            sequences = generate()
            seconds.append(time.perf_counter() - start)
    torch.save(sequences, out_path)
    wall = statistics.median(seconds)
    return {"side": side, "seconds": wall, "tokens": sequences.numel(), "tok_s": sequences.numel() / wall,
            "new_per_row": sequences.shape[1], "peak_rss": vm_hwm(), **info}


def measure(side: str, folder: Path, inputs_path: Path, args, out_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--dir", str(folder), "--inputs", str(inputs_path),
           "--out", str(out_path), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--quantize", args.quantize]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"side": side, "error": lines[-1] if lines else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def same_fraction(a: Path, b: Path) -> str:
    if not (a.exists() and b.exists()):
        return "-"
    x, y = torch.load(a), torch.load(b)
    if x.shape != y.shape:
        return f"shapes differ {tuple(x.shape)} vs {tuple(y.shape)}"
    same = (x == y).all(dim=1)
    return f"{int(same.sum())}/{len(same)} ({same.float().mean().item():.0%})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per row (default 64)")
    parser.add_argument("--hidden", type=int, default=512, help="decoder width (default 512)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--vocab", type=int, default=32064, help="vocabulary size (default 32064, LLaVA-1.5's)")
    parser.add_argument("--image", action="store_true", help="also run every batch with one image per prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations after the warm-up (median)")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4"],
                        help="decoder linears on both sides: dense float32 (default) or NF4 with double quantization")
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint folder (default: a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder afterwards")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(run_child(args.side, args.dir, args.inputs, args.new_tokens, args.repeats, args.threads,
                                   args.out, args.quantize)))
        return
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    folder = args.dir or work / "model"
    try:
        start = time.perf_counter()
        if not (folder / "config.json").exists():
            # bitsandbytes' CPU 4-bit inference (transformers' side) repacks weights in blocks of 64 input features
            # and fails on an MLP of 1376 = 2.6875 x 512: round the MLP up to a multiple of 64 under --quantize
            mlp = int(args.hidden * 2.6875)
            vocab = write_checkpoint(folder, args.hidden, args.layers, args.vocab,
                                     mlp if args.quantize == "none" else -(-mlp // 64) * 64)
        else:
            vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
        print(f"checkpoint {folder}: hidden {args.hidden}, {args.layers} layers, vocab {vocab}, float32, decoder "
              f"linears {'dense' if args.quantize == 'none' else args.quantize} "
              f"({time.perf_counter() - start:.0f}s); {args.new_tokens} new tokens per row, greedy, EOS off, "
              f"{args.threads} thread(s), 1 warm-up + median of {args.repeats}")
        rows, shown = [], set()
        for with_image in [False, True] if args.image else [False]:
            for batch in args.batch:
                name = f"{batch}{' +image' if with_image else ''}"
                inputs_path = work / f"inputs_{batch}_{int(with_image)}.pt"
                write_inputs(folder, batch, with_image, inputs_path)
                outs = {side: work / f"ids_{side}_{batch}_{int(with_image)}.pt" for side in ("ours", "transformers")}
                results = {side: measure(side, folder, inputs_path, args, outs[side]) for side in outs}
                for side, result in results.items():
                    if "error" in result:
                        print(f"batch {name} {side} failed: {result['error']}")
                    elif "attn" in result and not shown:
                        shown.add(result["attn"])
                        print(f"transformers {result['version']}, attention {result['attn']}")
                rows.append((name, results, same_fraction(outs["ours"], outs["transformers"]),
                             int(inputs_path.exists() and torch.load(inputs_path)["input_ids"].shape[1])))
        print()
        print("| batch | prompt width | ours tok/s | transformers tok/s | ratio | same ids | ours peak MiB "
              "| transformers peak MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, results, same, width in rows:
            ours, hf = results["ours"], results["transformers"]

            def cell(r: dict, key: str, scale: float = 1.0, fmt: str = ".1f") -> str:
                return "failed" if "error" in r else format(r[key] / scale, fmt)
            ratio = "-" if "error" in ours or "error" in hf else f"{ours['tok_s'] / hf['tok_s']:.2f}x"
            print(f"| {name} | {width} | {cell(ours, 'tok_s')} | {cell(hf, 'tok_s')} | {ratio} | {same} "
                  f"| {cell(ours, 'peak_rss', MiB, '.0f')} | {cell(hf, 'peak_rss', MiB, '.0f')} |")
        print("\nratio = ours tok/s / transformers tok/s (above 1: ours is faster); peak = subprocess VmHWM")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
