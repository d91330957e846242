"""harness/readers.py: the strict CSV, JSON and JSONL readers every program shares (errors name the file and line)."""

from __future__ import annotations

import json

import pytest

from harness.readers import ReadError, read_csv, read_csv_lines, read_json_file, read_jsonl
from ref.config import ConfigError, read_json


def test_csv_unterminated_quote_names_line_and_column(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('id,prompt,note\n1,fine,ok\n2,"never closed,x\n3,more,rows\n', encoding="utf-8")
    with pytest.raises(ReadError, match=r"open\.csv:3: the quote opened in column 'prompt' of the row starting on this "
                                        r"line never closes; close it"):
        read_csv(path)
    path.write_text('id,prompt\n1,"x""', encoding="utf-8")  # an escaped quote, then the end of the file
    with pytest.raises(ReadError, match=r"open\.csv:2: the quote opened in column 'prompt'"):
        read_csv(path)
    path.write_text('id,"prompt\n1,x\n', encoding="utf-8")
    with pytest.raises(ReadError, match=r"open\.csv:1: the quote opened in column number 2 of the header"):
        read_csv(path)
    path.write_text('id,prompt\n1,"' + "x" * 200_000 + "\n2,y\n", encoding="utf-8")  # past csv's field limit first
    with pytest.raises(ReadError, match=r"open\.csv:2: a value in the row starting on this line is over csv's limit"):
        read_csv(path)


def test_csv_quotes_that_close_are_fine(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('id,prompt\r\n1,"two\r\nlines, ""quoted"""\r\n2,a"b\r\n3,"at the end"', encoding="utf-8")
    assert read_csv_lines(path) == (["id", "prompt"], [(2, {"id": "1", "prompt": 'two\r\nlines, "quoted"'}),
                                                       (4, {"id": "2", "prompt": 'a"b'}),
                                                       (5, {"id": "3", "prompt": "at the end"})])


def test_csv_text_after_closing_quote_and_duplicate_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('id,prompt\n1,ok\n2,"quoted" then text\n', encoding="utf-8")
    with pytest.raises(ReadError, match=r"bad\.csv:3: text after a closing quote"):
        read_csv(path)
    path.write_text("id,prompt,id\n1,hi,2\n", encoding="utf-8")
    with pytest.raises(ReadError, match=r"bad\.csv:1: column\(s\) \['id'\] appear more than once in the header; "
                                        r"rename them"):
        read_csv(path)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    text = "a\u2028b \u2029 \x85 \x0b \x0c \x1c \x1d \x1e"
    path = tmp_path / "records.jsonl"
    path.write_bytes(("\ufeff" + json.dumps({"text": text}, ensure_ascii=False) + "\r\n\r\n"
                      + json.dumps({"n": 2}) + "\n").encode("utf-8"))
    assert read_jsonl(path) == [(1, {"text": text}), (3, {"n": 2})]


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    deep = "[" * 100_000
    (tmp_path / "deep.jsonl").write_text('{"ok": 1}\n' + deep + "\n")
    with pytest.raises(ReadError, match=r"deep\.jsonl:2: not valid JSON: nested deeper than Python's JSON reader can "
                                        r"follow"):
        read_jsonl(tmp_path / "deep.jsonl")
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(ReadError, match=r"deep\.json: cannot read prompts: nested deeper than Python's JSON reader"):
        read_json_file(tmp_path / "deep.json", list, "prompts")
    (tmp_path / "config.json").write_text('{"a": ' * 100_000)
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON \(nested deeper than Python's JSON reader "
                                          r"can follow\)"):
        read_json(tmp_path / "config.json")
