"""The field's multimodal safety benchmarks, read as their publishers distribute them (no conversion step).

    JailbreakV-28K    jailbreakv:JailBreakV_28K.csv        image+text jailbreaks (image_path relative to the CSV);
                      jailbreakv_mini:JailBreakV_28K.csv   the mini subset by its `selected_mini` column (or
                                                           mini_JailBreakV_28K.csv read whole); RedTeam_2K.csv is
                                                           read as its text-only queries
    MM-SafetyBench    mmsafetybench:data/                  processed_questions/<scenario>.json + imgs/<scenario>/
                                                           {SD,TYPO,SD_TYPO}/<id>.jpg: four suites, one per published
                                                           variant (text-only, SD, TYPO, SD+TYPO), per-scenario rates
    HarmBench         harmbench_mm:harmbench_behaviors_multimodal_all.csv
                                                           multimodal behaviours + data/multimodal_behavior_images/
    PKU-SafeRLHF      pku:test.jsonl                       its prompts as a text attack suite (JSONL, as published
                                                           or exported from its parquet files)
    VLGuard           vlguard:test.json                    unsafe images, unsafe instructions on safe images (attacks)
                                                           and safe instructions on safe images (over-refusal)

Each sample carries the data set's harm category (per-category rates in the report) and the harmful request an LLM
judge reads (JailbreakV's redteam_query, MM-SafetyBench's Question, HarmBench's Behavior with its redacted image
description as context). Every reader checks every row and decodes every image before any generation: a bad row is a
SuiteError naming the file and the row.
"""

from __future__ import annotations

from pathlib import Path

from evals.suites import (AttackSample, Suite, SuiteError, SuiteOptions, SuiteReader, attack_suite, check_max_samples,
                          nonempty)
from harness import readers
from ref import data
from harness.unlearning_data import read_vlguard


def checked_image(path: Path, where: str) -> Path:
    """An image file decoded once now, so that a missing, broken or oversized one fails here, naming its row, not
    mid-generation (PIL's verify() alone passes a truncated file)."""
    try:
        data.load_image(path)
    except data.ImageError as err:  # its message starts with the image's path
        raise SuiteError(f"{where}: cannot read image {err}") from err
    return path.resolve()


def _require(path: Path, columns: list[str], needed: list[str]) -> None:
    readers.require_columns(path, columns, needed, SuiteError)


def _flag(value: str, where: str, column: str) -> bool:
    """A boolean cell as pandas writes it ("True" / "False")."""
    if value not in ("True", "False"):
        raise SuiteError(f"{where}: column {column!r} must be True or False, got {value!r}")
    return value == "True"


# ---------------------------------------------------------------------------------------------------------------------
# JailbreakV-28K (Luo et al. 2024)

JAILBREAKV_COLUMNS = ["id", "jailbreak_query", "redteam_query", "format", "policy", "image_path"]


def load_jailbreakv(path: str | Path, max_samples: int | None = None, mini: bool = False,
                    suite: str = "jailbreakv") -> list[AttackSample]:
    """JailbreakV-28K's CSV as published: `jailbreak_query` sent with the image at `image_path` (relative to the
    CSV's folder, as the authors' attack.py joins them), `redteam_query` the request the judges read, `policy` the
    category. mini=True keeps the rows whose `selected_mini` is True (the published mini subset; the separate
    mini_JailBreakV_28K.csv needs no flag). RedTeam_2K.csv (columns question, policy, from) gives its text-only
    queries."""
    path = Path(path)
    check_max_samples(max_samples)
    columns, rows = readers.read_csv_lines(path, SuiteError)
    if "question" in columns and "jailbreak_query" not in columns:  # RedTeam_2K.csv: the text-only harmful queries
        if mini:
            raise SuiteError(f"{path}: RedTeam-2K's text queries have no mini subset; give JailBreakV_28K.csv")
        return nonempty(_redteam_2k(path, rows, suite)[:max_samples], path, "RedTeam-2K queries")
    _require(path, columns, JAILBREAKV_COLUMNS + (["selected_mini"] if mini else []))
    samples = []
    for number, row in rows:
        where = f"{path}:{number} (id {row['id']})"
        if mini and not _flag(row["selected_mini"], where, "selected_mini"):
            continue
        if max_samples is not None and len(samples) == max_samples:
            break
        if not row["jailbreak_query"].strip() or not row["redteam_query"].strip():
            raise SuiteError(f"{where}: empty jailbreak_query or redteam_query")
        image = checked_image(path.parent / row["image_path"], where) if row["image_path"] else None
        samples.append(AttackSample(row["id"], suite, row["jailbreak_query"], image=image, source=dict(row),
                                    request=row["redteam_query"], category=row["policy"] or None))
    return nonempty(samples, path, "mini rows (selected_mini = True)" if mini else "rows")


