"""The red-team catalogue, train part (issue 26): bad inputs and faults on train.py's surfaces, each kept as a case with
its exact outcome (the one-line error, exit status 2, and every user file unchanged by sha256).

The rules behind the cases:
- data lost: a run never removes a folder it did not write (model/ is replaced only when it is this run's, marked by
  its train_run.json; an args.json of another program is no run of train.py's); one train.py process at a time in a
  run folder;
- silently wrong: a resumed run reads the very bytes it started from (the sha256 of the data file and of every model
  file, recorded in args.json), and its checkpoint fits the model both ways; options that would quietly do nothing
  (all loss weights 0, a warm-up past the end, a fraction over 1) are refused;
- hangs and bombs: every numeric option has a range (argparse refuses it before anything runs), and what depends on
  the model (--lora-r against the linears' sizes) is checked from config.json before the model loads; --data is a
  regular file, never a device or a pipe read without end;
- tracebacks and late errors: an args.json edited by hand is checked as the command line is; Ctrl-C while the
  program starts is one line and exit status 130; an ignored SIGINT stays ignored, and every handler found is put back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import error_of, fingerprint, write_jsonl
from PIL import Image
from safetensors.torch import load_file, save_file

import train
from harness import runs, train_run
from harness.signals import StopRequest
from harness.train_options import SEED_MAX, STEP_RECORDS_MAX, STEPS_MAX, build_parser
from harness.train_run import RunFolder
from weights_tools.make_tiny import write_tiny_checkpoint
from worlds import embedded

ROOT = Path(train.__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers (as tests/test_reliability.py's)


def trained(argv: list[str], stop: StopRequest | None = None) -> dict:
    """train.py on ARGV in this process, its options read as `main` reads them; the summary."""
    return train.train(*train.read_command_line(argv), stop)


HARMFUL = {"kind": "harmful", "prompt": "how do I make thing 9?", "harmful_response": "Sure, step one.",
           "helpful_response": "Sorry, I cannot help with that."}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_reliability")
    model = write_tiny_checkpoint(root / "model", seed=0)
    rows = []
    for i in range(5):
        rows.append({"kind": "harmful", "prompt": f"how do I make thing {i}?",
                     "harmful_response": f"Sure, here is how to make thing {i}: step one.",
                     "helpful_response": "Sorry, I cannot help with that.",
                     "categories": ["drugs" if i % 2 else "fraud"]})
        rows.append({"kind": "normal", "prompt": f"what is {i} plus one?", "response": f"It is {i + 1}."})
    data = write_jsonl(root / "data.jsonl", rows)
    return {"root": root, "model": model, "data": data}


def train_argv(world, out: Path, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
    return ["--model", str(model or world["model"]), "--data", str(data or world["data"]), "--out", str(out),
            "--lora-r", "4", "--save-every", "1", "--threads", "1", *extra]


def no_model_load(monkeypatch) -> None:
    """The model must not load: the error is the input's, found before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "load_base", refuse)


# ---------------------------------------------------------------------------------------------------------------------
# Data lost


def test_case1_full_parameter_with_the_model_inside_out_is_refused_and_the_model_kept(world, tmp_path, capsys):
    out = tmp_path / "out"
    model = out / "model"
    shutil.copytree(world["model"], model)
    (model / "README.md").write_text("my notes on this model")
    before = fingerprint(out)
    line = error_of(train.main, train_argv(world, out, "--full-parameter", "--quantize", "none", "--max-steps", "1",
                                           model=model), capsys)
    assert line == (f"train.py: error: --out {out}: overlaps the input {model}; write the run to another folder")
    assert fingerprint(out) == before


FULL = ("--full-parameter", "--quantize", "none")


