"""Evaluate a LLaVA model and its unlearning adapters: attack success rate (text and vision-text attacks),
over-refusal and utility, in one table.

    python eval.py                                           # the embedded toy: base + every runs/*/adapter
    python eval.py --model DIR --adapter runs/textual/adapter \\
        --suite text:advbench.csv --suite figstep:safebench.csv --suite pieces:advbench.csv \\
        --suite mmsafetybench:MM-SafetyBench/data --suite xstest:xstest.csv --normal truthfulqa:truthfulqa.csv \\
        --judge gcg --judge llamaguard --judge-model LlamaGuard-7b --out results/
    python eval.py --rejudge results/ --judge harmbench --judge-model HarmBench-Llama-2-13b-cls
    python eval.py --suite pgd:toy --max-samples 4 --pgd-eps 16,32,64,255     # visual adversarial examples (PGD)

The program, top to bottom:
  1. the evaluation (`evaluate`): every suite and the normal data read and checked (bad input fails there, by name,
     before the model loads); the run folder started, or an interrupted run there resumed; every model generated on
     every suite; every response judged; the report
  2. the models: the base loaded once; every adapter checked against it (loaded, then removed again)
  3. generating: batched greedy generation of every model on every suite, each (model, suite) block appended to
     generations.jsonl as soon as it is done; NLL / perplexity of the reference answers and KL(p_base || p_model) on
     the normal data (adapters switched off = the base, no second copy). The images of pgd suites are attacked first
     (evals/pgd_images.py): on the base before any adapter is on (transfer), and on each adapted model (white-box)
  4. judging and the report (also what --rejudge runs, without the evaluated model): responses.jsonl, report.json and
     report.md (rows: models; columns: each suite's rate with its judge, count and 95% interval, utility, the
     training compute of train.py runs; per-category tables; provenance); the judge models loaded one at a time
  5. main: the command line, resolved once into an EvalOptions (evals/options.py) before anything is evaluated: the
     toy's defaults when no model is named, the adapters named and found, the run folder checked

The run folder (run.json, what decides the responses; the appended files; never a finished run overwritten) is
harness/eval_folder.py's. Progress goes to stderr.

Under `torchrun --nproc-per-node N eval.py ...` the N processes share the generation and utility batches (whole
batches, batch k to rank k % N, so every response and number is the one process's) and gather them; rank 0 alone
keeps the run folder, prints, and judges (LLM judges included, on its own device). Without torchrun it is one process.
"""

from __future__ import annotations

from harness.console import exit_quietly_on_interrupt  # the standard library only: the imports below take seconds

with exit_quietly_on_interrupt("eval.py"):  # a Ctrl-C during them: one line, exit status 130
    import sys
    import time
    import warnings
    from itertools import product
    from pathlib import Path

    import torch

    from evals import judges as judge_registry
    from evals import pgd
    from evals.generation import chat_prompt, generate_responses, tokenize_samples
    from evals.judge_models import Judges
    from evals.options import Catalog, EvalOptions, parse_command_line, resolve_options
    from evals.pgd_images import (AdversarialImages, attack_suites, make_base_images, pgd_report,
                                  with_adversarial_images)
    from evals.report import report_provenance, spec_files, write_report
    from evals.scoring import (attack_verdicts, image_reference, judge_rows, normal_batches, saved_verdicts,
                               utility_metrics)
    from evals.suites import Suite, SuiteOptions, load_normal, load_suites
    from harness.console import Progress, exit_on_user_error
    from harness.eval_folder import GENERATIONS_FILE, REPORT_FILE, RESPONSES_FILE, UTILITY_FILE, EvalFolder, Saved
    from harness.models import load_base
    from harness.provenance import model_files
    from harness.runs import read_train_summary
    from ref import kernels as kernel_registry
    from ref.adapters import load_adapter
    from ref.data import load_processor
    from ref.distributed import Distributed
    from ref.lora import remove_adapters
    from worlds.embedded import DEFAULT_WORLD, world_of

