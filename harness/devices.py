"""The device policy of the programs: which --device this torch can use, and the compute dtype when none is asked
for. The method itself (ref/) runs on whatever device and dtype it is given."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A --device that this torch build or machine cannot use."""


def default_dtype(device: str) -> str:
    """The compute dtype of a model other than the toy when none is asked for: bfloat16 on a GPU (LLaVA-1.5's own;
    float32 would double the memory and leave the tensor cores idle), float32 on a CPU (where bfloat16 pays only on
    CPUs with bfloat16 instructions, and the loss kernels compute their logits in float32 anyway: README,
    "Performance, side by side"; --dtype bfloat16 asks for it)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


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