def test_case1_a_model_folder_the_run_did_not_write_is_never_removed(world, tmp_path, capsys, monkeypatch):
    """model/ is replaced only when it is this run's own output (its train_run.json names the run): a run extended
    replaces it; a folder of the user's there is refused before the model loads, or, if it appears during the run,
    when the outputs are written (the checkpoint kept: the run writes them on --resume once it is moved away)."""
    out = tmp_path / "full"
    trained(train_argv(world, out, *FULL, "--max-steps", "1"))
    run_id = json.loads((out / "args.json").read_text())["provenance"]["run_id"]
    assert json.loads((out / "model" / "train_run.json").read_text()) == {"run_id": run_id, "step": 1}
    trained(train_argv(world, out, *FULL, "--max-steps", "2", "--resume"))
    assert json.loads((out / "model" / "train_run.json").read_text()) == {"run_id": run_id, "step": 2}

    shutil.rmtree(out / "model")
    shutil.copytree(world["model"], out / "model")  # the user's model in its place (merged, edited, ...)
    (out / "model" / "README.md").write_text("my model")
    before = fingerprint(out)
    no_model_load(monkeypatch)
    line = error_of(train.main, train_argv(world, out, *FULL, "--max-steps", "3", "--resume"), capsys)
    assert line == (f"train.py: error: --out {out}: holds a model/ this run did not write, where a full-parameter run "
                    f"writes its model; move that folder away, or choose another --out (nothing was written)")
    assert fingerprint(out) == before
    monkeypatch.undo()

    appears = tmp_path / "appears"
    real_save_outputs = RunFolder.save_outputs

    def user_folder_appears(self, *args):
        shutil.copytree(world["model"], self.path / "model")
        return real_save_outputs(self, *args)

    monkeypatch.setattr(RunFolder, "save_outputs", user_folder_appears)
    line = error_of(train.main, train_argv(world, appears, *FULL, "--max-steps", "1"), capsys)
    assert line.endswith(f"move that folder away, or then python train.py --resume --out {appears} writes the model "
                         f"from the run's last checkpoint")
    assert {p.name: p.read_bytes() for p in (appears / "model").iterdir()} == \
        {p.name: p.read_bytes() for p in world["model"].iterdir()}  # the user's folder, as it was
    monkeypatch.undo()
    shutil.move(appears / "model", tmp_path / "moved")
    summary = trained(train_argv(world, appears, *FULL, "--max-steps", "1", "--resume"))
    assert summary["steps"] == 1 and (appears / "model" / "train_run.json").is_file()


