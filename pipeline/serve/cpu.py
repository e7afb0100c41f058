"""CPU time of the served path by part, between two snapshots: the Triton server process, each
python-backend stub (by model), and the client (perf_analyzer runs, waited-for children of this
process). Per generated token it says where a served figure goes (server, tokenization, streaming, the
engine), and unlike wall time it barely moves when other jobs share the machine. Linux (/proc).
"""

from __future__ import annotations

import re
import resource

from pipeline.processes import cpu_seconds
from pipeline.serve.server import TritonServer


def snapshot(server: TritonServer) -> dict[str, float]:
    """CPU seconds so far of the server, of each model's stubs and of the finished client runs."""
    assert server.process is not None
    out = {"triton": cpu_seconds(server.process.pid)}
    for pid, instance in server.workers.items():
        model = re.sub(r"_\d+_\d+$", "", instance)  # instance names are <model>_<group>_<index>
        out[model] = out.get(model, 0.0) + cpu_seconds(pid)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["client"] = usage.ru_utime + usage.ru_stime
    return out


def per_token_ms(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU milliseconds per generated token of each part between two snapshots."""
    if tokens <= 0:
        return {}
    return {k: round(1000 * (after[k] - before.get(k, 0.0)) / tokens, 3) for k in sorted(after)}
