"""HF (DMS) checkpoint <-> TensorRT-LLM 1.2.1 checkpoint.

    convert_checkpoint(hf_dir, out_dir, tp_size, dtype)   export.py   (ModelOpt export + DMS fields)
    read_checkpoint(dir) / to_hf(ckpt) / write_hf_dir(...)  checkpoint.py (validate, merge ranks, HF names)
    hf_to_trtllm / trtllm_to_hf / trtllm_names             names.py    (name mapping, tp shard/merge)
    trtllm_fields / hf_config_from_trtllm                  config.py   (config.json fields both ways)
"""

from pipeline.convert.checkpoint import TrtllmCheckpoint, read_checkpoint, to_hf, write_hf_dir
from pipeline.convert.names import ConversionError, ModelShape

__all__ = [
    "ConversionError",
    "ModelShape",
    "TrtllmCheckpoint",
    "read_checkpoint",
    "to_hf",
    "write_hf_dir",
]
