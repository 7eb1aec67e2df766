"""Peak memory of one benchmarked mode, and the device sync every timing needs.

    >>> import torch
    >>> mem = PeakMemory(torch.device("cpu"))
    >>> base = mem.start(); mem.peak() >= base
    True
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def sync(device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (no-op on CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


class PeakMemory:
    """CUDA's allocator peak, or the process's peak RSS on CPU, reset at :meth:`start`."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.kind = ""  # what was measured, written next to the figure

    @staticmethod
    def _status_bytes(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def start(self) -> int:
        """Reset the peak; returns the memory in use now (the baseline)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated (reset per mode; weights included)"
            return torch.cuda.memory_allocated(self.device)
        try:  # Linux: writing 5 resets the peak RSS (VmHWM) so each mode gets its own peak
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "cpu peak RSS of the process, VmHWM reset per mode (weights and interpreter included)"
        except OSError:
            self.kind = "cpu peak RSS of the process since it started (ru_maxrss; not reset per mode)"
        rss = self._status_bytes("VmRSS")
        return rss if rss is not None else 0

    def peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        hwm = self._status_bytes("VmHWM")
        if hwm is not None and "VmHWM" in self.kind:
            return hwm
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024  # bytes on macOS, KiB on Linux
