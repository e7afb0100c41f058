"""`make bench`'s decode section: KV memory and decode speed of DMS against vanilla (our engine) and HF
`generate`, on the embedded tiny model.

One run, one model (the embedded tiny-qwen3 card's shape), the same prompts for all three:
- the trained tiny DMS checkpoint (build/tiny-qwen3/retrofit/checkpoints/cr<target>) when it exists,
  with its learned decisions; otherwise the tiny model (the committed teacher, or random weights of the
  card's shape) with DMS decisions forced to the card's target CR. bench.json says which.
- `batch` prompts of `context - 128` tokens (held-out task text for the trained checkpoint, whose
  decisions depend on content; random ids for forced decisions), then 128 greedy decode steps (EOS
  ignored), so decode runs at `context` tokens of context. Our engines prefill in 512-token chunks
  with the exact DMS mask; prefill equals token-by-token decode (tests/test_runtime_exactness.py), so
  the KV a sequence holds at the end is what generating `context` tokens leaves.
- decode tokens/s = decoded tokens / wall time of the decode steps (prefill excluded; one untimed
  warm-up generation per engine first), best of ROUNDS rounds that interleave the three. HF:
  `generate` itself, its decode steps timed by a StoppingCriteria that timestamps every new token
  (prefill excluded the same way).
- The machine's 1-minute load average before and after is recorded: on a shared CPU, compare ratios
  from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.card import load_card
from pipeline.runtime.engine import Engine
from pipeline.runtime.engine_dir import EngineLimits, load_hf_checkpoint
from pipeline.runtime.policies import DMSPolicy, EvictionPolicy, NoEviction
from pipeline.runtime.sampling import SamplingParams

DECODE_TOKENS = 128
ROUNDS = 3
PREFILL_CHUNK = 512


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is inside it (reports stay portable)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def tiny_model(
    card_name: str, build_dir: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str, Path | None]:
    """(config, state, description, the trained DMS checkpoint's directory or None: no learned decisions)."""
    card = load_card(card_name)
    label = f"{card.dms.target_cr:g}"
    trained = build_dir / card.name / "retrofit" / "checkpoints" / f"cr{label}"
    if (trained / "config.json").is_file():
        config, state = load_hf_checkpoint(trained)
        return config, state, f"trained DMS checkpoint {_shown(trained)}", trained
    teacher = Path(__file__).resolve().parents[1] / "assets" / card.name  # pipeline/assets/
    if (teacher / "config.json").is_file():
        config, state = load_hf_checkpoint(teacher)
        return config, state, f"teacher {_shown(teacher)} with DMS decisions forced to CR {label}", None
    from pipeline.data.pretrain import build_model
    from pipeline.data.tokenizer import train_tokenizer

    p = card.pretrain
    model = build_model(p, train_tokenizer(p.vocab_size, p.seed))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    desc = (
        f"random-weight {card.name}-shaped model with DMS decisions forced to CR {label} "
        "(the trained DMS checkpoint is not built)"
    )
    return model.config.to_dict(), state, desc, None


def task_prompts(tokenizer_dir: Path, batch: int, tokens: int) -> list[list[int]]:
    """`batch` prompts of exactly `tokens` tokens of held-out task text (filler with facts: what the
    tiny model was retrofitted on), one item each, cut to length. Learned decisions depend on content,
    and random token ids (half of them fact words) are not text this model reads."""
    from transformers import AutoTokenizer

    from pipeline.data.tasks import TASKS, eval_items

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = []
    for i in range(batch):
        item = eval_items(TASKS[i % len(TASKS)], tokens + 16, 1, seed=i)[0]  # answers are <= 9 tokens
        prompts.append([tok.bos_token_id, *tok.convert_tokens_to_ids(item.prompt.split())][:tokens])
    return prompts


def _run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int, label: str) -> dict[str, Any]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompts[0][:64]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    print(f"{label}: prefill {len(prompts)} x {len(prompts[0])} tokens")
    handles = [engine.submit(p, params) for p in prompts]
    decode_s, decode_steps = 0.0, 0
    with tqdm(total=new_tokens - 1, desc=f"{label} decode", unit="step") as bar:  # 1st token: prefill
        while engine.has_work():
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            if engine.last_step_kind == "decode":
                decode_s += dt
                decode_steps += 1
                bar.update(1)
    outs = [h.result() for h in handles]
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{label}: generation failed: {errors[0]}")
    # tokens produced by decode steps (the first token of each request comes from its prefill)
    decoded = sum(len(o.token_ids) - 1 for o in outs)
    return {
        "decode_tokens_per_s": decoded / decode_s,
        "decode_steps": decode_steps,
        "kv_bytes_per_seq": max(o.stats["kv_bytes"] for o in outs),
        "live_kv_tokens_per_seq": max(o.stats["live_kv_tokens"] for o in outs),
        "compression_ratio": sum(o.stats["compression_ratio"] for o in outs) / len(outs),
        "pool_blocks_used_after": engine.pool_stats()["blocks_used"],
    }


