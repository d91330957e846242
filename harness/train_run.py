"""A training run in its folder, as train.py drives it: begun or resumed, logged, checkpointed, finished.

    folder = RunFolder(options, world, data_file)
    folder.hold()                                     # one train.py process at a time in a run folder
    folder.restart()                                  # a run stopped before its first checkpoint starts again
    folder.finished(start)                            # a resumed run with nothing left to do: its summary
    folder.check_inputs(start, images)                # the sha256 of every input; a resumed run's must be the same
    state = folder.resume(...) or folder.begin(...)   # the LoopState: where the loop stands
    with folder.step_log() as log_step: ...           # a JSON line per step
    folder.save_checkpoint(model, optimizer, state.checkpoint(streams))
    folder.save_outputs(model, lora, step); folder.write_summary(state, ...)

Under torchrun every rank calls every method (sharded tensors are gathered inside, and RNG states collected); rank 0
alone writes and prints. The files and their formats are harness/runs.py's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ref.adapters import save_adapter
from ref.config import read_json
from ref.distributed import Distributed, full_state_dict
from ref.lora import LoraConfig
from ref.losses import StepCounts
from ref.weights import copy_side_files, save_model
from harness.files import write_atomically
from harness.memory import memory_use
from harness.provenance import changed_inputs, fingerprints, model_files, provenance
from harness.runs import (ADAPTER_DIR, ARGS_FILE, CHECKPOINT_DIR, KERNELS_FILE, LOG_FILE, MODEL_DIR, MODEL_MARK,
                          SUMMARY_FILE,
                          RunError, adapter_step, keep_log_before, load_checkpoint, read_checkpoint_state,
                          read_run_args, rng_state, save_checkpoint, step_adapter_dir, training_tensors)
from harness.train_options import OptionError, RunStart, TrainOptions


# The run folders this process holds: {resolved path: the open descriptor whose lock it is}. The lock lasts as long as
# the process (a crash or a kill releases it); a process may run in a folder it holds again (tests, scripts).
_HELD: dict[Path, int] = {}


def new_totals() -> dict:
    return {"tokens": 0, "image_tokens": 0, "flops": 0.0, "seconds": 0.0}


@dataclass
class LoopState:
    """Where the loop stands: what a checkpoint keeps besides the tensors, and what the summary reports."""

    step: int = 0  # optimizer steps done
    stop_at: int | None = None  # the step at which the stopping rule ends the run, once it has fired
    totals: dict = field(default_factory=new_totals)
    stopped_by: str | None = None
    # what the divergence guard compares with: the adapters' norm before training, the largest gradient norm so far
    reference_norms: dict | None = None

    def finish_step(self, terms: dict, norms: tuple[float, float], lr: float, counts: StepCounts, seconds: float,
                    device: torch.device) -> dict:
        """Count the step into the totals; return its log record."""
        for key, value in (("tokens", counts.tokens), ("image_tokens", counts.image_tokens),
                           ("flops", counts.flops), ("seconds", seconds)):
            self.totals[key] += value
        grad_norm, adapter_norm = norms
        record = {"step": self.step, **terms, "grad_norm": grad_norm, "adapter_norm": adapter_norm, "lr": lr,
                  "tokens": counts.tokens, "image_tokens": counts.image_tokens, "flops": counts.flops,
                  "seconds": seconds, **memory_use(device)}
        self.totals["peak_memory_mb"] = max(self.totals.get("peak_memory_mb", 0.0), record["peak_memory_mb"])
        if not terms:
            record["skipped"] = "no loss term: no record of this step's batches has a response for a weighted term"
        self.step += 1
        return record

    def checkpoint(self, streams) -> dict:
        """The checkpoint's metadata: this state and the data streams' positions (ref.batches.Streams)."""
        return {"step": self.step, "stop_at": self.stop_at, "totals": self.totals, "stopped_by": self.stopped_by,
                "reference_norms": self.reference_norms, **streams.positions()}


class RunFolder:
    """The folder of one run (--out) as this process writes it. `data_file`: the data file the run reads, None for an
    embedded world's records (code: the commit names them)."""

    def __init__(self, options: TrainOptions, world: Distributed, data_file: str | None):
        self.options, self.world, self.data_file = options, world, data_file
        self.path = Path(options.out)
        self.inputs: dict[str, str | None] | None = None  # {input file: sha256}, from check_inputs (rank 0)
        self.run_id: str | None = None  # args.json's provenance.run_id: this run, whose model/ it may replace
        self.was_empty = not self.path.is_dir() or not any(self.path.iterdir())  # a new run's folder, at its start

    # -- starting ------------------------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Lock the run folder for this process (rank 0's), or refuse: two train.py processes in one folder, a job
        started again while it still runs, would both append to the log and write over each other's checkpoint.
        A folder that does not exist yet is locked when the run creates it (`begin`)."""
        problem = self._lock() if self.world.is_main and self.path.is_dir() else None
        problem = self.world.broadcast_object(problem)
        if problem:
            raise RunError(problem)

    def _lock(self) -> str | None:
        key = self.path.resolve()
        if key in _HELD:
            return None
        descriptor = os.open(key, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: another process holds it
            os.close(descriptor)
            return (f"--out {self.path}: another train.py process is running in it; wait for it to end (or stop it: "
                    f"Ctrl-C or SIGTERM checkpoints), or choose another --out (nothing was written)")
        _HELD[key] = descriptor
        return None

    def restart(self) -> None:
        """A run with no checkpoint trained nothing that can be kept: its log and step adapters go (its files only)."""
        if not self.world.is_main:
            return
        print(f"{self.path}: a run stopped before its first checkpoint; starting it again in place", file=sys.stderr)
        (self.path / LOG_FILE).unlink(missing_ok=True)
        for folder in self.path.glob(f"{ADAPTER_DIR}-step*"):
            if adapter_step(folder) is not None:
                shutil.rmtree(folder)

    def finished(self, start: RunStart) -> dict | None:
        """A resumed run with nothing left to do (it ended, and --max-steps does not reach past its end): its summary,
        after one line saying so. A run stopped by a rule or a failure cannot be extended: that is refused."""
        if not start.resume:
            return None
        meta = read_checkpoint_state(self.path / CHECKPOINT_DIR)
        stopped_by, step, max_steps = meta.get("stopped_by"), meta["step"], self.options.max_steps
        if stopped_by is None and (self.path / SUMMARY_FILE).is_file():  # a checkpoint from before stopped_by was kept
            stopped_by = read_json(self.path / SUMMARY_FILE, RunError).get("stopped_by")
        if max_steps < step:
            raise OptionError(f"--resume {self.path}: --max-steps {max_steps} is below the checkpoint's step {step}")
        if stopped_by not in (None, "max_steps"):
            if "max_steps" in start.changes:
                raise OptionError(f"--resume {self.path}: the run stopped at step {step} ({stopped_by}); a larger "
                                  f"--max-steps cannot continue it")
        elif max_steps > step:
            return None
        if not ((self.path / ADAPTER_DIR).is_dir() and (self.path / SUMMARY_FILE).is_file()):
            return None  # stopped after its last checkpoint, before its outputs: the run writes them without a step
        if self.world.is_main:
            print(f"nothing to do: {self.path} ended at step {step} ({stopped_by or 'max_steps'}); pass --max-steps "
                  f"N > {step} to train further", file=sys.stderr)
        return read_json(self.path / SUMMARY_FILE, RunError)

    def input_files(self, images: list[str] = ()) -> dict[str, Path]:
        """Every file the run reads, by a name for the record: the data file ("data"), the images its records show
        ("image /path/a.png"), and the files of the model and the vision folder that decide what they compute
        ("model/config.json", "model/model.safetensors", ...)."""
        files = {} if self.data_file is None else {"data": Path(self.data_file)}
        files.update({f"image {image}": Path(image) for image in images})
        files.update(model_files(self.options.model, "model"))
        if self.options.vision_dir:
            files.update(model_files(self.options.vision_dir, "vision"))
        return files

    def check_inputs(self, start: RunStart, images: list[str] = ()) -> None:
        """The sha256 of every input file (`images`: those of the records the run trains on), taken once the data is
        read, before the model loads; a new run records them in args.json. A resumed run must read the very bytes it
        started from: a data file, an image or a model changed under the same path would make it half one run, half
        another, so a difference is refused, listing the files. A run folder from before the inputs were recorded has
        only its data file's and config.json's: those are compared, and one line says the rest could not be. A
        full-parameter run also checks its model/ output is its own. Rank 0 reads the files; every rank raises its
        finding."""
        problem = None
        if self.world.is_main:
            try:
                problem = self._inputs_problem(start, images)
            except (ValueError, OSError) as err:  # an args.json edited by hand, an unreadable file: said by every rank
                problem = str(err)
        problem = self.world.broadcast_object(problem)
        if problem:
            raise RunError(problem)

    def _inputs_problem(self, start: RunStart, images: list[str]) -> str | None:
        recorded = read_run_args(self.path).get("provenance") if start.resume else None
        recorded = recorded if isinstance(recorded, dict) else {}
        if not isinstance(recorded.get("inputs"), (dict, type(None))):
            return f"{self.path / ARGS_FILE}: provenance.inputs is not a {{file: sha256}} object"
        self.run_id = recorded.get("run_id")
        files = self.input_files(images)
        if start.resume and recorded.get("inputs") is not None:
            changed = changed_inputs(recorded["inputs"], files)
            self.inputs = recorded["inputs"]  # compared equal: what the run started from
        else:
            self.inputs = fingerprints(files)
            sha256 = recorded.get("sha256") if isinstance(recorded.get("sha256"), dict) else {}
            legacy = {name: sha256.get(key) for name, key in (("data", "data"), ("model/config.json", "model_config"))}
            changed = sorted(name for name, sha in legacy.items() if sha is not None and self.inputs.get(name) != sha)
            if start.resume and not changed:
                print(f"{self.path / ARGS_FILE}: records no sha256 of the model's weights (a run started before "
                      f"train.py kept them): resuming without checking they are the ones it started from",
                      file=sys.stderr)
        if changed:
            return (f"--resume {self.path}: the run's inputs changed since it started: {', '.join(changed)} (sha256 "
                    f"differs from {ARGS_FILE}, or the file is new or gone); resuming would train half on the old "
                    f"inputs, half on the new. Put the original files back, or start a new run (another --out)")
        return self.model_output_problem(before_start=True) if self.options.full_parameter else None

    def model_output_problem(self, before_start: bool) -> str | None:
        """Whether model/, where a full-parameter run writes its model, may be replaced: it is absent, or this run's
        own (its train_run.json names this run; a run from before the mark: summary.json names it). Anything else is
        a folder of the user's, never removed."""
        target = self.path / MODEL_DIR
        if not os.path.lexists(target):
            return None
        mark = target / MODEL_MARK
        if mark.is_file():
            ours = self.run_id is not None and read_json(mark, RunError).get("run_id") == self.run_id
        else:  # no mark: a run from before train.py marked its model, whose summary names it, or not this run's
            ours = (self.run_id is None and (self.path / SUMMARY_FILE).is_file()
                    and read_json(self.path / SUMMARY_FILE, RunError).get("model") == str(target))
        if ours:
            return None
        then = ("choose another --out (nothing was written)" if before_start else
                f"then python train.py --resume --out {self.path} writes the model from the run's last checkpoint")
        return (f"--out {self.path}: holds a {MODEL_DIR}/ this run did not write, where a full-parameter run writes "
                f"its model; move that folder away, or {then}")

    def begin(self, adapter_norm: float) -> LoopState:
        """A new run: args.json holds its options and provenance (with the sha256 of its inputs and the run's id); the
        divergence guard starts from the untrained adapters' norm."""
        if self.world.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            problem = self._lock()
            if problem is None and self.was_empty and any(self.path.iterdir()):  # another run started in it meanwhile
                problem = (f"--out {self.path}: another train.py run started in it while this one was loading; "
                           f"choose another --out (nothing was written)")
            if problem:
                raise RunError(problem)
            self.run_id = uuid.uuid4().hex
            self._write_args({**asdict(self.options), "provenance": {**self.provenance(), "run_id": self.run_id}})
        return LoopState(reference_norms={"adapter": adapter_norm, "grad": None})

    def resume(self, changes: dict, model, optimizer: torch.optim.Optimizer, streams) -> LoopState:
        """The checkpoint's state: adapter, optimizer, RNG states and data positions (every rank reads it). The log
        loses the steps after the checkpoint, which run again; a resume with changed options is recorded."""
        saved = load_checkpoint(self.path / CHECKPOINT_DIR, model, optimizer, self.world.rank,
                                model.lm_head.weight.device)
        ranks = saved.get("ranks", 1)
        if ranks != self.world.world_size:  # --batch-size is per rank: other ranks, another step batch
            raise RunError(f"--resume {self.path}: the run trained on {ranks} rank(s) and this is "
                           f"{self.world.world_size}; resume it with torchrun --nproc-per-node {ranks} (or one "
                           f"process for 1)")
        streams.restore(saved)
        self.world.barrier()  # every rank has read the log's length before rank 0 cuts it
        if self.world.is_main:
            keep_log_before(self.path / LOG_FILE, saved["step"])
        # a rule or a failure that ended the run still ends it; reaching --max-steps does not, once it has grown
        stopped_by = saved.get("stopped_by") if saved.get("stopped_by") != "max_steps" else None
        state = LoopState(saved["step"], saved["stop_at"], saved["totals"], stopped_by, saved.get("reference_norms"))
        if self.world.is_main and changes:
            self._record_resume(state.step, changes)
        return state

    def write_kernel_table(self, kernels) -> None:
        if self.world.is_main:
            (self.path / KERNELS_FILE).write_text(kernels.table() + "\n")

    def _record_resume(self, step: int, changes: dict) -> None:
        """args.json takes the new values and keeps the history, the log an event line, stderr one line (what the
        schedule now does)."""
        saved = read_run_args(self.path)
        resumes = saved.get("resumed", []) + [{"step": step, "changed": changes, "provenance": self.provenance()}]
        self._write_args({**asdict(self.options), "provenance": saved.get("provenance"), "resumed": resumes})
        event = {"event": "resume", "step": step, "changed": changes}
        schedule, max_steps = self.options.schedule, self.options.max_steps
        if "max_steps" in changes and schedule != "constant":
            event["schedule"] = f"the {schedule} learning-rate schedule now reaches 0 at step {max_steps}"
        with open(self.path / LOG_FILE, "a") as log:
            log.write(json.dumps(event) + "\n")
        changed = ", ".join(f"{name} {before} -> {now}" for name, (before, now) in changes.items())
        print(f"resuming at step {step} with {changed}" + (f"; {event['schedule']}" if "schedule" in event else ""),
              file=sys.stderr)

    def _write_args(self, record: dict) -> None:
        write_atomically(self.path / ARGS_FILE, lambda p: p.write_text(json.dumps(record, indent=1)))

    def provenance(self) -> dict:
        """Date, commit, versions, device (and ranks), the sha256 of the data file and the model's config, and (once
        check_inputs took them) of every input file."""
        device = self.options.device
        if self.world.enabled:
            device = f"{device} x {self.world.world_size} ranks"
        made = provenance({"data": self.data_file, "model_config": Path(self.options.model) / "config.json"},
                          device=device)
        return made if self.inputs is None else {**made, "inputs": self.inputs}

    # -- along the way -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step_log(self):
        """A function that appends a step's record to log.jsonl as one JSON line, flushed at once: a kill loses no
        finished step's line (rank 0; the other ranks' lines go nowhere)."""
        with open(self.path / LOG_FILE if self.world.is_main else os.devnull, "a") as log:
            def log_step(record: dict) -> None:
                log.write(json.dumps(record) + "\n")
                log.flush()

            yield log_step

    def save_checkpoint(self, model, optimizer: torch.optim.Optimizer, meta: dict) -> None:
        """The checkpoint, written by rank 0 with every rank's RNG state (the adapters and AdamW's moments are the
        same on every rank: their gradients were averaged)."""
        own = rng_state(model.lm_head.weight.device)
        rng_states = self.world.all_gather_objects(own) if self.world.enabled else [own]
        tensors = training_tensors(model, optimizer)  # every rank: sharded tensors are gathered
        if self.world.is_main:
            save_checkpoint(self.path / CHECKPOINT_DIR, tensors, {**meta, "ranks": self.world.world_size}, rng_states)

    def save_step_adapter(self, model, lora: LoraConfig, step: int) -> None:
        save_adapter(model, self.path / step_adapter_dir(step), lora, self.options.model, write=self.world.is_main)

    # -- the outputs ---------------------------------------------------------------------------------------------------

    def save_outputs(self, model, lora: LoraConfig | None, step: int) -> None:
        """The adapter (peft's format), or after full-parameter training the whole model as a llava-hf checkpoint in
        model/."""
        if lora is not None:
            save_adapter(model, self.path / ADAPTER_DIR, lora, self.options.model, write=self.world.is_main)
            return
        state = full_state_dict(model, keep=self.world.is_main)
        if self.world.is_main:
            self._replace_model(model, state, step)

    def _replace_model(self, model, state: dict, step: int) -> None:
        """model/ written whole in a temporary folder beside it, marked as this run's (train_run.json), then renamed
        into place; a previous model/ is removed only when it is this run's own (from before a resume), so a failed
        write keeps it, and a folder of the user's is never removed."""
        problem = self.model_output_problem(before_start=False)
        if problem:
            raise RunError(problem)
        target = self.path / MODEL_DIR
        partial = target.with_name(f".{MODEL_DIR}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier process of the same pid that was killed
        partial.mkdir()
        try:
            save_model(model, partial, state=state)
            copy_side_files(self.options.model, partial)  # a model written by train.py brings its mark: replaced next
            (partial / MODEL_MARK).write_text(json.dumps({"run_id": self.run_id, "step": step}) + "\n")
            if os.path.lexists(target):
                previous = target.with_name(f".{MODEL_DIR}.previous-{os.getpid()}")
                os.replace(target, previous)
                os.replace(partial, target)
                shutil.rmtree(previous)
            else:
                os.replace(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def write_summary(self, state: LoopState, device: torch.device, kernels, coverage: dict | None = None) -> dict:
        """summary.json: the run's totals, where its result is, why it stopped; one line on stderr. Returned on every
        rank once written."""
        totals, full = state.totals, self.options.full_parameter
        summary = {"mode": self.options.mode, "steps": state.step, "stopped_by": state.stopped_by or "max_steps",
                   "tokens": totals["tokens"], "image_tokens": totals["image_tokens"],
                   "estimated_flops": totals["flops"], "wall_seconds": totals["seconds"],
                   "peak_memory_mb": max(totals.get("peak_memory_mb", 0.0), memory_use(device)["peak_memory_mb"]),
                   **({"model": str(self.path / MODEL_DIR)} if full else {"adapter": str(self.path / ADAPTER_DIR)}),
                   "kernels": kernels.choice, "ranks": self.world.world_size,
                   **({"categories": coverage} if coverage else {}),
                   "provenance": self.provenance()}
        if self.world.is_main:
            write_atomically(self.path / SUMMARY_FILE, lambda p: p.write_text(json.dumps(summary, indent=1)))
            print(f"done: {state.step} steps ({summary['stopped_by']}), {totals['tokens']:,} tokens, "
                  f"{totals['flops']:.3g} FLOPs, {totals['seconds']:.1f} s; {'model' if full else 'adapter'} in "
                  f"{summary.get('model', summary.get('adapter'))}", file=sys.stderr)
        self.world.barrier()  # the files are written before any rank returns
        return summary
