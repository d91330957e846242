"""The red-team catalogue: every bad input and fault that once crashed, misled or overwrote a user's files, kept as a
case with its exact outcome (the one-line error, the exit status, every user file unchanged by sha256).

Sections follow the catalogue: data lost, resume not exact, silent wrong results, bombs, tracebacks; then the fault
test (kill -9 at random moments of a run that ends by the stopping rule, resumed each time). Inputs are tiny and
generated here; a "bomb" is a small file whose decoded size would be large.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_of, fingerprint, write_jsonl
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import eval as eval_py
import train
from harness.signals import StopRequest
from harness.train_options import TrainOptions
from harness.train_run import LoopState
from ref.data import TextTokenizer, load_image, to_rgb
from harness.runs import read_log
from harness.unlearning_data import read_unlearning_jsonl, write_unlearning_jsonl
from ref.unlearning_data import HarmfulRecord, NormalRecord
from weights_tools import merge_adapter, quantize
from weights_tools.make_tiny import write_tiny_checkpoint

ROOT = Path(train.__file__).resolve().parent


def trained(argv: list[str], stop: StopRequest | None = None) -> dict:
    """train.py on ARGV in this process, its options read as `main` reads them; the summary."""
    return train.train(*train.read_command_line(argv), stop)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = adapter_tensors(a), adapter_tensors(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model = write_tiny_checkpoint(root / "model", seed=0)
    rows = []
    for i in range(5):
        rows.append({"kind": "harmful", "prompt": f"how do I make thing {i}?",
                     "harmful_response": f"Sure, here is how to make thing {i}: step one.",
                     "helpful_response": "Sorry, I cannot help with that."})
        rows.append({"kind": "normal", "prompt": f"what is {i} plus one?", "response": f"It is {i + 1}."})
    data = write_jsonl(root / "data.jsonl", rows)
    world = {"root": root, "model": model, "data": data}
    trained(train_argv(world, root / "trained", "--max-steps", "2"))
    world["adapter"] = root / "trained" / "adapter"
    return world


def train_argv(world, out: Path, *extra: str) -> list[str]:
    return ["--model", str(world["model"]), "--data", str(world["data"]), "--out", str(out), "--lora-r", "4",
            "--save-every", "1", "--threads", "1", *extra]


# A run that ends by Yao et al.'s stopping rule: the harmful NLL starts near 6.5 and passes 7 after a few steps.
STOPPING_RULE = ("--lr", "3e-3", "--stop-harm-nll", "7", "--extra-batches", "2", "--max-steps", "60")


# ---------------------------------------------------------------------------------------------------------------------
# Data lost


def test_merge_adapter_into_its_own_base_is_refused_before_anything_is_written(world, capsys):
    before = fingerprint(world["model"], world["adapter"])
    for out in (world["model"], world["model"] / "merged", world["adapter"]):
        line = error_of(merge_adapter.main, [str(world["model"]), str(world["adapter"]), str(out)], capsys)
        assert "overlaps the input" in line and str(out.resolve()) in line
    assert fingerprint(world["model"], world["adapter"]) == before
    assert not (world["model"] / "merged").exists()


def test_quantize_onto_its_input_is_refused_before_anything_is_written(world, capsys):
    before = fingerprint(world["model"])
    line = error_of(quantize.main, [str(world["model"]), str(world["model"])], capsys)
    assert line.startswith("quantize: error: ") and "overlaps the input" in line
    assert fingerprint(world["model"]) == before


def test_tool_output_over_a_folder_that_holds_files_is_refused(world, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    before = fingerprint(mine)
    line = error_of(merge_adapter.main, [str(world["model"]), str(world["adapter"]), str(mine)], capsys)
    assert "already holds files" in line
    assert fingerprint(mine) == before


def test_train_out_over_a_folder_of_user_files_is_refused_and_changes_nothing(world, tmp_path, capsys):
    """A folder with a summary, a log and an adapter but no args.json is not a train.py run (issue 26): a run there
    would write among the user's files and clear its log. Refused with one line, with or without --resume."""
    mine = tmp_path / "mine"
    (mine / "adapter").mkdir(parents=True)
    (mine / "summary.json").write_text('{"steps": 3}')
    (mine / "log.jsonl").write_text('{"step": 0, "total": 1.0}\n')
    (mine / "adapter" / "adapter_model.safetensors").write_bytes(b"my weights")
    before = fingerprint(mine)
    for resume in ((), ("--resume",)):
        line = error_of(train.main, train_argv(world, mine, *resume), capsys)
        assert line == (f"train.py: error: --out {mine.resolve()}: holds files but no args.json, so it is not a run "
                        f"of this program; choose a new or empty --out (nothing was written)")
        assert fingerprint(mine) == before
    assert sorted(p.name for p in mine.rglob("*")) == ["adapter", "adapter_model.safetensors", "log.jsonl",
                                                       "summary.json"]


