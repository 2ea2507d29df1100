"""Peak resident memory of a block of code, for the benchmark tables.

Linux keeps a high-water mark of the resident set (``VmHWM`` in ``/proc/self/status``) that
writing ``5`` to ``/proc/self/clear_refs`` resets. :class:`PeakMemory` resets it on entry and
reads it on exit, so the figure covers torch's and XLA's allocators as well as Python's. Where the
reset is not allowed (another OS, a locked-down container) a background thread samples the
resident set every few milliseconds instead; short spikes between samples can then be missed.

Example:
    >>> import numpy as np
    >>> with PeakMemory() as peak:
    ...     _ = np.ones(10_000_000)          # 80 MB
    >>> peak.megabytes > 50                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import gc
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so earlier runs do not hide this one's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Context manager: ``megabytes`` is the peak resident set in the block minus the one at entry.

    Attributes:
        megabytes: Peak increment in MiB (``nan`` when the platform exposes no resident-set size).
        method: ``"hwm"`` (kernel high-water mark) or ``"sampled"`` (polling thread).
    """

    def __init__(self, *, interval: float = 0.002) -> None:
        self.interval = interval
        self.megabytes = float("nan")
        self.method = "none"
        self._baseline_kb: int | None = None
        self._peak_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        _release_free_memory()
        self._baseline_kb = _status_kb("VmRSS")
        if self._baseline_kb is None:
            return self
        if _reset_high_water_mark():
            self.method = "hwm"
        else:
            self.method = "sampled"
            self._peak_kb = self._baseline_kb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak_kb = max(self._peak_kb, _status_kb("VmRSS") or 0)

    def __exit__(self, *exc: object) -> None:
        if self._baseline_kb is None:
            return
        if self.method == "hwm":
            self._peak_kb = _status_kb("VmHWM") or 0
        else:
            self._stop.set()
            self._thread.join()
            self._peak_kb = max(self._peak_kb, _status_kb("VmRSS") or 0)
        self.megabytes = max(self._peak_kb - self._baseline_kb, 0) / 1024.0
