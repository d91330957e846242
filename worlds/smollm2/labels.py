"""Answers labelled by reading them, and how well each judge agrees with the labels.

    python -m worlds.smollm2.labels sample RUN_DIR ... --out FOLDER      # draw the answers to label, models hidden
    python -m worlds.smollm2.labels agreement assets/smollm2_labels/labels.jsonl   # the readers' and judges' agreement

The labels (assets/smollm2_labels/GUIDE.md) are one of LABELS. Two readers label every answer independently from the
guide; `label` is the settled one. Each labelling batch is split in halves by a fixed seed (`halves`): `dev` (judges
may be written or fixed on it) and `test` (never used to change a judge), and every judge's agreement is reported on
the test half.

A judge answers a yes/no question, so each is compared with the label it decides:

    harmful requests   attack success (gcg, arditi, answered, ...)   yes = label "harmful"
    benign requests    answered (the `answered` judge's three rules)   yes = label "safe" or "harmful"
    every answer       degenerate (evals.judges.is_degenerate)       yes = label "degenerate"

Agreement is accuracy and Cohen's kappa, kappa = (p_o - p_e) / (1 - p_e) with p_o the observed agreement and p_e the
agreement expected by chance from the two sides' marginal shares; the confusion shows, for each label, how many of its
answers the judge said yes to.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from evals.judges import AnswerJudge, is_degenerate, judge as make_judge
from harness.console import add_debug_option, exit_on_user_error
from harness.files import check_new_folder, new_folder
from harness.readers import read_jsonl
from worlds.smollm2.report import ANSWER_SUITES, HARM_SUITES, OVER_REFUSAL

LABELS = ("refusal", "harmful", "safe", "off_topic", "degenerate")
BENIGN_SUITES = (OVER_REFUSAL, *ANSWER_SUITES)
SPLIT_SEED = 0
HARM_JUDGES = ("gcg", "arditi", "answered", "answered_uncautioned")  # the last written on the dev half


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa of two raters' labels of the same items (module docstring); 1.0 when both are constant and equal."""
    if len(a) != len(b) or not a:
        raise ValueError("cohen_kappa needs two equally long, non-empty label lists")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[c] * count_b[c] for c in set(a) | set(b)) / n ** 2
    return 1.0 if expected == 1.0 else (observed - expected) / (1.0 - expected)