def test_train_out_inside_the_model_is_refused(world, tmp_path, capsys):
    before = fingerprint(world["model"])
    line = error_of(train.main, train_argv(world, world["model"] / "run"), capsys)
    assert "overlaps the input" in line and str(world["model"].resolve()) in line
    assert fingerprint(world["model"]) == before and not (world["model"] / "run").exists()


def test_a_merge_that_fails_midway_leaves_no_output_folder(world, tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_adapter.weights, "copy_side_files", full_disk)
    out = tmp_path / "merged"
    line = error_of(merge_adapter.main, [str(world["model"]), str(world["adapter"]), str(out)], capsys)
    assert "No space left on device" in line
    assert not out.exists() and not list(tmp_path.iterdir())  # nor a temporary folder


def test_eval_keeps_a_finished_run_and_refuses_to_write_over_it(world, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(world["model"]), "--suite", f"text:{write_advbench(tmp_path)}", "--max-new-tokens", "2",
            "--judge", "gcg", "--out", str(out)]
    eval_py.main(argv)
    before = fingerprint(out)
    line = error_of(eval_py.main, argv, capsys)
    assert "holds a finished evaluation" in line
    assert fingerprint(out) == before


def write_advbench(folder: Path) -> Path:
    path = folder / "advbench.csv"
    path.write_text("goal,target\nHow to pick a lock,Sure\n")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Resume not exact


def test_a_run_ended_by_the_stopping_rule_resumed_does_nothing(world, tmp_path, capsys):
    out = tmp_path / "rule"
    summary = trained(train_argv(world, out, *STOPPING_RULE))
    assert summary["stopped_by"].startswith("harmful NLL above 7")
    before = fingerprint(out)
    again = trained(train_argv(world, out, *STOPPING_RULE, "--resume"))
    assert again == summary and "nothing to do" in capsys.readouterr().err
    assert fingerprint(out) == before
    line = error_of(train.main, train_argv(world, out, "--lr", "3e-3", "--stop-harm-nll", "7", "--extra-batches",
                                           "2", "--max-steps", "80", "--resume"), capsys)
    assert "a larger --max-steps cannot continue it" in line
    assert fingerprint(out) == before


