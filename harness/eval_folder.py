"""eval.py's run folder: what an evaluation writes there as it goes, and what a resumed run and --rejudge read back.

    OUT/run.json             what decides the responses (settings, suites, the sha256 of the inputs), written first;
                             the models once loaded, the judges once judged
        generations.jsonl    one line per response, appended a (model, suite) block at a time, as each is done
        utility.jsonl        one line per model, once all its blocks are generated (its NLL and KL on normal data)
        pgd.jsonl, pgd/      the adversarial images of pgd suites, one line per PNG (evals/pgd_images.py)
        responses.jsonl      every response with its verdicts, written whole by judging
        report.json, .md     the report; report.json marks the run finished

A run starts in a new or empty folder and resumes in the folder of an interrupted run of the same settings; a finished
run and a folder of the user's files are never written over. The appended files are read by harness.readers' rule: a
last line cut short by a kill is dropped (its block is made again), a bad line before it is an error naming it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Iterable

from harness.files import check_run_folder, write_atomically
from harness.provenance import changed_inputs, fingerprints
from harness.readers import read_jsonl
from ref.config import read_json

RUN_FILE, GENERATIONS_FILE, UTILITY_FILE = "run.json", "generations.jsonl", "utility.jsonl"
RESPONSES_FILE, REPORT_FILE = "responses.jsonl", "report.json"
PGD_DIR, PGD_FILE = "pgd", "pgd.jsonl"  # the adversarial PNGs, and one line per PNG
APPENDED_FILES = (GENERATIONS_FILE, UTILITY_FILE, PGD_FILE)  # the work an interrupted run saved

# The fields every line of a file eval.py writes has, by type, which a reader of the file relies on: a line without
# them (a file edited by hand, or not eval.py's) is an error naming the file and the line, not a KeyError.
LINE_FIELDS = {GENERATIONS_FILE: {"model": str, "suite": str, "response": str, "request": str},
               UTILITY_FILE: {"model": str},
               PGD_FILE: {"model": str, "suite": str, "budget": str, "png": str, "config": dict},
               RESPONSES_FILE: {"model": str, "suite": str}}
OPTIONAL_LINE_FIELDS = {UTILITY_FILE: {"utility": dict}, RESPONSES_FILE: {"attack_success": dict}}


class RunFolderError(ValueError):
    """A run folder eval.py cannot start, resume or re-judge; nothing in it was changed."""


def is_finished(out: Path) -> bool:
    """The run in `out` finished: its report.json is written (the last file a run writes, renamed into place)."""
    return (Path(out) / REPORT_FILE).is_file()


def default_out(root: Path) -> Path:
    """runs/eval, or the first of runs/eval-2, runs/eval-3, ... that holds no finished run: a bare `python eval.py`
    run twice keeps both reports."""
    candidate, n = root / "runs" / "eval", 1
    while is_finished(candidate):
        n += 1
        candidate = root / "runs" / f"eval-{n}"
    return candidate


def check_out(out: Path, inputs: Iterable[str | Path]) -> None:
    """--out can take a new run or resume an interrupted one, found before anything is read or loaded: a run folder
    (harness.files.check_run_folder: no input, not a file, not a folder of other files, writable) that holds no
    finished run."""
    check_run_folder(out, RUN_FILE, inputs)
    if is_finished(out):
        raise RunFolderError(f"--out {out}: holds a finished evaluation ({REPORT_FILE}); re-score it with --rejudge "
                             f"{out}, or choose another --out")


def recorded_settings(out: Path) -> dict:
    """The settings of the run in `out`, read leniently ({} when there is none): `EvalFolder.start_or_resume` checks
    the file strictly."""
    try:
        saved = json.loads((out / RUN_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    settings = saved.get("settings") if isinstance(saved, dict) else None
    return settings if isinstance(settings, dict) else {}


# ---------------------------------------------------------------------------------------------------------------------
# run.json's shape: what its readers (a resumed run, --rejudge, the report) rely on, checked when it is read


TYPE_NAMES = {str: "string", dict: "JSON object", list: "list", int: "integer"}
# The keys the report copies from run.json (written when a run starts; a --rejudge needs every one).
REPORTED_KEYS = ("model", "quantize", "dtype", "prompt_format", "generation", "normal", "provenance", "suite_list",
                 "refusal_judge")


def _is_model(entry) -> bool:
    """One of run.json's "models": [name, adapter folder or null, the train.py summary or null]."""
    return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], (str, type(None))) and isinstance(entry[2], (dict, type(None))))


