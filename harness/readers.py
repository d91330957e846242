"""The strict readers of the files data sets and runs come in: CSV, JSON and JSONL, one reader per format, used by
every program and tool (the unlearning data, the suites and benchmarks, run logs, eval.py's saved responses).

Strict means: an error names the file and the line, and says what is wrong, before any work is done: a line that
is not a JSON object, a quote that never closes, a row longer or shorter than the header, a column named twice.
One rule for a file a program appends to (`read_jsonl(..., appended=True)`): a kill can cut its last line short,
which is dropped; a bad line before it means the file was edited, an error.
"""

from __future__ import annotations

import collections
import csv
import itertools
import json
import sys
from pathlib import Path

JSON_WHITESPACE = " \t\r\n"  # the only whitespace JSON allows between tokens (RFC 8259)


class ReadError(ValueError):
    """A data file that is missing, unreadable, or not in its format."""


def _json_error(err: ValueError | RecursionError) -> str:
    """A JSON parse error in a few words: json's own message, or the nesting depth Python could not follow."""
    if isinstance(err, RecursionError):
        return (f"nested deeper than Python's JSON reader can follow (its recursion limit is "
                f"{sys.getrecursionlimit()})")
    return str(err)


def jsonl_lines(text: str) -> list[str]:
    """A JSONL file's lines, split at "\n" only (what a JSONL writer ends lines with; a "\r" before it is JSON
    whitespace). Not str.splitlines(): it also splits at U+2028, U+2029, \x85, \x0b, \x0c and \x1c-\x1e, which
    json.dumps(ensure_ascii=False) leaves unescaped inside strings (the first three) and which are text, not line
    ends, in a JSON line."""
    return text.split("\n")


def read_jsonl(path: str | Path, error: type[ValueError] = ReadError, appended: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an `error` naming it.
    UTF-8, a byte-order mark allowed.

    `appended`: a file this project appends to a line at a time (a run's log.jsonl, eval.py's responses). It may not
    exist yet (no lines), and a kill or a full disk can cut its last line short: a last line with no newline after it
    that is not valid JSON is dropped (its work is done again); a bad line before it means the file was edited."""
    path = Path(path)
    if appended and not path.is_file():
        return []
    try:
        # a line cut short inside a multi-byte character is dropped below, not a decoding error of the whole file
        lines = jsonl_lines(path.read_text(encoding="utf-8-sig", errors="replace" if appended else "strict"))
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read: {err}") from err
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip(JSON_WHITESPACE):
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            if appended and number == len(lines):
                continue  # the last line, after the last newline: cut short while it was being written
            edited = "; this file is only appended to, so it was edited" if appended else ""
            raise error(f"{path}:{number}: not valid JSON: {_json_error(err)}{edited}") from err
        if not isinstance(obj, dict):
            raise error(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        records.append((number, obj))
    return records


def read_json_file(path: str | Path, expected: type, what: str, error: type[ValueError] = ReadError):
    """A data set's JSON file whose top level must be an `expected` (list or dict) holding `what`; anything else is
    an `error` naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise error(f"{path}: cannot read {what}: {_json_error(err)}") from err
    if not isinstance(value, expected):
        shape = "list" if expected is list else "object"
        raise error(f"{path}: expected a JSON {shape} of {what}, got {type(value).__name__}")
    return value


def read_csv_lines(path: str | Path, error: type[ValueError] = ReadError) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, (line number, row) for each row): like read_jsonl, so that an error can name the line a row
    starts on (a quoted value may span several lines). Read strictly: a quote that never closes (csv's default would
    swallow the rest of the file into one value), text after a closing quote, a row longer or shorter than the
    header and a column named twice in the header (DictReader would keep only the last) are errors."""
    path = Path(path)
    columns, rows, start = [], [], 1  # start: the line the row being read starts on (line 1 is the header)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, strict=True)
            columns = list(reader.fieldnames or [])
            _check_header(path, columns, error)
            start = 2
            for row in reader:
                if None in row or None in row.values():  # DictReader's marks of a row longer or shorter than the header
                    raise error(f"{path}:{start}: {'more' if None in row else 'fewer'} fields than the header's "
                                f"{len(columns)}")
                rows.append((start, row))
                start = reader.line_num + 1
    except csv.Error as err:
        # DictReader.line_num is only updated after a good row; its csv.reader's counts the line it failed on
        raise error(_csv_error_message(path, start, reader.reader.line_num, columns, err)) from err
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read CSV: {err}") from err
    return columns, rows


def _check_header(path: Path, columns: list[str], error: type[ValueError]) -> None:
    twice = sorted(c for c, n in collections.Counter(columns).items() if n > 1)  # linear: a header may be 10**6 wide
    if twice:
        raise error(f"{path}:1: column(s) {twice} appear more than once in the header; rename them (a row would keep "
                    "only the last one's value)")


def _csv_error_message(path: Path, start: int, line: int, columns: list[str], err: csv.Error) -> str:
    """What strict csv found wrong, with the line and, for a quote that never closes, the column it opens in."""
    close_it = "close it, or write \"\" for a quote inside a quoted value"
    if "end of data" in str(err):
        column = _last_column(path, start, columns)
        row = "the header" if start == 1 else "the row starting on this line"
        return f"{path}:{start}: the quote opened in column {column} of {row} never closes; {close_it}"
    if "field limit" in str(err):  # an unclosed quote in a large file swallows more than csv's field limit first
        return (f"{path}:{start}: a value in the row starting on this line is over csv's limit of "
                f"{csv.field_size_limit()} characters (a quote that never closes?); {close_it}")
    if "expected after" in str(err):  # csv's "',' expected after '\"'"
        return (f"{path}:{line}: text after a closing quote ({err}); quote the whole value, writing \"\" for each "
                "quote inside it")
    return f"{path}:{line}: not valid CSV ({err})"


def _last_column(path: Path, start: int, columns: list[str]) -> str:
    """The column of the last value of the row starting on line `start`, read leniently: where a quote that never
    closes opened (the rest of the file became its value)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        fields = next(csv.reader(itertools.islice(f, start - 1, None)))
    index = len(fields) - 1
    return repr(columns[index]) if index < len(columns) else f"number {index + 1}"


def read_csv(path: str | Path, error: type[ValueError] = ReadError) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows) of a CSV file with a header line; utf-8, a byte-order mark allowed; a row with more or
    fewer fields than the header is an `error` naming its line."""
    columns, rows = read_csv_lines(path, error)
    return columns, [row for _, row in rows]


def require_columns(path: str | Path, columns: list[str], needed: list[str],
                    error: type[ValueError] = ReadError) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise error(f"{path}: missing column(s) {missing}; columns found: {columns}")
