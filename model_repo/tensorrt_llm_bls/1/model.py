"""Triton python model `tensorrt_llm_bls`: the ensemble's text interface with token streaming.

Decoupled (gRPC streaming, HTTP generate_stream): per request a thread calls `preprocessing`, then the
engine model as a decoupled BLS request, and detokenizes incrementally (no split UTF-8 characters),
sending one response per new piece of text when `stream` is true, or one response at the end. A client
that cancels stops the engine request too: the engine call carries a request id, and a `stop` request
with that id cancels it (Triton 2.51 does not pass a BLS request's cancellation on by itself).
"""

import json
import threading
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from pipeline.serve.text import TextCodec, incremental_decoder

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# BLS input -> preprocessing input; preprocessing output -> engine input
TO_PREPROCESSING = {
    "text_input": "QUERY",
    "max_tokens": "REQUEST_OUTPUT_LEN",
    "stop_words": "STOP_WORDS_DICT",
    "end_id": "END_ID",
    "pad_id": "PAD_ID",
}
FROM_PREPROCESSING = {
    "INPUT_ID": "input_ids",
    "REQUEST_INPUT_LEN": "input_lengths",
    "REQUEST_OUTPUT_LEN": "request_output_len",
    "STOP_WORDS_IDS": "stop_words_list",
    "OUT_END_ID": "end_id",
    "OUT_PAD_ID": "pad_id",
}
TO_ENGINE = {
    "top_k": "runtime_top_k",
    "top_p": "runtime_top_p",
    "temperature": "temperature",
    "random_seed": "random_seed",
}


def _text_response(text, live, ratio):
    tensors = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object))]
    if live is not None:
        tensors += [
            pb_utils.Tensor("kv_live_tokens", np.array([[live]], np.int32)),
            pb_utils.Tensor("kv_compression_ratio", np.array([[ratio]], np.float32)),
        ]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _error(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.engine_model = params["engine_model"]
        tokenizer_dir = Path(params["tokenizer_dir"])
        if not tokenizer_dir.is_absolute():
            tokenizer_dir = Path(args["model_repository"]).resolve().parent / tokenizer_dir
        self.codec = TextCodec.from_dir(tokenizer_dir, max_input_len=1, max_output_len=1)
        self.kv_outputs = any(o["name"] == "kv_live_tokens" for o in config["output"])
        # Requests beyond this wait here before any BLS call. The python backend serves a model's BLS
        # calls and responses from a pool of threads (Triton's default 32, `thread-pool-size`); a
        # streaming call holds one for its whole life, so 32 at once left none to deliver responses
        # and every request hung.
        self._active = threading.BoundedSemaphore(int(params["max_active_requests"]))

    def execute(self, requests):
        for request in requests:
            inputs = {}
            for name in (*TO_PREPROCESSING, *TO_ENGINE, "stream"):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            sender = request.get_response_sender()
            threading.Thread(target=self._serve, args=(inputs, sender), daemon=True).start()
        return None

    def _serve(self, inputs, sender):
        with self._active:
            if sender.is_cancelled():  # gave up while it waited
                sender.send(flags=FINAL)
                return
            self._generate(inputs, sender)

    def _generate(self, inputs, sender):
        try:
            stream = bool(inputs["stream"].reshape(-1)[0]) if "stream" in inputs else False
            pre = pb_utils.InferenceRequest(
                model_name="preprocessing",
                requested_output_names=list(FROM_PREPROCESSING),
                inputs=[
                    pb_utils.Tensor(TO_PREPROCESSING[k], v)
                    for k, v in inputs.items()
                    if k in TO_PREPROCESSING
                ],
            ).exec()
            if pre.has_error():
                sender.send(_error(pre.error().message()), flags=FINAL)
                return
            engine_inputs = [
                pb_utils.Tensor(FROM_PREPROCESSING[t.name()], t.as_numpy()) for t in pre.output_tensors()
            ]
            engine_inputs += [pb_utils.Tensor(TO_ENGINE[k], v) for k, v in inputs.items() if k in TO_ENGINE]
            engine_inputs.append(pb_utils.Tensor("streaming", np.array([[True]])))
            outputs = ["output_ids", "sequence_length"]
            if self.kv_outputs:
                outputs += ["kv_live_tokens", "kv_compression_ratio"]
            rid = f"bls-{uuid.uuid4().hex}"
            responses = pb_utils.InferenceRequest(
                model_name=self.engine_model,
                requested_output_names=outputs,
                inputs=engine_inputs,
                request_id=rid,
            ).exec(decoupled=True)
            decoder = incremental_decoder(self.codec)
            live = ratio = None
            for response in responses:
                if sender.is_cancelled():
                    self._stop_engine_request(rid)
                    for _ in responses:  # the engine ends the request at its next token
                        pass
                    sender.send(flags=FINAL)
                    return
                if response.has_error():
                    sender.send(_error(response.error().message()), flags=FINAL)
                    return
                ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
                if ids is None:  # the empty final response of a decoupled BLS call
                    continue
                if self.kv_outputs:
                    live = int(
                        pb_utils.get_output_tensor_by_name(response, "kv_live_tokens")
                        .as_numpy()
                        .reshape(-1)[0]
                    )
                    ratio = float(
                        pb_utils.get_output_tensor_by_name(response, "kv_compression_ratio")
                        .as_numpy()
                        .reshape(-1)[0]
                    )
                piece = decoder.push(ids.as_numpy().reshape(-1).tolist())
                if stream and piece:
                    sender.send(_text_response(piece, live, ratio))
            tail = decoder.flush()
            text = tail if stream else self.codec.decode(decoder.ids)
            sender.send(_text_response(text, live, ratio), flags=FINAL)
        except Exception as exc:  # a failure must end this request, never the model
            sender.send(_error(f"{type(exc).__name__}: {exc}"), flags=FINAL)

    def _stop_engine_request(self, rid):
        """Cancel the engine request `rid` (the engine model's `stop` input; the other inputs it
        requires are placeholders)."""
        stop = [
            pb_utils.Tensor("input_ids", np.zeros((1, 1), np.int32)),
            pb_utils.Tensor("input_lengths", np.ones((1, 1), np.int32)),
            pb_utils.Tensor("request_output_len", np.ones((1, 1), np.int32)),
            pb_utils.Tensor("stop", np.array([[True]])),
        ]
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model, requested_output_names=[], inputs=stop, request_id=rid
        )
        for _ in request.exec(decoupled=True):
            pass
