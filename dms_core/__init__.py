"""The DMS rule and the per-stream KV bookkeeping, shared by every side of the project.

A leaf: torch, numpy and the standard library only. `pipeline` (training, the torch engine, evaluation)
and `plugins` (the kernels, the TensorRT-LLM model class and its host driver, which run inside
TensorRT-LLM's own older environment and may not import `pipeline`) all import it from here, so the
rule exists once. docs/dms.md is the specification; each of its items names the function here that
implements it.

- `rule`: decision logits, hard decision, shift by one, visibility (delayed eviction), survivors after
  prefill, the decode-step ring, compression ratio.
- `config`: `DmsConfig`, NVIDIA's `dms_*` checkpoint keys and their defaults.
- `rope`: RoPE frequencies (plain and llama3-scaled), the same for the runtime and TensorRT-LLM.
- `streams`: `StreamTable`, the per-(layer, sequence, KV head) block tables, lengths and DMS rings.
- `sampling`: the sampler (greedy, temperature, top-k, top-p, per-request seeds).
- `serving`: what a request looks like from outside (events, completion, handle) and the step loop,
  the same for the torch engine and the TensorRT pair's driver.
"""