def _redteam_2k(path: Path, rows: list[tuple[int, dict]], suite: str) -> list[AttackSample]:
    samples = []
    for index, (number, row) in enumerate(rows):
        if not row["question"].strip():
            raise SuiteError(f"{path}:{number}: empty question")
        samples.append(AttackSample(row.get("id") or f"{suite}-{index}", suite, row["question"], source=dict(row),
                                    category=row.get("policy") or None))
    return samples


# ---------------------------------------------------------------------------------------------------------------------
# MM-SafetyBench (Liu et al. 2024)

# variant -> (image folder under imgs/<scenario>/, or None for text only; the question key sent with it), as the
# benchmark's README pairs them. The text-only baseline sends the plain `Question`.
MMSAFETYBENCH_VARIANTS = {
    "text": (None, "Question"),
    "sd": ("SD", "Rephrased Question(SD)"),
    "typo": ("TYPO", "Rephrased Question"),
    "sd_typo": ("SD_TYPO", "Rephrased Question"),
}
MMSAFETYBENCH_KEYS = ("Question", "Rephrased Question", "Rephrased Question(SD)")


def _mmsafetybench_files(path: Path) -> tuple[list[Path], Path]:
    """(the scenario question files, the imgs/ folder) for the data/ folder, its processed_questions/ folder, or one
    scenario's JSON."""
    if path.is_file():
        return [path], path.parent.parent / "imgs"
    questions = path / "processed_questions" if (path / "processed_questions").is_dir() else path
    files = sorted(questions.glob("*.json"))
    if not files:
        raise SuiteError(f"{path}: no MM-SafetyBench question files (processed_questions/<scenario>.json)")
    return files, questions.parent / "imgs"