ROOT = Path(__file__).resolve().parent
# eval.py knows every suite kind, normal-data kind and judge of evals/, and the toy's (its bare default).
CATALOG = Catalog.with_world(DEFAULT_WORLD, world_of)


# ---------------------------------------------------------------------------------------------------------------------
# 1. The evaluation


def evaluate(options: EvalOptions, world: Distributed = Distributed()) -> dict | None:
    """Every model on every suite, then every response judged: the report on rank 0, None on the other ranks of a
    torchrun launch."""
    started = time.perf_counter()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    processor = load_processor(options.model, options.vision_dir)
    # Everything that can be wrong with the inputs is found here, before the model loads.
    suites = read_suites(options, processor)
    prompt_ids = {s.name: tokenize_samples(processor, s.samples, options.prompt_format, options.max_new_tokens)
                  for s in suites}
    normal = [] if options.normal == "none" else load_normal(options.normal, options.max_samples,
                                                             CATALOG.normal_readers)
    normal_data = list(normal_batches(processor, normal, options.prompt_format, options.batch_size))

    # Rank 0 alone keeps the run folder; the other ranks learn from it what an interrupted run saved, so that every
    # rank skips the same work. (A refused resumption ends rank 0 here; torchrun then ends the ranks waiting for it.)
    folder = EvalFolder(options.out)
    saved = start_or_resume(folder, new_record(options, suites, normal), input_files(options, suites),
                            suites) if world.is_main else None
    saved = world.broadcast_object(saved)

    model = load_base(options.model, options.dtype, options.device, options.vision_dir,
                      kernel_registry.resolve(options.kernels), options.quantize, show_progress=world.is_main)
    summaries = check_adapters(model, options)
    if world.is_main:
        record = {**folder.read_record(), "models": [["base", None, None]] + [
            [name, str(adapter), summaries[name]] for name, adapter in options.adapters]}
        folder.write_record(record)
        print(what_is_evaluated(options, suites, len(normal), world), file=sys.stderr)
    generate_every_model(model, processor, suites, prompt_ids, normal_data, options, folder, saved, world)
    del model  # the evaluated model goes before a judge model comes
    leave_process_group(world)  # the last collective is behind us: rank 0 judges alone, the others are done
    if not world.is_main:
        return None
    return judge_and_report(folder, record, options, started)


def read_suites(options: EvalOptions, processor) -> list[Suite]:
    """Every suite, a pgd suite as its attack suites (one per budget and threat model)."""
    suite_options = SuiteOptions(options.max_samples, processor.image_size, options.piece_column,
                                 options.prompt_column)
    suites = load_suites(options.suites, suite_options, CATALOG.suite_readers)
    return attack_suites(suites, options.pgd) if options.pgd else suites


def new_record(options: EvalOptions, suites: list[Suite], normal: list) -> dict:
    """run.json as a run starts: its settings, suites and the sha256 of its inputs (the models come once loaded)."""
    settings = options.settings()
    return {"settings": settings, "model": str(options.model), "quantize": options.quantize, "dtype": options.dtype,
            "refusal_judge": options.refusal_judge,
            "prompt_format": options.prompt_format, "generation": settings["generation"],
            "normal": {"spec": options.normal, "n": len(normal)} if normal else None,
            "suite_list": [suite_entry(s) for s in suites],
            "provenance": report_provenance(ROOT, options.model, list(options.adapters), suites)}


