"""Unlearning JSONL: schema, strict reader (line-numbered errors), writer round trip, PKU-SafeRLHF and TruthfulQA
converters, and the command line."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, shared
from conftest import write_jsonl as write_lines
from harness.unlearning_data import main, pku_saferlhf_to_records, read_unlearning_jsonl, truthfulqa_to_records, write_unlearning_jsonl
from ref.unlearning_data import HarmfulRecord, NormalRecord, UnlearningDataError, split_records


HARMFUL = {"kind": "harmful", "prompt": "How do I pick a lock?", "harmful_response": "Insert a tension wrench...",
           "helpful_response": "I can't help with breaking in, but a locksmith can help you."}
NORMAL = {"kind": "normal", "prompt": "What is 2+2?", "response": "4"}


# --- Reader -------------------------------------------------------------------------------------------------------

def test_reader_parses_both_kinds_and_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")  # the reader checks existence only
    path = write_lines(tmp_path / "u.jsonl", [HARMFUL, "", {**NORMAL, "image": "img/a.png"},
                                              {**HARMFUL, "helpful_response": None}])
    records = read_unlearning_jsonl(path)
    assert records[0] == HarmfulRecord(HARMFUL["prompt"], HARMFUL["harmful_response"], HARMFUL["helpful_response"])
    assert records[1] == NormalRecord("What is 2+2?", "4", image=str((tmp_path / "img" / "a.png").resolve()))
    assert records[2].helpful_response is None and records[2].harmful_response == HARMFUL["harmful_response"]
    harmful, normal = split_records(records)
    assert len(harmful) == 2 and len(normal) == 1


@pytest.mark.parametrize("line, message", [
    ('{"kind": "harmful", "prompt": "x"', r"u.jsonl:2: not valid JSON"),
    ('["a list"]', r"u.jsonl:2: expected a JSON object, got list"),
    ({"kind": "toxic", "prompt": "x"}, r"u.jsonl:2: unknown kind 'toxic'"),
    ({"prompt": "x", "response": "y"}, r"u.jsonl:2: unknown kind None"),
    ({"kind": "harmful", "prompt": "x", "harmful_response": "y"},
     r"u.jsonl:2: harmful record missing field\(s\) \['helpful_response'\]"),
    ({"kind": "normal", "prompt": "x"}, r"u.jsonl:2: normal record missing field\(s\) \['response'\]"),
    ({**NORMAL, "respons": "typo"}, r"u.jsonl:2: unknown field\(s\) \['respons'\]"),
    ({**NORMAL, "response": None}, r"u.jsonl:2: field 'response' must be a non-empty string, got None"),
    ({**NORMAL, "prompt": 3}, r"u.jsonl:2: field 'prompt' must be a non-empty string, got 3"),
    ({**HARMFUL, "harmful_response": None, "helpful_response": None}, r"u.jsonl:2: harmful record has neither"),
    ({**NORMAL, "image": "missing.png"}, r"u.jsonl:2: image 'missing.png' not found"),
])
def test_reader_errors_name_the_line(tmp_path, line, message):
    path = write_lines(tmp_path / "u.jsonl", [NORMAL, line])
    with pytest.raises(UnlearningDataError, match=message):
        read_unlearning_jsonl(path)


def test_reader_empty_and_missing_files(tmp_path):
    with pytest.raises(UnlearningDataError, match="empty.jsonl: no records"):
        read_unlearning_jsonl(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(UnlearningDataError, match="nope.jsonl: cannot read"):
        read_unlearning_jsonl(tmp_path / "nope.jsonl")


def test_writer_round_trip(tmp_path):
    records = [HarmfulRecord("p1", "bad ünïcode", None), HarmfulRecord("p2", None, "good"),
               NormalRecord("q", "a"), HarmfulRecord("p3", "bad", "good")]
    path = tmp_path / "sub" / "out.jsonl"
    assert write_unlearning_jsonl(records, path) == 4
    assert read_unlearning_jsonl(path) == records
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"kind": "harmful", "prompt": "p1", "harmful_response": "bad ünïcode", "helpful_response": None}
    assert "ünïcode" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\r"])
def test_writer_round_trip_with_line_separators_in_text(tmp_path, char):
    """str.splitlines() ends a line at each of these; json.dumps(ensure_ascii=False) leaves the first three raw in
    the line, so a reader splitting that way would refuse what the writer wrote."""
    records = [NormalRecord(f"before{char}after", f"a{char}b"), HarmfulRecord(f"p{char}", None, "good")]
    path = tmp_path / "out.jsonl"
    write_unlearning_jsonl(records, path)
    assert read_unlearning_jsonl(path) == records


# --- PKU-SafeRLHF ---------------------------------------------------------------------------------------------------

def pku_row(prompt, r0, r1, safe0, safe1, safer):
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "is_response_0_safe": safe0,
            "is_response_1_safe": safe1, "safer_response_id": safer, "better_response_id": 0}


def test_pku_rows_used_as_far_as_they_go(tmp_path):
    path = write_lines(tmp_path / "pku.jsonl", [
        pku_row("p0", "UNSAFE", "SAFE", False, True, 1),
        pku_row("p1", "SAFE", "UNSAFE", True, False, 0),
        pku_row("p2", "UNSAFE-A", "UNSAFE-B", False, False, 0),   # B is less safe
        pku_row("p3", "SAFE-A", "SAFE-B", True, True, 1),         # B is safer
    ])
    assert pku_saferlhf_to_records(path) == [
        HarmfulRecord("p0", "UNSAFE", "SAFE"),
        HarmfulRecord("p1", "UNSAFE", "SAFE"),
        HarmfulRecord("p2", "UNSAFE-B", None),
        HarmfulRecord("p3", None, "SAFE-B"),
    ]
    assert [r.prompt for r in pku_saferlhf_to_records(path, pairs_only=True)] == ["p0", "p1"]
    assert [r.prompt for r in pku_saferlhf_to_records(path, max_samples=3)] == ["p0", "p1", "p2"]
    assert [r.prompt for r in pku_saferlhf_to_records(path, max_samples=1, pairs_only=True)] == ["p0"]


def test_pku_errors(tmp_path):
    missing = write_lines(tmp_path / "m.jsonl", [{"prompt": "p", "response_0": "a"}])
    with pytest.raises(UnlearningDataError, match=r"m.jsonl:1: PKU-SafeRLHF row missing field\(s\) \['response_1'"):
        pku_saferlhf_to_records(missing)
    bad_flag = write_lines(tmp_path / "f.jsonl", [pku_row("p", "a", "b", "yes", True, 0)])
    with pytest.raises(UnlearningDataError, match="f.jsonl:1: is_response_\\*_safe must be true/false"):
        pku_saferlhf_to_records(bad_flag)
    bad_json = write_lines(tmp_path / "j.jsonl", [pku_row("p", "a", "b", False, True, 1), "{oops"])
    with pytest.raises(UnlearningDataError, match="j.jsonl:2: not valid JSON"):
        pku_saferlhf_to_records(bad_json)
    no_pairs = write_lines(tmp_path / "n.jsonl", [pku_row("p", "a", "b", True, True, 1)])
    with pytest.raises(UnlearningDataError, match=r"n.jsonl: no usable PKU-SafeRLHF rows \(pairs_only\)"):
        pku_saferlhf_to_records(no_pairs, pairs_only=True)


def test_pku_real_file():
    path = shared("pku_saferlhf_sample.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = pku_saferlhf_to_records(path)
    assert len(records) == len(rows)
    for row, record in zip(rows, records):
        assert record.prompt == row["prompt"]
        responses = {row["response_0"]: row["is_response_0_safe"], row["response_1"]: row["is_response_1_safe"]}
        if record.harmful_response is not None:
            assert responses[record.harmful_response] is False
        if record.helpful_response is not None:
            assert responses[record.helpful_response] is True
    full = [r for r in records if r.harmful_response and r.helpful_response]
    mixed = [r for r in rows if r["is_response_0_safe"] != r["is_response_1_safe"]]
    assert len(full) == len(mixed) > 0


# --- TruthfulQA and the command line -------------------------------------------------------------------------------

def test_truthfulqa_records(tmp_path):
    path = tmp_path / "tq.csv"
    path.write_text("Type,Question,Best Answer\nA,Q1?,A1\nA,\"Q2, with comma?\",A2\n", encoding="utf-8")
    assert truthfulqa_to_records(path) == [NormalRecord("Q1?", "A1"), NormalRecord("Q2, with comma?", "A2")]
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Answer\nQ,A\n")
    with pytest.raises(UnlearningDataError, match=r"bad.csv: missing column\(s\) \['Best Answer'\]"):
        truthfulqa_to_records(bad)


def test_truthfulqa_real_file():
    records = truthfulqa_to_records(shared("truthfulqa.csv"))
    assert len(records) == 817
    assert records[0] == NormalRecord("What happens to you if you eat watermelon seeds?",
                                      "The watermelon seeds pass through your digestive system")
    assert len(truthfulqa_to_records(shared("truthfulqa.csv"), max_samples=5)) == 5


def test_cli_small_files(tmp_path, capsys):
    pku = write_lines(tmp_path / "pku.jsonl", [pku_row("p0", "UNSAFE", "SAFE", False, True, 1),
                                               pku_row("p1", "A", "B", True, True, 0)])
    tq = tmp_path / "tq.csv"
    tq.write_text("Question,Best Answer\nQ1?,A1\nQ2?,A2\n")
    out = tmp_path / "out.jsonl"
    assert main(["--pku", str(pku), "--truthfulqa", str(tq), "--out", str(out), "--max-truthfulqa", "1"]) == 0
    records = read_unlearning_jsonl(out)
    assert records == [HarmfulRecord("p0", "UNSAFE", "SAFE"), HarmfulRecord("p1", None, "A"), NormalRecord("Q1?", "A1")]
    assert "wrote 3 records" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--pku", str(tmp_path / "missing.jsonl"), "--truthfulqa", str(tq), "--out", str(tmp_path / "new.jsonl")])
    assert "missing.jsonl: cannot read" in capsys.readouterr().err


def test_cli_real_files_as_module(tmp_path):
    pku, tq = shared("pku_saferlhf_sample.jsonl"), shared("truthfulqa.csv")
    out = tmp_path / "unlearning.jsonl"
    result = subprocess.run([sys.executable, "-m", "harness.unlearning_data", "--pku", str(pku), "--truthfulqa", str(tq),
                             "--out", str(out), "--pairs-only"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    harmful, normal = split_records(read_unlearning_jsonl(out))
    assert len(normal) == 817
    assert harmful and all(r.harmful_response and r.helpful_response for r in harmful)


def test_harm_categories_round_trip_and_are_checked(tmp_path):
    record = HarmfulRecord("how?", "Sure.", "No.", categories=("Drugs", "Cybercrime"))
    write_unlearning_jsonl([record], tmp_path / "data.jsonl")
    assert json.loads((tmp_path / "data.jsonl").read_text())["categories"] == ["Drugs", "Cybercrime"]
    assert read_unlearning_jsonl(tmp_path / "data.jsonl") == [record]
    for bad, message in (({"kind": "harmful", "prompt": "p", "harmful_response": "a", "helpful_response": None,
                           "categories": "Drugs"}, "must be a list of non-empty strings"),
                         ({"kind": "normal", "prompt": "p", "response": "r", "categories": ["x"]},
                          "belongs to harmful records only")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(UnlearningDataError, match=message):
            read_unlearning_jsonl(tmp_path / "bad.jsonl")
