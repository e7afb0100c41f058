"""A real Triton server (no mock) on a generated repository over a tiny random DMS engine.

One server for the module, started by the serve command: HTTP, gRPC, streaming (ensemble and BLS),
bad requests, in-flight batching, the KV pool draining, a short load, perf_analyzer and the gates, `ask`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_engine_dir  # noqa: E402

from pipeline.serve import client, perf  # noqa: E402
from pipeline.serve.load import kv_pool_metrics, run_load, wait_pool_empty  # noqa: E402
from pipeline.serve.repo import RepoSpec, write_repository  # noqa: E402
from pipeline.serve.server import free_port  # noqa: E402

pytestmark = pytest.mark.server

PROMPT = "the quick brown fox jumps over the lazy dog " * 6  # ~60 tokens: several DMS windows
MAX_INPUT, MAX_OUTPUT = 256, 64


@dataclass
class Served:
    """Where the server of this module listens (started by `python -m pipeline serve`)."""

    model_repo: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str = "127.0.0.1"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m pipeline serve` on a generated repository; Ctrl-C (SIGINT) must stop it cleanly."""
    root = tmp_path_factory.mktemp("serve")
    make_engine_dir(root / "engine", max_input_len=MAX_INPUT, max_output_len=MAX_OUTPUT)
    repo = root / "build" / "tiny-qwen3" / "model_repo"
    write_repository(
        RepoSpec(engine_dir="../../../engine", tokenizer_dir="../../../engine", max_input_len=MAX_INPUT,
                 max_output_len=MAX_OUTPUT, kv_pool_tokens=8192),
        repo,
    )  # fmt: skip
    ports = [free_port() for _ in range(3)]
    cmd = [
        sys.executable, "-m", "pipeline", "serve", "--model", "tiny-qwen3",
        "--build-dir", str(root / "build"),
        "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    for line in proc.stdout:  # the banner ends with the Ctrl-C hint once the server is ready
        banner.append(line)
        if "Ctrl-C stops the server" in line:
            break
    text = "".join(banner)
    if "Ctrl-C stops the server" not in text:  # it exited: show why
        proc.kill()
        pytest.fail(f"`python -m pipeline serve` did not come up:\n{text}")
    assert f"curl -s -X POST http://127.0.0.1:{ports[0]}/v2/models/ensemble/generate" in text
    yield Served(repo, *ports)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "stopped the server" in rest
    with pytest.raises(client.ClientError):  # nothing listens any more
        client.generate_http(f"127.0.0.1:{ports[0]}", "hi", 1)


def test_http_generate_reports_dms_kv_figures(served):
    dms = client.generate_http(served.http_url, PROMPT, 12)
    vanilla = client.generate_http(served.http_url, PROMPT, 12, model="ensemble_vanilla")
    assert dms.text and vanilla.text
    # 2 layers x 2 KV heads: without eviction every stream holds every token it has seen
    assert vanilla.kv_compression_ratio == pytest.approx(1.0)
    assert vanilla.kv_live_tokens % 4 == 0 and vanilla.kv_live_tokens > 4 * 50
    assert dms.kv_compression_ratio > 1.2  # about half the tokens past the window get evicted
    assert dms.kv_live_tokens < vanilla.kv_live_tokens


def test_grpc_matches_http_and_seeded_sampling_repeats(served):
    http = client.generate_http(served.http_url, PROMPT, 10)
    grpc = client.generate_grpc(served.grpc_url, PROMPT, 10)
    assert grpc.text == http.text
    a = client.generate_grpc(served.grpc_url, PROMPT, 10, temperature=1.0, top_k=20, top_p=0.9, random_seed=7)
    b = client.generate_http(served.http_url, PROMPT, 10, temperature=1.0, top_k=20, top_p=0.9, random_seed=7)
    assert a.text == b.text


def test_streaming_grpc_and_http(served):
    full = client.generate_grpc(served.grpc_url, PROMPT, 16, model="tensorrt_llm_bls")
    assert full.text == client.generate_grpc(served.grpc_url, PROMPT, 16).text  # BLS == ensemble
    streamed = client.join(client.stream_grpc(served.grpc_url, PROMPT, 16, model="tensorrt_llm_bls"))
    assert len([p for p in streamed.pieces if p]) > 1
    assert streamed.text == full.text  # incremental detokenization loses nothing
    assert streamed.kv_compression_ratio > 1.0
    # the ensemble streams too: a response per generated token (or per few, when the server was behind),
    # then a final one with the KV figures
    pieces = list(client.stream_grpc(served.grpc_url, PROMPT, 8, end_id=-1))
    assert 2 < len(pieces) <= 9 and pieces[-1].text == "" and pieces[-1].num_tokens == 0
    assert sum(p.num_tokens for p in pieces) == 8  # end_id -1: exactly max_tokens tokens
    sse = client.join(client.stream_http(served.http_url, PROMPT, 16, model="tensorrt_llm_bls"))
    assert sse.text == full.text and len(sse.pieces) > 1


BAD = [
    ("missing input", {"max_tokens": 4}, "missing required input(s) ['text_input']"),
    ("wrong type", {"text_input": "hi", "max_tokens": "four"}, "Unable to parse"),
    ("empty text", {"text_input": "  ", "max_tokens": 4}, "text_input is empty"),
    ("max_tokens 0", {"text_input": "hi", "max_tokens": 0}, "max_tokens is 0"),
    ("max_tokens too big", {"text_input": "hi", "max_tokens": MAX_OUTPUT + 1}, f"between 1 and {MAX_OUTPUT}"),
    ("prompt too long", {"text_input": "fox " * 600, "max_tokens": 4}, f"at most {MAX_INPUT} (max_input"),
]


@pytest.mark.parametrize("body, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_http_requests_get_clear_errors(served, body, message):
    with pytest.raises(client.ClientError) as err:
        client._post(f"http://{served.http_url}/v2/models/ensemble/generate", body, 60).read()
    assert message in str(err.value)


def test_bad_grpc_requests_and_server_keeps_serving(served):
    with pytest.raises(client.ClientError, match="not valid UTF-8"):
        client.generate_grpc(served.grpc_url, b"caf\xe9 \xff", 4)
    with pytest.raises(client.ClientError, match="max_tokens is 0"):
        client.generate_grpc(served.grpc_url, "hi", 0, model="tensorrt_llm_bls")
    with pytest.raises(client.ClientError, match="text_input is empty"):
        list(client.stream_grpc(served.grpc_url, "", 4, model="tensorrt_llm_bls"))
    assert client.generate_grpc(served.grpc_url, PROMPT, 4).text
    assert client.server_ready(served.http_url)


def test_in_flight_batching_matches_sequential_and_pool_drains(served):
    prompts = [f"{PROMPT} {i} {'hello ' * i}" for i in range(6)]
    expected = [client.generate_grpc(served.grpc_url, p, 12).text for p in prompts]
    got: list[str | None] = [None] * len(prompts)

    def one(i: int) -> None:
        got[i] = client.generate_http(served.http_url, prompts[i], 12).text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected  # greedy results do not depend on who else is in the batch
    pool = wait_pool_empty(f"{served.host}:{served.metrics_port}", timeout_s=30)
    assert pool["tensorrt_llm"]["blocks_used"] == 0 and pool["tensorrt_llm"]["blocks_total"] > 0


def test_short_load_has_no_failures(served):
    """Concurrency 16 for a few seconds (the 60 s run: `python -m pipeline.serve.load`)."""
    result = run_load(served.grpc_url, [PROMPT, "hello world", "numbers 1 2 3"], 16, 6.0, 8)
    assert result.failed == 0, result.errors
    assert result.requests >= 16
    wait_pool_empty(f"{served.host}:{served.metrics_port}", timeout_s=30)
    metrics = kv_pool_metrics(f"{served.host}:{served.metrics_port}")
    assert set(metrics) == {"tensorrt_llm", "tensorrt_llm_vanilla"}


def test_perf_analyzer_rows_and_gates(served, tmp_path):
    rows = perf.measure(Path(served.model_repo), tmp_path, (1, 2), 32, 8, 500, server=served)
    assert {(r.method, r.concurrency) for r in rows} == {(m, c) for m in ("dms", "vanilla") for c in (1, 2)}
    assert all(r.inferences_per_s > 0 and 0 < r.p50_ms <= r.p99_ms for r in rows)
    assert (tmp_path / "dms_c2.csv").is_file() and (tmp_path / "input_data.json").is_file()
    ok = perf.verdict(perf.check_gates(rows, 0.01, 1e9))
    assert ok["passed"] and "message" not in ok and perf.dms_over_vanilla(rows) > 0
    impossible = perf.verdict(perf.check_gates(rows, 1e9, 1e9))
    assert not impossible["passed"]
    measured = next(c["measured"] for c in impossible["checks"] if c["name"] == "min_inferences_per_s")
    message = impossible["message"]
    assert "min_inferences_per_s" in message and str(measured) in message and "1000000000.0" in message


def test_ask_command(served, capsys):
    from pipeline.serve.cli import ask_command

    base = dict(max_tokens=6, temperature=0.0, timeout=120.0, model=None)
    assert ask_command(argparse.Namespace(prompt=PROMPT, url=served.http_url, protocol="http", stream=False,
                                          **base)) == 0  # fmt: skip
    out = capsys.readouterr()
    assert out.out.strip() and "live KV entries (tokens summed over layers and KV heads)" in out.err
    assert ask_command(argparse.Namespace(prompt=PROMPT, url=served.grpc_url, protocol="grpc", stream=True,
                                          **base)) == 0  # fmt: skip
    assert ask_command(argparse.Namespace(prompt="", url=served.grpc_url, protocol="grpc", stream=False,
                                          **base)) == 1  # fmt: skip
    assert "text_input is empty" in capsys.readouterr().err
    vanilla = {**base, "model": "ensemble_vanilla"}
    assert ask_command(argparse.Namespace(prompt=PROMPT, url=served.http_url, protocol="http", stream=False,
                                          **vanilla)) == 0  # fmt: skip
    assert "compression 1.00x" in capsys.readouterr().err  # eviction off


def test_serve_on_a_busy_port_names_the_port_and_the_flag(served):
    cmd = [
        sys.executable, "-m", "pipeline", "serve", "--model", "tiny-qwen3",
        "--build-dir", str(served.model_repo.parent.parent), "--http-port", str(served.http_port),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"port {served.http_port} on 127.0.0.1 is already in use" in done.stderr
    assert "--http-port" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ask_without_a_server_says_so(protocol, capsys):
    from pipeline.serve.cli import ask_command

    url = f"127.0.0.1:{free_port()}"
    args = argparse.Namespace(prompt="hi", url=url, protocol=protocol, stream=False, max_tokens=2,
                              temperature=0.0, timeout=60.0, model=None)  # fmt: skip
    assert ask_command(args) == 1
    err = capsys.readouterr().err
    assert "cannot reach" in err and url in err and "make serve" in err and "Traceback" not in err


def test_one_port_for_two_endpoints_is_refused_before_starting(tmp_path):
    from pipeline.serve.server import ServerError, TritonServer

    server = TritonServer(tmp_path, http_port=8123, grpc_port=8123)
    with pytest.raises(ServerError, match="--http-port 8123, --grpc-port 8123, .*: each endpoint needs"):
        server.start()
    assert server.process is None


@pytest.mark.parametrize("value", ["70000", "-1"])
def test_a_port_out_of_range_is_an_argument_error(value, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as err:
        main(["serve", "--http-port", value])
    assert err.value.code == 2 and f"{value} is not a port (0-65535)" in capsys.readouterr().err


def test_ask_names_a_wrong_port_or_protocol_and_a_timeout(capsys):
    """Real sockets standing where the server should be: one answers something that is not HTTP (a gRPC
    port asked over HTTP), one never answers."""
    import socket
    import threading

    from pipeline.serve.cli import ask_command

    def ask(url: str, timeout: float) -> str:
        args = argparse.Namespace(prompt="hi", url=url, protocol="http", stream=False, max_tokens=2,
                                  temperature=0.0, timeout=timeout, model=None)  # fmt: skip
        assert ask_command(args) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    with socket.socket() as other, socket.socket() as silent:
        for sock in (other, silent):
            sock.bind(("127.0.0.1", 0))
            sock.listen(4)

        def not_http():
            conn, _ = other.accept()
            conn.recv(4096)
            conn.sendall(b"\x00\x00\x12\x04 not http\r\n\r\n")
            conn.close()

        threading.Thread(target=not_http, daemon=True).start()
        url = f"http://127.0.0.1:{other.getsockname()[1]}/"  # a scheme and a slash are accepted too
        assert "wrong port or protocol?" in ask(url, 10)
        assert "within 1 s (--timeout)" in ask(f"127.0.0.1:{silent.getsockname()[1]}", 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nosuch"], "unknown model 'nosuch'"),
        (["--build-dir", "/nonexistent-build"], "no model repository at /nonexistent-build/tiny-qwen3"),
        (["--concurrency", "0"], "--concurrency must be >= 1"),
    ],
)
def test_load_tool_bad_input_is_one_line(argv, message, capsys):
    from pipeline.serve.load import main as load_main

    with pytest.raises(SystemExit) as err:
        load_main(argv)
    out = capsys.readouterr().err
    assert err.value.code == 2 and message in out and "Traceback" not in out


def _engine_token_ids(grpc_url: str, streaming: bool) -> list[list[int]]:
    """The engine model's responses to one greedy request (10 tokens), as token id lists."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name, value, dtype="INT32"):
        t = grpcclient.InferInput(name, [1, len(value)], dtype)
        t.set_data_from_numpy(np.array([value], np.int32 if dtype == "INT32" else bool))
        return t

    results: queue.Queue = queue.Queue()
    grpc = grpcclient.InferenceServerClient(grpc_url)
    grpc.start_stream(callback=lambda result, error: results.put((result, error)))
    inputs = [tensor("input_ids", [5, 6, 7, 8]), tensor("input_lengths", [4]),
              tensor("request_output_len", [10]), tensor("end_id", [-1]),
              tensor("streaming", [streaming], "BOOL")]  # fmt: skip
    grpc.async_stream_infer("tensorrt_llm", inputs, enable_empty_final_response=True)
    out = []
    while True:
        result, error = results.get(timeout=60)
        assert error is None, error
        ids = result.as_numpy("output_ids")
        if ids is not None and ids.size:
            out.append(ids.reshape(-1).tolist())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    grpc.stop_stream()
    grpc.close()
    return out


def test_streamed_responses_carry_stream_interval_tokens_and_the_profile_counts_them(tmp_path):
    """With stream_interval 4 the first response goes as soon as there is a token, then 4 or more tokens a
    response, the rest before the end; the tokens are one response's, and perf_analyzer's profile export
    counts every one."""
    from pipeline.serve import equal_memory, perf
    from pipeline.serve.profile import figures, read_export
    from pipeline.serve.server import TritonServer
    from pipeline.serve.text import load_tokenizer

    make_engine_dir(tmp_path / "engine", max_input_len=MAX_INPUT, max_output_len=64)
    repo = tmp_path / "repo"
    write_repository(RepoSpec(engine_dir="../engine", tokenizer_dir="../engine", max_input_len=MAX_INPUT,
                              max_output_len=64, kv_pool_tokens=8192, stream_interval=4), repo)  # fmt: skip
    config = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'key: "stream_interval" value: { string_value: "4" }' in config
    with TritonServer(repo) as server:
        pieces = list(client.stream_grpc(server.grpc_url, PROMPT, 10, end_id=-1))
        counts = [p.num_tokens for p in pieces]  # the dispatcher sends whatever waits, 4 or more
        assert all(k >= 4 for k in counts[1:-2]) and counts[-1] == 0, counts  # 0: the end (KV figures)
        assert sum(counts) == 10 and len(counts) <= 5, counts
        assert client.generate_grpc(server.grpc_url, PROMPT, 10, end_id=-1).num_tokens == 10
        streamed, whole = _engine_token_ids(server.grpc_url, True), _engine_token_ids(server.grpc_url, False)
        assert len(streamed) > 1 and sum(streamed, []) == whole[0] and len(whole[0]) == 10
        data = tmp_path / "input_data.json"
        tokenizer = load_tokenizer(tmp_path / "engine")
        data.write_text(json.dumps(equal_memory.input_data(tokenizer, 16, 9, num_prompts=2)))  # streamed
        export = perf.run_perf_analyzer_requests("ensemble", server.grpc_url, data, 2, 2, tmp_path / "x.json")
    timings = read_export(export)[2]
    assert [len(t.token_ns) for t in timings] == [9, 9]
    raw = json.loads(export.read_text())["experiments"][0]["requests"]
    assert all(len(r["response_timestamps"]) <= 4 for r in raw)  # 1 + 4 + 4 tokens, then the end
    f = figures(timings)
    assert f.output_tokens == 18 and 0 < f.itl_ms_p50 <= f.itl_ms_p99


def test_a_cancelled_request_frees_its_kv_blocks_at_the_next_token(tmp_path):
    """4000 tokens take ~11 s here. A gRPC client calling the engine model directly (as TensorRT-LLM
    backend clients do) that cancels after 1 s must not keep it generating, and its KV blocks held, that
    long; nor must one cancelling a request to the BLS model. (Triton 2.51 does not pass an ensemble
    request's cancellation on to the models inside it.)"""
    import queue
    import time

    import numpy as np
    import tritonclient.grpc as grpcclient

    from pipeline.serve.server import TritonServer

    def tensor(name, value):
        t = grpcclient.InferInput(name, [1, len(value)], "INT32")
        t.set_data_from_numpy(np.array([value], np.int32))
        return t

    make_engine_dir(tmp_path / "engine", max_input_len=64, max_output_len=4096)
    repo = tmp_path / "repo"
    write_repository(RepoSpec(engine_dir="../engine", tokenizer_dir="../engine", max_input_len=64,
                              max_output_len=4096, kv_pool_tokens=65536), repo)  # fmt: skip
    with TritonServer(repo) as server:
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        grpc.start_stream(callback=lambda result, error: queue.Queue().put(error))
        inputs = [tensor("input_ids", [5, 6, 7, 8]), tensor("input_lengths", [4]),
                  tensor("request_output_len", [4000]), tensor("end_id", [-1])]  # fmt: skip
        grpc.async_stream_infer("tensorrt_llm", inputs)
        time.sleep(1.0)
        metrics = f"{server.host}:{server.metrics_port}"
        assert kv_pool_metrics(metrics)["tensorrt_llm"]["running"] == 1  # still generating
        cancelled = time.monotonic()
        grpc.stop_stream(cancel_requests=True)
        wait_pool_empty(metrics, timeout_s=30)
        assert time.monotonic() - cancelled < 3.0
        grpc.close()
        # Through the BLS model (ours): it passes the cancellation on to its engine request. It once
        # ran on for ~20 s after the client had gone.
        pieces = client.stream_grpc(server.grpc_url, "hello world", 4000, model="tensorrt_llm_bls", end_id=-1)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            next(pieces)
        assert kv_pool_metrics(metrics)["tensorrt_llm"]["running"] == 1
        cancelled = time.monotonic()
        pieces.close()  # the client leaves: stream_grpc cancels its request
        wait_pool_empty(metrics, timeout_s=30)
        assert time.monotonic() - cancelled < 3.0
