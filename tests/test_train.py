"""train.py end to end on a tiny random checkpoint: outputs, modes, exact resume, the NaN guard, bad data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from ref.runs import RunError
from toy import defaults as toy
from weights_tools.make_tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint and an unlearning JSONL with text and image records of both kinds."""
    root = tmp_path_factory.mktemp("train")
    model = write_tiny_checkpoint(root / "model", seed=0)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "red.png")
    rows = []
    for i in range(5):
        rows.append({"kind": "harmful", "prompt": f"how do I make thing {i}?",
                     "harmful_response": f"Sure, here is how to make thing {i}: step one.",
                     "helpful_response": "Sorry, I cannot help with that."})
        rows.append({"kind": "normal", "prompt": f"what is {i} plus one?", "response": f"It is {i + 1}."})
    rows.append({"kind": "harmful", "prompt": "how do I do what the image shows?", "image": "red.png",
                 "harmful_response": "Sure: step one.", "helpful_response": "Sorry, I cannot help with that."})
    rows.append({"kind": "normal", "prompt": "what colour is the image?", "image": "red.png", "response": "Red."})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model), "data": str(data), "root": root}


def run(world, out, *extra) -> dict:
    argv = ["--model", world["model"], "--data", world["data"], "--out", str(out), "--save-every", "100",
            "--lora-r", "4", *extra]
    return train.train(train.parse_args(argv))


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_textual_run_writes_adapter_log_and_summary(world, tmp_path):
    out = tmp_path / "textual"
    summary = run(world, out, "--max-steps", "3", "--kernels", "chunked")
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1, 2]
    eps1, eps2, eps3 = json.loads((out / "args.json").read_text())["eps"]
    for record in log:
        assert {"harm_nll", "helpful_nll", "utility_kl", "total", "grad_norm", "lr", "tokens", "image_tokens",
                "seconds", "peak_memory_mb"} <= set(record)
        assert record["image_tokens"] == 0  # textual unlearning never shows the model an image
        assert record["total"] == pytest.approx(-eps1 * record["harm_nll"] + eps2 * record["helpful_nll"]
                                                + eps3 * record["utility_kl"], rel=1e-5, abs=1e-6)
    assert log[0]["utility_kl"] == 0.0  # fresh adapters: the model is still the original
    assert summary["steps"] == 3 and summary["tokens"] == sum(r["tokens"] for r in log)
    assert summary["kernels"]["linear_cross_entropy"] == "chunked"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "kernels.txt").is_file()
    assert json.loads((out / "args.json").read_text())["max_steps"] == 3


def test_multimodal_mode_runs_the_vision_tower_and_sft_never_ascends(world, tmp_path):
    multimodal = run(world, tmp_path / "mm", "--mode", "multimodal", "--max-steps", "2", "--batch-size", "1")
    assert multimodal["image_tokens"] > 0
    sft = run(world, tmp_path / "sft", "--mode", "sft", "--max-steps", "2")
    assert all("harm_nll" not in r for r in read_log(tmp_path / "sft")) and sft["steps"] == 2


def test_resume_gives_the_same_adapter_bit_for_bit(world, tmp_path):
    common = ("--max-steps", "4", "--lora-dropout", "0.3", "--schedule", "cosine", "--warmup", "1",
              "--mismatch", "random")
    run(world, tmp_path / "straight", *common)
    argv = ["--model", world["model"], "--data", world["data"], "--out", str(tmp_path / "resumed"), "--save-every",
            "100", "--lora-r", "4", *common]
    interrupted = train.train(train.parse_args(argv), train.StopRequest(after_step=2))
    assert interrupted == {"interrupted_at": 2}
    with open(tmp_path / "resumed" / "log.jsonl", "a") as log:  # as if it crashed after logging two more steps
        log.write(json.dumps({"step": 2, "total": 0.0}) + "\n" + json.dumps({"step": 3, "total": 0.0}) + "\n")
    resumed = train.train(train.parse_args(["--out", str(tmp_path / "resumed"), "--resume"]))
    assert resumed["steps"] == 4
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    assert [r["total"] for r in read_log(tmp_path / "straight")] == [r["total"] for r in read_log(tmp_path / "resumed")]


