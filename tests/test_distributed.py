"""train.py beyond one process: one normalisation for every split of a step, and torchrun on the gloo backend.

The reference for each split is the same records in one batch on one process: 2 ranks x batch 4, --grad-accum 2 x
batch 4 and batch 8 must give the same adapter up to float32 rounding (the sums run in another order). Runs with
several ranks go through `python -m torch.distributed.run` in a subprocess, as a user starts them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

import train
from harness.runs import RunError, read_log
from harness.train_options import OptionError
from ref.losses import step_shares, tokens_in_step
from weights_tools.make_tiny import write_tiny_checkpoint

ROOT = Path(train.__file__).resolve().parent


def trained(argv: list[str], stop=None) -> dict:
    """train.py on ARGV in this process, its options read as `main` reads them; the summary."""
    return train.train(*train.read_command_line(argv), stop)
ROUNDING = 1e-6  # float32: the adapters' entries are ~0.1; sums in another order differ in the last bits


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint and records whose responses run from a few tokens to many: the batches of a split step hold
    very different numbers of response tokens."""
    root = tmp_path_factory.mktemp("distributed")
    model = write_tiny_checkpoint(root / "model", seed=0)
    rows = []
    for i in range(8):
        rows.append({"kind": "harmful", "prompt": f"how do I make thing {i}?",
                     "harmful_response": "Sure, here is how: " + "step one. " * (1 + 5 * (i % 2) * i),
                     "helpful_response": "Sorry, I cannot help with that." + " No." * (i * (i % 3))})
        rows.append({"kind": "normal", "prompt": f"what is {i} plus one?",
                     "response": f"It is {i + 1}." + " Yes, it is." * (4 * (i % 2) * i)})
    return {"model": str(model), "data": str(write_jsonl(root / "data.jsonl", rows)), "root": root}


def argv(world, out: Path, *extra: str) -> list[str]:
    """float32 whatever the CPU (its default may be bfloat16): the splits are compared to float32 rounding."""
    return ["--model", world["model"], "--data", world["data"], "--out", str(out), "--lora-r", "4", "--threads", "1",
            "--dtype", "float32", "--save-every", "1", *extra]


def train_here(world, out: Path, *extra: str) -> dict:
    return trained(argv(world, out, *extra))


