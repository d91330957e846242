"""A grid of train.py + eval.py runs (configs x seeds) in one folder, with one combined table and pictures.

    python -m evals.sweep SPEC.json --out DIR              # train, evaluate, then DIR/sweep.{json,md} and PNGs
    python -m evals.sweep SPEC.json --out DIR --jobs 2     # two runs at once (the toy trains on one thread each)
    python -m evals.sweep SPEC.json --out DIR --dry-run    # what would be launched, nothing run

SPEC.json, a JSON object with these keys and no others (an unknown key is refused, naming the file and the key):

    {"train":   ["--max-steps", "300"],                 train.py options every run gets (optional, default [])
     "eval":    ["--suite", "toy"],                     eval.py options every evaluation gets (optional, default [])
     "seeds":   [0, 1, 2],                              train.py --seed of each run: distinct integers in
                                                       [0, 2**32 - 1]; configs x seeds at most 10,000 runs
     "configs": [{"name": "full", "train": []},         one row of the table each; name: letters, digits, _ and -
                 {"name": "no_harm", "train": ["--eps", "0", "1", "5"]}]}   its own train.py options (optional)

The sweep sets --seed, --out and --resume of train.py and --adapter and --out of eval.py itself, so the spec may not
(nor abbreviate them: --adapt would be eval.py's --adapter). DIR is new, empty, or a sweep's own folder (its plan.json
is there): a folder of other files is refused before anything is written.
For each config and seed, with the same Python and the repository root as working directory (relative paths in the
options are read from there):

    train.py <train> <config's train> --seed S --out DIR/<name>/seed<S>
    eval.py <eval> --adapter DIR/<name>/seed<S> --out DIR/<name>/seed<S>/eval

eval.py evaluates the base model beside the run's adapter, and every adapter-step<N>/ of the run as <run>@<N> when
the training saved them (train.py --save-adapter-every). Each command's output is appended to DIR/<name>/seed<S>.log.

Nothing finished is done again, so an interrupted sweep continues when the same command is run again: a run whose
summary.json exists is not trained; one with args.json but no summary (stopped or failed midway) is continued by the
same train.py command plus --resume; an eval whose report.json exists is not run; an interrupted one is continued by
the same eval.py command (eval.py resumes its folder). DIR/plan.json keeps each run's options: when the spec changes
the options of a run that has a folder already, the sweep refuses it rather than mix two settings in one row. A
failed command is reported and the other runs go on; Ctrl-C or SIGTERM is passed on once to the running commands
(train.py then checkpoints at the end of its step) and no new one starts; a second is passed on again (train.py stops
at once); a third stops the sweep itself.

Outputs in DIR, written anew from every finished run each time the sweep ends:

    sweep.json       every run's numbers (per suite and judge ASR with its counts, benign accuracy, over-refusal,
                     utility NLL and KL, train tokens / FLOPs / seconds, the ASR after each saved step) and each
                     config's mean, min and max over its seeds
    sweep.md         one row per config (and the base model): each cell the mean over the finished seeds and, with
                     several, [min, max], as worlds/toy/table.py writes them
    sweep_asr.png    grouped bars: each attack suite's ASR, benign accuracy and over-refusal, a bar per config (the
                     mean) with a whisker from the smallest to the largest seed
    sweep_steps.png  when the runs saved step adapters: ASR against training step, a line per config (the mean over
                     the seeds that reached each step; step 0 is the base model, which an untrained LoRA leaves as is)

Category coverage: a run trained on some harm categories only (train.py --include-categories, --exclude-categories,
--category-fraction) records {"kept": [...], "dropped": [...]} under "categories" in its summary.json. For each attack
suite whose samples carry a category, the sweep then adds the ASR on the samples of kept categories ("covered") and
of dropped ones ("uncovered"): successes summed over those categories divided by their samples summed. A category in
neither list counts in neither column.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from evals.plot import (BACKGROUND, GRID, INK, Y_MARGIN, Axis, data_range, draw_legend, draw_panel, font_for,
                        legend_layout, line_height, nice_ticks, put_text, run_colours, text_size)
from ref.config import read_json
from evals.options import MAX_SEED, MAX_THREADS, int_in
from harness.console import HelpFormatter, add_debug_option, exit_on_user_error
from harness.eval_folder import REPORT_FILE, is_finished
from harness.files import check_run_folder, write_atomically
from harness.runs import ADAPTER_DIR, ARGS_FILE, SUMMARY_FILE, adapter_step

ROOT = Path(__file__).resolve().parents[1]
SPEC_KEYS = ("train", "eval", "seeds", "configs")
CONFIG_KEYS = ("name", "train")
# Options the sweep gives every run itself: in the spec they would fight its own.
SWEEP_TRAIN_OPTIONS = ("--seed", "--out", "--resume")
SWEEP_EVAL_OPTIONS = ("--adapter", "--out", "--no-adapters", "--rejudge")
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
PLAN_FILE, EVAL_DIR = "plan.json", "eval"
PROG = "python -m evals.sweep"  # argparse's errors and the sweep's own begin with it: "python -m evals.sweep: error: "
MAX_RUNS = 10_000  # configs x seeds: each run trains a model; a bigger grid is a spec's mistake, refused before any run
POLL_SECONDS = 0.2  # how soon a running command hears of a signal the sweep received

# Columns that are not rates, with their number format; every other column is a rate, shown as a percentage.
TRAIN_COLUMNS = (("train tokens", "tokens", ",.0f"), ("train FLOPs", "estimated_flops", ".2g"),
                 ("train s", "wall_seconds", ".1f"))
NUMBER_FORMATS = {"utility NLL": ".4f", "utility KL from base": ".4g", **{h: f for h, _, f in TRAIN_COLUMNS}}


class SweepError(ValueError):
    """A spec, a sweep folder or a run's files the sweep cannot use: one line naming the file and key."""


