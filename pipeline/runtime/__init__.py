"""DMS inference runtime (nano-vllm-style split).

dms_core.streams  (outside this package, shared with the TensorRT host) the StreamTable: block tables,
                  lengths, DMS rings and slot metadata of every (sequence, layer, KV head) stream
kv_cache.py       the K/V tensors [2, num_blocks + 1, block_size, head_dim] shared by all layers and heads
policies/         eviction policies behind one batched interface: dms, none, window (StreamingLLM), h2o, tova
model.py          Qwen3 / Llama transformer, DMS decision logits (dms_core.rule), RoPE at logical positions
model_runner.py   prefill (exact DMS mask, then only live tokens stored) and the batched sync-free decode
cuda_graphs.py    the decode step replayed from CUDA graphs per batch bucket (GPU only)
scheduler.py      continuous batching: admission by what a sequence will hold, queueing, preemption
sampling.py       greedy / temperature / top-k / top-p with per-request seeds, batched
detokenize.py     incremental detokenisation (constant cost per token)
engine.py         Engine: from_hf / from_dir / generate / stream / submit (thread-safe) / score / step / start
engine_dir.py     the torch-backend engine directory (engine.json + model.safetensors + tokenizer)
"""
