"""Evaluate a LLaVA model and its unlearning adapters: attack success rate (text and vision-text attacks),
over-refusal and utility, in one table.

    python eval.py                                           # the embedded toy: base + every runs/*/adapter
    python eval.py --model DIR --adapter runs/textual/adapter \\
        --suite text:advbench.csv --suite figstep:safebench.csv --suite pieces:advbench.csv \\
        --suite xstest:xstest.csv --normal truthfulqa:truthfulqa.csv --out results/

The program, top to bottom:
  1. options; every suite, the normal data and the judges are read and checked (bad input fails here, by name)
  2. the base model is loaded once; every adapter is checked against it (loaded, then removed again)
  3. for the base and then each adapter (loaded onto the same base, removed afterwards): batched greedy generation
     on every suite, every response judged and written to responses.jsonl; NLL / perplexity of the reference answers
     and KL(p_base || p_model) on the normal data (adapters switched off = the base, no second copy)
  4. report.json and report.md (rows: models; columns: each suite's metric with its judge, utility, and the training
     compute of train.py runs) in --out, and the table on stdout. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from ref import evaluate as ev
from ref.attacks import AttackSample
from ref import kernels as kernel_registry
from ref.data import load_processor
from ref.lora import load_adapter
from ref.weights import load_model

ROOT = Path(__file__).resolve().parent
TOY_MODEL = ROOT / "assets" / "toy_llava"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------------
# 1. Options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    suite_kinds = "\n".join(f"  {k:<8} {v}" for k, v in ev.SPEC_KINDS.items())
    normal_kinds = "\n".join(f"  {k:<10} {v}" for k, v in ev.NORMAL_KINDS.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog=f"suite kinds (--suite [NAME=]KIND:PATH):\n{suite_kinds}\n\nnormal data kinds (--normal KIND:PATH):\n"
               f"{normal_kinds}\n\njudges: {', '.join(ev.JUDGE_NAMES)}")
    io = p.add_argument_group("models")
    io.add_argument("--model", default=str(TOY_MODEL),
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
    judging.add_argument("--judge", action="append", default=None, choices=ev.JUDGE_NAMES,
                         help="judge for attack suites, repeatable (each gets its own columns).\n"
                              "Default: 'toy' (refusal phrases) and 'toy_harm' (harmful steps given) with the toy "
                              "model, else 'gcg'")
    judging.add_argument("--refusal-judge", default=None,
                         choices=[n for n in ev.JUDGE_NAMES if n not in ("llamaguard", "toy_harm")],
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


def is_toy(model: str) -> bool:
    return Path(model).resolve() == TOY_MODEL.resolve()


def resolve_defaults(args: argparse.Namespace, root: Path = ROOT) -> argparse.Namespace:
    """The embedded default (issue 6): with the toy model, its suites, its judge, its normal data, the run adapters."""
    toy = is_toy(args.model)
    if toy and not (TOY_MODEL / "config.json").is_file():
        raise ev.EvalError(f"{TOY_MODEL}: the toy model is not there; build it with `python -m weights_tools.build_toy`"
                           f" (or give --model DIR)")
    if args.suite is None:
        if not toy:
            raise ev.EvalError("give at least one --suite KIND:PATH for a model other than the toy (see --help)")
        args.suite = ["toy"]
    # A toy model (or a toy rebuilt elsewhere, evaluated on the toy suites) is judged by the toy's own markers.
    toy = toy or all(spec.split(":")[0] == "toy" for spec in args.suite)
    args.judge = args.judge or (["toy", "toy_harm"] if toy else ["gcg"])
    args.refusal_judge = args.refusal_judge or ("toy" if toy else "xstest")
    if args.normal is None:
        args.normal = "toy" if toy else "none"
    if args.threads is None and toy:
        args.threads = 1
    if args.no_adapters:
        args.adapter = []
    elif args.adapter is None:
        args.adapter = [str(p) for p in sorted((root / "runs").glob("*/adapter")) if p.is_dir()] if toy else []
    return args


def resolve_quantize(requested: str, adapters: list[tuple[str, Path]]) -> str:
    """--quantize auto -> the quantization every adapter's train.py run recorded (they must agree), else none."""
    if requested != "auto":
        return requested
    recorded = {}
    for name, folder in adapters:
        run_args = folder.parent / "args.json"
        if folder.name == "adapter" and run_args.is_file():
            try:
                recorded[name] = json.loads(run_args.read_text()).get("quantize")
            except (OSError, json.JSONDecodeError) as err:
                raise ev.EvalError(f"{run_args}: not valid JSON ({err})") from err
    choices = {q for q in recorded.values() if q}
    if len(choices) > 1:
        raise ev.EvalError(f"the adapters were trained on differently quantized bases {recorded}; choose one with "
                           f"--quantize none|nf4|fp4")
    return choices.pop() if choices else "none"


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    adapters = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = ev.adapter_display_name(Path(spec)), spec
        adapters.append((name, Path(folder)))
    names = [n for n, _ in adapters]
    clash = sorted({n for n in names if names.count(n) > 1 or n == "base"})
    if clash:
        raise ev.EvalError(f"adapter name(s) {clash} clash (with each other or with 'base'); name them: "
                           f"--adapter NAME=DIR")
    return adapters


