"""Triton python model: the DMS engine with in-flight batching across requests: pipeline.runtime's, or
the DMS TensorRT engine pair's host driver (plugins/trtllm/driver.py), which load_engine picks by the
model's parameters.

Decoupled: execute() hands each request to the engine's background step loop and returns at once. The
engine puts every request's tokens and its end into one outbox, and one dispatcher thread forwards them
(streaming) or the whole output to the request's response sender. One thread, not one per request: with
64 requests streaming, 64 threads waking per token fought the engine's loop for the GIL. A streamed
response carries every token of its request that is waiting when it is sent, and at least
`stream_interval` of them (vLLM's knob of that name) except the first and the last: each response costs
the server, the ensemble's postprocessing and the client as much CPU as one token's decode step.
A request with `stop` true cancels the running request of the same request id (TensorRT-LLM's
convention; the BLS model passes its clients' cancellations on this way, Triton 2.51 has no other). All
request logic lives in pipeline.serve.engine_adapter.
"""

import json
import queue
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from dms_core.serving import TokenEvent
from pipeline.serve.engine_adapter import ends_with_stop, load_engine, parse_request, set_cpu_threads
from pipeline.serve.text import RequestError

INPUTS = (
    "input_ids",
    "input_lengths",
    "request_output_len",
    "end_id",
    "pad_id",
    "stop_words_list",
    "runtime_top_k",
    "runtime_top_p",
    "temperature",
    "random_seed",
    "streaming",
    "stop",
    "eviction",  # declared by the DMS engine pair's model only: false serves the request with eviction off
)
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# is_cancelled() is a round trip to the server, as costly as sending a token: asked every 0.1 s, not
# every token.
CANCEL_POLL_S = 0.1


def _response(token_ids, live_tokens, ratio):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("output_ids", np.asarray(token_ids, np.int32).reshape(1, 1, -1)),
            pb_utils.Tensor("sequence_length", np.array([[len(token_ids)]], np.int32)),
            pb_utils.Tensor("kv_live_tokens", np.array([[live_tokens]], np.int32)),
            pb_utils.Tensor("kv_compression_ratio", np.array([[ratio]], np.float32)),
        ]
    )


def _error(message, invalid_request=False):
    code = pb_utils.TritonError.INVALID_ARG if invalid_request else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.name = args["model_name"]
        set_cpu_threads(params)
        self.engine = load_engine(params, Path(args["model_repository"]).resolve().parent)
        self.stream_interval = max(1, int(params.get("stream_interval", "") or 1))
        self.engine.start()
        # Gauges on Triton's /metrics (the families must outlive their metrics, hence both kept)
        self.families, self.metrics = [], {}
        for key, desc in (
            ("blocks_used", "KV pool blocks in use"),
            ("blocks_total", "KV pool blocks"),
            ("bytes_total", "KV pool bytes"),
            ("running", "requests in the running batch"),
            ("waiting", "requests queued for admission"),
            ("preemptions", "requests preempted (recomputed later) since the model loaded"),
            ("mean_compression_ratio", "mean KV compression ratio of the running requests"),
        ):
            family = pb_utils.MetricFamily(
                name=f"dms_kv_pool_{key}", description=desc, kind=pb_utils.MetricFamily.GAUGE
            )
            self.families.append(family)
            self.metrics[key] = family.Metric(labels={"model": self.name})
        self._by_id = {}  # request id -> handles running under it (for `stop` requests)
        self._replies = {}  # handle -> its _Reply, until the request ends
        self._lock = threading.Lock()  # guards both (execute and the dispatcher)
        self._outbox = queue.SimpleQueue()  # (handle, TokenEvent | Completion) from the engine
        self._stopped = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, daemon=True)
        self._publisher.start()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True)
        self._dispatcher.start()

    def _publish_loop(self):
        """Refresh the gauges twice a second (one writer: no stale value can land last)."""
        while True:
            stats = self.engine.pool_stats()
            for key, metric in self.metrics.items():
                if key in stats:  # the pair's driver reports no bytes or ratio
                    metric.set(float(stats[key]))
            if self._stopped.wait(0.5):
                return

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                tensors = {}
                for name in INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    tensors[name] = None if tensor is None else tensor.as_numpy()
                if tensors["stop"] is not None and tensors["stop"].any():
                    self._stop_requests(request.request_id())
                    sender.send(flags=FINAL)
                    continue
                req = parse_request(tensors)
                extra = {} if tensors["eviction"] is None else {"eviction": bool(tensors["eviction"].any())}
                rid = request.request_id()
                with self._lock:  # registered before the dispatcher can see the request's first event
                    handle = self.engine.submit(req.input_ids, req.sampling(), outbox=self._outbox, **extra)
                    self._replies[handle] = _Reply(req, sender, rid, self.stream_interval)
                    if rid:
                        self._by_id.setdefault(rid, set()).add(handle)
            except (RequestError, ValueError) as exc:
                sender.send(_error(str(exc), invalid_request=True), flags=FINAL)
            except Exception as exc:  # one request's failure must never fail the others in this call
                sender.send(_error(f"{type(exc).__name__}: {exc}"), flags=FINAL)
        return None

    def _stop_requests(self, rid):
        with self._lock:
            handles = list(self._by_id.get(rid, ()))
        for handle in handles:
            handle.cancel()

    def _dispatch_loop(self):
        while True:
            batch = [self._outbox.get()]
            while True:  # and whatever else the engine produced meanwhile: one response per request
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            events = {}  # handle -> its events in order (dicts keep the order requests first appeared)
            for handle, item in batch:
                events.setdefault(handle, []).append(item)
            for handle, items in events.items():
                if handle is None:
                    return
                with self._lock:
                    reply = self._replies.get(handle)
                if reply is None:  # its end was sent already (a cancelled client, a failure)
                    continue
                try:
                    done = reply.deliver(handle, items)
                except Exception as exc:  # a failure must end this request, never the model
                    reply.fail(f"{type(exc).__name__}: {exc}")
                    handle.cancel()
                    done = True
                if done:
                    self._forget(handle, reply.rid)

    def _forget(self, handle, rid):
        with self._lock:
            self._replies.pop(handle, None)
            running = self._by_id.get(rid, set())
            running.discard(handle)
            if not running:
                self._by_id.pop(rid, None)

    def finalize(self):
        self._stopped.set()
        self._publisher.join()
        self.engine.stop()
        self._outbox.put((None, None))
        self._dispatcher.join()