def _is_suite(entry) -> bool:
    """One of run.json's "suite_list": {"name", "kind", "n", "source", ...}."""
    return (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("kind"), str)
            and type(entry.get("n")) is int and entry["n"] >= 0)


RECORD_SHAPES = {  # key: (is it well formed, what it should be)
    "settings": (lambda v: isinstance(v, dict), "a JSON object"),
    "models": (lambda v: isinstance(v, list) and all(map(_is_model, v)),
               "a list of [name, adapter folder or null, train summary or null]"),
    "suite_list": (lambda v: isinstance(v, list) and all(map(_is_suite, v)),
                   'a list of objects {"name": string, "kind": string, "n": integer >= 0, ...}'),
    "judges": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of judge names"),
    "judge_notes": (lambda v: isinstance(v, dict), "a JSON object"),
    "judge_models": (lambda v: isinstance(v, dict), "a JSON object"),
    "refusal_judge": (lambda v: isinstance(v, str), "a judge's name"),
    "generation": (lambda v: isinstance(v, dict) and isinstance(v.get("mode"), str) and "max_new_tokens" in v,
                   'a JSON object {"mode", "max_new_tokens", ...}'),
    "normal": (lambda v: v is None or (isinstance(v, dict) and "spec" in v and "n" in v),
               'null or a JSON object {"spec", "n"}'),
    "provenance": (lambda v: isinstance(v, dict) and isinstance(v.get("packages"), dict) and "date" in v
                   and "commit" in v, 'a JSON object {"date", "commit", "packages", ...}'),
    "inputs": (lambda v: isinstance(v, dict) and all(isinstance(x, (str, type(None))) for x in v.values()),
               "a JSON object {file name: sha256}"),
}


def check_record(record: dict, path: Path) -> None:
    """Every key of run.json that is there has the shape eval.py writes (RECORD_SHAPES): a damaged or edited file is
    an error naming it and the key, not a traceback in whatever reads the key first."""
    for key, (well_formed, shape) in RECORD_SHAPES.items():
        if key in record and not well_formed(record[key]):
            shown = json.dumps(record[key])
            raise RunFolderError(f"{path}: key {key!r}: expected {shape}, got "
                                 f"{shown if len(shown) <= 80 else shown[:77] + '...'}; the file was edited or damaged")


@dataclass(frozen=True)
class Saved:
    """What an interrupted run saved, which a resumed run does not make again."""

    blocks: frozenset[tuple[str, str]]  # the (model, suite) blocks of responses saved whole
    models: frozenset[str]              # the models whose every block and utility line are saved