# ---------------------------------------------------------------------------------------------------------------------
# 2. Models


def load_base(args, kernels):
    """The base model, loaded once for every row of the table (dense, or 4-bit decoder linears)."""
    quantize = None if args.quantize == "none" else args.quantize
    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, vision_dir=args.vision_dir,
                      kernels=kernels, quantize=quantize)


def check_adapters(model, adapters: list[tuple[str, Path]], model_dir: str) -> dict[str, dict | None]:
    """Load each adapter onto the base and remove it again: an adapter for another model fails now, not mid-run.
    Returns each adapter's train.py summary (tokens, FLOPs, seconds) where its run folder has one."""
    summaries = {}
    for name, folder in adapters:
        load_adapter(model, folder)  # LoraError naming the key when it does not fit this model
        ev.remove_adapters(model)
        summaries[name] = ev.train_summary(folder)
        run_args = folder.parent / "args.json"
        if folder.name == "adapter" and run_args.is_file():
            trained_on = json.loads(run_args.read_text()).get("model")
            if trained_on and Path(trained_on).resolve() != Path(model_dir).resolve():
                warnings.warn(f"adapter {name} ({folder}) was trained on {trained_on}, evaluated on {model_dir}")
    return summaries


class JudgeModelGenerate:
    """generate(prompts) -> texts over a judge model run by our decoder (greedy, 8 new tokens: "safe" / "unsafe\\nO3").

    Keeps the last outputs, so the JSONL can show what the judge said about each response."""

    def __init__(self, judge_dir: str, device: str, batch_size: int):
        self.model = load_model(judge_dir, device=device)
        self.processor = load_processor(judge_dir)
        self.batch_size = batch_size
        self.last_outputs: list[str] = []

    def __call__(self, prompts: list[str]) -> list[str]:
        samples = [AttackSample(f"judge-{i}", "judge", p) for i, p in enumerate(prompts)]
        tokenizer = self.processor.tokenizer
        ids = [tokenizer.encode(p, add_bos=True) for p in prompts]  # the guard prompt carries its own template
        outs = ev.generate_responses(self.model, self.processor, samples, ids, ev.Sampling(max_new_tokens=8),
                                     self.batch_size)
        self.last_outputs = [o.response for o in outs]
        return self.last_outputs


# ---------------------------------------------------------------------------------------------------------------------
# 3. Evaluating one model


