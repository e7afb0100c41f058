"""Triton python model: the DMS engine with in-flight batching across requests: pipeline.runtime's, or
the DMS TensorRT engine pair's host driver (plugins/trtllm/driver.py), which load_engine picks by the
model's parameters.

Decoupled: execute() hands each request to the engine's background step loop and returns at once; a
thread per request forwards its tokens (streaming) or its whole output to the request's response
sender. A request with `stop` true cancels the running request of the same request id (TensorRT-LLM's
convention; the BLS model passes its clients' cancellations on this way, Triton 2.51 has no other).
All request logic lives in pipeline.serve.engine_adapter.
"""

import json
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from pipeline.serve.engine_adapter import load_engine, parse_request, stop_match
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
        self.engine = load_engine(params, Path(args["model_repository"]).resolve().parent)
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
        self._ids_lock = threading.Lock()
        self._stopped = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, daemon=True)
        self._publisher.start()

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
                handle = self.engine.submit(req.input_ids, req.sampling(), **extra)
            except (RequestError, ValueError) as exc:
                sender.send(_error(str(exc), invalid_request=True), flags=FINAL)
                continue
            except Exception as exc:  # one request's failure must never fail the others in this call
                sender.send(_error(f"{type(exc).__name__}: {exc}"), flags=FINAL)
                continue
            rid = request.request_id()
            if rid:
                with self._ids_lock:
                    self._by_id.setdefault(rid, set()).add(handle)
            threading.Thread(target=self._serve, args=(req, handle, sender, rid), daemon=True).start()
        return None

    def _stop_requests(self, rid):
        with self._ids_lock:
            handles = list(self._by_id.get(rid, ()))
        for handle in handles:
            handle.cancel()

    def _serve(self, req, handle, sender, rid):
        try:
            self._forward(req, handle, sender)
        finally:
            if rid:
                with self._ids_lock:
                    running = self._by_id.get(rid, set())
                    running.discard(handle)
                    if not running:
                        self._by_id.pop(rid, None)

    def _forward(self, req, handle, sender):
        try:
            generated = []
            for event in handle:
                if sender.is_cancelled():  # the client went away (or cancelled): free its KV blocks now
                    handle.cancel()
                    sender.send(flags=FINAL)
                    return
                generated.append(event.token_id)
                end = stop_match(generated, [s for s in req.stop_sequences if len(s) > 1])
                if end is not None:
                    handle.cancel()
                    generated = generated[:end]
                    break
                if req.streaming:  # each event carries the request's KV figures after its token
                    sender.send(_response([event.token_id], event.live_kv_tokens, event.compression_ratio))
            completion = handle.result()
            if completion.finish_reason == "error":
                sender.send(_error(completion.error or "the engine failed this request"), flags=FINAL)
                return
            stats = completion.stats
            live = int(stats.get("live_kv_tokens", 0))
            ratio = float(stats.get("compression_ratio", 1.0))
            # streaming: the last response only reports the final KV state (the tokens went already)
            sender.send(_response([] if req.streaming else generated, live, ratio), flags=FINAL)
        except Exception as exc:  # a failure must end this request, never the model
            sender.send(_error(f"{type(exc).__name__}: {exc}"), flags=FINAL)

    def finalize(self):
        self._stopped.set()
        self._publisher.join()
        self.engine.stop()
