"""The eval harness on the real engine with tiny random models: protocol exactness, the baselines'
budgets matched to DMS's measured CR, teacher-forced logits, and the evaluate stage's gate."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from pipeline.card import load_card
from pipeline.data.tasks import eval_items
from pipeline.data.tokenizer import train_tokenizer
from pipeline.eval.compare import compare_methods
from pipeline.eval.harness import encode_item, engine_for, forced_logits, generate_batch
from pipeline.eval.summary import combine_cr


def make_tiny(path: Path, dms_window: int | None = None, seed: int = 0) -> Path:
    """A random 2-layer Qwen3 with the project tokenizer; with dms_window, a DMS checkpoint whose
    borrowed-channel logits (scale 10, offset 0) evict roughly half the tokens."""
    tok = train_tokenizer(512, seed=0, n_items=12)
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
        initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    transformers.Qwen3ForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    if dms_window is not None:
        c = json.loads((path / "config.json").read_text())
        c.update(dms_window_size=dms_window, dms_paged_attention_block_size=8, dms_alpha_scale=10.0,
                 dms_initial_alpha_offset=0.0, dms_separate_alpha=False, dms_alpha_per="head",
                 dms_disable_eviction=False, dms_cr=4, dms_tau=0.1)
        (path / "config.json").write_text(json.dumps(c))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return {"base": make_tiny(root / "base"), "dms": make_tiny(root / "dms", dms_window=16)}


@pytest.fixture(scope="module")
def tokenizer(models):
    return transformers.AutoTokenizer.from_pretrained(str(models["base"]))


@pytest.mark.parametrize("policy", ["none", "dms"])
def test_context_then_question_is_exact_for_exact_policies(models, tokenizer, policy):
    """No eviction and DMS (exact chunked prefill) answer the same whether or not the question is a
    separate prefill chunk; only the fixed-budget baselines may differ."""
    path = models["base" if policy == "none" else "dms"]
    engine = engine_for(path, policy, None, max_batch_size=4, max_len=320, kv_block_size=8)
    items = eval_items("arithmetic", 256, 4)
    encoded = [encode_item(tokenizer, it) for it in items]
    prompts = [p for p, _ in encoded]
    assert all(p[0] == tokenizer.bos_token_id and len(p) == it.length - len(it.answer.split()) + 1
               for p, it in zip(prompts, items, strict=True))
    split = generate_batch(engine, prompts, [6] * 4, [c for _, c in encoded])
    whole = generate_batch(engine, prompts, [6] * 4)
    assert [g.token_ids for g in split] == [g.token_ids for g in whole]
    assert [g.measured_cr for g in split] == pytest.approx([g.measured_cr for g in whole])


def test_baselines_run_at_dms_measured_cr(models, tokenizer):
    card = load_card("tiny-qwen3")
    card = dataclasses.replace(
        card, eval=dataclasses.replace(card.eval, lengths=(128, 256)),
        build=dataclasses.replace(card.build, max_batch_size=4, kv_block_size=8),
    )
    items = [it for n in (128, 256) for t in ("needle", "variables") for it in eval_items(t, n, 2)]
    results, targets = compare_methods(
        card, tokenizer, models["base"], {"4": models["dms"]}, items, 4, log=lambda _: None
    )
    by = {}
    for r in results:
        by.setdefault((r.method, r.cr_label, r.length), []).append(r)
    vanilla_bytes = max(r.peak_kv_bytes for r in results if r.method == "vanilla")
    for length in (128, 256):
        dms_cr = combine_cr(r.measured_cr for r in by[("dms", "4", length)])
        assert 1.3 < dms_cr < 3.5  # random decisions evict about half of what leaves the window
        assert targets["4"][str(length)] == pytest.approx(dms_cr, abs=1e-3)
        for method in ("window", "h2o", "tova", "kvzip"):
            rows = by[(method, "4", length)]
            got = combine_cr(r.measured_cr for r in rows)
            # The budget is set for prompt + max new tokens; fewer generated tokens lower the CR a bit.
            assert 0.85 * dms_cr <= got <= 1.02 * dms_cr, (method, length, got, dms_cr)
            assert max(r.peak_kv_bytes for r in rows) < vanilla_bytes
    assert {r.method for r in results} == {"vanilla", "dms", "window", "h2o", "tova", "kvzip"}
    assert all(r.measured_cr == 1.0 for r in results if r.method == "vanilla")


def test_forced_logits_match_hf_for_no_eviction(models):
    engine = engine_for(models["base"], "none", None, max_batch_size=2, max_len=64, kv_block_size=8)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(models["base"])).eval()
    pairs = [([1, 40, 41, 42, 43], [44, 45, 46]), ([1, 50, 51], [52])]
    got = forced_logits(engine, pairs)
    for (prompt, forced), logits in zip(pairs, got, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([prompt + forced])).logits[0, len(prompt) - 1 : -1]
        assert logits.shape == want.shape
        torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4)
    assert engine.pool.num_used_blocks == 0  # every stream released


def _stage_ctx(tmp_path, models):
    from pipeline.runner import StageContext

    prepare, retrofit = tmp_path / "prepare", tmp_path / "retrofit"
    prepare.mkdir(parents=True)
    (prepare / "model").symlink_to(models["base"])
    (retrofit / "checkpoints").mkdir(parents=True)
    (retrofit / "checkpoints" / "cr8").symlink_to(models["dms"])
    card = load_card("tiny-qwen3")
    card = dataclasses.replace(
        card,
        eval=dataclasses.replace(card.eval, items_per_task=2, lengths=(96,)),
        build=dataclasses.replace(card.build, max_batch_size=6, kv_block_size=8),
    )
    out = tmp_path / "out"
    out.mkdir()
    return StageContext(
        card=card, out_dir=out, inputs={"prepare": prepare, "retrofit": retrofit},
        reports={"retrofit": {"checkpoints": {"8": "checkpoints/cr8"}}}, build_root=tmp_path / "build",
    )


def test_evaluate_stage_outputs_and_gate(tmp_path, models):
    from pipeline.stages import evaluate

    ctx = _stage_ctx(tmp_path, models)
    report = evaluate.run(ctx)
    assert set(report["accuracy"]) == {"vanilla", "dms", "window", "h2o", "tova", "kvzip"}
    assert set(report["accuracy"]["vanilla"]) == {"1"} and set(report["accuracy"]["tova"]) == {"8"}
    tasks = {"needle", "variables", "arithmetic", "trace"}
    for figure in ("accuracy", "measured_cr", "peak_kv_bytes", "generated_tokens"):
        for method, label in (("vanilla", "1"), ("dms", "8"), ("window", "8"), ("kvzip", "8")):
            assert set(report[figure][method][label]) == tasks | {"average"}, (figure, method)
    assert report["measured_cr"]["dms"]["8"]["average"] > 1.0
    for name in ("results.json", "results.md", "accuracy_vs_cr.png"):
        assert (ctx.out_dir / name).stat().st_size > 0
    assert report["plot"].endswith("tiny-qwen3/evaluate/accuracy_vs_cr.png")
    full = json.loads((ctx.out_dir / "results.json").read_text())
    assert len(full["items"]) == 6 * 4 * 2  # methods x tasks x items
    # The trace is generated by the engine under each policy: a random model runs to max_tokens (the
    # trace's length + 2), and the measured CR counts those generated tokens.
    traces = [r for r in full["items"] if r["task"] == "trace"]
    want = len(eval_items("trace", 96, 1)[0].answer.split()) + 2
    assert all(r["generated_tokens"] == want for r in traces if r["method"] == "vanilla")
    assert all(r["generated_tokens"] > 0 for r in traces)
    # The gate judges the report: random models answer nothing, vanilla and DMS both score 0, and a
    # drop of 0 passes a limit of 3...
    gate = evaluate.gate(report, ctx.card)
    assert gate["passed"] and gate["drop"] == 0.0 and "message" not in gate
    assert gate["gated_tasks"] == ["trace"] and gate["task_drops"]["trace"] == 0.0
    # ...while a limit below zero fails even a perfect model, naming the task and the numbers.
    strict = dataclasses.replace(ctx.card, eval=dataclasses.replace(ctx.card.eval, max_accuracy_drop=-1.0))
    gate = evaluate.gate(report, strict)
    assert not gate["passed"]
    assert re.search(r"drop 0\.0 points, limit -1\.0.*task '\w+'", gate["message"])


def test_agreement_vanilla_is_exact_and_baselines_match_dms_cr(models, tokenizer):
    from pipeline.eval.compare import compare_agreement

    out = compare_agreement(
        tokenizer, models["base"], {"4": models["dms"]}, n_prompts=2, new_tokens=40, batch_size=2,
        baselines=("window", "tova"), log=lambda _: None,
    )
    v = out["vanilla"]["1"]
    assert v["kl"] < 1e-4 and v["token_match"] == 1.0 and v["measured_cr"] == 1.0 and v["new_tokens"] == 40
    dms = out["dms"]["4"]
    assert dms["measured_cr"] > 1.2 and dms["kl"] > 0
    for method in ("window", "tova"):
        got = out[method]["4"]
        assert 0.8 * dms["measured_cr"] <= got["measured_cr"] <= 1.05 * dms["measured_cr"], (method, got)
        assert 0.0 <= got["token_match"] <= 1.0 and got["kl"] >= 0.0


def test_real_model_evaluate_reports_quality_and_gates_on_baselines(tmp_path, models, monkeypatch):
    """A real-model card (passkey items, agreement with vanilla): every method has passkey, KL and token
    match at the checkpoint's CR; random models retrieve no key, so DMS does not beat the baselines and
    the quality gate fails, saying so."""
    from pipeline.stages import evaluate

    monkeypatch.setattr(evaluate, "AGREEMENT_PROMPTS", 2)
    monkeypatch.setattr(evaluate, "AGREEMENT_NEW_TOKENS", 24)
    ctx = _stage_ctx(tmp_path, models)
    real = load_card("smollm2-135m")
    ctx.card = dataclasses.replace(
        real, dms=dataclasses.replace(real.dms, target_cr=8.0), eval=ctx.card.eval, build=ctx.card.build,
    )
    report = evaluate.run(ctx)
    assert set(report["quality"]) == {"vanilla", "dms", "window", "h2o", "tova", "kvzip"}
    for method, per_cr in report["quality"].items():
        q = per_cr["1" if method == "vanilla" else "8"]
        assert 0.0 <= q["token_match"] <= 1.0 and q["kl"] >= 0.0 and q["passkey_cr"] >= 1.0, method
    assert report["quality"]["vanilla"]["1"]["kl"] < 1e-4
    assert "passkey retrieval" in (ctx.out_dir / "results.md").read_text()
    gate = evaluate.gate(report, ctx.card)
    assert not gate["passed"] and "baselines" in gate["failed"]
    want = r"does not beat window 0\.0%, h2o 0\.0%, tova 0\.0%, kvzip 0\.0% at the same CR"
    assert re.search(want, gate["message"])


def _quality_report(dms_passkey, dms_kl, baseline_passkey=10.0):
    accuracy = {"vanilla": {"1": {"passkey": 100.0, "average": 100.0}},
                "dms": {"4": {"passkey": dms_passkey, "average": dms_passkey}}}
    for m in ("window", "h2o", "tova"):
        accuracy[m] = {"4": {"passkey": baseline_passkey, "average": baseline_passkey}}
    return {"accuracy": accuracy, "agreement": {"dms": {"4": {"kl": dms_kl, "token_match": 0.8}}}}


@pytest.mark.parametrize(
    "dms_passkey, dms_kl, failed",
    [(95.0, 0.1, []), (95.0, 0.5, ["kl"]), (80.0, 0.1, ["passkey_drop"]),
     (10.0, 0.1, ["passkey_drop", "baselines"])],
)
def test_quality_gate_needs_every_check(dms_passkey, dms_kl, failed):
    from pipeline.eval.gate import check_quality_gate

    gate = check_quality_gate(_quality_report(dms_passkey, dms_kl), "4", 10.0, ("window", "h2o", "tova"),
                              max_kl=0.3, min_token_match=0.7)
    assert gate["failed"] == failed and gate["passed"] == (not failed)
    assert ("message" in gate) == bool(failed)
