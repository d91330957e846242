"""Memory a training step used, as its log record reports it (MiB).

On a GPU: the peak the caching allocator handed out since `start_step_memory` (each step its own peak, not the run's
so far), and what it holds reserved (what other processes cannot have). On a CPU: the process's peak resident set so
far, the model load's included (the operating system keeps no per-step peak).
"""

from __future__ import annotations

import resource

import torch


def start_step_memory(device: torch.device) -> None:
    """On a GPU, make the allocator's peak start again, so that the step about to run logs its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_use(device: torch.device) -> dict[str, float]:
    """{"peak_memory_mb": ..., and on a GPU "reserved_memory_mb": ...}."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "reserved_memory_mb": torch.cuda.memory_reserved(device) / 2**20}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
