"""Shared by the bench_* scripts: what they say about the machine and the command they ran, and
how they write their section of BENCHMARKS.md."""
from __future__ import annotations

import datetime as _dt
import os
import shlex
from pathlib import Path
from typing import Sequence


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


def section_header(heading: str, script: str, argv: Sequence[str], machine: str, env: Sequence[str] = ()) -> str:
    """The heading, the command as typed (arguments quoted, the named environment variables
    that were set in front), the date and the machine line of a BENCHMARKS.md section."""
    cmd = f"python benchmarks/{script} {shlex.join(argv)}".strip()
    prefix = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in env if os.environ.get(k))
    cmd = f"{prefix} {cmd}".strip()
    return (
        f"{heading}\n\n"
        f"Command: `{cmd}`  \n"
        f"Date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}  \n"
        f"Machine: {machine}  \n"
    )


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) the ``heading`` section of a markdown file, keeping the others."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