class _Reply:
    """One request's responses, sent from the dispatcher thread as its engine events arrive."""

    def __init__(self, req, sender, rid, stream_interval=1):
        self.req, self.sender, self.rid = req, sender, rid
        self.stream_interval = stream_interval
        self.generated = []
        self.unsent = []  # generated tokens not streamed yet
        self.sent_any = False
        self.stops = [s for s in req.stop_sequences if len(s) > 1]  # single tokens stop in the engine
        self.next_poll = 0.0
        self.stopping = False  # cancelled in the engine at a stop sequence: its end is still to come
        self.live, self.ratio = 0, 1.0  # the request's KV figures after its last token

    def deliver(self, handle, items):
        """Forward a request's events (its tokens, in order, then maybe its end); True when its final
        response went."""
        for item in items:
            if not isinstance(item, TokenEvent):
                self._finish(item)
                return True
            if self.stopping:
                continue
            self.generated.append(item.token_id)
            self.live, self.ratio = item.live_kv_tokens, item.compression_ratio
            if self.stops and ends_with_stop(self.generated, self.stops):
                handle.cancel()
                self.stopping = True  # the stop sequence's last token is not streamed
            elif self.req.streaming:
                self.unsent.append(item.token_id)
        now = time.monotonic()
        if now >= self.next_poll:  # the client went away (or cancelled): free its KV blocks now
            self.next_poll = now + CANCEL_POLL_S
            if self.sender.is_cancelled():
                handle.cancel()
                self.sender.send(flags=FINAL)
                return True
        due = len(self.unsent) >= self.stream_interval or not self.sent_any  # the first goes at once
        if self.req.streaming and self.unsent and due:
            self._send_unsent()
        return False

    def _send_unsent(self):
        """Stream the waiting tokens in one response; it carries the request's KV figures after them."""
        self.sender.send(_response(self.unsent, self.live, self.ratio))
        self.unsent, self.sent_any = [], True

    def _finish(self, completion):
        if completion.finish_reason == "error":
            self.sender.send(_error(completion.error or "the engine failed this request"), flags=FINAL)
            return
        if self.req.streaming and self.unsent:
            self._send_unsent()
        stats = completion.stats
        live = int(stats.get("live_kv_tokens", 0))
        ratio = float(stats.get("compression_ratio", 1.0))
        # streaming: the last response only reports the final KV state (the tokens went already)
        self.sender.send(_response([] if self.req.streaming else self.generated, live, ratio), flags=FINAL)

    def fail(self, message):
        self.sender.send(_error(message), flags=FINAL)
