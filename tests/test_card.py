"""Model card validation: every card loads, and each kind of mistake names the file, key and fix."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.card import CardError, available_cards, load_card
from pipeline.cli import main

BASE = {
    "name": "t",
    "family": "qwen3",
    "description": "test card",
    "source": {"kind": "local", "dir_env": "DMS_TEST_MODEL_DIR"},
    "dms": {"window": 32},
    "retrofit": {"seq_len": 256},
    "build": {"kv_block_size": 16},
}


def write_card(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_change(section: str | None, key: str, value) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    target = data.setdefault(section, {}) if section else data
    target[key] = value
    return data


@pytest.mark.parametrize("name", available_cards())
def test_every_shipped_card_loads(name):
    card = load_card(name)
    assert card.name == name
    assert card.build.kv_block_size < card.dms.window


def test_required_cards_are_shipped():
    assert {"tiny-qwen3", "smollm2-135m", "qwen3-8b", "qwen3-1.7b", "llama-3.2-1b"} <= set(available_cards())


def test_valid_card_loads(tmp_path):
    card = load_card(str(write_card(tmp_path, BASE)))
    assert card.dms.window == 32 and card.dms.target_cr == 8.0  # int in YAML becomes float


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        (None, "colour", "blue", "unknown key 'colour'"),
        ("dms", "windw", 3, "unknown key 'dms.windw'"),
        ("dms", "window", "wide", "'dms.window' must be int"),
        ("dms", "decision", "magic", "'dms.decision' is 'magic'; allowed: 'borrowed', 'adapter'"),
        (None, "family", "gpt2", "'family' is 'gpt2'; allowed"),
        ("dms", "target_cr", 0.5, "must be >= 1"),
        ("build", "kv_block_size", 64, "must be smaller than dms.window"),
        ("dms", "window", 512, "must be shorter than retrofit.seq_len"),
        ("retrofit", "checkpoint_crs", "2,4", "'retrofit.checkpoint_crs' must be a list"),
        ("build", "tp_size", 3, "tp_size must be 1, 2, 4 or 8"),
        ("serve", "stream_interval", 0, "serve.stream_interval .* must be between 1 and 256, got 0"),
        ("retrofit", "logit_clip", 0, "retrofit.logit_clip must be > 0"),
        (None, "name", "../../evil", "name '../../evil' must be lower-case letters"),
        (None, "name", "", "name '' must be"),
        ("eval", "items_per_task", 0, "eval.items_per_task must be >= 1, got 0"),
        ("eval", "max_accuracy_drop", -5, "eval.max_accuracy_drop must be >= 0"),
        ("eval", "lengths", [], "eval.lengths needs at least one entry"),
        ("perf", "concurrency", [], "perf.concurrency needs at least one entry"),
        ("perf", "concurrency", [0, 2], "perf.concurrency needs at least one entry, each >= 1"),
        ("perf", "measurement_ms", 0, "perf.measurement_ms must be >= 1"),
        ("build", "max_batch_size", -1, "build.max_batch_size must be >= 1"),
        ("build", "kv_pool_tokens", 0, "build.kv_pool_tokens must be >= 1"),
        ("retrofit", "batch_size", 0, "retrofit.batch_size must be >= 1"),
        ("retrofit", "lr", "fast", "'retrofit.lr' must be float"),
        ("dms", "tau", 0, "dms.tau must be > 0"),
        ("perf", "input_tokens", 1024, "perf workload \\(1024 tokens in, 64 out\\) must fit the engine"),
        ("perf", "output_tokens", 2000, "must fit the engine"),
        ("build", "kv_pool_tokens", 16, "cannot hold one request .* at least 2064 \\(129 blocks of 16"),
    ],
)
def test_card_errors_name_file_key_and_allowed(tmp_path, section, key, value, message):
    path = write_card(tmp_path, with_change(section, key, value))
    with pytest.raises(CardError) as err:
        load_card(str(path))
    assert re.search(message, str(err.value))
    assert str(path) in str(err.value)


def test_missing_required_key(tmp_path):
    data = dict(BASE)
    del data["family"]
    with pytest.raises(CardError, match="missing required key 'family'"):
        load_card(str(write_card(tmp_path, data)))


def test_not_a_mapping(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(CardError, match="must be a YAML mapping"):
        load_card(str(path))


def test_local_weights_dir_missing_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DMS_TEST_MODEL_DIR", raising=False)
    card = load_card(str(write_card(tmp_path, BASE)))
    with pytest.raises(CardError, match="set DMS_TEST_MODEL_DIR=/path/to/hf-checkpoint"):
        card.weights_dir()
    monkeypatch.setenv("DMS_TEST_MODEL_DIR", str(tmp_path))
    with pytest.raises(CardError, match="no config.json"):
        card.weights_dir()
    (tmp_path / "config.json").write_text("{}")
    assert card.weights_dir() == tmp_path


def test_unknown_model_lists_cards(capsys):
    assert main(["engine", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "tiny-qwen3" in err and "qwen3-8b" in err


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-4 as a string; a user writing it means the number.
    card = load_card(str(write_card(tmp_path, with_change("retrofit", "lr", "3e-4"))))
    assert card.retrofit.lr == 3e-4


def test_gpu_cards_ask_for_distillation_data_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DMS_RETROFIT_DATA", raising=False)
    monkeypatch.setenv("DMS_MODEL_DIR", str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    build = tmp_path / "build"
    assert main(["engine", "--model", "qwen3-8b", "--build-dir", str(build)]) == 2
    err = capsys.readouterr().err
    assert "needs distillation data on disk: set DMS_RETROFIT_DATA=" in err and "teacher-answers" in err
    assert not build.exists()  # refused before prepare


def test_retrofit_data_keyword_card_relative_path_and_env(tmp_path, monkeypatch):
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "hi"}\n')
    monkeypatch.setenv("DMS_RETROFIT_DATA", str(other))  # only for cards that leave retrofit.data null
    assert load_card(str(write_card(tmp_path, BASE))).retrofit_data() == "synthetic"
    (tmp_path / "traces.jsonl").write_text('{"text": "hello"}\n')
    card = load_card(str(write_card(tmp_path, with_change("retrofit", "data", "traces.jsonl"))))
    assert card.retrofit_data() == tmp_path / "traces.jsonl"  # relative to the card, not the cwd
    card = load_card(str(write_card(tmp_path, with_change("retrofit", "data", None))))
    assert card.retrofit_data() == other
    monkeypatch.setenv("DMS_RETROFIT_DATA", str(tmp_path / "missing.jsonl"))
    with pytest.raises(CardError, match="missing.jsonl \\(from DMS_RETROFIT_DATA=.*\\) does not exist"):
        card.retrofit_data()


@pytest.mark.parametrize("value", [".nan", ".inf", "nan"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(with_change("retrofit", "lr", 1.0)).replace("lr: 1.0", f"lr: {value}"))
    with pytest.raises(CardError, match="'retrofit.lr' must be a finite number"):
        load_card(str(path))


def test_unusable_build_dir_is_a_clear_error(capsys):
    assert main(["engine", "--build-dir", "/dev/null/build"]) == 2
    err = capsys.readouterr().err
    assert "cannot use --build-dir /dev/null/build: /dev/null is not a directory" in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 0}, "pretrain.hidden_size 0: pretrain sizes, counts and lr must be positive"),
        ({"num_kv_heads": 3}, "pretrain.num_heads \\(8\\) must be a multiple of pretrain.num_kv_heads"),
    ],
)
def test_pretrain_section_is_validated(tmp_path, change, message):
    data = {**BASE, "source": {"kind": "embedded"}, "pretrain": change}
    with pytest.raises(CardError, match=message):
        load_card(str(write_card(tmp_path, data)))


def test_a_pretrain_shape_other_than_the_committed_teacher_needs_from_scratch(tmp_path):
    from pipeline.data.teacher import prepare_embedded

    card = load_card(str(write_card(tmp_path, {**BASE, "source": {"kind": "embedded"},
                                               "pretrain": {"hidden_size": 64}})))  # fmt: skip
    with pytest.raises(CardError, match="pretrain.hidden_size 64 \\(committed: 128\\).*--from-scratch"):
        prepare_embedded(card, tmp_path / "model", from_scratch=False)
    assert not (tmp_path / "model").exists()


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(BASE) + "family: llama\n")  # YAML alone would keep the last one
    with pytest.raises(CardError, match="key 'family' is given twice"):
        load_card(str(path))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["engine", "--model", "/nonexistent/card.yaml"], "card file /nonexistent/card.yaml does not"),
        (["engine", "--until", "prepare", "--force", "retrofit"], "--force retrofit comes after --until"),
        (["prune", "--build-dir", "/nonexistent-build"], "no build of tiny-qwen3 under /nonexistent-build"),
    ],
)
def test_cli_mistakes_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_missing_model_directory_stops_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMS_MODEL_DIR", str(tmp_path / "no-such-model"))
    monkeypatch.setenv("DMS_RETROFIT_DATA", str(tmp_path))
    build = tmp_path / "build"
    assert main(["engine", "--model", "qwen3-8b", "--build-dir", str(build)]) == 2
    assert "is not a Hugging Face model directory" in capsys.readouterr().err
    assert not build.exists()


def test_ask_max_tokens_must_fit_int32(capsys):
    with pytest.raises(SystemExit):
        main(["ask", "hi", "--max-tokens", "3000000000"])
    assert "3000000000 is not a token count (1-2147483647)" in capsys.readouterr().err


def _tiny_with_equal_memory(tmp_path: Path, **change) -> Path:
    data = yaml.safe_load((Path(__file__).parents[1] / "pipeline" / "cards" / "tiny-qwen3.yaml").read_text())
    data["perf"]["equal_memory"].update(change)
    return write_card(tmp_path, data)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kv_memory_bytes": 1_000_000}, "kv_memory_bytes \\(1000000\\) gives each KV stream 480 slots .* "
         "one vanilla request of 1153 tokens needs 1184: raise kv_memory_bytes to at least 2424832"),
        ({"concurrency": [1, 4, 8]}, "concurrency \\(up to 8\\) never goes past what the vanilla pool holds "
         "\\(8 requests"),
        ({"output_tokens": 5000}, "equal-memory workload \\(128 tokens in, 5000 out\\) must fit the engine"),
        ({"concurrency": []}, "perf.equal_memory.concurrency needs at least one entry"),
        ({"min_dms_over_vanilla_tokens_per_s": 0}, "min_dms_over_vanilla_tokens_per_s must be > 0"),
        ({"kv_memory_bytes": "lots"}, "'perf.equal_memory.kv_memory_bytes' must be int"),
        ({"gate": 4}, "unknown key 'perf.equal_memory.gate'"),
    ],
)
def test_equal_memory_errors_name_key_numbers_and_fix(tmp_path, change, message):
    """The embedded card's shape is known up front: a budget that cannot work stops at load time."""
    with pytest.raises(CardError, match=message):
        load_card(str(_tiny_with_equal_memory(tmp_path, **change)))


