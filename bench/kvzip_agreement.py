"""Our engine's KVzip policy against kvpress's KVzipPress, once, on a handful of held-out items.

kvpress is not a project dependency (it needs numpy >= 2 and transformers < 5.3), so this script runs in
two environments that share only a JSON file:

  .venv/bin/python bench/kvzip_agreement.py engine --out /tmp/kvzip_engine.json
  python3.11 -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install torch==2.13.0 \
      kvpress "numpy>=2" "transformers<5.3"
  /tmp/kvpress-venv/bin/python bench/kvzip_agreement.py kvpress --engine /tmp/kvzip_engine.json

`engine` runs each item through the engine under `KVzipPolicy` and records, per layer, each context
token's importance, the tokens each KV head kept, and the answer. It reconstructs with the tokens that
KVzipPress builds for a tokenizer without a chat template (its repeat prompt, then the context), so both
sides score the same forward pass. `kvpress` prefills the same context under `KVzipPress`, reads its
scores and the tokens it masks, greedy-decodes the question through its compressed cache and compares:
the importance itself, each head's top tokens at our budget (the selection rule alone), and kvpress's
own selection (a budget shared by a layer's heads, 4 sink tokens kept) with its answers.
Results: bench/RESULTS.md (its notes section, which `make bench` keeps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "pipeline" / "assets" / "tiny-qwen3"
# KVzipPress.prepare's first-chunk prompt; the suffix of a tokenizer without a chat template is "\n".
KVPRESS_REPEAT_PROMPT, KVPRESS_SUFFIX = "\n\nRepeat the previous context exactly.", "\n"
ITEMS = [("needle", 1024, 2), ("variables", 1024, 2), ("arithmetic", 1024, 2),
         ("needle", 256, 1), ("variables", 256, 1), ("arithmetic", 256, 1)]  # fmt: skip
CR = 8.0


def engine_side(out: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from pipeline.data.tasks import eval_items
    from pipeline.eval.harness import encode_item
    from pipeline.eval.scoring import max_answer_tokens
    from pipeline.hf_files import load_tokenizer
    from pipeline.runtime.engine import Engine, EngineLimits
    from pipeline.runtime.policies import KVzipPolicy

    torch.set_num_threads(1)
    tok = load_tokenizer(TEACHER)
    repeat = tok.encode(KVPRESS_REPEAT_PROMPT, add_special_tokens=False) + tok.encode(
        KVPRESS_SUFFIX, add_special_tokens=False)
    records: list[dict] = []

    class Recording(KVzipPolicy):
        def keep_by_importance(self, importance, valid, keep):  # once per layer, in layer order
            mask = super().keep_by_importance(importance, valid, keep)
            records[-1]["layers"].append({"importance": importance.tolist(), "keep": int(keep),
                                          "kept": [row.nonzero().flatten().tolist() for row in mask]})
            return mask

    limits = EngineLimits(max_batch_size=1, max_input_len=1100, max_output_len=1100, kv_block_size=16,
                          kv_pool_tokens=2400)
    engine = Engine.from_hf(TEACHER, policy=Recording(cr=CR, repeat_ids=tuple(repeat)), limits=limits)
    for task, length, n in ITEMS:
        for item in eval_items(task, length, n, seed=5):
            ids, context = encode_item(tok, item)
            records.append({"task": task, "length": length, "answer": item.answer, "context": ids[:context],
                            "question": ids[context:], "layers": []})
            done = engine.submit(ids, max_tokens=max_answer_tokens(item.answer), temperature=0.0,
                                 context_len=context).result()
            records[-1]["generated"] = tok.decode(done.token_ids, skip_special_tokens=True)
            records[-1]["measured_cr"] = done.stats["compression_ratio"]
    engine.stop()
    out.write_text(json.dumps({"repeat_ids": repeat, "cr": CR, "items": records}))
    print(f"wrote {len(records)} items to {out}")


def kvpress_side(engine_json: Path, out: Path | None) -> None:
    import torch
    from kvpress import KVzipPress
    from transformers import AutoTokenizer, DynamicCache, Qwen3ForCausalLM

    torch.set_num_threads(1)
    data = json.loads(engine_json.read_text())
    tok = AutoTokenizer.from_pretrained(str(TEACHER))
    model = Qwen3ForCausalLM.from_pretrained(str(TEACHER), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    eos = tok.eos_token_id

    class Recording(KVzipPress):
        def compress_post(self, model):
            self.recorded = self.score_val[:, 0].clone()  # [layers, kv_heads, context]
            super().compress_post(model)

    rows = []
    for item in data["items"]:
        ctx = torch.tensor([item["context"]])
        n0, layers = ctx.shape[1], item["layers"]
        heads = len(layers[0]["kept"])
        keep = layers[0]["keep"]
        press = Recording(compression_ratio=1 - keep / n0, layerwise=True)
        cache = DynamicCache()
        with torch.no_grad(), press(model):
            model.model(input_ids=ctx, past_key_values=cache)
        scores = press.recorded
        # Same reconstruction input: kvpress's repeat ids for this tokenizer are the ones we used.
        built = tok.encode(KVPRESS_REPEAT_PROMPT, return_tensors="pt", add_special_tokens=False)[0].tolist()
        built += tok.encode(KVPRESS_SUFFIX, return_tensors="pt", add_special_tokens=False)[0].tolist()
        assert built == data["repeat_ids"], (built, data["repeat_ids"])
        diff, top_agree, own_agree, own_kept = 0.0, [], [], 0
        for li, layer in enumerate(layers):
            ours = torch.tensor(layer["importance"])
            diff = max(diff, float((ours - scores[li]).abs().max()))
            module = model.model.layers[li].self_attn
            _, head_idx, seq_idx = module.masked_key_indices
            pruned = torch.zeros(heads, n0, dtype=torch.bool)
            pruned[head_idx, seq_idx] = True
            own_kept += int((~pruned).sum())
            for h in range(heads):
                mine = set(layer["kept"][h])
                top = set(scores[li, h].topk(keep).indices.tolist())
                top_agree.append(len(mine & top) / keep)
                theirs = set((~pruned[h]).nonzero().flatten().tolist())
                own_agree.append(len(mine & theirs) / max(1, len(mine | theirs)))
        # kvpress's answer: the question and greedy decoding through its compressed (masked) cache.
        ids, generated = torch.tensor([item["question"]]), []
        with torch.no_grad():
            for _ in range(len(item["answer"].split()) + 2):
                logits = model(input_ids=ids, past_key_values=cache).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt == eos:
                    break
                generated.append(nxt)
                ids = torch.tensor([[nxt]])
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None
        theirs_text = tok.decode(generated, skip_special_tokens=True)
        rows.append({
            "task": item["task"], "length": item["length"], "context": n0, "keep_per_head": keep,
            "importance_max_abs_diff": diff,
            "top_k_agreement": sum(top_agree) / len(top_agree),
            "kvpress_selection_jaccard": sum(own_agree) / len(own_agree),
            "kvpress_kept_fraction": own_kept / (len(layers) * heads * n0),
            "ours_correct": _correct(item["generated"], item["answer"]),
            "kvpress_correct": _correct(theirs_text, item["answer"]),
            "same_answer": item["generated"].split() == theirs_text.split(),
        })  # fmt: skip
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k not in ("task", "length")}
    summary["importance_max_abs_diff"] = max(r["importance_max_abs_diff"] for r in rows)
    for r in rows:
        print(json.dumps(r))
    print("summary", json.dumps(summary))
    if out is not None:
        out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


def _correct(generated: str, answer: str) -> bool:
    words, want = generated.split(), answer.split()
    return words[: len(want)] == want and (len(words) == len(want) or words[len(want)] in (".", "?"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="side", required=True)
    e = sub.add_parser("engine", help="our engine's KVzip (the project's .venv)")
    e.add_argument("--out", type=Path, required=True)
    k = sub.add_parser("kvpress", help="kvpress's KVzipPress (a throwaway venv with kvpress)")
    k.add_argument("--engine", type=Path, required=True, help="the engine side's JSON")
    k.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.side == "engine":
        engine_side(args.out)
    else:
        kvpress_side(args.engine, args.out)


if __name__ == "__main__":
    main()
