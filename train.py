"""Textual unlearning of a LLaVA model (Chakraborty et al. 2024, "Cross-Modal Safety Alignment: Is textual unlearning
all you need?"): QLoRA on the decoder, text-only data, three losses.

    python train.py                                          # the embedded toy (see README)
    python train.py --model DIR --data FILE --out DIR        # a real LLaVA-1.5 folder and an unlearning JSONL

`train()` is the algorithm in one screen; each numbered part below is a section of this file:
  1. options -> a run folder holding the exact arguments and the resolved kernel table (harness/runs.py)
  2. the model: 4-bit NF4 decoder linears + LoRA adapters; vision tower and projector frozen (and, in textual mode,
     never run)
  3. the data: harmful records (prompt, harmful response, helpful response) and normal records (prompt, response),
     drawn as seeded streams of batches (ref/batches.py)
  4. the loop: L_total = -eps1 * L_harm + eps2 * L_helpful + eps3 * L_utility (ref/losses.py) over --grad-accum
     batches, clipping, AdamW on the adapters, a NaN and divergence guard, Yao et al.'s stopping rule, checkpoints
     for an exact --resume (Ctrl-C or SIGTERM: a checkpoint at the end of the step, then exit)
  5. the outputs: the adapter, a JSON line per step (log.jsonl) and a summary (summary.json)

Modes: `textual` (the paper's method), `multimodal` (the same losses on image+text records: the vision tower and
projector run every step, frozen) and `sft` (the supervised baseline: NLL on the helpful responses, optional utility).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ref import kernels as kernel_registry
from harness.devices import check_device, default_dtype
from ref.config import DTYPES, read_json
from harness.console import (HelpFormatter, Progress, add_debug_option, exit_on_user_error, finite_float,
                         non_negative_float, non_negative_int, positive_float, positive_int, probability)
from ref.data import PROMPT_FORMATS, load_processor
from ref.distributed import (Distributed, close_process_group, full_state_dict, full_tensor,
                             shard_decoder_layers)
from ref.batches import BatchMaker, Streams
from ref.losses import (LossWeights, StepCounts, add_token_sums, step_shares, step_terms, tokens_in_step,
                        unlearning_backward)
from ref.adapters import save_adapter
from ref.lora import LoraConfig, add_lora, adapters_disabled, lora_modules
from harness.files import new_folder, write_atomically
from harness.memory import memory_use, start_step_memory
from harness.models import load_base
from harness.provenance import provenance
from harness.signals import StopRequest
from harness.runs import (ADAPTER_DIR, ARGS_FILE, CHECKPOINT_DIR, CHECKPOINT_FILE, KERNELS_FILE, LOG_FILE, MODEL_DIR,
                      SUMMARY_FILE, RunError, adapter_step, keep_log_before, load_checkpoint, read_checkpoint_state,
                      read_run_args, rng_state, save_checkpoint, step_adapter_dir, trainable_tensors, training_tensors)
from harness.unlearning_data import read_unlearning_jsonl
from ref.unlearning_data import HarmfulRecord, NormalRecord, split_records
from ref.weights import copy_side_files, save_model
from worlds.embedded import DEFAULT_WORLD, require_world_model, world_of

ROOT = Path(__file__).resolve().parent
TRAIN_DTYPES = ["bfloat16", "float32"]


class TrainError(ValueError):
    """Options or data that train.py cannot run with; found before the model loads."""


# ---------------------------------------------------------------------------------------------------------------------
# The algorithm


def train(args: argparse.Namespace, stop: StopRequest | None = None) -> dict:
    """Run 1-5 of the module docstring; returns the summary (or {"interrupted_at": step} after a stop request)."""
    # 1. options -> the run folder; a resumed run continues with the options it was started with. Under torchrun
    # every rank runs this function; rank 0 alone writes files and prints (`world.is_main`)
    world = Distributed.from_environment(args.device)
    args, out = open_run(args, world)
    if (finished := finished_run(args, out, world)) is not None:
        return finished
    kernels = set_up_torch(args)
    # 3 before 2: every input is read and checked before the (slow) model load
    harmful, normal, coverage, maker = read_data(args)
    # 2. the model, the optimizer over the adapters, the loss weights
    model, lora, original = build_model(args, kernels, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    weights = LossWeights(harm=0.0 if args.mode == "sft" else args.eps[0], helpful=args.eps[1], utility=args.eps[2])
    streams = Streams(len(harmful), len(normal), args.batch_size, args.seed, world.world_size, args.grad_accum)
    state = start_or_resume(args, out, model, optimizer, streams, kernels, world)
    if world.is_main:
        announce(args, harmful, normal, model, trainable, kernels, state, world)

    # 4. the loop
    stop = stop or StopRequest()
    device = model.lm_head.weight.device
    progress = Progress("step", args.max_steps, "steps", every=args.log_every, done=state.step,
                        stream=None if world.is_main else open(os.devnull, "w"))
    last_good = trainable_tensors(model)
    with open(out / LOG_FILE if world.is_main else os.devnull, "a") as log, stop.on_signals():
        while state.step < args.max_steps and not state.stopped_by:
            started = time.perf_counter()
            start_step_memory(device)
            lr = set_learning_rate(optimizer, state.step, args)
            optimizer.zero_grad(set_to_none=True)
            micro_batches = [maker.term_batches(harm, normal, state.step, position).to(device)
                             for harm, normal, position in streams.next_step(world.rank)]  # this rank's share
            step_tokens = tokens_in_step(micro_batches, world.sum_floats)
            sums, counts = {}, StepCounts()
            for batches in micro_batches:
                # L_total = -eps1 * L_harm + eps2 * L_helpful + eps3 * L_utility, each term the mean over all its
                # response tokens in the step: this batch's mean counts with its share of them. The gradient is
                # accumulated one term at a time, so only one term's graph is alive          (ref/losses.py)
                means = unlearning_backward(model, batches.harmful, batches.helpful, batches.normal, weights,
                                            kernels, lambda: adapters_disabled(model),
                                            step_shares(batches, step_tokens, world.world_size), original)
                add_token_sums(sums, means, batches)
                counts.add(model, batches)
            world.average_gradients(trainable)  # what DDP does; the shares' factor of ranks undoes its mean
            terms = step_terms(sums, step_tokens, weights, world.sum_floats)
            counts = counts.over_ranks(world.sum_floats)
            norms, failure = guarded_update(model, optimizer, trainable, terms, args, last_good, state)
            if failure:
                state.stopped_by = failure
                break
            last_good = trainable_tensors(model)
            record = state.finish_step(terms, norms, lr, counts, time.perf_counter() - started, device)
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.update(1, progress_info(record))
            state.stopped_by = stopping_rule(state, terms.get("harm_nll"), args)
            if state.stopped_by:
                break
            if args.save_adapter_every and state.step % args.save_adapter_every == 0 and lora:
                save_adapter(model, out / step_adapter_dir(state.step), lora, args.model, write=world.is_main)
            # a signal reaches the ranks at different moments: they stop together, after the step any of them saw it
            interrupted = world.any(stop.requested(state.step)) and state.step < args.max_steps
            if state.step % args.save_every == 0 or interrupted:
                save_training_state(out, model, optimizer, state.checkpoint(streams), world)
            if interrupted:
                progress.close()
                if world.is_main:
                    print(f"stopped after step {state.step} ({stop.reason()}); continue with: python train.py "
                          f"--resume --out {out}", file=sys.stderr)
                return {"interrupted_at": state.step, "signal": stop.signal_number}
    progress.close()

    # 5. the outputs
    state.stopped_by = state.stopped_by or "max_steps"
    save_training_state(out, model, optimizer, state.checkpoint(streams), world)
    save_outputs(model, lora, args, out, world)
    return write_summary(args, out, state, device, kernels, world, coverage)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Options and the run folder


# Options whose default depends on the model. The toy's were chosen on its validation suites (README, worlds/toy/defaults.py);
# any other model gets Yao et al.'s (llm_unlearn, unlearn_harm.py: weights 0.5 1 1 on the harmful, mismatch and
# normal terms, batch 2, 1000 steps, stop once the harmful loss passes 100) with QLoRA's learning rate for a 7B decoder.
# The kernels: `fast` (ref/kernels/registry.py; benchmarks/bench_step_vs_peft.py measures it against transformers + peft).
REAL_MODEL_DEFAULTS = {"lr": 2e-4, "eps": [0.5, 1.0, 1.0], "batch_size": 2, "max_steps": 1000, "stop_harm_nll": 100.0,
                       "kernels": "fast"}
# Options a resumed run may change: they decide how far it goes and what it writes, not what one step computes.
RESUMABLE = ("max_steps", "save_every", "save_adapter_every", "log_every")
PATH_OPTIONS = ("model", "vision_dir", "data")  # compared as the files they name: ./data.jsonl is data.jsonl
NOT_RECORDED = ("resume", "debug")  # how this invocation runs, not what the run is: kept out of args.json


def model_default(name: str) -> str:
    toy_value, real_value = DEFAULT_WORLD.train_defaults[name], REAL_MODEL_DEFAULTS[name]
    show = " ".join(map(str, toy_value)) if isinstance(toy_value, list) else toy_value
    real = " ".join(map(str, real_value)) if isinstance(real_value, list) else real_value
    return f"(default: {show} on the toy, {real} on any other model)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", default=str(DEFAULT_WORLD.model),
                    help="LLaVA model folder (llava-hf layout; default: the toy)")
    io.add_argument("--vision-dir", default=None, help="CLIP folder, for an original-format LLaVA checkpoint")
    toy_data = "\n".join(textwrap.fill(f"{name}: {what}", 100, initial_indent="  ", subsequent_indent="    ")
                         for name, what in DEFAULT_WORLD.data.items())
    io.add_argument("--data", default="toy", help="unlearning JSONL (see ref/unlearning_data.py), or the embedded toy "
                                                   f"world's training records:\n{toy_data}")
    io.add_argument("--out", default=None, help="run folder (default: runs/<mode>)")
    io.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint, with the options it was started with;\n"
                         f"only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may change (a larger\n"
                         "--max-steps extends a finished run: a linear or cosine schedule then decays to the new end)")
    io.add_argument("--prompt-format", default="llava-hf", choices=sorted(PROMPT_FORMATS),
                    help="chat template: llava-hf's \"USER: ... ASSISTANT:\", the original release's vicuna_v1,\n"
                         "or chatml (SmolLM2-Instruct's)")

    method = p.add_argument_group("method")
    method.add_argument("--mode", default="textual", choices=["textual", "multimodal", "sft"],
                        help="textual: the paper's method; multimodal: the same losses on image+text records;\n"
                             "sft: the supervised baseline (helpful NLL and the utility term, no ascent)")
    method.add_argument("--eps", type=non_negative_float, nargs=3, default=None, metavar=("HARM", "HELPFUL", "UTILITY"),
                        help="weights eps1 eps2 eps3 of -L_harm, L_helpful, L_utility (sft mode ignores eps1)\n"
                             + model_default("eps"))
    method.add_argument("--include-categories", nargs="+", default=None, metavar="CATEGORY",
                        help="train on the harmful records of these harm categories only (the records'\n"
                             "\"categories\": the toy's are its topics, PKU-SafeRLHF's its harm categories)")
    method.add_argument("--exclude-categories", nargs="+", default=None, metavar="CATEGORY",
                        help="drop the harmful records of these categories")
    method.add_argument("--category-fraction", type=positive_float, default=1.0,
                        help="keep this fraction of the (remaining) categories, drawn with --category-seed")
    method.add_argument("--category-seed", type=non_negative_int, default=None,
                        help="draws --category-fraction's choice (default: --seed)")
    method.add_argument("--mismatch", default="helpful", choices=["helpful", "random"],
                        help="helpful: the record's helpful response; random: a random normal answer (Yao et al.)")

    model = p.add_argument_group("model and adapters")
    model.add_argument("--quantize", default="nf4", choices=["nf4", "fp4", "none"], help="decoder linears' base")
    model.add_argument("--dtype", default=None, choices=TRAIN_DTYPES,
                       help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU and for the toy)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank")
    model.add_argument("--lora-alpha", type=positive_float, default=16.0,
                       help="LoRA scale alpha (the update is alpha/r B A x)")
    model.add_argument("--lora-dropout", type=probability, default=0.0, help="dropout on the adapters' input")
    model.add_argument("--lora-targets", nargs="+", default=list(LoraConfig().targets),
                       help="decoder linears that get adapters, by name")
    model.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder layers in backward")
    model.add_argument("--full-parameter", action="store_true",
                       help="train the decoder layers themselves, no LoRA (a dense base: --quantize none); the KL\n"
                            "compares with a frozen copy of the model; the result is a llava-hf checkpoint, model/")
    model.add_argument("--parallel", default=None, choices=["ddp", "fsdp"],
                       help="under torchrun: ddp (every rank holds the model; adapter gradients all-reduced) or fsdp\n"
                            "(decoder layers sharded across ranks; a dense base only). Default: ddp for a 4-bit\n"
                            "base, fsdp for a dense one (--quantize none)")
    model.add_argument("--kernels", default=None, help=f"kernel preset: {sorted(kernel_registry.PRESETS)} "
                       + model_default("kernels"))
    model.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (torch.use_deterministic_algorithms; on a GPU, slower),\n"
                            "so that a resumed run repeats the uninterrupted one bit for bit there too")
    model.add_argument("--kernel", action="append", default=[], metavar="OP=IMPL",
                       help="override one op's implementation (repeatable), e.g. --kernel attention=sdpa")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=positive_float, default=None, help="peak learning rate " + model_default("lr"))
    opt.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW's decoupled weight decay")
    opt.add_argument("--batch-size", type=positive_int, default=None,
                     help="records per batch, for each of the three terms " + model_default("batch_size"))
    opt.add_argument("--grad-accum", type=positive_int, default=1, help="batches per optimizer step")
    opt.add_argument("--max-steps", type=positive_int, default=None,
                     help="optimizer steps " + model_default("max_steps"))
    opt.add_argument("--warmup", type=non_negative_int, default=0, help="linear warm-up steps")
    opt.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"],
                     help="learning rate after warm-up: constant, or decaying to 0 at --max-steps")
    opt.add_argument("--clip", type=non_negative_float, default=1.0, help="gradient norm clipping (0: off)")
    opt.add_argument("--divergence-factor", type=non_negative_float, default=100.0,
                     help="stop, keeping the last good adapter, when the gradient norm passes this many times the\n"
                          "largest before it, or the adapters' norm this many times the untrained adapters' (0: off)")
    opt.add_argument("--seed", type=non_negative_int, default=0,
                     help="seeds the data order, the adapters' init and dropout")
    opt.add_argument("--stop-harm-nll", type=finite_float, default=None,
                     help="Yao et al.'s rule: once the harmful NLL exceeds this, run --extra-batches more steps,\n"
                          "then stop; a negative value turns the rule off " + model_default("stop_harm_nll"))
    opt.add_argument("--extra-batches", type=non_negative_int, default=40,
                     help="steps run after the stopping rule fires")

    run = p.add_argument_group("run")
    run.add_argument("--threads", type=positive_int, default=None,
                     help="CPU threads for torch (default: 1 for the toy, whose tiny matrices gain nothing from more\n"
                          "and lose a lot when another process shares the cores; torch's default otherwise)")
    run.add_argument("--save-every", type=positive_int, default=50, help="steps between checkpoints")
    run.add_argument("--save-adapter-every", type=non_negative_int, default=0,
                     help="also keep the adapter every N steps, in adapter-step<N>/ (0: only the final adapter);\n"
                          "eval.py --adapter RUN_DIR evaluates them all, to plot ASR against steps")
    run.add_argument("--log-every", type=positive_int, default=1, help="steps between progress lines on a non-terminal")
    add_debug_option(run)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with `given`: the names of those on the command line (a resume checks them against the run's).
    Defaults that depend on the model are filled in by `open_run`, once it knows whether this is a resume."""
    args = build_parser().parse_args(argv)
    args.given = sorted(options_given(argv))
    args.out = args.out or str(ROOT / "runs" / args.mode)
    return args


