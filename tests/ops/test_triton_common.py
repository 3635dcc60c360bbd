"""Launch-side helpers of the Triton kernels that do not need a GPU."""

from __future__ import annotations

import torch

from tinyserve_patch.ops._triton_common import use_pdl


def test_pdl_only_on_cuda_and_switchable(monkeypatch):
    """Programmatic dependent launch is a CUDA (Hopper+) launch option: never on CPU tensors or under the
    interpreter, and TINYSERVE_PDL=0 turns it off everywhere."""
    assert use_pdl(torch.device("cpu")) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_pdl(torch.device("cuda", 0)) is False  # decided before any CUDA query
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TINYSERVE_PDL", "0")
    assert use_pdl(torch.device("cuda", 0)) is False
