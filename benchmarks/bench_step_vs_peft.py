"""Benchmark: one textual-unlearning step, ours against transformers + peft + bitsandbytes on the same checkpoint.
Not a test.

    python benchmarks/bench_step_vs_peft.py                    # hidden 512, 4 layers: 512 and 2048 response tokens
    python benchmarks/bench_step_vs_peft.py --hidden 4096 --layers 2 --response-tokens 256     # 7B width
    python benchmarks/bench_step_vs_peft.py --sides transformers fast --repeats 1

The step is the method's: L = -0.5 L_harm + 1.0 L_helpful + 1.0 KL(p_orig || p_cur) on three batches (harmful,
helpful, normal) of 2 records each, every record a BOS, `--prompt-tokens` prompt tokens and `--response-tokens`
response tokens (labels on the response only), then backward. The base: every decoder linear in NF4 with double
quantization (bitsandbytes, blocksize 64), float32 compute (--dtype bfloat16: bfloat16 weights and compute); LoRA r=8, alpha 16, no dropout, on q, k, v, o, gate, up,
down of every decoder layer; the KL's original is the same model with its adapters off, under no_grad.

The checkpoint is `weights_tools.make_tiny`'s llava-hf folder (transformers reads it with `from_pretrained`) with
LLaVA-1.5's vocabulary of 32064 and a decoder of `--hidden` (MLP 2.6875x, heads of 64) and `--layers` layers.

Sides, each in a FRESH process that loads the folder, builds the batches, runs one warm-up step, then `--repeats`
timed steps (median reported):
- `transformers`: what a user of transformers + peft writes: `LlavaForConditionalGeneration.from_pretrained` with a
  `BitsAndBytesConfig` (nf4, double quant, float32 compute), `peft.get_peft_model`, the two NLLs from the model's own
  `labels=` loss, the KL from the logits at response positions with `model.disable_adapter()` for the original, one
  `backward()` on the sum. transformers' default attention (sdpa), no gradient checkpointing (nor on our side).
- ours, one per kernel preset (`reference`, `chunked`, `fast`, ...): `ref.weights.load_model(quantize="nf4")`,
  `ref.lora.add_lora`, and the step train.py takes (`ref.losses.unlearning_backward`).

Memory: peak resident set of the step minus the resident set just before it, on both sides the same way: after the
warm-up, glibc's free pages go back to the system (malloc_trim) and the peak is reset (/proc/self/clear_refs), then
one step runs and VmHWM is read. That is the step's working set: activations, logits, gradients, temporaries and
allocator slack within the step. Weights, the interpreter and imports are in the baseline, not in the figure.

Achieved FLOP/s: the step's FLOPs divided by each side's median time, the same count for both sides: the project's
(`ref.losses.batch_flops`, train.py's): 2 FLOPs per multiply-add of the decoder's weight matmuls at every token, the
lm_head's at response tokens only; forward + backward for each term, one more forward for the KL's original. What a
side does beyond it is not counted (attention scores, LoRA's own products, transformers' logits at prompt
positions), so the figure is the useful work per second. Beside it, measured once per run in the parent process
before the sides start, with the same thread count: the machine's matmul peak in float32 and bfloat16, the best of
`--peak-repeats` timings of one square torch.mm of `--peak-size` (default 4096), and each side's share of the peak
of the run's dtype.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

from benchmarks.bench_generate import write_checkpoint  # noqa: E402

MiB = 2**20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EPS = (0.5, 1.0, 1.0)  # harm, helpful, utility: Yao et al.'s weights, train.py's default on a real model
OUR_PRESETS = ("reference", "chunked", "fast")


def status_bytes(key: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def trim_and_reset_peak_rss() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), then make VmHWM start again from the
    current resident set (Linux >= 4.0: write 5 to clear_refs). Without the trim, the pages the warm-up step freed
    stay resident and hide the measured step's own growth."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def make_batches(vocab: int, prompt_tokens: int, response_tokens: int, seed: int = 0):
    """Three (input_ids, labels) pairs, (2, T) each: BOS, prompt, response; labels -100 outside the response."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        prompt = torch.randint(3, vocab - 64, (2, prompt_tokens), generator=g)
        response = torch.randint(3, vocab - 64, (2, response_tokens), generator=g)
        ids = torch.cat([torch.ones(2, 1, dtype=torch.long), prompt, response], dim=1)  # (2, T), BOS = 1
        labels = torch.cat([torch.full((2, 1 + prompt_tokens), -100), response], dim=1)  # (2, T)
        batches.append((ids, labels))
    return batches


