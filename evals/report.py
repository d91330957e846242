"""The report: report.json and a Markdown table (rows: models; columns: each suite's metric with its judge, utility,
and the training compute of train.py runs), per-category tables, and what produced it.

Every rate is printed with its count and its 95% Wilson interval: "12.5% (3/24; 4.3-31.0)".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from harness.eval_folder import REPORT_FILE
from harness.files import write_atomically
from harness.provenance import provenance, sha256_file


def _percent(numerator: int, denominator: int, ci: list[float] | None = None) -> str:
    if not denominator:
        return "n/a"
    interval = f"; {100 * ci[0]:.1f}-{100 * ci[1]:.1f}" if ci else ""
    return f"{100 * numerator / denominator:.1f}% ({numerator}/{denominator}{interval})"


def _asr_cell(entry: dict) -> str:
    """"12.5% (3/24; 4.3-31.0)"; verdicts an LLM judge could not give are counted as its own code counts them, and
    their number is shown."""
    cell = _percent(entry["successes"], entry["n"], entry.get("ci"))
    return cell + (f" incl. {entry['invalid']} invalid" if entry["invalid"] else "")


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
                m["suites"][s]["refusals"], m["suites"][s]["n"], m["suites"][s].get("ci"))))
        else:
            columns.append((f"{name} accuracy↑ [exact]", lambda m, s=name: _percent(
                m["suites"][s]["correct"], m["suites"][s]["n"], m["suites"][s].get("ci"))))
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


def category_tables(report: dict) -> list[str]:
    """For each attack suite whose samples carry a category, one table per judge: rows models, columns categories."""
    lines = []
    for suite in report["suites"]:
        if suite["kind"] != "attack":
            continue
        for judge_name in report["judges"]:
            entries = [m["suites"][suite["name"]]["judges"][judge_name] for m in report["models"]]
            if not entries or "categories" not in entries[0]:
                continue
            categories = list(entries[0]["categories"])
            lines += ["", f"ASR by category, {suite['name']} [{judge_name}]:", "",
                      "| model | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
            for model, entry in zip(report["models"], entries):
                cells = [_percent(c["successes"], c["n"], c.get("ci")) for c in entry["categories"].values()]
                lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    return lines


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
             "Brackets after a count: its 95% Wilson interval. " + report.get("judge_input", ""),
             f"Model {report['model']} ({report['quantize']} base, {report['dtype']}); generation: "
             f"{report['generation']['mode']}, max {report['generation']['max_new_tokens']} new tokens, prompt format "
             f"{report['prompt_format']}."]
    if report.get("pgd_note"):
        notes.append(report["pgd_note"])
    if report.get("judge_models"):
        notes.append("Judge models: " + ", ".join(f"`{name}` {folder}" for name, folder in
                                                   report["judge_models"].items()) + ".")
    if report.get("normal"):
        notes.append(f"Utility on {report['normal']['spec']} ({report['normal']['n']} reference answers): mean "
                     f"per-token NLL, PPL = exp(NLL), KL(p_base || p_model) per answer token.")
    made = report.get("provenance")
    if made:
        packages = ", ".join(f"{name} {version}" for name, version in made["packages"].items())
        commit = made["commit"] or "no git checkout"
        notes.append(f"Produced {made['date']} by commit {commit}; {packages}; sha256 of the model config, adapters "
                     f"and suite files in report.json.")
    return ("\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
            + "\n".join(category_tables(report) + pgd_table(report)) + "\n")


def pgd_table(report: dict) -> list[str]:
    """The PGD attacks of the run, one row each: whose images, what they did to the target NLL, time and memory."""
    if not report.get("pgd_attacks"):
        return []
    lines = ["", "PGD attacks (images optimised against the model named; target NLL: mean per token over the corpus, "
                 "clean -> adversarial; peak memory: CUDA's peak allocated, or on a CPU the process's peak resident "
                 "set):", "",
             "| attacked model | suite | budget | images | steps x restarts | target NLL | L-inf max | s / image | "
             "peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for a in report["pgd_attacks"]:
        lines.append(f"| {a['model']} | {a['suite']} | {a['budget']} | {a['images']} | {a['steps']} x "
                     f"{a['restarts']} | {a['clean_nll']:.4f} -> {a['adv_nll']:.4f} | {a['max_linf_levels']}/255 | "
                     f"{a['seconds_per_image']:.2f} | {a['peak_memory_mb']:.0f} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# What produced a report


def spec_files(spec: str) -> list[Path]:
    """The files a suite spec "[NAME=]KIND:PATH" names: the file itself, or a folder's JSON/CSV files."""
    path = Path(spec.split(":", 1)[1]) if ":" in spec else None
    if path is None or not path.exists():
        return []
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".csv"))


def report_provenance(root: Path, model_dir: str | Path, adapters: list[tuple[str, Path]], suites) -> dict:
    """Date, code commit, package versions, and the sha256 of the model config, the adapters' files and the suite
    files: enough to tell two reports' inputs apart."""
    config = Path(model_dir) / "config.json"
    made = provenance({}, root=root)
    made["sha256"] = {
        "model_config": sha256_file(config) if config.is_file() else None,
        "adapters": {name: {f.name: sha256_file(f) for f in sorted(Path(folder).iterdir()) if f.is_file()}
                     for name, folder in adapters},
        "suites": {suite.source: {str(f): sha256_file(f) for f in (spec_files(suite.source) if suite.files is None
                                                                    else suite.files)}
                   for suite in suites},
    }
    return made


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """report.md, then report.json (each renamed into place): a report.json is always whole, and marks the run
    finished."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / REPORT_FILE, out / "report.md"
    write_atomically(md_path, lambda p: p.write_text(markdown_table(report)))
    write_atomically(json_path, lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))
    return json_path, md_path
