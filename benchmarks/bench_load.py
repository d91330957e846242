"""Benchmark: load time and peak memory of the streaming 4-bit load, against a dense load and transformers.

    python benchmarks/bench_load.py [--layers 3] [--dir DIR] [--keep] [--skip-transformers]

Writes a synthetic llava-hf checkpoint in float16 (decoder layers at LLaMA-7B width: hidden 4096, MLP 11008, 32 heads,
vocabulary 32064; a small vision tower), by default 3 decoder layers, about 1.8 GB, into a temporary folder (streamed
to disk one tensor at a time, so writing it costs little memory). Then each of these runs in a fresh subprocess that
reports its own peak resident memory (VmHWM from /proc/self/status) and its RSS right before loading (Python, torch and
imports):

    ours-4bit     ref.weights.load_model(folder, quantize="nf4", dtype=float16): decoder linears NF4, rest float16
    ours-dense    ref.weights.load_model(folder, dtype=float16)
    transformers  LlavaForConditionalGeneration.from_pretrained(folder, dtype=float16)

The goal for ours-4bit: peak RSS under 1.3 x (final 4-bit model size + largest single tensor), and below the others.
This is a benchmark, not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

from ref.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402

MiB = 2**20


def bench_config(layers: int) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=14),
        text=TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=32, head_dim=128))


def write_checkpoint(folder: Path, config: LlavaConfig, seed: int = 0) -> dict:
    """config.json + model.safetensors (llava-hf layout, float16), written tensor by tensor."""
    from ref import weights  # the key layout and the model's parameter shapes

    shapes = weights.expected_shapes(config)
    to_external = weights.LAYOUTS["llava-hf"].to_external
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2  # float16
        header[to_external(name)] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / weights.SINGLE_FILE, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():  # the same order as the offsets above
            tensor = torch.randn(shape, generator=generator).mul_(0.02).to(torch.float16)
            if "norm" in name and name.endswith("weight"):
                tensor.fill_(1.0)
            f.write(tensor.numpy().tobytes())
            del tensor
    (folder / "config.json").write_text(json.dumps(config.to_llava_hf_dict(), indent=2) + "\n")
    largest = max(math.prod(s) for s in shapes.values()) * 2
    return {"file_bytes": offset + len(raw) + 8, "largest_tensor_bytes": largest}


def proc_status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_child(kind: str, folder: Path) -> dict:
    """In a fresh process: load `folder` the way `kind` says; report time and memory as JSON on stdout."""
    if kind == "transformers":
        import transformers
    from ref import quant, weights

    baseline = proc_status("VmRSS")
    start = time.perf_counter()
    if kind == "ours-4bit":
        model = weights.load_model(folder, quantize="nf4", dtype=torch.float16)
    elif kind == "ours-dense":
        model = weights.load_model(folder, dtype=torch.float16)
    elif kind == "transformers":
        model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float16)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    seconds = time.perf_counter() - start
    peak_load = proc_status("VmHWM")
    # A load may leave its tensors memory-mapped and unread (zero-copy safetensors): they cost resident memory only
    # once used. Read one byte of every 4 KiB page of every tensor, so all three rows report a model ready to run.
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    return {"kind": kind, "seconds": seconds, "peak_rss": peak_load, "peak_rss_touched": proc_status("VmHWM"),
            "rss_before_load": baseline, "model_bytes": quant.model_nbytes(model)}


def measure(kind: str, folder: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(folder)],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        return {"kind": kind, "error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(rows: list[dict], info: dict) -> None:
    print(f"checkpoint: {info['file_bytes'] / MiB:.0f} MiB float16, largest tensor "
          f"{info['largest_tensor_bytes'] / MiB:.0f} MiB ({info['layers']} decoder layers at 7B width)")
    print("MiB; 'peak load' = VmHWM at the end of the load; 'peak used' = VmHWM after reading every page of every "
          "tensor; 'before' = RSS after imports")
    print(f"{'load':<14}{'time s':>8}{'peak load':>11}{'peak used':>11}{'before':>8}{'used - before':>15}"
          f"{'model':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['kind']:<14} failed: {row['error']}")
            continue
        print(f"{row['kind']:<14}{row['seconds']:>8.1f}{row['peak_rss'] / MiB:>11.0f}"
              f"{row['peak_rss_touched'] / MiB:>11.0f}{row['rss_before_load'] / MiB:>8.0f}"
              f"{(row['peak_rss_touched'] - row['rss_before_load']) / MiB:>15.0f}{row['model_bytes'] / MiB:>8.0f}")
    ours = next((r for r in rows if r["kind"] == "ours-4bit" and "error" not in r), None)
    if ours:
        budget = 1.3 * (ours["model_bytes"] + info["largest_tensor_bytes"])
        print(f"goal for ours-4bit: peak under 1.3 x (4-bit model {ours['model_bytes'] / MiB:.0f} MiB + largest "
              f"tensor {info['largest_tensor_bytes'] / MiB:.0f} MiB) = {budget / MiB:.0f} MiB: "
              f"peak {ours['peak_rss_touched'] / MiB:.0f} MiB counting the interpreter "
              f"({'met' if ours['peak_rss_touched'] < budget else 'NOT met'}), "
              f"{(ours['peak_rss_touched'] - ours['rss_before_load']) / MiB:.0f} MiB above it "
              f"({'met' if ours['peak_rss_touched'] - ours['rss_before_load'] < budget else 'NOT met'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_load.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3, help="decoder layers at 7B width (about 405 MB each)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    parser.add_argument("--skip-transformers", action="store_true", help="do not run the transformers load")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.dir)))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        start = time.perf_counter()
        info = write_checkpoint(folder, bench_config(args.layers))
        info["layers"] = args.layers
        print(f"wrote {folder} in {time.perf_counter() - start:.0f}s")
        kinds = ["ours-4bit", "ours-dense"] + ([] if args.skip_transformers else ["transformers"])
        report([measure(kind, folder) for kind in kinds], info)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
