"""What train.py prints on stderr while it trains (rank 0 only): what the run is, a progress line per step, why it
stopped. Its results are files (harness/train_run.py); stdout stays empty.

    textual unlearning: mode textual, model assets/toy_llava, data toy                     `announce`
    step 40/300  3.1 steps/s  ETA 1m24s  loss -2.4153  harm_nll 6.0121 ...  lr 3.00e-04    `step_progress`
    stopped after step 41 (SIGINT); continue with: python train.py --resume --out runs/textual    `say_stopped`
"""

from __future__ import annotations

import os
import sys

from ref.distributed import Distributed
from ref.lora import lora_modules
from harness.console import Progress
from harness.train_options import RunStart, TrainOptions


def announce(options: TrainOptions, start: RunStart, world: Distributed, records: tuple[int, int], model,
             first_step: int, kernel_table: str) -> None:
    """The run in a few lines: mode, model and data; how a step is made up; the defaults the model chose; the
    records, the trainable parameters and the steps; the kernels."""
    if not world.is_main:
        return
    print(f"textual unlearning: mode {options.mode}, model {options.model}, data {options.data}", file=sys.stderr)
    if world.enabled or options.grad_accum > 1:
        print(f"  each step: {options.batch_size} records x {world.world_size} ranks x {options.grad_accum} "
              f"accumulated batches of each kind = {options.batch_size * world.world_size * options.grad_accum}",
              file=sys.stderr)
    taken = [f"--{name.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
             for name in start.defaults_taken for v in [getattr(options, name)]]
    if taken:
        whose = (f"the {start.defaults_of}'s" if start.defaults_of
                 else "a real model's (Yao et al.'s eps and stopping rule; README)")
        print(f"  defaults, {whose}: {', '.join(taken)}", file=sys.stderr)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # a sharded one's: the whole tensor's
    what = ("decoder-layer parameters (full-parameter training)" if options.full_parameter else
            f"adapter parameters in {len(lora_modules(model))} LoRA linears (r={options.lora_r}, base "
            f"{options.quantize})")
    harmful, normal = records
    harm = f" (harm term: npo, beta {options.npo_beta:g})" if options.harm_loss == "npo" else ""
    print(f"  {harmful} harmful and {normal} normal records; eps = {options.eps}{harm}; {n_trainable:,} trainable "
          f"{what}; steps {first_step}..{options.max_steps}; {options.parallel if world.enabled else 'one process'}",
          file=sys.stderr)
    print("  kernels:\n" + kernel_table, file=sys.stderr)


def step_progress(options: TrainOptions, first_step: int, world: Distributed) -> Progress:
    """The progress line of the steps (the other ranks' goes nowhere)."""
    return Progress("step", options.max_steps, "steps", every=options.log_every, done=first_step,
                    stream=None if world.is_main else open(os.devnull, "w"))


def progress_info(record: dict) -> str:
    """A step's loss terms and learning rate, from its log record."""
    if "total" not in record:
        return f"skipped  lr {record['lr']:.2e}"
    terms = "  ".join(f"{k} {record[k]:.4f}" for k in ("harm_nll", "harm_npo", "helpful_nll", "utility_kl")
                      if k in record)
    return f"loss {record['total']:+.4f}  {terms}  lr {record['lr']:.2e}"


def say_stopped(step: int, reason: str, out, world: Distributed) -> None:
    if world.is_main:
        print(f"stopped after step {step} ({reason}); continue with: python train.py --resume --out {out}",
              file=sys.stderr)
