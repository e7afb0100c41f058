"""KVzip (policies/kvzip.py): the context compressed by reconstruction to the budget, blocks really freed,
and on the committed teacher it finds the needle that a window of the same size loses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.tasks import eval_items
from pipeline.eval.harness import encode_item, engine_for, run_items
from pipeline.hf_files import load_tokenizer

TEACHER = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "tiny-qwen3"


@pytest.fixture(scope="module")
def tokenizer():
    torch.set_num_threads(1)
    return load_tokenizer(TEACHER)


def test_context_is_compressed_to_the_budget_and_blocks_go_back(tokenizer):
    item = eval_items("needle", 256, 1, seed=3)[0]
    ids, context = encode_item(tokenizer, item)
    engine = engine_for(TEACHER, "kvzip", 4.0, max_batch_size=1, max_len=300, kv_block_size=16)
    vanilla = engine_for(TEACHER, "none", None, max_batch_size=1, max_len=300, kv_block_size=16)
    done = engine.submit(ids, max_tokens=2, context_len=context).result()
    full = vanilla.submit(ids, max_tokens=2, context_len=context).result()
    after_context = len(ids) - context + 2  # the question, then what is generated
    keep = engine.policy.context_keep(engine.policy.budget(len(ids) + 2), after_context)
    lens = np.asarray(done.stats["live_tokens_per_stream"])
    # every stream: the context's `keep` most important tokens, then the question and the first answer
    # token (the last generated one is never fed)
    assert (lens == keep + len(ids) - context + 1).all(), (lens, keep)
    assert done.stats["kv_bytes"] < full.stats["kv_bytes"] / 2.5
    assert engine.pool_stats()["blocks_used"] == 0


def test_kvzip_keeps_the_needle_a_window_of_its_size_loses(tokenizer):
    items = eval_items("needle", 256, 4, seed=0)
    scores = {}
    for method in ("kvzip", "window"):
        engine = engine_for(TEACHER, method, 4.0, max_batch_size=4, max_len=300, kv_block_size=16)
        results = run_items(engine, tokenizer, items, method, "4", 4)
        scores[method] = sum(r.correct for r in results)
        assert all(3.0 < r.measured_cr < 5.0 for r in results), [r.measured_cr for r in results]
    assert scores["kvzip"] >= 3 and scores["kvzip"] > scores["window"], scores
