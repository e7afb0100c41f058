"""Triton python model `postprocessing`: generated token ids -> text (TensorRT-LLM backend tensor names)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pipeline.serve.text import TextCodec


class TritonPythonModel:
    def initialize(self, args):
        from pathlib import Path

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        repo = Path(args["model_repository"]).resolve().parent
        tokenizer_dir = Path(params["tokenizer_dir"])
        self.codec = TextCodec.from_dir(
            tokenizer_dir if tokenizer_dir.is_absolute() else repo / tokenizer_dir,
            max_input_len=1,  # unused here: postprocessing only decodes
            max_output_len=1,
            skip_special_tokens=params["skip_special_tokens"].lower() == "true",
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            # output_ids [batch, beams, tokens], sequence_length [batch, beams]
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            texts = [
                [
                    self.codec.decode(tokens[b, beam, : lengths[b, beam]]).encode("utf-8")
                    for beam in range(tokens.shape[1])
                ]
                for b in range(tokens.shape[0])
            ]
            out = pb_utils.Tensor("OUTPUT", np.array(texts, dtype=object))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
