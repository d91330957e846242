"""A training run's folder: what train.py writes there and what eval.py (and a resumed train.py) reads back.

    runs/<name>/args.json                    the exact options of the run (a resumed run takes them from here)
                kernels.txt                  the resolved kernel table
                log.jsonl                    one JSON line per optimizer step
                checkpoint/state.safetensors adapter, AdamW moments, RNG states and the loop's position, in one file
                adapter/                     the trained LoRA adapter, in peft's format (ref.adapters)
                adapter-step<N>/             the adapter after step N (train.py --save-adapter-every)
                model/                       instead of adapter/, after --full-parameter: a llava-hf checkpoint,
                                             with train_run.json naming the run that wrote it
                summary.json                 tokens, estimated FLOPs, wall time, peak memory, why the run stopped

Every file but the log is written under a temporary name and renamed into place (harness/files.py), so a crash never
leaves half a file, and a checkpoint is never half old and half new. The log is appended a line per step; a line cut
short by a kill is dropped when the run resumes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ref.config import all_finite, read_json
from ref.distributed import full_tensor, shaped_like
from harness.files import write_atomically
from harness.readers import read_jsonl

ARGS_FILE, SUMMARY_FILE, LOG_FILE, KERNELS_FILE = "args.json", "summary.json", "log.jsonl", "kernels.txt"
ADAPTER_DIR, CHECKPOINT_DIR, CHECKPOINT_FILE = "adapter", "checkpoint", "state.safetensors"
MODEL_DIR = "model"  # what full-parameter training writes instead of adapter/: a llava-hf checkpoint
MODEL_MARK = "train_run.json"  # in model/: the run that wrote it ({"run_id", "step"}), which alone may replace it


class RunError(ValueError):
    """A run folder, or a training checkpoint in it, that is missing, unreadable or does not fit the run."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading a run back


def step_adapter_dir(step: int) -> str:
    return f"{ADAPTER_DIR}-step{step}"


def adapter_step(adapter: str | Path) -> int | None:
    """runs/textual/adapter-step50 -> 50; the final adapter (or any other folder) -> None."""
    name = Path(adapter).name
    prefix = f"{ADAPTER_DIR}-step"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def is_run_folder(folder: str | Path) -> bool:
    return (Path(folder) / ARGS_FILE).is_file()


def run_folder_of(adapter: str | Path) -> Path | None:
    """The train.py run folder an adapter folder belongs to (runs/textual/adapter, runs/textual/adapter-step50 ->
    runs/textual), or None."""
    adapter = Path(adapter)
    ours = adapter.name == ADAPTER_DIR or adapter_step(adapter) is not None
    return adapter.parent if ours and is_run_folder(adapter.parent) else None


def run_adapters(run: str | Path) -> list[Path]:
    """A run's adapters in training order: every adapter-step<N>/ by N, then the final adapter/ if written and not
    the same weights as the last adapter-step<N>/ (a run that ended on a multiple of --save-adapter-every)."""
    run = Path(run)
    steps = sorted((p for p in run.glob(f"{ADAPTER_DIR}-step*") if adapter_step(p) is not None), key=adapter_step)
    final = run / ADAPTER_DIR
    if not final.is_dir():
        return steps
    summary = read_json(run / SUMMARY_FILE, RunError) if (run / SUMMARY_FILE).is_file() else {}
    if steps and adapter_step(steps[-1]) == summary.get("steps"):
        return steps
    return steps + [final]


def read_run_args(run: str | Path) -> dict:
    """The options a train.py run was started with (its args.json)."""
    return read_json(Path(run) / ARGS_FILE, RunError, "not a train.py run folder")


# Options every train.py has recorded in args.json since the first: an args.json without them is another program's.
TRAIN_ARGS_KEYS = ("model", "data", "out", "mode", "lora_r", "max_steps")


def read_train_args(run: str | Path) -> dict:
    """The args.json of a train.py run, refused when it is another program's (args.json is a common name): train.py
    would take the folder for its own run and restart it, clearing a log.jsonl and adapter-step* it did not write."""
    args = read_run_args(run)
    missing = [key for key in TRAIN_ARGS_KEYS if key not in args]
    if missing:
        raise RunError(f"{Path(run) / ARGS_FILE}: not the args.json of a train.py run (it has no "
                       f"{', '.join(missing)}); choose a new or empty --out (nothing was written)")
    return args


