"""Evaluate a LLaVA model and its unlearning adapters: attack success rate (text and vision-text attacks),
over-refusal and utility, in one table.

    python eval.py                                           # the embedded toy: base + every runs/*/adapter
    python eval.py --model DIR --adapter runs/textual/adapter \\
        --suite text:advbench.csv --suite figstep:safebench.csv --suite pieces:advbench.csv \\
        --suite xstest:xstest.csv --normal truthfulqa:truthfulqa.csv --out results/

The program, top to bottom (one section each):
  1. options, with the toy's defaults when no model is named; the adapters named and found
  2. models: the base is loaded once; every adapter is checked against it (loaded, then removed again)
  3. evaluating one model: batched greedy generation on every suite, every response judged and written to
     responses.jsonl; NLL / perplexity of the reference answers and KL(p_base || p_model) on the normal data (adapters
     switched off = the base, no second copy)
  4. the run: every suite, the normal data and the judges are read and checked first (bad input fails there, by
     name); then the base and each adapter (loaded onto the same base, removed afterwards) are evaluated; then
     report.json and report.md (rows: models; columns: each suite's metric with its judge, utility, and the training
     compute of train.py runs) go to --out and the table to stdout. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from evals import judges as judge_registry
from evals.generation import Sampling, chat_prompt, generate_responses, tokenize_samples
from evals.report import write_report
from evals.scoring import image_reference, judge_suite, normal_batches, utility_metrics
from evals.suites import NORMAL_READERS, READERS, AttackSample, SuiteOptions, load_normal, load_suites
from ref import kernels as kernel_registry
from ref.config import DTYPES
from ref.console import Progress, exit_on_user_error
from ref.data import load_processor
from ref.lora import load_adapter, remove_adapters
from ref.runs import adapter_display_name, read_run_args, read_train_summary, run_folder_of
from ref.weights import load_model
from toy import defaults as toy
from toy import judges as toy_judges

ROOT = Path(__file__).resolve().parent
# eval.py knows every suite kind, normal-data kind and judge of evals/, and the toy's (its bare default).
SUITE_READERS = {**READERS, "toy": toy.SUITE_READER}
NORMAL_DATA_READERS = {**NORMAL_READERS, "toy": toy.NORMAL_READER}
JUDGES = {**judge_registry.JUDGES, **toy_judges.JUDGES}
PHRASE_JUDGES = sorted({*judge_registry.PHRASE_JUDGES, *toy_judges.PHRASE_JUDGES})  # for --refusal-judge


class EvalError(ValueError):
    """An option or adapter eval.py cannot use; raised before any generation starts."""


# ---------------------------------------------------------------------------------------------------------------------
# 1. Options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    suite_kinds = "\n".join(f"  {k:<8} {v.description}" for k, v in SUITE_READERS.items())
    normal_kinds = "\n".join(f"  {k:<10} {v.description}" for k, v in NORMAL_DATA_READERS.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog=f"suite kinds (--suite [NAME=]KIND:PATH):\n{suite_kinds}\n\nnormal data kinds (--normal KIND:PATH):\n"
               f"{normal_kinds}\n\njudges: {', '.join(sorted(JUDGES))}")
    io = p.add_argument_group("models")
    io.add_argument("--model", default=str(toy.TOY_MODEL),
                    help="LLaVA model folder (config.json, safetensors, tokenizer.json); default: the toy, "
                         "assets/toy_llava")
    io.add_argument("--vision-dir", default=None, help="CLIP folder, for an original-format LLaVA checkpoint")
    io.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                    help="LoRA adapter folder (lora.json + lora.safetensors), repeatable; the base model is always "
                         "evaluated too.\nName defaults to the run folder (runs/textual/adapter -> textual). "
                         "Default: none,\nor with the toy model every runs/*/adapter that exists")
    io.add_argument("--no-adapters", action="store_true", help="evaluate the base model only (ignore the defaults)")
    io.add_argument("--quantize", default="auto", choices=["auto", "none", "nf4", "fp4"],
                    help="the base's decoder linears: dense (none) or 4 bit. auto (default): what the adapters' train.py\n"
                         "runs used (args.json next to each adapter), so an adapter meets the base it was trained on;\n"
                         "none when no adapter records it")
    io.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights / compute dtype (default float32)")
    io.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    io.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: 1 for the toy model, whose tiny matrices run fastest on one\n"
                         "thread and slow down badly when cores are shared; torch's default otherwise)")
    io.add_argument("--kernels", default="reference", help=f"kernel preset: {sorted(kernel_registry.PRESETS)}")
    io.add_argument("--prompt-format", default="llava-hf", choices=["llava-hf", "vicuna_v1"],
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
    judging.add_argument("--judge-model", default=None,
                         help="folder of the model run by the 'llamaguard' judge (a LLaVA-format folder our loader "
                              "reads; its prompt is text only)")

    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per response (default 64)")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts per generation / utility batch (default 16)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed; batch k uses seed + k")

    p.add_argument("--out", default=str(ROOT / "runs" / "eval"),
                   help="output folder: responses.jsonl, report.json, report.md (default: runs/eval)")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max-samples must be >= 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be >= 1")
    return args


def resolve_defaults(args: argparse.Namespace, root: Path = ROOT) -> argparse.Namespace:
    """The embedded default: with the toy model, its suites, its judges, its normal data, the run adapters."""
    toy.require_toy_model(args.model)
    is_toy = toy.is_toy_model(args.model)
    if args.suite is None:
        if not is_toy:
            raise EvalError("give at least one --suite KIND:PATH for a model other than the toy (see --help)")
        args.suite = ["toy"]
    # A toy model (or a toy rebuilt elsewhere, evaluated on the toy suites) is judged by the toy's own judges.
    is_toy = is_toy or all(spec.split(":")[0] == "toy" for spec in args.suite)
    args.judge = args.judge or (["toy", "toy_harm"] if is_toy else ["gcg"])
    args.refusal_judge = args.refusal_judge or ("toy" if is_toy else "xstest")
    if args.normal is None:
        args.normal = "toy" if is_toy else "none"
    if args.threads is None and is_toy:
        args.threads = toy.THREADS
    if args.no_adapters:
        args.adapter = []
    elif args.adapter is None:
        args.adapter = [str(p) for p in sorted((root / "runs").glob("*/adapter")) if p.is_dir()] if is_toy else []
    return args


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
    adapters = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = adapter_display_name(spec), spec
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


def load_base(args, kernels):
    """The base model, loaded once for every row of the table (dense, or 4-bit decoder linears)."""
    quantize = None if args.quantize == "none" else args.quantize
    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, vision_dir=args.vision_dir,
                      kernels=kernels, quantize=quantize, show_progress=True)


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
    """generate(prompts) -> texts over a judge model run by our decoder (greedy, 8 new tokens: "safe" / "unsafe\\nO3").

    Keeps the last outputs, so the JSONL can show what the judge said about each response."""

    def __init__(self, judge_dir: str, device: str, batch_size: int):
        self.model = load_model(judge_dir, device=device, show_progress=True)
        self.processor = load_processor(judge_dir)
        self.batch_size = batch_size
        self.last_outputs: list[str] = []

    def __call__(self, prompts: list[str]) -> list[str]:
        samples = [AttackSample(f"judge-{i}", "judge", p) for i, p in enumerate(prompts)]
        tokenizer = self.processor.tokenizer
        ids = [tokenizer.encode(p, add_bos=True) for p in prompts]  # the guard prompt carries its own template
        outs = generate_responses(self.model, self.processor, samples, ids, Sampling(max_new_tokens=8),
                                  self.batch_size)
        self.last_outputs = [o.response for o in outs]
        return self.last_outputs


# ---------------------------------------------------------------------------------------------------------------------
# 3. Evaluating one model


def evaluate_model(model, name, adapter_dir, processor, suites, prompt_ids, normal_data, judges, refusal_judge,
                   sampling, args, responses_file) -> dict:
    entry = {"name": name, "adapter": None if adapter_dir is None else str(adapter_dir), "suites": {}}
    start = time.perf_counter()
    for suite in suites:
        progress = Progress(f"[{name}] {suite.name}", len(suite.samples), "prompts")
        generations = generate_responses(model, processor, suite.samples, prompt_ids[suite.name], sampling,
                                         args.batch_size, progress)
        progress.close()
        verdicts, summary = judge_suite(suite, generations, judges, refusal_judge)
        entry["suites"][suite.name] = summary
        for sample, generation, verdict in zip(suite.samples, generations, verdicts):
            record = {"model": name, "adapter": entry["adapter"], "suite": suite.name, "kind": suite.kind,
                      "id": sample.id, "prompt": sample.prompt, "image": image_reference(sample),
                      "chat_prompt": chat_prompt(sample, args.prompt_format), "response": generation.response,
                      "new_tokens": generation.new_tokens, "stopped_at_eos": generation.stopped_at_eos, **verdict,
                      "source": sample.source}
            responses_file.write(json.dumps(record, default=str) + "\n")
        responses_file.flush()
    entry["generation_seconds"] = time.perf_counter() - start
    if normal_data:
        start = time.perf_counter()
        entry["utility"] = utility_metrics(model, normal_data, has_adapter=adapter_dir is not None)
        entry["utility_seconds"] = time.perf_counter() - start
    return entry


# ---------------------------------------------------------------------------------------------------------------------
# 4. The run


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    args = resolve_defaults(args)
    adapters = parse_adapters(args.adapter)
    run_args = adapter_run_args(adapters)
    args.quantize = resolve_quantize(args.quantize, run_args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernels = kernel_registry.resolve(args.kernels)
    processor = load_processor(args.model, args.vision_dir)

    # Everything that can be wrong with the inputs is found here, before the first token is generated.
    options = SuiteOptions(args.max_samples, processor.image_size, args.piece_column)
    suites = load_suites(args.suite, options, SUITE_READERS)
    prompt_ids = {s.name: tokenize_samples(processor, s.samples, args.prompt_format, args.max_new_tokens)
                  for s in suites}
    normal = [] if args.normal == "none" else load_normal(args.normal, args.max_samples, NORMAL_DATA_READERS)
    normal_data = list(normal_batches(processor, normal, args.prompt_format, args.batch_size))
    judge_generate = None
    if any(name in judge_registry.MODEL_JUDGES for name in args.judge):
        if not args.judge_model:
            raise EvalError(f"judge(s) {list(judge_registry.MODEL_JUDGES)} need a judge model: --judge-model DIR")
        judge_generate = JudgeModelGenerate(args.judge_model, args.device, args.batch_size)
    judges = {name: judge_registry.judge(name, JUDGES, generate=judge_generate) for name in args.judge}
    refusal_judge = judge_registry.judge(args.refusal_judge, JUDGES)
    model = load_base(args, kernels)
    summaries = check_adapters(model, adapters, run_args, args.model)
    sampling = Sampling(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed)
    print(f"eval: model {args.model} ({args.quantize}, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads); models: base"
          + "".join(f", {n}" for n, _ in adapters) + "; suites: "
          + ", ".join(f"{s.name} ({s.kind}, {len(s.samples)})" for s in suites)
          + f"; normal: {args.normal} ({len(normal)}); judges: {', '.join(judges)}, refusal: {refusal_judge.name}",
          file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = []
    with (out / "responses.jsonl").open("w") as responses_file:
        models.append(evaluate_model(model, "base", None, processor, suites, prompt_ids, normal_data, judges,
                                     refusal_judge, sampling, args, responses_file))
        for name, folder in adapters:
            load_adapter(model, folder)  # onto the same base: no reload
            entry = evaluate_model(model, name, folder, processor, suites, prompt_ids, normal_data, judges,
                                   refusal_judge, sampling, args, responses_file)
            entry["train"] = summaries[name]
            models.append(entry)
            remove_adapters(model)

    report = {
        "model": str(args.model), "quantize": args.quantize, "dtype": args.dtype, "prompt_format": args.prompt_format,
        "judges": list(judges), "refusal_judge": refusal_judge.name,
        "judge_notes": {name: judge.success_means for name, judge in judges.items()},
        "generation": {"mode": "sampling" if args.sample else "greedy", "max_new_tokens": args.max_new_tokens,
                       "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                       "batch_size": args.batch_size},
        "suites": [{"name": s.name, "kind": s.kind, "n": len(s.samples), "source": s.source} for s in suites],
        "normal": {"spec": args.normal, "n": len(normal)} if normal else None,
        "models": models, "responses": str(out / "responses.jsonl"), "argv": sys.argv[1:],
        "seconds": time.perf_counter() - t0,
    }
    _, md_path = write_report(out, report)
    print(md_path.read_text())
    print(f"eval: {report['seconds']:.1f} s; report in {out / 'report.json'}, {md_path}, responses in "
          f"{out / 'responses.jsonl'}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error("eval.py"):
        return run(args)


if __name__ == "__main__":
    main()