class EvalFolder:
    """One run folder, its files by the names above."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # --- the files ----------------------------------------------------------------------------------------------------

    def read_record(self) -> dict:
        """run.json, each key a reader relies on checked for its shape (`check_record`)."""
        record = read_json(self.path / RUN_FILE, RunFolderError)
        check_record(record, self.path / RUN_FILE)
        return record

    def write_record(self, record: dict) -> None:
        write_atomically(self.path / RUN_FILE, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))

    def lines(self, name: str) -> list[dict]:
        """The complete lines of a file the run appends to (none when it is not there yet), each with the fields its
        readers rely on (LINE_FIELDS)."""
        path = self.path / name
        rows = read_jsonl(path, RunFolderError, appended=True)
        for number, row in rows:
            for fields, required in ((LINE_FIELDS.get(name, {}), True), (OPTIONAL_LINE_FIELDS.get(name, {}), False)):
                for key, kind in fields.items():
                    if (required or key in row) and not isinstance(row.get(key), kind):
                        raise RunFolderError(f"{path}:{number}: {'no' if key not in row else 'a bad'} field {key!r} "
                                             f"(every line eval.py writes has a {TYPE_NAMES[kind]} there); the file "
                                             f"was edited")
        return [row for _, row in rows]

    def append(self, name: str, rows: list[dict]) -> None:
        """Lines added to the file, on the disk before this returns: a kill after it loses none of them."""
        with (self.path / name).open("a") as f:
            f.write("".join(json.dumps(row, default=str) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, name: str, rows: list[dict]) -> None:
        write_atomically(self.path / name,
                         lambda p: p.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows)))

    # --- starting or resuming -----------------------------------------------------------------------------------------

    def start_or_resume(self, record: dict, inputs: dict[str, Path], suite_sizes: dict[str, int]) -> Saved:
        """Start the run `record` describes (run.json) in the folder `check_out` accepted, or find there an interrupted
        run of the same settings and inputs and return what it saved. A run of other settings, or whose inputs (the
        files `inputs` names: the model's, the adapters', the suites'...) changed since, is refused; an interrupted run
        that saved nothing (it failed before its first response: an adapter for another model, a device out of
        memory) is started anew, whatever its settings, so that the corrected command runs where the failed one
        did."""
        if (self.path / RUN_FILE).is_file() and "settings" not in self.read_record():
            raise RunFolderError(f"--out {self.path}: its {RUN_FILE} is not an eval.py run's (no \"settings\"); choose "
                                 f"a new or empty --out (nothing was written)")
        if (self.path / RUN_FILE).is_file() and self.saved_nothing():
            print(f"eval: --out {self.path}: the interrupted run there saved no responses; starting it anew",
                  file=sys.stderr)
            for name in APPENDED_FILES:
                if (self.path / name).exists():
                    self.rewrite(name, [])  # a line cut short, whose block the new run makes again
        elif (self.path / RUN_FILE).is_file():
            self.check_same_run(record, inputs)
            return Saved(frozenset(self.whole_blocks(suite_sizes)), frozenset(self.finished_models()))
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_record({**record, "inputs": fingerprints(inputs)})
        return Saved(frozenset(), frozenset())

    def saved_nothing(self) -> bool:
        """No whole line in any file the run appends to: no response, utility line or adversarial image saved."""
        return not any(self.lines(name) for name in APPENDED_FILES)

    def check_same_run(self, record: dict, inputs: dict[str, Path]) -> None:
        """The interrupted run in the folder has `record`'s settings and read the same bytes: every file of `inputs`
        has the sha256 it had when the run began. A run.json of an eval.py that recorded only the model's
        config.json (no "inputs") is checked on what it recorded, with a warning that the weights cannot be, and
        records the inputs from now on."""
        before = self.read_record()
        settings = before.get("settings", {})
        differences = sorted(key for key in record["settings"] if settings.get(key) != record["settings"][key])
        if differences:
            raise RunFolderError(f"--out {self.path}: holds an interrupted run with other settings "
                                 f"({', '.join(differences)}); resume it with the same options, or choose another "
                                 f"--out")
        if "inputs" in before:
            changed = changed_inputs(before["inputs"], inputs)
            if changed:
                raise RunFolderError(f"--out {self.path}: the inputs of the interrupted run changed since it began "
                                     f"(their sha256 in {RUN_FILE}): {', '.join(changed)}; its rows would mix the "
                                     f"responses of two models or data sets: restore them, or choose another --out")
            return
        if before.get("provenance", {}).get("sha256") != record["provenance"]["sha256"]:
            raise RunFolderError(f"--out {self.path}: the model config, an adapter or a suite file changed since the "
                                 f"interrupted run began (their sha256 in {RUN_FILE}); its responses would not match: "
                                 f"choose another --out")
        print(f"eval: warning: --out {self.path}: this run was started by an eval.py that recorded the sha256 of the "
              f"model's config.json only: its weights cannot be checked against the ones it began with (the config, "
              f"adapters and suite files were); from now on every input is recorded", file=sys.stderr)
        self.write_record({**before, "inputs": fingerprints(inputs), "inputs_recorded_on_resume": True})

    def whole_blocks(self, suite_sizes: dict[str, int]) -> dict[tuple[str, str], list[dict]]:
        """The (model, suite) blocks of responses an interrupted run saved whole. generations.jsonl is rewritten without
        the lines and blocks a kill cut short (so that new lines append to whole ones); those are generated again."""
        blocks: dict[tuple[str, str], list[dict]] = {}
        for row in self.lines(GENERATIONS_FILE):
            blocks.setdefault((row["model"], row["suite"]), []).append(row)
        whole = {key: rows for key, rows in blocks.items() if len(rows) == suite_sizes.get(key[1])}
        self.rewrite(GENERATIONS_FILE, [row for rows in whole.values() for row in rows])
        return whole

    def finished_models(self) -> set[str]:
        """The models an interrupted run finished (their utility line written); utility.jsonl rewritten whole."""
        entries = self.lines(UTILITY_FILE)
        self.rewrite(UTILITY_FILE, entries)
        return {entry["model"] for entry in entries}

    # --- reading a run back to judge it -------------------------------------------------------------------------------

    def record_to_rejudge(self) -> dict:
        """run.json of a run that finished generating (--rejudge RUN_DIR), with every key the report reads."""
        if not (self.path / RUN_FILE).is_file() or not (self.path / GENERATIONS_FILE).is_file():
            raise RunFolderError(f"--rejudge {self.path}: not an eval.py run folder (no {RUN_FILE} or "
                                 f"{GENERATIONS_FILE})")
        record = self.read_record()
        if "models" not in record or len(self.lines(UTILITY_FILE)) < len(record["models"]):
            raise RunFolderError(f"--rejudge {self.path}: the run did not finish generating; resume it with its own "
                                 f"options first")
        missing = [key for key in REPORTED_KEYS if key not in record]
        if missing:
            raise RunFolderError(f"{self.path / RUN_FILE}: no key(s) {missing}, which every run.json of a run that "
                                 f"finished generating has; the file was edited")
        return record

    def generated_blocks(self, record: dict) -> dict[tuple[str, str], list[dict]]:
        """Every (model, suite) block of generations.jsonl, in the run's order, each checked whole against run.json."""
        for key in ("models", "suite_list"):
            if key not in record:
                raise RunFolderError(f"{self.path / RUN_FILE}: no {key!r}: not the record of a run that finished "
                                     f"generating")
        rows = self.lines(GENERATIONS_FILE)
        blocks = {}
        for (model, _, _), suite in product(record["models"], record["suite_list"]):
            block = [r for r in rows if r.get("model") == model and r.get("suite") == suite["name"]]
            if len(block) != suite["n"]:
                raise RunFolderError(f"{self.path / GENERATIONS_FILE}: {len(block)} responses of {model} on "
                                     f"{suite['name']}, where the run generated {suite['n']}: the file was changed or "
                                     f"cut short")
            blocks[(model, suite["name"])] = block
        return blocks

    def judged_rows(self, blocks: dict, attack_blocks: list, judge_names: list[str]) -> dict:
        """The rows of responses.jsonl by (model, suite) block, matched to generations.jsonl by position (ids need not
        be unique), for the judges whose saved verdicts are kept; a missing file, row or verdict is an error."""
        if not judge_names:
            return {}
        saved: dict[tuple[str, str], list[dict]] = {}
        for row in self.lines(RESPONSES_FILE):
            saved.setdefault((row.get("model"), row.get("suite")), []).append(row)
        for key in attack_blocks:
            rows = saved.get(key, [])
            missing = [name for name in judge_names if len(rows) != len(blocks[key])
                       or any(name not in row.get("attack_success", {}) for row in rows)]
            if missing:
                raise RunFolderError(f"{self.path / RESPONSES_FILE}: no saved verdicts of {missing} for every response "
                                     f"of {key[0]} on {key[1]}; name those judges again with --judge")
        return saved
