"""Memory of the per-head DMS KV pool, and what TensorRT-LLM's own KV cache manager is told to reserve.

Pure Python (no TensorRT, no pipeline): imported by the build driver inside the TensorRT-LLM 1.2.1
environment and by our tests.

TensorRT-LLM's paged KV cache gives every sequence blocks shared by all its heads and layers, so every
head of a sequence has the same length. DMS keeps a different length per (sequence, layer, KV head)
stream, so the DMS layers keep their own pool: per layer a [num_blocks, block_size, head_dim] K and V
tensor and per stream a block table (plugins/dms_attention/reference.py describes the layout). The
engine's DMS attention layers never touch TensorRT-LLM's KV cache; the engine is built without
`paged_kv_cache` for them, so TensorRT-LLM reserves no KV memory at all (`kv_cache_bytes` = 0) and the
pool below is the only KV memory. `kv_pool_tokens` (the card's build.kv_pool_tokens) counts slots per
(layer, KV head), summed over all streams: the same meaning as in the torch runtime's engine.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PoolPlan:
    num_layers: int
    kv_heads_per_rank: int
    head_dim: int
    block_size: int
    pool_tokens: int  # slots per (layer, KV head), all streams together
    dtype: str

    @property
    def blocks_per_layer(self) -> int:
        """Blocks of one layer's pool: every KV head of the rank draws from it."""
        return -(-self.pool_tokens // self.block_size) * self.kv_heads_per_rank

    @property
    def total_blocks(self) -> int:
        """Blocks of every layer: one pool tensor holds them all (plus one scratch block), and each layer's
        streams draw from it as their compression asks (dms_core.streams.BlockPool)."""
        return self.blocks_per_layer * self.num_layers

    @property
    def pool_bytes(self) -> int:
        """K and V of every layer on one rank."""
        per_layer = self.blocks_per_layer * self.block_size * self.head_dim * 2 * DTYPE_BYTES[self.dtype]
        return per_layer * self.num_layers

    def to_dict(self) -> dict:
        return asdict(self) | {
            "blocks_per_layer": self.blocks_per_layer,
            "pool_bytes_per_rank": self.pool_bytes,
            "trtllm_kv_cache_bytes": 0,
        }


def plan_pool(config: dict, block_size: int, pool_tokens: int, dtype: str) -> PoolPlan:
    """The pool of one rank for a TensorRT-LLM checkpoint config (config.json as a dict)."""
    tp = int((config.get("mapping") or {}).get("tp_size", 1))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if kv_heads % tp:
        raise ValueError(f"tp_size {tp} does not divide num_key_value_heads {kv_heads}")
    window = int(config.get("dms_window_size", 1 << 30))
    if block_size >= window:
        raise ValueError(f"block size {block_size} must be smaller than dms_window_size {window}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(DTYPE_BYTES)}")
    head_dim = int(config.get("head_size") or int(config["hidden_size"]) // heads)
    layers = int(config["num_hidden_layers"])
    return PoolPlan(layers, kv_heads // tp, head_dim, block_size, pool_tokens, dtype)


def check_fits(plan: PoolPlan, device_bytes: int, weights_bytes: int, headroom: float = 0.9) -> None:
    """Raise when pool + weights exceed `headroom` of the device memory, naming the largest pool that fits."""
    budget = int(device_bytes * headroom) - weights_bytes
    if plan.pool_bytes <= budget:
        return
    per_token = plan.pool_bytes / plan.pool_tokens
    fits = max(0, int(budget / per_token)) // plan.block_size * plan.block_size
    raise ValueError(
        f"the DMS KV pool needs {plan.pool_bytes / 2**30:.1f} GiB per rank ({plan.pool_tokens} slots per "
        f"layer and KV head) but only {max(budget, 0) / 2**30:.1f} GiB are left after the weights; set "
        f"build.kv_pool_tokens <= {fits} in the card (or raise tp_size)"
    )