def load_mmsafetybench(path: str | Path, max_samples: int | None = None,
                       prefix: str = "mmsafetybench") -> dict[str, list[AttackSample]]:
    """MM-SafetyBench as published: {variant suite name: samples} for its four variants. Each scenario file is a JSON
    object keyed by question id (string, with gaps); an image is imgs/<scenario>/<SD|TYPO|SD_TYPO>/<id>.jpg. The
    category of a sample is its scenario ("01-Illegal_Activitiy", spelt as published); the request the judges read is
    the plain `Question`. `max_samples`: the first N of each variant, in scenario and file order."""
    path = Path(path)
    check_max_samples(max_samples)
    files, images = _mmsafetybench_files(path)
    suites: dict[str, list[AttackSample]] = {f"{prefix}_{variant}": [] for variant in MMSAFETYBENCH_VARIANTS}
    for file in files:
        scenario = file.stem
        questions = readers.read_json_file(file, dict, "MM-SafetyBench questions keyed by id", SuiteError)
        for qid, entry in questions.items():
            where = f"{file}: question {qid!r}"
            missing = [k for k in MMSAFETYBENCH_KEYS
                       if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
            if missing:
                raise SuiteError(f"{where}: missing {missing}")
            for variant, (folder, key) in MMSAFETYBENCH_VARIANTS.items():
                samples = suites[f"{prefix}_{variant}"]
                if max_samples is not None and len(samples) == max_samples:
                    continue
                image = None if folder is None else checked_image(images / scenario / folder / f"{qid}.jpg", where)
                samples.append(AttackSample(f"{scenario}/{qid}", f"{prefix}_{variant}", entry[key], image=image,
                                            source={"scenario": scenario, "id": qid, **entry},
                                            request=entry["Question"], category=scenario))
    return suites


def _mmsafetybench_suites(name: str | None, path: str, options: SuiteOptions, spec: str) -> list[Suite]:
    variants = load_mmsafetybench(path, options.max_samples, prefix=name or "mmsafetybench")
    return [Suite(suite, "attack", nonempty(samples, Path(path), "questions"), spec)
            for suite, samples in variants.items()]


# ---------------------------------------------------------------------------------------------------------------------
# HarmBench multimodal behaviours (Mazeika et al. 2024)

HARMBENCH_MM_COLUMNS = ["Behavior", "BehaviorID", "SemanticCategory", "ImageFileName", "RedactedImageDescription"]


def harmbench_image_folder(csv_path: Path) -> Path:
    """data/multimodal_behavior_images/, beside data/behavior_datasets/ where the CSV is published (or beside the
    CSV)."""
    for base in (csv_path.parent.parent, csv_path.parent):
        folder = base / "multimodal_behavior_images"
        if folder.is_dir():
            return folder
    raise SuiteError(f"{csv_path}: no multimodal_behavior_images/ folder beside it or beside its folder")


def _harmbench_image(folder: Path, file_name: str, where: str) -> Path:
    """The image; the repository stores every one as .png, whatever extension ImageFileName gives."""
    path = folder / file_name
    if not path.is_file() and (folder / Path(file_name).with_suffix(".png").name).is_file():
        path = folder / Path(file_name).with_suffix(".png").name
    return checked_image(path, where)


def load_harmbench_multimodal(path: str | Path, max_samples: int | None = None,
                              suite: str = "harmbench_mm") -> list[AttackSample]:
    """HarmBench's harmbench_behaviors_multimodal_all.csv: the `Behavior` (which refers to the image) sent with the
    image; the HarmBench classifier reads the behaviour with the `RedactedImageDescription` as its context, as
    HarmBench's pipeline does; `SemanticCategory` is the category."""
    path = Path(path)
    check_max_samples(max_samples)
    columns, rows = readers.read_csv_lines(path, SuiteError)
    _require(path, columns, HARMBENCH_MM_COLUMNS)
    folder = harmbench_image_folder(path)
    samples = []
    for number, row in rows[:max_samples]:
        where = f"{path}:{number} (BehaviorID {row['BehaviorID']})"
        if not row["Behavior"].strip() or not row["ImageFileName"].strip():
            raise SuiteError(f"{where}: empty Behavior or ImageFileName")
        samples.append(AttackSample(row["BehaviorID"], suite, row["Behavior"],
                                    image=_harmbench_image(folder, row["ImageFileName"], where), source=dict(row),
                                    request=row["Behavior"], category=row["SemanticCategory"] or None,
                                    judge_context=row["RedactedImageDescription"] or None))
    return nonempty(samples, path, "behaviours")


# ---------------------------------------------------------------------------------------------------------------------
# PKU-SafeRLHF prompts (Ji et al. 2024)


def _pku_category(row: dict, where: str) -> str:
    """The first harm category flagged in either response (the data set labels responses, not prompts): each
    `response_{0,1}_harm_category` is an object {category: true/false}, as published."""
    for key in ("response_0_harm_category", "response_1_harm_category"):
        flags = row.get(key) or {}
        if not isinstance(flags, dict) or not all(type(on) in (bool, int) and on in (0, 1) for on in flags.values()):
            raise SuiteError(f"{where}: {key!r} must be an object {{category: true/false}} as PKU-SafeRLHF publishes "
                             f"it, got {type(flags).__name__} {str(flags)[:80]!r}")
        flagged = [name for name, on in flags.items() if on]
        if flagged:
            return flagged[0]
    return "no harm flagged"


def load_pku_prompts(path: str | Path, max_samples: int | None = None, suite: str = "pku") -> list[AttackSample]:
    """PKU-SafeRLHF's prompts (its JSONL, or a JSONL exported from its parquet files) as a text attack suite: every
    distinct `prompt`, in file order (the data set repeats a prompt for each pair of responses). Category: the first
    harm category flagged in either response (`response_{0,1}_harm_category`), where the release has them."""
    path = Path(path)
    check_max_samples(max_samples)
    samples, seen = [], set()
    for number, row in readers.read_jsonl(path, SuiteError):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SuiteError(f"{path}:{number}: needs a non-empty string field \"prompt\"; keys found: {sorted(row)}")
        category = _pku_category(row, f"{path}:{number}")  # every line checked, a repeated prompt's too
        if prompt in seen:
            continue
        seen.add(prompt)
        samples.append(AttackSample(f"{suite}-{len(samples)}", suite, prompt, source={"line": number, "prompt": prompt},
                                    category=category))
    return nonempty(samples[:max_samples], path, "prompts")


# ---------------------------------------------------------------------------------------------------------------------
# VLGuard test split (Zong et al. 2024)

VLGUARD_SUITES = {"unsafes": "attack", "safe_unsafes": "attack", "safe_safes": "over_refusal"}


def _vlguard_suites(name: str | None, path: str, options: SuiteOptions, spec: str) -> list[Suite]:
    """VLGuard's test.json (images in the unzipped test/ beside it): its three evaluation subsets, each a suite."""
    prefix = name or "vlguard"
    items = read_vlguard(path, error=SuiteError)
    suites = []
    for pairing, kind in VLGUARD_SUITES.items():
        suite = f"{prefix}_{pairing}"
        samples = [AttackSample(f"{item.id}", suite, item.instruction, image=item.image,
                                source={"id": item.id, "image": str(item.image), "response": item.response},
                                category=item.category)
                   for item in items if item.pairing == pairing][:options.max_samples]
        for sample in samples:
            checked_image(sample.image, f"{path}: id {sample.id!r}")
        suites.append(Suite(suite, kind, nonempty(samples, Path(path), f"{pairing} items"), spec))
    return suites


# ---------------------------------------------------------------------------------------------------------------------
# Registry (eval.py merges it with evals.suites.READERS)

BENCHMARK_READERS: dict[str, SuiteReader] = {
    "jailbreakv": SuiteReader(
        "JailbreakV-28K CSV (image_path relative to it); RedTeam_2K.csv -> its text-only queries",
        attack_suite(lambda name, path, o: load_jailbreakv(path, o.max_samples, suite=name or "jailbreakv"))),
    "jailbreakv_mini": SuiteReader(
        "mini-JailbreakV: the rows of JailBreakV_28K.csv whose selected_mini is True",
        attack_suite(lambda name, path, o: load_jailbreakv(path, o.max_samples, mini=True,
                                                            suite=name or "jailbreakv_mini"))),
    "mmsafetybench": SuiteReader(
        "MM-SafetyBench data/ folder (or one processed_questions/<scenario>.json): suites _text, _sd, _typo, _sd_typo",
        _mmsafetybench_suites),
    "harmbench_mm": SuiteReader(
        "HarmBench multimodal behaviours CSV + multimodal_behavior_images/ (context: RedactedImageDescription)",
        attack_suite(lambda name, path, o: load_harmbench_multimodal(path, o.max_samples,
                                                                      suite=name or "harmbench_mm"))),
    "pku": SuiteReader(
        "PKU-SafeRLHF JSONL: its distinct prompts as a text attack suite (category: flagged harm)",
        attack_suite(lambda name, path, o: load_pku_prompts(path, o.max_samples, suite=name or "pku"))),
    "vlguard": SuiteReader(
        "VLGuard test.json + test/ images: suites _unsafes, _safe_unsafes (attacks), _safe_safes (over-refusal)",
        _vlguard_suites),
}