def test_the_old_ratio_allowance_is_gone(tmp_path):
    data = yaml.safe_load((Path(__file__).parents[1] / "pipeline" / "cards" / "tiny-qwen3.yaml").read_text())
    data["perf"]["min_dms_over_vanilla"] = 0.7
    with pytest.raises(CardError, match="unknown key 'perf.min_dms_over_vanilla'"):
        load_card(str(write_card(tmp_path, data)))


# KV bytes per token of the real models the GPU cards name (their config.json: layers, KV heads, head_dim).
REAL_SHAPES = {
    "qwen3-8b": (36, 8, 128, "bfloat16"),
    "qwen3-1.7b": (28, 8, 128, "bfloat16"),
    "llama-3.2-1b": (16, 8, 64, "bfloat16"),
    "smollm2-135m": (30, 3, 64, "float32"),
    "tiny-qwen3": (4, 2, 32, "float32"),
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_every_card_has_an_equal_memory_workload_its_model_can_run(name):
    from pipeline.card import equal_memory_pool, kv_bytes_per_token

    card = load_card(name)
    em = card.perf.equal_memory
    assert em is not None and em.min_dms_over_vanilla_tokens_per_s >= 1.0
    layers, kv_heads, head_dim, dtype = REAL_SHAPES[name]
    assert dtype == card.build.dtype
    pool = equal_memory_pool(card, kv_bytes_per_token(layers, kv_heads, head_dim, dtype))
    assert pool.pool_bytes <= em.kv_memory_bytes and 1 <= pool.vanilla_requests < max(em.concurrency)


def test_every_shipped_card_is_covered_by_the_shapes():
    assert set(available_cards()) == set(REAL_SHAPES)
