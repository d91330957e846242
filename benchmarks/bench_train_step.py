"""One unlearning step, measured: reference vs chunked loss kernels, and textual vs multimodal. Not a test.

This measures the loss kernels and the multimodal cost on one backward through the total (`unlearning_loss`), with
the model's own ops left at their reference implementations. train.py's step (per-term backward, the whole preset)
is what benchmarks/bench_step_vs_peft.py measures, against transformers + peft.

    python benchmarks/bench_train_step.py                   # V=32064, D=256, 256 and 2048 response tokens per term
    python benchmarks/bench_train_step.py --width 512 --response-tokens 1024 2048

The model is a LLaVA of small width with LLaVA-1.5's vocabulary (32064) and image geometry (336 px, patch 14: 576
image tokens per image), 4-bit NF4 decoder linears with LoRA adapters. A step: -eps1 L_harm + eps2 L_helpful +
eps3 L_utility on three batches of two records, then one backward. Response lengths are the benchmark's knob: each term's batch holds `--response-tokens` response tokens.

Memory: each case runs in a FRESH subprocess, which builds the model and its batches, reads its resident set size,
runs one step and reports peak RSS minus that baseline (the step's working set: activations, logits, gradients;
allocator slack included). Time: the median of `--repeats` further steps. The multimodal case feeds each record an
image (frozen tower and projector, forward only) and a prompt holding its 576 image tokens; FLOPs are train.py's
estimate (ref.losses.batch_flops), the same count its summary reports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # run from anywhere


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(width: int, layers: int, vision_width: int, vision_layers: int):
    import torch

    from ref.config import LlavaConfig, TextConfig, VisionConfig
    from ref.lora import LoraConfig, add_lora
    from ref.quant import QuantConfig, quantize_model
    from weights_tools.make_tiny import random_model

    heads = max(1, width // 64)
    text = TextConfig(vocab_size=32064, hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=width // heads,
                      max_position_embeddings=4096)
    vision = VisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                          num_attention_heads=max(1, vision_width // 64), image_size=336, patch_size=14)
    model = random_model(LlavaConfig(vision=vision, text=text), seed=0)
    quantize_model(model, QuantConfig())
    add_lora(model, LoraConfig(r=8, alpha=16.0))
    model.train()
    torch.manual_seed(0)
    return model


def make_batch(model, prompt_tokens: int, response_tokens: int, records: int, with_image: bool, seed: int):
    """`records` rows, each: BOS, [576 image tokens], prompt, response; labels on the response only."""
    import torch

    from ref.data import IGNORE_INDEX
    from ref.losses import Batch

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    per_row = response_tokens // records
    rows, labels = [], []
    for _ in range(records):
        image = [cfg.image_token_index] * cfg.image_seq_length if with_image else []
        prompt = [1] + image + torch.randint(3, 32000, (prompt_tokens,), generator=g).tolist()
        response = torch.randint(3, 32000, (per_row,), generator=g).tolist()
        rows.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
    input_ids = torch.tensor(rows)
    pixel_values = torch.randn(records, 3, 336, 336, generator=g) if with_image else None
    return Batch(input_ids, torch.ones_like(input_ids), torch.tensor(labels), pixel_values)


def run_case(args, preset: str, multimodal: bool) -> dict:
    """One case, in this (fresh) process."""
    import torch

    from ref import kernels as kernel_registry
    from ref.losses import LossWeights, batch_flops, unlearning_loss
    from ref.lora import adapters_disabled

    torch.set_num_threads(args.threads)
    model = build(args.width, args.layers, args.vision_width, args.vision_layers)
    kernels = kernel_registry.resolve(preset)  # the presets differ in the loss ops, which the losses call
    batches = [make_batch(model, args.prompt_tokens, args.response_tokens, 2, multimodal, seed) for seed in range(3)]
    weights = LossWeights()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        for p in trainable:
            p.grad = None
        start = time.perf_counter()
        loss, _ = unlearning_loss(model, *batches, weights, kernels, lambda: adapters_disabled(model))
        loss.backward()
        return time.perf_counter() - start

    baseline = current_rss_bytes()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    times = [step() for _ in range(args.repeats)]
    flops = sum(batch_flops(model, b, True, i == 2) for i, b in enumerate(batches))
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    image_tokens = sum(int((b.input_ids == model.config.image_token_index).sum()) for b in batches)
    return {"preset": preset, "mode": "multimodal" if multimodal else "textual", "response_tokens": args.response_tokens,
            "tokens": tokens, "image_tokens": image_tokens, "gflops": flops / 1e9, "peak_mib": peak / 2**20,
            "seconds": statistics.median(times)}


def llava_7b_flops_table(prompt_tokens: int, response_tokens: int) -> str:
    """train.py's FLOP estimate for one step at LLaVA-1.5-7B's real sizes (no model is built: the count is analytic)."""
    from types import SimpleNamespace

    import torch

    from ref.config import LlavaConfig
    from ref.data import IGNORE_INDEX
    from ref.losses import Batch, batch_flops

    model = SimpleNamespace(config=LlavaConfig())  # the 7B defaults: CLIP ViT-L/14-336, Vicuna-7B
    lines = []
    for with_image in (False, True):
        n_image = model.config.image_seq_length if with_image else 0
        length = 1 + n_image + prompt_tokens + response_tokens
        ids = torch.zeros(2, length, dtype=torch.long)
        ids[:, 1:1 + n_image] = model.config.image_token_index
        labels = torch.full((2, length), IGNORE_INDEX)
        labels[:, -response_tokens:] = 0
        batch = Batch(ids, torch.ones_like(ids), labels, torch.zeros(2, 3, 1, 1) if with_image else None)
        flops = sum(batch_flops(model, batch, True, term == 2) for term in range(3))
        lines.append((("multimodal" if with_image else "textual"), flops))
    (_, text), (_, multi) = lines
    return (f"LLaVA-1.5-7B, 3 terms x 2 records, prompt {prompt_tokens} + response {response_tokens} tokens: "
            f"textual {text / 1e12:.2f} TFLOP, multimodal {multi / 1e12:.2f} TFLOP per step ({multi / text:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256, help="decoder hidden size (LLaVA-7B: 4096)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-width", type=int, default=256, help="vision tower width (CLIP-L: 1024)")
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, nargs="+", default=[256, 2048],
                        help="response tokens per term, over its 2 records")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print its JSON
    args = parser.parse_args()

    if args.case:
        preset, mode, tokens = args.case.split(":")
        args.response_tokens = int(tokens)
        print(json.dumps(run_case(args, preset, mode == "multimodal")))
        return

    cases = [(p, "textual", n) for n in args.response_tokens for p in ("reference", "chunked")]
    cases += [("chunked", "multimodal", n) for n in args.response_tokens]
    base = [a for a in sys.argv[1:]]
    results = []
    for preset, mode, n in cases:
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--case", f"{preset}:{mode}:{n}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  done {preset:9s} {mode:10s} N={n}: {r['seconds']:.2f} s, {r['peak_mib']:.0f} MiB", file=sys.stderr)

    print(f"\none unlearning step (3 terms x 2 records), V=32064, width {args.width}, {args.layers} layers, "
          f"NF4 + LoRA r=8, {args.threads} threads")
    print(f"{'kernels':<10} {'mode':<11} {'resp/term':>9} {'tokens':>7} {'img tok':>8} {'GFLOP':>8} "
          f"{'peak MiB':>9} {'seconds':>8}")
    for r in results:
        print(f"{r['preset']:<10} {r['mode']:<11} {r['response_tokens']:>9} {r['tokens']:>7} {r['image_tokens']:>8} "
              f"{r['gflops']:>8.1f} {r['peak_mib']:>9.0f} {r['seconds']:>8.2f}")
    for n in args.response_tokens:
        ref = next(r for r in results if r["preset"] == "reference" and r["response_tokens"] == n)
        chk = next(r for r in results if r["preset"] == "chunked" and r["mode"] == "textual" and r["response_tokens"] == n)
        mm = next(r for r in results if r["mode"] == "multimodal" and r["response_tokens"] == n)
        print(f"N={n}: chunked/reference peak memory {chk['peak_mib'] / ref['peak_mib']:.2f}x, "
              f"time {chk['seconds'] / ref['seconds']:.2f}x; multimodal/textual FLOPs "
              f"{mm['gflops'] / chk['gflops']:.2f}x, time {mm['seconds'] / chk['seconds']:.2f}x")
    print()
    for prompt, response in ((32, 64), (32, 128), (64, 256)):  # PKU-SafeRLHF-like lengths
        print(llava_7b_flops_table(prompt, response))


if __name__ == "__main__":
    main()
