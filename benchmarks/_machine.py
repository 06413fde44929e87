"""What every benchmark prints about the machine it ran on (shared by the bench_* scripts)."""
from __future__ import annotations

import os


def cpu_and_cores() -> tuple[str, int]:
    """CPU model name (from /proc/cpuinfo where available) and the cores this process may use."""
    cpu = ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpu, int(cores or 1)