def test_case1_a_failed_model_write_keeps_the_previous_model(world, tmp_path, capsys, monkeypatch):
    """The new model/ is written whole beside the old one and renamed into place: a full disk midway keeps the run's
    previous model (the old code removed it first), and leaves no temporary folder."""
    out = tmp_path / "full"
    trained(train_argv(world, out, *FULL, "--max-steps", "1"))
    before = fingerprint(out / "model")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_run, "copy_side_files", full_disk)
    line = error_of(train.main, train_argv(world, out, *FULL, "--max-steps", "2", "--resume"), capsys)
    assert line == "train.py: error: [Errno 28] No space left on device"
    assert fingerprint(out / "model") == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_an_args_json_of_another_program_is_no_run_and_nothing_is_removed(world, tmp_path, capsys):
    """args.json is a common name (transformers' Trainer writes one): a folder holding one, a log.jsonl and
    adapter-step<N>/ of the user's was taken for a train.py run stopped before its first checkpoint, and restarted in
    place: its log.jsonl, args.json and adapter-step5/ were replaced or removed."""
    mine = tmp_path / "mine"
    (mine / "adapter-step5").mkdir(parents=True)
    (mine / "args.json").write_text('{"learning_rate": 0.1, "output_dir": "mine"}')
    (mine / "log.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    (mine / "adapter-step5" / "adapter_model.safetensors").write_bytes(b"my weights")
    before = fingerprint(mine)
    for resume in ((), ("--resume",)):
        line = error_of(train.main, train_argv(world, mine, "--max-steps", "1", *resume), capsys)
        assert line == (f"train.py: error: {mine}/args.json: not the args.json of a train.py run (it has no model, "
                        f"data, out, mode, lora_r, max_steps); choose a new or empty --out (nothing was written)")
    assert fingerprint(mine) == before


def test_a_second_train_py_in_the_same_run_folder_is_refused(world, tmp_path, capsys):
    """A job started again while it still runs would append to the same log and write over the same checkpoint."""
    out = tmp_path / "busy"
    argv = train_argv(world, out, "--max-steps", "2000", "--save-every", "1000")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        for again in ((), ("--resume",)):
            line = error_of(train.main, train_argv(world, out, "--max-steps", "2000", *again), capsys)
            assert line == (f"train.py: error: --out {out}: another train.py process is running in it; wait for it "
                            f"to end (or stop it: Ctrl-C or SIGTERM checkpoints), or choose another --out (nothing "
                            f"was written)")
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert trained(train_argv(world, out, "--max-steps", "2000", "--resume"), StopRequest(after_step=0))


def test_two_sigterms_during_the_checkpoint_write_keep_the_previous_checkpoint(world, tmp_path, capsys, monkeypatch):
    """Behaved: the first signal only asks for a stop; the second interrupts the write, whose temporary file goes,
    and the checkpoint before it stays whole: the resumed run ends with the uninterrupted run's adapter."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    trained(train_argv(world, straight, "--max-steps", "4"))
    real_save_file, writes = runs.save_file, []

    def signalled_midway(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 3:  # the checkpoint after step 3
            Path(path).write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler raises KeyboardInterrupt here
        return real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(runs, "save_file", signalled_midway)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(world, out, "--max-steps", "4"))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train.py: stopped at once; python train.py --resume --out {out} continues from the last checkpoint, if one "
        f"was written")
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["state.safetensors"]  # no temporary file
    monkeypatch.undo()
    assert runs.read_checkpoint_state(out / "checkpoint")["step"] == 2
    trained(train_argv(world, out, "--max-steps", "4", "--resume"))
    first, second = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, out))
    assert all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------------------------------------------------------------
# Silently wrong: a resumed run must read what it started from


def perturb_weights(model: Path) -> None:
    tensors = load_file(model / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, model / "model.safetensors")


def add_a_layer(model: Path) -> None:
    shutil.rmtree(model)
    write_tiny_checkpoint(model, seed=0, text_layers=3)


@pytest.mark.parametrize("edit, changed", [
    ("data", "data"),
    (perturb_weights, "model/model.safetensors"),
    (add_a_layer, "model/config.json, model/model.safetensors"),
])
def test_case7_resume_refuses_inputs_changed_under_the_same_path(world, tmp_path, capsys, monkeypatch, edit, changed):
    """The data file edited in place, the model's weights changed, the model given another layer: the run would train
    half on each (a new layer's adapters from scratch). args.json records the sha256 of the data file and of every
    model file; resume compares them before anything loads and lists what changed."""
    data, model = tmp_path / "data.jsonl", tmp_path / "model"
    shutil.copy(world["data"], data)
    shutil.copytree(world["model"], model)
    out = tmp_path / "run"
    argv = train_argv(world, out, "--max-steps", "4", model=model, data=data)
    assert trained(argv, StopRequest(after_step=2))["interrupted_at"] == 2
    recorded = json.loads((out / "args.json").read_text())["provenance"]["inputs"]
    assert sorted(recorded) == ["data", "model/config.json", "model/model.safetensors", "model/tokenizer.json",
                                "model/tokenizer_config.json"]
    if edit == "data":
        with open(data, "a") as f:
            f.write(json.dumps(HARMFUL) + "\n")
    else:
        edit(model)
    before = fingerprint(out, data, model)
    no_model_load(monkeypatch)
    line = error_of(train.main, argv + ["--resume"], capsys)
    assert line == (f"train.py: error: --resume {out}: the run's inputs changed since it started: {changed} (sha256 "
                    f"differs from args.json, or the file is new or gone); resuming would train half on the old "
                    f"inputs, half on the new. Put the original files back, or start a new run (another --out)")
    assert fingerprint(out, data, model) == before


def test_case7_resume_refuses_an_image_changed_under_the_same_path(world, tmp_path, capsys, monkeypatch):
    """The multimodal baseline reads its records' images: they are inputs as the data file is."""
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    data = write_jsonl(tmp_path / "mm.jsonl", [
        {"kind": "harmful", "prompt": "how do I do what the image shows?", "image": "red.png",
         "harmful_response": "Sure: step one.", "helpful_response": "Sorry, I cannot help with that."},
        {"kind": "normal", "prompt": "what colour is the image?", "image": "red.png", "response": "Red."}])
    out = tmp_path / "run"
    argv = train_argv(world, out, "--mode", "multimodal", "--batch-size", "1", "--max-steps", "4", data=data)
    assert trained(argv, StopRequest(after_step=2))["interrupted_at"] == 2
    Image.new("RGB", (40, 30), (30, 200, 30)).save(image)  # green now, under the same name
    no_model_load(monkeypatch)
    line = error_of(train.main, argv + ["--resume"], capsys)
    assert line.startswith(f"train.py: error: --resume {out}: the run's inputs changed since it started: image "
                           f"{image} (sha256 differs")


def test_case7_a_run_folder_from_before_the_fingerprints_resumes_with_a_note(world, tmp_path, capsys):
    """args.json without provenance.inputs (train.py before this check): what it did record is compared (the data
    file's and config.json's sha256), and one line says the weights could not be; the resume is bit for bit."""
    straight, out = tmp_path / "straight", tmp_path / "old"
    trained(train_argv(world, straight, "--max-steps", "4"))
    assert trained(train_argv(world, out, "--max-steps", "4"), StopRequest(after_step=2))["interrupted_at"] == 2
    args = json.loads((out / "args.json").read_text())
    for key in ("inputs", "run_id"):
        del args["provenance"][key]
    (out / "args.json").write_text(json.dumps(args, indent=1))
    capsys.readouterr()
    summary = trained(train_argv(world, out, "--max-steps", "4", "--resume"))
    assert (f"{out}/args.json: records no sha256 of the model's weights (a run started before train.py kept them): "
            f"resuming without checking they are the ones it started from") in capsys.readouterr().err.splitlines()
    assert summary["steps"] == 4
    first, second = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, out))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_case7_an_old_run_folder_with_a_changed_data_file_is_refused(world, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    shutil.copy(world["data"], data)
    out = tmp_path / "old"
    trained(train_argv(world, out, "--max-steps", "4", data=data), StopRequest(after_step=2))
    args = json.loads((out / "args.json").read_text())
    del args["provenance"]["inputs"]
    (out / "args.json").write_text(json.dumps(args, indent=1))
    with open(data, "a") as f:
        f.write(json.dumps(HARMFUL) + "\n")
    line = error_of(train.main, train_argv(world, out, "--max-steps", "4", "--resume", data=data), capsys)
    assert line.startswith(f"train.py: error: --resume {out}: the run's inputs changed since it started: data (")


def test_case7_a_checkpoint_must_hold_every_trainable_tensor(world, tmp_path, capsys):
    """The checkpoint check is two-sided: a model with a layer more than the checkpoint's (a run folder with nothing
    recorded to compare, as the first train.py wrote them) is refused by name, not trained with fresh adapters."""
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    out = tmp_path / "run"
    trained(train_argv(world, out, "--max-steps", "4", model=model), StopRequest(after_step=2))
    args = json.loads((out / "args.json").read_text())
    del args["provenance"]
    (out / "args.json").write_text(json.dumps(args, indent=1))
    add_a_layer(model)
    before = fingerprint(out)
    line = error_of(train.main, train_argv(world, out, "--max-steps", "4", "--resume", model=model), capsys)
    assert line == (f"train.py: error: {out}/checkpoint/state.safetensors: a damaged training checkpoint, or one of "
                    f"another model (ValueError: 14 of the model's 42 trainable tensors are not in it (e.g. "
                    f"'language_model.layers.2.mlp.down_proj.lora_A.weight'): it was saved from another model, or "
                    f"with other --lora-targets)")
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------------------------------------------
# Silently wrong: options that would quietly do nothing, or less than they say


@pytest.mark.parametrize("extra, message", [
    (("--category-fraction", "1.5"), "argument --category-fraction: must be a number in (0, 1], got '1.5'"),
    (("--eps", "0", "0", "0"), "--eps 0 0 0: every term the textual mode trains on has weight 0, so the run would "
                               "learn nothing; give a term a weight"),
    (("--mode", "sft", "--eps", "0.5", "0", "0"), "--eps 0.5 0 0: every term the sft mode trains on has weight 0 "
                                                   "(sft ignores eps1), so the run would learn nothing; give a term a "
                                                   "weight"),
    (("--warmup", "100", "--max-steps", "10"), "--warmup 100 is more than --max-steps 10: the learning rate would "
                                               "never reach --lr 0.0002; warm up over fewer steps"),
])
def test_options_that_would_quietly_do_nothing_are_refused(world, tmp_path, capsys, extra, message):
    line = error_of(train.main, train_argv(world, tmp_path / "run", *extra), capsys)
    assert line.endswith(f"error: {message}")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Hangs and bombs; every numeric option has a range


@pytest.mark.parametrize("option, value, message", [
    ("--seed", str(2**63), f"must be an integer in [0, {SEED_MAX}]"),
    ("--seed", "1e15", f"must be an integer in [0, {SEED_MAX}]"),
    ("--category-seed", "-1", f"must be an integer in [0, {SEED_MAX}]"),
    ("--threads", str(2**40), "must be an integer in [1, 1024]"),
    ("--lora-r", str(10**6), "must be an integer in [1, 65536]"),
    ("--batch-size", str(10**7), "must be an integer in [1, 65536]"),
    ("--grad-accum", str(10**7), "must be an integer in [1, 65536]"),
    ("--max-steps", "0", f"must be an integer in [1, {STEPS_MAX}]"),
    ("--max-steps", str(10**30), f"must be an integer in [1, {STEPS_MAX}]"),
    ("--extra-batches", str(10**18), f"must be an integer in [0, {STEPS_MAX}]"),
    ("--save-every", "1" + "0" * 400, f"must be an integer in [1, {STEPS_MAX}]"),  # was an OverflowError traceback
    ("--lora-alpha", "inf", "must be a finite number > 0"),
    ("--weight-decay", "nan", "must be a finite number >= 0"),
])
def test_case20_numbers_out_of_range_are_refused_by_argparse(world, tmp_path, capsys, option, value, message):
    line = error_of(train.main, train_argv(world, tmp_path / "run", option, value), capsys)
    assert line.endswith(f"error: argument {option}: {message}, got '{value}'")
    assert not (tmp_path / "run").exists()


def test_case20_every_numeric_option_has_a_range():
    """The audit, kept: every option that takes a number has a type with a range. The integer ones are bounded both
    ways (10**30 is refused; the seeds stop at 2**63 - 1, a signed 64-bit integer torch.manual_seed takes); the
    others must be finite, and what a large finite value does is caught by the run itself (a loss or adapter gone
    non-finite, or diverging, stops the run with the last good adapter: tests/test_reliability.py's guard cases)."""
    numeric = [a for a in build_parser(embedded.DEFAULT_WORLD)._actions if a.type is not None]
    integers = {a.dest for a in numeric if a.type.__name__.startswith("must be an integer in [")}
    assert integers == {"seed", "category_seed", "lora_r", "batch_size", "grad_accum", "max_steps", "warmup",
                        "extra_batches", "threads", "save_every", "save_adapter_every", "log_every"}
    assert {a.dest for a in numeric} - integers == {"eps", "category_fraction", "lora_alpha", "lora_dropout", "lr",
                                                    "weight_decay", "clip", "divergence_factor", "stop_harm_nll",
                                                    "npo_beta"}
    for action in numeric:
        for text in ("inf", "nan", "-inf") + ((str(10**30), "-" + str(10**30)) if action.dest in integers else ()):
            with pytest.raises(Exception) as refused:
                action.type(text)
            assert type(refused.value).__name__ == "ArgumentTypeError", (action.dest, text)


def test_case20_the_largest_seed_trains(world, tmp_path):
    """--seed 10**15 and 2**63 - 1 overflowed in the data streams after the model loaded (seed * 100003 + epoch)."""
    for seed in (10**15, SEED_MAX):
        summary = trained(train_argv(world, tmp_path / str(seed), "--max-steps", "1", "--seed", str(seed),
                                     "--category-fraction", "0.5", "--category-seed", str(SEED_MAX)))
        assert summary["steps"] == 1


def test_a_step_larger_than_the_bound_is_refused(world, tmp_path, capsys):
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--batch-size", "4096", "--grad-accum", "4096"),
                    capsys)
    assert line == (f"train.py: error: --batch-size 4096 x --grad-accum 4096 is 16,777,216 records of each kind per "
                    f"step on each rank, more than {STEP_RECORDS_MAX:,}; take fewer")


