"""Evaluate a LLaVA model and its unlearning adapters: attack success rate (text and vision-text attacks),
over-refusal and utility, in one table.

    python eval.py                                           # the embedded toy: base + every runs/*/adapter
    python eval.py --model DIR --adapter runs/textual/adapter \\
        --suite text:advbench.csv --suite figstep:safebench.csv --suite pieces:advbench.csv \\
        --suite mmsafetybench:MM-SafetyBench/data --suite xstest:xstest.csv --normal truthfulqa:truthfulqa.csv \\
        --judge gcg --judge llamaguard --judge-model LlamaGuard-7b --out results/
    python eval.py --rejudge results/ --judge harmbench --judge-model HarmBench-Llama-2-13b-cls
    python eval.py --suite pgd:toy --max-samples 4 --pgd-eps 16,32,64,255     # visual adversarial examples (PGD)

The program, top to bottom (one section each):
  1. options, with the toy's defaults when no model is named; the adapters named and found
  2. models: the base is loaded once; every adapter is checked against it (loaded, then removed again); the judge
     models, loaded one at a time after generation
  3. the run folder: run.json (what decides the responses), a new run or the resumption of an interrupted one, never
     a finished one overwritten
  4. generating: batched greedy generation of every model on every suite, each (model, suite) block appended to
     generations.jsonl as soon as it is done; NLL / perplexity of the reference answers and KL(p_base || p_model) on
     the normal data (adapters switched off = the base, no second copy). The images of pgd suites are attacked
     first (evals/pgd.py): on the base before any adapter is on (transfer), and on each adapted model (white-box),
     each attack saved in the run folder as PNGs and reused by a resumed run
  5. judging: every saved response judged (also what --rejudge runs, without the evaluated model), responses.jsonl,
     report.json and report.md (rows: models; columns: each suite's rate with its judge, count and 95% interval,
     utility, the training compute of train.py runs; per-category tables; provenance)
  6. the run: every suite, the normal data and the judges are read and checked first (bad input fails there, by
     name), then the sections above in order. Progress goes to stderr.

Under `torchrun --nproc-per-node N eval.py ...` the N processes share the generation and utility batches (whole
batches, batch k to rank k % N, so every response and number is the one process's) and gather them; rank 0 alone
keeps the run folder, prints, and judges (LLM judges included, on its own device). Without torchrun it is one process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, replace
from itertools import product
from pathlib import Path

import torch

from evals import judges as judge_registry
from evals import pgd
from evals.benchmarks import BENCHMARK_READERS
from evals.generation import Sampling, chat_prompt, generate_responses, tokenize_samples
from evals.judges import RefusalPhraseJudge
from evals.report import report_provenance, write_report
from evals.scoring import (attack_verdicts, image_reference, judge_rows, normal_batches, saved_verdicts,
                           utility_metrics)
from evals.suites import (NORMAL_READERS, READERS, AttackSample, Suite, SuiteError, SuiteOptions, SuiteReader,
                          load_normal, load_suites, parse_suite_spec)
from ref import kernels as kernel_registry
from harness.devices import default_dtype
from ref.config import DTYPES, read_json
from harness.console import (HelpFormatter, LoadProgressLine, Progress, add_debug_option, exit_on_user_error, non_negative_int,
                         positive_int)
from ref.data import PROMPT_FORMATS, load_processor
from ref.distributed import Distributed
from ref.adapters import is_adapter_folder, load_adapter
from ref.lora import remove_adapters
from harness.models import load_base
from harness.readers import read_jsonl
from harness.runs import (adapter_display_name, adapter_step, is_run_folder, read_run_args, read_train_summary,
                      run_adapters, run_folder_of, write_atomically)
from ref.weights import is_quantized_checkpoint, load_model, open_checkpoint
from worlds.embedded import DEFAULT_WORLD, EmbeddedWorld, require_world_model, world_of

ROOT = Path(__file__).resolve().parent
# eval.py knows every suite kind, normal-data kind and judge of evals/, and the toy's (its bare default).
SUITE_READERS = {**READERS, **BENCHMARK_READERS, **DEFAULT_WORLD.suite_readers}  # the toy's pgd reader reads pgd:JSONL too
NORMAL_DATA_READERS = {**NORMAL_READERS, **DEFAULT_WORLD.normal_readers}
JUDGES = {**judge_registry.JUDGES, **DEFAULT_WORLD.judges}
PHRASE_JUDGES = sorted({*judge_registry.PHRASE_JUDGES, *DEFAULT_WORLD.phrase_judges})  # for --refusal-judge


class EvalError(ValueError):
    """An option or adapter eval.py cannot use; raised before any generation starts."""


# ---------------------------------------------------------------------------------------------------------------------
# 1. Options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    width = max(map(len, SUITE_READERS))
    suite_kinds = "\n".join(f"  {k:<{width}} {v.description}" for k, v in SUITE_READERS.items())
    normal_kinds = "\n".join(f"  {k:<10} {v.description}" for k, v in NORMAL_DATA_READERS.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog=f"suite kinds (--suite [NAME=]KIND:PATH):\n{suite_kinds}\n\nnormal data kinds (--normal KIND:PATH):\n"
               f"{normal_kinds}\n\njudges: {', '.join(sorted(JUDGES))}")
    io = p.add_argument_group("models")
    io.add_argument("--model", default=str(DEFAULT_WORLD.model),
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
    io.add_argument("--threads", type=int, default=None,
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
    data.add_argument("--max-samples", type=int, default=None,
                      help="use only the first N samples of every suite and of the normal data")
    data.add_argument("--prompt-column", default=None,
                      help="text suites: the column (field) holding the prompt, where the file's is not one of the\n"
                           "names the field's prompt sets use (goal, Goal, Behavior, prompt, forbidden_prompt, ...)")
    data.add_argument("--piece-column", default=None,
                      help="pieces suites: the CSV column holding the key phrase (default: the harmful prompt "
                           "column the text reader finds)")

    judging = p.add_argument_group("judges")
    judging.add_argument("--judge", action="append", default=None, choices=sorted(JUDGES),
                         help="judge for attack suites, repeatable (each gets its own columns).\n"
                              "Default: 'toy' (refusal phrases) and 'toy_harm' (harmful steps given) with the toy "
                              "model, else 'gcg'")
    judging.add_argument("--refusal-judge", default=None, choices=PHRASE_JUDGES,
                         help="phrase judge deciding refusals on over-refusal suites (default: 'toy' with the toy "
                              "model, else 'xstest')")
    judging.add_argument("--judge-model", action="append", default=None, metavar="[JUDGE=]DIR",
                         help="model folder of an LLM judge (llamaguard, llamaguard_jbb, harmbench), repeatable: a\n"
                              "text-only LLaMA checkpoint (LlamaForCausalLM safetensors + tokenizer.json) or a LLaVA\n"
                              "folder. A plain DIR serves every LLM judge without a folder of its own")
    judging.add_argument("--judge-quantize", default="none", choices=["none", "nf4", "fp4"],
                         help="the judge model's linears: dense (default) or 4 bit")

    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per response (default 64)")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts per generation / utility batch (default 16)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed; batch k uses seed + k")

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
    attack.add_argument("--pgd-steps", type=non_negative_int, default=None,
                        help="sign-gradient steps per restart (default 300; Qi et al.: 5000)")
    attack.add_argument("--pgd-step-size", type=positive_int, default=None, metavar="LEVELS",
                        help="step size alpha in levels of 1/255 (default 1)")
    attack.add_argument("--pgd-restarts", type=positive_int, default=None,
                        help="restarts from random points of the budget, the best iterate kept (default 1)")
    attack.add_argument("--pgd-seed", type=int, default=None, help="seed of the random starts (default 0)")
    attack.add_argument("--pgd-batch-size", type=positive_int, default=None, metavar="ROWS",
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
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max-samples must be >= 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be >= 1")
    return args


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


def is_world_spec(spec: str, world: EmbeddedWorld) -> bool:
    """A suite of the embedded world: one of its suite kinds (toy[:NAME]) or its pgd clean images (pgd:toy)."""
    _, kind, path = parse_suite_spec(spec, SUITE_READERS)
    return path == world.pgd_suite if kind == "pgd" else kind in world.suite_readers


def resolve_defaults(args: argparse.Namespace, root: Path = ROOT) -> argparse.Namespace:
    """The embedded default: with the toy model, its suites, its judges, its normal data, the run adapters."""
    require_world_model(args.model)
    world = world_of(args.model)
    if args.suite is None:
        if world is None:
            raise EvalError("give at least one --suite KIND:PATH for a model other than the toy (see --help)")
        args.suite = list(world.eval_suites)
    # A toy model (or a toy rebuilt elsewhere, evaluated on the toy suites) is judged by the toy's own judges.
    if world is None and all(is_world_spec(spec, DEFAULT_WORLD) for spec in args.suite):
        world = DEFAULT_WORLD
    is_toy = world is not None
    args.judge = list(dict.fromkeys(args.judge or (list(world.eval_judges) if is_toy else ["gcg"])))  # each once
    args.refusal_judge = args.refusal_judge or (world.refusal_judge if is_toy else "xstest")
    if args.normal is None:
        args.normal = world.normal if is_toy else "none"
    if args.threads is None and is_toy:
        args.threads = world.threads
    # An interrupted run in --out keeps the dtype and kernels it was started with unless they are given: repeating its
    # command resumes it even where these defaults have changed since (float32 and reference before bfloat16 and fast)
    started = interrupted_run_settings(Path(args.out)) if args.out else {}
    args.dtype = args.dtype or started.get("dtype") or ("float32" if is_toy else default_dtype(args.device))
    args.kernels = args.kernels or started.get("kernels") or ("reference" if is_toy else "fast")
    if args.no_adapters:
        args.adapter = []
    elif args.adapter is None:
        args.adapter = [str(p) for p in sorted((root / "runs").glob("*/adapter")) if p.is_dir()] if is_toy else []
    return args


PGD_DEFAULTS = {"pgd_eps": [16, 32, 64, 255], "pgd_threat": list(pgd.THREATS), "pgd_steps": 300,
                "pgd_step_size": 1, "pgd_restarts": 1, "pgd_seed": 0, "pgd_batch_size": 32}


def resolve_pgd(args: argparse.Namespace, suites: list[Suite]) -> tuple[list[Suite], list[str]]:
    """The suites with every pgd suite expanded into its attack suites (evals.pgd.expand_suites), and the target
    corpus. The --pgd-* defaults are filled in on `args` (run.json records them); --pgd-* options without a pgd suite,
    and a pgd suite without targets (other than pgd:toy's), are errors naming the option."""
    clean = [s for s in suites if s.kind == "pgd"]
    if not clean:
        given = [f"--{key.replace('_', '-')}" for key in (*PGD_DEFAULTS, "pgd_targets")
                 if getattr(args, key) is not None]
        if given:
            raise EvalError(f"{', '.join(given)}: no pgd suite to attack; add --suite [NAME=]pgd:JSONL (or pgd:toy)")
        return suites, []
    for key, value in PGD_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pgd_targets is not None:
        try:
            targets = pgd.read_targets(args.pgd_targets)
        except pgd.PGDError as err:
            raise EvalError(f"--pgd-targets: {err}") from err
    else:
        not_toy = [s for s in clean if parse_suite_spec(s.source, SUITE_READERS)[2] != DEFAULT_WORLD.pgd_suite]
        if not_toy:
            raise EvalError(f"--pgd-targets FILE is needed for pgd suite {not_toy[0].name!r} ({not_toy[0].source}): "
                            f"the answers the attack makes likely (.txt, one a line, or .csv)")
        targets = DEFAULT_WORLD.pgd_targets()
    # eps 0 is the clean images, a control: no step could move them, so none is taken
    configs = [pgd.PGDConfig(eps=e / pgd.LEVELS, steps=args.pgd_steps if e else 0, restarts=args.pgd_restarts,
                             step_size=args.pgd_step_size / pgd.LEVELS, seed=args.pgd_seed,
                             batch_size=args.pgd_batch_size) for e in args.pgd_eps]
    targets_file = Path(args.pgd_targets) if args.pgd_targets else None
    expanded = pgd.expand_suites(suites, configs, args.pgd_threat, targets_file)
    names = [s.name for s in expanded]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise SuiteError(f"suite name(s) {clash} used twice (a pgd suite makes <NAME>_<budget>_<threat>); name them "
                         f"apart with --suite NAME=KIND:PATH")
    return expanded, targets


def default_out(root: Path = ROOT) -> Path:
    """runs/eval, or the first of runs/eval-2, runs/eval-3, ... that holds no finished run: a bare `python eval.py`
    run twice keeps both reports."""
    candidate, n = root / "runs" / "eval", 1
    while (candidate / REPORT_FILE).is_file():
        n += 1
        candidate = root / "runs" / f"eval-{n}"
    return candidate


def adapter_run_args(adapters: list[tuple[str, Path]]) -> dict[str, dict]:
    """The options of the train.py run behind each adapter that has one (its args.json), by adapter name."""
    return {name: read_run_args(run) for name, folder in adapters if (run := run_folder_of(folder)) is not None}


def resolve_quantize(requested: str, run_args: dict[str, dict]) -> str:
    """--quantize auto -> the quantization every adapter's train.py run recorded (they must agree), else none."""
    if requested != "auto":
        return requested
    recorded = {name: saved.get("quantize") for name, saved in run_args.items()}
    choices = {q for q in recorded.values() if q}
    if len(choices) > 1:
        raise EvalError(f"the adapters were trained on differently quantized bases {recorded}; choose one with "
                        f"--quantize none|nf4|fp4")
    return choices.pop() if choices else "none"


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
    clash = sorted({n for n in names if names.count(n) > 1 or n == "base"})
    if clash:
        raise EvalError(f"adapter name(s) {clash} clash (with each other or with 'base'); name them: "
                        f"--adapter NAME=DIR")
    for name, folder in adapters:
        if not folder.is_dir():
            raise EvalError(f"--adapter {name}: {folder}: no such folder")
    return adapters


# ---------------------------------------------------------------------------------------------------------------------
# 2. Models


def check_adapters(model, adapters: list[tuple[str, Path]], run_args: dict[str, dict],
                   model_dir: str) -> dict[str, dict | None]:
    """Load each adapter onto the base and remove it again: an adapter for another model fails now, not mid-run.
    Returns each adapter's train.py summary (tokens, FLOPs, seconds) where its run folder has one."""
    summaries = {}
    for name, folder in adapters:
        load_adapter(model, folder)  # LoraError naming the key when it does not fit this model
        remove_adapters(model)
        summaries[name] = read_train_summary(folder)
        trained_on = run_args.get(name, {}).get("model")
        if trained_on and Path(trained_on).resolve() != Path(model_dir).resolve():
            warnings.warn(f"adapter {name} ({folder}) was trained on {trained_on}, evaluated on {model_dir}")
    return summaries


class JudgeModelGenerate:
    """generate(prompts, max_new_tokens) -> texts over a judge model run by our decoder: a text-only LLaMA checkpoint
    (LlamaGuard, HarmBench's classifier) or a LLaVA folder, greedy. Each prompt is sent as written (it carries the
    judge's own template) after the BOS token, as LLaMA's tokenizer encodes a string: HarmBench's pipeline (vLLM on
    the prompt string) and llama-recipes' LlamaGuard example (tokenizer([prompt])) both send BOS."""

    def __init__(self, judge_dir: str, device: str, dtype: str, quantize: str, batch_size: int,
                 kernels: kernel_registry.Kernels | None = None):
        self.judge_dir = judge_dir
        self.processor = load_processor(judge_dir)
        self.model = load_model(judge_dir, dtype=DTYPES[dtype], device=device, progress=LoadProgressLine(),
                                quantize=None if quantize == "none" else quantize, kernels=kernels)
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        samples = [AttackSample(f"judge-{i}", "judge", p) for i, p in enumerate(prompts)]
        ids = [self.processor.tokenizer.encode(p, add_bos=True) for p in prompts]
        for prompt, prompt_ids in zip(prompts, ids):
            if len(prompt_ids) + max_new_tokens > self.processor.max_length:
                raise EvalError(f"judge model {self.judge_dir}: a judge prompt of {len(prompt_ids)} tokens does not "
                                f"fit its context of {self.processor.max_length}: {prompt[:80]!r}...")
        progress = Progress(f"[judge] {Path(self.judge_dir).name}", len(prompts), "prompts")
        outs = generate_responses(self.model, self.processor, samples, ids, Sampling(max_new_tokens=max_new_tokens),
                                  self.batch_size, progress)
        progress.close()
        return [o.response for o in outs]


def check_judge_model(folder: str) -> None:
    """A judge model folder that cannot load fails now, before any generation: its config, its tokenizer.json, and
    every weight's key, shape and dtype in the safetensors headers (no tensor data is read)."""
    load_processor(folder)
    if not is_quantized_checkpoint(folder):
        open_checkpoint(folder)


def judge_model_dirs(specs: list[str] | None, names: list[str]) -> dict[str, str]:
    """--judge-model [JUDGE=]DIR, repeatable -> the model folder of every model judge named; a plain DIR serves every
    model judge that has no folder of its own."""
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


class Judges:
    """The judges by name, made one at a time: a judge model is loaded when its judge comes, and kept only while the
    next judge runs the same folder (LlamaGuard and its JailbreakBench variant share one)."""

    def __init__(self, args: argparse.Namespace, names: list[str]):
        self.args = args
        self.names = names
        self.model_dirs = judge_model_dirs(args.judge_model, names)
        self.generate: JudgeModelGenerate | None = None

    def __iter__(self):
        """(name, judge) in turn; the caller drops each judge before asking for the next, so that the previous judge
        model is freed before the next is loaded."""
        for name in self.names:
            folder = self.model_dirs.get(name)
            if folder is not None and (self.generate is None or self.generate.judge_dir != folder):
                self.release()
                self.generate = JudgeModelGenerate(folder, self.args.device, self.args.dtype,
                                                   self.args.judge_quantize, self.args.batch_size,
                                                   kernel_registry.resolve(self.args.kernels))
            yield name, judge_registry.judge(name, JUDGES, generate=self.generate if folder else None)
        self.release()

    def release(self) -> None:
        self.generate = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# 3. The run folder: what decides the responses, and the responses saved as they come


RUN_FILE, GENERATIONS_FILE, UTILITY_FILE = "run.json", "generations.jsonl", "utility.jsonl"
RESPONSES_FILE, REPORT_FILE = "responses.jsonl", "report.json"
PGD_DIR, PGD_FILE = "pgd", "pgd.jsonl"  # the adversarial PNGs, and one line per PNG


def run_settings(args: argparse.Namespace, adapters: list[tuple[str, Path]]) -> dict:
    """Everything that decides the responses; an interrupted run resumes only under the same settings."""
    return {"model": str(Path(args.model).resolve()), "vision_dir": args.vision_dir, "quantize": args.quantize,
            "dtype": args.dtype, "kernels": args.kernels, "prompt_format": args.prompt_format,
            "adapters": [[name, str(folder.resolve())] for name, folder in adapters], "suites": list(args.suite),
            "max_samples": args.max_samples, "piece_column": args.piece_column,
            "prompt_column": args.prompt_column, "normal": args.normal, "pgd": pgd_settings(args),
            "generation": {"mode": "sampling" if args.sample else "greedy", "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                           "batch_size": args.batch_size}}


def pgd_settings(args: argparse.Namespace) -> dict | None:
    """The --pgd-* options (resolved by `resolve_pgd`), the target corpus by its path or as the toy's; None without
    a pgd suite."""
    if getattr(args, "pgd_eps", None) is None:
        return None
    targets = str(Path(args.pgd_targets).resolve()) if args.pgd_targets else "toy"
    return {"targets": targets, **{key[len("pgd_"):]: getattr(args, key) for key in PGD_DEFAULTS}}


def interrupted_run_settings(out: Path) -> dict:
    """The settings recorded in `out`'s run.json when it holds a run (read leniently: open_run_folder checks it)."""
    try:
        saved = json.loads((out / RUN_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    settings = saved.get("settings") if isinstance(saved, dict) else None
    if not isinstance(settings, dict):
        return {}
    known = {"dtype": DTYPES, "kernels": kernel_registry.PRESETS}
    return {key: settings[key] for key, values in known.items() if settings.get(key) in values}


def open_run_folder(out: Path, run: dict) -> None:
    """Start a run in `out` (a new or empty folder), or find there an interrupted run of the same settings to resume.
    A finished run, a run of other settings and a folder that is not a run are refused: nothing is overwritten."""
    if out.is_file():
        raise EvalError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / RUN_FILE).is_file():
            raise EvalError(f"--out {out}: holds files but no {RUN_FILE}, so it is not an eval.py run; choose "
                            f"another --out")
        if (out / REPORT_FILE).is_file():
            raise EvalError(f"--out {out}: holds a finished evaluation ({REPORT_FILE}); re-score it with --rejudge "
                            f"{out}, or choose another --out")
        saved = read_json(out / RUN_FILE, EvalError)
        before = saved.get("settings", {})
        differences = sorted(key for key in run["settings"] if before.get(key) != run["settings"][key])
        if differences:
            raise EvalError(f"--out {out}: holds an interrupted run with other settings ({', '.join(differences)}); "
                            f"resume it with the same options, or choose another --out")
        if saved.get("provenance", {}).get("sha256") != run["provenance"]["sha256"]:
            raise EvalError(f"--out {out}: the model config, an adapter or a suite file changed since the interrupted "
                            f"run began (their sha256 in {RUN_FILE}); its responses would not match: choose another "
                            f"--out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / RUN_FILE, lambda p: p.write_text(json.dumps(run, indent=1) + "\n"))


def new_run_record(args: argparse.Namespace, adapters: list[tuple[str, Path]], suites, normal) -> dict:
    """run.json as a run starts: its settings, suites and the sha256 of its inputs (the models come once loaded)."""
    settings = run_settings(args, adapters)
    return {"settings": settings, "model": str(args.model), "quantize": args.quantize, "dtype": args.dtype,
            "refusal_judge": args.refusal_judge,
            "prompt_format": args.prompt_format, "generation": settings["generation"],
            "normal": {"spec": args.normal, "n": len(normal)} if normal else None,
            "suite_list": [suite_entry(s) for s in suites],
            "provenance": report_provenance(ROOT, args.model, adapters, suites)}


def suite_entry(suite: Suite) -> dict:
    """What run.json and the report keep of a suite: the attack behind a pgd suite's images too."""
    entry = {"name": suite.name, "kind": suite.kind, "n": len(suite.samples), "source": suite.source}
    if isinstance(suite, pgd.PGDSuite):
        entry["pgd"] = suite.describe()
    return entry


def start_or_resume(out: Path, run: dict, suites) -> tuple[set[tuple[str, str]], set[str]]:
    """Open the run folder (`open_run_folder`); return the (model, suite) blocks and the models an interrupted run
    there already finished, which are not generated again."""
    open_run_folder(out, run)
    done = set(saved_blocks(out, {s.name: len(s.samples) for s in suites}))
    finished = finished_models(out)
    if done:
        print(f"eval: resuming {out}: {len(done)} (model, suite) blocks already generated", file=sys.stderr)
    return done, finished


def read_jsonl_lines(path: Path) -> list[dict]:
    """The complete lines of a file this program appends to (harness.readers' rule: a last line cut short by a kill is
    dropped, and generated again; a bad line before it is an error naming it)."""
    return [row for _, row in read_jsonl(path, EvalError, appended=True)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomically(path, lambda p: p.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows)))


def saved_blocks(out: Path, sizes: dict[str, int]) -> dict[tuple[str, str], list[dict]]:
    """The (model, suite) blocks of responses an interrupted run saved whole. generations.jsonl is rewritten without
    the lines and blocks a kill cut short (so that new lines append to whole ones); those are generated again."""
    blocks: dict[tuple[str, str], list[dict]] = {}
    for row in read_jsonl_lines(out / GENERATIONS_FILE):
        blocks.setdefault((row["model"], row["suite"]), []).append(row)
    whole = {key: rows for key, rows in blocks.items() if len(rows) == sizes.get(key[1])}
    write_jsonl(out / GENERATIONS_FILE, [row for rows in whole.values() for row in rows])
    return whole


def finished_models(out: Path) -> set[str]:
    """The models an interrupted run finished (their utility line written); utility.jsonl rewritten whole."""
    entries = read_jsonl_lines(out / UTILITY_FILE)
    write_jsonl(out / UTILITY_FILE, entries)
    return {entry["model"] for entry in entries}


def append_lines(path: Path, rows: list[dict]) -> None:
    with path.open("a") as f:
        f.write("".join(json.dumps(row, default=str) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------------
# 4. Generating: every model on every suite, each (model, suite) block saved as soon as it is done


PGD_IMAGES_PER_ATTACK = 8  # images optimised together (each against its own prompt and the whole target corpus)


class PGDAttacks:
    """The adversarial images of a run's pgd suites, each (attacker model, pgd suite, budget) attacked once: PNGs in
    OUT/pgd/<model>/<suite>_<budget>/, and one line per image in OUT/pgd.jsonl (clean and adversarial target NLL,
    L-inf, seconds per image, peak memory), appended once every PNG of the attack is written. A resumed run reuses an
    attack whose lines and PNGs are there; one a kill cut short has no lines, and is made again."""

    def __init__(self, out: Path, processor, targets: list[str], prompt_format: str):
        self.out, self.processor, self.targets, self.prompt_format = out, processor, targets, prompt_format
        self.saved: dict[tuple[str, str, str], list[dict]] = {}
        for row in self.rewrite():
            self.saved.setdefault((row["model"], row["suite"], row["budget"]), []).append(row)
        self.made: dict[tuple[str, str, str], list[AttackSample]] = {}

    def rewrite(self, drop: tuple[str, str, str] | None = None) -> list[dict]:
        """pgd.jsonl without a line a kill cut short (so that new lines append to whole ones) and the lines of
        `drop`, an attack about to be made again."""
        rows = [r for r in read_jsonl_lines(self.out / PGD_FILE) if (r["model"], r["suite"], r["budget"]) != drop]
        write_jsonl(self.out / PGD_FILE, rows)
        return rows

    def samples(self, model, model_name: str, suite: pgd.PGDSuite) -> list[AttackSample]:
        """The suite's samples with their adversarial images when `model_name` is evaluated: made or saved before, or
        attacked now by `model` as it is (the attacker itself: the base for transfer, the adapted model for
        white-box)."""
        key = (suite.attacker(model_name), suite.clean_suite, suite.config.name)
        if key not in self.made:
            rows = self.saved.get(key)
            if self.complete(rows, suite):
                print(self.summary(key, rows, "saved by the interrupted run, reused"), file=sys.stderr)
            else:
                if key[0] != model_name:  # eval.py makes the base's images before any adapter is loaded
                    raise RuntimeError(f"pgd: the images of {key} must be made by {key[0]}, not {model_name}")
                rows = self.attack(model, key, suite)
            self.made[key] = [replace(clean, image=self.out / row["png"], image_name=Path(row["png"]).name,
                                      source={**clean.source, "pgd": row})
                              for clean, row in zip(suite.samples, rows)]
        return [replace(sample, suite=suite.name) for sample in self.made[key]]

    def complete(self, rows: list[dict] | None, suite: pgd.PGDSuite) -> bool:
        """A saved attack of these images with these settings, every PNG in place."""
        return (rows is not None and [r["id"] for r in rows] == [s.id for s in suite.samples]
                and all(r["config"] == asdict(suite.config) and (self.out / r["png"]).is_file() for r in rows))

    def attack(self, model, key: tuple[str, str, str], suite: pgd.PGDSuite) -> list[dict]:
        """Attack the suite's clean images with `model`, save the PNGs, then their lines; returns the lines."""
        self.rewrite(drop=key)
        folder = self.out / PGD_DIR / key[0] / f"{key[1]}_{key[2]}"
        attacks = -(-len(suite.samples) // PGD_IMAGES_PER_ATTACK)
        progress = Progress(f"[{key[0]}] PGD {key[1]} {key[2]}", attacks * suite.config.restarts * suite.config.steps,
                            "steps", min_seconds=10)  # in a log: a line every 10 s, not one per step
        _, records = pgd.attack_samples(model, self.processor, suite.samples, self.targets, suite.config, folder,
                                        prompt_format=self.prompt_format, images_per_attack=PGD_IMAGES_PER_ATTACK,
                                        progress=progress)
        progress.close()
        rows = [{"model": key[0], "suite": key[1], **record, "png": (folder / record["png"]).relative_to(self.out)
                 .as_posix()} for record in records]
        append_lines(self.out / PGD_FILE, rows)
        print(self.summary(key, rows, str(folder)), file=sys.stderr)
        return rows

    @staticmethod
    def summary(key: tuple[str, str, str], rows: list[dict], where: str) -> str:
        """One line per attack: what it did to the target NLL, its time per image and its peak memory."""
        return f"eval: [{key[0]}] PGD {key[1]} {key[2]}: " + pgd_attack_line(pgd_attack_summary(rows)) + f" ({where})"


def pgd_attack_summary(rows: list[dict]) -> dict:
    """One attack's lines of pgd.jsonl in a few numbers (means over its images; peak memory: the largest)."""
    config = rows[0]["config"]
    return {"model": rows[0]["model"], "suite": rows[0]["suite"], "budget": rows[0]["budget"], "images": len(rows),
            "steps": config["steps"], "restarts": config["restarts"],
            "clean_nll": sum(r["clean_nll"] for r in rows) / len(rows),
            "adv_nll": sum(r["adv_nll"] for r in rows) / len(rows),
            "max_linf_levels": max(r["linf_levels"] for r in rows),
            "seconds_per_image": sum(r["seconds_per_image"] for r in rows) / len(rows),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in rows)}


def pgd_attack_line(entry: dict) -> str:
    return (f"{entry['images']} image(s), {entry['steps']} steps x {entry['restarts']} restart(s), target NLL "
            f"{entry['clean_nll']:.4f} -> {entry['adv_nll']:.4f} (mean per token), L-inf <= "
            f"{entry['max_linf_levels']}/255, {entry['seconds_per_image']:.2f} s/image, peak "
            f"{entry['peak_memory_mb']:.0f} MiB")


def make_base_images(model, attacks: PGDAttacks, suites, names: list[str], done: set) -> None:
    """The base's images of every pgd suite that a model still to generate shows (transfer, and the base's own
    white-box), made now, while the model is the base: before any adapter is loaded."""
    for suite in suites:
        if isinstance(suite, pgd.PGDSuite) and any(suite.attacker(name) == "base" and (name, suite.name) not in done
                                                   for name in names):
            attacks.samples(model, "base", suite)


def with_adversarial_images(model, name: str, suites, attacks: PGDAttacks | None, done: set) -> list:
    """The suites `name` is generated on: each pgd suite it still lacks with the adversarial images it is shown."""
    return [replace(suite, samples=attacks.samples(model, name, suite))
            if isinstance(suite, pgd.PGDSuite) and (name, suite.name) not in done else suite for suite in suites]


def generation_rows(name: str, adapter_dir: Path | None, suite, generations, prompt_format: str) -> list[dict]:
    return [{"model": name, "adapter": None if adapter_dir is None else str(adapter_dir), "suite": suite.name,
             "kind": suite.kind, "id": sample.id, "prompt": sample.prompt, "request": sample.judged_request,
             "category": sample.category, "context": sample.judge_context,
             "image": image_reference(sample),
             "chat_prompt": chat_prompt(sample, prompt_format), "response": generation.response,
             "new_tokens": generation.new_tokens, "stopped_at_eos": generation.stopped_at_eos,
             "expected": sample.source.get("expected"), "source": sample.source}
            for sample, generation in zip(suite.samples, generations)]


def generate_for_model(model, name: str, adapter_dir: Path | None, processor, suites, prompt_ids, normal_data,
                       sampling: Sampling, args, out: Path, done: set, world: Distributed = Distributed()) -> None:
    """Generate every suite not yet saved for this model, then its utility on the normal data. Every rank takes its
    share of the batches and gets every result; rank 0 saves them."""
    start = time.perf_counter()
    for suite in suites:
        if (name, suite.name) in done:
            continue
        progress = Progress(f"[{name}] {suite.name}", len(suite.samples), "prompts") if world.is_main else None
        generations = generate_responses(model, processor, suite.samples, prompt_ids[suite.name], sampling,
                                         args.batch_size, progress, world)
        if world.is_main:
            progress.close()
            append_lines(out / GENERATIONS_FILE, generation_rows(name, adapter_dir, suite, generations,
                                                                 args.prompt_format))
    entry = {"model": name, "generation_seconds": time.perf_counter() - start}
    if normal_data:
        start = time.perf_counter()
        entry["utility"] = utility_metrics(model, normal_data, has_adapter=adapter_dir is not None, world=world)
        entry["utility_seconds"] = time.perf_counter() - start
    if world.is_main:
        append_lines(out / UTILITY_FILE, [entry])


# ---------------------------------------------------------------------------------------------------------------------
# 5. Judging and the report (also what --rejudge runs, on a finished run's saved responses)


def saved_run_blocks(out: Path, run: dict) -> dict[tuple[str, str], list[dict]]:
    """Every (model, suite) block of generations.jsonl, in the run's order, each checked whole against run.json."""
    for key in ("models", "suite_list"):
        if key not in run:
            raise EvalError(f"{out / RUN_FILE}: no {key!r}: not the record of a run that finished generating")
    rows = read_jsonl_lines(out / GENERATIONS_FILE)
    blocks = {}
    for (model, _, _), suite in product(run["models"], run["suite_list"]):
        block = [r for r in rows if r.get("model") == model and r.get("suite") == suite["name"]]
        if len(block) != suite["n"]:
            raise EvalError(f"{out / GENERATIONS_FILE}: {len(block)} responses of {model} on {suite['name']}, where "
                            f"the run generated {suite['n']}: the file was changed or cut short")
        blocks[(model, suite["name"])] = block
    return blocks


def previous_verdicts(out: Path, blocks: dict, attack_blocks: list, judge_names: list[str]) -> dict:
    """The rows of responses.jsonl by (model, suite) block, matched to generations.jsonl by position (ids need not be
    unique), for the judges whose saved verdicts are kept; a missing file, row or verdict is an error."""
    if not judge_names:
        return {}
    saved: dict[tuple[str, str], list[dict]] = {}
    for row in read_jsonl_lines(out / RESPONSES_FILE):
        saved.setdefault((row.get("model"), row.get("suite")), []).append(row)
    for key in attack_blocks:
        rows = saved.get(key, [])
        missing = [name for name in judge_names if len(rows) != len(blocks[key])
                   or any(name not in row.get("attack_success", {}) for row in rows)]
        if missing:
            raise EvalError(f"{out / RESPONSES_FILE}: no saved verdicts of {missing} for every response of {key[0]} on "
                            f"{key[1]}; name those judges again with --judge")
    return saved


JUDGE_INPUT = ("LLM judges read each attack's request: the prompt of a text attack, the harmful request an image "
               "attack carries (FigStep: SafeBench's question; image pieces: the key phrase; benchmarks that give one: "
               "their own request column).")


def judge_run(out: Path, run: dict, judges: Judges, refusal_judge: RefusalPhraseJudge, started: float) -> dict:
    """Judge every saved response, write responses.jsonl, report.json and report.md; return the report. Judges of an
    earlier judging of this run that are not named again keep their saved verdicts."""
    blocks = saved_run_blocks(out, run)
    attack_blocks = [(model, suite["name"]) for (model, _, _), suite in product(run["models"], run["suite_list"])
                     if suite["kind"] == "attack"]
    earlier_judges = [name for name in run.get("judges", []) if name not in judges.names]
    previous = previous_verdicts(out, blocks, attack_blocks, earlier_judges)
    verdicts = {name: {key: saved_verdicts(previous[key], name) for key in attack_blocks} for name in earlier_judges}
    notes = dict(run.get("judge_notes", {}))
    for name, judge_ in judges:
        verdicts[name] = {key: attack_verdicts(judge_, blocks[key]) for key in attack_blocks}
        notes[name] = judge_.success_means
        del judge_  # its model goes before the next judge's comes
    utility = {entry["model"]: entry for entry in read_jsonl_lines(out / UTILITY_FILE)}
    models, judged = [], []
    for model_name, adapter, train in run["models"]:
        entry = {"name": model_name, "adapter": adapter, "suites": {}, "train": train,
                 **{k: v for k, v in utility.get(model_name, {}).items() if k != "model"}}
        for suite in run["suite_list"]:
            key = (model_name, suite["name"])
            block_verdicts = {name: by_block[key] for name, by_block in verdicts.items() if key in by_block}
            row_verdicts, entry["suites"][suite["name"]] = judge_rows(suite["kind"], blocks[key], block_verdicts,
                                                                      refusal_judge)
            judged += [{**row, **verdict} for row, verdict in zip(blocks[key], row_verdicts)]
        models.append(entry)
    write_jsonl(out / RESPONSES_FILE, judged)
    judge_names = list(verdicts)
    report = {**{k: run[k] for k in ("model", "quantize", "dtype", "prompt_format", "generation", "normal",
                                     "provenance")},
              "judges": judge_names, "refusal_judge": refusal_judge.name,
              "judge_notes": {name: notes[name] for name in judge_names},
              "judge_models": {**run.get("judge_models", {}), **judges.model_dirs},
              "judge_input": JUDGE_INPUT if any(n in judge_registry.MODEL_JUDGES for n in judge_names) else "",
              **pgd_report(out, run["suite_list"], judge_names),
              "suites": run["suite_list"], "models": models, "responses": str(out / RESPONSES_FILE),
              "argv": sys.argv[1:], "seconds": time.perf_counter() - started}
    run.update(judges=judge_names, judge_notes=report["judge_notes"], judge_models=report["judge_models"],
               refusal_judge=refusal_judge.name)
    write_atomically(out / RUN_FILE, lambda p: p.write_text(json.dumps(run, indent=1) + "\n"))
    _, md_path = write_report(out, report)
    print(md_path.read_text())
    print(f"eval: {report['seconds']:.1f} s; report in {out / REPORT_FILE}, {md_path}, responses in "
          f"{out / RESPONSES_FILE}", file=sys.stderr)
    return report


def pgd_report(out: Path, suite_list: list[dict], judge_names: list[str]) -> dict:
    """For a run with pgd suites: every attack in a few numbers (pgd.jsonl), and how to read their ASR."""
    names = [s["name"] for s in suite_list if "pgd" in s]
    if not names:
        return {}
    attacks: dict[tuple[str, str, str], list[dict]] = {}
    for row in read_jsonl_lines(out / PGD_FILE):
        attacks.setdefault((row["model"], row["suite"], row["budget"]), []).append(row)
    phrase = [j for j in judge_names if j in PHRASE_JUDGES]
    harm = [j for j in judge_names if j not in PHRASE_JUDGES]
    note = (f"PGD suites ({', '.join(names)}): benign prompts on images optimised (PGD, L-inf budget in the name) to "
            f"make the target answers likely; transfer: the base's images shown to every model; whitebox: images "
            f"optimised against the model of the row, its adapter on (on the base, the transfer images). Their "
            f"prompts are benign, so a refusal-phrase judge counts every answer that is not a refusal as a success")
    note += (f": the ASR of {', '.join(phrase)} there is the rate of answers not refused, not of harmful ones"
             if phrase else "")
    note += (f"; harm is what {', '.join(harm)} judge{'s' if len(harm) == 1 else ''}." if harm else
             "; add a harm judge (toy_harm on the toy; llamaguard or harmbench on a real model) to see harm.")
    return {"pgd_attacks": [pgd_attack_summary(rows) for rows in attacks.values()], "pgd_note": note}


# ---------------------------------------------------------------------------------------------------------------------
# 6. The run


def run(args: argparse.Namespace, world: Distributed | None = None) -> dict | None:
    """The evaluation (or --rejudge); its report on rank 0, None on the other ranks of a torchrun launch."""
    started = time.perf_counter()
    world = Distributed.from_environment(args.device) if world is None else world
    if args.rejudge:  # judging is rank 0's alone
        leave_process_group(world)
        return rejudge(args, started) if world.is_main else None
    args.device = rank_device(args.device, world)
    args = resolve_defaults(args)
    adapters = parse_adapters(args.adapter)
    run_args = adapter_run_args(adapters)
    args.quantize = resolve_quantize(args.quantize, run_args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernels = kernel_registry.resolve(args.kernels)
    processor = load_processor(args.model, args.vision_dir)

    # Everything that can be wrong with the inputs is found here, before the first token is generated.
    out = Path(args.out) if args.out else default_out()
    options = SuiteOptions(args.max_samples, processor.image_size, args.piece_column, args.prompt_column)
    suites, pgd_targets = resolve_pgd(args, load_suites(args.suite, options, SUITE_READERS))
    if world.enabled and pgd_targets:
        raise EvalError("--suite ...pgd...: the PGD attack runs in one process; run eval.py without torchrun")
    prompt_ids = {s.name: tokenize_samples(processor, s.samples, args.prompt_format, args.max_new_tokens)
                  for s in suites}
    normal = [] if args.normal == "none" else load_normal(args.normal, args.max_samples, NORMAL_DATA_READERS)
    normal_data = list(normal_batches(processor, normal, args.prompt_format, args.batch_size))
    judge_registry.check_names(args.judge + [args.refusal_judge], JUDGES)
    judge_model_dirs(args.judge_model, args.judge)  # a judge model folder that is not one fails now

    # Rank 0 alone keeps the run folder; the other ranks learn from it what an interrupted run saved, so that every
    # rank skips the same work. (A refused --out ends rank 0 here; torchrun then ends the ranks waiting for its answer.)
    done, finished = set(), set()
    if world.is_main:
        done, finished = start_or_resume(out, new_run_record(args, adapters, suites, normal), suites)
    done, finished = world.broadcast_object((done, finished))

    model = load_base(args.model, args.dtype, args.device, args.vision_dir, kernels, args.quantize,
                      show_progress=world.is_main)
    summaries = check_adapters(model, adapters, run_args, args.model)
    if world.is_main:
        ranks = f", {world.world_size} ranks" if world.enabled else ""
        run_record = {**read_json(out / RUN_FILE, EvalError), "models": [["base", None, None]] + [
            [name, str(folder), summaries[name]] for name, folder in adapters]}
        write_atomically(out / RUN_FILE, lambda p: p.write_text(json.dumps(run_record, indent=1) + "\n"))
        print(f"eval: model {args.model} ({args.quantize}, {args.dtype}, {args.device}, "
              f"{torch.get_num_threads()} threads{ranks}); models: base"
              + "".join(f", {n}" for n, _ in adapters)
              + "; suites: " + ", ".join(f"{s.name} ({s.kind}, {len(s.samples)})" for s in suites)
              + f"; normal: {args.normal} ({len(normal)}); judges: {', '.join(args.judge)}, refusal: "
              f"{args.refusal_judge}", file=sys.stderr)
    sampling = Sampling(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed)
    to_generate = [(name, folder) for name, folder in [("base", None)] + adapters if name not in finished]
    attacks = PGDAttacks(out, processor, pgd_targets, args.prompt_format) if pgd_targets else None
    if attacks:
        make_base_images(model, attacks, suites, [name for name, _ in to_generate], done)
    for name, folder in to_generate:
        if folder is not None:
            load_adapter(model, folder)  # onto the same base: no reload
        generate_for_model(model, name, folder, processor, with_adversarial_images(model, name, suites, attacks, done),
                           prompt_ids, normal_data, sampling, args, out, done, world)
        if folder is not None:
            remove_adapters(model)
    del model  # the evaluated model goes before a judge model comes
    leave_process_group(world)  # the last collective is behind us: rank 0 judges alone, the others are done
    if not world.is_main:
        return None
    return judge_run(out, run_record, Judges(args, args.judge), judge_registry.judge(args.refusal_judge, JUDGES),
                     started)


def leave_process_group(world: Distributed) -> None:
    """The torchrun group this run joined; a single process leaves alone any group its caller may have made."""
    if world.enabled:
        world.shutdown()


def rank_device(requested: str, world: Distributed) -> str:
    """--device for this rank. Under torchrun "cuda" is the GPU of the rank's LOCAL_RANK; one GPU named for every rank
    (cuda:1) would put them all on it, which NCCL refuses, so it is refused here, by name."""
    if world.enabled and requested.startswith("cuda:"):
        raise EvalError(f"--device {requested}: under torchrun every rank takes its own GPU (cuda:LOCAL_RANK); give "
                        f"--device cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return world.device(requested)


def rejudge(args: argparse.Namespace, started: float) -> dict:
    """Re-score a finished run's saved responses with --judge (other judges' verdicts are kept as saved), in place;
    the evaluated model is never loaded."""
    out = Path(args.rejudge)
    given = [option for option, value in (("--out", args.out), ("--suite", args.suite), ("--adapter", args.adapter),
                                          ("--normal", args.normal), ("--max-samples", args.max_samples)) if value]
    if given:
        raise EvalError(f"--rejudge {out} re-scores that run's saved responses in place; {', '.join(given)} would "
                        f"change nothing: drop them (a new evaluation needs its own --out)")
    if not (out / RUN_FILE).is_file() or not (out / GENERATIONS_FILE).is_file():
        raise EvalError(f"--rejudge {out}: not an eval.py run folder (no {RUN_FILE} or {GENERATIONS_FILE})")
    run_record = read_json(out / RUN_FILE, EvalError)
    if "models" not in run_record or len(read_jsonl_lines(out / UTILITY_FILE)) < len(run_record["models"]):
        raise EvalError(f"--rejudge {out}: the run did not finish generating; resume it with its own options first")
    args.judge = list(dict.fromkeys(args.judge or run_record.get("judges") or ["gcg"]))
    args.refusal_judge = args.refusal_judge or run_record["refusal_judge"]
    args.dtype = args.dtype or default_dtype(args.device)  # the judge models' (the evaluated one is not loaded)
    args.kernels = args.kernels or "fast"
    judge_registry.check_names(args.judge + [args.refusal_judge], JUDGES)
    judges = Judges(args, args.judge)  # judge model folders checked before anything is judged
    return judge_run(out, run_record, judges, judge_registry.judge(args.refusal_judge, JUDGES), started)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    with exit_on_user_error("eval.py", args.debug):
        world = Distributed.from_environment(args.device)
    # Every rank checks the same inputs, so a bad one usually fails on all of them: each line says whose it is.
    with exit_on_user_error(f"eval.py (rank {world.rank})" if world.enabled else "eval.py", args.debug):
        return run(args, world)


if __name__ == "__main__":
    main()
