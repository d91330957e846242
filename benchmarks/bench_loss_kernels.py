"""Benchmark the loss ops: reference vs chunked, peak memory and forward+backward time. Not a test; prints a table.

    python benchmarks/bench_loss_kernels.py                       # V=32064, D=512, N in {512, 2048}
    python benchmarks/bench_loss_kernels.py --dims 512 4096 --weight-grad

How memory is measured: torch's CPU allocations are invisible to tracemalloc, and the torch profiler's memory view
attributes allocations per op rather than giving one peak. So every case runs in a FRESH subprocess, which
1. builds its inputs (hidden, ref_hidden, lm_head weight) and reads its current resident set size (RSS, /proc),
2. runs one forward + backward and reads the process's peak RSS (resource.getrusage ru_maxrss),
and reports peak - baseline: the extra resident memory the step needed on top of its inputs (logits, softmax,
gradients, the weight gradient when the weight trains). It is what the OS had to give the process, allocator slack
included, so it is an honest upper bound on the working set; the import of torch and the inputs are excluded because
both implementations share them. Timing: the median of --repeats further forward+backward runs in the same process
(the first run above doubles as warm-up).
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from anywhere


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(op: str, impl: str, n: int, d: int, vocab: int, weight_grad: bool, dtype: str, repeats: int,
             chunk_size: int | None) -> dict:
    """One case, in this (fresh) process."""
    import torch

    from ref.kernels import IMPLEMENTATIONS

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, d).to(dt).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(n, d)).to(dt)
    weight = (torch.randn(vocab, d) / d**0.5).to(dt).requires_grad_(weight_grad)
    targets = torch.randint(0, vocab, (n,))
    fn = IMPLEMENTATIONS["linear_cross_entropy" if op == "ce" else "linear_kl"][impl]
    kwargs = {"chunk_size": chunk_size} if (impl != "reference" and chunk_size) else {}

    def step() -> float:
        hidden.grad, weight.grad = None, None
        start = time.perf_counter()
        loss = fn(hidden, weight, targets, **kwargs) if op == "ce" else fn(hidden, ref_hidden, weight, **kwargs)
        loss.backward()
        elapsed = time.perf_counter() - start
        hidden.grad, weight.grad = None, None  # the grads are outputs, not part of the working set we compare
        return elapsed

    baseline = current_rss_bytes()
    step()
    peak_extra = peak_rss_bytes() - baseline
    times = [step() for _ in range(repeats)]
    return {"op": op, "impl": impl, "n": n, "d": d, "peak_mib": peak_extra / 2**20,
            "time_ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32064, help="LLaVA-1.5's vocabulary (32000 + image + pad, padded)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512], help="hidden widths D (LLaVA-7B: 4096)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="response tokens N per step")
    parser.add_argument("--ops", nargs="+", default=["ce", "kl"], choices=["ce", "kl"])
    parser.add_argument("--impls", nargs="+", default=["reference", "chunked"])
    parser.add_argument("--weight-grad", action="store_true", help="train the lm_head weight too (default: frozen, "
                        "as in QLoRA unlearning, where the lm_head is not adapted)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the op's own)")
    parser.add_argument("--mmap-threshold", type=int, default=None, help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) "
                        "in the cases: with glibc's default dynamic threshold, freed (chunk, V) blocks can stay in the "
                        "heap and the chunked peak grows with the chunk count; 65536 returns them to the OS")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: JSON case description, run in this process
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_case(**json.loads(args.child))))
        return

    import torch

    env = dict(os.environ)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, V={args.vocab}, dtype={args.dtype}, "
          f"lm_head weight {'trained' if args.weight_grad else 'frozen'}, chunk rows "
          f"{args.chunk_size or 'default'}, malloc mmap threshold {args.mmap_threshold or 'glibc default'}; peak = extra RSS of one fwd+bwd over its inputs (fresh process per case)")
    header = f"{'op':<4} {'N':>5} {'D':>5} " + " ".join(f"{impl + ' MiB':>14} {impl + ' ms':>13}" for impl in args.impls)
    header += f" {'mem ratio':>10} {'time ratio':>11}"
    print(header)
    print("-" * len(header))
    for op in args.ops:
        for d in args.dims:
            for n in args.tokens:
                results = {}
                for impl in args.impls:
                    case = dict(op=op, impl=impl, n=n, d=d, vocab=args.vocab, weight_grad=args.weight_grad,
                                dtype=args.dtype, repeats=args.repeats, chunk_size=args.chunk_size)
                    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)],
                                         capture_output=True, text=True, check=True, env=env)
                    results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
                row = f"{op:<4} {n:>5} {d:>5} " + " ".join(
                    f"{results[i]['peak_mib']:>14.1f} {results[i]['time_ms']:>13.1f}" for i in args.impls)
                if "reference" in results and len(args.impls) > 1:  # reference / last implementation
                    ref, new = results["reference"], results[args.impls[-1]]
                    row += f" {ref['peak_mib'] / max(new['peak_mib'], 0.1):>9.1f}x"
                    row += f" {new['time_ms'] / ref['time_ms']:>10.2f}x"
                print(row, flush=True)
    print("mem ratio = reference peak / chunked peak (higher is better); time ratio = chunked / reference time")


if __name__ == "__main__":
    main()