def test_a_lora_rank_above_the_linears_is_refused_before_the_model_loads(world, tmp_path, capsys, monkeypatch):
    """r x (in + out) per linear: --lora-r 65536 passes argparse, and on a 7B decoder would allocate 448 GiB of
    adapters after the model loaded. B A has rank at most a linear's smaller side: that is the bound."""
    no_model_load(monkeypatch)
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--lora-r", "65536"), capsys)
    assert line == (f"train.py: error: --lora-r 65536 is more than 64, the smaller side of the q_proj linears of "
                    f"{world['model']}: an adapter's update B A has rank at most that; use --lora-r 64 or less")
    line = error_of(train.main, train_argv(world, tmp_path / "run", "--lora-targets", "q_proj", "qproj"), capsys)
    assert line.endswith("error: argument --lora-targets: invalid choice: 'qproj' (choose from 'q_proj', 'k_proj', "
                         "'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')")  # was an error after the load


def test_data_that_is_a_device_or_a_pipe_is_refused_before_it_is_read(world, tmp_path, capsys):
    """--data /dev/zero was read without end (one line, never finished); a FIFO blocked forever."""
    fifo = tmp_path / "records.fifo"
    os.mkfifo(fifo)
    for data in (Path("/dev/zero"), fifo):
        line = error_of(train.main, train_argv(world, tmp_path / "run", data=data), capsys)
        assert line == (f"train.py: error: --data {data}: is not a file (a folder, a device or a pipe); give the "
                        f"unlearning JSONL file")


