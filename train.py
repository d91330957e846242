"""Textual unlearning of a LLaVA model (Chakraborty et al. 2024, "Cross-Modal Safety Alignment: Is textual unlearning
all you need?"): QLoRA on the decoder, text-only data, three losses.

    python train.py                                          # the embedded toy (see README)
    python train.py --model DIR --data FILE --out DIR        # a real LLaVA-1.5 folder and an unlearning JSONL

`train()` is the algorithm in one screen; its parts follow it in this file, in its order:
  1. the run folder: a new run, or the one in --out resumed (options: harness/train_options.py; the folder, its
     checkpoints and outputs: harness/train_run.py)
  2. the model: 4-bit NF4 decoder linears + LoRA adapters; vision tower and projector frozen (and, in textual mode,
     never run)
  3. the data: harmful records (prompt, harmful response, helpful response) and normal records (prompt, response),
     drawn as seeded streams of batches (ref/batches.py)
  4. the loop: L_total = -eps1 * L_harm + eps2 * L_helpful + eps3 * L_utility (ref/losses.py; --harm-loss npo puts
     the bounded NPO loss in place of the ascent) over --grad-accum batches, clipping, AdamW on the adapters, a NaN
     and divergence guard, Yao et al.'s stopping rule, checkpoints for an exact --resume (Ctrl-C or SIGTERM: a
     checkpoint at the end of the step, then exit)
  5. the outputs: the adapter, a JSON line per step (log.jsonl) and a summary (summary.json)

Modes: `textual` (the paper's method), `multimodal` (the same losses on image+text records: the vision tower and
projector run every step, frozen) and `sft` (the supervised baseline: NLL on the helpful responses, optional utility).
"""

from __future__ import annotations

from harness.console import exit_quietly_on_interrupt  # the standard library only: the imports below take seconds

with exit_quietly_on_interrupt("train.py"):  # a Ctrl-C during them: one line, exit status 130
    import math
    import os
    import random
    import signal
    import sys
    import time

    import torch

    from ref import kernels as kernel_registry
    from ref.batches import BatchMaker, Streams
    from ref.config import load_config
    from ref.data import load_processor
    from ref.distributed import Distributed, close_process_group, full_tensor, shard_decoder_layers
    from ref.lora import LoraConfig, add_lora, adapters_disabled
    from ref.losses import (LossWeights, StepCounts, add_token_sums, step_shares, step_terms, tokens_in_step,
                            unlearning_backward)
    from ref.unlearning_data import HarmfulRecord, NormalRecord, split_records
    from ref.weights import expected_shapes
    from harness.console import exit_on_user_error
    from harness.memory import start_step_memory
    from harness.models import load_base
    from harness.runs import trainable_tensors
    from harness.signals import StopRequest
    from harness.train_console import announce, progress_info, say_stopped, step_progress
    from harness.train_options import RunStart, TrainOptions, Worlds, parse_command_line, resolve_command_line
    from harness.train_run import LoopState, RunFolder
    from harness.unlearning_data import read_unlearning_jsonl
    from worlds.embedded import DEFAULT_WORLD, world_of

WORLDS = Worlds(default=DEFAULT_WORLD, of=world_of)  # what the options learn of the embedded worlds


class TrainError(ValueError):
    """Data or a kernel override that train.py cannot run with; found before the model loads."""


# ---------------------------------------------------------------------------------------------------------------------
# The algorithm