def split_halves(ids: Sequence[str], seed: int = SPLIT_SEED) -> dict[str, str]:
    """id -> "dev" or "test": a shuffle of the ids (sorted first, so the order of the file does not matter)."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return {item: ("dev" if k < len(order) // 2 else "test") for k, item in enumerate(order)}


def halves(items: Sequence[dict]) -> dict[str, str]:
    """Each labelling batch split on its own (`split_halves` of its ids): a later batch never moves an answer of an
    earlier one between the halves, so an answer a judge was written on stays in the development half."""
    batches: dict[int, list[str]] = {}
    for item in items:
        batches.setdefault(item["batch"], []).append(item["id"])
    return {i: half for ids in batches.values() for i, half in split_halves(ids).items()}


# ---------------------------------------------------------------------------------------------------------------------
# Judges as yes/no questions about one labelled answer


def harm_question(judge_name: str) -> Callable[[dict], bool]:
    judge_ = make_judge(judge_name)
    return lambda item: judge_.attack_successes([item["response"]], [item["request"]])[0]


def answered_question(item: dict) -> bool:
    return AnswerJudge().attack_successes([item["response"]], [item["request"]])[0]


def degenerate_question(item: dict) -> bool:
    return is_degenerate(item["response"])


def questions() -> list[tuple[str, str, Callable[[dict], bool], Callable[[str], bool], str]]:
    """(question, judge, verdict(item), truth(label), which items): every comparison the agreement table shows."""
    harmful = lambda label: label == "harmful"  # noqa: E731
    rows = [("harmful answer", name, harm_question(name), harmful, "harm") for name in HARM_JUDGES]
    rows.append(("benign request answered", "answered", answered_question, lambda l: l in ("safe", "harmful"),
                 "benign"))
    rows.append(("degenerate", "is_degenerate", degenerate_question, lambda l: l == "degenerate", "all"))
    return rows


def applies(item: dict, which: str) -> bool:
    return which == "all" or (item["suite"] in HARM_SUITES) == (which == "harm")


def agreement(items: list[dict]) -> dict:
    """The readers' agreement on every item, and each judge's on the test half (module docstring)."""
    readers = {"n": len(items), "kappa": cohen_kappa([i["reader_1"] for i in items], [i["reader_2"] for i in items]),
               "accuracy": sum(i["reader_1"] == i["reader_2"] for i in items) / len(items),
               "settled_as_reader_1": sum(i["label"] == i["reader_1"] for i in items)}
    test = [i for i in items if i["half"] == "test"]
    judges = []
    for question, name, verdict, truth, which in questions():
        chosen = [i for i in test if applies(i, which)]
        said = [verdict(i) for i in chosen]
        true = [truth(i["label"]) for i in chosen]
        confusion = {label: [sum(s for s, i in zip(said, chosen) if i["label"] == label),
                             sum(i["label"] == label for i in chosen)] for label in LABELS}
        judges.append({"question": question, "judge": name, "n": len(chosen),
                       "accuracy": sum(s == t for s, t in zip(said, true)) / len(chosen),
                       "kappa": cohen_kappa(said, true), "yes_by_label": confusion})
    return {"readers": readers, "test": judges}


def markdown(figures: dict) -> str:
    """The agreement figures as the table docs/smollm2.md shows."""
    readers = figures["readers"]
    lines = [f"Readers: {readers['n']} answers, agreement {readers['accuracy']:.1%}, Cohen's kappa {readers['kappa']:.3f}.",
             "", "| question (test half) | judge | n | accuracy | kappa | said yes / answers, by label: "
             + " / ".join(LABELS) + " |", "|---|---|---|---|---|---|"]
    for row in figures["test"]:
        confusion = " / ".join(f"{yes}/{n}" for yes, n in row["yes_by_label"].values())
        lines.append(f"| {row['question']} | {row['judge']} | {row['n']} | {row['accuracy']:.1%} | "
                     f"{row['kappa']:.3f} | {confusion} |")
    return "\n".join(lines)


def check_items(path: Path, items: list[tuple[int, dict]]) -> list[dict]:
    for number, item in items:
        for key in ("id", "batch", "suite", "request", "response", "reader_1", "reader_2", "label", "half"):
            if key not in item:
                raise ValueError(f"{path}:{number}: missing key {key!r}")
        for key in ("reader_1", "reader_2", "label"):
            if item[key] not in LABELS:
                raise ValueError(f"{path}:{number}: {key} {item[key]!r} is not one of {LABELS}")
    return [item for _, item in items]


# ---------------------------------------------------------------------------------------------------------------------
# Drawing the answers to label


def sample(runs: list[Path], per_block: int, models: Sequence[str] | None = None, prefix: str = "a",
           seed: int = SPLIT_SEED) -> tuple[list[dict], list[dict]]:
    """`per_block` answers of every (run, model, suite) (of `models` only, if given), drawn with the seed: the items
    to label (model hidden, in a shuffled order, ids `prefix`000, ...) and the key (which run and model wrote each)."""
    rng = random.Random(seed)
    items, key = [], []
    for run in runs:
        blocks: dict[tuple[str, str], list[dict]] = {}
        for _, row in read_jsonl(run / "responses.jsonl"):
            if row["suite"] in (*HARM_SUITES, *BENIGN_SUITES) and (models is None or row["model"] in models):
                blocks.setdefault((row["model"], row["suite"]), []).append(row)
        for (model, suite), rows in sorted(blocks.items()):
            for row in rng.sample(rows, min(per_block, len(rows))):
                items.append({"suite": suite, "kind": "harmful" if suite in HARM_SUITES else "benign",
                              "image": row.get("image") is not None, "request": row["request"],
                              "response": row["response"]})
                key.append({"run": run.name, "model": model, "row_id": row["id"]})
    order = list(range(len(items)))
    rng.shuffle(order)
    items, key = [items[k] for k in order], [key[k] for k in order]
    for n, (item, entry) in enumerate(zip(items, key)):
        item["id"] = entry["id"] = f"{prefix}{n:03d}"
    return [{"id": i.pop("id"), **i} for i in items], key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worlds.smollm2.labels", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    draw = commands.add_parser("sample", help="draw answers to label from eval.py run folders")
    draw.add_argument("runs", nargs="+")
    draw.add_argument("--per-block", type=int, default=4, help="answers per (run, model, suite) (default 4)")
    draw.add_argument("--models", nargs="+", help="only these models' answers (default: every model of the runs)")
    draw.add_argument("--prefix", default="a", help="the items' id prefix, distinct for each draw (default a)")
    draw.add_argument("--out", required=True, help="a new folder: items.jsonl (to label) and key.jsonl")
    agree = commands.add_parser("agreement", help="the readers' and the judges' agreement with the labels")
    agree.add_argument("labels")
    agree.add_argument("--markdown", action="store_true", help="the table instead of the JSON figures")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error(parser.prog, args.debug):
        if args.command == "sample":
            runs = [Path(r) for r in args.runs]
            check_new_folder(Path(args.out), runs)  # before reading the runs: never into or around them
            items, key = sample(runs, args.per_block, args.models, args.prefix)
            with new_folder(Path(args.out), runs) as folder:  # written whole or not at all
                (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
                (folder / "key.jsonl").write_text("".join(json.dumps(k) + "\n" for k in key))
            print(f"{len(items)} answers to label in {Path(args.out) / 'items.jsonl'}")
        else:
            path = Path(args.labels)
            figures = agreement(check_items(path, read_jsonl(path)))
            print(markdown(figures) if args.markdown else json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
