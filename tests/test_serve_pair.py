"""A real Triton server (no mock) serving a DMS TensorRT engine pair's repository: the engine model runs
the pair's host driver (plugins/trtllm/driver.py) over emulated sessions, since no TensorRT engine can be
built here; everything else (the repository, the python model, the ensembles, the BLS streaming model,
the vanilla twin forwarding to the same driver, cancellation, the pool gauges) is what a GPU box serves.
"""

from __future__ import annotations

import json
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_tokenizer  # noqa: E402
from tiny_models import make_tiny_hf  # noqa: E402
from trt_pair import make_pair_dir  # noqa: E402

from pipeline.serve import client  # noqa: E402
from pipeline.serve.load import kv_pool_metrics, wait_pool_empty  # noqa: E402
from pipeline.serve.repo import RepoSpec, write_repository  # noqa: E402

pytestmark = pytest.mark.server

PROMPT = "the quick brown fox jumps over the lazy dog " * 4  # ~40 tokens: several DMS windows
MAX_INPUT, MAX_OUTPUT = 128, 4000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from pipeline.serve.server import TritonServer

    root = tmp_path_factory.mktemp("pair")
    tokenizer = make_tokenizer(root / "tokenizer")
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]) + 1
    hf = make_tiny_hf(
        root / "hf", "qwen3", dms="borrowed", window=8, block=4, vocab_size=vocab, max_positions=4200
    )
    engine = make_pair_dir(
        root / "build",
        hf,
        max_batch_size=8,
        max_input_len=MAX_INPUT,
        max_output_len=MAX_OUTPUT,
        kv_pool_tokens=8192,
        tokenizer_dir=tokenizer,
    )
    repo = root / "model_repo"
    write_repository(
        RepoSpec(
            engine_dir="../build/engine",
            tokenizer_dir="../build/engine/tokenizer",
            backend="dms_pair",
            dms_session="emulated",
            max_batch_size=8,
            max_input_len=MAX_INPUT,
            max_output_len=MAX_OUTPUT,
            kv_pool_tokens=8192,
        ),
        repo,
    )
    with TritonServer(repo, log_path=root / "server.log") as server:
        yield server, engine


def _engine_request(grpcclient, ids: list[int], max_tokens: int):
    def tensor(name, value):
        t = grpcclient.InferInput(name, [1, len(value)], "INT32")
        t.set_data_from_numpy(np.array([value], np.int32))
        return t

    return [
        tensor("input_ids", ids),
        tensor("input_lengths", [len(ids)]),
        tensor("request_output_len", [max_tokens]),
        tensor("end_id", [-1]),
    ]


def test_ensembles_serve_the_driver_with_kv_figures(served):
    server, _ = served
    dms = client.generate_http(server.http_url, PROMPT, 12)
    vanilla = client.generate_http(server.http_url, PROMPT, 12, model="ensemble_vanilla")
    assert dms.text and vanilla.text
    assert dms.kv_compression_ratio > 1.2  # the random model evicts about half the tokens past the window
    assert vanilla.kv_compression_ratio == pytest.approx(1.0)  # the twin: same engines, eviction off
    assert (
        vanilla.kv_live_tokens % 4 == 0 and dms.kv_live_tokens < vanilla.kv_live_tokens
    )  # 2 layers x 2 heads
    assert client.generate_grpc(server.grpc_url, PROMPT, 12).text == dms.text


def test_served_tokens_are_the_drivers(served):
    """The engine model's output ids equal the driver's own greedy tokens on the same pair, in process."""
    import tritonclient.grpc as grpcclient

    from pipeline.runtime.sampling import SamplingParams
    from plugins.trtllm.driver import load_driver

    server, engine = served
    ids = [5, 17, 33, 2, 9, 41, 8, 8, 13, 21, 34, 55, 3, 14, 15, 92, 65, 35, 89, 79]
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: results.put((result, error)))
    grpc.async_stream_infer("tensorrt_llm", _engine_request(grpcclient, ids, 10))  # decoupled: a stream
    result, error = results.get(timeout=120)
    grpc.stop_stream()
    grpc.close()
    assert error is None
    want = load_driver(engine, session="emulated").submit(ids, SamplingParams(max_tokens=10, ignore_eos=True))
    assert result.as_numpy("output_ids").reshape(-1).tolist() == want.result().token_ids


def test_streaming_bls_and_concurrent_requests_then_the_pool_drains(served):
    server, _ = served
    pieces = list(client.stream_grpc(server.grpc_url, PROMPT, 8, end_id=-1))
    # a response per token (or per few, when the server was behind), then the KV figures
    assert 2 < len(pieces) <= 9 and pieces[-1].text == "" and sum(p.num_tokens for p in pieces) == 8
    full = client.generate_grpc(server.grpc_url, PROMPT, 10, model="tensorrt_llm_bls")
    assert (
        client.join(client.stream_grpc(server.grpc_url, PROMPT, 10, model="tensorrt_llm_bls")).text
        == full.text
    )
    prompts = [f"{PROMPT} {i} {'hello ' * i}" for i in range(4)]
    expected = [client.generate_grpc(server.grpc_url, p, 8).text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as clients:  # all in flight at once
        got = list(clients.map(lambda p: client.generate_http(server.http_url, p, 8).text, prompts))
    assert got == expected  # greedy results do not depend on who else is in the batch
    pool = wait_pool_empty(f"{server.host}:{server.metrics_port}", timeout_s=30)
    assert pool["tensorrt_llm"]["blocks_used"] == 0 and pool["tensorrt_llm"]["blocks_total"] > 0


def test_a_cancelled_request_frees_its_blocks(served):
    import tritonclient.grpc as grpcclient

    server, _ = served
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    grpc.start_stream(callback=lambda result, error: queue.Queue().put(error))
    grpc.async_stream_infer("tensorrt_llm", _engine_request(grpcclient, [5, 6, 7, 8], MAX_OUTPUT))
    metrics = f"{server.host}:{server.metrics_port}"
    deadline = time.monotonic() + 30
    while kv_pool_metrics(metrics)["tensorrt_llm"]["running"] != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kv_pool_metrics(metrics)["tensorrt_llm"]["blocks_used"] > 0
    cancelled = time.monotonic()
    grpc.stop_stream(cancel_requests=True)
    wait_pool_empty(metrics, timeout_s=60)
    assert time.monotonic() - cancelled < 3.0  # 4000 tokens take far longer
    grpc.close()
