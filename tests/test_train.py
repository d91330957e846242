"""train.py end to end on a tiny random checkpoint: outputs, modes, exact resume, the NaN guard, bad data."""

from __future__ import annotations

from dataclasses import replace
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train
from evals.options import parse_adapters
from harness import devices
from harness.runs import RunError, read_train_summary
from harness.signals import StopRequest
from harness.train_options import (DEFAULT, MODEL_DEPENDENT, OPTION_NAMES, REAL_MODEL_DEFAULTS, OptionError,
                                   TrainOptions, build_parser)
from worlds.toy import defaults as toy
from worlds import embedded
from weights_tools.make_tiny import write_tiny_checkpoint

ROOT = Path(train.__file__).resolve().parent


def trained(argv: list[str], stop: StopRequest | None = None) -> dict:
    """train.py on ARGV in this process, its options read as `main` reads them; the summary."""
    return train.train(*train.read_command_line(argv), stop)


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
    return trained(argv)


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
    interrupted = trained(argv, StopRequest(after_step=2))
    assert interrupted["interrupted_at"] == 2
    with open(tmp_path / "resumed" / "log.jsonl", "a") as log:  # as if it crashed after logging two more steps
        log.write(json.dumps({"step": 2, "total": 0.0}) + "\n" + json.dumps({"step": 3, "total": 0.0}) + "\n")
    resumed = trained(["--out", str(tmp_path / "resumed"), "--resume"])
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
        trained(["--model", world["model"], "--data", str(only_normal),
                 "--out", str(tmp_path / "x"), "--max-steps", "1"])
    assert not (tmp_path / "x" / "log.jsonl").exists()
    with pytest.raises(RunError, match="already holds a run"):
        run(world, tmp_path / "twice", "--max-steps", "1")
        run(world, tmp_path / "twice", "--max-steps", "1")


def test_bare_defaults_train_on_the_embedded_toy(tmp_path):
    """`python train.py` with nothing but a short run: the committed toy model and the toy world's text data."""
    summary = trained(["--max-steps", "2", "--out", str(tmp_path / "bare")])
    assert summary["steps"] == 2 and summary["image_tokens"] == 0
    args = json.loads((tmp_path / "bare" / "args.json").read_text())
    assert args["data"] == "toy" and args["model"].endswith("toy_llava") and args["mode"] == "textual"
    assert {k: args[k] for k in toy.TRAIN_DEFAULTS} == {**toy.TRAIN_DEFAULTS, "max_steps": 2}
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
    summary = trained(["--model", world["model"], "--data", str(data), "--out", str(out),
                       "--mode", "sft", "--eps", "0", "1", "0", "--batch-size", "1",
                       "--max-steps", "4", "--lora-r", "4"])
    log = read_log(out)
    skipped = [r for r in log if "skipped" in r]
    assert summary["steps"] == 4 and len(log) == 4 and skipped and len(skipped) < 4
    assert all("total" not in r and r["grad_norm"] == 0.0 for r in skipped)
    assert all("helpful_nll" in r for r in log if "skipped" not in r)
    only_unsafe = tmp_path / "only_unsafe.jsonl"
    only_unsafe.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(train.TrainError, match="no harmful record has a helpful_response"):
        trained(["--model", world["model"], "--data", str(only_unsafe), "--out",
                 str(tmp_path / "x"), "--mode", "sft", "--eps", "0", "1", "0"])


