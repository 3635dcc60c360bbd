"""Launch-side helpers of the Triton kernels that do not need a GPU."""

from __future__ import annotations

import torch

from tinyserve_patch.ops._triton_common import use_pdl


def test_pdl_only_on_cuda_and_switchable(monkeypatch):
    """Programmatic dependent launch is a CUDA (Hopper+) launch option: never on CPU tensors, under the
    interpreter or on ROCm, and TINYSERVE_PDL=0 turns it off everywhere."""
    assert use_pdl(torch.device("cpu")) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_pdl(torch.device("cuda", 0)) is False  # decided before any CUDA query
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TINYSERVE_PDL", "0")
    assert use_pdl(torch.device("cuda", 0)) is False
    monkeypatch.setenv("TINYSERVE_PDL", "1")
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: "cuda" devices whose major is the gfx arch's
    assert use_pdl(torch.device("cuda", 0)) is False


def test_reserve_counters_sizes_every_pool_and_keeps_outgrown_buffers(monkeypatch):
    """reserve_ticket_counters allocates each pool for ``rows`` rows ahead of any launch; a pool that grows
    keeps its old buffer alive (a CUDA graph captured on it may replay). CPU tensors stand in for CUDA ones."""
    import pytest

    from tinyserve_patch import ops
    from tinyserve_patch.ops import _triton_common as common

    monkeypatch.setattr(common, "_TICKETS", {})
    monkeypatch.setattr(common, "_RETIRED", [])
    cpu = torch.device("cpu")
    common.reserve_ticket_counters(cpu, 10)
    first = {pool: common._TICKETS[(cpu, pool)] for pool in common.COUNTER_POOLS}
    assert all(buf.numel() == 4096 and buf.dtype == torch.int32 and not buf.any() for buf in first.values())
    common.reserve_ticket_counters(cpu, 2000)  # tickets: 2000 fit; chain: 6000, persistent: 6003 do not
    assert common._TICKETS[(cpu, "tickets")] is first["tickets"]
    assert common._TICKETS[(cpu, "chain")].numel() == 6000 and common._TICKETS[(cpu, "persistent")].numel() == 6003
    assert common._RETIRED == [first["chain"], first["persistent"]]
    assert common.ticket_counters(cpu, 6000, "chain") is common._TICKETS[(cpu, "chain")]  # no launch allocates now
    ops.reserve_counters("cpu", 5)  # a no-op off CUDA
    assert len(common._TICKETS) == 3
    with pytest.raises(ValueError, match="rows=-1"):
        ops.reserve_counters("cpu", -1)