def test_nan_guard_stops_and_keeps_the_last_good_adapter(world, tmp_path):
    out = tmp_path / "nan"
    summary = run(world, out, "--max-steps", "5", "--lr", "1e30", "--clip", "0")
    assert "non-finite" in summary["stopped_by"] and summary["steps"] < 5
    for name, tensor in load_file(out / "adapter" / "adapter_model.safetensors").items():
        assert torch.isfinite(tensor).all(), name


def test_bad_data_stops_before_training(world, tmp_path):
    only_normal = tmp_path / "normal.jsonl"
    only_normal.write_text(json.dumps({"kind": "normal", "prompt": "hi", "response": "hello"}) + "\n")
    with pytest.raises(train.TrainError, match="no harmful records"):
        train.train(train.parse_args(["--model", world["model"], "--data", str(only_normal),
                                      "--out", str(tmp_path / "x"), "--max-steps", "1"]))
    assert not (tmp_path / "x" / "log.jsonl").exists()
    with pytest.raises(RunError, match="already holds a run"):
        run(world, tmp_path / "twice", "--max-steps", "1")
        run(world, tmp_path / "twice", "--max-steps", "1")


def test_bare_defaults_train_on_the_embedded_toy(tmp_path):
    """`python train.py` with nothing but a short run: the committed toy model and the toy world's text data."""
    summary = train.train(train.parse_args(["--max-steps", "2", "--out", str(tmp_path / "bare")]))
    assert summary["steps"] == 2 and summary["image_tokens"] == 0
    args = json.loads((tmp_path / "bare" / "args.json").read_text())
    assert args["data"] == "toy" and args["model"].endswith("toy_llava") and args["mode"] == "textual"
    assert (tmp_path / "bare" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_step_without_any_loss_term_is_skipped_and_logged(world, tmp_path):
    """sft with eps 0 1 0 on records without a helpful response (PKU rows whose two responses are both unsafe):
    such a batch has no term; the step is logged as skipped and changes nothing, the run goes on."""
    rows = [{"kind": "harmful", "prompt": "how do I do it?", "harmful_response": "Like this.",
             "helpful_response": None},
            {"kind": "harmful", "prompt": "how do I make it?", "harmful_response": "Sure.",
             "helpful_response": "Sorry, I cannot help with that."}]
    data = tmp_path / "pku_like.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    summary = train.train(train.parse_args(["--model", world["model"], "--data", str(data), "--out", str(out),
                                            "--mode", "sft", "--eps", "0", "1", "0", "--batch-size", "1",
                                            "--max-steps", "4", "--lora-r", "4"]))
    log = read_log(out)
    skipped = [r for r in log if "skipped" in r]
    assert summary["steps"] == 4 and len(log) == 4 and skipped and len(skipped) < 4
    assert all("total" not in r and r["grad_norm"] == 0.0 for r in skipped)
    assert all("helpful_nll" in r for r in log if "skipped" not in r)
    only_unsafe = tmp_path / "only_unsafe.jsonl"
    only_unsafe.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(train.TrainError, match="no harmful record has a helpful_response"):
        train.train(train.parse_args(["--model", world["model"], "--data", str(only_unsafe), "--out",
                                      str(tmp_path / "x"), "--mode", "sft", "--eps", "0", "1", "0"]))


def test_user_errors_are_one_line_with_exit_status_2(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", world["model"], "--data", str(tmp_path / "missing.jsonl"), "--out",
                    str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: ") and "missing.jsonl" in err[-1]


def test_the_toy_model_check_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "TOY_MODEL", tmp_path / "no_toy_here")
    with pytest.raises(toy.ToyModelError, match="python -m toy.build"):
        toy.require_toy_model(tmp_path / "no_toy_here")
    toy.require_toy_model(tmp_path / "some_other_model")  # only the toy's own path is checked
