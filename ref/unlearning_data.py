"""The unlearning data format: the records the three losses read, their JSONL schema and its strict checks.

Schema: one JSON object per line, with a "kind" and no other keys than those listed (a misspelt key is an error).

    {"kind": "harmful", "prompt": str, "harmful_response": str | null, "helpful_response": str | null,
     "image": str (optional), "categories": [str, ...] (optional)}
    {"kind": "normal", "prompt": str, "response": str, "image": str (optional)}

- harmful: a harmful prompt with the unsafe answer to unlearn (gradient ascent, L_harm) and a safe, helpful answer to
  match (L_helpful_match). Either response may be null when the source has none, but not both: the trainer uses a
  record in the terms whose response it has.
- normal: ordinary data whose output distribution must not move (L_utility, the KL to the original model).
- image: a path relative to the JSONL file's folder, for multimodal baselines; text-only unlearning ignores it. The
  reader checks that the file exists and returns it as an absolute path.
- categories: the harm categories a harmful record belongs to (PKU-SafeRLHF's harm categories of its unsafe
  response; the toy's topic), for train.py's --include-categories / --exclude-categories / --category-fraction: the
  harm-coverage question of the paper.

Reading and writing the files, and the converters from public data sets, are harness/unlearning_data.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


class UnlearningDataError(ValueError):
    """A malformed unlearning data file or source row; the message names the file and line."""


@dataclass(frozen=True)
class HarmfulRecord:
    prompt: str
    harmful_response: str | None       # to unlearn (gradient ascent)
    helpful_response: str | None       # to match (the safe answer to the same prompt)
    image: str | None = None
    kind: str = "harmful"
    categories: tuple[str, ...] = ()  # harm categories, for coverage ablations


@dataclass(frozen=True)
class NormalRecord:
    prompt: str
    response: str
    image: str | None = None
    kind: str = "normal"


Record = HarmfulRecord | NormalRecord

# kind -> (required keys besides "kind", keys whose value may be null)
SCHEMA: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "harmful": (("prompt", "harmful_response", "helpful_response"), ("harmful_response", "helpful_response")),
    "normal": (("prompt", "response"), ()),
}
OPTIONAL_KEYS = ("image", "categories")
# a PKU-SafeRLHF row (the converter below reads these); given as --data unconverted, it gets a hint
PKU_FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "safer_response_id")


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and serialising

def parse_record(obj: object, where: str, folder: Path) -> Record:
    """One JSON object of an unlearning file as a record, every rule of the schema checked; `where` (file:line) names
    it in an error, `folder` is where its image path starts from."""
    if not isinstance(obj, dict):
        raise UnlearningDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind is None and all(key in obj for key in PKU_FIELDS):
        raise UnlearningDataError(f"{where}: a raw PKU-SafeRLHF row, not an unlearning record; convert the file first: "
                                  f"python -m harness.unlearning_data --pku FILE --truthfulqa TRUTHFULQA.csv --out "
                                  f"unlearning.jsonl")
    if kind not in SCHEMA:
        raise UnlearningDataError(f"{where}: unknown kind {kind!r}; expected one of {sorted(SCHEMA)}")
    required, nullable = SCHEMA[kind]
    missing = [key for key in required if key not in obj]
    if missing:
        raise UnlearningDataError(f"{where}: {kind} record missing field(s) {missing}")
    unknown = sorted(set(obj) - set(required) - set(OPTIONAL_KEYS) - {"kind"})
    if unknown:
        raise UnlearningDataError(f"{where}: unknown field(s) {unknown} in a {kind} record; "
                                  f"allowed: {['kind', *required, *OPTIONAL_KEYS]}")
    if kind == "normal" and "categories" in obj:
        raise UnlearningDataError(f"{where}: 'categories' belongs to harmful records only")
    for key in (*required, "image"):
        value = obj.get(key)
        if value is None and (key in nullable or key in OPTIONAL_KEYS):
            continue
        if not isinstance(value, str) or not value.strip():
            raise UnlearningDataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    categories = obj.get("categories", [])
    if not isinstance(categories, list) or not all(isinstance(c, str) and c.strip() for c in categories):
        raise UnlearningDataError(f"{where}: 'categories' must be a list of non-empty strings, got {categories!r}")
    if kind == "harmful" and obj["harmful_response"] is None and obj["helpful_response"] is None:
        raise UnlearningDataError(f"{where}: harmful record has neither a harmful_response nor a helpful_response")
    image = obj.get("image")
    if image is not None:
        image_path = (folder / image).resolve()
        if not image_path.is_file():
            raise UnlearningDataError(f"{where}: image {image!r} not found ({image_path})")
        image = str(image_path)
    fields = {key: obj[key] for key in required}
    if kind == "harmful":
        return HarmfulRecord(**fields, image=image, categories=tuple(categories))
    return NormalRecord(**fields, image=image)


def split_records(records: Iterable[Record]) -> tuple[list[HarmfulRecord], list[NormalRecord]]:
    records = list(records)
    return ([r for r in records if isinstance(r, HarmfulRecord)], [r for r in records if isinstance(r, NormalRecord)])



def record_to_dict(record: Record) -> dict:
    """The record as its JSON object: "kind" first, "image" only when set (paths are written as given)."""
    if isinstance(record, HarmfulRecord):
        obj = {"kind": "harmful", "prompt": record.prompt, "harmful_response": record.harmful_response,
               "helpful_response": record.helpful_response}
    else:
        obj = {"kind": "normal", "prompt": record.prompt, "response": record.response}
    if record.image is not None:
        obj["image"] = record.image
    if getattr(record, "categories", ()):
        obj["categories"] = list(record.categories)
    return obj