def test_user_errors_are_one_line_with_exit_status_2(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", world["model"], "--data", str(tmp_path / "missing.jsonl"), "--out",
                    str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: ") and "missing.jsonl" in err[-1]


def test_the_toy_model_check_names_the_build_command(tmp_path):
    missing_toy = replace(embedded.TOY, model=tmp_path / "no_toy_here")
    with pytest.raises(embedded.WorldModelError, match="python -m worlds.toy.build"):
        missing_toy.require_model(tmp_path / "no_toy_here")
    missing_toy.require_model(tmp_path / "some_other_model")  # only the toy's own path is checked


# --- adapters along the way, resume that extends, signals -------------------------------------------------------------

def test_adapters_along_the_way_and_eval_reads_them_from_the_run_folder(world, tmp_path):
    out = tmp_path / "steps"
    run(world, out, "--max-steps", "5", "--save-adapter-every", "2")
    assert sorted(p.name for p in out.glob("adapter*")) == ["adapter", "adapter-step2", "adapter-step4"]
    step2, step4, final = (load_file(out / d / "adapter_model.safetensors")
                           for d in ("adapter-step2", "adapter-step4", "adapter"))
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)
    assert any(not torch.equal(step4[k], final[k]) for k in step4)
    assert parse_adapters([str(out)]) == [("steps@2", out / "adapter-step2"),
                                          ("steps@4", out / "adapter-step4"), ("steps", out / "adapter")]
    assert parse_adapters([f"mine={out}"])[0][0] == "mine@2"
    log = read_log(out)
    summary = read_train_summary(out / "adapter-step2")
    assert summary["steps"] == 2 and summary["tokens"] == log[0]["tokens"] + log[1]["tokens"]
    assert summary["estimated_flops"] == pytest.approx(log[0]["flops"] + log[1]["flops"])
    even = tmp_path / "even"  # ends on a multiple: adapter/ is adapter-step4's weights, evaluated once
    run(world, even, "--max-steps", "4", "--save-adapter-every", "2")
    assert [name for name, _ in parse_adapters([str(even)])] == ["even@2", "even@4"]


def test_resume_with_a_larger_max_steps_equals_a_run_started_with_it(world, tmp_path):
    run(world, tmp_path / "straight", "--max-steps", "6", "--lora-dropout", "0.2")
    run(world, tmp_path / "extended", "--max-steps", "3", "--lora-dropout", "0.2")
    resumed = trained(["--out", str(tmp_path / "extended"), "--resume", "--max-steps", "6"])
    assert resumed["steps"] == 6 and resumed["stopped_by"] == "max_steps"
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    extended = load_file(tmp_path / "extended" / "adapter" / "adapter_model.safetensors")
    for name in straight:
        assert torch.equal(straight[name], extended[name]), name
    lines = [json.loads(line) for line in (tmp_path / "extended" / "log.jsonl").read_text().splitlines()]
    assert lines[3] == {"event": "resume", "step": 3, "changed": {"max_steps": [3, 6]}}
    assert [r["total"] for r in read_log(tmp_path / "straight")] == [r["total"] for r in lines if "event" not in r]
    args = json.loads((tmp_path / "extended" / "args.json").read_text())
    assert args["max_steps"] == 6 and args["resumed"][0]["changed"] == {"max_steps": [3, 6]}


def test_resume_of_a_finished_run_without_more_steps_changes_nothing(world, tmp_path, capsys):
    out = tmp_path / "done"
    run(world, out, "--max-steps", "2")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    summary = trained(["--out", str(out), "--resume"])
    assert summary["steps"] == 2 and "nothing to do" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(OptionError, match="below the checkpoint's step 2"):
        trained(["--out", str(out), "--resume", "--max-steps", "1"])


def test_resume_refuses_changed_options_and_lists_them(world, tmp_path):
    out = tmp_path / "run"
    run(world, out, "--max-steps", "2", "--seed", "1")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = ["--out", str(out), "--resume", "--max-steps", "4", "--seed", "0", "--lr", "0.1", "--data", world["data"]]
    with pytest.raises(OptionError) as error:
        trained(argv)
    message = str(error.value)
    assert "--seed 1 in the run, 0 now" in message and "--lr 0.0002 in the run, 0.1 now" in message
    assert "--data" not in message.split("differ from")[1].split(". Only")[0]  # the same file: no difference
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# Run folders are the user's data: a run started by an earlier train.py resumes under this one. Their formats, as the
# start of the house's second step (bc86c2b) wrote them:
RECORDED_LOG_KEYS = ["step", "harm_nll", "helpful_nll", "utility_kl", "total", "grad_norm", "adapter_norm", "lr",
                     "tokens", "image_tokens", "flops", "seconds", "peak_memory_mb"]  # on a CPU
