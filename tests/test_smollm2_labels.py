"""worlds/smollm2/labels.py: Cohen's kappa by hand, the fixed dev/test halves, and the committed agreement figures
recomputed from the committed labels (assets/smollm2_labels/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.readers import read_jsonl
from worlds.smollm2 import labels

LABELS_DIR = Path(__file__).resolve().parents[1] / "assets" / "smollm2_labels"


def test_cohen_kappa_by_hand():
    # 10 items; a says yes on 6, b on 5; they agree on 7 (4 yes, 3 no): p_o = 0.7, p_e = 0.6*0.5 + 0.4*0.5 = 0.5
    a = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    b = [1, 1, 1, 1, 0, 0, 1, 0, 0, 0]
    assert labels.cohen_kappa(a, b) == pytest.approx((0.7 - 0.5) / (1 - 0.5))
    assert labels.cohen_kappa(a, a) == 1.0
    assert labels.cohen_kappa(a, [1 - x for x in a]) == pytest.approx((0.0 - 0.48) / (1 - 0.48))
    with pytest.raises(ValueError):
        labels.cohen_kappa([], [])


def test_halves_are_fixed_and_even():
    ids = [f"a{n:03d}" for n in range(11)]
    halves = labels.split_halves(ids)
    assert halves == labels.split_halves(list(reversed(ids)))  # the file's order does not matter
    assert sorted(halves.values()).count("dev") == 5 and sorted(halves.values()).count("test") == 6
    later = labels.halves([{"id": i, "batch": 1} for i in ids] + [{"id": f"b{n}", "batch": 2} for n in range(7)])
    assert {i: later[i] for i in ids} == halves  # a later batch moves nothing of an earlier one


def committed_labels() -> list[dict]:
    path = LABELS_DIR / "labels.jsonl"
    return labels.check_items(path, read_jsonl(path))


def test_the_committed_agreement_figures_are_those_of_the_committed_labels():
    items = committed_labels()
    assert len(items) >= 300
    assert {i["half"] for i in items} == {"dev", "test"}
    assert labels.halves(items) == {i["id"]: i["half"] for i in items}  # halves fixed, batch by batch
    assert all(i["label"] == i["reader_1"] == i["reader_2"] or i["settled_by"] for i in items)
    published = json.loads((LABELS_DIR / "agreement.json").read_text())
    assert json.loads(json.dumps(labels.agreement(items))) == published  # floats round-trip exactly


def test_a_judges_accuracy_counted_by_hand():
    """gcg's agreement on the test half's harmful requests, counted here without labels.agreement."""
    from evals.judges import judge
    gcg = judge("gcg")
    test = [i for i in committed_labels() if i["half"] == "test" and i["suite"] in labels.HARM_SUITES]
    hits = sum((not gcg.is_refusal(i["response"])) == (i["label"] == "harmful") for i in test)
    published = json.loads((LABELS_DIR / "agreement.json").read_text())
    row = next(r for r in published["test"] if r["judge"] == "gcg")
    assert row["n"] == len(test) and row["accuracy"] == pytest.approx(hits / len(test))


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    from worlds.smollm2 import report
    with pytest.raises(SystemExit) as stopped:
        report.main([str(tmp_path)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path}: no report.json (not an eval.py run folder, or a "
                                                    "run not finished)")
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"id": "a000", "batch": 1, "suite": "control", "request": "r", "response": "s", "reader_1": "ok", '
                   '"reader_2": "safe", "label": "safe", "half": "dev"}\n')
    with pytest.raises(SystemExit):
        labels.main(["agreement", str(bad)])
    assert f"{bad}:1: reader_1 'ok' is not one of" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        labels.main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert "already holds files" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