def train(options: TrainOptions, start: RunStart, stop: StopRequest | None = None) -> dict:
    """Run 1-5 of the module docstring; returns the summary (or {"interrupted_at": step} after a stop request).
    Under torchrun every rank runs this function; rank 0 alone writes files and prints."""
    # 1. the run folder: a run stopped before its first checkpoint starts again; a finished one has nothing to do
    world = Distributed.from_environment(options.device)
    folder = RunFolder(options, world, data_file=None if options.data in DEFAULT_WORLD.data else options.data)
    folder.hold()  # one train.py process at a time in a run folder
    if start.restart:
        folder.restart()
    if (finished := folder.finished(start)) is not None:
        return finished
    kernels = set_up_torch(options)
    # 3 before 2: every input is read and checked before the (slow) model load
    harmful, normal, coverage, maker = read_data(options)
    # the sha256 of the data, image and model files: a resumed run's must be those it began with
    folder.check_inputs(start, images=sorted({r.image for r in (*harmful, *normal) if r.image}))
    # 2. the model, the optimizer over the adapters, the loss weights, the record streams; a resume puts back all four
    model, lora, original = build_model(options, kernels, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    eps1, eps2, eps3 = options.eps
    weights = LossWeights(harm=0.0 if options.mode == "sft" else eps1, helpful=eps2, utility=eps3,
                          harm_loss=options.harm_loss, npo_beta=options.npo_beta)
    streams = Streams(len(harmful), len(normal), options.batch_size, options.seed, world.world_size,
                      options.grad_accum)
    state = (folder.resume(start.changes, model, optimizer, streams) if start.resume
             else folder.begin(adapter_norm(model)))
    folder.write_kernel_table(kernels)
    announce(options, start, world, (len(harmful), len(normal)), model, state.step, kernels.table())

    # 4. the loop
    stop = stop or StopRequest()
    device = model.lm_head.weight.device
    progress = step_progress(options, state.step, world)
    last_good = trainable_tensors(model)
    with folder.step_log() as log_step, stop.on_signals():
        while state.step < options.max_steps and not state.stopped_by:
            started = time.perf_counter()
            start_step_memory(device)
            lr = set_learning_rate(optimizer, state.step, options)
            optimizer.zero_grad(set_to_none=True)
            # this rank's share of the step: --grad-accum micro-batches, each a (batch_size, T) batch per term, on
            # the CPU until its turn (the step's token counts come first; one micro-batch at a time on the device)
            micro_batches = [maker.term_batches(harm, normal, state.step, position)
                             for harm, normal, position in streams.next_step(world.rank)]
            step_tokens = tokens_in_step(micro_batches, world.sum_floats, weights.terms)
            sums, counts = {}, StepCounts()
            for batches in micro_batches:
                batches = batches.to(device)
                # L_total = -eps1 * L_harm + eps2 * L_helpful + eps3 * L_utility, each term the mean over all its
                # response tokens in the step (--harm-loss npo: +eps1 * L_NPO, a mean over harmful sequences): this
                # batch's mean counts with its share of them. The gradient is accumulated one term at a time, so
                # only one term's graph is alive                                               (ref/losses.py)
                means = unlearning_backward(model, batches.harmful, batches.helpful, batches.normal, weights,
                                            kernels, lambda: adapters_disabled(model),
                                            step_shares(batches, step_tokens, world.world_size), original)
                add_token_sums(sums, means, batches)
                counts.add(model, batches, harm_reference_pass=weights.harm_loss == "npo")
            world.average_gradients(trainable)  # what DDP does; the shares' factor of ranks undoes its mean
            terms = step_terms(sums, step_tokens, weights, world.sum_floats)
            counts = counts.over_ranks(world.sum_floats)
            norms, failure = guarded_update(model, optimizer, trainable, terms, options, last_good, state)
            if failure:
                state.stopped_by = failure
                break
            last_good = trainable_tensors(model)
            record = state.finish_step(terms, norms, lr, counts, time.perf_counter() - started, device)
            log_step(record)
            progress.update(1, progress_info(record))
            state.stopped_by = stopping_rule(state, terms.get("harm_nll"), options)
            if state.stopped_by:
                break
            if options.save_adapter_every and state.step % options.save_adapter_every == 0 and lora:
                folder.save_step_adapter(model, lora, state.step)
            # a signal reaches the ranks at different moments: they stop together, after the step any of them saw it
            interrupted = world.any(stop.requested(state.step)) and state.step < options.max_steps
            if state.step % options.save_every == 0 or interrupted:
                folder.save_checkpoint(model, optimizer, state.checkpoint(streams))
            if interrupted:
                progress.close()
                say_stopped(state.step, stop.reason(), folder.path, world)
                return {"interrupted_at": state.step, "signal": stop.signal_number}
    progress.close()

    # 5. the outputs
    state.stopped_by = state.stopped_by or "max_steps"
    folder.save_checkpoint(model, optimizer, state.checkpoint(streams))
    folder.save_outputs(model, lora, state.step)
    return folder.write_summary(state, device, kernels, coverage)


# ---------------------------------------------------------------------------------------------------------------------
# 1. The command line and torch


def read_command_line(argv: list[str] | None = None) -> tuple[TrainOptions, RunStart]:
    """The options of `python train.py ARGV` and how its run starts, read as `main` reads them (for scripts)."""
    return resolve_command_line(parse_command_line(argv, WORLDS), WORLDS)


def set_up_torch(options: TrainOptions) -> kernel_registry.Kernels:
    """Threads and seeds, then the kernel table every op of the model and the losses is called through."""
    threads = options.threads or (world.threads if (world := world_of(options.model)) else None)
    if threads:
        torch.set_num_threads(threads)
    if options.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this before its first call (nothing ran yet)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    return kernel_registry.resolve(options.kernels, kernel_overrides(options.kernel))


def kernel_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        op, sep, impl = pair.partition("=")
        if not sep:
            raise TrainError(f"--kernel expects OP=IMPL, got {pair!r}")
        overrides[op] = impl
    return overrides


# ---------------------------------------------------------------------------------------------------------------------
# 2. The model


def build_model(options: TrainOptions, kernels: kernel_registry.Kernels, world: Distributed):
    """The LLaVA checkpoint with its decoder linears in 4-bit and LoRA adapters on them; only the adapters train.
    With --full-parameter the decoder layers themselves train (a dense base), and a frozen copy of the model is the
    original the KL term compares with. Under torchrun with --parallel fsdp the decoder layers are sharded across
    the ranks; under ddp every rank holds the whole model and the gradients are averaged after each step.
    Returns (model, the LoRA settings or None, the frozen original or None)."""
    if not options.full_parameter:
        check_lora_rank(options)
    model = load_base_on_rank(options, kernels, world)
    lora, original = None, None
    if options.full_parameter:
        original = load_base_on_rank(options, kernels, world).eval().requires_grad_(False)
        model.requires_grad_(False)
        model.language_model.layers.requires_grad_(True)  # embeddings, lm_head, final norm, tower, projector frozen
    else:
        lora = LoraConfig(r=options.lora_r, alpha=options.lora_alpha, dropout=options.lora_dropout,
                          targets=tuple(options.lora_targets))
        add_lora(model, lora)  # freezes every base parameter: tower, projector, embeddings, lm_head, 4-bit linears
    if world.enabled and options.parallel == "fsdp":
        shard_decoder_layers(model)
        if original is not None:
            shard_decoder_layers(original)
    model.language_model.gradient_checkpointing = options.activation_checkpointing
    model.train()  # dropout in the adapters; nothing else in the model behaves differently
    return model, lora, original


def check_lora_rank(options: TrainOptions) -> None:
    """--lora-r against the target linears, from config.json before the model loads: B A has rank at most a linear's
    smaller side, so a larger r adds memory (r x (in + out) per linear: a bomb for a large r) and nothing else."""
    shapes = expected_shapes(load_config(options.model, options.vision_dir))  # built on the meta device: no memory
    sides = {name.split(".")[-2]: min(shape) for name, shape in shapes.items()
             if name.startswith("language_model.layers.") and name.split(".")[-2] in options.lora_targets
             and name.endswith(".weight") and len(shape) == 2}
    if sides and options.lora_r > min(sides.values()):
        target, side = min(sides.items(), key=lambda item: item[1])
        raise TrainError(f"--lora-r {options.lora_r} is more than {side}, the smaller side of the {target} linears "
                         f"of {options.model}: an adapter's update B A has rank at most that; use --lora-r {side} "
                         f"or less")


def load_base_on_rank(options: TrainOptions, kernels: kernel_registry.Kernels, world: Distributed):
    return load_base(options.model, options.dtype, world.device(options.device), options.vision_dir, kernels,
                     options.quantize, show_progress=world.is_main)


# ---------------------------------------------------------------------------------------------------------------------
# 3. The data


def read_data(options: TrainOptions) -> tuple[list[HarmfulRecord], list[NormalRecord], dict | None, BatchMaker]:
    """The records, which harm categories were kept (None: all), and what turns the records into batches; the
    tokenizer, every prompt's length and every image checked now."""
    processor = load_processor(options.model, options.vision_dir)  # its token ids checked against the vocabulary
    harmful, normal, coverage = read_records(options)
    maker = BatchMaker(processor, harmful, normal, prompt_format=options.prompt_format, mismatch=options.mismatch,
                       seed=options.seed, ascent=options.mode != "sft")
    for kind, records in (("harmful", harmful), ("normal", normal)):
        for number, record in enumerate(records, start=1):
            maker.check_fits(record, f"{options.data}: {kind} record {number}")
            if record.image:  # an unreadable image stops the run before training starts
                maker.image(record.image)
    return harmful, normal, coverage, maker


def read_records(options: TrainOptions) -> tuple[list[HarmfulRecord], list[NormalRecord], dict | None]:
    """The harmful and normal records this mode trains on, and (when categories were chosen) which were kept."""
    if options.data in DEFAULT_WORLD.data:
        records = DEFAULT_WORLD.unlearning_records(options.data, with_images=options.mode == "multimodal")
    else:
        records = read_unlearning_jsonl(options.data)
    harmful, normal = split_records(records)
    if options.mode == "multimodal":  # the baseline's data: image + text records only
        harmful, normal = [r for r in harmful if r.image], [r for r in normal if r.image]
    else:  # textual unlearning never shows the model an image
        harmful, normal = [r for r in harmful if not r.image], [r for r in normal if not r.image]
    harmful, coverage = select_categories(harmful, options)
    where = f"{options.data} (mode {options.mode})"
    if not harmful and options.mode == "multimodal":
        raise TrainError(f"{where}: no harmful record has an image, and the multimodal baseline trains on image+text "
                         f"records only; add VLGuard's (python -m ref.unlearning_data --vlguard VLGuard/train.json "
                         f"...) or train with --mode textual")
    if not harmful:
        raise TrainError(f"{where}: no harmful records to train on")
    if options.mode == "sft" and options.mismatch == "helpful" and not any(r.helpful_response for r in harmful):
        raise TrainError(f"{where}: no harmful record has a helpful_response for the sft baseline to learn")
    if options.eps[2] and not normal:
        raise TrainError(f"{where}: no normal records for the utility term (or pass --eps ... 0)")
    if options.mismatch == "random" and not normal:
        raise TrainError(f"{where}: --mismatch random needs normal records to draw answers from")
    return harmful, normal, coverage


def select_categories(harmful: list[HarmfulRecord], options: TrainOptions
                      ) -> tuple[list[HarmfulRecord], dict | None]:
    """The harm-coverage ablation: keep the harmful records of some categories (--include-categories, then
    --exclude-categories, then a --category-fraction of what is left, drawn with --category-seed). A record is kept
    when one of its categories is; a record without categories is dropped once any choice is made. Returns the
    records and {"kept": [...], "dropped": [...], "records": n} (None when no choice was made)."""
    include, exclude = options.include_categories, options.exclude_categories or []
    if not (include or exclude or options.category_fraction < 1.0):
        return harmful, None
    known = list(dict.fromkeys(c for r in harmful for c in r.categories))  # in order of first appearance
    unknown = [c for c in [*(include or []), *exclude] if c not in known]
    if unknown:
        raise TrainError(f"{options.data}: no harmful record has the categories {unknown}; known: {known}")
    chosen = [c for c in known if c in include] if include else list(known)
    chosen = [c for c in chosen if c not in exclude]
    if options.category_fraction < 1.0:
        count = max(1, round(options.category_fraction * len(chosen)))
        seed = options.seed if options.category_seed is None else options.category_seed
        picked = set(random.Random(seed).sample(chosen, count))
        chosen = [c for c in chosen if c in picked]
    kept = [r for r in harmful if set(r.categories) & set(chosen)]
    if not kept:
        raise TrainError(f"{options.data}: the chosen categories keep no harmful record")
    return kept, {"kept": chosen, "dropped": [c for c in known if c not in chosen], "records": len(kept)}


# ---------------------------------------------------------------------------------------------------------------------
# 4. The loop's parts: the schedule, the guarded update, the stopping rule


def learning_rate(step: int, options: TrainOptions) -> float:
    """Linear warm-up over `warmup` steps, then constant, linear decay to 0, or cosine decay to 0 at max_steps."""
    if step < options.warmup:
        return options.lr * (step + 1) / options.warmup
    progress = (step - options.warmup) / max(1, options.max_steps - options.warmup)
    if options.schedule == "linear":
        return options.lr * (1.0 - progress)
    if options.schedule == "cosine":
        return options.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return options.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, options: TrainOptions) -> float:
    lr = learning_rate(step, options)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def adapter_norm(model) -> float:
    """||theta||_2 over every trainable tensor (the adapters; sharded ones summed over their shards). The squares are
    summed on the device and read once: one synchronisation per step, not one per tensor (448 on a 7B decoder)."""
    squares = [full_tensor(p.detach().float().pow(2).sum()) for p in model.parameters() if p.requires_grad]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