RECORDED_CHECKPOINT_KEYS = ["step", "stop_at", "totals", "stopped_by", "reference_norms", "harm_position",
                            "normal_position", "ranks", "python_rng", "param_names"]
RECORDED_SUMMARY_KEYS = ["mode", "steps", "stopped_by", "tokens", "image_tokens", "estimated_flops", "wall_seconds",
                         "peak_memory_mb", "adapter", "kernels", "ranks", "provenance"]


# Options added since bc86c2b, with the values a run folder without them resumes with (their defaults), after the
# option they follow in args.json.
LATER_OPTIONS = {"mismatch": {"harm_loss": "ascent", "npo_beta": 0.1}}


def recorded_args(world, out: Path, with_later_options: bool = False) -> dict:
    """args.json as bc86c2b's train.py wrote it for `run(world, out, *RECORDED_RUN)` (its provenance abridged); with
    `with_later_options`, as this train.py writes it (LATER_OPTIONS in their places)."""
    recorded = bc86c2b_args(world, out)
    if not with_later_options:
        return recorded
    return {k: v for key, value in recorded.items() for k, v in {key: value, **LATER_OPTIONS.get(key, {})}.items()}


def bc86c2b_args(world, out: Path) -> dict:
    return {"model": world["model"], "vision_dir": None, "data": world["data"], "out": str(out),
            "prompt_format": "llava-hf", "mode": "textual", "eps": [0.5, 1.0, 1.0], "include_categories": None,
            "exclude_categories": None, "category_fraction": 1.0, "category_seed": None, "mismatch": "random",
            "quantize": "nf4", "dtype": "float32", "device": "cpu", "lora_r": 4, "lora_alpha": 16.0,
            "lora_dropout": 0.3, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"],
            "activation_checkpointing": False, "full_parameter": False, "parallel": "ddp", "kernels": "fast",
            "deterministic": False, "kernel": [], "lr": 0.0002, "weight_decay": 0.0, "batch_size": 2,
            "grad_accum": 1, "max_steps": 4, "warmup": 1, "schedule": "cosine", "clip": 1.0,
            "divergence_factor": 100.0, "seed": 0, "stop_harm_nll": 100.0, "extra_batches": 40, "threads": None,
            "save_every": 100, "save_adapter_every": 0, "log_every": 1,
            "provenance": {"date": "2026-12-06T20:50:26+00:00", "commit": "bc86c2b6b3d83cc81e87f339c6d88dc64d944ae5",
                           "python": "3.11.7", "packages": {"torch": "2.13.0+cpu"}, "device": "cpu",
                           "sha256": {"data": None, "model_config": None}}}


RECORDED_RUN = ("--max-steps", "4", "--lora-dropout", "0.3", "--mismatch", "random", "--schedule", "cosine",
                "--warmup", "1", "--device", "cpu", "--dtype", "float32")  # the recorded run's dtype, on any CPU


