"""Agreement with the vanilla model on held-out prompts (how independent DMS ports report real models).

Vanilla decodes greedily; the compressed method is then teacher-forced along vanilla's tokens with its
eviction active, so both distributions are compared at the same prefix. Two figures per method:
- mean per-token KL(vanilla || method) in nats over the generated positions;
- greedy token-match rate: the fraction of positions where the method's argmax is vanilla's token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_token_kl(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || test) per position in nats. logits: [T, V] (any float dtype). Returns [T] float32."""
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(test_logits.shape)}")
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    test = F.log_softmax(test_logits.float(), dim=-1)
    # Clamp: tiny negative values from rounding when the two distributions are identical.
    return (ref.exp() * (ref - test)).sum(-1).clamp_min(0.0)


def token_match_rate(ref_tokens: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Fraction of positions where argmax(test_logits) equals the reference token. [T], [T, V]."""
    if ref_tokens.numel() == 0:
        raise ValueError("token_match_rate: no generated tokens to compare")
    return float((test_logits.argmax(-1) == ref_tokens).float().mean())


def agreement(ref_logits: torch.Tensor, ref_tokens: torch.Tensor, test_logits: torch.Tensor) -> dict:
    """{kl, token_match} for one prompt. ref_logits/test_logits: [T, V] at the same prefixes."""
    return {
        "kl": float(per_token_kl(ref_logits, test_logits).mean()),
        "token_match": token_match_rate(ref_tokens, test_logits),
    }


# Held-out prompts: templates unlike the retrofit's generated prompts (pipeline.dms.distill_data), filled
# from their own seed. Instruction-style, because the real models evaluated this way are chat models.
_SUBJECTS = (
    "lighthouses", "bread baking", "glaciers", "chess openings", "honeybees", "bridges", "volcanoes",
    "the printing press", "tides", "coral reefs", "compilers", "maple syrup", "solar panels", "owls",
)
_TEMPLATES = (
    "Describe {s} to a ten-year-old in one paragraph, then give {n} questions they might ask.",
    "Write a diary entry of someone who spends a day learning about {s}. Mention the number {m}.",
    "List {n} common misconceptions about {s} and correct each one.",
    "Compare {s} with {t}: how are they alike, how do they differ? Answer in {n} points.",
)


def agreement_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` held-out instruction prompts (deterministic in `seed`)."""
    import random

    rng = random.Random(f"agreement/{seed}")
    out = []
    for i in range(n):
        s, t = rng.sample(_SUBJECTS, 2)
        template = _TEMPLATES[i % len(_TEMPLATES)]
        out.append(template.format(s=s, t=t, n=rng.randint(3, 6), m=rng.randint(10, 999)))
    return out


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids, through the tokenizer's chat template when it has one (instruct models)."""
    if getattr(tokenizer, "chat_template", None):
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
            for p in prompts
        ]
    return [tokenizer(p)["input_ids"] for p in prompts]


def reference(
    engine, prompt_ids: list[list[int]], new_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Vanilla's greedy continuation and its logits per prompt: [(tokens [T], logits [T, V])]."""
    from pipeline.eval.harness import forced_logits

    outs = engine.generate(
        [list(p) for p in prompt_ids], max_tokens=new_tokens, temperature=0.0, ignore_eos=True
    )
    tokens = [list(o.token_ids) for o in outs]
    logits = forced_logits(engine, list(zip(prompt_ids, tokens, strict=True)))
    return [(torch.tensor(t), lg) for t, lg in zip(tokens, logits, strict=True)]


def measure(engine, prompt_ids: list[list[int]], refs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Mean KL, token-match rate and measured CR of `engine` teacher-forced along vanilla's tokens."""
    from pipeline.eval.harness import forced_logits
    from pipeline.eval.summary import combine_cr

    stats: list[dict] = []
    pairs = [(p, tokens.tolist()) for p, (tokens, _) in zip(prompt_ids, refs, strict=True)]
    logits = forced_logits(engine, pairs, stats)
    per = [agreement(ref_lg, ref_tok, lg) for (ref_tok, ref_lg), lg in zip(refs, logits, strict=True)]
    return {
        "kl": round(sum(a["kl"] for a in per) / len(per), 5),
        "token_match": round(sum(a["token_match"] for a in per) / len(per), 5),
        "measured_cr": round(combine_cr(s["compression_ratio"] for s in stats), 4),
        "n_prompts": len(per),
        "new_tokens": int(refs[0][0].numel()),
    }
