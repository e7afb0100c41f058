"""`make bench` end to end at a small size: every figure present, memory ratios as the forced CR says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.bench.decode import run_decode
from pipeline.bench.report import write_results


def test_bench_small_run_writes_results(tmp_path):
    torch.set_num_threads(1)
    report = run_decode(context=200, batch=2, build_dir=tmp_path / "no-build", decode_tokens=8, rounds=2)
    report |= {"device": "cpu", "load_average_1m": {"start": 0.0, "end": 0.0}}
    write_results(report, tmp_path / "out", md_path=tmp_path / "RESULTS.md")
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    for key in (
        "kv_bytes_ratio",
        "capacity_ratio",
        "decode_tokens_per_s",
        "context_tokens",
        "batch",
        "device",
    ):
        assert key in data
    assert set(data["decode_tokens_per_s"]) == {"dms", "vanilla", "hf"}
    assert all(v > 0 for v in data["decode_tokens_per_s"].values())
    for name, speed in data["decode_tokens_per_s"].items():  # the best of the interleaved rounds
        assert speed == max(data["details"][name]["decode_tokens_per_s_rounds"])
        assert len(data["details"][name]["decode_tokens_per_s_rounds"]) == 2
    assert data["dms_decisions"].startswith("forced")  # no trained checkpoint under tmp_path
    # 199 tokens go through the model (the last sampled one is never fed); at CR 8 with a 32-token window
    # 33 + 166 // 8 = 53 stay live: 4 blocks of 16 against 13
    assert data["kv_bytes_ratio"] == 13 / 4
    assert data["details"]["dms"]["pool_blocks_used_after"] == 0
    assert "kv_bytes_ratio" in (tmp_path / "RESULTS.md").read_text()


def test_trained_checkpoint_is_benched_on_task_text(tmp_path):
    """Learned decisions depend on content: the trained checkpoint reads held-out task text (every
    prompt exactly the asked length, so HF can batch them), not random ids."""
    from pipeline.bench.decode import task_prompts
    from pipeline.data.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(512, seed=0)
    save_tokenizer(tok, tmp_path)
    prompts = task_prompts(tmp_path, batch=4, tokens=300)
    assert [len(p) for p in prompts] == [300] * 4 and all(p[0] == tok.bos_token_id for p in prompts)
    words = tok.convert_ids_to_tokens(prompts[0])
    assert tok.unk_token_id not in prompts[0] and "." in words and any(w.startswith("k") for w in words)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--context", "10"], "--context more than 256"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--sections", "decode,speed"], "unknown speed"),
        (["--sections", "shape", "--shape", "gpt-5"], "unknown shape 'gpt-5'"),
    ],
)
def test_bad_bench_arguments_are_clear_errors(argv, message, capsys):
    from pipeline.cli import main

    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_out_without_markdown_leaves_the_tracked_results_alone(tmp_path):
    from pipeline.bench.report import RESULTS_MD, output_paths

    assert output_paths(None, None) == (Path("build/bench"), RESULTS_MD)  # `make bench`
    assert output_paths("exp", None) == (Path("exp"), Path("exp/RESULTS.md"))
    assert output_paths("exp", "notes.md") == (Path("exp"), Path("notes.md"))


def test_shape_section_times_both_methods_at_each_batch():
    from pipeline.bench.shape import run_shape

    torch.set_num_threads(1)
    shape = run_shape("llama-3.2-1b", tiny_widths=True, batches=(2, 4), prompt_tokens=24, steps=3)
    for key in ("step_ms", "host_fraction", "compression_ratio"):
        assert set(shape[key]) == {"dms", "vanilla"} and set(shape[key]["dms"]) == {"2", "4"}
    assert all(v > 0 for m in shape["step_ms"].values() for v in m.values())
    assert all(0 <= v <= 1 for m in shape["host_fraction"].values() for v in m.values())
    assert shape["compression_ratio"]["dms"]["4"] > 1.2, "random adapters evict past the 16-token window"
    assert shape["compression_ratio"]["vanilla"]["4"] == 1.0


def test_equal_memory_sizes_both_pools_from_one_budget(tmp_path):
    from pipeline.bench.equal_memory import pool_tokens_for, run_equal_memory

    torch.set_num_threads(1)
    em = run_equal_memory(build_dir=tmp_path / "no-build", requests=4, prompt_tokens=40, new_tokens=80,
                          vanilla_sequences=1)
    config = {"model_type": "qwen3", "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
              "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384, "vocab_size": 512}
    assert em["kv_pool_tokens"] == pool_tokens_for(em["kv_memory_bytes"], config)  # one budget, both engines
    dms, vanilla = em["rows"]["dms"], em["rows"]["vanilla"]
    assert vanilla["running_max"] == 1 and dms["running_max"] > 1  # the memory DMS frees is used
    assert vanilla["preemptions"] == 0
    assert dms["pool_blocks_used_after"] == vanilla["pool_blocks_used_after"] == 0
    assert em["dms_over_vanilla_tokens_per_s"] > 0


def test_the_served_figure_and_its_gap_to_the_engine_alone(tmp_path):
    import json

    from pipeline.bench.equal_memory import served
    from pipeline.bench.report import _served_lines

    assert served("tiny-qwen3", tmp_path) is None  # perf has not run
    assert "no perf measurement yet" in _served_lines(None, 3.0)[0]

    def row(method, c, tps):
        return {"method": method, "concurrency": c, "output_tokens_per_s": tps, "running_max": min(c, 8),
                "mean_cr": 8.0 if method == "dms" else 1.0, "itl_ms_p99": 40.0,
                "cpu_ms_per_token": {"triton": 0.37, "tensorrt_llm": 0.6}}  # fmt: skip

    section = {"kv_memory_bytes": 1 << 20, "dms_over_vanilla_tokens_per_s": 2.0,
               "rows": [row("dms", 8, 500.0), row("vanilla", 8, 480.0), row("dms", 64, 1200.0),
                        row("vanilla", 64, 600.0)],
               "load_average_1m": {"start": 1.5, "end": 2.5}}  # fmt: skip
    (tmp_path / "tiny-qwen3" / "perf").mkdir(parents=True)
    (tmp_path / "tiny-qwen3" / "perf" / "summary.json").write_text(json.dumps({"equal_memory": section}))
    got = served("tiny-qwen3", tmp_path)
    assert got["concurrency"] == 64 and got["rows"]["dms"]["output_tokens_per_s"] == 1200.0
    text = "\n".join(_served_lines(got, 3.35))
    assert "| dms | 1200.0 | 8 | 8.00 | 40.0 | triton 0.37, tensorrt_llm 0.60 |" in text
    assert "served: 2.00; engine only (above): 3.35; gap +1.35." in text and "load 1.5 to 2.5" in text


def test_a_rerun_keeps_the_notes_section(tmp_path):
    from pipeline.bench.report import NOTES, keep_notes

    md = tmp_path / "RESULTS.md"
    md.write_text("# old table\n\n" + NOTES + "\n\n## Served, through Triton\n\nfigures\n")
    new = keep_notes(md, "# new table\n")
    assert new.startswith("# new table") and "old table" not in new
    assert new.endswith(NOTES + "\n\n## Served, through Triton\n\nfigures\n")
    assert keep_notes(tmp_path / "absent.md", "# t").endswith(NOTES + "\n")
