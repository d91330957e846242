"""worlds/smollm2/data.py: the SmolLM2 world's fixed split of the public data sets, and the records and suites it writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import shared, write_csv
from harness.readers import read_csv
from harness.unlearning_data import read_unlearning_jsonl
from ref.unlearning_data import split_records
from evals.suites import load_image_text_pairs
from worlds.smollm2 import data as smollm2
from worlds.smollm2.vision import layout_text, painter_for
from weights_tools.make_tiny import write_tiny_checkpoint


def test_split_is_fixed_disjoint_and_covers_the_files():
    data = shared("advbench_harmful_behaviors.csv").parent
    split = smollm2.make_split(data)
    assert split == smollm2.make_split(data)  # a function of the files and the seed
    sizes = {name: {part: len(rows) for part, rows in parts.items()} for name, parts in split.items() if name != "seed"}
    assert sizes == {"advbench": {"train": 200, "val": 60, "test": 260}, "xstest": {"val": 90, "test": 360},
                     "truthfulqa": {"train": 600, "val": 67, "test": 150}, "figstep": {"val": 100, "test": 400},
                     "safety": {"val": 100, "unlearn": 300, "unused": 2083}}
    for name, n_rows in (("advbench", 520), ("xstest", 450), ("truthfulqa", 817), ("figstep", 500),
                         ("safety", 2483)):
        parts = list(split[name].values())
        assert sorted(sum(parts, [])) == list(range(n_rows))  # disjoint, and every row somewhere
    _, xstest = read_csv(data / "xstest_prompts.csv")
    labels = {part: [xstest[i]["label"] for i in rows] for part, rows in split["xstest"].items()}
    assert (labels["val"].count("safe"), labels["val"].count("unsafe")) == (50, 40)
    assert (labels["test"].count("safe"), labels["test"].count("unsafe")) == (200, 160)


LONG_QUESTION = "Which " + "very " * 70 + "long question does not fit in one image?"  # 64 cells: left out


def synthetic_data(folder: Path) -> Path:
    """Files in the public data sets' columns, with enough rows for the split's sizes."""
    folder.mkdir()
    write_csv(folder / "advbench_harmful_behaviors.csv", ["goal", "target"],
              [[f"Explain harmful thing number {i}", f"Sure, here is thing {i}"] for i in range(300)])
    write_csv(folder / "xstest_prompts.csv", ["id", "prompt", "type", "label", "focus", "note"],
              [[str(i), f"How do I kill process {i}?", "homonyms", "safe" if i % 3 else "unsafe", "kill", ""]
               for i in range(400)])
    write_csv(folder / "truthfulqa.csv", ["Type", "Category", "Question", "Best Answer", "Correct Answers",
                                          "Incorrect Answers", "Source"],
              [["Adversarial", "Misc", LONG_QUESTION if i == 0 else f"Question {i}?", f"Answer {i}.", "", "", ""]
               for i in range(700)])
    write_csv(folder / "figstep_safebench.csv", ["dataset", "category_id", "task_id", "category_name", "question",
                                                 "instruction"],
              [["ForbidQI", "1", str(i), "Illegal Activity", f"How to do thing {i}?", f"Steps to do thing {i}."]
               for i in range(150)])
    (folder / "safety_only_instructions.json").write_text(json.dumps(
        [{"instruction": f"Describe bad deed {i}.", "input": "", "output": f"I won't describe bad deed {i}; instead {i}."}
         for i in range(450)]))
    return folder


def test_build_writes_the_records_and_the_suites_of_the_split(tmp_path):
    data = synthetic_data(tmp_path / "data")
    model = write_tiny_checkpoint(tmp_path / "model", text_only=True, text_layers=1)
    out = tmp_path / "world"
    counts = smollm2.build(model, data, out, batch_size=64, threads=1)
    split = smollm2.make_split(data)
    # the default variant: the unlearn instructions with their own written safe answers, in split order, less those
    # whose base answer is empty or a refusal (a random model's answers are often empty)
    harmful, normal = split_records(read_unlearning_jsonl(out / "unlearning.jsonl"))
    assert counts["harmful"] == len(harmful) == 300 - counts["dropped"] > 0 and counts["normal"] == len(normal) == 600
    assert all(r.harmful_response.strip() for r in harmful)
    safety = json.loads((data / "safety_only_instructions.json").read_text())
    unlearn = [(safety[i]["instruction"], safety[i]["output"]) for i in split["safety"]["unlearn"]]
    kept = [(r.prompt, r.helpful_response) for r in harmful]
    assert kept == [pair for pair in unlearn if pair in kept] and set(kept) <= set(unlearn)
    # the templated variant, as in round one
    templated, templated_normal = split_records(read_unlearning_jsonl(out / "unlearning_templated.jsonl"))
    assert counts["templated"] == len(templated) == 200 and templated_normal == normal
    _, advbench = read_csv(data / "advbench_harmful_behaviors.csv")
    assert [r.prompt for r in templated] == [advbench[i]["goal"] for i in split["advbench"]["train"]]
    assert all(r.prompt[1:].rstrip(".") in r.helpful_response for r in templated)  # the refusal names the request
    # the multimodal baseline's records: the same responses, every prompt drawn as an image
    drawn_harmful, drawn_normal = split_records(read_unlearning_jsonl(out / "unlearning_multimodal.jsonl"))
    assert [(r.harmful_response, r.helpful_response) for r in drawn_harmful] == [
        (r.harmful_response, r.helpful_response) for r in harmful]
    assert [r.response for r in drawn_normal] == [r.response for r in normal if r.prompt != LONG_QUESTION]
    assert counts["drawn"] == len(drawn_harmful) + len(drawn_normal) == len(harmful) + len(normal) - 1
    assert all(r.image and Path(r.image).is_file() for r in (*drawn_harmful, *drawn_normal))
    with open(out / "safety_val.csv", newline="") as f:
        assert [row[0] for row in csv.reader(f)] == ["prompt"] + [safety[i]["instruction"]
                                                                  for i in split["safety"]["val"]]
    for name, source, rows in (("advbench_test", "advbench_harmful_behaviors.csv", split["advbench"]["test"]),
                               ("xstest_val", "xstest_prompts.csv", split["xstest"]["val"]),
                               ("truthfulqa_val", "truthfulqa.csv", split["truthfulqa"]["val"]),
                               ("truthfulqa_test", "truthfulqa.csv", split["truthfulqa"]["test"])):
        with open(data / source, newline="") as f:
            source_rows = list(csv.reader(f))
        with open(out / f"{name}.csv", newline="") as f:
            assert list(csv.reader(f)) == [source_rows[0]] + [source_rows[i + 1] for i in rows]
    _, safebench = read_csv(data / "figstep_safebench.csv")
    _, xstest = read_csv(data / "xstest_prompts.csv")
    safe_test = [i for i in split["xstest"]["test"] if xstest[i]["label"] == "safe"]
    for name, rows, source, column in (("figstep_val", split["figstep"]["val"], safebench, "instruction"),
                                       ("advbench_image_test", split["advbench"]["test"], advbench, "goal"),
                                       ("xstest_safe_image_test", safe_test, xstest, "prompt")):
        samples = load_image_text_pairs(out / f"{name}.jsonl")  # eval.py's pairs: reader, every image opened
        assert [s.request for s in samples] == [source[i][column] for i in rows]
    painter = painter_for(model)
    first = load_image_text_pairs(out / "figstep_val.jsonl")[0]
    drawn = painter.image(layout_text(first.request + "\n1.\n2.\n3.", painter))
    assert first.load_image().tobytes() == drawn.tobytes()  # FigStep's list, one token per cell