# ---------------------------------------------------------------------------------------------------------------------
# Tracebacks and late errors


@pytest.mark.parametrize("key, value, message", [
    ("max_steps", "10", "--max-steps takes a number"),
    ("lora_r", -3, "--lora-r must be an integer in [1, 65536], got '-3'"),
    ("lr", 1e400, "--lr must be a finite number > 0, got 'inf'"),
    ("eps", [0.5, 1.0], "--eps takes a list of 3 values"),
    ("mode", "textul", "--mode takes one of textual, multimodal, sft"),
    ("full_parameter", "yes", "--full-parameter is a flag: true or false"),
    ("lora_targets", ["qproj"], "--lora-targets takes one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                "down_proj"),
])
def test_an_args_json_edited_by_hand_is_checked_as_the_command_line_is(world, tmp_path, capsys, key, value, message):
    """A string max_steps was a TypeError traceback; a negative lora_r an error after the model loaded."""
    out = tmp_path / "run"
    trained(train_argv(world, out, "--max-steps", "4"), StopRequest(after_step=2))
    args = json.loads((out / "args.json").read_text())
    args[key] = value
    (out / "args.json").write_text(json.dumps(args, indent=1))
    before = fingerprint(out)
    line = error_of(train.main, ["--out", str(out), "--resume"], capsys)
    assert line == f"train.py: error: {out}/args.json: \"{key}\" is {json.dumps(value)}: {message}"
    assert fingerprint(out) == before


@pytest.mark.parametrize("extra, message", [
    (("--kernel", "attention=unknown"), "unknown implementation 'unknown' of attention; known: ['reference', 'sdpa']"),
    (("--kernels", "nope"), "unknown kernel preset 'nope'; known: ['chunked', 'fast', 'reference']"),
    (("--include-categories", "zzz"),
     "{data}: no harmful record has the categories ['zzz']; known: ['fraud', 'drugs']"),
    (("--data", "{blank}"), "{blank}: no records"),
    (("--data", "{normal}", "--mode", "sft"), "{normal} (mode sft): no harmful records to train on"),
])
def test_behaved_cases_stay_one_line_before_the_model_loads(world, tmp_path, capsys, monkeypatch, extra, message):
    """Cases that behaved when tried (issue 26's extras), kept: a kernel or a category that does not exist, a data
    file of a million blank lines, a data file with no harmful record for sft."""
    blank, normal = tmp_path / "blank.jsonl", tmp_path / "normal.jsonl"
    blank.write_text("\n" * 1_000_000)
    write_jsonl(normal, [{"kind": "normal", "prompt": "hi", "response": "hello"}])
    names = {"data": world["data"], "blank": blank, "normal": normal}
    no_model_load(monkeypatch)
    line = error_of(train.main, train_argv(world, tmp_path / "run", *(e.format(**names) for e in extra)), capsys)
    assert line == f"train.py: error: {message.format(**names)}"


@pytest.mark.parametrize("program", ["train.py", "eval.py"])
def test_case23_ctrl_c_while_a_program_imports_is_one_line_and_status_130(program):
    """The interrupt arrives while `import torch` runs, before any function of the program does: -X importtime prints
    a line as each module's import ends, and the first of torch's (torch imports its own modules first) says the
    program is inside `import torch`."""
    process = subprocess.Popen([sys.executable, "-X", "importtime", str(ROOT / program), "--help"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal runs it
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.rsplit("|", 1)[-1].strip().startswith("torch."):
            process.send_signal(signal.SIGINT)
            break
    lines += process.stderr.readlines()
    process.wait(timeout=60)
    said = [line.rstrip() for line in lines if not line.startswith("import time:")]
    assert process.returncode == 130 and said == [f"{program}: interrupted while starting; nothing was written"], said


def test_case24_stop_request_restores_the_handlers_it_found_and_leaves_an_ignored_sigint_ignored():
    """A shell starts a background job (`cmd &`) with SIGINT ignored, so that a Ctrl-C meant for the foreground does
    not reach it: train.py leaves it so (and still stops on SIGTERM), and puts back whatever it found."""
    def mine(signum, frame):
        raise AssertionError("not reached")

    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, mine)
        stop = StopRequest()
        with stop.on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert not stop.requested(0)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert stop.requested(0) and stop.reason() == "SIGTERM"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, handler in found.items():
            signal.signal(s, handler)
