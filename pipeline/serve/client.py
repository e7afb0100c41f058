"""Clients for the served model: HTTP (Triton's generate extension) and gRPC (tritonclient, streaming).

The engine model is decoupled (in-flight batching), as in the TensorRT-LLM backend, so Triton serves
the text models through `/v2/models/<m>/generate` and `/generate_stream` (HTTP) and the gRPC stream
(`ModelStreamInfer`); the plain infer endpoints refuse decoupled pipelines.
"""

from __future__ import annotations

import http.client
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ClientError(RuntimeError):
    """The server refused the request or could not be reached; the message is the server's."""


@dataclass
class Reply:
    """One generation: the text, and the DMS KV figures of the request (None where not reported)."""

    text: str
    kv_live_tokens: int | None = None
    kv_compression_ratio: float | None = None
    pieces: list[str] = field(default_factory=list)  # streamed pieces, in order (streaming only)
    num_tokens: int | None = None  # generated tokens this response carries (the ensemble reports it)


def request_body(
    prompt: str,
    max_tokens: int,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    random_seed: int | None = None,
    stop_words: list[str] | None = None,
    stream: bool | None = None,
    end_id: int | None = None,
) -> dict[str, Any]:
    """The JSON of a generate request (the TensorRT-LLM backend's input names); None fields are left out."""
    body: dict[str, Any] = {"text_input": prompt, "max_tokens": max_tokens}
    extra = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "random_seed": random_seed,
        "stop_words": stop_words,
        "stream": stream,
        "end_id": end_id,  # -1: no end token, generate exactly max_tokens
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def _reply_from_json(data: dict[str, Any]) -> Reply:
    text = data.get("text_output", "")
    if isinstance(text, list):
        text = "".join(text)
    count = data.get("num_output_tokens")
    return Reply(
        text=text,
        kv_live_tokens=data.get("kv_live_tokens"),
        kv_compression_ratio=data.get("kv_compression_ratio"),
        num_tokens=None if count is None else int(count[0] if isinstance(count, list) else count),
    )


