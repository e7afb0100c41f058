"""lm-evaluation-harness on our engine: a task defined from local JSONL files, run through the
evaluator with `--model dms-engine` (docs/evaluation.md)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.data.tasks import eval_items

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GEN_TASK = """task: tiny_needle_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """task: tiny_needle_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "needle.jsonl"
    with data.open("w") as fh:
        for it in eval_items("needle", 96, 3):
            wrong = [str((int(it.answer) + d) % 100) for d in (1, 7)]
            row = {"prompt": it.prompt, "answer": it.answer, "choices": [it.answer, *wrong]}
            fh.write(json.dumps(row) + "\n")
    (root / "tiny_needle_gen.yaml").write_text(GEN_TASK.format(data=data))
    (root / "tiny_needle_mc.yaml").write_text(MC_TASK.format(data=data))
    return root


@pytest.fixture(scope="module")
def dms_model(tmp_path_factory):
    from test_eval_harness import make_tiny

    return make_tiny(tmp_path_factory.mktemp("lm_eval_model") / "dms", dms_window=16)


def test_local_tasks_run_on_the_engine(task_dir, dms_model):
    """lm-eval's evaluator with `dms-engine` on tasks from local files (the CLI does the same, but
    first indexes lm-eval's ~14k built-in task files: a minute on this machine, so the test skips it)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import pipeline.eval.lm_eval_bridge  # noqa: F401  (registers dms-engine)

    out = lm_eval.simple_evaluate(
        model="dms-engine", model_args=f"pretrained={dms_model},policy=dms", batch_size=3,
        tasks=["tiny_needle_gen", "tiny_needle_mc"], log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    results = out["results"]
    assert 0.0 <= results["tiny_needle_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["tiny_needle_mc"]["acc,none"] <= 1.0
    mc = out["samples"]["tiny_needle_mc"]
    assert len(mc) == 3 and all(len(s["resps"]) == 3 for s in mc)  # one loglikelihood per choice
    gen = out["samples"]["tiny_needle_gen"]
    assert all(isinstance(s["resps"][0][0], str) and "." not in s["resps"][0][0] for s in gen)  # `until`


def test_loglikelihood_matches_hf_without_eviction(tmp_path):
    """The bridge's loglikelihood (through the paged engine) equals HF's for the no-eviction policy."""
    import transformers
    from lm_eval.api.instance import Instance
    from test_eval_harness import make_tiny

    from pipeline.eval.lm_eval_bridge import DmsEngineLM

    path = make_tiny(tmp_path / "base")
    lm = DmsEngineLM(pretrained=str(path), policy="none", batch_size=2, max_length=256)
    item = eval_items("needle", 64, 1)[0]
    reqs = [Instance("loglikelihood", {}, (item.prompt, " " + a), 0) for a in (item.answer, "3")]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(path)).eval()
    tok = lm.tokenizer
    for (logp, _), answer in zip(got, (item.answer, "3"), strict=True):
        ids = tok(item.prompt + " " + answer)["input_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -2].float()
        assert logp == pytest.approx(float(torch.log_softmax(logits, -1)[ids[-1]]), abs=1e-3)


def test_split_at_reads_the_question_through_the_compressed_cache():
    """A fixed-budget baseline answers a needle item when the whole prompt is one full-attention prefill
    (the question sees everything once) and fails when, as in the `evaluate` stage, the context is
    compressed before the question is read (split_at)."""
    from types import SimpleNamespace

    from pipeline.data.teacher import ASSETS_DIR
    from pipeline.eval.lm_eval_bridge import DmsEngineLM

    items = eval_items("needle", 512, 8)
    requests = [SimpleNamespace(args=(it.prompt, {"until": ["."], "max_gen_toks": 3})) for it in items]

    def accuracy(**split) -> float:
        lm = DmsEngineLM(pretrained=str(ASSETS_DIR), policy="h2o", cr=8, batch_size=8, max_length=600,
                         **split)  # fmt: skip
        answers = lm.generate_until(requests, disable_tqdm=True)
        assert 4 < sum(lm.measured_crs) / len(lm.measured_crs)  # compressed either way
        return sum(a.strip() == it.answer for a, it in zip(answers, items, strict=True)) / len(items)

    assert accuracy() >= 0.75  # 8 of 8 here
    assert accuracy(split_at="?") <= 0.25  # 1 of 8 here, at the same measured CR (7.9)
