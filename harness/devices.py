"""The device policy of the programs: which --device this torch can use, the compute dtype when none is asked for
(train.py's `default_train_dtype`, eval.py's `default_dtype`), and whether this CPU computes bfloat16 natively
(`cpu_has_native_bf16`). The method itself (ref/) runs on whatever device and dtype it is given."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


class DeviceError(ValueError):
    """A --device that this torch build or machine cannot use."""


def default_dtype(device: str) -> str:
    """eval.py's compute dtype of a model other than the toy when none is asked for: bfloat16 on a GPU (LLaVA-1.5's
    own; float32 would double the memory and leave the tensor cores idle), float32 on a CPU, whatever the CPU, so that
    greedy answers, and the tables judged from them, are the float32 ones on every CPU (--dtype bfloat16 asks for
    it)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def default_train_dtype(device: str) -> str:
    """train.py's compute dtype of a model other than the toy when none is asked for: bfloat16 on a GPU, and on a CPU
    that multiplies bfloat16 matrices in hardware (`cpu_has_native_bf16`); float32 on any other CPU, where bfloat16 is
    emulated and slower than float32. Why bfloat16 on such a CPU: on the SmolLM2 world the chosen run trained in 0.83x
    float32's time and its validation outcomes differ from float32's with the same seed on no more prompts than two
    float32 seeds differ from each other (docs/smollm2.md, "bfloat16 or float32"). The adapters stay float32 either
    way (ref/lora.py), so an adapter trained in bfloat16 is evaluated like any other; --dtype float32 trains as before,
    for exact comparisons."""
    if torch.device(device).type == "cuda":
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


# The feature flags of native bfloat16 matrix arithmetic, by the /proc/cpuinfo line that lists them:
# x86 AVX512-BF16 dot products (Cooper Lake, Zen 4 on) or AMX tiles (Sapphire Rapids on); ARM's ARMv8.6 BF16
# instructions (Neoverse V1 and N2: Graviton3 on).
BF16_FLAGS = {"flags": {"avx512_bf16", "amx_bf16"}, "Features": {"bf16"}}


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text says every processor has native bfloat16 matrix instructions: each `flags` line
    (x86) holds avx512_bf16 or amx_bf16, each `Features` line (ARM) holds bf16. No such line at all: False."""
    listed = []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in BF16_FLAGS:
            listed.append(bool(BF16_FLAGS[key.strip()] & set(value.split())))
    return bool(listed) and all(listed)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware, where bfloat16 computes faster than float32.

    How: the feature flags the Linux kernel lists in /proc/cpuinfo (`cpuinfo_has_bf16`), the instructions oneDNN's
    bfloat16 matmul kernels need; without them torch emulates bfloat16 through float32 conversions, slower than
    float32 itself. Elsewhere (macOS, Windows, no readable /proc/cpuinfo): False, the safe answer, as float32 is never
    slower than emulated bfloat16. Why not a timing: a matmul race costs seconds at every start, its result depends on
    the load of the moment (cores shared with other processes) and on a size and a margin to choose, and it can
    differ between two runs on one machine; the flags are a fixed property of the CPU, read in a millisecond.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return cpuinfo_has_bf16(cpuinfo.read_text(errors="replace"))
    except OSError:
        return False


def check_device(device: str) -> None:
    """A --device that this torch cannot use, refused with what to do, before anything is read or loaded."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise DeviceError(f"--device {device!r}: not a torch device ({err})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = (f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
               if torch.version.cuda is None
               else "torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)")
        raise DeviceError(f"--device {device}: {why}, or run with --device cpu")