def guarded_update(model, optimizer, trainable: list[torch.Tensor], terms: dict, options: TrainOptions,
                   last_good: dict, state: LoopState) -> tuple[tuple[float, float], str | None]:
    """Clip the gradient, then AdamW on the adapters; returns (gradient norm before clipping, adapter norm) and why
    the run must stop, if it must. A non-finite loss or gradient, or a gradient norm over --divergence-factor times the
    largest of the steps before, skips the update; non-finite adapter weights, or an adapter norm over
    --divergence-factor times the untrained adapters', are put back to the last good ones. Either ends the run with
    the last good adapter."""
    if not terms:
        return (0.0, adapter_norm(model)), None  # nothing to learn from this step's batches: no update (logged)
    max_norm = options.clip if options.clip > 0 else float("inf")
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(trainable, max_norm)))
    step, factor, reference = state.step, options.divergence_factor, state.reference_norms
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


def stopping_rule(state: LoopState, harm_nll: float | None, options: TrainOptions) -> str | None:
    """Yao et al.: once the harmful NLL exceeds --stop-harm-nll, run --extra-batches more steps, then stop."""
    threshold = options.stop_harm_nll
    rule_on = threshold is not None and threshold >= 0
    if rule_on and state.stop_at is None and harm_nll is not None and harm_nll > threshold:
        state.stop_at = state.step + options.extra_batches
    if state.stop_at is not None and state.step >= state.stop_at:
        return f"harmful NLL above {threshold} (+{options.extra_batches} batches)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The program


def main(argv: list[str] | None = None) -> None:
    with exit_quietly_on_interrupt("train.py"):  # a Ctrl-C while the command line is read
        command = parse_command_line(argv, WORLDS)  # a bad option: argparse's one line, exit status 2
    with exit_on_user_error("train.py", command.debug):
        try:
            result = train(*resolve_command_line(command, WORLDS))
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop: stop now, no traceback
            print(f"train.py: stopped at once; python train.py --resume --out {command.out} continues from the last "
                  f"checkpoint, if one was written", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None
        finally:
            close_process_group()
    if "interrupted_at" in result:  # a signal: the checkpoint is written; the exit status says the run is not done
        raise SystemExit(128 + (result["signal"] or 0))


if __name__ == "__main__":
    main()