def test_a_run_folder_in_the_recorded_formats_resumes_bit_for_bit(world, tmp_path):
    """A run stopped after step 2 whose args.json is the recorded one, byte for byte as the earlier train.py wrote
    it, resumes to the adapter of the uninterrupted run; and this train.py writes the same keys, in the same order."""
    run(world, tmp_path / "straight", *RECORDED_RUN)
    out = tmp_path / "stopped"
    argv = ["--model", world["model"], "--data", world["data"], "--out", str(out), "--save-every", "100",
            "--lora-r", "4", *RECORDED_RUN]
    assert trained(argv, StopRequest(after_step=2))["interrupted_at"] == 2
    written, recorded = json.loads((out / "args.json").read_text()), recorded_args(world, out)
    expected = recorded_args(world, out, with_later_options=True)
    assert list(written) == list(expected)
    assert {k: v for k, v in written.items() if k != "provenance"} == {k: v for k, v in expected.items()
                                                                        if k != "provenance"}
    (out / "args.json").write_text(json.dumps(recorded, indent=1))
    with safe_open(str(out / "checkpoint" / "state.safetensors"), "pt") as f:
        assert list(json.loads(f.metadata()["state"])) == RECORDED_CHECKPOINT_KEYS
    assert all(list(record) == RECORDED_LOG_KEYS for record in read_log(out))
    summary = trained(["--out", str(out), "--resume"])
    assert list(summary) == RECORDED_SUMMARY_KEYS and summary["steps"] == 4
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["total"] for r in read_log(tmp_path / "straight")] == [r["total"] for r in read_log(out)]


def test_the_options_record_is_the_command_line():
    """Every option of the command line is a TrainOptions field, in the same order (args.json keeps it), with the
    same default; the command line leaves unset those the model decides, and --resume and --debug are no options."""
    parsed = vars(build_parser(embedded.DEFAULT_WORLD).parse_args([]))
    assert list(parsed) == [*OPTION_NAMES[:4], "resume", *OPTION_NAMES[4:], "debug"]
    chosen_later = {*MODEL_DEPENDENT, "dtype", "parallel", "out"}
    assert {name: parsed[name] for name in OPTION_NAMES if name not in chosen_later | {"model"}} == \
        {name: getattr(DEFAULT, name) for name in OPTION_NAMES if name not in chosen_later | {"model"}}
    assert all(parsed[name] is None for name in chosen_later)
    assert parsed["model"] == str(embedded.DEFAULT_WORLD.model)
    assert set(toy.TRAIN_DEFAULTS) == set(MODEL_DEPENDENT)


def start_train_process(world, out, max_steps: int) -> subprocess.Popen:
    argv = [sys.executable, str(ROOT / "train.py"), "--model", world["model"], "--data", world["data"], "--out",
            str(out), "--lora-r", "4", "--lora-dropout", "0.2", "--max-steps", str(max_steps), "--save-every", "1000",
            "--threads", "1"]
    # SIGINT at its default, as a terminal's foreground program has it: under a shell's background job (`cmd &`) the
    # tests inherit it ignored, and train.py leaves an ignored signal ignored
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_steps(process: subprocess.Popen, log: Path, steps: int) -> None:
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
        assert process.poll() is None and time.monotonic() < deadline, "train.py ended before the signal"
        time.sleep(0.005)


