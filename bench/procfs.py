"""Resident memory and CPU time of another process, read from /proc (psutil is not installed).

Pure readers with no state: the orchestrator samples them at the edges of a window and
subtracts, so each process (daemon, baseline, every localdc) is measured on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """VmRSS in KiB (0 once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process so far, in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


@dataclass(frozen=True)
class CpuMark:
    """CPU seconds of one process at one monotonic instant."""

    pid: int
    cpu: float
    at: float


def cpu_mark(pid: int, at: float) -> CpuMark:
    return CpuMark(pid, cpu_seconds(pid), at)


def cpu_percent(start: CpuMark, end: CpuMark) -> float:
    """Percent of one core used between two marks of the same process."""
    if start.pid != end.pid:
        raise ValueError("marks of different processes")
    elapsed = end.at - start.at
    return 0.0 if elapsed <= 0 else 100.0 * (end.cpu - start.cpu) / elapsed