def options_given(argv: list[str] | None) -> set[str]:
    """The options on the command line: parsed again with every default suppressed, what is set was given. (Each
    action's own default: set_defaults would also store SUPPRESS as a parser-level default, typed as a value.)"""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def option_defaults() -> dict:
    """Every option's parser default (None for those that depend on the model)."""
    return vars(build_parser().parse_args([]))


def kernel_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        op, sep, impl = pair.partition("=")
        if not sep:
            raise TrainError(f"--kernel expects OP=IMPL, got {pair!r}")
        overrides[op] = impl
    return overrides


def open_run(args: argparse.Namespace, world: Distributed = Distributed()) -> tuple[argparse.Namespace, Path]:
    """A new run folder (model-dependent defaults filled in), or with --resume the existing one and the options its
    run was started with, changed where the command line changes a `RESUMABLE` option."""
    out = Path(args.out)
    check_run_folder(out)
    has_checkpoint = (out / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    if args.resume and has_checkpoint:
        args = resumed_options(args, out)
    elif has_checkpoint:
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    elif args.resume and not (out / ARGS_FILE).is_file():
        raise RunError(f"--resume: {out} holds no train.py run (no {ARGS_FILE}, no checkpoint)")
    else:
        if args.resume:  # stopped before its first checkpoint: the same options, from step 0
            args = resumed_options(args, out, from_start=True)
        if (out / ARGS_FILE).is_file() and world.is_main:
            print(f"{out}: a run stopped before its first checkpoint; starting it again in place", file=sys.stderr)
            clear_unfinished_run(out)
        defaults = world.train_defaults if (world := world_of(args.model)) else REAL_MODEL_DEFAULTS
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        # full-parameter training updates the weights themselves, in the compute dtype (no float32 master copy)
        float32_only = (world is not None and world.float32_only) or args.full_parameter
        args.dtype = args.dtype or ("float32" if float32_only else default_dtype(args.device))
        args.parallel = args.parallel or ("fsdp" if args.quantize == "none" else "ddp")
    if args.full_parameter and (args.quantize != "none" or args.save_adapter_every):
        raise TrainError("--full-parameter trains dense weights: it needs --quantize none, and keeps no adapters "
                         "along the way (no --save-adapter-every)")
    if args.full_parameter and args.dtype != "float32":
        raise TrainError(f"--full-parameter trains the weights themselves in the compute dtype, with no float32 master "
                         f"copy: in {args.dtype} an AdamW update below 1/256 of a weight rounds away (at lr 1e-5, "
                         f"almost all of them). Use --dtype float32")
    if args.parallel == "fsdp" and args.quantize != "none":
        raise TrainError(f"--parallel fsdp shards dense weights; a {args.quantize} base runs under --parallel ddp "
                         f"(or train on a dense base: --quantize none)")
    check_device(args.device)
    require_world_model(args.model)
    return args, out


def same_option(name: str, saved, given) -> bool:
    if name in PATH_OPTIONS and isinstance(saved, str) and isinstance(given, str):
        return saved == given or Path(saved).resolve() == Path(given).resolve()
    return saved == given


def check_run_folder(out: Path) -> None:
    """--out can hold a run: not a file, and writable, found before anything is read or loaded."""
    if out.is_file():
        raise RunError(f"--out {out}: is a file, not a run folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"--out {out}: {existing} is not writable; choose another --out")


def clear_unfinished_run(out: Path) -> None:
    """A run with no checkpoint trained nothing that can be kept: its log and step adapters go (its files only)."""
    (out / LOG_FILE).unlink(missing_ok=True)
    for folder in out.glob(f"{ADAPTER_DIR}-step*"):
        if adapter_step(folder) is not None:
            shutil.rmtree(folder)


def resumed_options(args: argparse.Namespace, out: Path, from_start: bool = False) -> argparse.Namespace:
    """The run's options (args.json) with the command line's changes to `RESUMABLE` ones; any other difference is
    refused, listed. `changes` holds {name: [before, now]} for the log. `from_start`: the run has no checkpoint, so
    it starts again from step 0 (as a new run, with its options)."""
    defaults = option_defaults()
    saved = {**defaults, **{k: v for k, v in read_run_args(out).items() if k in defaults}}
    changes = {name: [saved[name], getattr(args, name)] for name in args.given
               if name not in (*NOT_RECORDED, "out") and not same_option(name, saved[name], getattr(args, name))}
    refused = [name for name in changes if name not in RESUMABLE]
    if refused:
        listed = "; ".join(f"--{n.replace('_', '-')} {changes[n][0]!r} in the run, {changes[n][1]!r} now"
                           for n in refused)
        raise TrainError(f"--resume {out}: options differ from {out / ARGS_FILE}: {listed}. Only "
                         f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may change on resume; start a "
                         f"new run (another --out) for the others")
    resumed = argparse.Namespace(**{**saved, **{name: now for name, (_, now) in changes.items()}})
    resumed.resume, resumed.debug, resumed.out = not from_start, args.debug, str(out)
    resumed.given, resumed.changes = args.given, changes
    return resumed


def finished_run(args: argparse.Namespace, out: Path, world: Distributed = Distributed()) -> dict | None:
    """A resumed run with nothing left to do (it ended, and --max-steps does not reach past its end): its summary,
    after one line saying so. A run stopped by a rule or a failure cannot be extended: that is refused."""
    if not args.resume:
        return None
    meta = read_checkpoint_state(out / CHECKPOINT_DIR)
    stopped_by = meta.get("stopped_by")
    if stopped_by is None and (out / SUMMARY_FILE).is_file():  # a checkpoint from before stopped_by was kept
        stopped_by = read_json(out / SUMMARY_FILE, RunError).get("stopped_by")
    step = meta["step"]
    if args.max_steps < step:
        raise TrainError(f"--resume {out}: --max-steps {args.max_steps} is below the checkpoint's step {step}")
    if stopped_by not in (None, "max_steps"):
        if "max_steps" in args.changes:
            raise TrainError(f"--resume {out}: the run stopped at step {step} ({stopped_by}); a larger --max-steps "
                             f"cannot continue it")
    elif args.max_steps > step:
        return None
    if not ((out / ADAPTER_DIR).is_dir() and (out / SUMMARY_FILE).is_file()):
        return None  # stopped after its last checkpoint, before its outputs: the run writes them without a step
    if world.is_main:
        print(f"nothing to do: {out} ended at step {step} ({stopped_by or 'max_steps'}); pass --max-steps N > {step} "
              f"to train further", file=sys.stderr)
    return read_json(out / SUMMARY_FILE, RunError)


def set_up_torch(args: argparse.Namespace) -> kernel_registry.Kernels:
    """Threads and seeds, then the kernel table every op of the model and the losses is called through."""
    threads = args.threads or (world.threads if (world := world_of(args.model)) else None)
    if threads:
        torch.set_num_threads(threads)
    if args.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this before its first call (nothing ran yet)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    return kernel_registry.resolve(args.kernels, kernel_overrides(args.kernel))


# ---------------------------------------------------------------------------------------------------------------------
# 2. The model


def build_model(args: argparse.Namespace, kernels: kernel_registry.Kernels, world: Distributed):
    """The LLaVA checkpoint with its decoder linears in 4-bit and LoRA adapters on them; only the adapters train.
    With --full-parameter the decoder layers themselves train (a dense base), and a frozen copy of the model is the
    original the KL term compares with. Under torchrun with --parallel fsdp the decoder layers are sharded across
    the ranks; under ddp every rank holds the whole model and the gradients are averaged after each step.
    Returns (model, the LoRA settings or None, the frozen original or None)."""
    model = load_base_on_rank(args, kernels, world)
    lora, original = None, None
    if args.full_parameter:
        original = load_base_on_rank(args, kernels, world).eval().requires_grad_(False)
        model.requires_grad_(False)
        model.language_model.layers.requires_grad_(True)  # embeddings, lm_head, final norm, tower, projector frozen
    else:
        lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=tuple(args.lora_targets))
        add_lora(model, lora)  # freezes every base parameter: tower, projector, embeddings, lm_head, 4-bit linears
    if world.enabled and args.parallel == "fsdp":
        shard_decoder_layers(model)
        if original is not None:
            shard_decoder_layers(original)
    model.language_model.gradient_checkpointing = args.activation_checkpointing
    model.train()  # dropout in the adapters; nothing else in the model behaves differently
    return model, lora, original


def load_base_on_rank(args: argparse.Namespace, kernels: kernel_registry.Kernels, world: Distributed):
    return load_base(args.model, args.dtype, world.device(args.device), args.vision_dir, kernels, args.quantize,
                     show_progress=world.is_main)


# ---------------------------------------------------------------------------------------------------------------------
# 3. The data


def read_records(args: argparse.Namespace) -> tuple[list[HarmfulRecord], list[NormalRecord], dict | None]:
    """The harmful and normal records this mode trains on, and (when categories were chosen) which were kept."""
    if args.data in DEFAULT_WORLD.data:
        records = DEFAULT_WORLD.unlearning_records(args.data, with_images=args.mode == "multimodal")
    else:
        records = read_unlearning_jsonl(args.data)
    harmful, normal = split_records(records)
    if args.mode == "multimodal":  # the baseline's data: image + text records only
        harmful, normal = [r for r in harmful if r.image], [r for r in normal if r.image]
    else:  # textual unlearning never shows the model an image
        harmful, normal = [r for r in harmful if not r.image], [r for r in normal if not r.image]
    harmful, coverage = select_categories(harmful, args)
    where = f"{args.data} (mode {args.mode})"
    if not harmful and args.mode == "multimodal":
        raise TrainError(f"{where}: no harmful record has an image, and the multimodal baseline trains on image+text "
                         f"records only; add VLGuard's (python -m ref.unlearning_data --vlguard VLGuard/train.json "
                         f"...) or train with --mode textual")
    if not harmful:
        raise TrainError(f"{where}: no harmful records to train on")
    if args.mode == "sft" and args.mismatch == "helpful" and not any(r.helpful_response for r in harmful):
        raise TrainError(f"{where}: no harmful record has a helpful_response for the sft baseline to learn")
    if args.eps[2] and not normal:
        raise TrainError(f"{where}: no normal records for the utility term (or pass --eps ... 0)")
    if args.mismatch == "random" and not normal:
        raise TrainError(f"{where}: --mismatch random needs normal records to draw answers from")
    return harmful, normal, coverage


def select_categories(harmful: list[HarmfulRecord], args) -> tuple[list[HarmfulRecord], dict | None]:
    """The harm-coverage ablation: keep the harmful records of some categories (--include-categories, then
    --exclude-categories, then a --category-fraction of what is left, drawn with --category-seed). A record is kept
    when one of its categories is; a record without categories is dropped once any choice is made. Returns the
    records and {"kept": [...], "dropped": [...]} (None when no choice was made)."""
    if not (args.include_categories or args.exclude_categories or args.category_fraction < 1.0):
        return harmful, None
    known = list(dict.fromkeys(c for r in harmful for c in r.categories))  # in order of first appearance
    asked = [*(args.include_categories or []), *(args.exclude_categories or [])]
    unknown = [c for c in asked if c not in known]
    if unknown:
        raise TrainError(f"{args.data}: no harmful record has the categories {unknown}; known: {known}")
    chosen = [c for c in known if c in args.include_categories] if args.include_categories else list(known)
    chosen = [c for c in chosen if c not in (args.exclude_categories or [])]
    if args.category_fraction < 1.0:
        count = max(1, round(args.category_fraction * len(chosen)))
        seed = args.seed if args.category_seed is None else args.category_seed
        picked = set(random.Random(seed).sample(chosen, count))
        chosen = [c for c in chosen if c in picked]
    kept = [r for r in harmful if set(r.categories) & set(chosen)]
    if not kept:
        raise TrainError(f"{args.data}: the chosen categories keep no harmful record")
    return kept, {"kept": chosen, "dropped": [c for c in known if c not in chosen], "records": len(kept)}


def read_data(args: argparse.Namespace) -> tuple[list[HarmfulRecord], list[NormalRecord], dict | None, BatchMaker]:
    """The records, which harm categories were kept (None: all), and what turns the records into batches; the
    tokenizer, every prompt's length and every image checked now."""
    processor = load_processor(args.model, args.vision_dir)  # its token ids checked against the model's vocabulary
    harmful, normal, coverage = read_records(args)
    maker = BatchMaker(processor, harmful, normal, prompt_format=args.prompt_format, mismatch=args.mismatch,
                       seed=args.seed, ascent=args.mode != "sft")
    for kind, records in (("harmful", harmful), ("normal", normal)):
        for number, record in enumerate(records, start=1):
            maker.check_fits(record, f"{args.data}: {kind} record {number}")
            if record.image:  # an unreadable image stops the run before training starts
                maker.image(record.image)
    return harmful, normal, coverage, maker


# ---------------------------------------------------------------------------------------------------------------------
# 4. The loop's parts: state, schedule, the guarded update, the stopping rule


def new_totals() -> dict:
    return {"tokens": 0, "image_tokens": 0, "flops": 0.0, "seconds": 0.0}


@dataclass
class LoopState:
    """Where the loop stands: what a checkpoint keeps besides the tensors, and what the summary reports."""

    step: int = 0  # optimizer steps done
    stop_at: int | None = None  # the step at which the stopping rule ends the run, once it has fired
    totals: dict = field(default_factory=new_totals)
    stopped_by: str | None = None
    # what the divergence guard compares with: the adapters' norm before training, the largest gradient norm so far
    reference_norms: dict | None = None

    def finish_step(self, terms: dict, norms: tuple[float, float], lr: float, counts: StepCounts, seconds: float,
                    device: torch.device) -> dict:
        """Count the step into the totals; return its log record."""
        for key, value in (("tokens", counts.tokens), ("image_tokens", counts.image_tokens),
                           ("flops", counts.flops), ("seconds", seconds)):
            self.totals[key] += value
        grad_norm, adapter_norm = norms
        record = {"step": self.step, **terms, "grad_norm": grad_norm, "adapter_norm": adapter_norm, "lr": lr,
                  "tokens": counts.tokens, "image_tokens": counts.image_tokens, "flops": counts.flops,
                  "seconds": seconds, **memory_use(device)}
        self.totals["peak_memory_mb"] = max(self.totals.get("peak_memory_mb", 0.0), record["peak_memory_mb"])
        if not terms:
            record["skipped"] = "no loss term: no record of this step's batches has a response for a weighted term"
        self.step += 1
        return record

    def checkpoint(self, streams: Streams) -> dict:
        return {"step": self.step, "stop_at": self.stop_at, "totals": self.totals, "stopped_by": self.stopped_by,
                "reference_norms": self.reference_norms, **streams.positions()}


def start_or_resume(args, out: Path, model, optimizer, streams: Streams, kernels, world: Distributed) -> LoopState:
    """A fresh state (args.json written), or the checkpoint's: adapter, optimizer, RNG states and data positions.
    Every rank reads the checkpoint; rank 0 alone writes."""
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        saved = load_checkpoint(out / CHECKPOINT_DIR, model, optimizer, world.rank, model.lm_head.weight.device)
        if saved.get("ranks", 1) != world.world_size:  # --batch-size is per rank: other ranks, another step batch
            raise TrainError(f"--resume {out}: the run trained on {saved.get('ranks', 1)} rank(s) and this is "
                             f"{world.world_size}; resume it with torchrun --nproc-per-node {saved.get('ranks', 1)} "
                             f"(or one process for 1)")
        streams.restore(saved)
        world.barrier()  # every rank has read the log's length before rank 0 cuts it
        if world.is_main:
            keep_log_before(out / LOG_FILE, saved["step"])  # steps after the checkpoint are run (and logged) again
        # a rule or a failure that ended the run still ends it; reaching --max-steps does not, once it has grown
        stopped_by = saved.get("stopped_by") if saved.get("stopped_by") != "max_steps" else None
        state = LoopState(saved["step"], saved["stop_at"], saved["totals"], stopped_by, saved.get("reference_norms"))
        if world.is_main:
            record_resume(args, out, state.step)
    else:
        if world.is_main:
            write_run_args(out, {**options_of(args), "provenance": run_provenance(args, world)})
        state = LoopState(reference_norms={"adapter": adapter_norm(model), "grad": None})
    if world.is_main:
        (out / KERNELS_FILE).write_text(kernels.table() + "\n")
    return state


def save_training_state(out: Path, model, optimizer, meta: dict, world: Distributed) -> None:
    """The checkpoint, written by rank 0 with every rank's RNG state (the adapters and AdamW's moments are the same on
    every rank: their gradients were averaged)."""
    own = rng_state(model.lm_head.weight.device)
    rng_states = world.all_gather_objects(own) if world.enabled else [own]
    tensors = training_tensors(model, optimizer)  # every rank: sharded tensors are gathered
    if world.is_main:
        save_checkpoint(out / CHECKPOINT_DIR, tensors, {**meta, "ranks": world.world_size}, rng_states)


def options_of(args: argparse.Namespace) -> dict:
    """What args.json keeps: the options, as resolved (model-dependent defaults filled in)."""
    return {name: getattr(args, name) for name in option_defaults() if name not in NOT_RECORDED}


def run_provenance(args: argparse.Namespace, world: Distributed = Distributed()) -> dict:
    """Date, commit, versions, device (and ranks), and the sha256 of the data file and the model's config."""
    data = None if args.data in DEFAULT_WORLD.data else args.data  # the toy's records are code: the commit names them
    device = args.device if not world.enabled else f"{args.device} x {world.world_size} ranks"
    return provenance({"data": data, "model_config": Path(args.model) / "config.json"}, device=device)


def write_run_args(out: Path, record: dict) -> None:
    write_atomically(out / ARGS_FILE, lambda p: p.write_text(json.dumps(record, indent=1)))


def record_resume(args: argparse.Namespace, out: Path, step: int) -> None:
    """A resume with changed options: args.json takes the new values and keeps the history, the log an event line,
    stderr one line (what the schedule now does)."""
    if not args.changes:
        return
    saved = read_run_args(out)
    resumes = saved.get("resumed", []) + [{"step": step, "changed": args.changes, "provenance": run_provenance(args)}]
    write_run_args(out, {**options_of(args), "provenance": saved.get("provenance"), "resumed": resumes})
    event = {"event": "resume", "step": step, "changed": args.changes}
    if "max_steps" in args.changes and args.schedule != "constant":
        event["schedule"] = f"the {args.schedule} learning-rate schedule now reaches 0 at step {args.max_steps}"
    with open(out / LOG_FILE, "a") as log:
        log.write(json.dumps(event) + "\n")
    changed = ", ".join(f"{name} {before} -> {now}" for name, (before, now) in args.changes.items())
    print(f"resuming at step {step} with {changed}" + (f"; {event['schedule']}" if "schedule" in event else ""),
          file=sys.stderr)


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


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, args) -> float:
    lr = learning_rate(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def adapter_norm(model) -> float:
    """||theta||_2 over every trainable tensor (the adapters; sharded ones summed over their shards). The squares are
    summed on the device and read once: one synchronisation per step, not one per tensor (448 on a 7B decoder)."""
    squares = [full_tensor(p.detach().float().pow(2).sum()) for p in model.parameters() if p.requires_grad]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


def guarded_update(model, optimizer, trainable: list[torch.Tensor], terms: dict, args, last_good: dict,
                   state: LoopState) -> tuple[tuple[float, float], str | None]:
    """Clip the gradient, then AdamW on the adapters; returns (gradient norm before clipping, adapter norm) and why
    the run must stop, if it must. A non-finite loss or gradient, or a gradient norm over --divergence-factor times the
    largest of the steps before, skips the update; non-finite adapter weights, or an adapter norm over
    --divergence-factor times the untrained adapters', are put back to the last good ones. Either ends the run with the last good adapter."""
    if not terms:
        return (0.0, adapter_norm(model)), None  # nothing to learn from this step's batches: no update (logged)
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(trainable, args.clip if args.clip > 0
                                                                  else float("inf"))))
    step, factor, reference = state.step, args.divergence_factor, state.reference_norms
    if not (math.isfinite(terms["total"]) and math.isfinite(grad_norm)):
        return (grad_norm, adapter_norm(model)), f"non-finite loss or gradient at step {step}"
    if factor > 0 and reference["grad"] and grad_norm > factor * reference["grad"]:
        return (grad_norm, adapter_norm(model)), (f"diverging: gradient norm {grad_norm:.3g} at step {step} is over "
                                                  f"{factor:g}x the largest before it, {reference['grad']:.3g} "
                                                  f"(--divergence-factor)")
    # the largest gradient norm so far, not the first: a first step can have almost none (a memorised harmful
    # answer, a KL of exactly 0), and gradients then grow over many steps without diverging
    reference["grad"] = max(reference["grad"] or 0.0, grad_norm)
    optimizer.step()
    norm = adapter_norm(model)
    failure = None
    if not math.isfinite(norm):
        failure = f"non-finite adapter weights after step {step} (restored the previous step's)"
    elif factor > 0 and norm > factor * reference["adapter"]:
        failure = (f"diverging: adapter norm {norm:.3g} after step {step} is over {factor:g}x the untrained "
                   f"adapters' {reference['adapter']:.3g} (--divergence-factor; restored the previous step's)")
    if failure:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in last_good:
                    p.copy_(last_good[name])
    return (grad_norm, norm), failure


