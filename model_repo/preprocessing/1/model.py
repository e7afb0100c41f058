"""Triton python model `preprocessing`: prompt text -> token ids (TensorRT-LLM backend tensor names).

The logic lives in pipeline.serve.text; this file only moves tensors in and out.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pipeline.serve.text import RequestError, TextCodec, check_max_tokens


def _param(config: dict, key: str) -> str:
    return config["parameters"][key]["string_value"]


def _optional(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        from pathlib import Path

        config = json.loads(args["model_config"])
        repo = Path(args["model_repository"]).resolve().parent
        tokenizer_dir = Path(_param(config, "tokenizer_dir"))
        self.codec = TextCodec.from_dir(
            tokenizer_dir if tokenizer_dir.is_absolute() else repo / tokenizer_dir,
            max_input_len=int(_param(config, "max_input_len")),
            max_output_len=int(_param(config, "max_output_len")),
            add_special_tokens=_param(config, "add_special_tokens").lower() == "true",
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._one(request)))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _one(self, request):
        queries = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy().reshape(-1)
        out_lens = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy().reshape(-1)
        stop = _optional(request, "STOP_WORDS_DICT")
        end_in, pad_in = _optional(request, "END_ID"), _optional(request, "PAD_ID")
        batch = len(queries)
        ids = [self.codec.encode(q) for q in queries]
        out_lens = np.array([[check_max_tokens(n, self.codec.max_output_len)] for n in out_lens], np.int32)
        end_id = self.codec.end_id if end_in is None else int(end_in.reshape(-1)[0])
        pad_id = self.codec.pad_id if pad_in is None else int(pad_in.reshape(-1)[0])
        width = max(len(x) for x in ids)
        input_ids = np.full((batch, width), pad_id, dtype=np.int32)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = x
        stops = [self.codec.stop_words_ids([] if stop is None else list(stop[row])) for row in range(batch)]
        stop_width = max(s.shape[1] for s in stops)
        stop_ids = np.full((batch, 2, stop_width), -1, dtype=np.int32)
        for row, s in enumerate(stops):
            stop_ids[row, 0, :] = 0
            stop_ids[row, :, : s.shape[1]] = s
        return [
            pb_utils.Tensor("INPUT_ID", input_ids),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(x)] for x in ids], np.int32)),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", out_lens),
            pb_utils.Tensor("STOP_WORDS_IDS", stop_ids),
            pb_utils.Tensor("OUT_END_ID", np.full((batch, 1), end_id, np.int32)),
            pb_utils.Tensor("OUT_PAD_ID", np.full((batch, 1), pad_id, np.int32)),
        ]
