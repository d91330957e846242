"""GPU checks: confirm or refute, on a machine with a CUDA GPU, what a review of the code predicted for it. Not a test.

    python benchmarks/gpu_check.py > gpu_check.jsonl              # every check, under 10 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick            # the same code on a CPU (CUDA-only checks skip)

One JSON line per check: {"check", "claim", "result": "confirmed" | "refuted" | "skipped", "details", "seconds"}.
"confirmed" means the code does what the claim says it does now (after the fixes), "refuted" that it does not.
Models: the embedded toy (train.py's loop), a `make_tiny` LLaVA, and (without --quick) a synthetic checkpoint at
LLaVA-1.5-7B's decoder width (hidden 4096, MLP 11008, 32 heads, vocab 32064) with --layers layers, NF4 + LoRA r=8,
bfloat16, in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

import train  # noqa: E402
from benchmarks.bench_generate import write_checkpoint  # noqa: E402
from benchmarks.bench_step_vs_peft import make_batches  # noqa: E402
from benchmarks.host_syncs import HostSyncCounter  # noqa: E402
from harness.devices import default_dtype, default_train_dtype  # noqa: E402
from harness.signals import StopRequest  # noqa: E402
from ref.kernels import resolve  # noqa: E402
from ref.lora import LoraConfig, adapters_disabled, add_lora  # noqa: E402
from ref.losses import Batch, LossWeights, kl_to_original, unlearning_backward, unlearning_loss  # noqa: E402
from ref.weights import load_model  # noqa: E402

MiB = 2**20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def report(name: str, claim: str, check) -> dict:
    """Run one check; a crash is reported as the check's result, not the script's end."""
    start = time.perf_counter()
    try:
        result, details = check()
    except Exception as err:  # noqa: BLE001 (every failure is a finding)
        result, details = "refuted", {"error": f"{type(err).__name__}: {err}"}
    line = {"check": name, "claim": claim, "result": result, "details": details,
            "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(line), flush=True)
    return line


def verdict(ok: bool) -> str:
    return "confirmed" if ok else "refuted"


def needs_cuda(device: torch.device) -> tuple[str, dict] | None:
    return None if device.type == "cuda" else ("skipped", {"reason": "needs a CUDA device"})


def peak_mib(device: torch.device, run) -> float:
    """Peak memory allocated while run() runs, above what was allocated before (CUDA); 0 on a CPU."""
    if device.type != "cuda":
        run()
        return 0.0
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MiB


class World:
    """The models the checks share, built once."""

    def __init__(self, device: torch.device, folder: Path, quick: bool, layers: int):
        self.device, self.folder, self.quick, self.layers = device, folder, quick, layers
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self._wide = None

    def model(self, preset: str, wide: bool = False, overrides: dict | None = None,
              dtype: torch.dtype | None = None):
        """NF4 + LoRA r=8 (random B) on the tiny or the 7B-width checkpoint, under kernel preset `preset`."""
        path = self.wide_path() if wide else self.tiny_path()
        model = load_model(path, dtype=dtype or self.dtype, device=self.device, kernels=resolve(preset, overrides),
                           quantize="nf4")
        torch.manual_seed(0)
        add_lora(model, LoraConfig(r=8, alpha=16.0, targets=TARGETS))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B.weight"):
                    p.normal_(0, 0.01)
        return model.train()

    def tiny_path(self) -> Path:
        path = self.folder / "tiny"
        if not (path / "config.json").is_file():
            write_checkpoint(path, 256, 2, 32064)
        return path

    def wide_path(self) -> Path:
        path = self.folder / "wide"
        if not (path / "config.json").is_file():
            write_checkpoint(path, 4096, self.layers, 32064)
        return path

    def batches(self, model, response_tokens: int) -> list[Batch]:
        """Made on the host, as train.py's are (positions and image tokens counted there), then moved."""
        vocab, image_token = model.config.text.vocab_size, model.config.image_token_index
        return [Batch(ids, torch.ones_like(ids), labels, image_tokens=int((ids == image_token).sum())).to(self.device)
                for ids, labels in make_batches(vocab, 64, response_tokens)]


# ---------------------------------------------------------------------------------------------------------------------
# The checks


def check_one_graph_at_a_time(world: World):
    """Peak memory of one backward through the total against train.py's per-term backward."""
    model = world.model("fast", wide=not world.quick)
    batches = world.batches(model, 128 if world.quick else 512)
    off = lambda: adapters_disabled(model)  # noqa: E731

    def total():
        loss, _ = unlearning_loss(model, *batches, LossWeights(), model.kernels, off)
        loss.backward()

    together = peak_mib(world.device, total)
    model.zero_grad(set_to_none=True)
    per_term = peak_mib(world.device, lambda: unlearning_backward(model, *batches, LossWeights(), model.kernels, off))
    ok = world.device.type != "cuda" or per_term < 0.6 * together
    return verdict(ok), {"total_backward_mib": together, "per_term_mib": per_term}