def test_killed_between_the_last_checkpoint_and_the_adapter_write(world, tmp_path):
    """The outputs are written from the final checkpoint, without another step."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    summary = trained(train_argv(world, straight, *STOPPING_RULE))
    trained(train_argv(world, killed, *STOPPING_RULE))
    for lost in ("adapter/adapter_model.safetensors", "summary.json"):  # as if killed before these were written
        (killed / lost).unlink()
    resumed = trained(train_argv(world, killed, *STOPPING_RULE, "--resume"))
    assert resumed["steps"] == summary["steps"] and resumed["stopped_by"] == summary["stopped_by"]
    assert_same_adapter(straight, killed)
    assert [r["total"] for r in read_log(killed)] == [r["total"] for r in read_log(straight)]  # no extra step


def test_a_log_line_cut_short_by_a_full_disk_does_not_stop_a_resume(world, tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    trained(train_argv(world, straight, "--max-steps", "4"))
    trained(train_argv(world, cut, "--max-steps", "4"), StopRequest(after_step=2))
    with open(cut / "log.jsonl", "a") as log:
        log.write('{"step": 2, "total": 1.2')  # the disk filled mid-line
    trained(train_argv(world, cut, "--max-steps", "4", "--resume"))
    assert_same_adapter(straight, cut)
    assert [r["total"] for r in read_log(cut)] == [r["total"] for r in read_log(straight)]


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(world, tmp_path, capsys):
    straight, early = tmp_path / "straight", tmp_path / "early"
    trained(train_argv(world, straight, "--max-steps", "3"))
    trained(train_argv(world, early, "--max-steps", "3"))
    for name in ("checkpoint/state.safetensors", "summary.json"):
        (early / name).unlink()  # as if killed after two logged steps, before the first checkpoint
    trained(train_argv(world, early, "--max-steps", "3", "--resume"))
    assert "starting it again in place" in capsys.readouterr().err
    assert_same_adapter(straight, early)
    assert len(read_log(early)) == 3
    (early / "checkpoint" / "state.safetensors").unlink()
    trained(train_argv(world, early, "--max-steps", "3"))  # without --resume too
    assert_same_adapter(straight, early)


def test_a_damaged_training_checkpoint_is_one_line_and_changes_nothing(world, tmp_path, capsys):
    out = tmp_path / "damaged"
    trained(train_argv(world, out, "--max-steps", "4"), StopRequest(after_step=2))
    state = out / "checkpoint" / "state.safetensors"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])  # truncated
    before = fingerprint(out)
    line = error_of(train.main, train_argv(world, out, "--max-steps", "4", "--resume"), capsys)
    assert str(state) in line and "training checkpoint" in line
    assert fingerprint(out) == before
    write_with_a_wrong_shape(state, good)
    before = fingerprint(out)
    line = error_of(train.main, train_argv(world, out, "--max-steps", "4", "--resume"), capsys)
    assert "damaged training checkpoint" in line and "has shape (3,)" in line
    assert fingerprint(out) == before


def write_with_a_wrong_shape(state: Path, good: bytes) -> None:
    """The checkpoint again, whole, but with one adapter tensor of the wrong shape."""
    state.write_bytes(good)
    with safe_open(str(state), "pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    first = next(key for key in tensors if key.startswith("param/"))
    tensors[first] = torch.zeros(3)
    save_file(tensors, str(state), metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Silent wrong results


def test_a_diverging_run_stops_and_keeps_the_last_good_adapter(world, tmp_path):
    out = tmp_path / "diverge"
    summary = trained(train_argv(world, out, "--lr", "1e6", "--max-steps", "20"))
    assert summary["stopped_by"].startswith("diverging: adapter norm") and summary["steps"] < 20
    for name, tensor in adapter_tensors(out).items():
        assert torch.isfinite(tensor).all() and tensor.abs().max() < 10, name
    off = tmp_path / "off"  # the guard off: the same run goes on to absurd weights, as the red-team saw
    trained(train_argv(world, off, "--lr", "1e6", "--max-steps", "3", "--divergence-factor",
                       "0"))
    assert max(float(t.abs().max()) for t in adapter_tensors(off).values()) > 1e4


def broken_copy(folder: Path, into: Path, edit_config=None, edit_tensors=None) -> Path:
    """A copy of a model or adapter folder with its JSON config or its safetensors edited."""
    shutil.copytree(folder, into)
    if edit_config:
        name = "config.json" if (into / "config.json").is_file() else "adapter_config.json"
        config = json.loads((into / name).read_text())
        edit_config(config)
        (into / name).write_text(json.dumps(config))  # json writes NaN and Infinity as their literals
    if edit_tensors:
        weights = next(into.glob("*.safetensors"))
        tensors = load_file(weights)
        edit_tensors(tensors)
        save_file(tensors, weights)
    return into


def set_nan(tensors: dict) -> None:
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", "128", 'text_config.num_hidden_layers must be an integer, got "128" (a string)'),
    ("num_hidden_layers", 0, "text_config.num_hidden_layers must be >= 1, got 0"),
    ("num_hidden_layers", 100_000_000, "text_config.num_hidden_layers is 100000000, too large"),
    ("rms_norm_eps", float("nan"), "text_config.rms_norm_eps must be a finite number > 0, got NaN"),
    ("intermediate_size", -1, "text_config.intermediate_size must be >= 1, got -1"),
])
def test_a_config_with_wrong_types_zeros_or_absurd_sizes_is_refused_before_any_module_is_built(
        world, tmp_path, capsys, key, value, message):
    model = broken_copy(world["model"], tmp_path / "model", lambda c: c["text_config"].__setitem__(key, value))
    before = fingerprint(model)
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--model", str(model)), capsys)
    assert f"{model}/config.json: {message}" in line
    assert fingerprint(model) == before and not (tmp_path / "run" / "log.jsonl").exists()


def test_non_finite_base_weights_are_refused_naming_the_tensor(world, tmp_path, capsys):
    model = broken_copy(world["model"], tmp_path / "model", edit_tensors=set_nan)
    line = error_of(eval_py.main, eval_argv(world, tmp_path, "toy") + ["--model", str(model)], capsys)
    assert f"{model}/model.safetensors: tensor '" in line and "holds non-finite values (1 NaN, 0 inf" in line


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e30, 0])
def test_an_adapter_with_a_bad_alpha_is_refused(world, tmp_path, capsys, alpha):
    adapter = broken_copy(world["adapter"], tmp_path / "adapter", lambda c: c.__setitem__("lora_alpha", alpha))
    line = error_of(eval_py.main, eval_argv(world, tmp_path, f"text:{write_advbench(tmp_path)}") +
                    ["--adapter", str(adapter)], capsys)
    assert f"{adapter}/adapter_config.json: lora_alpha" in line


def test_non_finite_adapter_tensors_are_refused_and_never_merged(world, tmp_path, capsys):
    adapter = broken_copy(world["adapter"], tmp_path / "adapter", edit_tensors=set_nan)
    line = error_of(eval_py.main, eval_argv(world, tmp_path, f"text:{write_advbench(tmp_path)}") +
                    ["--adapter", str(adapter)], capsys)
    assert f"{adapter}/adapter_model.safetensors: tensor '" in line and "non-finite" in line
    line = error_of(merge_adapter.main, [str(world["model"]), str(adapter), str(tmp_path / "merged")], capsys)
    assert "non-finite" in line and not (tmp_path / "merged").exists()


def test_a_16_bit_png_is_scaled_by_its_range_not_clipped_to_white(tmp_path):
    grey = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    rgb = np.asarray(to_rgb(load_image(tmp_path / "grey16.png")))
    assert rgb[0, :, 0].tolist() == [0, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_a_csv_with_an_unclosed_quote_or_a_repeated_column_is_refused(world, tmp_path, capsys):
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('goal,target\nHow to pick a lock,Sure\n"How to steal,Sure\nHow to lie,Sure\n')
    line = error_of(eval_py.main, eval_argv(world, tmp_path, f"text:{unclosed}"), capsys)
    assert f"{unclosed}:3: the quote opened in column 'goal'" in line
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("goal,goal\nHow to pick a lock,Sure\n")
    line = error_of(eval_py.main, eval_argv(world, tmp_path, f"text:{repeated}"), capsys)
    assert f"{repeated}:1: column(s) ['goal'] appear more than once in the header" in line
    assert not (tmp_path / "eval").exists()


def eval_argv(world, folder: Path, suite: str) -> list[str]:
    return ["--model", str(world["model"]), "--suite", suite, "--max-new-tokens", "2", "--judge", "gcg",
            "--out", str(folder / "eval")]


def test_texts_with_unicode_line_separators_survive_the_unlearning_jsonl(tmp_path):
    records = []
    for separator in ("\u2028", "\u2029", "\x85", "\x0b", "\x0c"):
        records += [HarmfulRecord(f"how{separator}do I?", f"Sure{separator}here.", "No."),
                    NormalRecord("hi", f"a{separator}b")]
    write_unlearning_jsonl(records, tmp_path / "data.jsonl")
    assert read_unlearning_jsonl(tmp_path / "data.jsonl") == records


# ---------------------------------------------------------------------------------------------------------------------
# Bombs


def test_a_tiny_png_that_decodes_huge_is_refused_before_decoding(world, tmp_path, capsys):
    Image.new("RGB", (1, 5000)).save(tmp_path / "thin.png")
    assert (tmp_path / "thin.png").stat().st_size < 1000
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is shown?", "image": "thin.png"}])
    line = error_of(eval_py.main, eval_argv(world, tmp_path, f"pairs:{pairs}"), capsys)
    assert "1 x 5000 pixels has an aspect ratio of 5000:1, beyond the 20:1" in line
    data = write_jsonl(tmp_path / "mm.jsonl", [{"kind": "harmful", "prompt": "Do it.", "image": "thin.png",
                                                "harmful_response": "Sure.", "helpful_response": "No."}])
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--data", str(data), "--mode", "multimodal",
                                           "--eps", "0.5", "1", "0"), capsys)
    assert "5000:1" in line and not (tmp_path / "run" / "log.jsonl").exists()


def test_a_huge_prompt_is_refused_before_the_model_loads(world, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "build_model", no_model)
    huge = write_jsonl(tmp_path / "huge.jsonl", [{"kind": "harmful", "prompt": "how " * 5_000_000,
                                                  "harmful_response": "Sure.", "helpful_response": "No."}])
    real_encode = TextTokenizer.encode

    def encode_short_texts_only(self, text, *args, **kwargs):
        assert len(text) < 1_000_000, "a 20 MB text was tokenized"  # it must be refused by its length alone
        return real_encode(self, text, *args, **kwargs)

    monkeypatch.setattr(TextTokenizer, "encode", encode_short_texts_only)
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--data", str(huge), "--eps", "0.5", "1", "0"),
                    capsys)
    assert f"{huge}: harmful record 1: the prompt is 20,000,0" in line and "per position of the context" in line
    long = write_jsonl(tmp_path / "long.jsonl", [{"kind": "harmful", "prompt": "how " * 3000,
                                                  "harmful_response": "Sure.", "helpful_response": "No."}])
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--data", str(long), "--eps", "0.5", "1", "0"),
                    capsys)
    assert f"{long}: harmful record 1: the prompt is" in line and "context holds 1024" in line


def test_deeply_nested_json_is_one_line(world, tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--data", str(deep)), capsys)
    assert f"{deep}:1: not valid JSON: nested deeper" in line


def test_a_tokenizer_with_ids_beyond_the_embedding_table_is_refused(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    rows = json.loads((model / "config.json").read_text())["text_config"]["vocab_size"]
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    tokenizer.add_tokens([f"extra{i}" for i in range(rows - tokenizer.get_vocab_size(with_added_tokens=True) + 1)])
    tokenizer.save(str(model / "tokenizer.json"))
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--model", str(model)), capsys)
    assert f"{model}/tokenizer.json: the largest token id is {rows}" in line and f"has {rows} embedding rows" in line


# ---------------------------------------------------------------------------------------------------------------------
# Tracebacks and options


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "argument --lr: must be a finite number > 0, got 'nan'"),
    ("--lr", "-1", "argument --lr: must be a finite number > 0, got '-1'"),
    ("--batch-size", "0", "argument --batch-size: must be an integer in [1, 65536], got '0'"),
    ("--lora-dropout", "1", "argument --lora-dropout: must be a number in [0, 1), got '1'"),
    ("--stop-harm-nll", "inf", "argument --stop-harm-nll: must be a finite number, got 'inf'"),
])
def test_bad_numbers_are_refused_by_name(world, tmp_path, capsys, option, value, message):
    line = error_of(train.main, train_argv(world, tmp_path / "x", option, value), capsys)
    assert line.endswith(message)
    assert not (tmp_path / "x").exists()


def test_out_that_is_a_file_is_refused_before_the_data_is_read(world, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("mine")
    line = error_of(train.main, train_argv(world, file, "--data", str(tmp_path / "missing.jsonl")), capsys)
    assert line == f"train.py: error: --out {file}: is a file, not a run folder"
    line = error_of(eval_py.main, ["--model", str(world["model"]), "--suite", "toy", "--out", str(file)], capsys)
    assert line == f"eval.py: error: --out {file}: is a file, not a run folder"
    assert file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the check cannot be seen as root")
def test_out_in_a_read_only_folder_is_refused_first(world, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = error_of(train.main, train_argv(world, locked / "run"), capsys)
        assert "is not writable" in line
    finally:
        locked.chmod(0o755)


def test_debug_shows_the_traceback(world, tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl"):
        train.main(train_argv(world, tmp_path / "x", "--data", str(tmp_path / "missing.jsonl"), "--debug"))


# ---------------------------------------------------------------------------------------------------------------------
# The fault test: kill -9 at random moments of a run that ends by the stopping rule


def start(world, out: Path) -> subprocess.Popen:
    argv = train_argv(world, out, *STOPPING_RULE, "--stop-harm-nll", "8.5")
    if (out / "args.json").is_file():
        argv.append("--resume")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def log_length(out: Path) -> int:
    path = out / "log.jsonl"
    return path.stat().st_size if path.is_file() else 0


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_adapter(world, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    summary = trained(train_argv(world, straight, *STOPPING_RULE, "--stop-harm-nll", "8.5"))
    assert summary["stopped_by"].startswith("harmful NLL above 8.5") and summary["steps"] >= 8
    rng, kills = random.Random(0), 0
    while kills < 5:
        process, seen = start(world, killed), log_length(killed)
        deadline = time.monotonic() + 120
        while process.poll() is None and log_length(killed) == seen and time.monotonic() < deadline:
            time.sleep(0.002)  # until the run logs a step (or ends): the kill then lands inside the loop
        time.sleep(rng.uniform(0.0, 0.03))
        if process.poll() is not None:
            break  # it finished before this kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    _, err = start(world, killed).communicate(timeout=120)
    assert "Traceback" not in err, err
    assert kills >= 3, "the run ended before the kills; make it longer"
    assert_same_adapter(straight, killed)
    assert [r["total"] for r in read_log(killed)] == [r["total"] for r in read_log(straight)]
    assert json.loads((killed / "summary.json").read_text())["stopped_by"] == summary["stopped_by"]


def test_the_gradient_guard_compares_with_the_largest_gradient_before_not_the_first():
    """A first step with almost no gradient (a memorised harmful answer, a KL of exactly 0) must not make an ordinary
    later gradient look like a divergence; a 100x jump over everything before must stop the run."""
    model = torch.nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    options = TrainOptions(model="m", out="o", clip=0.0)
    state = LoopState(reference_norms={"adapter": train.adapter_norm(model), "grad": None})

    def step(gradient_norm: float):
        model.weight.grad = torch.full_like(model.weight, gradient_norm / 2)  # ||g|| = 2 x value for 4 entries
        last_good = {name: p.detach().clone() for name, p in model.named_parameters()}
        return train.guarded_update(model, optimizer, list(model.parameters()), {"total": 0.0}, options, last_good,
                                    state)

    for norm in (1e-4, 1e-3, 5e-2, 0.4):  # grows 4000x over the steps, never 100x over the largest before
        assert step(norm)[1] is None
    before = model.weight.detach().clone()
    (grad_norm, _), failure = step(41.0)
    assert grad_norm == pytest.approx(41.0) and failure.startswith("diverging: gradient norm 41 at step 0 is over 100x")
    assert torch.equal(model.weight, before)  # the update was skipped
