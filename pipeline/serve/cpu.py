"""CPU time of the served path, by part: the Triton server process, each python-backend model's stub,
and the client (perf_analyzer, a child of this process). Per generated token it says where a served
figure goes (server, tokenization, streaming, the engine), and unlike wall time it barely moves when
other jobs share the machine. Linux only (/proc); elsewhere it reports nothing.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S  # fields 14 and 15 of stat(5)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _role(pid: int) -> str:
    """`triton`, or the model a python-backend stub runs (its command line names <model>/1/model.py)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    for arg in args:
        if arg.endswith(b"/model.py"):
            return Path(arg.decode()).parent.parent.name
    return "triton"


def snapshot(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the server and each of its stubs (by role), and of this process's waited-for
    children (`client`: perf_analyzer runs)."""
    out: dict[str, float] = {"triton": _cpu_s(server_pid)}
    for child in _children(server_pid):
        role = _role(child)
        out[role] = out.get(role, 0.0) + _cpu_s(child)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["client"] = usage.ru_utime + usage.ru_stime
    return out


def per_token_ms(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU milliseconds per generated token of each part between two snapshots."""
    if tokens <= 0:
        return {}
    return {k: round(1000 * (after[k] - before.get(k, 0.0)) / tokens, 3) for k in sorted(after)}
