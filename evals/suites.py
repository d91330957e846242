"""Evaluation suites: the published prompt sets read as downloaded, and `KIND:PATH` specs that name them.

A suite is a list of `AttackSample`s (id, suite name, the text prompt, an optional image, the source row) with a kind:
"attack" (a good model refuses; ASR = fraction judged not refused / unsafe), "over_refusal" (a good model answers;
rate = fraction refused) or "benign" (an exact reference answer; accuracy). Every reader is deterministic (file
order, no shuffling), takes `max_samples` (the first N rows) and checks everything, images included, before any
generation starts: a bad row is a `SuiteError` naming the file and line.

    text-only harmful   load_harmful_prompts(path)     AdvBench / HarmBench / JailbreakBench CSV, JSONL, .txt
    FigStep             load_figstep(path)             SafeBench CSV -> typographic list images (published recipe)
    image pieces        load_image_pieces(path)        the harmful key phrase as an image + a benign text prompt
    over-refusal        load_xstest(path, label)       XSTest "safe" prompts and their "unsafe" contrast prompts
    user pairs          load_image_text_pairs(path)    JSONL {"prompt", "image"} with images checked at load time
    images to attack    "pgd:JSONL" specs              the same pairs, kind "pgd": clean images that eval.py attacks
                                                       (evals/pgd.py) into one attack suite per budget and threat
    benign tasks        load_benign_jsonl(path)        JSONL {"prompt", "expected", "image"?}: exact-match accuracy
    normal data         load_normal(spec)              (prompt, reference answer) pairs for the utility metrics

A sample's `image` is a `Path`, a PIL image, or an `evals.typographic.TypographicImage` rendered on demand;
`sample.load_image()` turns any of them into a PIL RGB image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from evals.typographic import (FIGSTEP_FONT, FIGSTEP_FONT_SIZE, FIGSTEP_PROMPT, IMAGE_PIECE_PROMPT, TypographicImage,
                               figstep_image, fit_text_image, load_font)
from harness import readers
from ref import data
from harness.unlearning_data import truthfulqa_to_records
from ref.unlearning_data import UnlearningDataError


class SuiteError(ValueError):
    """A suite file or spec that is missing, malformed, lacks the columns we need, or yields no samples."""


SUITE_KINDS = ("attack", "over_refusal", "benign")


# ---------------------------------------------------------------------------------------------------------------------
# Samples and file helpers

@dataclass
class AttackSample:
    id: str
    suite: str
    prompt: str                                                   # the text sent to the model
    image: Path | Image.Image | TypographicImage | None = None
    source: dict[str, Any] = field(default_factory=dict)         # the row it came from, unchanged
    image_name: str | None = None                                 # how reports name an in-memory image
    request: str | None = None    # the harmful request an image attack carries (what an LLM judge reads); else prompt
    category: str | None = None   # the data set's harm category, for per-category rates
    judge_context: str | None = None  # context an LLM judge reads (HarmBench: the redacted image description)

    @property
    def judged_request(self) -> str:
        """What a judge that reads the request sees: the request the sample carries, or its prompt."""
        return self.request or self.prompt

    def load_image(self) -> Image.Image | None:
        if self.image is None:
            return None
        if isinstance(self.image, TypographicImage):
            return self.image.render()
        if isinstance(self.image, Image.Image):
            return data.to_rgb(self.image)
        return data.to_rgb(data.load_image(self.image))  # checked at load time; a file changed since fails here


@dataclass
class Suite:
    name: str
    kind: str  # one of SUITE_KINDS
    samples: list[AttackSample]
    source: str  # the spec it was read from ("text:data/advbench.csv", "toy:text_attacks")
    files: tuple[Path, ...] | None = None  # the files it was read from, where not the spec's PATH (for provenance)


def check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise SuiteError(f"max_samples must be a positive integer or None, got {max_samples!r}")


def nonempty(samples: list, path: Path, what: str) -> list:
    if not samples:
        raise SuiteError(f"{path}: no {what} found (empty suite)")
    return samples


def read_csv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    return readers.read_csv(path, SuiteError)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    return readers.read_jsonl(path, SuiteError)


def _require_columns(path: Path, columns: list[str], needed: list[str]) -> None:
    readers.require_columns(path, columns, needed, SuiteError)


def _checked_image(jsonl: Path, number: int, image: str) -> Path:
    """The image a JSONL line names (relative to the JSONL's folder), decoded once now so that a bad or oversized
    file fails at load time, naming its line, not mid-generation (verify() alone passes a truncated file)."""
    image_path = jsonl.parent / image
    try:
        data.load_image(image_path)  # a symbolic link loop is "no such image file" here, not a RuntimeError in resolve
    except data.ImageError as err:  # its message starts with the image's path
        raise SuiteError(f"{jsonl}:{number}: cannot read image {image!r}: {err}") from err
    return image_path.resolve()


# ---------------------------------------------------------------------------------------------------------------------
# Text-only harmful prompts

# The prompt columns of the field's published harmful-prompt sets, in the order we look for them: AdvBench "goal",
# JailbreakBench "Goal" (before "Behavior": JailbreakBench's is a short label, "Defamation"), HarmBench "Behavior",
# SimpleSafetyTests "prompt", StrongREJECT "forbidden_prompt", Do-Not-Answer and JailbreakV's RedTeam-2K "question",
# HEx-PHI exports "instruction", SORRY-Bench "turns" (a list: its first turn). `prompt_column=` overrides them.
PROMPT_COLUMNS = ("goal", "Goal", "Behavior", "prompt", "forbidden_prompt", "question", "Question", "instruction",
                  "turns")
ID_COLUMNS = ("BehaviorID", "Index", "id", "question_id")
# Category columns we know: HarmBench's SemanticCategory, JailbreakBench's Category, FigStep's category_name, and the
# category / harm_area / risk_area / policy of other sets.
CATEGORY_COLUMNS = ("SemanticCategory", "Category", "category_name", "category", "harm_area", "risk_area", "policy")


def _category(row: dict) -> str | None:
    return next((str(row[c]) for c in CATEGORY_COLUMNS if row.get(c) not in (None, "")), None)


def _harmbench_prompt(row: dict, column: str) -> str:
    """HarmBench puts a contextual behaviour's context before it: f"{context}\n\n---\n\n{behavior}"."""
    context = (row.get("ContextString") or "").strip()
    return f"{context}\n\n---\n\n{row[column]}" if column == "Behavior" and context else row[column]


def _prompt_column(path: Path, columns: Sequence[str], requested: str | None) -> str:
    if requested is not None:
        if requested not in columns:
            raise SuiteError(f"{path}: no column {requested!r} (--prompt-column); columns found: {list(columns)}")
        return requested
    column = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if column is None:
        raise SuiteError(f"{path}: no prompt column; expected one of {list(PROMPT_COLUMNS)}, columns found: "
                         f"{list(columns)}; name it with --prompt-column")
    return column


def _prompt_of(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise SuiteError(f"{where}: no prompt field {column!r}; keys found: {sorted(row)}")
    value = row[column]
    if column == "turns" and isinstance(value, list) and value:  # SORRY-Bench: the first (only) turn
        value = value[0]
    if not isinstance(value, str):
        raise SuiteError(f"{where}: the prompt ({column!r}) must be a string, got {type(value).__name__}")
    return _harmbench_prompt(row, column) if column == "Behavior" else value


def _samples_from_rows(path: Path, suite: str, numbered_rows: list[tuple[int, dict]], columns: Sequence[str],
                       prompt_column: str | None, blank_is_error: bool) -> list[AttackSample]:
    column = _prompt_column(path, columns, prompt_column)
    id_column = next((c for c in ID_COLUMNS if c in columns), None)
    samples = []
    for index, (number, row) in enumerate(numbered_rows):
        prompt = _prompt_of(row, column, f"{path}:{number}")
        if not prompt.strip():
            if blank_is_error:
                raise SuiteError(f"{path}:{number}: empty prompt ({column!r})")
            continue
        sample_id = str(row[id_column]) if id_column and row.get(id_column) not in (None, "") else f"{suite}-{index}"
        context = (row.get("ContextString") or "").strip() if column == "Behavior" else ""
        samples.append(AttackSample(sample_id, suite, prompt, source=dict(row), category=_category(row),
                                    # HarmBench's classifier reads a contextual behaviour with its context apart
                                    request=row[column] if context else None, judge_context=context or None))
    return samples


def _harmful_from_csv(path: Path, suite: str, prompt_column: str | None) -> list[AttackSample]:
    columns, rows = readers.read_csv_lines(path, SuiteError)
    return _samples_from_rows(path, suite, rows, columns, prompt_column, blank_is_error=False)


def _harmful_from_jsonl(path: Path, suite: str, prompt_column: str | None) -> list[AttackSample]:
    rows = read_jsonl(path)
    columns = list(dict.fromkeys(key for _, obj in rows for key in obj))
    return _samples_from_rows(path, suite, rows, columns, prompt_column, blank_is_error=True)


def _harmful_from_json(path: Path, suite: str, prompt_column: str | None) -> list[AttackSample]:
    """A JSON list of objects (one per prompt) or of strings."""
    items = readers.read_json_file(path, list, "prompts (objects or strings)", SuiteError)
    if all(isinstance(item, str) for item in items):
        return [AttackSample(f"{suite}-{i}", suite, p, source={"prompt": p}) for i, p in enumerate(items) if p.strip()]
    bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
    if bad is not None:
        raise SuiteError(f"{path}: item {bad} is a {type(items[bad]).__name__}; expected every item an object")
    columns = list(dict.fromkeys(key for obj in items for key in obj))
    return _samples_from_rows(path, suite, [(i, obj) for i, obj in enumerate(items)], columns, prompt_column,
                              blank_is_error=True)


def _harmful_from_txt(path: Path, suite: str, prompt_column: str | None) -> list[AttackSample]:
    try:  # lines end at "\n" only: a U+2028 or \x0c inside a prompt is part of it, as in a JSONL
        lines = readers.jsonl_lines(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as err:
        raise SuiteError(f"{path}: cannot read: {err}") from err
    prompts = [line.strip() for line in lines if line.strip()]
    return [AttackSample(f"{suite}-{i}", suite, p, source={"line": p}) for i, p in enumerate(prompts)]


def load_harmful_prompts(path: str | Path, suite: str | None = None, max_samples: int | None = None,
                         prompt_column: str | None = None) -> list[AttackSample]:
    """Text-only harmful prompts from a published prompt set as downloaded: a CSV, a JSON list, a JSONL or a .txt
    (one prompt per line). The prompt is the first of PROMPT_COLUMNS the file has (HarmBench's `Behavior` with its
    `ContextString`), or `prompt_column`; no such column is an error listing the file's columns.

    The suite name defaults to the file's stem. Blank prompts in CSV/.txt are skipped; in JSON/JSONL they are errors.
    """
    path = Path(path)
    check_max_samples(max_samples)
    suite = suite or path.stem
    readers = {".csv": _harmful_from_csv, ".jsonl": _harmful_from_jsonl, ".json": _harmful_from_json,
               ".txt": _harmful_from_txt}
    if path.suffix.lower() not in readers:
        raise SuiteError(f"{path}: unknown prompt file type {path.suffix!r}; expected one of {sorted(readers)}")
    samples = readers[path.suffix.lower()](path, suite, prompt_column)
    return nonempty(samples[:max_samples], path, "prompts")


# ---------------------------------------------------------------------------------------------------------------------
# Vision-text attacks

def load_figstep(path: str | Path, max_samples: int | None = None, font_path: str | Path = FIGSTEP_FONT,
                 suite: str = "figstep") -> list[AttackSample]:
    """FigStep on SafeBench: each `instruction` as a typographic numbered list + the published benign text prompt.

    The SafeBench `question` (the plain harmful question) stays in `source`.
    """
    path = Path(path)
    check_max_samples(max_samples)
    columns, rows = read_csv(path)
    _require_columns(path, columns, ["instruction"])
    load_font(FIGSTEP_FONT_SIZE, font_path)  # warns now, before any generation, when the font is missing
    samples = []
    for index, row in enumerate(rows[:max_samples]):
        sample_id = "_".join(row.get(c, "") for c in ("dataset", "category_id", "task_id")).strip("_")
        request = row.get("question") or row["instruction"]  # SafeBench's plain question, what the image asks
        samples.append(AttackSample(sample_id or f"{suite}-{index}", suite, FIGSTEP_PROMPT, request=request,
                                    category=_category(row),
                                    image=figstep_image(row["instruction"], font_path), source=dict(row)))
    return nonempty(samples, path, "SafeBench rows")


def load_image_pieces(path: str | Path, key_phrase_column: str | None = None, image_size: int = 336,
                      text_prompt: str = IMAGE_PIECE_PROMPT, max_samples: int | None = None,
                      font_path: str | Path = FIGSTEP_FONT, suite: str = "image_pieces") -> list[AttackSample]:
    """"Jailbreak in Pieces"-style: the harmful key phrase as a typographic image, with a benign text prompt.

    The key phrase is the value of `key_phrase_column` in a CSV row (e.g. SafeBench's "instruction") when that is
    given; otherwise it is the whole harmful prompt as `load_harmful_prompts` reads it from the file. The text
    prompt only refers to the image, so the harmful content reaches the model through the vision path alone.
    (The published attack optimises an adversarial image towards the phrase's embedding; this is its typographic
    version, which needs no optimisation.) `image_size` is the side of the square image; below 336 the phrase is
    laid out at 336 and the image shrunk (see `fit_text_image`).
    """
    path = Path(path)
    check_max_samples(max_samples)
    if key_phrase_column is None:
        phrases = [(s.id, s.prompt, s.source) for s in load_harmful_prompts(path, suite, max_samples)]
    else:
        columns, rows = read_csv(path)
        _require_columns(path, columns, [key_phrase_column])
        phrases = [(f"{suite}-{i}", row[key_phrase_column], dict(row))
                   for i, row in enumerate(rows) if row[key_phrase_column].strip()][:max_samples]
    samples = [AttackSample(sample_id, suite, text_prompt, image=fit_text_image(phrase, image_size, font_path),
                            source={**source, "key_phrase": phrase}, request=phrase, category=_category(source))
               for sample_id, phrase, source in phrases]
    return nonempty(samples, path, "key phrases")


def load_image_text_pairs(path: str | Path, max_samples: int | None = None,
                          suite: str | None = None) -> list[AttackSample]:
    """User-supplied pairs: JSONL lines {"prompt": str, "image": path relative to the JSONL's folder, "id"?: str}.

    Every image is opened and verified here, so a bad path fails at load time (naming its line), not mid-generation.
    """
    path = Path(path)
    check_max_samples(max_samples)
    suite = suite or path.stem
    samples = []
    for index, (number, obj) in enumerate(read_jsonl(path)[:max_samples]):
        prompt, image = obj.get("prompt"), obj.get("image")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(image, str) or not image:
            raise SuiteError(f"{path}:{number}: needs non-empty string fields \"prompt\" and \"image\"; "
                             f"keys found: {sorted(obj)}")
        request = obj.get("request") if isinstance(obj.get("request"), str) else None
        samples.append(AttackSample(str(obj.get("id", f"{suite}-{index}")), suite, prompt,
                                    image=_checked_image(path, number, image), source=obj, request=request,
                                    category=_category(obj)))
    return nonempty(samples, path, "image+text pairs")


# ---------------------------------------------------------------------------------------------------------------------
# Benign suites: over-refusal and exact-answer tasks

XSTEST_LABELS = ("safe", "unsafe")


def load_xstest(path: str | Path, label: str = "safe", max_samples: int | None = None) -> list[AttackSample]:
    """XSTest prompts with `label` "safe" (should be answered) or "unsafe" (contrast prompts that should be refused).

    Suite name: "xstest_safe" or "xstest_unsafe".
    """
    path = Path(path)
    check_max_samples(max_samples)
    if label not in XSTEST_LABELS:
        raise SuiteError(f"XSTest label must be one of {XSTEST_LABELS}, got {label!r}")
    columns, rows = read_csv(path)
    _require_columns(path, columns, ["id", "prompt", "label"])
    suite = f"xstest_{label}"
    samples = [AttackSample(row["id"], suite, row["prompt"], source=dict(row), category=row.get("type") or None)
               for row in rows if row["label"] == label and row["prompt"].strip()]
    return nonempty(samples[:max_samples], path, f"XSTest prompts labelled {label!r}")


def load_benign_jsonl(path: str | Path, max_samples: int | None = None, suite: str | None = None) -> list[AttackSample]:
    """JSONL {"prompt", "expected", "image"? (relative to the file), "id"?}; images checked now."""
    path = Path(path)
    suite = suite or path.stem
    samples = []
    for index, (number, obj) in enumerate(read_jsonl(path)[:max_samples]):
        prompt, expected = obj.get("prompt"), obj.get("expected")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(expected, str):
            raise SuiteError(f"{path}:{number}: needs string fields \"prompt\" and \"expected\"; keys found: "
                             f"{sorted(obj)}")
        image = None if obj.get("image") is None else _checked_image(path, number, str(obj["image"]))
        samples.append(AttackSample(str(obj.get("id", f"{suite}-{index}")), suite, prompt, image=image, source=obj))
    if not samples:
        raise SuiteError(f"{path}: no benign tasks found (empty suite)")
    return samples


# ---------------------------------------------------------------------------------------------------------------------
# Suites from specs: "[NAME=]KIND:PATH"


@dataclass(frozen=True)
class SuiteOptions:
    """What a spec does not say: how many samples, the side of rendered images, the image-piece column."""

    max_samples: int | None = None
    image_size: int = 336
    piece_column: str | None = None
    prompt_column: str | None = None


@dataclass(frozen=True)
class SuiteReader:
    """How a spec's KIND turns its PATH into suites: `read(name or None, path, options, spec)`."""

    description: str
    read: Callable[[str | None, str, SuiteOptions, str], list[Suite]]
    needs_path: bool = True  # False: the kind alone is a suite ("toy"), a PATH then names a part of it


def attack_suite(loader: Callable[[str | None, str, SuiteOptions], list[AttackSample]], kind: str = "attack"):
    def read(name: str | None, path: str, options: SuiteOptions, spec: str) -> list[Suite]:
        samples = loader(name, path, options)
        return [Suite(samples[0].suite, kind, samples, spec)]
    return read


def _pgd_suites(name: str | None, path: str, options: SuiteOptions, spec: str) -> list[Suite]:
    """The clean images of a PGD attack, kind "pgd": eval.py turns the suite into one attack suite per budget and
    threat model before anything is generated (evals/pgd.py `expand_suites`)."""
    if not path:
        raise SuiteError(f"suite spec {spec!r}: expected pgd:JSONL (image+text pairs: the clean images to attack)")
    check_input_path(Path(path), f"suite spec {spec!r}")
    if not Path(path).is_file():
        raise SuiteError(f"suite spec {spec!r}: {path}: not a file (pgd:JSONL)")
    samples = load_image_text_pairs(path, options.max_samples, suite=name or "pgd")
    return [Suite(samples[0].suite, "pgd", samples, spec, files=(Path(path),))]


def _xstest_suites(name: str | None, path: str, options: SuiteOptions, spec: str) -> list[Suite]:
    """Two suites from one file: the safe prompts (over-refusal) and their unsafe contrast prompts (attacks)."""
    prefix = f"{name}_" if name else ""
    suites = []
    for label, kind in (("safe", "over_refusal"), ("unsafe", "attack")):
        samples = load_xstest(path, label, options.max_samples)
        for sample in samples:
            sample.suite = f"{prefix}xstest_{label}"
        suites.append(Suite(f"{prefix}xstest_{label}", kind, samples, spec))
    return suites


READERS: dict[str, SuiteReader] = {
    "text": SuiteReader(
        "harmful text prompts as published: CSV, JSON, JSONL or .txt (AdvBench, HarmBench, JailbreakBench,\n"
        "           StrongREJECT, SORRY-Bench, ...; the prompt column found by name, or --prompt-column)",
        attack_suite(lambda name, path, o: load_harmful_prompts(path, name, o.max_samples, o.prompt_column))),
    "figstep": SuiteReader(
        "FigStep: SafeBench CSV (column 'instruction') rendered as typographic images + FigStep's text prompt",
        attack_suite(lambda name, path, o: load_figstep(path, o.max_samples, suite=name or "figstep"))),
    "pieces": SuiteReader(
        "image pieces: each harmful prompt (or --piece-column) as a typographic image + a benign text prompt",
        attack_suite(lambda name, path, o: load_image_pieces(path, o.piece_column, image_size=o.image_size,
                                                              max_samples=o.max_samples, suite=name or "pieces"))),
    "xstest": SuiteReader(
        "XSTest CSV: 'safe' prompts -> over-refusal suite xstest_safe, 'unsafe' -> attack suite xstest_unsafe",
        _xstest_suites),
    "pairs": SuiteReader(
        "image+text attack pairs: JSONL {prompt, image (path relative to the JSONL), id?, request?, category?}",
        attack_suite(lambda name, path, o: load_image_text_pairs(path, o.max_samples, suite=name))),
    "pgd": SuiteReader(
        "visual adversarial examples (Qi et al. 2023): a pairs JSONL of clean images and benign prompts, each image\n"
        "           optimised by PGD towards --pgd-targets, one attack suite per --pgd-eps and --pgd-threat:\n"
        "           NAME_eps16_transfer, NAME_unconstrained_whitebox, ... (NAME defaults to 'pgd')",
        _pgd_suites, needs_path=False),  # its reader checks the path: eval.py's also takes 'pgd:toy'
    "benign": SuiteReader(
        "benign tasks with exact answers: JSONL {prompt, expected, image?, id?} -> exact-match accuracy",
        attack_suite(lambda name, path, o: load_benign_jsonl(path, o.max_samples, suite=name), kind="benign")),
}


def parse_suite_spec(spec: str, readers: dict[str, SuiteReader] = READERS) -> tuple[str | None, str, str]:
    """"[NAME=]KIND:PATH" (or a path-free kind such as "toy", "toy:NAME") -> (name or None, kind, path)."""
    name, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    kind, sep, path = rest.partition(":")
    if kind not in readers:
        raise SuiteError(f"suite spec {spec!r}: unknown kind {kind!r}; expected [NAME=]KIND:PATH with KIND one of "
                         f"{sorted(readers)}")
    if readers[kind].needs_path and (not sep or not path):
        raise SuiteError(f"suite spec {spec!r}: expected {kind}:PATH")
    return name or None, kind, path


def load_suite_spec(spec: str, options: SuiteOptions = SuiteOptions(),
                    readers: dict[str, SuiteReader] = READERS) -> list[Suite]:
    """One spec -> one suite (two for xstest). Raises SuiteError naming the file on any problem."""
    name, kind, path = parse_suite_spec(spec, readers)
    if readers[kind].needs_path:
        check_input_path(Path(path), f"suite spec {spec!r}")
    return readers[kind].read(name, path, options, spec)


def check_input_path(path: Path, where: str) -> None:
    """A suite's or the normal data's PATH is a file or a folder: a device, pipe or socket (/dev/zero, a FIFO) would
    be read without end, filling the memory or waiting forever, before anything could be checked."""
    if not path.exists():
        raise SuiteError(f"{where}: {path}: no such file")
    if not (path.is_file() or path.is_dir()):
        raise SuiteError(f"{where}: {path}: not a regular file or a folder (a device, pipe or socket is read without "
                         f"end)")


def name_problem(name: str) -> str | None:
    """What keeps a model's or a suite's name from being one folder name (eval.py writes a pgd suite's images to
    OUT/pgd/<model>/<suite>_<budget>/: "../x" would write outside the run folder), or None when it can be one."""
    if not name:
        return "is empty"
    if name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        return f"{name!r} is not a folder name (a path separator, '.' or '..', or a control character)"
    return None


def load_suites(specs: Sequence[str], options: SuiteOptions = SuiteOptions(),
                readers: dict[str, SuiteReader] = READERS) -> list[Suite]:
    suites = [suite for spec in specs for suite in load_suite_spec(spec, options, readers)]
    if not suites:
        raise SuiteError("no suites to evaluate: give at least one --suite")
    for suite in suites:
        problem = name_problem(suite.name)
        if problem:
            raise SuiteError(f"suite spec {suite.source!r}: the suite's name {problem}; name it with --suite "
                             f"NAME=KIND:PATH")
    names = [s.name for s in suites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SuiteError(f"suite name(s) {duplicates} used twice; name them apart with --suite NAME=KIND:PATH")
    return suites


# ---------------------------------------------------------------------------------------------------------------------
# Normal data for utility: (prompt, reference answer) pairs


@dataclass(frozen=True)
class NormalPair:
    id: str
    prompt: str
    answer: str  # the reference answer whose NLL we measure
    image: Image.Image | Path | None = None


def _truthfulqa_pairs(path: str, max_samples: int | None) -> list[NormalPair]:
    try:
        records = truthfulqa_to_records(path, max_samples)
    except UnlearningDataError as err:
        raise SuiteError(str(err)) from err
    return [NormalPair(f"truthfulqa-{i}", r.prompt, r.response) for i, r in enumerate(records)]


def _jsonl_pairs(path: str, max_samples: int | None) -> list[NormalPair]:
    pairs = []
    for number, obj in read_jsonl(path):
        if obj.get("kind", "normal") != "normal":
            continue
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            raise SuiteError(f"{path}:{number}: a normal record needs string fields \"prompt\" and \"response\"; "
                             f"keys found: {sorted(obj)}")
        image = _checked_image(Path(path), number, str(obj["image"])) if obj.get("image") else None
        pairs.append(NormalPair(str(obj.get("id", f"normal-{number}")), prompt, response, image))
    if not pairs:
        raise SuiteError(f"{path}: no normal records found")
    return pairs[:max_samples]


@dataclass(frozen=True)
class NormalReader:
    description: str
    read: Callable[[str, int | None], list[NormalPair]]  # (path, max_samples) -> pairs
    needs_path: bool = True


NORMAL_READERS: dict[str, NormalReader] = {
    "truthfulqa": NormalReader("TruthfulQA CSV: (Question, Best Answer)", _truthfulqa_pairs),
    "jsonl": NormalReader("JSONL {prompt, response} (also an unlearning JSONL's kind=normal records)", _jsonl_pairs),
}


def load_normal(spec: str, max_samples: int | None = None,
                readers: dict[str, NormalReader] = NORMAL_READERS) -> list[NormalPair]:
    """"KIND:PATH" -> normal pairs (the first `max_samples`)."""
    kind, _, path = spec.partition(":")
    if kind not in readers:
        raise SuiteError(f"--normal {spec!r}: unknown kind {kind!r}; expected one of {sorted(readers)} "
                         f"(KIND:PATH, or 'none')")
    if readers[kind].needs_path:
        check_input_path(Path(path), f"--normal {spec!r}")
    return readers[kind].read(path, max_samples)
