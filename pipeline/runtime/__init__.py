"""DMS inference runtime (nano-vllm-style split).

block_pool.py  integer bookkeeping: per-(sequence, layer, KV head) block tables, lengths, one free list
kv_cache.py    the K/V tensors [num_blocks, block_size, head_dim] shared by all layers and heads
policies/      eviction policies behind one interface: dms, none, window (StreamingLLM), h2o, tova
model.py       Qwen3 / Llama transformer, DMS decision logits (pipeline.dms.rule), RoPE at logical positions
runner.py      prefill (exact DMS mask, then only live tokens stored) and batched paged decode
scheduler.py   continuous batching: admission while the pool has room, queueing, preemption
sampling.py    greedy / temperature / top-k / top-p with per-request seeds
engine.py      Engine: from_hf / from_dir / generate / stream / submit (thread-safe) / step / start
engine_dir.py  the torch-backend engine directory (engine.json + model.safetensors + tokenizer)
bench.py       `make bench`
"""
