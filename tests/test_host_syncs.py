"""benchmarks/host_syncs.py: on a CPU, the ops that would make the host wait for an accelerator.

On an accelerator every read of a device tensor's data (a number, a data-dependent shape) makes the host wait for the
device. Which ops do that does not depend on the device, so the counter can count them on a CPU: it sees each kind
of read, and nothing else.
"""

from __future__ import annotations

import torch

from benchmarks.host_syncs import HostSyncCounter


def syncs(run) -> list[str]:
    with HostSyncCounter() as counter:
        run()
    return counter.ops


# --- the counter ---------------------------------------------------------------------------------------------------


def test_the_counter_sees_each_kind_of_read_once():
    t, mask = torch.arange(6.0), torch.arange(6) > 2

    def mask_index_with_backward():
        x = t.clone().requires_grad_()
        x[mask].sum().backward()  # the gather, then its backward: an index_put with the same mask

    reads = {"item": lambda: t[0].item(), "int": lambda: int(t.sum()), "if": lambda: 1 if (t > 0).any() else 0,
             "tolist": t.tolist, "numpy": t.numpy, "nonzero": mask.nonzero, "mask index": lambda: t[mask],
             "masked_select": lambda: t.masked_select(mask), "equal": lambda: torch.equal(t, t)}
    for name, read in reads.items():
        assert len(syncs(read)) == 1, name
    assert syncs(mask_index_with_backward) == ["aten.index.Tensor", "aten.index_put.default"]


def test_the_counter_ignores_what_runs_on_the_device_alone():
    t, rows = torch.arange(12.0).reshape(4, 3), torch.tensor([0, 2])

    def work():
        x = t.clone().requires_grad_()
        y = x.index_select(0, rows) @ x.T + x[rows].sum()  # gathers by index tensors, forward and backward
        y.masked_fill(y > 3, 0.0).sum().backward()  # a mask used as values, not as an index
        torch.arange(5) * t.shape[0]

    assert syncs(work) == []