def input_files(options: EvalOptions, suites: list[Suite]) -> dict[str, Path]:
    """Every file the responses and the utility numbers depend on, by a name for run.json's "inputs": the model's
    files (its CLIP tower's), each adapter's, the suites' and their images, the normal data and the pgd targets, hashed
    as the run starts (a 7B model's 14 GB take some seconds). A resumed run reads the bytes the run began with, or is
    refused naming what changed (harness.provenance.changed_inputs)."""
    files = model_files(options.model, "model")
    if options.vision_dir:
        files.update(model_files(options.vision_dir, "vision"))
    for name, folder in options.adapters:
        files.update(model_files(folder, f"adapter {name}"))
    for suite in suites:
        listed = spec_files(suite.source) if suite.files is None else suite.files
        files.update({f"suite {f}": Path(f) for f in listed})
        files.update({f"image {s.image}": s.image for s in suite.samples if isinstance(s.image, Path)})
    normal_path = Path(options.normal.partition(":")[2])
    if options.normal != "none" and normal_path.is_file():
        files[f"normal {normal_path}"] = normal_path
    if options.pgd and options.pgd.targets_file is not None:
        files[f"pgd targets {options.pgd.targets_file}"] = options.pgd.targets_file
    return files


def suite_entry(suite: Suite) -> dict:
    """What run.json and the report keep of a suite: the attack behind a pgd suite's images too."""
    entry = {"name": suite.name, "kind": suite.kind, "n": len(suite.samples), "source": suite.source}
    if isinstance(suite, pgd.PGDSuite):
        entry["pgd"] = suite.describe()
    return entry


def start_or_resume(folder: EvalFolder, record: dict, inputs: dict[str, Path], suites: list[Suite]) -> Saved:
    """The run started in its folder, or the interrupted run there resumed: what it saved is not made again."""
    saved = folder.start_or_resume(record, inputs, {s.name: len(s.samples) for s in suites})
    if saved.blocks:
        print(f"eval: resuming {folder.path}: {len(saved.blocks)} (model, suite) blocks already generated",
              file=sys.stderr)
    return saved


def what_is_evaluated(options: EvalOptions, suites: list[Suite], n_normal: int, world: Distributed) -> str:
    ranks = f", {world.world_size} ranks" if world.enabled else ""
    return (f"eval: model {options.model} ({options.quantize}, {options.dtype}, {options.device}, "
            f"{torch.get_num_threads()} threads{ranks}); models: base"
            + "".join(f", {n}" for n, _ in options.adapters)
            + "; suites: " + ", ".join(f"{s.name} ({s.kind}, {len(s.samples)})" for s in suites)
            + f"; normal: {options.normal} ({n_normal}); judges: {', '.join(options.judges)}, refusal: "
            f"{options.refusal_judge}")


def leave_process_group(world: Distributed) -> None:
    """The torchrun group this run joined; a single process leaves alone any group its caller may have made."""
    if world.enabled:
        world.shutdown()


# ---------------------------------------------------------------------------------------------------------------------
# 2. The models


def check_adapters(model, options: EvalOptions) -> dict[str, dict | None]:
    """Load each adapter onto the base and remove it again: an adapter for another model fails now, not mid-run.
    Returns each adapter's train.py summary (tokens, FLOPs, seconds) where its run folder has one."""
    summaries = {}
    for name, folder in options.adapters:
        load_adapter(model, folder)  # LoraError naming the key when it does not fit this model
        remove_adapters(model)
        summaries[name] = read_train_summary(folder)
        trained_on = options.adapter_runs.get(name, {}).get("model")
        if trained_on and Path(trained_on).resolve() != Path(options.model).resolve():
            warnings.warn(f"adapter {name} ({folder}) was trained on {trained_on}, evaluated on {options.model}")
    return summaries


# ---------------------------------------------------------------------------------------------------------------------
# 3. Generating: every model on every suite, each (model, suite) block saved as soon as it is done


def generate_every_model(model, processor, suites: list[Suite], prompt_ids: dict, normal_data: list,
                         options: EvalOptions, folder: EvalFolder, saved: Saved, world: Distributed) -> None:
    """The base, then each adapter on it (loaded onto the same base, removed again: no reload), on every suite it
    lacks; the pgd images the base attacks are made before any adapter is on."""
    to_generate = [(name, adapter) for name, adapter in [("base", None), *options.adapters]
                   if name not in saved.models]
    images = AdversarialImages(folder, processor, options.pgd.targets, options.prompt_format) if options.pgd else None
    if images:
        make_base_images(model, images, suites, [name for name, _ in to_generate], saved.blocks)
    for name, adapter in to_generate:
        if adapter is not None:
            load_adapter(model, adapter)
        shown = with_adversarial_images(model, name, suites, images, saved.blocks)
        generate_for_model(model, name, adapter, processor, shown, prompt_ids, normal_data, options, folder,
                           saved.blocks, world)
        if adapter is not None:
            remove_adapters(model)


