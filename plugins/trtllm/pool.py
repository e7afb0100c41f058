"""Memory of the per-head DMS KV pool and of everything else one GPU holds to serve the DMS engine pair.

Pure Python (no TensorRT, no pipeline): imported by the build driver inside the TensorRT-LLM 1.2.1
environment and by our tests.

TensorRT-LLM's paged KV cache gives every sequence blocks shared by all its heads and layers, so every
head of a sequence has the same length. DMS keeps a different length per (sequence, layer, KV head)
stream, so the DMS layers keep their own pool: one [num_blocks, block_size, head_dim] K and one V tensor
that every layer's streams draw blocks from, and per stream a block table (plugins/dms_attention/
reference.py describes the layout). The
engine's DMS attention layers never touch TensorRT-LLM's KV cache; the engine is built without
`paged_kv_cache` for them, so TensorRT-LLM reserves no KV memory at all (`kv_cache_bytes` = 0) and the
pool below is the only KV memory. `kv_pool_tokens` (the card's build.kv_pool_tokens) counts slots per
(layer, KV head), summed over all streams: the same meaning as in the torch runtime's engine.json
(its pool holds kv_pool_tokens x layers x KV heads slots in all, shared).

`plan_memory` adds what else the GPU holds beside the pool when the driver serves the pair: the weights
TWICE (the context and the generation engine each embed a copy), the context engine's outputs and
activations at its token budget (`--max_num_tokens`: the driver chunks longer prefills), and the
driver's bookkeeping. `check_fits` refuses a plan over 90 % of the device and names the largest
kv_pool_tokens that fits.
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


RUNTIME_BYTES = 2 * 2**30  # CUDA context, cuBLAS and TensorRT workspaces: an allowance, not a measurement
POSITION_BYTES = 8  # the driver's logical position of every pool row (int64, dms_core.streams.slot_pos)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one rank holds to serve the pair through plugins/trtllm/driver.py."""

    pool: PoolPlan
    weights: int  # both engines' copies
    context_io: int  # one context call's dms_k / dms_v / dms_logit outputs
    activations: int  # an estimate: a few live [tokens, width] tensors per call, and the logits
    bookkeeping: int  # slot positions, rings, block tables
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        parts = (self.weights, self.context_io, self.activations, self.bookkeeping, self.runtime)
        return self.pool.pool_bytes + sum(parts)

    @property
    def bytes_per_slot(self) -> float:
        """What one more kv_pool_tokens costs: K and V of every layer and KV head, and their positions."""
        p = self.pool
        return p.num_layers * p.kv_heads_per_rank * (p.head_dim * 2 * DTYPE_BYTES[p.dtype] + POSITION_BYTES)

    def to_dict(self) -> dict:
        fields = ("weights", "context_io", "activations", "bookkeeping", "runtime")
        return {"pool_bytes": self.pool.pool_bytes, **{f"{f}_bytes": getattr(self, f) for f in fields},
                "total_bytes": self.total}  # fmt: skip


def weights_bytes(config: dict, dtype: str) -> int:
    """Parameters of one rank of a Qwen3 / Llama checkpoint config (TensorRT-LLM or HF names), in bytes."""
    tp = int((config.get("mapping") or {}).get("tp_size", 1))
    h, layers, vocab = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    d = int(config.get("head_size") or config.get("head_dim") or h // heads)
    inter = int(config["intermediate_size"])
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * inter + 2 * h + 2 * d
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return (layers * per_layer + embeddings + h) * DTYPE_BYTES[dtype] // tp


def plan_memory(
    config: dict, pool: PoolPlan, weights: int, max_batch_size: int, context_tokens: int, max_seq_len: int
) -> MemoryPlan:
    """The memory plan of one rank: `weights` is one engine's weights (the checkpoint's rank file)."""
    tp = int((config.get("mapping") or {}).get("tp_size", 1))
    elem = DTYPE_BYTES[pool.dtype]
    h, heads = int(config["hidden_size"]), int(config["num_attention_heads"]) // tp
    inter, vocab = int(config["intermediate_size"]) // tp, int(config["vocab_size"])
    layers, kv, d = pool.num_layers, pool.kv_heads_per_rank, pool.head_dim
    context_io = context_tokens * layers * kv * (2 * d * elem + 4)
    widest = max(3 * inter, (heads + 2 * kv) * d, 2 * h)
    activations = 2 * context_tokens * (widest + 2 * h) * elem + 2 * max_batch_size * vocab * 4
    rows = max_batch_size * kv  # streams of a full batch, per layer
    ring = int(config.get("dms_window_size", 0)) + 1  # int64 row and bool flag per entry
    table = -(-max_seq_len // pool.block_size) * 4
    slots = (pool.total_blocks + 1) * pool.block_size * POSITION_BYTES
    bookkeeping = slots + layers * rows * (ring * 9 + table)
    return MemoryPlan(pool, 2 * weights, context_io, activations, bookkeeping)


def check_fits(memory: MemoryPlan, device_bytes: int, headroom: float = 0.9) -> None:
    """Raise when the plan exceeds `headroom` of the device memory, naming the largest pool that fits."""
    budget = int(device_bytes * headroom)
    if memory.total <= budget:
        return
    p = memory.pool
    rest = memory.total - p.pool_bytes - (p.total_blocks + 1) * p.block_size * POSITION_BYTES
    fits = max(0, int((budget - rest) / memory.bytes_per_slot)) // p.block_size * p.block_size
    raise ValueError(
        f"serving the DMS engine pair needs {memory.total / 2**30:.1f} GiB per rank (pool "
        f"{p.pool_bytes / 2**30:.1f} GiB for {p.pool_tokens} slots per layer and KV head, both engines' "
        f"weights {memory.weights / 2**30:.1f} GiB) but {headroom:.0%} of the GPU is {budget / 2**30:.1f} "
        f"GiB; set build.kv_pool_tokens <= {fits} in the card (or raise tp_size)"
    )
