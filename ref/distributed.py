"""Several processes on torch.distributed, as `torchrun --nproc-per-node N train.py ...` (or eval.py) starts them.

    world = Distributed.from_environment()   # torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process without them
    world.all_reduce_sum(tensor)              # in place, every rank gets the sum
    world.average_gradients(params)           # what DDP does after backward: one all-reduce over all gradients
    world.all_gather_objects(obj)             # [obj of rank 0, obj of rank 1, ...] on every rank
    close_process_group()                     # at the end of the program

Without torchrun's variables the program is one process and every call is the identity, so single-process code runs
unchanged and pays nothing. The backend is NCCL on CUDA and gloo on CPU (what the tests use). torchrun ends every rank
when one fails, so a rank that raises never leaves the others hanging in a collective.

The launcher's variables are checked before anything connects: RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE,
where set) must be integers with 0 <= RANK < WORLD_SIZE and 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE (or WORLD_SIZE), and
MASTER_PORT a port (1 to 65535); each error names the variable. Joining the group (the rendezvous at
MASTER_ADDR:MASTER_PORT, where every rank must arrive) waits at most RENDEZVOUS_TIMEOUT seconds: the parameter of
`Distributed.from_environment`, else the environment variable RENDEZVOUS_TIMEOUT (seconds, > 0), else 300 s; a peer
that never comes (a rank started by hand, a wrong address) is one error naming the address, not a 30-minute hang.
Collectives after the rendezvous keep torch's default timeout (a rank may wait long for another's checkpoint write).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from torch.distributed.constants import default_pg_timeout

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VARIABLE = "RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0  # seconds: every rank of a torchrun job starts within seconds of the others
MAX_RENDEZVOUS_TIMEOUT = 7 * 24 * 3600.0  # past this a timedelta is not a timeout but a typo (and may overflow)


class DistributedError(ValueError):
    """A launch this code cannot run: a partial torchrun environment, or a device the ranks cannot share."""


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0

    @staticmethod
    def from_environment(device: str = "cpu", rendezvous_timeout: float | None = None) -> Distributed:
        """The process group torchrun describes in the environment (joined now), or one process when it describes none.
        On CUDA each rank takes the GPU of its LOCAL_RANK. `rendezvous_timeout` (seconds; default: the variable
        RENDEZVOUS_TIMEOUT, else 300) bounds the wait for the other ranks."""
        present = [name for name in LAUNCHER_VARIABLES if name in os.environ]
        if not present:
            return Distributed()
        world_size = _int_variable("WORLD_SIZE", 1) if "WORLD_SIZE" in os.environ else 1
        rank = _int_variable("RANK", 0, world_size - 1) if "RANK" in os.environ else 0
        local_size = _int_variable("LOCAL_WORLD_SIZE", 1, world_size) if "LOCAL_WORLD_SIZE" in os.environ \
            else world_size
        local_rank = _int_variable("LOCAL_RANK", 0, local_size - 1) if "LOCAL_RANK" in os.environ else 0
        if world_size == 1:
            return Distributed()
        missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
        if missing:
            raise DistributedError(f"the environment sets {present} but not {missing}: start with torchrun")
        _int_variable("MASTER_PORT", 1, 65535)
        timeout = _rendezvous_timeout(rendezvous_timeout)
        world = Distributed(rank, world_size, local_rank)
        kind = torch.device(device).type
        if kind == "cuda":
            torch.cuda.set_device(world.local_rank)
        if not dist.is_initialized():
            _join("nccl" if kind == "cuda" else "gloo", world, timeout)
        return world
    def device(self, requested: str) -> str:
        """--device for this rank: "cuda" becomes this rank's GPU; anything else is shared as is."""
        return f"cuda:{self.local_rank}" if self.enabled and requested == "cuda" else requested

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sums over ranks of a few numbers (token counts, loss sums for the log), in float64."""
        if not self.enabled:
            return list(values)
        return self.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Every rank's gradient becomes the mean over ranks, as DDP leaves it: one flat all-reduce (what DDP's
        buckets do), after the whole step's backward passes (what DDP's no_sync does for gradient accumulation)."""
        if not self.enabled:
            return
        params = [p for p in params if not isinstance(p, DTensor)]  # FSDP reduce-scatters the sharded ones itself
        for p in params:  # a rank whose batches held no term has no gradient: it adds zeros to the others'
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any."""
        return self.sum_floats([1.0 if flag else 0.0])[0] > 0 if self.enabled else flag

    def all_gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        close_process_group()



def _int_variable(name: str, low: int, high: int | None = None) -> int:
    """The integer in environment variable `name`, in [low, high]; else an error naming the variable."""
    text = os.environ[name]
    try:
        value = int(text.strip())
    except ValueError:
        raise DistributedError(f"{name}={text!r}: not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f">= {low}"
        why = {"RANK": " (RANK counts from 0 to WORLD_SIZE - 1)",
               "LOCAL_RANK": " (LOCAL_RANK counts from 0 to the number of ranks on this machine - 1)"}.get(name, "")
        raise DistributedError(f"{name}={text!r}: must be {bound}{why}")
    return value


def _rendezvous_timeout(seconds: float | None) -> float:
    """The rendezvous timeout: the argument, else RENDEZVOUS_TIMEOUT from the environment, else the default."""
    where = "rendezvous_timeout"
    if seconds is None and TIMEOUT_VARIABLE in os.environ:
        where, text = TIMEOUT_VARIABLE, os.environ[TIMEOUT_VARIABLE]
        try:
            seconds = float(text)
        except ValueError:
            raise DistributedError(f"{TIMEOUT_VARIABLE}={text!r}: not a number of seconds") from None
    if seconds is None:
        return DEFAULT_RENDEZVOUS_TIMEOUT
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or not 0 < seconds <= MAX_RENDEZVOUS_TIMEOUT:
        raise DistributedError(f"{where}={seconds!r}: must be a number of seconds in (0, {MAX_RENDEZVOUS_TIMEOUT:g}]")
    return float(seconds)


def _join(backend: str, world: Distributed, timeout: float) -> None:
    """Join the process group: the rendezvous (every rank connects to the store at MASTER_ADDR:MASTER_PORT; rank 0
    serves it unless torchrun's agent does) bounded by `timeout`, then the group itself. The store then waits as long
    as torch's default for later exchanges (NCCL's first collective), as a plain init_process_group would."""
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        store, _, _ = next(dist.rendezvous("env://", world.rank, world.world_size, timeout=timedelta(seconds=timeout)))
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size)
        store.set_timeout(default_pg_timeout)
    except (RuntimeError, OSError, ValueError) as err:  # torch's DistStoreError and DistNetworkError are RuntimeErrors
        close_process_group()
        first = " ".join(str(err).split())[:300].rstrip(".")
        raise DistributedError(
            f"rank {world.rank} of {world.world_size} could not join the process group at {address} (MASTER_ADDR:"
            f"MASTER_PORT) within {timeout:g} s: {first}. Start every rank (torchrun --nproc-per-node "
            f"{world.world_size} starts them all), check that MASTER_ADDR and MASTER_PORT are the same for all and "
            f"reachable, or set {TIMEOUT_VARIABLE} to wait longer") from None


# ---------------------------------------------------------------------------------------------------------------------
# FSDP: the decoder's layers sharded across ranks (torch.distributed.fsdp.fully_shard, "FSDP2")


def shard_decoder_layers(model) -> None:
    """fully_shard each decoder layer: its weights (dense base and adapters) are split across the ranks, gathered
    for the layer's forward and backward, and its gradients reduce-scattered (as a mean over ranks, like DDP's).
    The embeddings, lm_head, final norm, vision tower and projector are frozen and stay whole on every rank."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.language_model.layers:
        fully_shard(layer)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model, keep: bool) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on the CPU of the rank that `keep`s it, gathered one tensor at a time (every
    rank calls this; the others hold one whole tensor at a time and get None)."""
    state = {}
    for name, tensor in model.state_dict().items():
        whole = full_tensor(tensor.detach())
        if keep:
            state[name] = whole.cpu()
    return state if keep else None


def shaped_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is: this rank's shard of it when `param` is sharded."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    return full


def close_process_group() -> None:
    """Leave the process group, if this process joined one (the end of a program under torchrun)."""
    if dist.is_initialized():
        dist.destroy_process_group()