def test_sigint_writes_a_checkpoint_that_resumes_to_the_uninterrupted_adapter(world, tmp_path):
    max_steps = 150
    process = start_train_process(world, tmp_path / "killed", max_steps)
    wait_for_steps(process, tmp_path / "killed" / "log.jsonl", 3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped after step ") and "(SIGINT)" in last and "--resume" in last
    stopped_at = int(last.split()[3])
    assert 3 <= stopped_at < max_steps and len(read_log(tmp_path / "killed")) == stopped_at
    common = ["--lora-r", "4", "--lora-dropout", "0.2", "--max-steps", str(max_steps), "--threads", "1"]
    trained(["--out", str(tmp_path / "killed"), "--resume"])
    trained(["--model", world["model"], "--data", world["data"], "--out",
             str(tmp_path / "straight"), "--save-every", "1000", *common])
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_a_second_signal_stops_at_once_and_main_says_so_in_one_line(world, tmp_path, monkeypatch, capsys):
    """Two signals sent at once may reach Python as one, so the handler is driven in this process: the first asks
    for a stop, the second raises KeyboardInterrupt, which main turns into one line and exit status 130. (SIGINT is
    caught as an interactive Python has it: a shell starts a background job with it ignored, and then it stays so.)"""
    found = {s: signal.signal(s, handler) for s, handler in ((signal.SIGINT, signal.default_int_handler),
                                                              (signal.SIGTERM, signal.SIG_DFL))}
    try:
        stop = StopRequest()
        with pytest.raises(KeyboardInterrupt):
            with stop.on_signals():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
                assert stop.requested(0) and stop.reason() == "SIGINT"
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
        # the handlers found are back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for s, handler in found.items():
            signal.signal(s, handler)

    def interrupted(options, start, stop=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", world["model"], "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().startswith("train.py: stopped at once; python train.py --resume --out")


# --- defaults, help, hints, provenance --------------------------------------------------------------------------------

def test_a_model_that_is_not_the_toy_gets_the_real_model_defaults(world, tmp_path, capsys):
    run(world, tmp_path / "real", "--max-steps", "1")
    args = json.loads((tmp_path / "real" / "args.json").read_text())
    assert {k: args[k] for k in REAL_MODEL_DEFAULTS} == {**REAL_MODEL_DEFAULTS, "max_steps": 1}
    assert REAL_MODEL_DEFAULTS["eps"] == [0.5, 1.0, 1.0] and REAL_MODEL_DEFAULTS["stop_harm_nll"] == 100
    err = capsys.readouterr().err
    assert "defaults, a real model's" in err and f"--dtype {args['dtype']}" in err  # the machine's choice, shown


def test_help_states_every_default():
    help_text = build_parser(embedded.DEFAULT_WORLD).format_help()
    blocks = [b for b in re.split(r"\n  (?=-)", help_text.split("options:", 1)[1]) if b.startswith("-")]
    assert len(blocks) > 30
    for block in blocks:
        usage = block.split("\n")[0].split("  ")[0]  # "--lr LR", "--mode {a,b}"; a flag (off unless given): "--resume"
        if " " in usage.replace("-h, --help", "-h"):
            assert "default" in block.lower(), f"{block.split()[0]}: no default in its help"


def test_user_errors_name_what_to_do(world, tmp_path):
    pku = write_jsonl(tmp_path / "pku.jsonl", [{"prompt": "p", "response_0": "a", "response_1": "b",
                                                "is_response_0_safe": False, "is_response_1_safe": True,
                                                "safer_response_id": 1}])
    with pytest.raises(ValueError, match=r"pku.jsonl:1: a raw PKU-SafeRLHF row.*python -m harness.unlearning_data --pku"):
        run(world, tmp_path / "a", "--data", str(pku))
    text_only = write_jsonl(tmp_path / "text.jsonl", [{"kind": "harmful", "prompt": "p", "harmful_response": "a",
                                                       "helpful_response": "b"}])
    with pytest.raises(train.TrainError, match="no harmful record has an image.*--vlguard.*--mode textual"):
        run(world, tmp_path / "b", "--data", str(text_only), "--mode", "multimodal", "--eps", "0.5", "1", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: .*--device cpu"):
            run(world, tmp_path / "c", "--device", "cuda")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_args_and_summary_record_provenance(world, tmp_path):
    summary = run(world, tmp_path / "p", "--max-steps", "1")
    made = json.loads((tmp_path / "p" / "args.json").read_text())["provenance"]
    expected_data = hashlib.sha256(Path(world["data"]).read_bytes()).hexdigest()
    expected_config = hashlib.sha256((Path(world["model"]) / "config.json").read_bytes()).hexdigest()
    for record in (made, summary["provenance"]):
        assert record["sha256"] == {"data": expected_data, "model_config": expected_config}
        assert record["packages"]["torch"] == torch.__version__.split("+")[0] or record["packages"]["torch"] == \
            torch.__version__
        assert record["device"] == "cpu" and record["date"].startswith("20")
        assert {"bitsandbytes", "safetensors"} <= set(record["packages"])
    if (ROOT / ".git").exists():
        assert made["commit"].split("+")[0] == subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                              capture_output=True, text=True).stdout.strip()


# --- the harm-coverage ablation: records by category ------------------------------------------------------------------

def test_category_filtering_keeps_and_drops_exactly_the_records_it_should():
    from ref.unlearning_data import HarmfulRecord
    records = [HarmfulRecord("p1", "a", "b", categories=("drugs",)),
               HarmfulRecord("p2", "a", "b", categories=("drugs", "violence")),
               HarmfulRecord("p3", "a", "b", categories=("fraud",)),
               HarmfulRecord("p4", "a", "b")]  # no category: dropped once any choice is made

    def select(**options):
        return train.select_categories(records, TrainOptions(model="m", out="o", **options))

    assert select() == (records, None)
    kept, coverage = select(include_categories=["drugs"])
    assert [r.prompt for r in kept] == ["p1", "p2"] and coverage["dropped"] == ["violence", "fraud"]
    kept, coverage = select(exclude_categories=["drugs"])
    assert [r.prompt for r in kept] == ["p2", "p3"]  # p2 is violence too: one kept category keeps a record
    assert coverage == {"kept": ["violence", "fraud"], "dropped": ["drugs"], "records": 2}
    kept, _ = select(include_categories=["drugs", "fraud"], exclude_categories=["drugs"])
    assert [r.prompt for r in kept] == ["p3"]
    first, second = select(category_fraction=0.5, category_seed=3), select(category_fraction=0.5, category_seed=3)
    assert first == second and len(first[1]["kept"]) == 2  # round(0.5 x 3) categories, the same for the same seed
    with pytest.raises(train.TrainError, match=r"no harmful record has the categories \['nope'\]"):
        select(include_categories=["nope"])


def test_pku_rows_carry_the_harm_categories_of_their_unsafe_response():
    from harness.unlearning_data import pku_row_to_record
    marks = {"Drugs": True, "Violence": False, "Cybercrime": True}
    row = {"prompt": "p", "response_0": "unsafe", "response_1": "safe", "is_response_0_safe": False,
           "is_response_1_safe": True, "safer_response_id": 1, "response_0_harm_category": marks,
           "response_1_harm_category": {"Drugs": False, "Violence": False, "Cybercrime": False}}
    assert pku_row_to_record(row, "x:1").categories == ("Drugs", "Cybercrime")
    both_safe = {**row, "is_response_0_safe": True}
    assert pku_row_to_record(both_safe, "x:1").categories == ()  # nothing to unlearn, no harm category


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-bf16"])
def test_an_unset_dtype_is_bfloat16_on_a_cpu_with_native_bfloat16_and_float32_elsewhere(world, tmp_path, monkeypatch,
                                                                                        native):
    """A real model trains in bfloat16 on a CPU whose flags list native bfloat16 matmuls (harness.devices.
    default_train_dtype), in float32 on any other CPU; --dtype float32 is kept; full-parameter training and the toy
    stay float32 on every CPU. Both kinds of CPU, whatever this one is: the detector's answer is set here."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)

    def dtype_of(*extra) -> str:
        return train.read_command_line(["--model", world["model"], "--data", world["data"], "--out",
                                        str(tmp_path / "run"), "--device", "cpu", *extra])[0].dtype
    assert dtype_of() == ("bfloat16" if native else "float32")
    assert dtype_of("--dtype", "float32") == "float32"
    assert dtype_of("--quantize", "none", "--full-parameter") == "float32"
    assert train.read_command_line(["--out", str(tmp_path / "toy")])[0].dtype == "float32"


def test_full_parameter_training_refuses_a_16bit_dtype(world, tmp_path):
    """The weights themselves are updated in the compute dtype (no float32 master copy): bfloat16 would round most
    AdamW updates away, so it is refused before any work, naming the option to use."""
    with pytest.raises(OptionError, match="--dtype float32"):
        run(world, tmp_path / "full", "--quantize", "none", "--full-parameter", "--dtype", "bfloat16")
    assert not (tmp_path / "full" / "log.jsonl").exists()
