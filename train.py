"""Textual unlearning of a LLaVA model (Chakraborty et al. 2024, "Cross-Modal Safety Alignment: Is textual unlearning
all you need?"): QLoRA on the decoder, text-only data, three losses.

    python train.py                                          # the embedded toy (see README)
    python train.py --model DIR --data FILE --out DIR        # a real LLaVA-1.5 folder and an unlearning JSONL

The program reads top to bottom like the algorithm:
  1. options -> a run folder holding the exact arguments and the resolved kernel table
  2. the model: 4-bit NF4 decoder linears + LoRA adapters; vision tower and projector frozen (and, in textual mode,
     never run)
  3. the data: harmful records (prompt, harmful response, helpful response) and normal records (prompt, response)
  4. the loop: L_total = -eps1 * L_harm + eps2 * L_helpful + eps3 * L_utility  (ref/losses.py), AdamW on the adapters,
     warm-up + schedule, accumulation, clipping, a NaN guard, atomic checkpoints and exact --resume
  5. the adapter, a JSON line per step (log.jsonl) and a summary (summary.json)

Modes: `textual` (the paper's method), `multimodal` (the same losses on image+text records: the vision tower and
projector run every step, frozen) and `sft` (the supervised baseline: NLL on the helpful responses, optional utility).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ref import kernels as kernel_registry
from ref.data import Processor, build_prompt, collate_for_training, load_processor
from ref.losses import Batch, LossWeights, unlearning_loss
from ref.lora import LoraConfig, add_lora, adapters_disabled, lora_modules, save_adapter
from ref.unlearning_data import HarmfulRecord, NormalRecord, read_unlearning_jsonl, split_records
from ref import load_model

ROOT = Path(__file__).resolve().parent
TOY_MODEL = ROOT / "assets" / "toy_llava"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------------
# 1. Options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", default=str(TOY_MODEL), help="LLaVA model folder (llava-hf layout; default: the toy)")
    io.add_argument("--vision-dir", default=None, help="CLIP folder, for an original-format LLaVA checkpoint")
    io.add_argument("--data", default="toy", help="unlearning JSONL (see ref/unlearning_data.py), or 'toy' for the "
                                                   "embedded toy world's training data")
    io.add_argument("--out", default=None, help="run folder (default: runs/<mode>)")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    io.add_argument("--prompt-format", default="llava-hf", choices=["llava-hf", "vicuna_v1"])

    method = p.add_argument_group("method")
    method.add_argument("--mode", default="textual", choices=["textual", "multimodal", "sft"])
    method.add_argument("--eps", type=float, nargs=3, default=[0.5, 1.0, 3.0], metavar=("HARM", "HELPFUL", "UTILITY"),
                        help="weights eps1 eps2 eps3 of -L_harm, L_helpful, L_utility (default 0.5 1 3, the toy's;"
                             "\nYao et al. use 0.5 1 1; sft mode ignores eps1)")
    method.add_argument("--mismatch", default="helpful", choices=["helpful", "random"],
                        help="helpful: the record's helpful response; random: a random normal answer (Yao et al.)")

    model = p.add_argument_group("model and adapters")
    model.add_argument("--quantize", default="nf4", choices=["nf4", "fp4", "none"], help="decoder linears' base")
    model.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--lora-r", type=int, default=8)
    model.add_argument("--lora-alpha", type=float, default=16.0)
    model.add_argument("--lora-dropout", type=float, default=0.0)
    model.add_argument("--lora-targets", nargs="+", default=list(LoraConfig().targets))
    model.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder layers in backward")
    model.add_argument("--kernels", default="reference", help=f"kernel preset: {sorted(kernel_registry.PRESETS)}")
    model.add_argument("--kernel", action="append", default=[], metavar="OP=IMPL",
                       help="override one op's implementation (repeatable), e.g. --kernel attention=sdpa")

    opt = p.add_argument_group("optimisation (defaults are the embedded toy's; README gives a real model's)")
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--batch-size", type=int, default=8, help="records per batch, for each of the three terms")
    opt.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    opt.add_argument("--max-steps", type=int, default=300)
    opt.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    opt.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    opt.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--stop-harm-nll", type=float, default=5.0,
                     help="Yao et al.'s rule: once the harmful NLL exceeds this, run --extra-batches more steps, stop\n"
                          "(a negative value turns the rule off)")
    opt.add_argument("--extra-batches", type=int, default=40)

    run = p.add_argument_group("run")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: 1 for the toy, whose tiny matrices gain nothing from more\n"
                          "and lose a lot when another process shares the cores; torch's default otherwise)")
    run.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    run.add_argument("--log-every", type=int, default=1, help="steps between progress lines on a non-terminal")
    run.add_argument("--interrupt-after", type=int, default=None,
                     help="stop after this many steps as if interrupted (checkpoint kept; for testing --resume)")
    args = p.parse_args(argv)
    args.out = args.out or str(ROOT / "runs" / args.mode)
    return args


def check_model_folder(path: str) -> None:
    if Path(path) == TOY_MODEL and not (TOY_MODEL / "config.json").is_file():
        raise SystemExit(f"{TOY_MODEL}: the toy model is not there; build it with `python -m weights_tools.build_toy` "
                         f"(or give --model DIR)")


def kernel_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        op, sep, impl = pair.partition("=")
        if not sep:
            raise SystemExit(f"--kernel expects OP=IMPL, got {pair!r}")
        overrides[op] = impl
    return overrides


# ---------------------------------------------------------------------------------------------------------------------
# 2. The model


def build_model(args, kernels):
    """The LLaVA checkpoint with its decoder linears in 4-bit and LoRA adapters on them; only the adapters train."""
    quantize = None if args.quantize == "none" else args.quantize
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, vision_dir=args.vision_dir,
                       kernels=kernels, quantize=quantize)
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=tuple(args.lora_targets))
    add_lora(model, lora)  # freezes every base parameter: vision tower, projector, embeddings, lm_head, 4-bit linears
    model.language_model.gradient_checkpointing = args.activation_checkpointing
    model.train()  # dropout in the adapters; nothing else in the model behaves differently
    return model, lora


# ---------------------------------------------------------------------------------------------------------------------
# 3. The data


def read_records(args) -> tuple[list[HarmfulRecord], list[NormalRecord]]:
    if args.data == "toy":
        from ref import toy_world  # the embedded default; only imported when asked for

        records = toy_world.unlearning_records(split="train", with_images=args.mode == "multimodal")
    else:
        records = read_unlearning_jsonl(args.data)
    harmful, normal = split_records(records)
    if args.mode == "multimodal":  # the baseline's data: image + text records only
        harmful, normal = [r for r in harmful if r.image], [r for r in normal if r.image]
    else:  # textual unlearning never shows the model an image
        harmful, normal = [r for r in harmful if not r.image], [r for r in normal if not r.image]
    where = f"{args.data} (mode {args.mode})"
    if not harmful:
        raise SystemExit(f"{where}: no harmful records to train on")
    if args.eps[2] and not normal:
        raise SystemExit(f"{where}: no normal records for the utility term (or pass --eps ... 0)")
    if args.mismatch == "random" and not normal:
        raise SystemExit(f"{where}: --mismatch random needs normal records to draw answers from")
    return harmful, normal


class RecordStream:
    """Endless batches over a list, reshuffled each epoch from (seed, epoch); its position is two integers."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.cursor = epoch, cursor

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def next_indices(self) -> list[int]:
        indices = []
        while len(indices) < self.batch_size:
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
            order = self._order()
            take = min(self.batch_size - len(indices), self.size - self.cursor)
            indices += order[self.cursor:self.cursor + take]
            self.cursor += take
        return indices

    def position(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


@dataclass
class StepBatches:
    harmful: Batch | None  # prompts with their harmful responses (L_harm)
    helpful: Batch | None  # the same prompts with helpful responses (L_helpful)
    normal: Batch | None  # normal data (L_utility)

    def to(self, device: torch.device) -> "StepBatches":
        return StepBatches(*(None if b is None else b.to(device) for b in (self.harmful, self.helpful, self.normal)))


class BatchMaker:
    """Records -> tokenized batches with response-only labels; images preprocessed once and cached."""

    def __init__(self, processor: Processor, args, harmful: list[HarmfulRecord], normal: list[NormalRecord]):
        self.processor, self.args = processor, args
        self.harmful, self.normal = harmful, normal
        self.images: dict[str, torch.Tensor] = {}

    def example(self, prompt: str, response: str, image: str | None):
        text = build_prompt(prompt, num_images=1 if image else 0, prompt_format=self.args.prompt_format)
        example = self.processor.training_example(text, response)
        if image:
            if image not in self.images:
                self.images[image] = self.processor.images_to_tensor([image])  # (1, 3, S, S)
            example.pixel_values = self.images[image]
        return example

    def batch(self, pairs: list[tuple[str, str, str | None]]) -> Batch | None:
        if not pairs:
            return None
        examples = [self.example(*pair) for pair in pairs]
        return Batch(**collate_for_training(examples, self.processor.tokenizer.pad_id))

    def preload_images(self) -> None:
        """Decode every image now, so an unreadable one stops the run before training starts."""
        for record in [*self.harmful, *self.normal]:
            if record.image and record.image not in self.images:
                self.images[record.image] = self.processor.images_to_tensor([record.image])  # (1, 3, S, S)

    def step_batches(self, harm_idx: list[int], normal_idx: list[int], step: int, micro: int = 0) -> StepBatches:
        records = [self.harmful[i] for i in harm_idx]
        harm_pairs = [(r.prompt, r.harmful_response, r.image) for r in records if r.harmful_response]
        if self.args.mismatch == "random":
            # Yao et al.'s variant: a random normal answer, drawn from (seed, step, micro-batch) so a resumed run draws
            # the same.
            rng = random.Random(f"{self.args.seed}/{step}/{micro}")
            helpful_pairs = [(r.prompt, rng.choice(self.normal).response, r.image) for r in records]
        else:
            helpful_pairs = [(r.prompt, r.helpful_response, r.image) for r in records if r.helpful_response]
        normal_pairs = [(self.normal[i].prompt, self.normal[i].response, self.normal[i].image) for i in normal_idx]
        if self.args.mode == "sft":
            harm_pairs = []  # the supervised baseline learns the helpful responses and never ascends
        return StepBatches(self.batch(harm_pairs), self.batch(helpful_pairs), self.batch(normal_pairs))


# ---------------------------------------------------------------------------------------------------------------------
# 4. The loop's parts: schedule, accounting, checkpoints, progress


def learning_rate(step: int, args) -> float:
    """Linear warm-up over `warmup` steps, then constant, linear decay to 0, or cosine decay to 0 at max_steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    if args.schedule == "linear":
        return args.lr * (1.0 - progress)
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.lr


def decoder_params(model) -> int:
    """Parameters a token's forward pass multiplies through in the decoder layers (4-bit ones counted unpacked)."""
    t = model.config.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_hidden_layers * (attn + mlp)


def vision_params(model) -> int:
    v = model.config.vision
    layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    projector = model.config.projector_in_features * model.config.text.hidden_size + model.config.text.hidden_size**2
    return v.num_hidden_layers * layer + projector


def batch_flops(model, batch: Batch | None, backward: bool, reference_pass: bool) -> float:
    """Matmul FLOPs of one term's passes (2 per multiply-add), the count a reader can check by hand.

    Forward through the decoder: 2 * P_decoder per token; the lm_head only at response tokens: 2 * D * V each.
    Backward through a frozen base computes input gradients only: about the forward's cost again (LoRA's own weight
    gradients are negligible). The original model's pass for the KL term is one more forward. The frozen vision tower
    runs forward only, 2 * P_vision per image token (1 + patches per image).
    """
    if batch is None:
        return 0.0
    t = model.config.text
    tokens, responses = int(batch.attention_mask.sum()), batch.response_tokens
    forward = 2 * decoder_params(model) * tokens + 2 * t.hidden_size * t.vocab_size * responses
    passes = 1 + (1 if backward else 0) + (1 if reference_pass else 0)
    vision = 0.0
    if batch.pixel_values is not None:
        vision = 2 * vision_params(model) * batch.pixel_values.shape[0] * (model.config.vision.num_patches + 1)
    return passes * forward + vision


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def write_atomically(path: Path, write) -> None:
    """Write to a temporary name, then rename: a crash mid-write never leaves a half-written file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A training checkpoint that is missing, unreadable, or does not fit the model being resumed."""


CHECKPOINT_FILE = "state.safetensors"


def save_checkpoint(folder: Path, model, optimizer, state: dict) -> None:
    """Adapter, AdamW moments and RNG states as tensors, everything else (step, data position) as JSON metadata of
    the same safetensors file: one file, renamed into place, so a checkpoint is never half old and half new."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    tensors = {f"param/{n}": t.contiguous() for n, t in adapter_tensors(model).items()}
    opt_state = optimizer.state_dict()
    for index, name in enumerate(names):
        for key, value in opt_state["state"].get(index, {}).items():
            tensors[f"adam/{name}/{key}"] = value.detach().reshape(-1) if value.ndim == 0 else value.contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {**state, "python_rng": _jsonable_random_state(), "param_names": names}
    write_atomically(folder / CHECKPOINT_FILE, lambda p: save_file(tensors, str(p), metadata={"state": json.dumps(meta)}))


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Put a checkpoint's adapter, optimizer and RNG states back; return its metadata (step, data positions, ...)."""
    path = folder / CHECKPOINT_FILE
    params = dict(model.named_parameters())
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable training checkpoint ({err})") from err
    missing = [n for n in meta["param_names"] if f"param/{n}" not in tensors or n not in params]
    if missing:
        raise CheckpointError(f"{path}: adapter tensor {missing[0]!r} is missing or has no place in this model")
    with torch.no_grad():
        for name in meta["param_names"]:
            params[name].copy_(tensors[f"param/{name}"])
    state = {}
    for index, name in enumerate(meta["param_names"]):
        prefix = f"adam/{name}/"
        moments = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if moments:
            moments["step"] = moments["step"].reshape(())
            state[index] = moments
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    random.setstate(_random_state_from_json(meta["python_rng"]))
    return meta


def keep_log_before(log_path: Path, step: int) -> None:
    """Drop log lines of steps >= `step` (run after the last checkpoint, before a crash): they are about to rerun."""
    if log_path.exists():
        lines = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] < step]
        write_atomically(log_path, lambda p: p.write_text("".join(line + "\n" for line in lines)))


