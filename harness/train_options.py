"""train.py's options: one typed record of them (`TrainOptions`), and how the command line fills it.

    command = parse_command_line(argv, worlds)           # argparse: a bad option is its one line and exit status 2
    options, start = resolve_command_line(command, worlds)  # against --out and the model; nothing written yet

`TrainOptions` is what decides what a run computes and writes, and exactly what its args.json keeps (a resumed run
takes it from there). What the command line says besides, `--resume` and `--debug`, and which options it named, stays
on `CommandLine`; how the run starts (anew, again in place, or resumed with some options changed) is `RunStart`.

Some defaults depend on the model: an embedded world's model gets the options chosen on its validation suites
(worlds/toy/defaults.py), any other model Yao et al.'s (`REAL_MODEL_DEFAULTS`). The harness imports no world: the
program hands in what worlds.embedded says (`Worlds`).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol

import torch

from ref import kernels as kernel_registry
from ref.data import PROMPT_FORMATS
from ref.losses import HARM_LOSSES
from ref.lora import LoraConfig
from harness.console import (HelpFormatter, add_debug_option, finite_float, fraction, int_in, non_negative_float,
                             positive_float, probability)
from harness.devices import check_device, default_train_dtype
from harness.files import check_run_folder
from harness.runs import ARGS_FILE, CHECKPOINT_DIR, CHECKPOINT_FILE, RunError, read_train_args

DESCRIPTION = ("Textual unlearning of a LLaVA model (Chakraborty et al. 2024, \"Cross-Modal Safety Alignment: Is "
               "textual unlearning\nall you need?\"): QLoRA on the decoder, text-only data, three losses.")
RUNS = Path(__file__).resolve().parent.parent / "runs"  # --out's default: runs/<mode> in this checkout
TRAIN_DTYPES = ["bfloat16", "float32"]
# The ranges of the integer options: what the code downstream takes, refused by argparse before anything runs.
SEED_MAX = 2**63 - 1         # a signed 64-bit seed, as the tools' (worlds.toy.build): torch.manual_seed takes it
STEPS_MAX = 10**9            # step counts: a billion steps is centuries of training
STEP_RECORDS_MAX = 65536     # records of each kind one rank tokenizes for a step: --batch-size x --grad-accum
LORA_R_MAX = 65536           # an adapter's rank (and at most the target linears' smaller side: train.py checks it)
THREADS_MAX = 1024           # CPU threads torch starts


class OptionError(ValueError):
    """Options that cannot run together, or a resume that would change what its run computes; found before the data
    is read or the model loads."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """The options of one training run, in the command line's order (args.json keeps them so). The defaults are the
    command line's; for the options the model decides (`MODEL_DEPENDENT`) they are a real model's."""

    # inputs and outputs
    model: str                           # LLaVA model folder, llava-hf layout (the command line's default: the toy)
    vision_dir: str | None = None        # CLIP folder, for an original-format LLaVA checkpoint
    data: str = "toy"                    # unlearning JSONL (ref/unlearning_data.py), or an embedded world's records
    out: str                             # the run folder (the command line's default: runs/<mode>)
    prompt_format: str = "llava-hf"      # chat template: llava-hf, vicuna_v1 or chatml (ref.data.PROMPT_FORMATS)
    # the method: L_total = -eps1 * L_harm + eps2 * L_helpful + eps3 * L_utility (ref/losses.py)
    mode: str = "textual"                # textual (the paper's), multimodal (image+text records) or sft (no ascent)
    eps: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.0])  # eps1 eps2 eps3; sft ignores eps1
    include_categories: list[str] | None = None  # train on the harmful records of these harm categories only
    exclude_categories: list[str] | None = None  # drop the harmful records of these categories
    category_fraction: float = 1.0       # keep this fraction of the remaining categories, drawn with category_seed
    category_seed: int | None = None     # None: seed
    mismatch: str = "helpful"            # L_helpful's response: the record's helpful one, or a random normal answer
    harm_loss: str = "ascent"            # the harm term: ascent on L_harm (the paper's), or NPO (ref/losses.py)
    npo_beta: float = 0.1                # NPO's beta (Zhang et al.'s default); only with harm_loss npo
    # the model and its adapters
    quantize: str = "nf4"                # the decoder linears' base: nf4, fp4 or none (dense)
    dtype: str = "float32"               # compute dtype (the command line's default: by device and model)
    device: str = field(default_factory=default_device)  # torch device; under torchrun, cuda is each rank's GPU
    lora_r: int = 8                      # LoRA rank
    lora_alpha: float = 16.0             # the update is alpha/r B A x
    lora_dropout: float = 0.0            # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: list(LoraConfig().targets))  # linears given adapters
    activation_checkpointing: bool = False  # recompute the decoder layers in backward
    full_parameter: bool = False         # train the decoder layers themselves (a dense base), no LoRA
    parallel: str = "ddp"                # under torchrun: ddp, or fsdp (a dense base's default)
    kernels: str = "fast"                # kernel preset (ref/kernels/registry.py)
    deterministic: bool = False          # deterministic algorithms only: a resume repeats a run bit for bit on a GPU
    kernel: list[str] = field(default_factory=list)  # OP=IMPL overrides of the preset
    # optimisation
    lr: float = 2e-4                     # peak learning rate (QLoRA's for a 7B decoder)
    weight_decay: float = 0.0            # AdamW's decoupled weight decay
    batch_size: int = 2                  # records per batch, for each of the three terms, on each rank
    grad_accum: int = 1                  # batches per optimizer step
    max_steps: int = 1000                # optimizer steps
    warmup: int = 0                      # linear warm-up steps
    schedule: str = "constant"           # after warm-up: constant, or linear or cosine decay to 0 at max_steps
    clip: float = 1.0                    # gradient norm clipping (0: off)
    divergence_factor: float = 100.0     # the divergence guard's factor (0: off; train.py's guarded_update)
    seed: int = 0                        # the data order, the adapters' init and dropout
    stop_harm_nll: float = 100.0         # Yao et al.'s rule: stop extra_batches steps after L_harm passes it (< 0: off)
    extra_batches: int = 40              # steps run after the stopping rule fires
    # the run
    threads: int | None = None           # CPU threads for torch (None: the world's choice, else torch's)
    save_every: int = 50                 # steps between checkpoints
    save_adapter_every: int = 0          # also keep the adapter every N steps, in adapter-step<N>/ (0: only the last)
    log_every: int = 1                   # steps between progress lines on a non-terminal


OPTION_NAMES = tuple(f.name for f in fields(TrainOptions))
DEFAULT = TrainOptions(model="", out="")  # the defaults; a model and an out are always given or chosen
# The options whose default the model decides. An embedded world's were chosen on its validation suites (README,
# worlds/toy/defaults.py); any other model gets Yao et al.'s (llm_unlearn, unlearn_harm.py: weights 0.5 1 1 on the
# harmful, mismatch and normal terms, batch 2, 1000 steps, stop once the harmful loss passes 100) with QLoRA's learning
# rate for a 7B decoder, and the `fast` kernels (benchmarks/bench_step_vs_peft.py measures them against peft).
MODEL_DEPENDENT = ("lr", "eps", "batch_size", "max_steps", "stop_harm_nll", "kernels")
REAL_MODEL_DEFAULTS = {name: getattr(DEFAULT, name) for name in MODEL_DEPENDENT}
# Options a resumed run may change: they decide how far it goes and what it writes, not what one step computes.
RESUMABLE = ("max_steps", "save_every", "save_adapter_every", "log_every")
PATH_OPTIONS = ("model", "vision_dir", "data")  # compared as the files they name: ./data.jsonl is data.jsonl


class World(Protocol):
    """What the options read of an embedded world (worlds.embedded.EmbeddedWorld)."""

    name: str
    model: Path                # its committed model: the command line's --model
    data: dict[str, str]       # --data NAME -> what the records are
    train_defaults: dict       # its values of the MODEL_DEPENDENT options
    float32_only: bool         # trained in float32 whatever the device

    def require_model(self, path: str | Path) -> None: ...


@dataclass(frozen=True)
class Worlds:
    """The embedded worlds as the program learns them from worlds.embedded."""

    default: World                              # the bare command's model and data
    of: Callable[[str | Path], World | None]    # the world whose committed model a path is, or None


@dataclass(frozen=True)
class CommandLine:
    """What the command line said: every option's value (None where the model decides it), which options it named,
    and the two flags that are no option of the run."""

    values: dict                 # {TrainOptions field: value}
    given: tuple[str, ...]       # the names of the options on the command line, sorted
    resume: bool = False         # --resume: continue the run in --out
    debug: bool = False          # --debug: a user error's traceback instead of its one line

    @property
    def out(self) -> str:
        return self.values["out"]


@dataclass(frozen=True)
class RunStart:
    """How this invocation starts the run in --out (not an option of the run: args.json does not keep it)."""

    resume: bool = False         # continue from the run's checkpoint
    restart: bool = False        # --out holds a run stopped before its first checkpoint: it starts again in place
    changes: dict = field(default_factory=dict)       # {option: [in the run, now]}: what a resume changes
    defaults_taken: tuple[str, ...] = ()              # MODEL_DEPENDENT options and dtype left to the defaults
    defaults_of: str | None = None                    # whose defaults: an embedded world's name, None a real model's


# ---------------------------------------------------------------------------------------------------------------------
# The command line


def parse_command_line(argv: list[str] | None, worlds: Worlds) -> CommandLine:
    parsed = vars(build_parser(worlds.default).parse_args(argv))
    resume, debug = parsed.pop("resume"), parsed.pop("debug")
    parsed["out"] = parsed["out"] or str(RUNS / parsed["mode"])
    return CommandLine(parsed, tuple(sorted(options_given(argv, worlds.default))), resume, debug)


def model_default(name: str, world: World) -> str:
    toy_value, real_value = world.train_defaults[name], REAL_MODEL_DEFAULTS[name]
    show = " ".join(map(str, toy_value)) if isinstance(toy_value, list) else toy_value
    real = " ".join(map(str, real_value)) if isinstance(real_value, list) else real_value
    return f"(default: {show} on the {world.name}, {real} on any other model)"


def build_parser(world: World) -> argparse.ArgumentParser:
    """The command line of train.py; `world` is the embedded world a bare command trains on. An option the model
    decides has no default here (None): `resolve_command_line` fills it in once it knows the model."""
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", default=str(world.model), help="LLaVA model folder (llava-hf layout; default: the toy)")
    io.add_argument("--vision-dir", default=DEFAULT.vision_dir,
                    help="CLIP folder, for an original-format LLaVA checkpoint")
    toy_data = "\n".join(textwrap.fill(f"{name}: {what}", 100, initial_indent="  ", subsequent_indent="    ")
                         for name, what in world.data.items())
    io.add_argument("--data", default=DEFAULT.data, help="unlearning JSONL (see ref/unlearning_data.py), or the "
                                                         f"embedded toy world's training records:\n{toy_data}")
    io.add_argument("--out", default=None, help="run folder (default: runs/<mode>)")
    io.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint, with the options it was started with;\n"
                         f"only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may change (a larger\n"
                         "--max-steps extends a finished run: a linear or cosine schedule then decays to the new end)")
    io.add_argument("--prompt-format", default=DEFAULT.prompt_format, choices=sorted(PROMPT_FORMATS),
                    help="chat template: llava-hf's \"USER: ... ASSISTANT:\", the original release's vicuna_v1,\n"
                         "or chatml (SmolLM2-Instruct's)")

    method = p.add_argument_group("method")
    method.add_argument("--mode", default=DEFAULT.mode, choices=["textual", "multimodal", "sft"],
                        help="textual: the paper's method; multimodal: the same losses on image+text records;\n"
                             "sft: the supervised baseline (helpful NLL and the utility term, no ascent)")
    method.add_argument("--eps", type=non_negative_float, nargs=3, default=None, metavar=("HARM", "HELPFUL", "UTILITY"),
                        help="weights eps1 eps2 eps3 of -L_harm (or +L_NPO), L_helpful, L_utility (sft ignores eps1)\n"
                             + model_default("eps", world))
    method.add_argument("--include-categories", nargs="+", default=DEFAULT.include_categories, metavar="CATEGORY",
                        help="train on the harmful records of these harm categories only (the records'\n"
                             "\"categories\": the toy's are its topics, PKU-SafeRLHF's its harm categories)")
    method.add_argument("--exclude-categories", nargs="+", default=DEFAULT.exclude_categories, metavar="CATEGORY",
                        help="drop the harmful records of these categories")
    method.add_argument("--category-fraction", type=fraction, default=DEFAULT.category_fraction,
                        help="keep this fraction (0, 1] of the (remaining) categories, drawn with --category-seed")
    method.add_argument("--category-seed", type=int_in(0, SEED_MAX), default=DEFAULT.category_seed,
                        help="draws --category-fraction's choice (default: --seed)")
    method.add_argument("--mismatch", default=DEFAULT.mismatch, choices=["helpful", "random"],
                        help="helpful: the record's helpful response; random: a random normal answer (Yao et al.)")
    method.add_argument("--harm-loss", default=DEFAULT.harm_loss, choices=list(HARM_LOSSES),
                        help="the harm term: ascent, the paper's -eps1 * NLL(harmful response), unbounded\n"
                             "(pushed far, the model collapses); npo, Negative Preference Optimization (Zhang et\n"
                             "al. 2024), bounded: +eps1 * the mean over harmful sequences of\n"
                             "(2/beta) log(1 + (p(y|x) / p_orig(y|x))^beta), p_orig the model with its adapters off.\n"
                             "The harmful NLL is logged (and stops the run) either way; not with --mode sft, which\n"
                             "has no harm term")
    method.add_argument("--npo-beta", type=positive_float, default=DEFAULT.npo_beta,
                        help="NPO's beta, with --harm-loss npo: as beta -> 0, NPO's gradient tends to plain\n"
                             "ascent's on the sequence NLL")

    model = p.add_argument_group("model and adapters")
    model.add_argument("--quantize", default=DEFAULT.quantize, choices=["nf4", "fp4", "none"],
                       help="decoder linears' base")
    model.add_argument("--dtype", default=None, choices=TRAIN_DTYPES,
                       help="compute dtype (default: bfloat16 on a GPU and on a CPU with native bfloat16 matmuls,\n"
                            "float32 on other CPUs, for the toy and with --full-parameter)")
    model.add_argument("--device", default=DEFAULT.device, help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--lora-r", type=int_in(1, LORA_R_MAX), default=DEFAULT.lora_r,
                       help="LoRA rank (at most the target linears' smaller side)")
    model.add_argument("--lora-alpha", type=positive_float, default=DEFAULT.lora_alpha,
                       help="LoRA scale alpha (the update is alpha/r B A x)")
    model.add_argument("--lora-dropout", type=probability, default=DEFAULT.lora_dropout,
                       help="dropout on the adapters' input")
    model.add_argument("--lora-targets", nargs="+", default=DEFAULT.lora_targets, choices=LoraConfig().targets,
                       metavar="LINEAR", help="decoder linears that get adapters, by name: "
                                              f"{' '.join(LoraConfig().targets)}")
    model.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder layers in backward")
    model.add_argument("--full-parameter", action="store_true",
                       help="train the decoder layers themselves, no LoRA (a dense base: --quantize none); the KL\n"
                            "compares with a frozen copy of the model; the result is a llava-hf checkpoint, model/")
    model.add_argument("--parallel", default=None, choices=["ddp", "fsdp"],
                       help="under torchrun: ddp (every rank holds the model; adapter gradients all-reduced) or fsdp\n"
                            "(decoder layers sharded across ranks; a dense base only). Default: ddp for a 4-bit\n"
                            "base, fsdp for a dense one (--quantize none)")
    model.add_argument("--kernels", default=None, help=f"kernel preset: {sorted(kernel_registry.PRESETS)} "
                       + model_default("kernels", world))
    model.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (torch.use_deterministic_algorithms; on a GPU, slower),\n"
                            "so that a resumed run repeats the uninterrupted one bit for bit there too")
    model.add_argument("--kernel", action="append", default=DEFAULT.kernel, metavar="OP=IMPL",
                       help="override one op's implementation (repeatable), e.g. --kernel attention=sdpa")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=positive_float, default=None, help="peak learning rate " + model_default("lr", world))
    opt.add_argument("--weight-decay", type=non_negative_float, default=DEFAULT.weight_decay,
                     help="AdamW's decoupled weight decay")
    opt.add_argument("--batch-size", type=int_in(1, STEP_RECORDS_MAX), default=None,
                     help="records per batch, for each of the three terms " + model_default("batch_size", world))
    opt.add_argument("--grad-accum", type=int_in(1, STEP_RECORDS_MAX), default=DEFAULT.grad_accum,
                     help="batches per optimizer step")
    opt.add_argument("--max-steps", type=int_in(1, STEPS_MAX), default=None,
                     help="optimizer steps " + model_default("max_steps", world))
    opt.add_argument("--warmup", type=int_in(0, STEPS_MAX), default=DEFAULT.warmup,
                     help="linear warm-up steps (at most --max-steps)")
    opt.add_argument("--schedule", default=DEFAULT.schedule, choices=["constant", "linear", "cosine"],
                     help="learning rate after warm-up: constant, or decaying to 0 at --max-steps")
    opt.add_argument("--clip", type=non_negative_float, default=DEFAULT.clip,
                     help="gradient norm clipping (0: off)")
    opt.add_argument("--divergence-factor", type=non_negative_float, default=DEFAULT.divergence_factor,
                     help="stop, keeping the last good adapter, when the gradient norm passes this many times the\n"
                          "largest before it, or the adapters' norm this many times the untrained adapters' (0: off)")
    opt.add_argument("--seed", type=int_in(0, SEED_MAX), default=DEFAULT.seed,
                     help="seeds the data order, the adapters' init and dropout")
    opt.add_argument("--stop-harm-nll", type=finite_float, default=None,
                     help="Yao et al.'s rule: once the harmful NLL exceeds this, run --extra-batches more steps,\n"
                          "then stop; a negative value turns the rule off " + model_default("stop_harm_nll", world))
    opt.add_argument("--extra-batches", type=int_in(0, STEPS_MAX), default=DEFAULT.extra_batches,
                     help="steps run after the stopping rule fires")

    run = p.add_argument_group("run")
    run.add_argument("--threads", type=int_in(1, THREADS_MAX), default=DEFAULT.threads,
                     help="CPU threads for torch (default: 1 for the toy, whose tiny matrices gain nothing from more\n"
                          "and lose a lot when another process shares the cores; torch's default otherwise)")
    run.add_argument("--save-every", type=int_in(1, STEPS_MAX), default=DEFAULT.save_every,
                     help="steps between checkpoints")
    run.add_argument("--save-adapter-every", type=int_in(0, STEPS_MAX), default=DEFAULT.save_adapter_every,
                     help="also keep the adapter every N steps, in adapter-step<N>/ (0: only the final adapter);\n"
                          "eval.py --adapter RUN_DIR evaluates them all, to plot ASR against steps")
    run.add_argument("--log-every", type=int_in(1, STEPS_MAX), default=DEFAULT.log_every,
                     help="steps between progress lines on a non-terminal")
    add_debug_option(run)
    return p


def options_given(argv: list[str] | None, world: World) -> set[str]:
    """The options on the command line: parsed again with every default suppressed, what is set was given. (Each
    action's own default: set_defaults would also store SUPPRESS as a parser-level default, typed as a value.)"""
    quiet = build_parser(world)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def command_line_defaults(world: World) -> dict:
    """Every option's value when the command line names none (None for those the model decides, and for --out)."""
    defaults = vars(build_parser(world).parse_args([]))
    return {name: defaults[name] for name in OPTION_NAMES}


# ---------------------------------------------------------------------------------------------------------------------
# The options of the run: a new run's, or the one in --out continued


def resolve_command_line(command: CommandLine, worlds: Worlds) -> tuple[TrainOptions, RunStart]:
    """The run the command line asks for. --out is checked before anything is read: it must be new, empty or a run of
    train.py's (an args.json), and overlap no input. Then:
    - --out holds a checkpoint: with --resume, its run's options (args.json) with the command line's changes to
      RESUMABLE ones, any other change refused; without --resume, refused;
    - --out holds a run stopped before its first checkpoint: it starts again in place, with its own options under
      --resume, the command line's otherwise;
    - anything else is a new run with the command line's options.
    A run that does not resume gets the model's defaults for the options left unset. Nothing is written."""
    out = Path(command.out)
    check_run_folder(out, ARGS_FILE, inputs=input_paths(command.values, worlds))
    has_checkpoint, has_args = (out / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file(), (out / ARGS_FILE).is_file()
    if has_args:  # another program's args.json is no run of train.py's: a restart would clear files it did not write
        read_train_args(out)
    if has_checkpoint and not command.resume:
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    if command.resume and not has_args and not has_checkpoint:
        raise RunError(f"--resume: {out} holds no train.py run (no {ARGS_FILE}, no checkpoint)")
    values, changes = resumed_values(command, out, worlds) if command.resume else (command.values, {})
    if has_checkpoint:
        start = RunStart(resume=True, changes=changes)
    else:
        check_device(values["device"])  # before the dtype's default is chosen by it
        values, world = with_model_defaults(values, worlds)
        # the dtype is shown with them: a real model's may follow the CPU (harness.devices.default_train_dtype)
        taken = tuple(n for n in (*MODEL_DEPENDENT, "dtype") if n not in command.given)
        start = RunStart(restart=has_args, defaults_taken=taken,
                         defaults_of=world.name if world else None)
    options = TrainOptions(**values)
    check_options(options, worlds)
    return options, start


def input_paths(values: dict, worlds: Worlds) -> list[str]:
    """The folders and files a run reads, which its --out must not overlap."""
    data = [] if values["data"] in worlds.default.data else [values["data"]]
    return [values["model"], *([values["vision_dir"]] if values["vision_dir"] else []), *data]


def resumed_values(command: CommandLine, out: Path, worlds: Worlds) -> tuple[dict, dict]:
    """The run's options (args.json) with the command line's changes to `RESUMABLE` ones, and the changes as
    {name: [before, now]}; any other difference is refused, listed. An option args.json lacks (a run started before
    the option existed) has the command line's default."""
    defaults = command_line_defaults(worlds.default)
    recorded = read_train_args(out)
    check_recorded_options(recorded, out / ARGS_FILE, worlds.default)
    saved = {**defaults, **{k: v for k, v in recorded.items() if k in defaults}}
    changes = {name: [saved[name], command.values[name]] for name in command.given
               if name in OPTION_NAMES and name != "out" and not same_option(name, saved[name], command.values[name])}
    refused = [name for name in changes if name not in RESUMABLE]
    if refused:
        listed = "; ".join(f"--{n.replace('_', '-')} {changes[n][0]!r} in the run, {changes[n][1]!r} now"
                           for n in refused)
        raise OptionError(f"--resume {out}: options differ from {out / ARGS_FILE}: {listed}. Only "
                          f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may change on resume; start a "
                          f"new run (another --out) for the others")
    return {**saved, **{name: now for name, (_, now) in changes.items()}, "out": str(out)}, changes


# What args.json may hold as None besides what the command line leaves unset: the first train.py's stop_harm_nll (its
# default, the rule off; stopping_rule reads None so).
RECORDED_NONE = tuple(f.name for f in fields(TrainOptions) if f.default is None) + ("stop_harm_nll",)


def check_recorded_options(recorded: dict, path: Path, world: World) -> None:
    """Every option args.json records is a value its command-line option takes: args.json is a file a user can edit
    (and an old train.py took any number), so a wrong type, an unknown choice or an out-of-range number is refused by
    name before anything runs, as on the command line, not as a TypeError mid-run. An option it lacks (a run started
    before the option existed) takes the command line's default."""
    for action in build_parser(world)._actions:
        name = action.dest
        if name in recorded and name in OPTION_NAMES and name != "out":
            problem = recorded_value_problem(action, recorded[name])
            if problem:
                raise RunError(f"{path}: \"{name}\" is {json.dumps(recorded[name])}: {problem}")


def recorded_value_problem(action: argparse.Action, value) -> str | None:
    """What is wrong with `value` as the value of `action`'s option, or None."""
    flag = action.option_strings[0]
    if value is None:
        return None if action.dest in RECORDED_NONE else f"{flag} needs a value"
    if action.nargs == 0:
        return None if isinstance(value, bool) else f"{flag} is a flag: true or false"
    several = action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    if several:
        count = action.nargs if isinstance(action.nargs, int) else None
        if not isinstance(value, list) or (count and len(value) != count) or (action.nargs == "+" and not value):
            return f"{flag} takes a list of {count or 'one or more'} values"
    for item in value if several else [value]:
        if action.type is None:
            if not isinstance(item, str):
                return f"{flag} takes text"
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            return f"{flag} takes a number"
        else:
            try:
                parsed = action.type(str(item))
            except argparse.ArgumentTypeError as err:
                return f"{flag} {err}"
            except ValueError:
                return f"{flag} takes a number"
            if parsed != item:
                return f"{flag} {action.type.__name__}"
        if action.choices is not None and item not in action.choices:
            return f"{flag} takes one of {', '.join(map(str, action.choices))}"
    return None


def same_option(name: str, saved, given) -> bool:
    if name in PATH_OPTIONS and isinstance(saved, str) and isinstance(given, str):
        return saved == given or Path(saved).resolve() == Path(given).resolve()
    return saved == given


def with_model_defaults(values: dict, worlds: Worlds) -> tuple[dict, World | None]:
    """The options left unset take the model's defaults: an embedded world's, or a real model's. The dtype: float32
    for a world trained so and for full-parameter training, which updates the weights themselves in the compute
    dtype (no float32 master copy); else the device's. The parallel strategy: fsdp shards a dense base only."""
    world = worlds.of(values["model"])
    defaults = world.train_defaults if world else REAL_MODEL_DEFAULTS
    values = {**values, **{name: value for name, value in defaults.items() if values[name] is None}}
    float32_only = (world is not None and world.float32_only) or values["full_parameter"]
    values["dtype"] = values["dtype"] or ("float32" if float32_only else default_train_dtype(values["device"]))
    values["parallel"] = values["parallel"] or ("fsdp" if values["quantize"] == "none" else "ddp")
    return values, world


def check_options(options: TrainOptions, worlds: Worlds) -> None:
    """Options that cannot run together, a device this torch cannot use, a world's model not built yet."""
    if options.full_parameter and (options.quantize != "none" or options.save_adapter_every):
        raise OptionError("--full-parameter trains dense weights: it needs --quantize none, and keeps no adapters "
                          "along the way (no --save-adapter-every)")
    if options.full_parameter and options.dtype != "float32":
        raise OptionError(f"--full-parameter trains the weights themselves in the compute dtype, with no float32 "
                          f"master copy: in {options.dtype} an AdamW update below 1/256 of a weight rounds away (at lr "
                          f"1e-5, almost all of them). Use --dtype float32")
    if options.parallel == "fsdp" and options.quantize != "none":
        raise OptionError(f"--parallel fsdp shards dense weights; a {options.quantize} base runs under --parallel ddp "
                          f"(or train on a dense base: --quantize none)")
    if options.warmup > options.max_steps:
        raise OptionError(f"--warmup {options.warmup} is more than --max-steps {options.max_steps}: the learning rate "
                          f"would never reach --lr {options.lr}; warm up over fewer steps")
    weighted = options.eps[1:] if options.mode == "sft" else options.eps
    if not any(weighted):
        eps, ignored = " ".join(f"{e:g}" for e in options.eps), " (sft ignores eps1)" if options.mode == "sft" else ""
        raise OptionError(f"--eps {eps}: every term the {options.mode} mode trains on has weight 0{ignored}, so the "
                          f"run would learn nothing; give a term a weight")
    if options.harm_loss != "ascent" and options.mode == "sft":
        raise OptionError(f"--harm-loss {options.harm_loss} replaces the ascent on the harmful responses, and --mode "
                          f"sft has no harm term (it learns the helpful responses only); drop --harm-loss, or use "
                          f"--mode textual or multimodal")
    if options.harm_loss != "npo" and options.npo_beta != DEFAULT.npo_beta:
        raise OptionError(f"--npo-beta {options.npo_beta:g} is NPO's beta, and this run's harm term is "
                          f"{'none (--mode sft)' if options.mode == 'sft' else '--harm-loss ' + options.harm_loss}: "
                          f"it would change nothing; add --harm-loss npo, or drop --npo-beta")
    if options.batch_size * options.grad_accum > STEP_RECORDS_MAX:
        raise OptionError(f"--batch-size {options.batch_size} x --grad-accum {options.grad_accum} is "
                          f"{options.batch_size * options.grad_accum:,} records of each kind per step on each rank, "
                          f"more than {STEP_RECORDS_MAX:,}; take fewer")
    if options.data not in worlds.default.data and Path(options.data).exists() and not Path(options.data).is_file():
        raise OptionError(f"--data {options.data}: is not a file (a folder, a device or a pipe); give the unlearning "
                          f"JSONL file")
    check_device(options.device)
    if (world := worlds.of(options.model)) is not None:
        world.require_model(options.model)