def generate_for_model(model, name: str, adapter_dir: Path | None, processor, suites: list[Suite], prompt_ids: dict,
                       normal_data: list, options: EvalOptions, folder: EvalFolder, done: frozenset,
                       world: Distributed = Distributed()) -> None:
    """Generate every suite not yet saved for this model, then its utility on the normal data. Every rank takes its
    share of the batches and gets every result; rank 0 saves them."""
    start = time.perf_counter()
    for suite in suites:
        if (name, suite.name) in done:
            continue
        progress = Progress(f"[{name}] {suite.name}", len(suite.samples), "prompts") if world.is_main else None
        generations = generate_responses(model, processor, suite.samples, prompt_ids[suite.name], options.sampling,
                                         options.batch_size, progress, world)
        if world.is_main:
            progress.close()
            folder.append(GENERATIONS_FILE, generation_rows(name, adapter_dir, suite, generations,
                                                            options.prompt_format))
    entry = {"model": name, "generation_seconds": time.perf_counter() - start}
    if normal_data:
        start = time.perf_counter()
        entry["utility"] = utility_metrics(model, normal_data, has_adapter=adapter_dir is not None, world=world)
        entry["utility_seconds"] = time.perf_counter() - start
    if world.is_main:
        folder.append(UTILITY_FILE, [entry])


def generation_rows(name: str, adapter_dir: Path | None, suite: Suite, generations, prompt_format: str) -> list[dict]:
    """generations.jsonl's lines: every response with what it answers (prompt, image, request) and how it ended."""
    return [{"model": name, "adapter": None if adapter_dir is None else str(adapter_dir), "suite": suite.name,
             "kind": suite.kind, "id": sample.id, "prompt": sample.prompt, "request": sample.judged_request,
             "category": sample.category, "context": sample.judge_context,
             "image": image_reference(sample),
             "chat_prompt": chat_prompt(sample, prompt_format), "response": generation.response,
             "new_tokens": generation.new_tokens, "stopped_at_eos": generation.stopped_at_eos,
             "expected": sample.source.get("expected"), "source": sample.source}
            for sample, generation in zip(suite.samples, generations)]


# ---------------------------------------------------------------------------------------------------------------------
# 4. Judging and the report (also what --rejudge runs, on a finished run's saved responses)


JUDGE_INPUT = ("LLM judges read each attack's request: the prompt of a text attack, the harmful request an image "
               "attack carries (FigStep: SafeBench's question; image pieces: the key phrase; benchmarks that give one: "
               "their own request column).")


