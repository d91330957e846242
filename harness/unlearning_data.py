"""Unlearning data files: the strict reader and the writer of the JSONL format (ref/unlearning_data.py holds the
schema), and converters from PKU-SafeRLHF, VLGuard and TruthfulQA.

Converters:

- PKU-SafeRLHF rows carry two responses, each labelled safe or unsafe (`is_response_{0,1}_safe`). A row gives one
  harmful record, "as far as it goes":
    one unsafe + one safe  -> harmful_response = the unsafe one, helpful_response = the safe one
    both unsafe            -> harmful_response = the less safe one (the one that is not `safer_response_id`),
                              helpful_response = null (no safe answer to match)
    both safe              -> harmful_response = null (nothing to unlearn), helpful_response = the safer one
                              (`safer_response_id`)
  `pairs_only=True` (CLI: --pairs-only) keeps only the first case.
- VLGuard's train.json (image+text): a harmful instruction on an unsafe image, or an unsafe instruction on a safe
  image -> a harmful record with VLGuard's refusal as helpful_response (no harmful answer is published); a safe
  instruction on a safe image -> a normal record. Records keep their image (absolute path): the multimodal
  unlearning and SFT baselines' data.
- TruthfulQA rows: (Question, Best Answer) -> a normal record.

Command line (writes harmful records first, then normal ones, and prints the counts):

    python -m harness.unlearning_data --pku pku.jsonl --truthfulqa truthfulqa.csv --out unlearning.jsonl
    python -m harness.unlearning_data --vlguard VLGuard/train.json --truthfulqa truthfulqa.csv --out multimodal.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from harness.console import add_debug_option, exit_on_user_error, positive_int
from harness.files import check_output_file, write_atomically
from harness.readers import read_csv, read_json_file, read_jsonl, require_columns
from ref.unlearning_data import (PKU_FIELDS, HarmfulRecord, NormalRecord, Record, UnlearningDataError, parse_record,
                                 record_to_dict)


# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing

def read_unlearning_jsonl(path: str | Path) -> list[Record]:
    """All records of an unlearning JSONL file, in file order; blank lines are skipped, anything else malformed is an
    error naming the file and line."""
    path = Path(path)
    records = [parse_record(obj, f"{path}:{number}", path.parent)
               for number, obj in read_jsonl(path, UnlearningDataError)]
    if not records:
        raise UnlearningDataError(f"{path}: no records")
    return records


def write_unlearning_jsonl(records: Iterable[Record], path: str | Path) -> int:
    """Write records one per line (UTF-8, non-ASCII kept), under a temporary name renamed into place (a crash leaves
    the old file or the new one, never half of it); returns how many were written. Whether `path` may be written is
    the caller's decision (the command line refuses an existing file: `check_output_file`)."""
    path = Path(path)
    lines = [json.dumps(record_to_dict(record), ensure_ascii=False) for record in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(line + "\n" for line in lines)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return len(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Converters

def pku_row_to_record(row: dict, where: str) -> HarmfulRecord:
    """One PKU-SafeRLHF row -> one harmful record, as far as its safety labels go (see the module docstring)."""
    missing = [key for key in PKU_FIELDS if key not in row]
    if missing:
        raise UnlearningDataError(f"{where}: PKU-SafeRLHF row missing field(s) {missing}")
    responses = (row["response_0"], row["response_1"])
    is_safe = (row["is_response_0_safe"], row["is_response_1_safe"])
    safer = row["safer_response_id"]
    if not all(isinstance(flag, bool) for flag in is_safe) or safer not in (0, 1):
        raise UnlearningDataError(f"{where}: is_response_*_safe must be true/false and safer_response_id 0 or 1, "
                                  f"got {is_safe}, {safer!r}")
    if is_safe[0] != is_safe[1]:                  # one unsafe, one safe: the full pair
        unsafe_index = is_safe.index(False)
        return HarmfulRecord(row["prompt"], responses[unsafe_index], responses[1 - unsafe_index],
                             categories=pku_categories(row, unsafe_index, where))
    if not is_safe[0]:                            # both unsafe: unlearn the less safe one, nothing to match
        return HarmfulRecord(row["prompt"], responses[1 - safer], None,
                             categories=pku_categories(row, 1 - safer, where))
    return HarmfulRecord(row["prompt"], None, responses[safer])   # both safe: match the safer one, nothing to unlearn


def pku_categories(row: dict, index: int, where: str) -> tuple[str, ...]:
    """The harm categories PKU-SafeRLHF marks true for response `index` (its `response_<i>_harm_category`: a map of
    the data set's 19 categories to true/false), in the file's order; () where the row has no such map."""
    marks = row.get(f"response_{index}_harm_category")
    if marks is None:
        return ()
    if not isinstance(marks, dict) or not all(isinstance(v, bool) for v in marks.values()):
        raise UnlearningDataError(f"{where}: response_{index}_harm_category must map category names to true/false")
    return tuple(name for name, marked in marks.items() if marked)


def pku_saferlhf_to_records(path: str | Path, max_samples: int | None = None,
                            pairs_only: bool = False) -> list[HarmfulRecord]:
    """Harmful records from a PKU-SafeRLHF JSONL (the data set's own schema), in file order.

    `max_samples` counts records kept (after `pairs_only` filtering).
    """
    path = Path(path)
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise UnlearningDataError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    records = []
    for number, row in read_jsonl(path, UnlearningDataError):
        if max_samples is not None and len(records) >= max_samples:
            break
        record = pku_row_to_record(row, f"{path}:{number}")
        if pairs_only and (record.harmful_response is None or record.helpful_response is None):
            continue
        records.append(record)
    if not records:
        raise UnlearningDataError(f"{path}: no usable PKU-SafeRLHF rows" + (" (pairs_only)" if pairs_only else ""))
    return records


@dataclass(frozen=True)
class VLGuardItem:
    """One (image, instruction, response) of VLGuard (Zong et al. 2024): `pairing` is "unsafes" (an unsafe image and
    its `instruction`), "safe_unsafes" (a safe image and its `unsafe_instruction`) or "safe_safes" (a safe image and
    its `safe_instruction`), the subsets of VLGuard's own evaluation; `response` is VLGuard's answer (a refusal for
    the first two)."""

    id: str
    image: Path
    pairing: str
    instruction: str
    response: str
    category: str | None  # harmful_category, given for unsafe images only


VLGUARD_PAIRINGS = {"instruction": "unsafes", "unsafe_instruction": "safe_unsafes", "safe_instruction": "safe_safes"}


def vlguard_image_folder(json_path: Path) -> Path:
    """Where VLGuard's images are: the split's zip unzips to a folder named like the JSON (train.json -> train/)."""
    folder = json_path.parent / json_path.stem
    return folder if folder.is_dir() else json_path.parent


def read_vlguard(path: str | Path, image_folder: str | Path | None = None,
                 error: type[ValueError] = UnlearningDataError) -> list[VLGuardItem]:
    """VLGuard's train.json or test.json as published (a JSON list of {id, image, safe, harmful_category?,
    instr-resp: [...]}; an unsafe image has one {instruction, response}, a safe one {safe_instruction, response} and
    {unsafe_instruction, response}), every image path checked. Errors name the file and the item."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else vlguard_image_folder(path)
    items = read_json_file(path, list, "VLGuard items", error)
    result = []
    for index, item in enumerate(items):
        where = f"{path}: item {index}" + (f" (id {item.get('id')!r})" if isinstance(item, dict) else "")
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(
                item.get("instr-resp"), list):
            raise error(f"{where}: needs 'image' (a path) and 'instr-resp' (a list); got "
                        f"{sorted(item) if isinstance(item, dict) else type(item).__name__}")
        image = folder / item["image"]
        if not image.is_file():
            raise error(f"{where}: image {item['image']!r} not found ({image})")
        for pair in item["instr-resp"]:
            key = next((k for k in VLGUARD_PAIRINGS if isinstance(pair, dict) and k in pair), None)
            if key is None or not isinstance(pair[key], str) or not isinstance(pair.get("response"), str):
                raise error(f"{where}: an instr-resp entry needs one of {list(VLGUARD_PAIRINGS)} and 'response' "
                            f"(strings); got {pair!r:.120}")
            result.append(VLGuardItem(str(item.get("id", index)), image.resolve(), VLGUARD_PAIRINGS[key], pair[key],
                                      pair["response"], item.get("harmful_category")))
    if not result:
        raise error(f"{path}: no VLGuard items")
    return result


def vlguard_to_records(path: str | Path, image_folder: str | Path | None = None,
                       max_samples: int | None = None) -> list[Record]:
    """Image+text records from VLGuard's training JSON, for the multimodal unlearning and SFT baselines: a harmful
    instruction (on an unsafe image, or an unsafe instruction on a safe one) with VLGuard's refusal as the helpful
    response (VLGuard publishes no harmful answers, so nothing to unlearn: harmful_response is null), and a safe
    instruction on a safe image with its answer as a normal record. Images as absolute paths."""
    records: list[Record] = []
    for item in read_vlguard(path, image_folder)[:max_samples]:
        if item.pairing == "safe_safes":
            records.append(NormalRecord(item.instruction, item.response, image=str(item.image)))
        else:
            records.append(HarmfulRecord(item.instruction, None, item.response, image=str(item.image)))
    return records


def truthfulqa_to_records(path: str | Path, max_samples: int | None = None) -> list[NormalRecord]:
    """Normal records from TruthfulQA's CSV, in file order: prompt = Question, response = Best Answer (rows with
    either empty are skipped). The normal data of the KL term, and of eval.py's utility metrics."""
    path = Path(path)
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise UnlearningDataError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    columns, rows = read_csv(path, UnlearningDataError)
    require_columns(path, columns, ["Question", "Best Answer"], UnlearningDataError)
    records = [NormalRecord(row["Question"], row["Best Answer"]) for row in rows
               if row["Question"].strip() and row["Best Answer"].strip()][:max_samples]
    if not records:
        raise UnlearningDataError(f"{path}: no question/answer pairs found")
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.unlearning_data",
                                     description="Build an unlearning JSONL from PKU-SafeRLHF, VLGuard and TruthfulQA.")
    parser.add_argument("--pku", type=Path, help="PKU-SafeRLHF JSONL (harmful records)")
    parser.add_argument("--vlguard", type=Path,
                        help="VLGuard's train.json (image+text records; images in the unzipped train/ beside it)")
    parser.add_argument("--vlguard-images", type=Path, default=None,
                        help="VLGuard's image folder, if not the train/ folder beside the JSON")
    parser.add_argument("--truthfulqa", type=Path, help="TruthfulQA CSV (normal records)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output JSONL: a new file (an existing one is refused, never replaced)")
    parser.add_argument("--max-pku", type=positive_int, default=None, help="keep the first N harmful records")
    parser.add_argument("--max-vlguard", type=positive_int, default=None, help="keep the first N VLGuard records")
    parser.add_argument("--max-truthfulqa", type=positive_int, default=None, help="keep the first N normal records")
    parser.add_argument("--pairs-only", action="store_true",
                        help="keep only PKU rows with both an unsafe and a safe response")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    if args.pku is None and args.vlguard is None:
        parser.error("give a source of harmful records: --pku and/or --vlguard")
    inputs = [path for path in (args.pku, args.vlguard, args.vlguard_images, args.truthfulqa) if path is not None]
    with exit_on_user_error(parser.prog, args.debug):
        check_output_file(args.out, inputs, option="--out")  # before anything is read: nothing is lost to a refusal
        harmful = pku_saferlhf_to_records(args.pku, args.max_pku, args.pairs_only) if args.pku else []
        vlguard = vlguard_to_records(args.vlguard, args.vlguard_images, args.max_vlguard) if args.vlguard else []
        normal = truthfulqa_to_records(args.truthfulqa, args.max_truthfulqa) if args.truthfulqa else []
        harmful += [r for r in vlguard if isinstance(r, HarmfulRecord)]
        normal = [r for r in vlguard if isinstance(r, NormalRecord)] + normal
        written = write_unlearning_jsonl([*harmful, *normal], args.out)
    full = sum(r.harmful_response is not None and r.helpful_response is not None for r in harmful)
    ascent_only = sum(r.helpful_response is None for r in harmful)
    with_image = sum(r.image is not None for r in [*harmful, *normal])
    print(f"wrote {written} records to {args.out}: {len(harmful)} harmful ({full} full pairs, {ascent_only} "
          f"harmful-only, {len(harmful) - full - ascent_only} helpful-only), {len(normal)} normal; {with_image} "
          f"with an image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