def step_flops(folder: Path, batches) -> float:
    """The step's FLOPs by ref.losses.batch_flops: the harmful and helpful terms forward and backward, the normal
    term forward and backward plus the original model's forward for the KL."""
    from types import SimpleNamespace

    from ref.config import load_config
    from ref.losses import Batch, batch_flops

    model = SimpleNamespace(config=load_config(folder))  # batch_flops reads only the sizes in the config
    terms = [Batch(ids, torch.ones_like(ids), labels) for ids, labels in batches]
    return sum(batch_flops(model, batch, backward=True, reference_pass=(term == 2)) for term, batch in enumerate(terms))


def matmul_peak(dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of one (size x size) @ (size x size) torch.mm in `dtype`: the best of `repeats` timings after a warm-up."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up: the first call pays for allocation and the library's setup
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def transformers_step(folder: Path, batches, dtype: torch.dtype) -> callable:
    """The step as a user of transformers + peft writes it."""
    import peft
    import transformers

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, quantization_config=quant, dtype=dtype)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules=rf".*language_model.*\.({'|'.join(TARGETS)})")
    model = peft.get_peft_model(model, config)
    model.train()
    (harm_ids, harm_labels), (help_ids, help_labels), (normal_ids, normal_labels) = batches

    def step() -> None:
        harm = model(input_ids=harm_ids, attention_mask=torch.ones_like(harm_ids), labels=harm_labels).loss
        helpful = model(input_ids=help_ids, attention_mask=torch.ones_like(help_ids), labels=help_labels).loss
        mask = torch.ones_like(normal_ids)
        at_response = normal_labels[:, 1:] != -100  # positions whose next token is a response token
        with torch.no_grad(), model.disable_adapter():
            original = model(input_ids=normal_ids, attention_mask=mask).logits[:, :-1][at_response]
        current = model(input_ids=normal_ids, attention_mask=mask).logits[:, :-1][at_response]
        kl = F.kl_div(current.float().log_softmax(-1), original.float().log_softmax(-1), log_target=True,
                      reduction="batchmean")
        loss = -EPS[0] * harm + EPS[1] * helpful + EPS[2] * kl
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def our_step(folder: Path, batches, preset: str, dtype: torch.dtype) -> callable:
    """The step as train.py takes it, with kernel preset `preset`."""
    from ref.kernels import resolve
    from ref.lora import LoraConfig, adapters_disabled, add_lora
    from ref.losses import Batch, LossWeights, unlearning_backward
    from ref.weights import load_model

    kernels = resolve(preset)
    model = load_model(folder, dtype=dtype, kernels=kernels, quantize="nf4")
    add_lora(model, LoraConfig(r=8, alpha=16.0, dropout=0.0, targets=TARGETS))
    model.train()
    ours = [Batch(ids, torch.ones_like(ids), labels) for ids, labels in batches]
    weights = LossWeights(*EPS)

    def step() -> None:
        unlearning_backward(model, *ours, weights, kernels, lambda: adapters_disabled(model))
        model.zero_grad(set_to_none=True)
    return step


def peak_saved_bytes(step) -> int:
    """The most bytes autograd holds for backward at any moment of one step: storages are counted when saved and
    released when backward unpacks them (the step's activations, without temporaries or allocator slack)."""
    alive, peak = {}, 0

    def pack(tensor):
        nonlocal peak
        key = tensor.untyped_storage()._cdata
        alive[key] = tensor.untyped_storage().nbytes()
        peak = max(peak, sum(alive.values()))
        return key, tensor

    def unpack(packed):
        key, tensor = packed
        alive.pop(key, None)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        step()
    return peak


def run_side(side: str, args) -> dict:
    """In this (fresh) process: build, warm up, measure one step's memory, time `repeats` steps."""
    torch.set_num_threads(args.threads)
    vocab = json.loads((Path(args.dir) / "config.json").read_text())["text_config"]["vocab_size"]
    batches = make_batches(vocab, args.prompt_tokens, args.response_tokens)
    dtype = getattr(torch, args.dtype)
    if side == "transformers":
        step = transformers_step(Path(args.dir), batches, dtype)
    else:
        step = our_step(Path(args.dir), batches, side, dtype)
    step()  # warm-up: first-call allocations, lazy initialisation
    trim_and_reset_peak_rss()
    before = status_bytes("VmRSS")
    step()
    peak = status_bytes("VmHWM") - before
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    result = {"side": side, "seconds": statistics.median(seconds), "peak_mib": peak / MiB}
    if args.account:
        result["saved_mib"] = peak_saved_bytes(step) / MiB
    return result


