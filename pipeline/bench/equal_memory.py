"""`make bench`'s equal-memory section: how many tokens per second one KV memory budget serves, DMS
against vanilla, from the engine alone (the served figure, through Triton, is the perf stage's).

One budget in bytes sizes both engines' pools. `requests` requests of `prompt_tokens` tokens of task
text each generate `new_tokens` tokens (EOS ignored), all offered at once, so the scheduler admits as
many as the pool holds: vanilla only as many as fit uncompressed, DMS as many as its compression allows.
Output tokens per second = all generated tokens / the wall time from the first submission to the last
completion (prefills included: they are part of serving).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.bench.decode import task_prompts, tiny_model
from pipeline.runtime.engine import Engine
from pipeline.runtime.limits import EngineLimits
from pipeline.runtime.model import ModelArgs
from pipeline.runtime.policies import DMSPolicy, NoEviction

BLOCK = 16


def pool_tokens_for(budget_bytes: int, config: dict[str, Any], dtype_bytes: int = 4) -> int:
    """kv_pool_tokens (slots per (layer, KV head)) that `budget_bytes` of K and V buy for this model."""
    a = ModelArgs.from_hf_config(config)
    per_slot = 2 * a.head_dim * dtype_bytes * a.num_layers * a.num_kv_heads
    return budget_bytes // per_slot // BLOCK * BLOCK


def run_equal_memory(
    card_name: str = "tiny-qwen3",
    build_dir: Path = Path("build"),
    requests: int = 64,
    prompt_tokens: int = 128,
    new_tokens: int = 1024,
    vanilla_sequences: int = 8,
) -> dict[str, Any]:
    """The `equal_memory` section of bench.json. The budget holds `vanilla_sequences` whole requests
    uncompressed (plus a block of slack per stream)."""
    config, state, model_desc, trained = tiny_model(card_name, build_dir)
    a = ModelArgs.from_hf_config(config)
    slots = vanilla_sequences * (prompt_tokens + new_tokens + 2 * BLOCK)
    budget = slots * 2 * a.head_dim * 4 * a.num_layers * a.num_kv_heads  # float32 K and V
    limits = EngineLimits(
        max_batch_size=requests, max_input_len=prompt_tokens, max_output_len=new_tokens,
        kv_block_size=BLOCK, kv_pool_tokens=pool_tokens_for(budget, config),
    )  # fmt: skip
    if trained is not None:
        prompts = task_prompts(trained, requests, prompt_tokens)
        dms = DMSPolicy()
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, a.vocab_size, (prompt_tokens,), generator=g).tolist()
                   for _ in range(requests)]
        dms = DMSPolicy(window=32, force_cr=8)
    rows = {}
    for name, policy in (("dms", dms), ("vanilla", NoEviction())):
        engine = Engine.from_state(config, state, limits, policy=policy, device="cpu")
        engine.generate([prompts[0][:16]], max_tokens=4, ignore_eos=True)  # warm-up
        start = time.perf_counter()
        handles = [engine.submit(p, max_tokens=new_tokens, ignore_eos=True) for p in prompts]
        running_max = waiting_max = 0
        with tqdm(total=requests, desc=f"equal memory: {name}", unit="req") as bar:
            done = 0
            while engine.has_work():
                engine.step()
                stats = engine.pool_stats()
                running_max = max(running_max, stats["running"])
                waiting_max = max(waiting_max, stats["waiting"])
                finished = sum(h.done for h in handles)
                bar.update(finished - done)
                done = finished
        wall = time.perf_counter() - start
        outs = [h.result() for h in handles]
        errors = [o.error for o in outs if o.error]
        if errors:
            raise RuntimeError(f"equal memory, {name}: {errors[0]}")
        generated = sum(len(o.token_ids) for o in outs)
        rows[name] = {
            "output_tokens_per_s": generated / wall,
            "wall_s": wall,
            "running_max": running_max,
            "queued_max": waiting_max,
            "preemptions": sum(o.stats["preemptions"] for o in outs),
            "mean_cr": sum(o.stats["compression_ratio"] for o in outs) / len(outs),
            "pool_blocks_used_after": engine.pool_stats()["blocks_used"],
        }
    return {
        "model": model_desc,
        "kv_memory_bytes": budget,
        "kv_pool_tokens": limits.kv_pool_tokens,
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": new_tokens,
        "rows": rows,
        "dms_over_vanilla_tokens_per_s": (
            rows["dms"]["output_tokens_per_s"] / rows["vanilla"]["output_tokens_per_s"]
        ),
    }


def served(card_name: str = "tiny-qwen3", build_dir: Path = Path("build")) -> dict[str, Any] | None:
    """The perf stage's equal-memory figures at its highest concurrency (None: perf has not run)."""
    path = build_dir / card_name / "perf" / "summary.json"
    try:
        section = json.loads(path.read_text())["equal_memory"]
    except (OSError, ValueError, KeyError):
        return None
    top = max(r["concurrency"] for r in section["rows"])
    rows = {r["method"]: r for r in section["rows"] if r["concurrency"] == top}
    keep = ("output_tokens_per_s", "running_max", "mean_cr", "itl_ms_p99", "cpu_ms_per_token")
    return {
        "source": str(path),
        "kv_memory_bytes": section["kv_memory_bytes"],
        "concurrency": top,
        "dms_over_vanilla_tokens_per_s": section["dms_over_vanilla_tokens_per_s"],
        "rows": {m: {k: r.get(k) for k in keep} for m, r in rows.items()},
        "load_average_1m": section.get("load_average_1m"),
    }