def _hf_runner(
    config: dict[str, Any], state: dict[str, torch.Tensor], prompts: list[list[int]], new_tokens: int
) -> Callable[[], dict[str, Any]]:
    """A function that runs HF `generate` on the prompts once and returns its decode tokens/s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = {k: v for k, v in config.items() if not k.startswith("dms_")}
    cfg = AutoConfig.for_model(plain.pop("model_type"), **plain)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.load_state_dict(state, strict=False)
    from transformers import StoppingCriteria

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    class Clock(StoppingCriteria):
        """Called by generate after every new token: timestamps the decode steps, never stops."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def gen(n: int) -> Clock:
        clock = Clock()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                stopping_criteria=[clock],
            )
        return clock

    gen(4)  # warm-up

    def run() -> dict[str, Any]:
        print(f"hf generate: {len(prompts)} x {new_tokens} tokens at {len(prompts[0])} tokens of context")
        t = gen(new_tokens).times  # t[0]: after the prefill's token; the rest: one per decode step
        return {"decode_tokens_per_s": len(prompts) * (len(t) - 1) / (t[-1] - t[0])}

    return run


def run_decode(
    context: int,
    batch: int,
    card_name: str = "tiny-qwen3",
    build_dir: Path = Path("build"),
    decode_tokens: int = DECODE_TOKENS,
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    if context <= 2 * decode_tokens:
        raise ValueError(f"--context must be more than {2 * decode_tokens} tokens")
    card = load_card(card_name)
    config, state, model_desc, trained = tiny_model(card_name, build_dir)
    learned = trained is not None
    prompt_tokens, new_tokens = context - decode_tokens, decode_tokens
    limits = EngineLimits(
        max_batch_size=batch,
        max_input_len=prompt_tokens,
        max_output_len=new_tokens,
        kv_block_size=card.build.kv_block_size,
        kv_pool_tokens=card.build.kv_pool_tokens,
    )
    dms_policy: EvictionPolicy = (
        DMSPolicy() if learned else DMSPolicy(window=card.dms.window, force_cr=card.dms.target_cr)
    )
    if trained is not None:
        prompts = task_prompts(trained, batch, prompt_tokens)
    else:  # forced decisions do not look at the content
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, int(config["vocab_size"]), (prompt_tokens,), generator=g).tolist()
                   for _ in range(batch)]
    engines = {
        name: Engine.from_state(config, state, limits, policy=policy, device="cpu",
                                prefill_chunk_tokens=PREFILL_CHUNK)
        for name, policy in (("dms", dms_policy), ("vanilla", NoEviction()))
    }
    hf = _hf_runner(config, state, prompts, new_tokens)
    # Rounds interleave the three, so a change in the machine's load hits all of them; each one's best
    # round is its speed (other load only ever slows a run down).
    results: dict[str, dict[str, Any]] = {}
    rounds_speed: dict[str, list[float]] = {"dms": [], "vanilla": [], "hf": []}
    for r in range(rounds):
        for name, engine in engines.items():
            results[name] = _run_engine(engine, prompts, new_tokens, f"{name} (round {r + 1}/{rounds})")
            results[name]["pool_blocks_total"] = engine.pool.num_blocks
            results[name]["block_bytes"] = engine.cache.bytes_per_block
            rounds_speed[name].append(results[name]["decode_tokens_per_s"])
        results["hf"] = hf()
        rounds_speed["hf"].append(results["hf"]["decode_tokens_per_s"])
    for name, speeds in rounds_speed.items():
        results[name]["decode_tokens_per_s"] = max(speeds)
        results[name]["decode_tokens_per_s_rounds"] = speeds
    blocks_total = results["vanilla"]["pool_blocks_total"]
    block_bytes = results["vanilla"]["block_bytes"]
    fits = {k: blocks_total // (results[k]["kv_bytes_per_seq"] // block_bytes) for k in ("dms", "vanilla")}
    speed = {k: results[k]["decode_tokens_per_s"] for k in ("dms", "vanilla", "hf")}
    return {
        "model": model_desc,
        "dms_decisions": "learned" if learned else f"forced to CR {card.dms.target_cr:g}",
        "dms_window": config.get("dms_window_size", card.dms.window) if learned else card.dms.window,
        "context_tokens": context,
        "prompt_tokens": prompt_tokens,
        "prompts": "held-out task text" if learned else "random token ids",
        "generated_tokens": new_tokens,
        "batch": batch,
        "rounds": rounds,
        "kv_bytes_ratio": results["vanilla"]["kv_bytes_per_seq"] / results["dms"]["kv_bytes_per_seq"],
        "capacity_ratio": fits["dms"] / fits["vanilla"],
        "sequences_fitting_pool": fits,
        "pool_bytes": blocks_total * block_bytes,
        "measured_compression_ratio": results["dms"]["compression_ratio"],
        "decode_tokens_per_s": speed,
        "dms_over_vanilla_speed": speed["dms"] / speed["vanilla"],
        "dms_over_hf_speed": speed["dms"] / speed["hf"],
        "vanilla_over_hf_speed": speed["vanilla"] / speed["hf"],
        "details": results,
    }