def _jsonable_random_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _random_state_from_json(saved):
    version, internal, gauss = saved
    return version, tuple(internal), gauss


class Progress:
    """One updating line on a terminal; a plain line every `log_every` steps otherwise."""

    def __init__(self, total: int, log_every: int):
        self.total, self.log_every, self.tty = total, log_every, sys.stderr.isatty()

    def show(self, record: dict) -> None:
        line = (f"step {record['step'] + 1}/{self.total}  loss {record['total']:+.4f}  "
                + "  ".join(f"{k} {record[k]:.4f}" for k in ("harm_nll", "helpful_nll", "utility_kl") if k in record)
                + f"  lr {record['lr']:.2e}  {record['seconds']:.2f}s")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif record["step"] % self.log_every == 0 or record["step"] + 1 == self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# 5. The loop (the outputs are written at its end)


def train(args) -> dict:
    out = Path(args.out)
    checkpoint_dir = out / "checkpoint"
    if args.resume:
        if not (checkpoint_dir / CHECKPOINT_FILE).is_file():
            raise SystemExit(f"--resume: no checkpoint in {checkpoint_dir}")
        # The run continues exactly as it was started: its saved arguments win over the command line's.
        try:
            saved_args = json.loads((out / "args.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"--resume: cannot read {out / 'args.json'}: {err}") from err
        args = argparse.Namespace(**{**saved_args, "resume": True, "interrupt_after": args.interrupt_after})
    elif (out / "log.jsonl").exists():
        raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or another --out")

    threads = args.threads or (1 if Path(args.model) == TOY_MODEL else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    kernels = kernel_registry.resolve(args.kernels, kernel_overrides(args.kernel))
    # Everything that can be wrong with the inputs is found before the (slow) model load: data, tokenizer, images.
    check_model_folder(args.model)
    processor = load_processor(args.model, args.vision_dir)
    harmful, normal = read_records(args)
    maker = BatchMaker(processor, args, harmful, normal)
    maker.preload_images()
    model, lora = build_model(args, kernels)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    weights = LossWeights(harm=0.0 if args.mode == "sft" else args.eps[0], helpful=args.eps[1], utility=args.eps[2])
    device = model.lm_head.weight.device

    out.mkdir(parents=True, exist_ok=True)
    harm_stream = RecordStream(len(harmful), args.batch_size, args.seed)
    normal_stream = RecordStream(max(len(normal), 1), args.batch_size, args.seed + 1)
    start_step, stop_at, totals = 0, None, {"tokens": 0, "image_tokens": 0, "flops": 0.0, "seconds": 0.0}
    if args.resume:
        meta = load_checkpoint(checkpoint_dir, model, optimizer)
        start_step, stop_at, totals = meta["step"], meta["stop_at"], meta["totals"]
        harm_stream.epoch, harm_stream.cursor = meta["harm_position"]["epoch"], meta["harm_position"]["cursor"]
        normal_stream.epoch, normal_stream.cursor = meta["normal_position"]["epoch"], meta["normal_position"]["cursor"]
        keep_log_before(out / "log.jsonl", start_step)  # steps after the checkpoint are run (and logged) again
    else:
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    (out / "kernels.txt").write_text(kernels.table() + "\n")

    print(f"textual unlearning: mode {args.mode}, model {args.model}, data {args.data}", file=sys.stderr)
    print(f"  {len(harmful)} harmful and {len(normal)} normal records; eps = {args.eps}; "
          f"{sum(p.numel() for p in trainable):,} trainable adapter parameters in {len(lora_modules(model))} "
          f"LoRA linears (r={args.lora_r}, base {args.quantize}); steps {start_step}..{args.max_steps}", file=sys.stderr)
    print("  kernels:\n" + kernels.table(), file=sys.stderr)

    def checkpoint_state(step_done: int) -> dict:
        return {"step": step_done, "stop_at": stop_at, "totals": totals,
                "harm_position": harm_stream.position(), "normal_position": normal_stream.position()}

    progress = Progress(args.max_steps, args.log_every)
    stopped_by, last_good = "max_steps", adapter_tensors(model)
    step = start_step
    with open(out / "log.jsonl", "a") as log:
        while step < args.max_steps:
            started = time.perf_counter()
            lr = learning_rate(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_terms: dict[str, float] = {}
            tokens = image_tokens = 0
            for micro in range(args.grad_accum):
                normal_idx = normal_stream.next_indices() if normal else []
                batches = maker.step_batches(harm_stream.next_indices(), normal_idx, step, micro).to(device)
                loss, terms = unlearning_loss(model, batches.harmful, batches.helpful, batches.normal, weights,
                                              kernels, lambda: adapters_disabled(model))
                (loss / args.grad_accum).backward()
                for key, value in terms.items():
                    step_terms[key] = step_terms.get(key, 0.0) + value / args.grad_accum
                for batch, backward, reference in ((batches.harmful, True, False), (batches.helpful, True, False),
                                                   (batches.normal, True, True)):
                    if batch is None:
                        continue
                    tokens += int(batch.attention_mask.sum())
                    image_tokens += int((batch.input_ids == model.config.image_token_index).sum())
                    totals["flops"] += batch_flops(model, batch, backward, reference)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip if args.clip > 0 else float("inf"))
            if not (math.isfinite(step_terms["total"]) and math.isfinite(float(grad_norm))):
                # NaN guard: do not step; the adapter stays the last good one and the run ends here.
                stopped_by = f"non-finite loss or gradient at step {step}"
                break
            optimizer.step()
            if not all(torch.isfinite(p).all() for p in trainable):
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name in last_good:
                            p.copy_(last_good[name])
                stopped_by = f"non-finite adapter weights after step {step} (restored the previous step's)"
                break
            last_good = adapter_tensors(model)

            seconds = time.perf_counter() - started
            totals["tokens"] += tokens
            totals["image_tokens"] += image_tokens
            totals["seconds"] += seconds
            record = {"step": step, **step_terms, "grad_norm": float(grad_norm), "lr": lr, "tokens": tokens,
                      "image_tokens": image_tokens, "seconds": seconds, "peak_memory_mb": peak_memory_mb(device)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.show(record)
            step += 1

            harm_nll = step_terms.get("harm_nll")
            if args.stop_harm_nll is not None and args.stop_harm_nll >= 0 and stop_at is None \
                    and harm_nll is not None and harm_nll > args.stop_harm_nll:
                stop_at = step + args.extra_batches  # Yao et al.: a few more batches once the harmful NLL is high
            if stop_at is not None and step >= stop_at:
                stopped_by = f"harmful NLL above {args.stop_harm_nll} (+{args.extra_batches} batches)"
                break
            interrupted = args.interrupt_after is not None and step >= args.interrupt_after and step < args.max_steps
            if step % args.save_every == 0 or interrupted:
                save_checkpoint(checkpoint_dir, model, optimizer, checkpoint_state(step))
            if interrupted:
                progress.close()
                print(f"interrupted after step {step}; continue with --resume --out {out}", file=sys.stderr)
                return {"interrupted_at": step}
    progress.close()

    # -----------------------------------------------------------------------------------------------------------------
    # Outputs
    save_checkpoint(checkpoint_dir, model, optimizer, checkpoint_state(step))
    save_adapter(model, out / "adapter", lora)
    summary = {"mode": args.mode, "steps": step, "stopped_by": stopped_by, "tokens": totals["tokens"],
               "image_tokens": totals["image_tokens"], "estimated_flops": totals["flops"],
               "wall_seconds": totals["seconds"], "peak_memory_mb": peak_memory_mb(device),
               "adapter": str(out / "adapter"), "kernels": kernels.choice}
    write_atomically(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    print(f"done: {step} steps ({stopped_by}), {totals['tokens']:,} tokens, {totals['flops']:.3g} FLOPs, "
          f"{totals['seconds']:.1f} s; adapter in {out / 'adapter'}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
