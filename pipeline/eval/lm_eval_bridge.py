"""lm-evaluation-harness on our engine: `--model dms-engine`, any eviction policy, local task files.

lm-eval has no plugin hook for models, so this module registers the model and then hands the command
line to lm-eval's own CLI. Use it exactly like `lm_eval`:

    python -m pipeline.eval.lm_eval_bridge run --model dms-engine \
        --model_args pretrained=build/qwen3-8b/retrofit/checkpoints/cr8,policy=dms \
        --include_path my_tasks/ --tasks gsm8k_local --batch_size 8

    # a training-free baseline on the vanilla weights at 8x
    ... --model_args pretrained=build/qwen3-8b/prepare/model,policy=tova,cr=8

model_args: pretrained (an HF directory, DMS or plain), policy (none | dms | window | h2o | tova),
cr (the baselines' target compression), max_length (prompt + generation cap, default 4096),
batch_size, max_gen_toks, split_at (a marker such as "Question:": the text before its last occurrence
is prefilled and compressed before the rest is read, the `evaluate` stage's protocol; without it the
whole prompt is one full-attention prefill, which lets fixed-budget baselines see everything once).
Requests go through the engine's paged per-head KV pool with the policy active, so loglikelihoods and
generations are those of the compressed model. GSM8K / MMLU / RULER-style tasks run
from data the user has on disk: a task YAML with `dataset_path: json` and
`dataset_kwargs: {data_files: {test: /path/file.jsonl}}` (docs/evaluation.md has a full example).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

MODEL_NAME = "dms-engine"


@register_model(MODEL_NAME)
class DmsEngineLM(LM):
    """lm-eval's LM interface over `pipeline.runtime` (one engine, one eviction policy)."""

    def __init__(
        self,
        pretrained: str,
        policy: str = "dms",
        cr: float | str | None = None,
        max_length: int | str = 4096,
        batch_size: int | str = 8,
        max_gen_toks: int | str = 256,
        split_at: str | None = None,
        **_: Any,  # lm-eval passes device etc.; the engine picks its own device
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        from pipeline.eval.harness import engine_for

        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"pretrained={pretrained} is not a Hugging Face model directory (no config.json); "
                "pass pretrained=/path/to/hf_dir"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.split_at = split_at or None
        self.measured_crs: list[float] = []
        self.engine = engine_for(
            path, policy, None if cr in (None, "", "None") else float(cr),
            max_batch_size=self.batch_size, max_len=self.max_length,
        )

    # -- helpers -------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]

    # -- lm-eval's three request types ---------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from pipeline.eval.harness import continuation_logprobs

        pairs = []
        for req in requests:
            context, continuation = req.args
            # Split like HF's harness model: trailing spaces of the context belong to the continuation.
            n_space = len(context) - len(context.rstrip())
            if n_space:
                context, continuation = context[:-n_space], context[-n_space:] + continuation
            ctx_ids = self._with_bos(self._encode(context))
            whole = self._with_bos(self._encode(context + continuation))
            same_prefix = whole[: len(ctx_ids)] == ctx_ids
            cont_ids = whole[len(ctx_ids) :] if same_prefix else self._encode(continuation)
            pairs.append((ctx_ids, cont_ids))
        out: list[tuple[float, bool]] = []
        for start in tqdm(range(0, len(pairs), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            out += continuation_logprobs(self.engine, pairs[start : start + self.batch_size])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from pipeline.eval.harness import continuation_logprobs

        bos = self.tokenizer.bos_token_id
        if bos is None:
            raise ValueError("loglikelihood_rolling needs a tokenizer with a BOS token to condition on")
        pairs = [([bos], self._encode(req.args[0])[: self.max_length - 1]) for req in requests]
        out: list[float] = []
        for start in tqdm(range(0, len(pairs), self.batch_size), disable=disable_tqdm, desc="rolling"):
            batch = pairs[start : start + self.batch_size]
            out += [lp for lp, _ in continuation_logprobs(self.engine, batch)]
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from pipeline.eval.harness import generate_batch

        out: list[str] = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm, desc="generate"):
            chunk = requests[start : start + self.batch_size]
            prompts, budgets, stops, context_lens = [], [], [], []
            for req in chunk:
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                stops.append([until] if isinstance(until, str) else list(until))
                budgets.append(int(kwargs.get("max_gen_toks", self.max_gen_toks)))
                ids, context_len = self._prompt(context)
                cut = max(0, len(ids) - (self.max_length - budgets[-1]))
                if cut:
                    print(f"[{MODEL_NAME}] a prompt of {len(ids)} tokens loses its first {cut} (max_length "
                          f"{self.max_length} - max_gen_toks {budgets[-1]})", file=sys.stderr)  # fmt: skip
                prompts.append(ids[cut:])
                context_lens.append(context_len - cut if context_len and context_len > cut else None)
            gens = generate_batch(self.engine, prompts, budgets, context_lens)
            self.measured_crs += [gen.measured_cr for gen in gens]
            for gen, stop in zip(gens, stops, strict=True):
                text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
                cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
                out.append(text[:cut])
        if self.measured_crs:
            mean = sum(self.measured_crs) / len(self.measured_crs)
            print(f"[{MODEL_NAME}] mean measured CR {mean:.2f} over {len(self.measured_crs)} generations",
                  file=sys.stderr)  # fmt: skip
        return out

    def _prompt(self, context: str) -> tuple[list[int], int | None]:
        """(ids with BOS, tokens before the question or None). With split_at, the text up to its last
        occurrence is prefilled and compressed first and the question is read through the compressed
        cache, as the `evaluate` stage does; otherwise the whole prompt is one full-attention prefill."""
        at = context.rfind(self.split_at) if self.split_at else -1
        if at <= 0:
            return self._with_bos(self._encode(context)), None
        head = self._with_bos(self._encode(context[:at].rstrip()))
        return head + self._encode(context[at:]), len(head)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `dms-engine` registered (same arguments as `lm_eval`)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