def adapter_display_name(adapter: str | Path) -> str:
    """runs/textual/adapter -> "textual" (train.py's layout), runs/textual/adapter-step50 -> "textual@50"; any other
    folder -> its own name."""
    adapter = Path(adapter)
    if run_folder_of(adapter) is None and adapter.name != ADAPTER_DIR:
        return adapter.name
    step = adapter_step(adapter)
    return adapter.resolve().parent.name + ("" if step is None else f"@{step}")


def read_train_summary(adapter: str | Path) -> dict | None:
    """Tokens / FLOPs / seconds of the train.py run that wrote this adapter (the summary.json beside it), if any;
    for an adapter-step<N>, the sums of the log's first N steps."""
    step = adapter_step(adapter)
    if step is not None and run_folder_of(adapter) is not None:
        return _summary_up_to(Path(adapter).parent, step)
    for candidate in (Path(adapter).parent / SUMMARY_FILE, Path(adapter) / SUMMARY_FILE):
        if candidate.is_file():
            summary = read_json(candidate, RunError)
            keys = ("mode", "steps", "tokens", "image_tokens", "estimated_flops", "wall_seconds")
            return {"file": str(candidate), **{k: summary.get(k) for k in keys}}
    return None


def _summary_up_to(run: Path, step: int) -> dict:
    records = [r for r in read_log(run) if r["step"] < step]

    def total(key: str):
        return sum(r[key] for r in records) if all(key in r for r in records) else None

    return {"file": str(run / LOG_FILE), "mode": read_run_args(run).get("mode"), "steps": step,
            "tokens": total("tokens"), "image_tokens": total("image_tokens"), "estimated_flops": total("flops"),
            "wall_seconds": total("seconds")}


def read_log_lines(path: Path) -> list[dict]:
    """The records of each complete line of a log.jsonl (harness.readers' rule for a file appended to: a last line
    cut short by a kill or a full disk is left out; a bad line before it is an error naming it)."""
    entries = []
    for number, record in read_jsonl(path, RunError, appended=True):
        if not isinstance(record.get("step"), int):
            raise RunError(f"{path}:{number}: not a log record (a JSON object with an integer \"step\")")
        entries.append(record)
    return entries


def read_log(run: str | Path) -> list[dict]:
    """The step records of a run's log.jsonl (event lines, such as a resume's, left out)."""
    return [record for record in read_log_lines(Path(run) / LOG_FILE) if "event" not in record]


def keep_log_before(log_path: Path, step: int) -> None:
    """Keep the complete log lines of steps before `step`: later ones ran after the last checkpoint, before a stop, and
    are about to run again (and a line cut short by a kill goes too)."""
    if log_path.exists():
        lines = [json.dumps(record) for record in read_log_lines(log_path) if record["step"] < step]  # as written
        write_atomically(log_path, lambda p: p.write_text("".join(line + "\n" for line in lines)))


# ---------------------------------------------------------------------------------------------------------------------
# The training checkpoint: everything a resumed run needs to continue bit for bit


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every trainable parameter (the adapters), by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def training_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, keep: bool = True
                     ) -> dict[str, torch.Tensor]:
    """The trainable parameters and AdamW's moments as whole tensors on the CPU, named as a checkpoint stores them.
    Sharded ones (FSDP) are gathered one at a time: every rank calls this, and only the one that `keep`s (the writer)
    holds the result."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    opt_state = optimizer.state_dict()
    tensors = {}
    for index, (name, param) in enumerate(named):
        parts = [(f"param/{name}", param.detach())]
        parts += [(f"adam/{name}/{key}", value.detach()) for key, value in opt_state["state"].get(index, {}).items()]
        for key, value in parts:
            whole = full_tensor(value)
            if keep:
                tensors[key] = (whole.reshape(-1) if whole.ndim == 0 else whole).contiguous().cpu()
    return tensors


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random states: torch's CPU generator, and the CUDA generator of the device it trains on (not
    merely the current one: a run on cuda:1 draws its dropout masks from cuda:1's)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict,
                    rank_rng_states: list[dict[str, torch.Tensor]]) -> None:
    """`training_tensors` and the RNG states as tensors, everything else (step, data position) as JSON metadata of
    the same safetensors file: one file, renamed into place, so a checkpoint is never half old and half new.
    `rank_rng_states` holds each rank's `rng_state` (one entry in a single process; ranks' dropout masks differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [key.removeprefix("param/") for key in tensors if key.startswith("param/")]
    tensors = {**tensors, **{f"rng/{kind}": value for kind, value in rank_rng_states[0].items()}}
    if len(rank_rng_states) > 1:  # clones: safetensors refuses two names for one storage (rank 0's are above too)
        for rank, states in enumerate(rank_rng_states):
            tensors.update({f"rng/{kind}/rank{rank}": value.clone() for kind, value in states.items()})
    meta = {**state, "python_rng": _jsonable_random_state(), "param_names": names}
    write_atomically(folder / CHECKPOINT_FILE,
                     lambda p: save_file(tensors, str(p), metadata={"state": json.dumps(meta)}))


