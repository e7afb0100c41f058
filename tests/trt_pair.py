"""A build directory laid out like a DMS TensorRT engine pair's (plugins/trtllm/build_engine.py's output)
from a tiny HF DMS checkpoint, for the driver and packaging tests.

The TensorRT-LLM checkpoint is written with the converter's own name mapping and config fields
(pipeline.convert: what `convert_checkpoint` saves, without its ModelOpt cross-check, which costs ~20 s
a model here). The engine directories hold what trtllm-build writes beside the engine (config.json with
`pretrained_config`) but no `rank0.engine`: nothing here can build one. The emulated session reads the
checkpoint the manifest names; the TensorRT-LLM session would read the engines.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file


def trtllm_checkpoint(hf_dir: Path, out: Path) -> Path:
    """config.json + rank0.safetensors (tp_size 1, float32) for an HF directory."""
    from dms_core.config import DmsConfig
    from pipeline.convert.config import model_shape, trtllm_fields
    from pipeline.convert.names import hf_to_trtllm
    from pipeline.runtime.engine_dir import load_hf_checkpoint

    hf, state = load_hf_checkpoint(hf_dir)
    dms = DmsConfig.from_hf_config(hf)
    shape = model_shape(hf, adapter=bool(dms and dms.separate_alpha))
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in hf_to_trtllm(state, shape, 1, 0).items()}, out / "rank0.safetensors"
    )
    config = {
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
        "hidden_act": "silu",
        "position_embedding_type": "rope_gpt_neox",
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
    } | trtllm_fields(hf, "float32")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_pair_dir(
    root: Path,
    hf_dir: Path,
    *,
    max_batch_size: int = 4,
    max_input_len: int = 64,
    max_output_len: int = 32,
    block: int = 4,
    kv_pool_tokens: int = 1024,
    max_num_tokens: int | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """root/ckpt (the converted checkpoint) and root/engine (the pair's engine dir); returns the latter."""
    import shutil

    from plugins.trtllm.pool import plan_pool

    ckpt = trtllm_checkpoint(hf_dir, root / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    engine = root / "engine"
    for phase in ("context", "generation"):
        (engine / phase).mkdir(parents=True, exist_ok=True)
        (engine / phase / "config.json").write_text(json.dumps({"pretrained_config": config}, indent=2))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, engine / "tokenizer", dirs_exist_ok=True)
    limits = {
        "max_batch_size": max_batch_size,
        "max_input_len": max_input_len,
        "max_output_len": max_output_len,
        "max_num_tokens": max_num_tokens or max_input_len,
        "tokens_per_block": block,
        "kv_pool_tokens": kv_pool_tokens,
    }
    manifest = {
        "tensorrt_llm": "none (a test layout: no engine was built)",
        "checkpoint_dir": "../ckpt",
        "limits": limits,
        "pool": plan_pool(config, block, kv_pool_tokens, "float32").to_dict(),
        "engines": {"context": {"command": []}, "generation": {"command": []}},
    }
    (engine / "dms_build.json").write_text(json.dumps(manifest, indent=2))
    return engine