def torchrun(world, out: Path, *extra: str, ranks: int = 2, script: Path | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(script or ROOT / "train.py"), *argv(world, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_difference(a: Path, b: Path) -> float:
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def logged(out: Path, key: str) -> list[float]:
    return [record[key] for record in read_log(out)]


def test_grad_accum_gives_the_one_batch_step_with_very_different_response_lengths(world, tmp_path):
    """Today's normalisation would average the two micro-batches' means, and the short batch's tokens would weigh as
    much as the long one's: the adapters would differ by far more than rounding."""
    train_here(world, tmp_path / "one", "--batch-size", "2", "--max-steps", "3")
    train_here(world, tmp_path / "accum", "--batch-size", "1", "--grad-accum", "2", "--max-steps", "3")
    assert logged(tmp_path / "one", "tokens") == logged(tmp_path / "accum", "tokens")  # the same records in each step
    assert max_difference(tmp_path / "one", tmp_path / "accum") < ROUNDING
    for key in ("harm_nll", "helpful_nll", "utility_kl"):  # the step's per-token values, whatever the split
        assert logged(tmp_path / "one", key) == pytest.approx(logged(tmp_path / "accum", key), rel=1e-5, abs=1e-7)


def test_the_step_shares_weigh_each_batch_by_its_tokens():
    """Hand values: a term with 8 and 132 tokens in two batches weighs their means 8/140 and 132/140."""
    class Batches:
        def __init__(self, harm, helpful, normal):
            self.counts = {"harm_nll": harm, "helpful_nll": helpful, "utility_kl": normal}

        def response_tokens(self):
            return self.counts

    short, long = Batches(8, 3, 0), Batches(132, 7, 10)
    tokens = tokens_in_step([short, long])  # one process
    assert tokens == {"harm_nll": 140, "helpful_nll": 10, "utility_kl": 10}
    assert step_shares(short, tokens) == {"harm_nll": 8 / 140, "helpful_nll": 0.3}
    assert step_shares(long, tokens) == {"harm_nll": 132 / 140, "helpful_nll": 0.7, "utility_kl": 1.0}
    assert step_shares(short, tokens, ranks=2) == {"harm_nll": 16 / 140, "helpful_nll": 0.6}  # the all-reduce halves


def test_two_ranks_give_the_one_process_adapter_on_the_same_records(world, tmp_path):
    done = torchrun(world, tmp_path / "ranks", "--batch-size", "4", "--max-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    train_here(world, tmp_path / "one", "--batch-size", "8", "--max-steps", "3")
    assert logged(tmp_path / "ranks", "tokens") == logged(tmp_path / "one", "tokens")
    assert max_difference(tmp_path / "ranks", tmp_path / "one") < ROUNDING
    assert logged(tmp_path / "ranks", "harm_nll") == pytest.approx(logged(tmp_path / "one", "harm_nll"), rel=1e-5)
    summary = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    assert summary["ranks"] == 2 and "x 2 ranks" in summary["provenance"]["device"]


def test_a_two_rank_run_interrupted_and_resumed_gives_the_uninterrupted_adapter(world, tmp_path):
    """SIGTERM to torchrun reaches every rank; they stop after the same step (whichever saw it first), rank 0 writes
    the checkpoint, and a resume on two ranks ends where the uninterrupted run ends."""
    options = ("--batch-size", "4", "--max-steps", "60", "--save-every", "1000")
    straight = torchrun(world, tmp_path / "straight", *options)
    assert straight.returncode == 0, straight.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "train.py"), *argv(world, tmp_path / "stopped", *options)]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "stopped" / "log.jsonl", time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "--resume" in err
    stopped_at = len(read_log(tmp_path / "stopped"))
    assert 3 <= stopped_at < 60 and not (tmp_path / "stopped" / "adapter").exists()
    again = torchrun(world, tmp_path / "stopped", *options, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert max_difference(tmp_path / "straight", tmp_path / "stopped") == 0.0
    assert logged(tmp_path / "straight", "tokens") == logged(tmp_path / "stopped", "tokens")
    one = train.read_command_line(argv(world, tmp_path / "stopped", *options[:2], "--max-steps", "70", "--resume"))
    with pytest.raises(RunError, match="trained on 2 rank"):
        train.train(*one)


def test_fsdp_shards_a_dense_base_and_gives_the_one_process_adapter_and_resumes(world, tmp_path):
    dense = ("--quantize", "none", "--batch-size", "4")
    done = torchrun(world, tmp_path / "fsdp", *dense, "--max-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    train_here(world, tmp_path / "one", "--quantize", "none", "--batch-size", "8", "--max-steps", "3")
    assert max_difference(tmp_path / "fsdp", tmp_path / "one") < ROUNDING
    assert json.loads((tmp_path / "fsdp" / "args.json").read_text())["parallel"] == "fsdp"  # a dense base's default
    first = torchrun(world, tmp_path / "resumed", *dense, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = torchrun(world, tmp_path / "resumed", *dense, "--max-steps", "3", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert max_difference(tmp_path / "fsdp", tmp_path / "resumed") == 0.0  # the sharded checkpoint, gathered


def test_full_parameter_training_under_fsdp_gives_the_one_process_model(world, tmp_path):
    full = ("--quantize", "none", "--full-parameter", "--lr", "1e-4")
    done = torchrun(world, tmp_path / "fsdp", *full, "--batch-size", "4", "--max-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    train_here(world, tmp_path / "one", *full, "--batch-size", "8", "--max-steps", "3")
    assert read_log(tmp_path / "one")[0]["utility_kl"] == 0.0  # the frozen copy is the model at step 0
    sharded, single = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("fsdp", "one"))
    base = load_file(Path(world["model"]) / "model.safetensors")
    assert sharded.keys() == single.keys() == base.keys()
    assert max(float((sharded[k] - single[k]).abs().max()) for k in single) < ROUNDING
    changed = [k for k in single if not torch.equal(single[k], base[k])]
    assert changed and all(".layers." in k for k in changed)  # only the decoder layers trained
    assert not (tmp_path / "one" / "adapter").exists()
    with pytest.raises(OptionError, match="--full-parameter trains dense weights"):
        train_here(world, tmp_path / "x", "--full-parameter")


def test_fsdp_on_a_4_bit_base_is_refused(world, tmp_path):
    with pytest.raises(OptionError, match="--parallel fsdp shards dense weights"):
        train_here(world, tmp_path / "x", "--parallel", "fsdp")


def test_one_rank_failing_ends_the_job_with_its_error(world, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "def failing(args):\n"
        "    raise ValueError('rank 1 cannot read its data')\n"
        "if os.environ['RANK'] == '1':\n"
        "    train.read_data = failing\n"
        "train.main(sys.argv[1:])\n")
    started = time.monotonic()
    done = torchrun(world, tmp_path / "failed", "--batch-size", "4", "--max-steps", "50", script=script, timeout=120)
    assert done.returncode != 0 and "rank 1 cannot read its data" in done.stderr
    assert time.monotonic() - started < 60
