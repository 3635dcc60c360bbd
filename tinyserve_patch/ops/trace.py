"""Per-program timestamps of traced kernel launches: where a decode step's time goes across kernels.

A :class:`KernelTrace` passed as ``trace=`` to the Triton launchers (score, select, attention + merge,
and the chains that call them) makes every program of those launches record the GPU's global timer
(``%globaltimer``, ns) when it starts, when its inputs are ready (after the wait for the previous grid,
or for its row in the row-chained mode) and when it ends, with the SM it ran on. Without a trace the
kernels compile exactly as before (the stores are behind a ``constexpr``). CUDA only (the timer is a
PTX register); ``benchmarks/chain_timeline.py`` turns the records into a timeline.

Layout: one int64 buffer ``[capacity, 4]`` = (start, ready, end, SM) per program; each launch takes the
next ``programs`` rows as a named region (program ``pid0 + pid1 * num_programs(0)`` at its row).
"""

from __future__ import annotations

import torch

from ._triton_common import check


class KernelTrace:
    """Regions of per-program timestamps, one per traced launch (see module docstring)."""

    FIELDS = ("start", "ready", "end", "sm")

    def __init__(self, device: torch.device | str = "cuda", capacity: int = 65536):
        device = torch.device(device)
        check(device.type == "cuda", f"a kernel trace needs a CUDA device (the PTX global timer), got {device}")
        check(capacity >= 1, f"capacity={capacity} must be >= 1")
        self.buffer = torch.zeros((capacity, 4), dtype=torch.int64, device=device)
        self.regions: list[tuple[str, int, int]] = []  # (kernel, first row, programs) in launch order
        self._used = 0

    def region(self, kernel: str, programs: int, device: torch.device) -> torch.Tensor:
        """The next ``programs`` rows ``[programs, 4]`` for one launch of ``kernel`` on ``device``."""
        check(device == self.buffer.device, f"traced launch on {device}, trace buffer on {self.buffer.device}")
        check(self._used + programs <= self.buffer.shape[0],
              f"kernel trace full: {self._used} + {programs} programs > capacity {self.buffer.shape[0]}")
        view = self.buffer[self._used : self._used + programs]
        self.regions.append((kernel, self._used, programs))
        self._used += programs
        return view

    def records(self) -> list[dict]:
        """One dict per traced launch, in launch order: ``kernel`` and, per program, ``start`` / ``ready`` /
        ``end`` (ns of the global timer) and ``sm``, as Python lists (synchronises with the device)."""
        rows = self.buffer[: self._used].cpu()
        return [
            {"kernel": name, **{f: rows[first : first + n, i].tolist() for i, f in enumerate(self.FIELDS)}}
            for name, first, n in self.regions
        ]