# ---------------------------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Config:
    name: str
    train: tuple[str, ...]


@dataclass(frozen=True)
class Spec:
    train: tuple[str, ...]
    eval: tuple[str, ...]
    seeds: tuple[int, ...]
    configs: tuple[Config, ...]


def load_spec(path: str | Path) -> Spec:
    raw = read_json(path, SweepError, "the sweep's spec")
    where = str(path)
    check_keys(raw, SPEC_KEYS, where, required=("seeds", "configs"))
    train = option_list(raw.get("train", []), f"{where}: train", SWEEP_TRAIN_OPTIONS)
    evaluate = option_list(raw.get("eval", []), f"{where}: eval", SWEEP_EVAL_OPTIONS)
    seeds, configs = seed_list(raw["seeds"], f"{where}: seeds"), config_list(raw["configs"], where)
    if len(seeds) * len(configs) > MAX_RUNS:
        raise SweepError(f"{where}: {len(configs)} configs x {len(seeds)} seeds = {len(configs) * len(seeds):,} runs, "
                         f"more than the {MAX_RUNS:,} a sweep launches; split the grid into several sweeps")
    return Spec(train, evaluate, seeds, configs)


def check_keys(raw: dict, known: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> None:
    for key in raw:
        if key not in known:
            raise SweepError(f"{where}: unknown key {key!r} (keys: {', '.join(known)})")
    for key in required:
        if key not in raw:
            raise SweepError(f"{where}: missing key {key!r}")


def option_list(value, where: str, reserved: tuple[str, ...]) -> tuple[str, ...]:
    """A spec's options for one program: strings, none of them an option the sweep sets itself, nor an abbreviation
    of one (argparse takes --adapt for --adapter where abbreviations are allowed: the run would then evaluate the
    spec's adapter and report its numbers as the run's)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise SweepError(f"{where}: expected a list of strings (command-line options), got {json.dumps(value)}")
    for item in value:
        name = item.split("=", 1)[0]
        if name in reserved:
            raise SweepError(f"{where}: {item!r} is set by the sweep for each run; leave it out")
        abbreviated = [option for option in reserved if name.startswith("--") and len(name) > 2
                       and option.startswith(name)]
        if abbreviated:
            raise SweepError(f"{where}: {item!r} abbreviates {abbreviated[0]}, which the sweep sets for each run; "
                             f"leave it out")
    return tuple(value)


def seed_list(value, where: str) -> tuple[int, ...]:
    valid = isinstance(value, list) and value and all(type(s) is int and 0 <= s <= MAX_SEED for s in value)
    if not valid or len(set(value)) != len(value):
        shown = json.dumps(value)
        raise SweepError(f"{where}: expected a non-empty list of distinct integers in [0, {MAX_SEED}], got "
                         f"{shown if len(shown) <= 80 else shown[:77] + '...'}")
    return tuple(value)


def config_list(value, where: str) -> tuple[Config, ...]:
    if not isinstance(value, list) or not value:
        raise SweepError(f"{where}: configs: expected a non-empty list of objects {{\"name\", \"train\"}}")
    configs = []
    for index, item in enumerate(value):
        here = f"{where}: configs[{index}]"
        if not isinstance(item, dict):
            raise SweepError(f"{here}: expected an object {{\"name\", \"train\"}}, got {json.dumps(item)}")
        check_keys(item, CONFIG_KEYS, here, required=("name",))
        name = item["name"]
        if not isinstance(name, str) or not CONFIG_NAME.fullmatch(name):
            raise SweepError(f"{here}: name: {json.dumps(name)} is not a folder name (letters, digits, _ and -)")
        if name in (c.name for c in configs):
            raise SweepError(f"{here}: name: {name!r} is used twice")
        configs.append(Config(name, option_list(item.get("train", []), f"{here}: train", SWEEP_TRAIN_OPTIONS)))
    return tuple(configs)


# ---------------------------------------------------------------------------------------------------------------------
# The runs and their commands


@dataclass(frozen=True)
class Run:
    config: str
    seed: int
    folder: Path                      # DIR/<config>/seed<S>, the train.py run folder
    train_options: tuple[str, ...]    # everything but --out and --resume
    eval_options: tuple[str, ...]     # everything but --adapter and --out

    @property
    def key(self) -> str:
        return f"{self.config}/seed{self.seed}"

    @property
    def eval_folder(self) -> Path:
        return self.folder / EVAL_DIR

    @property
    def log(self) -> Path:
        return self.folder.with_name(self.folder.name + ".log")

    def train_argv(self, resume: bool) -> list[str]:
        return [sys.executable, "train.py", *self.train_options, "--out", str(self.folder)] + (
            ["--resume"] if resume else [])

    def eval_argv(self) -> list[str]:
        return [sys.executable, "eval.py", *self.eval_options, "--adapter", str(self.folder), "--out",
                str(self.eval_folder)]


def plan_runs(spec: Spec, out: Path) -> list[Run]:
    out = out.resolve()  # the commands run from the repository root, not from here
    return [Run(config.name, seed, out / config.name / f"seed{seed}",
                (*spec.train, *config.train, "--seed", str(seed)), spec.eval)
            for config in spec.configs for seed in spec.seeds]


def train_action(run: Run) -> str:
    """"done" (summary.json written), "resume" (args.json, no summary: stopped or failed midway) or "start"."""
    if (run.folder / SUMMARY_FILE).is_file():
        return "done"
    return "resume" if (run.folder / ARGS_FILE).is_file() else "start"


def eval_done(run: Run) -> bool:
    return is_finished(run.eval_folder)


def check_plan(out: Path, runs: list[Run]) -> None:
    """Record each run's options in DIR/plan.json; refuse a run whose folder exists and was made with other options
    (a changed spec would otherwise put two settings in one row, or continue a run with options it did not start
    with). A run whose folder is gone may take new options."""
    path = out / PLAN_FILE
    saved = read_plan(path) if path.is_file() else {}
    for run in runs:
        before = saved.get(run.key)
        if before is None or not run.folder.exists():
            continue
        if before.get("train") != list(run.train_options):
            raise SweepError(f"{path}: {run.key} was trained with train.py {shlex.join(before.get('train', []))}, the "
                             f"spec now says {shlex.join(run.train_options)}; restore the spec, or remove {run.folder} "
                             f"to train it again")
        if before.get("eval") != list(run.eval_options) and run.eval_folder.exists():
            raise SweepError(f"{path}: {run.key} was evaluated with eval.py {shlex.join(before.get('eval', []))}, the "
                             f"spec now says {shlex.join(run.eval_options)}; restore the spec, or remove "
                             f"{run.eval_folder} to evaluate it again")
    plan = {**saved, **{run.key: {"train": list(run.train_options), "eval": list(run.eval_options)} for run in runs}}
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda p: p.write_text(json.dumps({"runs": plan}, indent=1) + "\n"))


def read_plan(path: Path) -> dict[str, dict]:
    """The runs of a sweep's plan.json ({"runs": {"<config>/seed<S>": {"train": [...], "eval": [...]}}}). A plan.json
    in another shape is not this sweep's: the folder is refused, naming it, before anything in it is written."""
    raw = read_json(path, SweepError, "a sweep's folder holds its plan.json")
    runs = raw.get("runs")
    valid = isinstance(runs, dict) and all(
        isinstance(entry, dict) and all(isinstance(entry.get(key), list) and all(isinstance(o, str) for o in entry[key])
                                        for key in ("train", "eval"))
        for entry in runs.values())
    if not valid:
        raise SweepError(f"{path}: not the plan of a sweep (expected {{\"runs\": {{RUN: {{\"train\": [...], "
                         f"\"eval\": [...]}}}}}}), so --out {path.parent} is not a sweep's folder; choose a new or empty "
                         f"--out (nothing was written)")
    return runs


def check_out(out: Path, spec_path: Path) -> None:
    """--out is new, empty, or a sweep's own folder (its plan.json, the first file a sweep writes, is there and is a
    sweep's): never a folder of the user's files, whose plan.json, sweep.md or sweep.json the outputs would replace,
    nor the folder the spec is in. Checked before anything runs or is written."""
    check_run_folder(out, PLAN_FILE, [spec_path])
    if (out / PLAN_FILE).is_file():
        read_plan(out / PLAN_FILE)


# ---------------------------------------------------------------------------------------------------------------------
# Running the commands

Runner = Callable[[list[str], Path], int]  # (argv, log file) -> exit status


class Signals:
    """The Ctrl-C / SIGTERM the sweep received, counted: each is passed on once to every running command. A third
    stops the sweep itself at once, should it hang outside a command."""

    def __init__(self):
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt

    def received(self) -> bool:
        return self.count > 0


class CommandRunner:
    """Runs a command from the repository root, its output appended to a log. The command gets a session of its own,
    so a Ctrl-C in the terminal reaches it only as the one SIGTERM passed on here: a second signal would make
    train.py stop at once instead of checkpointing at the end of its step."""

    def __init__(self, signals: Signals):
        self.signals = signals

    def __call__(self, argv: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as stream:
            stream.write(f"$ {shlex.join(argv)}\n")
            stream.flush()
            process = subprocess.Popen(argv, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            passed_on = 0
            while True:
                try:
                    return process.wait(timeout=POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
                for _ in range(self.signals.count - passed_on):
                    process.send_signal(signal.SIGTERM)
                    passed_on += 1


def say(message: str) -> None:
    print(f"sweep: {message}", file=sys.stderr, flush=True)


def do_run(run: Run, runner: Runner, interrupted: Callable[[], bool]) -> str | None:
    """Train (or continue) then evaluate one run, skipping what is done. None when it finished, else what stopped
    it."""
    steps = []
    action = train_action(run)
    if action != "done":
        steps.append(("train" + (" --resume" if action == "resume" else ""), run.train_argv(action == "resume")))
    if not eval_done(run):
        steps.append(("eval", run.eval_argv()))
    for what, argv in steps:
        if interrupted():
            return "interrupted"
        say(f"{run.key}: {what}")
        started = time.perf_counter()
        status = runner(argv, run.log)
        if status != 0:
            return "interrupted" if interrupted() else f"{what} failed (exit status {status}; see {run.log})"
        say(f"{run.key}: {what} done in {time.perf_counter() - started:.1f} s")
    if train_action(run) != "done" or not eval_done(run):  # a command that exits 0 without its output
        return f"no {SUMMARY_FILE} or {REPORT_FILE} after its commands (see {run.log})"
    return None


def run_all(runs: list[Run], runner: Runner, jobs: int = 1, interrupted: Callable[[], bool] = lambda: False
            ) -> dict[str, str]:
    """Every run, `jobs` at a time (each run's eval after its training). Returns {run key: why it did not finish}."""
    if jobs == 1:
        outcomes = [do_run(run, runner, interrupted) for run in runs]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outcomes = list(pool.map(lambda run: do_run(run, runner, interrupted), runs))
    return {run.key: outcome for run, outcome in zip(runs, outcomes) if outcome is not None}


def describe(runs: list[Run]) -> list[str]:
    """What a sweep would launch now (--dry-run)."""
    lines = []
    for run in runs:
        action = train_action(run)
        lines.append(f"{run.key}: train " + ("done" if action == "done" else shlex.join(run.train_argv(
            action == "resume"))))
        lines.append(f"{run.key}: eval " + ("done" if eval_done(run) else shlex.join(run.eval_argv())))
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Reading the numbers back


def rate_entry(metrics: dict, counts: dict, key: str, successes: int, n: int, rate: float | None = None) -> None:
    counts[key] = [successes, n]
    metrics[key] = rate if rate is not None else (successes / n if n else None)


def category_sum(categories: dict, names: list[str]) -> tuple[int, int]:
    """Successes and samples summed over the report's categories that are in `names`."""
    chosen = [categories[name] for name in names if name in categories]
    return sum(c["successes"] for c in chosen), sum(c["n"] for c in chosen)


def model_metrics(report: dict, model: dict, categories: dict | None = None) -> tuple[dict, dict]:
    """One report row as {column: value} and {column: [successes, n]}: each attack suite's ASR per judge (with its
    covered / uncovered ASR when the run kept some categories), accuracy, over-refusal, utility NLL and KL."""
    metrics: dict[str, float | None] = {}
    counts: dict[str, list[int]] = {}
    for suite in report["suites"]:
        name, entry = suite["name"], model["suites"][suite["name"]]
        if suite["kind"] == "attack":
            for judge in report["judges"]:
                result, key = entry["judges"][judge], f"{name} ASR [{judge}]"
                # older reports call a judge's sample count "judged"
                rate_entry(metrics, counts, key, result["successes"], result.get("n", result.get("judged")),
                           result["asr"])
                if categories and "categories" in result:
                    for part, names in (("covered", categories.get("kept", [])),
                                        ("uncovered", categories.get("dropped", []))):
                        rate_entry(metrics, counts, f"{key} {part}", *category_sum(result["categories"], names))
        elif suite["kind"] == "over_refusal":
            rate_entry(metrics, counts, f"{name} over-refusal", entry["refusals"], entry["n"], entry["over_refusal"])
        else:
            rate_entry(metrics, counts, f"{name} accuracy", entry["correct"], entry["n"], entry["accuracy"])
    if model.get("utility"):
        metrics["utility NLL"] = model["utility"]["nll"]
        metrics["utility KL from base"] = model["utility"]["kl_from_base"]
    return metrics, counts


def report_rows(report: dict, where: Path) -> tuple[dict, dict, list[tuple[int, dict]]]:
    """The base model's row, the run's final adapter's row and its step adapters' rows [(step, row)], by the
    adapter folder each row names. eval.py leaves out adapter/ when it equals the last adapter-step<N>/."""
    base = next((m for m in report["models"] if not m.get("adapter")), None)
    adapters = [m for m in report["models"] if m.get("adapter")]
    steps = sorted(((adapter_step(m["adapter"]), m) for m in adapters if adapter_step(m["adapter"]) is not None),
                   key=lambda pair: pair[0])
    final = next((m for m in adapters if Path(m["adapter"]).name == ADAPTER_DIR), steps[-1][1] if steps else None)
    if base is None or final is None:
        raise SweepError(f"{where}: no row for the base model or for the run's adapter")
    return base, final, steps


def run_record(run: Run) -> dict:
    """Everything the sweep reports of one run; "finished" False until both its summary and its report exist. A run
    whose summary.json or report.json is not in the format train.py and eval.py write (damaged, edited) is reported as
    not finished, saying why ("unreadable"), and the other runs' numbers are still written."""
    record = {"config": run.config, "seed": run.seed, "folder": str(run.folder), "finished": False}
    summary_path, report_path = run.folder / SUMMARY_FILE, run.eval_folder / REPORT_FILE
    if not (summary_path.is_file() and report_path.is_file()):
        return record
    try:
        return read_run_numbers(record, summary_path, report_path)
    except (SweepError, KeyError, IndexError, TypeError, AttributeError) as err:  # the two files' formats, not ours
        return {**record, "unreadable": f"{summary_path} or {report_path} is not in the format train.py and eval.py "
                                        f"write ({type(err).__name__}: {err})"}


def read_run_numbers(record: dict, summary_path: Path, report_path: Path) -> dict:
    summary, report = read_json(summary_path, SweepError), read_json(report_path, SweepError)
    base, final, steps = report_rows(report, report_path)
    categories = summary.get("categories")
    metrics, counts = model_metrics(report, final, categories)
    for header, key, _ in TRAIN_COLUMNS:
        metrics[header] = summary.get(key)
    curve = [(0, base)] + steps
    if summary.get("steps") is not None and summary["steps"] not in (s for s, _ in curve):
        curve.append((summary["steps"], final))
    record.update(finished=True, quantize=report.get("quantize"), categories=categories,
                  step_adapters=[step for step, _ in steps],
                  train={k: summary.get(k) for k in ("steps", "stopped_by", "tokens", "estimated_flops",
                                                     "wall_seconds")},
                  metrics=metrics, counts=counts, base=model_metrics(report, base)[0],
                  steps=[{"step": step, "metrics": model_metrics(report, row)[0]} for step, row in curve])
    return record


# ---------------------------------------------------------------------------------------------------------------------
# Summaries over seeds and the table


def columns_of(records: list[dict]) -> list[str]:
    """Every column some finished run has, each placed after the column it follows in the run that has it (a run
    with category coverage adds its covered / uncovered ASR beside that suite's ASR, not at the end)."""
    columns: list[str] = []
    for record in records:
        previous = None
        for key in record["metrics"] if record["finished"] else ():
            if key not in columns:
                columns.insert(columns.index(previous) + 1 if previous else 0, key)
            previous = key
    return columns


def spread(values: list) -> dict | None:
    """Mean, min and max of the values that exist (a seed may lack a column, e.g. covered ASR)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def cell(summary: dict | None, column: str) -> str:
    """mean, and [min, max] with several seeds: "25.0% [0.0, 50.0]" for a rate, as worlds/toy/table.py writes it (evals
    imports no toy module, so its function is not reused here)."""
    if summary is None:
        return "-"
    fmt = NUMBER_FORMATS.get(column)
    scale, fmt, unit = (1, fmt, "") if fmt else (100, ".1f", "%")
    text = format(summary["mean"] * scale, fmt) + unit
    if summary["n"] > 1:
        text += f" [{format(summary['min'] * scale, fmt)}, {format(summary['max'] * scale, fmt)}]"
    return text


def config_summaries(spec: Spec, records: list[dict], columns: list[str]) -> list[dict]:
    summaries = []
    for config in spec.configs:
        done = [r for r in records if r["config"] == config.name and r["finished"]]
        summaries.append({"name": config.name, "train": list(config.train), "seeds": [r["seed"] for r in done],
                          "columns": {c: spread([r["metrics"].get(c) for r in done]) for c in columns}})
    return summaries


def base_rows(records: list[dict]) -> list[dict]:
    """The base model's numbers, once per base quantization the evaluations used (eval.py --quantize auto follows
    the adapters' runs, so a config trained on another base has another base row)."""
    bases: dict[str, dict] = {}
    for record in records:
        if record["finished"]:
            bases.setdefault(record["quantize"], {"quantize": record["quantize"], "from": record["folder"],
                                                  "metrics": record["base"]})
    return list(bases.values())


def markdown(spec: Spec, summaries: list[dict], bases: list[dict], columns: list[str], failures: dict) -> str:
    lines = ["| config | " + " | ".join(columns) + " | seeds |", "|---|" + "---|" * (len(columns) + 1)]
    for base in bases:
        name = "base" if len(bases) == 1 else f"base ({base['quantize']})"
        cells = [cell(spread([base["metrics"].get(c)]), c) if c in base["metrics"] else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " | - |")
    for summary in summaries:
        seeds = len(summary["seeds"])
        counted = str(seeds) if seeds == len(spec.seeds) else f"{seeds} of {len(spec.seeds)}"
        cells = [cell(summary["columns"][c], c) for c in columns]
        lines.append(f"| {summary['name']} | " + " | ".join(cells) + f" | {counted} |")
    notes = [f"Each config: train.py {shlex.join(spec.train)} <config's options> --seed S for S in "
             f"{list(spec.seeds)}, evaluated by eval.py {shlex.join(spec.eval) or '(its defaults)'}.",
             "Each cell: the mean over the config's finished seeds and, with several, [min, max]. Rates are eval.py's "
             "(ASR by the judge in brackets, accuracy by exact match, over-refusal by its refusal judge).",
             "Configs: " + "; ".join(f"`{s['name']}` {shlex.join(s['train']) or '(common options only)'}"
                                     for s in summaries) + "."]
    if any(c.endswith((" covered", " uncovered")) for c in columns):
        notes.append("covered / uncovered: the ASR on the attack samples of the harm categories train.py kept / "
                     "dropped (successes summed over those categories, divided by their samples summed).")
    notes += [f"Not finished: {key}: {why}." for key, why in failures.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Pictures (Pillow; axes, ticks, legend and panels from evals/plot.py)


def bar_columns(columns: list[str]) -> list[str]:
    """What sweep_asr.png shows: each attack suite's ASR per judge, accuracy and over-refusal (no covered parts)."""
    return [c for c in columns if c.endswith((" accuracy", " over-refusal")) or
            (" ASR [" in c and c.endswith("]"))]


def asr_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if " ASR [" in c and c.endswith("]")]


def group_label(column: str) -> list[str]:
    """"text_attacks ASR [toy]" -> ["text_attacks", "ASR [toy]"]: two short lines fit under a group of bars."""
    suite, _, what = column.partition(" ")
    return [suite, what]


def draw_bars(summaries: list[dict], columns: list[str], height: int = 700) -> Image.Image:
    """Grouped bars: a group per column, a bar per config at its mean, whiskers from min to max over seeds."""
    names = [s["name"] for s in summaries]
    colours = run_colours(names)
    font = font_for(1200, height)
    line, pad = line_height(font), line_height(font) // 2
    bar = 2 * line
    group_widths = [max(bar * len(names), *(text_size(font, t)[0] for t in group_label(c))) + 2 * line
                    for c in columns]
    left = text_size(font, "100%")[0] + 2 * pad
    width = max(800, left + sum(group_widths) + 2 * pad)
    spare = (width - left - 2 * pad - sum(group_widths)) / len(columns)  # a few groups spread over the minimum width
    group_widths = [w + spare for w in group_widths]
    legend_lines = 1 + max(row for _, row in legend_layout(names, font, width))
    box = (left, pad + legend_lines * line + line, width - 2 * pad, height - 3 * line - pad)
    image = Image.new("RGB", (width, height), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    draw_legend(canvas, names, colours, font, width)
    y_axis = Axis(0.0, 100.0, box[3], box[1])
    for tick in nice_ticks(0.0, 100.0):
        y = y_axis.to_pixel(tick)
        canvas.line([(box[0], y), (box[2], y)], fill=GRID)
        put_text(canvas, (box[0] - pad, y), f"{tick:.0f}%", font, align="right", valign="middle")
    x = box[0] + line
    for column, group_width in zip(columns, group_widths):
        start = x + (group_width - 2 * line - bar * len(names)) / 2
        for index, summary in enumerate(summaries):
            draw_bar(canvas, summary["columns"].get(column), colours[summary["name"]], start + index * bar, bar,
                     y_axis)
        for row, text in enumerate(group_label(column)):
            put_text(canvas, (x + (group_width - 2 * line) / 2, box[3] + pad + row * line), text, font,
                     align="center")
        x += group_width
    canvas.rectangle(box, outline=INK)
    return image


def draw_bar(canvas: ImageDraw.ImageDraw, summary: dict | None, colour, x: float, bar: float, y_axis: Axis) -> None:
    if summary is None:
        return
    inset = bar * 0.15
    top = y_axis.to_pixel(100 * summary["mean"])
    canvas.rectangle([(x + inset, top), (x + bar - inset, y_axis.pixel_low)], fill=colour)
    low, high = y_axis.to_pixel(100 * summary["min"]), y_axis.to_pixel(100 * summary["max"])
    middle, cap = x + bar / 2, bar * 0.2
    canvas.line([(middle, low), (middle, high)], fill=INK, width=2)
    for y in (low, high):
        canvas.line([(middle - cap, y), (middle + cap, y)], fill=INK, width=2)


def step_curves(records: list[dict], configs: list[str], column: str) -> dict[str, list[tuple[float, float]]]:
    """Per config, (step, mean ASR in % over the seeds that reached the step)."""
    curves = {}
    for name in configs:
        by_step: dict[int, list[float]] = {}
        for record in records:
            if record["config"] == name and record["finished"]:
                for point in record["steps"]:
                    value = point["metrics"].get(column)
                    if value is not None:
                        by_step.setdefault(point["step"], []).append(100 * value)
        curves[name] = [(float(step), sum(v) / len(v)) for step, v in sorted(by_step.items())]
    return curves


def draw_steps(records: list[dict], configs: list[str], columns: list[str], width: int = 1200,
               height: int = 900) -> Image.Image:
    """A panel per attack suite and judge: ASR (%) against training step, a line per config."""
    font = font_for(width, height)
    colours = run_colours(configs)
    legend_lines = 1 + max(row for _, row in legend_layout(configs, font, width))
    image = Image.new("RGB", (width, height), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    draw_legend(canvas, configs, colours, font, width)
    all_curves = {c: step_curves(records, configs, c) for c in columns}
    steps = [s for curves in all_curves.values() for points in curves.values() for s, _ in points]
    x_range = (min(steps), max(steps)) if max(steps) > min(steps) else data_range(steps, 0.0)
    y_range = data_range([0.0, 100.0], Y_MARGIN)
    for column, box in zip(columns, grid_boxes(len(columns), width, height, legend_lines, font)):
        curves = [(colours[name], points) for name, points in all_curves[column].items()]
        draw_panel(canvas, box, f"{column}, %", (x_range, y_range), curves, font)
    return image


def grid_boxes(count: int, width: int, height: int, legend_lines: int, font) -> list[tuple[int, int, int, int]]:
    """Axis boxes of `count` panels in two columns below the legend, room left for titles and tick labels."""
    line, pad = line_height(font), line_height(font) // 2
    columns = 1 if count == 1 else 2
    rows = -(-count // columns)
    top = pad + legend_lines * line + pad
    cell_width, cell_height = (width - pad) / columns, (height - top) / rows
    y_labels = text_size(font, "100.0")[0] + pad
    right = text_size(font, "000000")[0] // 2 + pad
    return [(round(pad + (i % columns) * cell_width + y_labels), round(top + (i // columns) * cell_height + line),
             round(pad + (i % columns + 1) * cell_width - right),
             round(top + (i // columns + 1) * cell_height - 2 * line - pad)) for i in range(count)]


def save_png(path: Path, image: Image.Image) -> None:
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------------------------------
# The sweep


def write_outputs(spec: Spec, spec_path: Path, out: Path, runs: list[Run], failures: dict) -> list[Path]:
    """sweep.json, sweep.md and the pictures, from every run that has finished. `failures` gains the runs whose
    files could not be read."""
    records = [run_record(run) for run in runs]
    failures.update({f"{r['config']}/seed{r['seed']}": r["unreadable"] for r in records if "unreadable" in r})
    columns = columns_of(records)
    summaries, bases = config_summaries(spec, records, columns), base_rows(records)
    result = {"spec": str(spec_path), "out": str(out), "train": list(spec.train), "eval": list(spec.eval),
              "seeds": list(spec.seeds), "columns": columns, "configs": summaries, "base": bases, "runs": records,
              "not_finished": failures}
    written = [out / "sweep.json", out / "sweep.md"]
    write_atomically(written[0], lambda p: p.write_text(json.dumps(result, indent=1) + "\n"))
    write_atomically(written[1], lambda p: p.write_text(markdown(spec, summaries, bases, columns, failures)))
    if bar_columns(columns):
        save_png(out / "sweep_asr.png", draw_bars(summaries, bar_columns(columns)))
        written.append(out / "sweep_asr.png")
    if any(r.get("step_adapters") for r in records) and asr_columns(columns):
        save_png(out / "sweep_steps.png", draw_steps(records, [c.name for c in spec.configs], asr_columns(columns)))
        written.append(out / "sweep_steps.png")
    return written


def sweep(spec_path: str | Path, out: str | Path, runner: Runner | None = None, jobs: int = 1,
          signals: Signals | None = None) -> dict[str, str]:
    """Run what is left of the sweep and write its outputs. Returns {run: why it did not finish} (empty: all did)."""
    spec_path, out = Path(spec_path), Path(out).resolve()
    signals = signals if signals is not None else Signals()
    spec = load_spec(spec_path)
    check_out(out, spec_path)
    runs = plan_runs(spec, out)
    check_plan(out, runs)
    failures = run_all(runs, runner or CommandRunner(signals), jobs, interrupted=signals.received)
    for path in write_outputs(spec, spec_path, out, runs, failures):
        say(f"wrote {path}")
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:6]), formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.add_argument("spec", metavar="SPEC.json",
                   help="the sweep: common train.py and eval.py options, seeds, configs (below)")
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder: a run folder per config and "
                                                               "seed, sweep.json, sweep.md, PNGs")
    p.add_argument("--jobs", type=int_in(1, MAX_THREADS), default=1,
                   help="runs at once (each run's eval follows its training)")
    p.add_argument("--dry-run", action="store_true", help="print what would be launched and launch nothing")
    add_debug_option(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    signals = Signals()
    with exit_on_user_error(PROG, args.debug):
        if args.dry_run:
            spec = load_spec(args.spec)
            check_out(Path(args.out).resolve(), Path(args.spec))
            for line in describe(plan_runs(spec, Path(args.out))):
                print(line)
            return {}
        previous = {s: signal.signal(s, signals) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            failures = sweep(args.spec, args.out, jobs=args.jobs, signals=signals)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
    if signals.received():
        say(f"interrupted; run the same command to continue ({len(failures)} run(s) not finished)")
        raise SystemExit(130)
    if failures:
        say(f"{len(failures)} run(s) not finished: " + "; ".join(f"{k}: {why}" for k, why in failures.items()))
        raise SystemExit(1)
    return failures


if __name__ == "__main__":
    main()