def read_checkpoint_state(folder: Path) -> dict:
    """A checkpoint's metadata alone (step, why the run stopped, ...): what a resume decides on before loading."""
    path = folder / CHECKPOINT_FILE
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as err:
        raise RunError(f"{path}: not a readable training checkpoint ({err})") from err


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                    device: torch.device = torch.device("cpu")) -> dict:
    """Put a checkpoint's adapter, optimizer and RNG states back; return its metadata (step, data positions, ...).
    Everything is checked before the first tensor is copied: a damaged checkpoint changes nothing. `rank` takes that
    rank's RNG states where the run had several (and rank 0's when it resumes on more ranks than it had); `device`
    is the one this process trains on, whose CUDA generator gets the saved CUDA state."""
    path = folder / CHECKPOINT_FILE
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as err:
        raise RunError(f"{path}: not a readable training checkpoint ({err})") from err
    try:
        adapter, moments = _checked_state(tensors, meta, dict(model.named_parameters()))
        rng = _random_state_from_json(meta["python_rng"])
        optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
        torch.set_rng_state(tensors.get(f"rng/torch/rank{rank}", tensors["rng/torch"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise RunError(f"{path}: a damaged training checkpoint, or one of another model ({type(err).__name__}: "
                       f"{err})") from err
    with torch.no_grad():
        for param, saved in adapter:
            param.copy_(shaped_like(param, saved.to(param.device)))
    cuda_state = tensors.get(f"rng/cuda/rank{rank}", tensors.get("rng/cuda"))
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
    random.setstate(rng)
    return meta


def _checked_state(tensors: dict, meta: dict, params: dict) -> tuple[list, dict]:
    """[(parameter, saved tensor)] and AdamW's state by parameter index, each tensor checked against the model, both
    ways: every saved tensor has its place in the model, and every trainable tensor of the model is saved (a model
    that gained a layer would otherwise train that layer's adapters from scratch, beside the others' trained ones)."""
    trainable = [name for name, p in params.items() if p.requires_grad]
    unsaved = sorted(set(trainable) - set(meta["param_names"]))
    if unsaved:
        raise ValueError(f"{len(unsaved)} of the model's {len(trainable)} trainable tensors are not in it (e.g. "
                         f"{unsaved[0]!r}): it was saved from another model, or with other --lora-targets")
    adapter, moments = [], {}
    for index, name in enumerate(meta["param_names"]):
        saved = tensors.get(f"param/{name}")
        if saved is None or name not in params:
            raise ValueError(f"adapter tensor {name!r} is missing or has no place in this model")
        if saved.shape != params[name].shape or not all_finite(saved):
            raise ValueError(f"adapter tensor {name!r} has shape {tuple(saved.shape)} (the model's: "
                             f"{tuple(params[name].shape)}) or non-finite values")
        adapter.append((params[name], saved))
        prefix = f"adam/{name}/"
        found = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if found:
            found["step"] = found["step"].reshape(())
            for key in ("exp_avg", "exp_avg_sq"):
                if found[key].shape != saved.shape:
                    raise ValueError(f"AdamW {key} of {name!r} has shape {tuple(found[key].shape)}")
                found[key] = shaped_like(params[name], found[key].to(params[name].device))  # this rank's shard
            moments[index] = found
    return adapter, moments


def _jsonable_random_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _random_state_from_json(saved):
    version, internal, gauss = saved
    return version, tuple(internal), gauss