def measure(side: str, folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--dir", str(folder), "--prompt-tokens", str(args.prompt_tokens),
           "--response-tokens", str(args.response_tokens), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--dtype", args.dtype, *(["--account"] if args.account else [])]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"side": side, "error": lines[-1] if lines else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_step_vs_peft.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512, help="decoder width (LLaVA-1.5-7B: 4096)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, nargs="+", default=[512, 2048], help="per record")
    parser.add_argument("--sides", nargs="+", default=["transformers", *OUR_PRESETS])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype on both sides (weights, NF4 compute, adapters stay float32)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--account", action="store_true",
                        help="also count the activations autograd keeps at the step's peak (saved-tensor hooks)")
    parser.add_argument("--peak-size", type=int, default=4096, help="matrix size of the matmul peak's torch.mm")
    parser.add_argument("--peak-repeats", type=int, default=3)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        args.response_tokens = args.response_tokens[0]
        print(json.dumps(run_side(args.side, args)))
        return

    torch.set_num_threads(args.threads)
    peaks = {name: matmul_peak(getattr(torch, name), args.peak_size, args.peak_repeats)
             for name in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        folder = Path(tmp)
        vocab = write_checkpoint(folder, args.hidden, args.layers, args.vocab)  # the config's
        rows = []
        for n in args.response_tokens:
            one = argparse.Namespace(**{**vars(args), "response_tokens": n})
            flops = step_flops(folder, make_batches(vocab, args.prompt_tokens, n))
            results = {}
            for side in args.sides:
                results[side] = with_rate(measure(side, folder, one), flops, peaks[args.dtype])
                print(f"  {side:12s} {n:5d} tokens: {cell(results[side])}", file=sys.stderr)
            rows.append((n, flops, results))
    print(f"\none unlearning step, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch 2 per term, "
          f"prompt {args.prompt_tokens}, NF4 + LoRA r=8, {args.dtype}, {args.threads} threads; peak = the step's "
          f"resident-set growth; GFLOP/s = the step's FLOPs (ref.losses.batch_flops) / its time, and its share of "
          f"the {args.dtype} matmul (mm) peak\n")
    print("versions (the other side's speed moves with them): " + package_versions() + "\n")
    print(f"matmul peak, one ({args.peak_size} x {args.peak_size}) torch.mm, best of {args.peak_repeats}, "
          f"{args.threads} threads: " + ", ".join(f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in peaks.items())
          + "\n")
    print("| response tokens | step GFLOP | " + " | ".join(args.sides) + " |")
    print("|---" * (len(args.sides) + 2) + "|")
    for n, flops, results in rows:
        print(f"| {n} | {flops / 1e9:.1f} | " + " | ".join(cell(results[s]) for s in args.sides) + " |")
    if "transformers" in args.sides:
        print("\nratios to transformers + peft (time, memory):")
        for n, _, results in rows:
            anchor = results["transformers"]
            parts = [f"{s} {r['seconds'] / anchor['seconds']:.2f}x, {r['peak_mib'] / anchor['peak_mib']:.2f}x"
                     for s, r in results.items() if s != "transformers" and "error" not in r and "error" not in anchor]
            print(f"  {n} tokens: " + "; ".join(parts))


def package_versions() -> str:
    """The installed versions of the libraries either side runs on, read from the package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "kernels"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def with_rate(result: dict, flops: float, peak: float) -> dict:
    """A side's result with its achieved FLOP/s and that rate's share of the matmul peak."""
    if "error" in result:
        return result
    rate = flops / result["seconds"]
    return {**result, "gflop_per_s": rate / 1e9, "of_peak": rate / peak}


def cell(r: dict) -> str:
    if "error" in r:
        return r["error"]
    saved = f" ({r['saved_mib']:.0f} saved)" if "saved_mib" in r else ""
    return (f"{r['seconds']:.2f} s, {r['peak_mib']:.0f} MiB{saved}, {r['gflop_per_s']:.1f} GFLOP/s "
            f"({100 * r['of_peak']:.0f}% of mm peak)")


if __name__ == "__main__":
    main()
