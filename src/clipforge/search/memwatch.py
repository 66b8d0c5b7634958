"""Peak memory of this process while a block runs, read from ``/proc/self/status`` (Linux).

``RssAnon`` is the memory a process owns (heap, arrays, faiss buffers): what a memory ceiling
must bound. File pages of memory-mapped indexes show in ``VmRSS``/``VmHWM`` but belong to the
page cache, which the kernel reclaims under pressure, so they are reported, not bounded.
``RssAnon`` has no kernel high-water mark: a thread samples it (every ``interval`` seconds), so
the peak can only be under-estimated by a spike shorter than the interval.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

STATUS = "/proc/self/status"


def status_kib(*keys: str) -> dict[str, int]:
    """``{"RssAnon": kib, ...}`` from /proc/self/status (empty where unavailable)."""
    out: dict[str, int] = {}
    try:
        with open(STATUS, encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])
    except OSError:
        pass
    return out


@dataclass
class PeakMemory:
    """``with PeakMemory() as m: ...`` -> ``m.anon_peak_bytes`` (above the level at entry in
    ``m.anon_delta_bytes``) and ``m.hwm_bytes`` (VmHWM, all resident pages, since process start)."""

    interval: float = 0.005
    anon_start_bytes: int = 0
    anon_peak_bytes: int = 0
    hwm_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self) -> None:
        v = status_kib("RssAnon").get("RssAnon", 0) * 1024
        self.anon_peak_bytes = max(self.anon_peak_bytes, v)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self.anon_start_bytes = status_kib("RssAnon").get("RssAnon", 0) * 1024
        self.anon_peak_bytes = self.anon_start_bytes
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.hwm_bytes = status_kib("VmHWM").get("VmHWM", 0) * 1024

    @property
    def anon_delta_bytes(self) -> int:
        return self.anon_peak_bytes - self.anon_start_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"anon_start_bytes": self.anon_start_bytes, "anon_peak_bytes": self.anon_peak_bytes,
                "anon_delta_bytes": self.anon_delta_bytes, "vm_hwm_bytes": self.hwm_bytes}
