"""eval.py's options: its command line, parsed and resolved once, before anything is evaluated, into an `EvalOptions`.

    command = parse_command_line(argv, catalog)                         # argparse: a bad option exits with status 2
    options = resolve_options(command, catalog, distributed, root)      # every default filled in, the inputs found

Resolution fills in what depends on something else: the embedded world's suites, judges, normal data and threads when
the model is a world's (eval.py hands the world over in the `Catalog`: evals/ imports no world); the dtype and kernels
an interrupted run in --out was started with; the adapters of train.py run folders and the quantization they were
trained on; the pgd options; the judges of a run to re-judge. Whatever can be checked without reading a suite or
loading a model is checked here (--out too: harness/eval_folder.py), each error naming its option (`EvalError`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from evals import judges as judge_registry
from evals import pgd
from evals.benchmarks import BENCHMARK_READERS
from evals.generation import Sampling
from evals.suites import NORMAL_READERS, READERS, NormalReader, SuiteReader, name_problem, parse_suite_spec
from harness.console import HelpFormatter, add_debug_option, float_in, int_in
from harness.devices import default_dtype
from harness.eval_folder import EvalFolder, check_out, default_out, recorded_settings
from harness.runs import (adapter_display_name, adapter_step, is_run_folder, read_run_args, run_adapters,
                          run_folder_of)
from ref import kernels as kernel_registry
from ref.adapters import is_adapter_folder
from ref.config import DTYPES, ConfigError, is_original_format, read_json
from ref.data import PROMPT_FORMATS, load_processor
from ref.distributed import Distributed
from ref.weights import is_quantized_checkpoint, open_checkpoint


class EvalError(ValueError):
    """An option or adapter eval.py cannot use; raised before any generation starts."""


# ---------------------------------------------------------------------------------------------------------------------
# Bounded numbers: every numeric option of eval.py and of the sweep has a range, checked by argparse (naming the option,
# exit status 2) before anything is read, written or loaded. The bounds are what the code downstream can take: torch
# segfaults on 10**5 threads; a sampling seed s makes batch k use s + k in torch's 64-bit seed; logits / temperature
# must stay finite in float32; top-p 0 keeps no token.

MAX_THREADS = 1024
MAX_SEED = 2**32 - 1
MAX_COUNT = 10**9  # samples, tokens, rows, steps: far beyond any real run, small enough for every int in the code
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4


count = int_in(1, MAX_COUNT)


@dataclass(frozen=True)
class Catalog:
    """What eval.py knows by name (evals/' suite kinds, normal-data kinds and judges, and the default world's), and the
    embedded worlds whose defaults it takes (worlds/embedded.py)."""

    default_world: Any                       # the EmbeddedWorld a bare `python eval.py` runs on
    world_of: Callable[[str], Any]           # model path -> the EmbeddedWorld whose committed model it is, or None
    suite_readers: dict[str, SuiteReader]    # --suite KIND (the world's pgd reader reads pgd:JSONL too)
    normal_readers: dict[str, NormalReader]  # --normal KIND
    judges: dict[str, Callable]              # --judge NAME
    phrase_judges: tuple[str, ...]           # --refusal-judge NAME: the judges that can decide refusals

    @classmethod
    def with_world(cls, world, world_of: Callable[[str], Any]) -> Catalog:
        return cls(world, world_of, {**READERS, **BENCHMARK_READERS, **world.suite_readers},
                   {**NORMAL_READERS, **world.normal_readers}, {**judge_registry.JUDGES, **world.judges},
                   tuple(sorted({*judge_registry.PHRASE_JUDGES, *world.phrase_judges})))


@dataclass(frozen=True)
class PGDOptions:
    """The --pgd-* options of a run with pgd suites, defaults filled in (evals/pgd.py, evals/pgd_images.py)."""

    eps: tuple[int, ...]       # L-inf budgets in levels of 1/255, one attack suite each; 255 unconstrained, 0 clean
    threat: tuple[str, ...]    # transfer and/or whitebox, one attack suite each
    steps: int                 # sign-gradient steps per restart
    step_size: int             # alpha, in levels of 1/255
    restarts: int              # random starts, the best iterate kept
    seed: int                  # seed of the random starts
    batch_size: int            # (image, target) rows per forward pass of the attack
    targets_file: Path | None  # --pgd-targets; None: the world's own corpus
    targets_source: str        # what run.json records of the corpus: the file resolved, or the world's name
    targets: tuple[str, ...]   # the answers the attack makes likely

    def configs(self) -> list[pgd.PGDConfig]:
        # eps 0 is the clean images, a control: no step could move them, so none is taken
        return [pgd.PGDConfig(eps=e / pgd.LEVELS, steps=self.steps if e else 0, restarts=self.restarts,
                              step_size=self.step_size / pgd.LEVELS, seed=self.seed, batch_size=self.batch_size)
                for e in self.eps]

    def settings(self) -> dict:
        return {"targets": self.targets_source, "eps": list(self.eps), "threat": list(self.threat),
                "steps": self.steps, "step_size": self.step_size, "restarts": self.restarts, "seed": self.seed,
                "batch_size": self.batch_size}


@dataclass(frozen=True)
class EvalOptions:
    """Everything an evaluation (or a re-judging) needs, resolved. With `rejudge`, `out` is a finished run judged again
    with `judges`, and only the judging fields (judges, device, dtype, kernels, batch_size) are used."""

    # models
    model: str                               # the LLaVA model folder
    vision_dir: str | None                   # CLIP folder, for an original-format checkpoint
    adapters: tuple[tuple[str, Path], ...]   # (name, folder) of each adapter evaluated beside the base, in order
    adapter_runs: dict[str, dict]            # the train.py options (args.json) of each adapter's run, by name
    quantize: str                            # the base's decoder linears: none, nf4 or fp4
    dtype: str                               # weights / compute dtype, of the model and of the judge models
    device: str                              # this process' torch device (under torchrun, its rank's GPU)
    threads: int | None                      # torch CPU threads; None: torch's own choice
    kernels: str                             # the kernel preset (ref/kernels)
    prompt_format: str                       # the chat format prompts are written in
    # suites and data
    suites: tuple[str, ...]                  # [NAME=]KIND:PATH specs, in order
    normal: str                              # KIND:PATH of the normal data for utility, or "none"
    max_samples: int | None                  # the first N samples of every suite and of the normal data
    prompt_column: str | None                # text suites: the prompt's column where it has no known name
    piece_column: str | None                 # pieces suites: the key phrase's column
    # judges
    judges: tuple[str, ...]                  # the judges of attack suites, each once
    refusal_judge: str                       # the phrase judge deciding refusals on over-refusal suites
    judge_models: dict[str, str]             # the model folder of every judge named that runs a model
    judge_quantize: str                      # the judge models' linears: none, nf4 or fp4
    # generation
    max_new_tokens: int                      # tokens generated per response
    batch_size: int                          # prompts per generation / utility batch
    sample: bool                             # sample instead of greedy decoding
    temperature: float                       # sampling temperature
    top_p: float                             # nucleus sampling mass
    seed: int                                # sampling seed; batch k uses seed + k
    pgd: PGDOptions | None                   # the attacks of pgd suites; None without one
    # the run
    out: Path                                # the run folder (--out, or --rejudge's)
    rejudge: bool = False                    # judge the finished run in `out` again; nothing is generated

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.sample, self.temperature, self.top_p, self.seed)

    def generation(self) -> dict:
        return {"mode": "sampling" if self.sample else "greedy", "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "batch_size": self.batch_size}

    def settings(self) -> dict:
        """Everything that decides the responses (run.json's "settings"): an interrupted run resumes only under the
        same settings."""
        return {"model": str(Path(self.model).resolve()), "vision_dir": self.vision_dir, "quantize": self.quantize,
                "dtype": self.dtype, "kernels": self.kernels, "prompt_format": self.prompt_format,
                "adapters": [[name, str(folder.resolve())] for name, folder in self.adapters],
                "suites": list(self.suites), "max_samples": self.max_samples, "piece_column": self.piece_column,
                "prompt_column": self.prompt_column, "normal": self.normal,
                "pgd": self.pgd.settings() if self.pgd else None, "generation": self.generation()}


# ---------------------------------------------------------------------------------------------------------------------
# The command line


def parse_command_line(argv: list[str] | None, catalog: Catalog, description: str = "") -> argparse.Namespace:
    width = max(map(len, catalog.suite_readers))
    suite_kinds = "\n".join(f"  {k:<{width}} {v.description}" for k, v in catalog.suite_readers.items())
    normal_kinds = "\n".join(f"  {k:<10} {v.description}" for k, v in catalog.normal_readers.items())
    p = argparse.ArgumentParser(
        prog="eval.py", description=description, formatter_class=HelpFormatter,
        allow_abbrev=False,  # --adapt is not --adapter: an abbreviation would pass as an option it is not
        epilog=f"suite kinds (--suite [NAME=]KIND:PATH):\n{suite_kinds}\n\nnormal data kinds (--normal KIND:PATH):\n"
               f"{normal_kinds}\n\njudges: {', '.join(sorted(catalog.judges))}")
    io = p.add_argument_group("models")
    io.add_argument("--model", default=str(catalog.default_world.model),
                    help="LLaVA model folder (config.json, safetensors, tokenizer.json); default: the toy, "
                         "assets/toy_llava")
    io.add_argument("--vision-dir", default=None, help="CLIP folder, for an original-format LLaVA checkpoint")
    io.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                    help="LoRA adapter folder (peft's adapter_config.json + adapter_model.safetensors, or the\n"
                         "lora.json of earlier versions), repeatable; the base model is always evaluated too. A\n"
                         "train.py run folder stands for every adapter it saved (adapter-step<N>/ as NAME@N, then\n"
                         "adapter/). Name defaults to the run folder (runs/textual/adapter -> textual).\n"
                         "Default: none, or with the toy model every runs/*/adapter that exists")
    io.add_argument("--no-adapters", action="store_true", help="evaluate the base model only (ignore the defaults)")
    io.add_argument("--quantize", default="auto", choices=["auto", "none", "nf4", "fp4"],
                    help="the base's decoder linears: dense (none) or 4 bit. auto (default): what the adapters'\n"
                         "train.py runs used (args.json next to each adapter), so an adapter meets the base it was\n"
                         "trained on; none when no adapter records it")
    io.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="weights / compute dtype, of the model and the judge models (default: bfloat16 on a GPU,\n"
                         "float32 on a CPU and for the toy)")
    io.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu); under torchrun, cuda is each rank's\n"
                         "GPU (its LOCAL_RANK)")
    io.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                    help="CPU threads for torch (default: 1 for the toy model, whose tiny matrices run fastest on one\n"
                         "thread and slow down badly when cores are shared; torch's default otherwise)")
    io.add_argument("--kernels", default=None, help=f"kernel preset: {sorted(kernel_registry.PRESETS)} (default: "
                    "reference for the toy, fast for any other model)")
    io.add_argument("--prompt-format", default="llava-hf", choices=sorted(PROMPT_FORMATS),
                    help="chat format the prompts are written in (default: llava-hf)")

    data = p.add_argument_group("suites and data")
    data.add_argument("--suite", action="append", default=None, metavar="[NAME=]KIND:PATH",
                      help="an evaluation suite, repeatable (kinds below). Default: with the toy model, 'toy' (its "
                           "held-out suites);\notherwise required")
    data.add_argument("--normal", default=None, metavar="KIND:PATH",
                      help="normal data for utility (NLL, perplexity, KL from base); 'none' to skip.\n"
                           "Default: 'toy' with the toy model, otherwise none")
    data.add_argument("--max-samples", type=count, default=None,
                      help="use only the first N samples of every suite and of the normal data")
    data.add_argument("--prompt-column", default=None,
                      help="text suites: the column (field) holding the prompt, where the file's is not one of the\n"
                           "names the field's prompt sets use (goal, Goal, Behavior, prompt, forbidden_prompt, ...)")
    data.add_argument("--piece-column", default=None,
                      help="pieces suites: the CSV column holding the key phrase (default: the harmful prompt "
                           "column the text reader finds)")

    judging = p.add_argument_group("judges")
    judging.add_argument("--judge", action="append", default=None, choices=sorted(catalog.judges),
                         help="judge for attack suites, repeatable (each gets its own columns).\n"
                              "Default: 'toy' (refusal phrases) and 'toy_harm' (harmful steps given) with the toy "
                              "model, else 'gcg'")
    judging.add_argument("--refusal-judge", default=None, choices=list(catalog.phrase_judges),
                         help="phrase judge deciding refusals on over-refusal suites (default: 'toy' with the toy "
                              "model, else 'xstest')")
    judging.add_argument("--judge-model", action="append", default=None, metavar="[JUDGE=]DIR",
                         help="model folder of an LLM judge (llamaguard, llamaguard_jbb, harmbench), repeatable: a\n"
                              "text-only LLaMA checkpoint (LlamaForCausalLM safetensors + tokenizer.json; a LLaVA\n"
                              "folder is refused). A plain DIR serves every LLM judge without a folder of its own")
    judging.add_argument("--judge-quantize", default="none", choices=["none", "nf4", "fp4"],
                         help="the judge model's linears: dense (default) or 4 bit")

    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=count, default=64,
                     help="tokens generated per response; the prompt and these must fit the model's context (default "
                          "64)")
    gen.add_argument("--batch-size", type=count, default=16, help="prompts per generation / utility batch (default 16)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float_in(MIN_TEMPERATURE, MAX_TEMPERATURE), default=None,
                     help="sampling temperature; with --sample only (default 1)")
    gen.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=None,
                     help="nucleus sampling mass, in (0, 1]; with --sample only (default 1)")
    gen.add_argument("--seed", type=int_in(0, MAX_SEED), default=None,
                     help="sampling seed, batch k uses seed + k; with --sample only (default 0)")

    attack = p.add_argument_group("visual adversarial examples (pgd suites; evals/pgd.py)")
    attack.add_argument("--pgd-targets", default=None, metavar="FILE",
                        help="the answers the attack makes likely after each benign prompt: .txt (one a line) or\n"
                             ".csv (first column; Qi et al.'s derogatory_corpus.csv). Required, except for pgd:toy\n"
                             "(default there: the toy's harmful answer for every harmful topic)")
    attack.add_argument("--pgd-eps", type=budget_levels, default=None, metavar="E[,E...]",
                        help="L-inf budgets in levels of 1/255, one suite each; 255 = unconstrained, 0 = the clean\n"
                             "images (default: 16,32,64,255, Qi et al.'s)")
    attack.add_argument("--pgd-threat", type=threat_list, default=None, metavar="T[,T]",
                        help="transfer (optimised on the base, shown to every model) and/or whitebox (optimised\n"
                             "against the model evaluated, adapters on), one suite each (default: transfer,whitebox)")
    attack.add_argument("--pgd-steps", type=int_in(0, MAX_COUNT), default=None,
                        help="sign-gradient steps per restart (default 300; Qi et al.: 5000)")
    attack.add_argument("--pgd-step-size", type=int_in(1, pgd.LEVELS), default=None, metavar="LEVELS",
                        help="step size alpha in levels of 1/255 (default 1)")
    attack.add_argument("--pgd-restarts", type=count, default=None,
                        help="restarts from random points of the budget, the best iterate kept (default 1)")
    attack.add_argument("--pgd-seed", type=int_in(0, MAX_SEED), default=None,
                        help="seed of the random starts (default 0)")
    attack.add_argument("--pgd-batch-size", type=count, default=None, metavar="ROWS",
                        help="(image, target) rows per forward pass of the attack; lower it when a large model's\n"
                             "activations do not fit (default 32)")

    p.add_argument("--out", default=None,
                   help="run folder: run.json, generations.jsonl, utility.jsonl, responses.jsonl, report.json,\n"
                        "report.md. A new or empty folder starts a run; an interrupted run's folder resumes it (same\n"
                        "options); a finished run's folder is refused, never overwritten. Default: runs/eval, or\n"
                        "runs/eval-2, -3, ... when the ones before hold finished runs")
    p.add_argument("--rejudge", default=None, metavar="RUN_DIR",
                   help="re-score a finished run's saved responses with --judge (and --refusal-judge), in place,\n"
                        "without loading the evaluated model; judges not named keep their saved verdicts")
    add_debug_option(p)
    return p.parse_args(argv)


def budget_levels(text: str) -> list[int]:
    """--pgd-eps: comma-separated whole levels 0 .. 255, each once."""
    try:
        levels = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole levels of 1/255 separated by commas, got {text!r}") from None
    if any(not 0 <= level <= pgd.LEVELS for level in levels) or len(set(levels)) != len(levels):
        raise argparse.ArgumentTypeError(f"each budget once, in 0 .. 255 (255 = unconstrained), got {text!r}")
    return levels


def threat_list(text: str) -> list[str]:
    """--pgd-threat: transfer and/or whitebox, comma-separated, each once."""
    threats = text.split(",")
    if any(t not in pgd.THREATS for t in threats) or len(set(threats)) != len(threats):
        raise argparse.ArgumentTypeError(f"expected {' and/or '.join(pgd.THREATS)}, comma-separated, got {text!r}")
    return threats


# ---------------------------------------------------------------------------------------------------------------------
# Resolution


def resolve_options(command: argparse.Namespace, catalog: Catalog, distributed: Distributed, root: Path
                    ) -> EvalOptions:
    """The options of an evaluation (or of a re-judging, --rejudge) with every default filled in and every input
    checked that can be checked before a suite is read. `root`: where runs/ is (the default adapters and --out)."""
    if command.rejudge:
        return rejudge_options(command, catalog)
    device = rank_device(command.device, distributed)
    world, suites = world_and_suites(command, catalog)
    adapters = parse_adapters(default_adapters(command, world, root))
    adapter_runs = adapter_run_args(adapters)
    out = Path(command.out) if command.out else default_out(root)
    check_out(out, [command.model, *([command.vision_dir] if command.vision_dir else []),
                    *(folder for _, folder in adapters), *data_paths(command, suites, catalog)])
    # An interrupted run in --out keeps the dtype and kernels it was started with unless they are given: repeating its
    # command resumes it even where these defaults have changed since (float32 and reference before bfloat16 and fast)
    started = recorded_settings(out) if command.out else {}
    kernels = command.kernels or started_as(started, "kernels", kernel_registry.PRESETS) or (
        "reference" if world else "fast")
    kernel_registry.resolve(kernels)  # an unknown preset fails now, naming it
    pgd_options = resolve_pgd(command, suites, catalog)
    if distributed.enabled and pgd_options:
        raise EvalError("--suite ...pgd...: the PGD attack runs in one process; run eval.py without torchrun")
    judges = tuple(dict.fromkeys(command.judge or (world.eval_judges if world else ["gcg"])))  # each once
    refusal_judge = command.refusal_judge or (world.refusal_judge if world else "xstest")
    judge_registry.check_names([*judges, refusal_judge], catalog.judges)
    return EvalOptions(
        **as_parsed(command), adapters=tuple(adapters), adapter_runs=adapter_runs,
        quantize=resolve_quantize(command.quantize, adapter_runs),
        dtype=command.dtype or started_as(started, "dtype", DTYPES) or (
            "float32" if world else default_dtype(device)),
        device=device, threads=world.threads if command.threads is None and world else command.threads,
        kernels=kernels, suites=suites,
        normal=command.normal if command.normal is not None else (world.normal if world else "none"),
        judges=judges, refusal_judge=refusal_judge, judge_models=judge_model_dirs(command.judge_model, judges),
        pgd=pgd_options, out=out)


def world_and_suites(command: argparse.Namespace, catalog: Catalog) -> tuple[Any, tuple[str, ...]]:
    """The embedded world whose defaults the evaluation takes (None: a model of the user's, the real-model defaults),
    and the suites: --suite, or the world's."""
    world = catalog.world_of(command.model)
    if world is not None:
        world.require_model(command.model)  # a path naming a world's model finds it built
    if command.suite is None and world is None:
        raise EvalError("give at least one --suite KIND:PATH for a model other than the toy (see --help)")
    suites = tuple(command.suite) if command.suite is not None else world.eval_suites
    # A toy model (or a toy rebuilt elsewhere, evaluated on the toy suites) is judged by the toy's own judges.
    if world is None and all(is_world_spec(spec, catalog.default_world, catalog.suite_readers) for spec in suites):
        world = catalog.default_world
    return world, suites


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "seed": 0}


def data_paths(command: argparse.Namespace, suites: tuple[str, ...], catalog: Catalog) -> list[Path]:
    """The suites', the normal data's and the pgd targets' paths that exist: --out never lies inside one (a run folder
    inside a suite's folder would become part of the suite, its files read as the suite's or changing its sha256)."""
    paths = [Path(parse_suite_spec(spec, catalog.suite_readers)[2]) for spec in suites]
    paths += [Path(command.normal.partition(":")[2])] if command.normal and ":" in command.normal else []
    paths += [Path(command.pgd_targets)] if command.pgd_targets else []
    return [path for path in paths if str(path) not in ("", ".") and os.path.lexists(path)]


def as_parsed(command: argparse.Namespace) -> dict:
    """The options that the command line gives as they are used. The sampling options need --sample: greedy decoding
    would ignore them, and run.json and the report would show a temperature that decided nothing."""
    given = [f"--{key.replace('_', '-')}" for key in SAMPLING_DEFAULTS if getattr(command, key) is not None]
    if given and not command.sample:
        raise EvalError(f"{', '.join(given)}: sampling options, and decoding is greedy; add --sample, or drop them")
    return {"model": command.model, "vision_dir": command.vision_dir, "prompt_format": command.prompt_format,
            "max_samples": command.max_samples, "prompt_column": command.prompt_column,
            "piece_column": command.piece_column, "judge_quantize": command.judge_quantize,
            "max_new_tokens": command.max_new_tokens, "batch_size": command.batch_size, "sample": command.sample,
            **{key: default if getattr(command, key) is None else getattr(command, key)
               for key, default in SAMPLING_DEFAULTS.items()}}


def started_as(settings: dict, key: str, known) -> str | None:
    """An interrupted run's recorded setting, where it is still one of the `known` values."""
    return settings[key] if settings.get(key) in known else None


def rank_device(requested: str, distributed: Distributed) -> str:
    """--device for this rank. Under torchrun "cuda" is the GPU of the rank's LOCAL_RANK; one GPU named for every rank
    (cuda:1) would put them all on it, which NCCL refuses, so it is refused here, by name."""
    if distributed.enabled and requested.startswith("cuda:"):
        raise EvalError(f"--device {requested}: under torchrun every rank takes its own GPU (cuda:LOCAL_RANK); give "
                        f"--device cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return distributed.device(requested)


def is_world_spec(spec: str, world, readers: dict[str, SuiteReader]) -> bool:
    """A suite of the embedded world: one of its suite kinds (toy[:NAME]) or its pgd clean images (pgd:toy)."""
    _, kind, path = parse_suite_spec(spec, readers)
    return path == world.pgd_suite if kind == "pgd" else kind in world.suite_readers


def rejudge_options(command: argparse.Namespace, catalog: Catalog) -> EvalOptions:
    """--rejudge RUN_DIR: the finished run's judges unless --judge names others, its refusal judge unless
    --refusal-judge; the dtype and kernels of the judge models (the evaluated model is not loaded)."""
    out = Path(command.rejudge)
    given = [option for option, value in (("--out", command.out), ("--suite", command.suite),
                                          ("--adapter", command.adapter), ("--normal", command.normal),
                                          ("--max-samples", command.max_samples)) if value]
    if given:
        raise EvalError(f"--rejudge {out} re-scores that run's saved responses in place; {', '.join(given)} would "
                        f"change nothing: drop them (a new evaluation needs its own --out)")
    record = EvalFolder(out).record_to_rejudge()
    judges = tuple(dict.fromkeys(command.judge or record.get("judges") or ["gcg"]))
    refusal_judge = command.refusal_judge or record["refusal_judge"]
    judge_registry.check_names([*judges, refusal_judge], catalog.judges)
    return EvalOptions(
        **as_parsed(command), adapters=(), adapter_runs={}, quantize=command.quantize,
        dtype=command.dtype or default_dtype(command.device), device=command.device, threads=command.threads,
        kernels=command.kernels or "fast", suites=(), normal="none", judges=judges, refusal_judge=refusal_judge,
        judge_models=judge_model_dirs(command.judge_model, judges), pgd=None, out=out, rejudge=True)


# --- adapters ---------------------------------------------------------------------------------------------------------


def default_adapters(command: argparse.Namespace, world, root: Path) -> list[str]:
    """--adapter as given; none with --no-adapters; with a world's model, every runs/*/adapter under `root`."""
    if command.no_adapters:
        return []
    if command.adapter is not None:
        return command.adapter
    return [str(p) for p in sorted((root / "runs").glob("*/adapter")) if p.is_dir()] if world else []


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """--adapter [NAME=]DIR -> (name, folder); a train.py run folder stands for every adapter it saved, in training
    order (adapter-step<N>/ as NAME@N, then adapter/ as NAME)."""
    adapters = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = adapter_display_name(spec), spec
        if is_run_folder(folder) and not is_adapter_folder(folder):
            found = run_adapters(folder)
            if not found:
                raise EvalError(f"--adapter {spec}: a train.py run folder without adapters (not finished, and no "
                                f"--save-adapter-every)")
            run_name = name if sep else Path(folder).resolve().name
            adapters += [(run_name + ("" if adapter_step(a) is None else f"@{adapter_step(a)}"), a) for a in found]
            continue
        adapters.append((name, Path(folder)))
    names = [n for n, _ in adapters]
    for name, folder in adapters:
        problem = name_problem(name)
        if problem:
            raise EvalError(f"--adapter {name}={folder}: the name {problem}; name it: --adapter NAME=DIR")
    clash = sorted({n for n in names if names.count(n) > 1 or n == "base"})
    if clash:
        raise EvalError(f"adapter name(s) {clash} clash (with each other or with 'base'); name them: "
                        f"--adapter NAME=DIR")
    for name, folder in adapters:
        if not folder.is_dir():
            raise EvalError(f"--adapter {name}: {folder}: no such folder")
    return adapters


def adapter_run_args(adapters: list[tuple[str, Path]]) -> dict[str, dict]:
    """The options of the train.py run behind each adapter that has one (its args.json), by adapter name."""
    return {name: read_run_args(run_folder) for name, folder in adapters
            if (run_folder := run_folder_of(folder)) is not None}


def resolve_quantize(requested: str, adapter_runs: dict[str, dict]) -> str:
    """--quantize auto -> the quantization every adapter's train.py run recorded (they must agree), else none."""
    if requested != "auto":
        return requested
    recorded = {name: saved.get("quantize") for name, saved in adapter_runs.items()}
    choices = {q for q in recorded.values() if q}
    if len(choices) > 1:
        raise EvalError(f"the adapters were trained on differently quantized bases {recorded}; choose one with "
                        f"--quantize none|nf4|fp4")
    return choices.pop() if choices else "none"


# --- pgd suites -------------------------------------------------------------------------------------------------------

PGD_DEFAULTS = {"pgd_eps": [16, 32, 64, 255], "pgd_threat": list(pgd.THREATS), "pgd_steps": 300,
                "pgd_step_size": 1, "pgd_restarts": 1, "pgd_seed": 0, "pgd_batch_size": 32}


def resolve_pgd(command: argparse.Namespace, suites: tuple[str, ...], catalog: Catalog) -> PGDOptions | None:
    """The --pgd-* options with their defaults, and the target corpus, when a suite is a pgd suite; None without one.
    --pgd-* options without a pgd suite, and a pgd suite without targets (other than the world's own), are errors
    naming the option."""
    pgd_specs = []  # (suite name, path, spec) of each pgd suite
    for spec in suites:
        name, kind, path = parse_suite_spec(spec, catalog.suite_readers)
        if kind == "pgd":
            pgd_specs.append((name or "pgd", path, spec))
    if not pgd_specs:
        given = [f"--{key.replace('_', '-')}" for key in (*PGD_DEFAULTS, "pgd_targets")
                 if getattr(command, key) is not None]
        if given:
            raise EvalError(f"{', '.join(given)}: no pgd suite to attack; add --suite [NAME=]pgd:JSONL (or pgd:toy)")
        return None
    value = {key: getattr(command, key) if getattr(command, key) is not None else default
             for key, default in PGD_DEFAULTS.items()}
    world = catalog.default_world
    if command.pgd_targets is not None:
        if Path(command.pgd_targets).exists() and not Path(command.pgd_targets).is_file():
            raise EvalError(f"--pgd-targets: {command.pgd_targets}: not a regular file (a folder; a device or pipe is "
                            f"read without end)")
        try:
            targets = pgd.read_targets(command.pgd_targets)
        except pgd.PGDError as err:
            raise EvalError(f"--pgd-targets: {err}") from err
        targets_file = Path(command.pgd_targets)
        source = str(targets_file.resolve())
    else:
        not_world = [(name, spec) for name, path, spec in pgd_specs if path != world.pgd_suite]
        if not_world:
            raise EvalError(f"--pgd-targets FILE is needed for pgd suite {not_world[0][0]!r} ({not_world[0][1]}): "
                            f"the answers the attack makes likely (.txt, one a line, or .csv)")
        targets, targets_file, source = world.pgd_targets(), None, world.name
    return PGDOptions(tuple(value["pgd_eps"]), tuple(value["pgd_threat"]), value["pgd_steps"],
                      value["pgd_step_size"], value["pgd_restarts"], value["pgd_seed"], value["pgd_batch_size"],
                      targets_file, source, tuple(targets))


# --- judge models -----------------------------------------------------------------------------------------------------


def judge_model_dirs(specs: list[str] | None, names: tuple[str, ...]) -> dict[str, str]:
    """--judge-model [JUDGE=]DIR, repeatable -> the model folder of every model judge named; a plain DIR serves every
    model judge that has no folder of its own. Each folder is checked now (`check_judge_model`)."""
    named, default = {}, None
    for spec in specs or []:
        judge_name, sep, folder = spec.partition("=")
        if sep and judge_name in judge_registry.MODEL_JUDGES:
            if judge_name not in names:
                raise EvalError(f"--judge-model {spec}: judge {judge_name!r} is not one of the judges run "
                                f"({', '.join(names)}); add --judge {judge_name}")
            named[judge_name] = folder
        elif default is None:
            default = spec
        else:
            raise EvalError(f"--judge-model: two folders for every judge ({default}, {spec}); name the judge of "
                            f"each: --judge-model JUDGE=DIR, JUDGE one of {list(judge_registry.MODEL_JUDGES)}")
    if default is not None and not any(name in judge_registry.MODEL_JUDGES for name in names):
        raise EvalError(f"--judge-model {default}: none of the judges run ({', '.join(names)}) runs a model")
    dirs = {}
    for name in names:
        if name in judge_registry.MODEL_JUDGES:
            folder = named.get(name, default)
            if folder is None:
                raise EvalError(f"judge {name!r} runs a model: give its folder with --judge-model DIR (or "
                                f"--judge-model {name}=DIR)")
            check_judge_model(folder)
            dirs[name] = folder
    return dirs


def check_judge_model(folder: str) -> None:
    """A judge model folder that cannot load fails now, before any generation: it is a text-only LLaMA checkpoint (a
    LLaVA folder, such as the evaluated model named by mistake, is refused: no published judge is one, and a chat
    model would answer the judge's template with text the judge cannot parse), then its tokenizer.json, and every
    weight's key, shape and dtype in the safetensors headers (no tensor data is read)."""
    config = Path(folder) / "config.json"
    try:
        raw = read_json(config)
    except ConfigError as err:
        raise EvalError(f"--judge-model {folder}: {err}") from None
    if raw.get("model_type") != "llama" or is_original_format(raw):
        raise EvalError(f"--judge-model {folder}: {config} is not a text-only LLaMA checkpoint (model_type "
                        f"{raw.get('model_type')!r}{', with mm_* keys' if is_original_format(raw) else ''}); a judge "
                        f"model is a LlamaForCausalLM such as LlamaGuard or HarmBench's classifier, not a LLaVA model")
    load_processor(folder)
    if not is_quantized_checkpoint(folder):
        open_checkpoint(folder)