def saved_bytes(run) -> int:
    kept = {}

    def pack(t):
        kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


def check_lora_keeps_one_input(world: World):
    """In bfloat16, the fused LoRA op keeps its input (shared by q, k, v), not a float32 copy per adapter: the same
    preset with only the LoRA op changed keeps fewer bytes."""
    counts = {}
    for name, overrides in (("reference LoRA", None), ("fused LoRA", {"lora_linear": "fused"})):
        model = world.model("chunked", overrides=overrides, dtype=torch.bfloat16)
        batch = world.batches(model, 64)[0]
        counts[name] = saved_bytes(lambda: model.hidden_states(batch.input_ids, attention_mask=batch.attention_mask))
    ok = counts["fused LoRA"] < 0.9 * counts["reference LoRA"]
    return verdict(ok), {"saved_mib": {k: v / MiB for k, v in counts.items()}}


def check_flash_attention(world: World):
    """On a right-padded training batch the sdpa op runs FlashAttention (no mask), and keeps no T x T tensor."""
    if (skip := needs_cuda(world.device)):
        return skip
    from ref.kernels.attention import attention_sdpa

    q, k, v = (torch.randn(2, 32, 1024, 128, device=world.device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = torch.zeros(2, 1, 1024, 1024, device=world.device, dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        attention_sdpa(q, k, v, mask, 128**-0.5, causal=True).sum().backward()
    names = [e.key for e in prof.key_averages()]
    flash = any("flash" in n.lower() for n in names)
    kept = saved_bytes(lambda: attention_sdpa(q, k, v, mask, 128**-0.5, causal=True))
    return verdict(flash and kept < 2 * 32 * 1024 * 1024 * 2), {"flash_kernel": flash, "saved_mib": kept / MiB,
                                                                "kernels": [n for n in names if "attention" in n][:5]}


def check_default_dtype(world: World):
    """train.py and eval.py compute in bfloat16 on a GPU by default (a real model); eval.py in float32 on a CPU."""
    ok = default_train_dtype("cuda") == default_dtype("cuda") == "bfloat16" and default_dtype("cpu") == "float32"
    return verdict(ok), {"cuda": default_dtype("cuda"), "cuda_train": default_train_dtype("cuda"),
                         "cpu": default_dtype("cpu")}


def toy_train_args(out: Path, device: torch.device, *extra: str) -> list[str]:
    return ["--out", str(out), "--device", str(device), "--kernels", "fast", "--dtype",
            "bfloat16" if device.type == "cuda" else "float32", "--log-every", "1", *extra]


def check_host_syncs(world: World):
    """Host-device synchronisations per training step (CUDA's sync debug mode counts them)."""
    if (skip := needs_cuda(world.device)):
        return skip
    out = world.folder / "syncs"
    options, start = train.read_command_line(toy_train_args(out, world.device, "--max-steps", "3"))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train.train(options, start)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return verdict(syncs / 3 < 100), {"syncs_per_step": syncs / 3}


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device):
    """The synchronisations CUDA's sync debug mode warns of inside the block, in a list (left empty off CUDA)."""
    if device.type != "cuda":
        yield []
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_step_host_syncs(world: World):
    """One unlearning_backward call (all three terms) under the reference and the fast preset: the ops that force a
    host-device synchronisation, counted by benchmarks/host_syncs.py on any device (on a CPU: what they would force on
    a GPU), and on CUDA also the synchronisations CUDA's sync debug mode reports. One each: the read of the term means
    the call returns for the log."""
    details, ok = {}, True
    for preset in ("reference", "fast"):
        model = world.model(preset)
        batches = world.batches(model, 64)
        off = lambda: adapters_disabled(model)  # noqa: E731
        with HostSyncCounter() as counter, cuda_sync_warnings(world.device) as caught:
            unlearning_backward(model, *batches, LossWeights(), model.kernels, off)
        cuda = sum("synchroniz" in str(w.message) for w in caught) if world.device.type == "cuda" else None
        details[preset] = {"syncing_ops": counter.ops, "cuda_sync_debug": cuda}
        ok = ok and counter.count == 1 and cuda in (None, 1)
    return verdict(ok), details


def check_peak_memory_per_step(world: World):
    """Each log record's peak is its own step's (reset every step), and reserved memory is logged."""
    if (skip := needs_cuda(world.device)):
        return skip
    out = world.folder / "peaks"
    train.train(*train.read_command_line(toy_train_args(out, world.device, "--max-steps", "3")))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ok = all("reserved_memory_mb" in r for r in records)
    return verdict(ok), {"peaks_mb": [r["peak_memory_mb"] for r in records],
                         "reserved_mb": [r.get("reserved_memory_mb") for r in records]}


def check_kl_zero_at_step_zero(world: World):
    """With fresh adapters (B = 0) the KL term is exactly 0 under `fast`: one record with one response token, and two
    records with 8 and with 600."""
    model = world.model("fast")
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.zeros_(module.lora_B.weight)
    values = {}
    for rows, tokens in ((1, 1), (2, 8), (2, 600)):
        batch = world.batches(model, tokens)[2]
        batch = Batch(batch.input_ids[:rows], batch.attention_mask[:rows], batch.labels[:rows])
        kl = kl_to_original(model, batch, model.kernels, lambda: adapters_disabled(model)).item()
        values[f"{rows} x {tokens}"] = kl
    return verdict(all(v == 0.0 for v in values.values())), {"kl_by_records_x_response_tokens": values}


def check_kv_cache_in_place(world: World):
    """Generation writes the KV cache in place: the buffers are allocated once, not copied per token."""
    model = world.model("fast").eval()
    ids = torch.randint(3, 1000, (4, 32), device=world.device)
    from ref.llama import KVCache

    cache = KVCache(len(model.language_model.layers), reserve=16)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.hidden_states(ids, attention_mask=mask, cache=cache)
        first = cache.keys[0].data_ptr()
        for _ in range(16):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            model.hidden_states(ids[:, :1], attention_mask=mask, cache=cache)
    return verdict(cache.keys[0].data_ptr() == first and cache.length == 48), {"length": cache.length}


def check_deterministic_resume(world: World):
    """--deterministic: 2 steps, stop, resume 2 more give the adapter of 4 uninterrupted steps, bit for bit (with
    LoRA dropout, so the CUDA generator's state matters)."""
    extra = ("--deterministic", "--lora-dropout", "0.1")
    whole = world.folder / "whole"
    train.train(*train.read_command_line(toy_train_args(whole, world.device, "--max-steps", "4", *extra)))
    parts = world.folder / "parts"
    train.train(*train.read_command_line(toy_train_args(parts, world.device, "--max-steps", "4", *extra)),
                StopRequest(after_step=2))
    train.train(*train.read_command_line(["--out", str(parts), "--resume"]))
    from safetensors.torch import load_file

    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(parts / "adapter" / "adapter_model.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.use_deterministic_algorithms(False)
    return verdict(same), {"tensors": len(a)}


def check_memory_plan(world: World):
    """The memory planner's activations for a 7B-width step against the peak measured here (fast, bf16, NF4)."""
    if (skip := needs_cuda(world.device)):
        return skip
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_plan

    model = world.model("fast", wide=True)
    tokens = 512
    batches = world.batches(model, tokens - 65)
    off = lambda: adapters_disabled(model)  # noqa: E731
    measured = peak_mib(world.device, lambda: unlearning_backward(model, *batches, LossWeights(), model.kernels, off))
    text = model.config.text
    graph = memory_plan.graph_bytes(text, "nf4", 8, 2, tokens, False, "fast") / MiB
    work = memory_plan.backward_working_bytes(text, "nf4", 8, 2, tokens, False, "fast") / MiB
    ratio = measured / (graph + work)
    return verdict(0.75 <= ratio <= 1.25), {"measured_mib": measured, "planned_graph_mib": graph,
                                            "planned_working_mib": work, "measured_over_planned": ratio}


CHECKS = [
    ("one_graph_at_a_time", "train.py keeps one loss term's graph at a time (peak well under one total backward's)",
     check_one_graph_at_a_time),
    ("lora_keeps_one_input", "the fused LoRA op saves fewer bytes than the reference op's float32 copies",
     check_lora_keeps_one_input),
    ("flash_attention", "the fast preset's attention runs FlashAttention on training batches", check_flash_attention),
    ("default_dtype", "bfloat16 by default on a GPU", check_default_dtype),
    ("host_syncs", "fewer than 100 host-device synchronisations per training step", check_host_syncs),
    ("step_host_syncs", "one host-device synchronisation per unlearning_backward call (the logged means' read)",
     check_step_host_syncs),
    ("peak_memory_per_step", "per-step peak memory (reset each step) and reserved memory in the log",
     check_peak_memory_per_step),
    ("kl_zero_at_step_zero", "KL exactly 0 at step 0 with the fused LoRA op over bitsandbytes' kernels",
     check_kl_zero_at_step_zero),
    ("kv_cache_in_place", "the KV cache is written in place during generation", check_kv_cache_in_place),
    ("deterministic_resume", "--deterministic makes a resumed run equal the uninterrupted one",
     check_deterministic_resume),
    ("memory_plan", "benchmarks/memory_plan.py's count is within 25% of the measured step", check_memory_plan),
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small models only (no 7B-width checkpoint)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-width checkpoint")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in CHECKS], help="run these checks only")
    args = parser.parse_args(argv)
    # --deterministic's check needs cuBLAS's fixed workspace, read once at cuBLAS's first call: set it before any
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    world = World(torch.device(args.device), folder, args.quick, args.layers)
    try:
        with contextlib.redirect_stderr(open(folder / "stderr.txt", "w")):  # progress lines stay out of the JSON
            return [report(name, claim, lambda: check(world)) for name, claim, check in CHECKS
                    if not args.only or name in args.only]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
