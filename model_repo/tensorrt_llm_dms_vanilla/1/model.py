"""Triton python model: the DMS engine pair with eviction off, by forwarding to its engine model.

Decoupled: each request goes on, with every input it came with and `eviction` false, to the engine model
(`engine_model`) as a decoupled BLS request, and its responses come back as they are produced. A client
that cancels stops receiving at once; Triton 2.51 cannot cancel the BLS request inside, which then runs
to its max_tokens (as a cancelled ensemble request does).
"""

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
OUTPUTS = ["output_ids", "sequence_length", "kv_live_tokens", "kv_compression_ratio"]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.engine_model = config["parameters"]["engine_model"]["string_value"]
        self.inputs = [i["name"] for i in config["input"]]

    def execute(self, requests):
        for request in requests:
            tensors = [pb_utils.get_input_tensor_by_name(request, name) for name in self.inputs]
            tensors = [t for t in tensors if t is not None]
            tensors.append(pb_utils.Tensor("eviction", np.array([[False]])))
            sender = request.get_response_sender()
            threading.Thread(target=self._forward, args=(tensors, sender), daemon=True).start()
        return None

    def _forward(self, tensors, sender):
        try:
            responses = pb_utils.InferenceRequest(
                model_name=self.engine_model, requested_output_names=OUTPUTS, inputs=tensors
            ).exec(decoupled=True)
            held = None  # forwarded one behind, so the last one goes out final, as the engine sent it
            for response in responses:
                if sender.is_cancelled():
                    sender.send(flags=FINAL)
                    return
                if response.has_error():
                    sender.send(pb_utils.InferenceResponse(error=response.error()), flags=FINAL)
                    return
                if not response.output_tensors():  # the empty final response of a decoupled BLS call
                    continue
                if held is not None:
                    sender.send(pb_utils.InferenceResponse(output_tensors=held))
                held = response.output_tensors()
            if held is None:
                sender.send(flags=FINAL)
            else:
                sender.send(pb_utils.InferenceResponse(output_tensors=held), flags=FINAL)
        except Exception as exc:  # a failure must end this request, never the model
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
