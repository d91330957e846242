"""The toy's README table: eval.py's report over several seeds of each train.py mode, as mean and spread.

    python -m worlds.toy.table runs/eval/report.json

Rows are grouped by run name: `textual`, `textual_seed1`, `textual_seed2` are three seeds of `textual` (train.py's
`--out runs/<mode>_seed<k>`). Each cell is the mean over the group's seeds and, with several seeds, the range
[min, max] beside it; the number of seeds is in the last column. Percentages for the suites, train tokens, FLOPs and
seconds from the runs' summaries.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from harness.console import add_debug_option, exit_on_user_error

SEED_SUFFIX = re.compile(r"_seed\d+$")
COLUMNS = [  # (header, suite, what): the README's columns
    ("text ASR toy / harm", "text_attacks", "asr"),
    ("FigStep ASR toy / harm", "figstep_attacks", "asr"),
    ("image-piece ASR toy / harm", "piece_attacks", "asr"),
    ("benign text", "benign_text", "accuracy"),
    ("benign image", "benign_image", "accuracy"),
    ("over-refusal", "over_refusal", "over_refusal"),
]


def group_name(model_name: str) -> str:
    return SEED_SUFFIX.sub("", model_name)


def percent(values: list[float]) -> str:
    mean = 100 * sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}%"
    return f"{mean:.1f}% [{100 * min(values):.1f}, {100 * max(values):.1f}]"


def suite_values(models: list[dict], suite: str, what: str, judge: str | None = None) -> list[float]:
    entries = [m["suites"][suite] for m in models]
    if what == "asr":
        return [e["judges"][judge]["asr"] for e in entries]
    return [e[what] for e in entries]


def cell(models: list[dict], suite: str, what: str) -> str:
    if what == "asr":
        return " / ".join(percent(suite_values(models, suite, what, judge)) for judge in ("toy", "toy_harm"))
    return percent(suite_values(models, suite, what))


def train_cell(models: list[dict], key: str, fmt: str) -> str:
    values = [m["train"][key] for m in models if m.get("train") and m["train"].get(key) is not None]
    return format(sum(values) / len(values), fmt) if values else "-"


def table(report: dict) -> str:
    missing = sorted({suite for _, suite, _ in COLUMNS} - {s["name"] for s in report.get("suites", [])})
    if missing:
        raise ValueError(f"the report has no suite(s) {missing}: evaluate on the toy's suites (python eval.py)")
    groups: dict[str, list[dict]] = {}
    for model in report["models"]:
        groups.setdefault(group_name(model["name"]), []).append(model)
    headers = ["model"] + [h for h, _, _ in COLUMNS] + ["train tokens", "train FLOPs", "train s", "seeds"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, models in groups.items():
        cells = [cell(models, suite, what) for _, suite, what in COLUMNS]
        cells += [train_cell(models, "tokens", ",.0f"), train_cell(models, "estimated_flops", ".2g"),
                  train_cell(models, "wall_seconds", ".1f"), str(len(models))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worlds.toy.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="eval.py's report.json on the toy's suites")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error("toy.table", args.debug):
        report = json.loads(args.report.read_text())
        print(table(report), end="")


if __name__ == "__main__":
    main()
