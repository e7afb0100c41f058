"""The conversion's proof: logits of the engine built from the converted checkpoint against the HF model.

Reference: the HF (DMS) checkpoint in transformers with our DMS patch (`pipeline.dms.checkpoint`),
inference semantics ("hard" decisions; a plain model runs unpatched). Candidate: the torch engine
(`pipeline.runtime.engine.Engine`) built from the TensorRT-LLM checkpoint mapped back to HF names (ranks
merged), run the way it serves: prefill of the first part, then token-by-token decode over the paged
per-head KV pool with eviction. Tokens are longer than the DMS window so evictions take effect.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.convert.checkpoint import read_checkpoint, to_hf


def _device() -> str:
    # fp32 on the GPU where there is one: an 8B model's 1K-token check takes hours on CPU.
    return "cuda" if torch.cuda.is_available() else "cpu"


def reference_logits(hf_dir: Path, ids: list[int]) -> torch.Tensor:
    """[T, V] float32 logits (on CPU) of the HF model (DMS-patched when it carries dms_* keys)."""
    import contextlib
    import json

    import transformers

    from dms_core.config import DmsConfig
    from pipeline.dms.checkpoint import load_config, load_dms_model
    from pipeline.dms.patch import dms_mode

    if DmsConfig.is_dms(json.loads((hf_dir / "config.json").read_text())):
        model = load_dms_model(hf_dir, dtype=torch.float32)
        mode = dms_mode(model, "hard")
    else:  # a plain model converts with eviction off: compare with the plain forward
        config = load_config(hf_dir)
        model = getattr(transformers, config.architectures[0]).from_pretrained(hf_dir, config=config,
                                                                                dtype=torch.float32)
        mode = contextlib.nullcontext()
    model = model.eval().to(_device())
    with torch.inference_mode(), mode:
        logits = model(torch.tensor([ids], device=_device())).logits[0].float().cpu()
    del model  # free the device for the engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits


def engine_logits(
    ckpt_dir: Path, ids: list[int], prefill_tokens: int, kv_block_size: int, policy: str | None = None
) -> torch.Tensor:
    """[T - prefill_tokens + 1, V] float32 logits of the engine built from the converted checkpoint:
    the prefill's last position, then one row per decoded token. `policy`: the engine's eviction policy
    (default: what the checkpoint's dms_* keys say; "none" runs it with eviction off)."""
    from pipeline.runtime.engine import Engine
    from pipeline.runtime.limits import EngineLimits

    hf_cfg, state = to_hf(read_checkpoint(ckpt_dir))
    pool = -(-len(ids) // kv_block_size) * kv_block_size
    limits = EngineLimits(
        max_batch_size=1, max_input_len=len(ids), max_output_len=len(ids),
        kv_block_size=kv_block_size, kv_pool_tokens=pool,
    )
    engine = Engine.from_state(hf_cfg, state, limits, policy=policy, dtype="float32", device=_device())
    # Teacher forcing feeds the rest of `ids` (plus one token never fed, for the last row): the streams
    # never hold more than len(ids).
    forced = [*ids[prefill_tokens:], 0]
    (completion,) = engine.score([(ids[:prefill_tokens], forced)])
    return completion.logits


def roundtrip_max_abs_diff(
    hf_dir: str | Path, ckpt_dir: str | Path, num_tokens: int, kv_block_size: int, seed: int = 0
) -> float:
    """max |engine(converted) - HF| over the logits of `num_tokens` random tokens (half prefilled,
    half decoded)."""
    hf_dir, ckpt_dir = Path(hf_dir), Path(ckpt_dir)
    vocab = read_checkpoint(ckpt_dir).shape.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num_tokens,), generator=g).tolist()
    prefill = max(1, num_tokens // 2)
    ref = reference_logits(hf_dir, ids)[prefill - 1 :]
    got = engine_logits(ckpt_dir, ids, prefill, kv_block_size)
    return float((got - ref).abs().max())