def judge_and_report(folder: EvalFolder, record: dict, options: EvalOptions, started: float) -> dict:
    """Judge every saved response with the judges of `options`, write responses.jsonl, report.json and report.md;
    return the report. Judges of an earlier judging of this run that are not named again keep their saved verdicts."""
    judges = Judges(options.judges, CATALOG.judges, options.judge_models, options.device, options.dtype,
                    options.judge_quantize, options.kernels, options.batch_size)
    refusal_judge = judge_registry.judge(options.refusal_judge, CATALOG.judges)
    blocks = folder.generated_blocks(record)
    attack_blocks = [(model, suite["name"]) for (model, _, _), suite in product(record["models"], record["suite_list"])
                     if suite["kind"] == "attack"]
    earlier_judges = [name for name in record.get("judges", []) if name not in judges.names]
    earlier = folder.judged_rows(blocks, attack_blocks, earlier_judges)
    verdicts = {name: {key: saved_verdicts(earlier[key], name) for key in attack_blocks} for name in earlier_judges}
    notes = dict(record.get("judge_notes", {}))
    for name, judge_ in judges:
        verdicts[name] = {key: attack_verdicts(judge_, blocks[key]) for key in attack_blocks}
        notes[name] = judge_.success_means
        del judge_  # its model goes before the next judge's comes
    utility = {entry["model"]: entry for entry in folder.lines(UTILITY_FILE)}
    models, judged = [], []
    for model_name, adapter, train in record["models"]:
        entry = {"name": model_name, "adapter": adapter, "suites": {}, "train": train,
                 **{k: v for k, v in utility.get(model_name, {}).items() if k != "model"}}
        for suite in record["suite_list"]:
            key = (model_name, suite["name"])
            block_verdicts = {name: by_block[key] for name, by_block in verdicts.items() if key in by_block}
            row_verdicts, entry["suites"][suite["name"]] = judge_rows(suite["kind"], blocks[key], block_verdicts,
                                                                      refusal_judge)
            judged += [{**row, **verdict} for row, verdict in zip(blocks[key], row_verdicts)]
        models.append(entry)
    folder.rewrite(RESPONSES_FILE, judged)
    judge_names = list(verdicts)
    report = {**{k: record[k] for k in ("model", "quantize", "dtype", "prompt_format", "generation", "normal",
                                        "provenance")},
              "judges": judge_names, "refusal_judge": refusal_judge.name,
              "judge_notes": {name: notes[name] for name in judge_names},
              "judge_models": {**record.get("judge_models", {}), **judges.model_dirs},
              "judge_input": JUDGE_INPUT if any(n in judge_registry.MODEL_JUDGES for n in judge_names) else "",
              **pgd_report(folder, record["suite_list"], judge_names, CATALOG.phrase_judges),
              "suites": record["suite_list"], "models": models, "responses": str(folder.path / RESPONSES_FILE),
              "argv": sys.argv[1:], "seconds": time.perf_counter() - started}
    folder.write_record({**record, "judges": judge_names, "judge_notes": report["judge_notes"],
                         "judge_models": report["judge_models"], "refusal_judge": refusal_judge.name})
    _, md_path = write_report(folder.path, report)
    print(md_path.read_text())
    print(f"eval: {report['seconds']:.1f} s; report in {folder.path / REPORT_FILE}, {md_path}, responses in "
          f"{folder.path / RESPONSES_FILE}", file=sys.stderr)
    return report


def rejudge(options: EvalOptions) -> dict:
    """Re-score a finished run's saved responses with the judges named (other judges' verdicts are kept as saved), in
    place; the evaluated model is never loaded."""
    folder = EvalFolder(options.out)
    return judge_and_report(folder, folder.record_to_rejudge(), options, time.perf_counter())


# ---------------------------------------------------------------------------------------------------------------------
# 5. main


def evaluate_or_rejudge(options: EvalOptions, world: Distributed = Distributed()) -> dict | None:
    """What the command asks for: an evaluation, or (--rejudge) a finished run judged again, by rank 0 alone. The
    report on rank 0, None on the other ranks of a torchrun launch."""
    if not options.rejudge:
        return evaluate(options, world)
    leave_process_group(world)
    return rejudge(options) if world.is_main else None


def main(argv: list[str] | None = None) -> dict | None:
    with exit_quietly_on_interrupt("eval.py"):  # a Ctrl-C while the command line is read
        command = parse_command_line(argv, CATALOG, __doc__.split("\n\n")[0])  # a bad option: argparse's line, exit 2
    with exit_on_user_error("eval.py", command.debug):
        world = Distributed.from_environment(command.device)
    # Every rank checks the same inputs, so a bad one usually fails on all of them: each line says whose it is.
    with exit_on_user_error(f"eval.py (rank {world.rank})" if world.enabled else "eval.py", command.debug):
        return evaluate_or_rejudge(resolve_options(command, CATALOG, world, ROOT), world)


if __name__ == "__main__":
    main()
