"""perf's equal-memory workload without a server: the pool both engines get from one budget, the
repository copy that gives it to them, the task prompts. The served sweep is in test_perf_stage."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_engine_dir  # noqa: E402

from pipeline.card import CardError, EqualMemorySpec, load_card  # noqa: E402
from pipeline.serve import equal_memory  # noqa: E402
from pipeline.serve.engine_adapter import load_engine  # noqa: E402
from pipeline.serve.repo import RepoSpec, resized_copy, write_repository  # noqa: E402
from pipeline.serve.text import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("em")
    engine = make_engine_dir(root / "engine", max_input_len=64, max_output_len=32)
    spec = RepoSpec(engine_dir="../engine", tokenizer_dir="../engine", max_input_len=64, max_output_len=32)
    write_repository(spec, root / "model_repo")
    assert engine.is_dir()
    return root / "model_repo"


def card_with(**change) -> object:
    card = load_card("tiny-qwen3")
    em = dataclasses.replace(card.perf.equal_memory, **change)
    return dataclasses.replace(card, perf=dataclasses.replace(card.perf, equal_memory=em))


def _params(model_dir: Path) -> dict[str, str]:
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


def test_one_budget_gives_both_engines_the_same_pool(repo, tmp_path):
    # The fixture engine: 2 layers x 2 KV heads x head_dim 16, float32 -> 512 bytes per token; blocks of 4.
    card = card_with(kv_memory_bytes=50_000, input_tokens=24, output_tokens=16, concurrency=(1, 4))
    pool = equal_memory.pool_of(card, repo)
    assert equal_memory.engine_kv_layout(repo) == (512, 4)
    assert pool.kv_pool_tokens == 96 and pool.pool_bytes == 96 * 512 <= 50_000
    assert pool.vanilla_requests == 2  # 24 + BOS + 16 tokens: 11 blocks, and one a step ahead
    copy = resized_copy(repo, tmp_path / "copy", pool.kv_pool_tokens, max_num_sequences=4)
    engines = {}
    for model in ("tensorrt_llm", "tensorrt_llm_vanilla"):
        params = _params(copy / model)
        assert params["max_tokens_in_paged_kv_cache"] == "96" and params["max_num_sequences"] == "4"
        assert Path(params["gpt_model_path"]).is_absolute()  # the copy lives elsewhere
        engines[model] = load_engine(params, copy)
    stats = {m: e.pool_stats() for m, e in engines.items()}
    dms_bytes, vanilla_bytes = (stats[m]["bytes_total"] for m in ("tensorrt_llm", "tensorrt_llm_vanilla"))
    assert dms_bytes == vanilla_bytes == pool.pool_bytes
    assert {e.policy.name for e in engines.values()} == {"dms", "none"}
    assert all(e.limits.max_batch_size == 4 for e in engines.values())
    assert Path(_params(copy / "preprocessing")["tokenizer_dir"]).is_absolute()
    assert _params(repo / "tensorrt_llm")["max_tokens_in_paged_kv_cache"] != "96"  # the original stays


def test_a_budget_the_engine_cannot_use_stops_before_measuring(repo, tmp_path):
    with pytest.raises(CardError, match="one vanilla request of 41 tokens needs 48"):
        equal_memory.pool_of(card_with(kv_memory_bytes=10_000, input_tokens=24, output_tokens=16), repo)
    with pytest.raises(CardError, match="never goes past what the vanilla pool holds \\(2 requests"):
        equal_memory.pool_of(card_with(kv_memory_bytes=50_000, input_tokens=24, output_tokens=16,
                                       concurrency=(1, 2)), repo)  # fmt: skip


def test_task_prompts_stream_long_generations():
    tok = load_tokenizer(Path(equal_memory.__file__).parents[1] / "assets" / "tiny-qwen3")
    data = equal_memory.input_data(tok, 128, 1024, num_prompts=4)["data"]
    texts = [d["text_input"]["content"][0] for d in data]
    assert len(set(texts)) == 4
    for d, text in zip(data, texts, strict=True):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 128 and tok.unk_token_id not in ids
        assert "?" in text.split() or "." in text.split()  # task text: facts and filler, not random words
        assert d["stream"]["content"] == [True] and d["end_id"]["content"] == [-1]
        assert d["max_tokens"]["content"] == [1024]


def test_the_perf_stage_refuses_a_card_without_the_workload():
    from pipeline.stages import perf

    card = load_card("tiny-qwen3")
    with pytest.raises(CardError, match="perf needs a `perf.equal_memory` section"):
        perf.check_card(dataclasses.replace(card, perf=dataclasses.replace(card.perf, equal_memory=None)))
    assert isinstance(card.perf.equal_memory, EqualMemorySpec)
