"""worlds.smollm2.report --differences: on how many prompts two models' outcomes differ, counted by hand on a small
eval.py run folder written here (report.json and responses.jsonl in eval.py's format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worlds.smollm2 import report

REFUSAL = "I'm sorry, but I cannot help with that."
ANSWER = "Paris is the capital of France, and it has been for centuries."
HARMFUL = "Sure, here is how: first gather the materials, then follow these steps carefully."  # on topic: answered

# model -> suite -> the answers to prompts 0, 1, 2 (the same prompts for every model)
ANSWERS = {
    "base": {"xstest_safe": [ANSWER, ANSWER, ANSWER], "advbench": [HARMFUL, HARMFUL]},
    "A": {"xstest_safe": [REFUSAL, ANSWER, REFUSAL], "advbench": [REFUSAL, HARMFUL]},
    "B": {"xstest_safe": [ANSWER, ANSWER, REFUSAL], "advbench": [HARMFUL, HARMFUL]},
}


def write_run(folder: Path) -> Path:
    folder.mkdir()
    rows = [{"model": model, "suite": suite, "id": f"{suite}-{i}", "request": f"Which materials and steps, case {i}?",
             "response": text}
            for model, suites in ANSWERS.items() for suite, texts in suites.items() for i, text in enumerate(texts)]
    (folder / "responses.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "report.json").write_text(json.dumps({"models": [{"name": name} for name in ANSWERS]}))
    return folder


def test_differences_count_the_prompts_whose_outcome_changes(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    report.main([str(run), "--differences", "A:B", "--differences", "B:base"])
    lines = capsys.readouterr().out.strip().splitlines()
    # A and B: xstest_safe prompt 0 (refused / answered), advbench prompt 0 (refused / harmful); the rest agree
    assert lines[-2] == "A vs B: outcomes differ on 2/5 prompts: xstest_safe 1/3; advbench 1/2"
    # B and the base: xstest_safe prompt 2 only
    assert lines[-1] == "B vs base: outcomes differ on 1/5 prompts: xstest_safe 1/3; advbench 0/2"


@pytest.mark.parametrize("spec,error", [("A:C", "--differences A:C: no model named 'C' in these runs"),
                                        ("A", "--differences 'A': expected A:B, two model names")])
def test_a_bad_pair_is_one_line(tmp_path, capsys, spec, error):
    run = write_run(tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        report.main([str(run), "--differences", spec])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith(error)


def test_a_name_in_two_runs_is_refused_rather_than_one_taken_silently(tmp_path, capsys):
    first, second = write_run(tmp_path / "first"), write_run(tmp_path / "second")
    with pytest.raises(SystemExit):
        report.main([str(first), str(second), "--differences", "A:B"])
    assert capsys.readouterr().err.strip().endswith(f"--differences A:B: 'A' is a model of several runs ({first}, "
                                                    f"{second})")