def evaluate_model(model, name, adapter_dir, processor, suites, prompt_ids, normal_batches, judges, refusal_judge,
                   sampling, args, responses_file) -> dict:
    entry = {"name": name, "adapter": None if adapter_dir is None else str(adapter_dir), "suites": {}}
    start = time.perf_counter()
    for suite in suites:
        progress = ev.Progress(f"[{name}] {suite.name}", len(suite.samples))
        generations = ev.generate_responses(model, processor, suite.samples, prompt_ids[suite.name], sampling,
                                            args.batch_size, progress)
        progress.close()
        verdicts, summary = ev.judge_suite(suite, generations, judges, refusal_judge)
        entry["suites"][suite.name] = summary
        for sample, generation, verdict in zip(suite.samples, generations, verdicts):
            record = {"model": name, "adapter": entry["adapter"], "suite": suite.name, "kind": suite.kind,
                      "id": sample.id, "prompt": sample.prompt, "image": ev.image_reference(sample),
                      "chat_prompt": ev.chat_prompt(sample, args.prompt_format), "response": generation.response,
                      "new_tokens": generation.new_tokens, "stopped_at_eos": generation.stopped_at_eos, **verdict,
                      "source": sample.source}
            responses_file.write(json.dumps(record, default=str) + "\n")
        responses_file.flush()
    entry["generation_seconds"] = time.perf_counter() - start
    if normal_batches:
        start = time.perf_counter()
        entry["utility"] = ev.utility_metrics(model, normal_batches, has_adapter=adapter_dir is not None)
        entry["utility_seconds"] = time.perf_counter() - start
    return entry


# ---------------------------------------------------------------------------------------------------------------------
# 4. The run


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    args = resolve_defaults(args)
    adapters = parse_adapters(args.adapter)
    args.quantize = resolve_quantize(args.quantize, adapters)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernels = kernel_registry.resolve(args.kernels)
    processor = load_processor(args.model, args.vision_dir)
    image_size = processor.image_size

    # Everything that can be wrong with the inputs is found here, before the first token is generated.
    suites = ev.load_suites(args.suite, args.max_samples, image_size, args.piece_column)
    prompt_ids = {s.name: ev.tokenize_samples(processor, s.samples, args.prompt_format, args.max_new_tokens)
                  for s in suites}
    normal = [] if args.normal == "none" else ev.load_normal(args.normal, args.max_samples)
    normal_batches = list(ev.normal_batches(processor, normal, args.prompt_format, args.batch_size))
    judge_generate = None
    if "llamaguard" in args.judge:
        if not args.judge_model:
            raise ev.EvalError("judge 'llamaguard' needs a judge model: --judge-model DIR")
        judge_generate = JudgeModelGenerate(args.judge_model, args.device, args.batch_size)
    judges = {name: ev.make_judge(name, judge_generate) for name in args.judge}
    refusal_judge = ev.make_judge(args.refusal_judge)
    for adapter_name, folder in adapters:
        if not folder.is_dir():
            raise ev.EvalError(f"--adapter {adapter_name}: {folder}: no such folder")
    model = load_base(args, kernels)
    summaries = check_adapters(model, adapters, args.model)
    sampling = ev.Sampling(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed)
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
        models.append(evaluate_model(model, "base", None, processor, suites, prompt_ids, normal_batches, judges,
                                     refusal_judge, sampling, args, responses_file))
        for name, folder in adapters:
            load_adapter(model, folder)  # onto the same base: no reload
            entry = evaluate_model(model, name, folder, processor, suites, prompt_ids, normal_batches, judges,
                                   refusal_judge, sampling, args, responses_file)
            entry["train"] = summaries[name]
            models.append(entry)
            ev.remove_adapters(model)

    report = {
        "model": str(args.model), "quantize": args.quantize, "dtype": args.dtype, "prompt_format": args.prompt_format,
        "judges": list(judges), "refusal_judge": refusal_judge.name,
        "generation": {"mode": "sampling" if args.sample else "greedy", "max_new_tokens": args.max_new_tokens,
                       "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                       "batch_size": args.batch_size},
        "suites": [{"name": s.name, "kind": s.kind, "n": len(s.samples), "source": s.source} for s in suites],
        "normal": {"spec": args.normal, "n": len(normal)} if normal else None,
        "models": models, "responses": str(out / "responses.jsonl"), "argv": sys.argv[1:],
        "seconds": time.perf_counter() - t0,
    }
    _, md_path = ev.write_report(out, report)
    print(md_path.read_text())
    print(f"eval: {report['seconds']:.1f} s; report in {out / 'report.json'}, {md_path}, responses in "
          f"{out / 'responses.jsonl'}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except ValueError as err:  # every bad-input error of ref/ is a ValueError subclass with a message naming the input
        if argv is not None:
            raise  # called from Python (tests): keep the exception
        sys.exit(f"eval.py: error: {err}")


if __name__ == "__main__":
    main()