def _post(url: str, body: dict[str, Any], timeout_s: float):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        return urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:  # generate_stream reports errors as one server-sent event
            detail = json.loads(detail.strip().removeprefix("data:"))["error"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ClientError(f"HTTP {exc.code}: {detail}") from None
    except TimeoutError:
        raise ClientError(f"no answer from {url} within {timeout_s:.0f} s (--timeout)") from None
    except urllib.error.URLError as exc:
        raise ClientError(f"cannot reach {url}: {exc.reason} (is `make serve` running?)") from None
    except (http.client.HTTPException, ConnectionError) as exc:  # something else answered
        raise ClientError(
            f"{url} did not answer as Triton's HTTP endpoint does ({type(exc).__name__}: "
            f"{str(exc).strip()}); wrong port or protocol? (HTTP is 8000 and gRPC 8001 by default)"
        ) from None


@contextmanager
def _reading(url: str, timeout_s: float):
    """A server that answered its headers, then stalls, breaks off or sends something that is not JSON:
    one ClientError saying which."""
    try:
        yield
    except TimeoutError:
        raise ClientError(
            f"{url} stopped answering: nothing for {timeout_s:g} s in the middle of the reply (--timeout)"
        ) from None
    except (http.client.HTTPException, ConnectionError) as exc:
        raise ClientError(f"{url} broke off its reply ({type(exc).__name__}: {exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(f"{url} answered something that is not Triton's JSON ({exc})") from None


def generate_http(
    url: str, prompt: str, max_tokens: int, model: str = "ensemble", timeout_s: float = 600.0, **params
) -> Reply:
    """POST /v2/models/<model>/generate; `url` is host:port of the HTTP endpoint."""
    body = request_body(prompt, max_tokens, **params)
    endpoint = f"http://{url}/v2/models/{model}/generate"
    with _post(endpoint, body, timeout_s) as resp, _reading(endpoint, timeout_s):
        return _reply_from_json(json.loads(resp.read()))


def stream_http(
    url: str, prompt: str, max_tokens: int, model: str = "ensemble", timeout_s: float = 600.0, **params
) -> Iterator[Reply]:
    """POST /v2/models/<model>/generate_stream (server-sent events): one Reply per streamed piece.
    `timeout_s` bounds the wait for each piece, so a stalled server is an error, not a hang."""
    body = request_body(prompt, max_tokens, stream=True, **params)
    endpoint = f"http://{url}/v2/models/{model}/generate_stream"
    with _post(endpoint, body, timeout_s) as resp:
        while True:
            with _reading(endpoint, timeout_s):
                raw = resp.readline()
                if not raw:
                    return
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = json.loads(line[len("data:") :])
            if "error" in data:
                raise ClientError(data["error"])
            yield _reply_from_json(data)


def _grpc_inputs(grpcclient, body: dict[str, Any]) -> list:
    """Request JSON -> tritonclient InferInputs with batch dimension 1 (the models' max_batch_size > 0)."""
    kinds = {
        "text_input": ("BYTES", object),
        "max_tokens": ("INT32", np.int32),
        "temperature": ("FP32", np.float32),
        "top_k": ("INT32", np.int32),
        "top_p": ("FP32", np.float32),
        "random_seed": ("UINT64", np.uint64),
        "stream": ("BOOL", bool),
        "end_id": ("INT32", np.int32),
        "stop_words": ("BYTES", object),
    }
    inputs = []
    for name, value in body.items():
        dtype, np_type = kinds[name]
        values = value if isinstance(value, list) else [value]
        if np_type is object:
            values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        array = np.array([values], dtype=np_type)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def stream_grpc(
    url: str,
    prompt: str,
    max_tokens: int,
    model: str = "ensemble",
    stream: bool = True,
    timeout_s: float = 600.0,
    **params,
) -> Iterator[Reply]:
    """gRPC bidirectional stream: one Reply per response until the final one (`stream=False`: one)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    body = request_body(prompt, max_tokens, stream=stream, **params)
    results: queue.Queue = queue.Queue()
    finished = False
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, _grpc_inputs(grpcclient, body), enable_empty_final_response=True)
        while True:
            try:
                result, error = results.get(timeout=timeout_s)
            except queue.Empty:
                raise ClientError(f"no response from {url} within {timeout_s:.0f} s") from None
            if error is not None:
                raise _grpc_error(url, error)
            final = result.get_response().parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            if text is not None:
                reply = Reply(text="".join(t.decode("utf-8", errors="replace") for t in text.reshape(-1)))
                live = result.as_numpy("kv_live_tokens")
                ratio = result.as_numpy("kv_compression_ratio")
                reply.kv_live_tokens = None if live is None else int(live.reshape(-1)[0])
                reply.kv_compression_ratio = None if ratio is None else float(ratio.reshape(-1)[0])
                count = result.as_numpy("num_output_tokens")
                reply.num_tokens = None if count is None else int(count.reshape(-1)[0])
                yield reply
            if final:
                finished = True
                return
    except InferenceServerException as exc:
        try:  # a broken stream says only that it broke; the callback has the cause
            exc = results.get_nowait()[1] or exc
        except queue.Empty:
            pass
        raise _grpc_error(url, exc) from None
    finally:
        # Leaving early (a timeout, an error, the caller stopped reading): cancel the request, so the
        # server stops generating and frees its KV blocks; without it stop_stream waits for the end.
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _grpc_error(url: str, error: Exception) -> ClientError:
    from tritonclient.utils import InferenceServerException

    message = error.message() if isinstance(error, InferenceServerException) else str(error)
    if "failed to connect" in message or "Socket closed" in message:
        return ClientError(
            f"cannot reach {url} over gRPC: {message} (is `make serve` running, and is this its gRPC port? "
            "HTTP is 8000 and gRPC 8001 by default)"
        )
    return ClientError(message)


def generate_grpc(url: str, prompt: str, max_tokens: int, model: str = "ensemble", **params) -> Reply:
    """One non-streamed generation over gRPC (the stream RPC carrying a single response)."""
    return join(stream_grpc(url, prompt, max_tokens, model=model, stream=False, **params))


def join(replies: Iterator[Reply]) -> Reply:
    """Concatenate streamed pieces; the KV figures are the last ones reported (the request's final state)."""
    out = Reply(text="")
    for reply in replies:
        out.pieces.append(reply.text)
        out.text += reply.text
        if reply.kv_live_tokens is not None:
            out.kv_live_tokens = reply.kv_live_tokens
            out.kv_compression_ratio = reply.kv_compression_ratio
        if reply.num_tokens is not None:
            out.num_tokens = (out.num_tokens or 0) + reply.num_tokens
    return out


def server_ready(http_url: str) -> bool:
    import tritonclient.http as httpclient

    try:
        return bool(httpclient.InferenceServerClient(http_url).is_server_ready())
    except Exception:  # any failure to connect means "not ready"
        return False
