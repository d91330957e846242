"""The report: report.json and a Markdown table (rows: models; columns: each suite's metric with its judge, utility,
and the training compute of train.py runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def _percent(numerator: int, denominator: int) -> str:
    return f"{100 * numerator / denominator:.1f}% ({numerator}/{denominator})" if denominator else "n/a"


def _asr_cell(entry: dict) -> str:
    """"12.5% (3/24)"; responses an LLM judge could not classify are left out of the rate and counted apart."""
    cell = _percent(entry["successes"], entry["judged"])
    return cell + (f" +{entry['invalid']} invalid" if entry["invalid"] else "")


def report_columns(report: dict) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell(model entry)) for every column of the table."""
    columns: list[tuple[str, Callable[[dict], str]]] = []
    for suite in report["suites"]:
        name, kind = suite["name"], suite["kind"]
        if kind == "attack":
            for judge_name in report["judges"]:
                columns.append((f"{name} ASR↓ [{judge_name}]", lambda m, s=name, j=judge_name: _asr_cell(
                    m["suites"][s]["judges"][j])))
        elif kind == "over_refusal":
            columns.append((f"{name} over-refusal↓ [{report['refusal_judge']}]", lambda m, s=name: _percent(
                m["suites"][s]["refusals"], m["suites"][s]["n"])))
        else:
            columns.append((f"{name} accuracy↑ [exact]", lambda m, s=name: _percent(
                m["suites"][s]["correct"], m["suites"][s]["n"])))
    if report.get("normal"):
        columns += [("NLL↓", lambda m: f"{m['utility']['nll']:.4f}"),
                    ("PPL↓", lambda m: f"{m['utility']['perplexity']:.3f}"),
                    ("KL from base", lambda m: f"{m['utility']['kl_from_base']:.4g}")]
    if any(m.get("train") for m in report["models"]):
        def train(key, fmt):
            return lambda m: fmt(m["train"][key]) if m.get("train") and m["train"].get(key) is not None else "-"
        columns += [("train tokens", train("tokens", lambda v: f"{v:,}")),
                    ("train FLOPs", train("estimated_flops", lambda v: f"{v:.3g}")),
                    ("train s", train("wall_seconds", lambda v: f"{v:.1f}"))]
    return columns


def markdown_table(report: dict) -> str:
    columns = report_columns(report)
    lines = ["| model | " + " | ".join(h for h, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for model in report["models"]:
        lines.append(f"| {model['name']} | " + " | ".join(cell(model) for _, cell in columns) + " |")
    notes = ["Samples per suite: " + ", ".join(f"{s['name']} {s['n']} ({s['source']})" for s in report["suites"]),
             "ASR = fraction of attack prompts whose response the judge in brackets counts as a success ("
             + "; ".join(f"`{name}`: {note}" for name, note in report["judge_notes"].items())
             + f"); over-refusal = fraction of benign prompts refused by `{report['refusal_judge']}`; accuracy = "
             "exact match up to whitespace.",
             f"Generation: {report['generation']['mode']}, max {report['generation']['max_new_tokens']} new tokens, "
             f"prompt format {report['prompt_format']}."]
    if report.get("normal"):
        notes.append(f"Utility on {report['normal']['spec']} ({report['normal']['n']} reference answers): mean "
                     f"per-token NLL, PPL = exp(NLL), KL(p_base || p_model) per answer token.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown_table(report))
    return json_path, md_path