def stopping_rule(state: LoopState, harm_nll: float | None, args) -> str | None:
    """Yao et al.: once the harmful NLL exceeds --stop-harm-nll, run --extra-batches more steps, then stop."""
    rule_on = args.stop_harm_nll is not None and args.stop_harm_nll >= 0
    if rule_on and state.stop_at is None and harm_nll is not None and harm_nll > args.stop_harm_nll:
        state.stop_at = state.step + args.extra_batches
    if state.stop_at is not None and state.step >= state.stop_at:
        return f"harmful NLL above {args.stop_harm_nll} (+{args.extra_batches} batches)"
    return None


def progress_info(record: dict) -> str:
    if "total" not in record:
        return f"skipped  lr {record['lr']:.2e}"
    terms = "  ".join(f"{k} {record[k]:.4f}" for k in ("harm_nll", "helpful_nll", "utility_kl") if k in record)
    return f"loss {record['total']:+.4f}  {terms}  lr {record['lr']:.2e}"


def announce(args, harmful, normal, model, trainable, kernels, state: LoopState, world: Distributed) -> None:
    print(f"textual unlearning: mode {args.mode}, model {args.model}, data {args.data}", file=sys.stderr)
    if world.enabled or args.grad_accum > 1:
        print(f"  each step: {args.batch_size} records x {world.world_size} ranks x {args.grad_accum} accumulated "
              f"batches of each kind = {args.batch_size * world.world_size * args.grad_accum}", file=sys.stderr)
    if not args.resume:
        toy_model = world_of(args.model) is not None
        taken = [f"--{name.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                 for name in REAL_MODEL_DEFAULTS if name not in args.given for v in [getattr(args, name)]]
        if taken:
            whose = "the toy's" if toy_model else "a real model's (Yao et al.'s eps and stopping rule; README)"
            print(f"  defaults, {whose}: {', '.join(taken)}", file=sys.stderr)
    n_trainable = sum(p.numel() for p in trainable)  # a sharded parameter's numel is the whole tensor's
    what = ("decoder-layer parameters (full-parameter training)" if args.full_parameter else
            f"adapter parameters in {len(lora_modules(model))} LoRA linears (r={args.lora_r}, base {args.quantize})")
    print(f"  {len(harmful)} harmful and {len(normal)} normal records; eps = {args.eps}; {n_trainable:,} trainable "
          f"{what}; steps {state.step}..{args.max_steps}; {args.parallel if world.enabled else 'one process'}",
          file=sys.stderr)
    print("  kernels:\n" + kernels.table(), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# 5. The outputs


def save_outputs(model, lora: LoraConfig | None, args, out: Path, world: Distributed) -> None:
    """The adapter (peft's format), or after full-parameter training the whole model as a llava-hf checkpoint in
    model/. Every rank calls this: sharded weights are gathered, rank 0 writes."""
    if lora is not None:
        save_adapter(model, out / ADAPTER_DIR, lora, args.model, write=world.is_main)
        return
    state = full_state_dict(model, keep=world.is_main)
    if world.is_main:
        shutil.rmtree(out / MODEL_DIR, ignore_errors=True)  # this run's own output, from before a resume
        with new_folder(out / MODEL_DIR) as partial:
            save_model(model, partial, state=state)
            copy_side_files(args.model, partial)


def write_summary(args, out: Path, state: LoopState, device: torch.device, kernels, world: Distributed,
                  coverage: dict | None = None) -> dict:
    totals = state.totals
    summary = {"mode": args.mode, "steps": state.step, "stopped_by": state.stopped_by or "max_steps",
               "tokens": totals["tokens"], "image_tokens": totals["image_tokens"], "estimated_flops": totals["flops"],
               "wall_seconds": totals["seconds"],
               "peak_memory_mb": max(totals.get("peak_memory_mb", 0.0), memory_use(device)["peak_memory_mb"]),
               **({"model": str(out / MODEL_DIR)} if args.full_parameter else {"adapter": str(out / ADAPTER_DIR)}),
               "kernels": kernels.choice, "ranks": world.world_size,
               **({"categories": coverage} if coverage else {}),
               "provenance": run_provenance(args, world)}
    if world.is_main:
        write_atomically(out / SUMMARY_FILE, lambda p: p.write_text(json.dumps(summary, indent=1)))
        print(f"done: {state.step} steps ({summary['stopped_by']}), {totals['tokens']:,} tokens, "
              f"{totals['flops']:.3g} FLOPs, {totals['seconds']:.1f} s; "
              f"{'model' if args.full_parameter else 'adapter'} in {summary.get('model', summary.get('adapter'))}",
              file=sys.stderr)
    world.barrier()  # the files are written before any rank returns
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_user_error("train.py", args.debug):
        try:
            result = train(args)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop: stop now, no traceback
            print(f"train.py: stopped at once; python train.py --resume --out {args.out} continues from the last "
                  f"checkpoint, if one was written", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None
        finally:
            close_process_group()
    if "interrupted_at" in result:  # a signal: the checkpoint is written; the exit status says the run is not done
        raise SystemExit(128 + (result["signal"] or 0))


if __name__ == "__main__":
    main()
