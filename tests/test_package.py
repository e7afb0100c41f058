"""Template filling, repository validation and the package stage (no server)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_engine_dir  # noqa: E402

from pipeline.card import load_card  # noqa: E402
from pipeline.runner import StageContext  # noqa: E402
from pipeline.serve.repo import (  # noqa: E402
    RepoError,
    RepoSpec,
    fill_template,
    render_repository,
    validate_repository,
    write_repository,
)

SPEC = RepoSpec(engine_dir="../engine", tokenizer_dir="../engine", max_input_len=100, max_output_len=20)
MODELS = {"ensemble", "ensemble_vanilla", "preprocessing", "postprocessing", "tensorrt_llm",
          "tensorrt_llm_vanilla", "tensorrt_llm_bls"}  # fmt: skip


def test_fill_template_substitutes_and_names_missing_keys():
    assert fill_template("a: ${x} b: ${y}", {"x": 1, "y": "two"}) == "a: 1 b: two"
    with pytest.raises(RepoError, match=r"\$\{y\}"):
        fill_template("a: ${x} b: ${y}", {"x": 1}, "t.pbtxt")


def test_torch_repository_has_every_model_with_the_card_values():
    files = render_repository(SPEC)
    configs = validate_repository(files)
    assert set(configs) == MODELS
    engine = configs["tensorrt_llm"]
    assert engine.backend == "python" and engine.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert params["gpt_model_path"] == "../engine" and params["eviction_policy"] == "dms"
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["max_tokens_in_paged_kv_cache"] == str(SPEC.kv_pool_tokens)
    assert configs["tensorrt_llm_vanilla"].parameters["eviction_policy"].string_value == "none"
    steps = {
        name: [s.model_name for s in configs[name].ensemble_scheduling.step]
        for name in ("ensemble", "ensemble_vanilla")
    }
    assert steps["ensemble"] == ["preprocessing", "tensorrt_llm", "postprocessing"]
    assert steps["ensemble_vanilla"] == ["preprocessing", "tensorrt_llm_vanilla", "postprocessing"]
    ens_in = {t.name for t in configs["ensemble"].input}
    assert {
        "text_input",
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "random_seed",
        "stop_words",
        "stream",
    } <= ens_in
    assert {t.name for t in configs["ensemble"].output} == {
        "text_output",
        "num_output_tokens",
        "kv_live_tokens",
        "kv_compression_ratio",
    }
    assert configs["tensorrt_llm_bls"].model_transaction_policy.decoupled
    pre = {k: v.string_value for k, v in configs["preprocessing"].parameters.items()}
    assert pre["max_input_len"] == "100" and pre["max_output_len"] == "20"


def test_trtllm_repository_uses_the_cpp_backend_without_kv_outputs():
    spec = RepoSpec(engine_dir="/e", tokenizer_dir="/t", backend="trtllm", with_vanilla=False)
    configs = validate_repository(render_repository(spec))
    assert configs["tensorrt_llm"].backend == "tensorrtllm"
    assert "ensemble_vanilla" not in configs
    assert {t.name for t in configs["ensemble"].output} == {"text_output", "num_output_tokens"}


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda f: f.pop("preprocessing/config.pbtxt"), "'preprocessing' has no config.pbtxt"),
        (lambda f: [f.pop(k) for k in list(f) if k.startswith("postprocessing/1/")], "no version directory"),
        (lambda f: f.pop("tensorrt_llm_bls/1/model.py"), "no 1/model.py"),
        (
            lambda f: f.update(
                {
                    "preprocessing/config.pbtxt": f["preprocessing/config.pbtxt"].replace(
                        'name: "preprocessing"', 'name: "tokenizer"'
                    )
                }
            ),
            "must equal the directory name",
        ),
        (
            lambda f: f.update(
                {
                    "ensemble/config.pbtxt": f["ensemble/config.pbtxt"].replace(
                        'model_name: "postprocessing"', 'model_name: "detok"'
                    )
                }
            ),
            "calls 'detok'",
        ),
        (
            lambda f: f.update(
                {"ensemble/config.pbtxt": f["ensemble/config.pbtxt"].replace('key: "QUERY"', 'key: "PROMPT"')}
            ),
            "no input 'PROMPT'",
        ),
        (lambda f: f.update({"postprocessing/config.pbtxt": "name: ["}), "does not parse"),
        (lambda f: f.update({"postprocessing/config.pbtxt": 'name: "${oops}"'}), "placeholder"),
    ],
    ids=[
        "no-config",
        "no-version",
        "no-model-py",
        "name-mismatch",
        "missing-step",
        "bad-map",
        "syntax",
        "placeholder",
    ],
)
def test_validation_rejects_broken_repositories(break_it, message):
    files = render_repository(SPEC)
    break_it(files)
    with pytest.raises(RepoError, match=message):
        validate_repository(files)


def test_write_repository_is_whole_or_nothing(tmp_path):
    dest = tmp_path / "repo"
    write_repository(SPEC, dest)
    for model in MODELS:
        assert (dest / model / "config.pbtxt").is_file() and (dest / model / "1").is_dir()
    assert (dest / "tensorrt_llm" / "1" / "model.py").is_file()
    bad = RepoSpec(**{**SPEC.__dict__, "max_batch_size": "x y"})  # breaks the pbtxt syntax
    with pytest.raises(RepoError):
        write_repository(bad, dest)
    assert (dest / "ensemble" / "config.pbtxt").is_file()  # the previous repository is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporary left behind


def test_package_stage_points_at_the_build_engine(tmp_path):
    from pipeline.stages import package

    build_dir = tmp_path / "stages" / "build-abc"
    make_engine_dir(build_dir / "engine", max_input_len=77, max_output_len=33)
    out = tmp_path / "stages" / ".package-key.tmp-1"
    out.mkdir(parents=True)
    ctx = StageContext(card=load_card("tiny-qwen3"), out_dir=out, inputs={"build": build_dir},
                       reports={"build": {"backend": "torch", "engine_dir": "engine"}})  # fmt: skip
    report = package.run(ctx)
    assert report["models"] == sorted(MODELS) and report["max_input_len"] == 77
    assert report["engine_dir"] == "../../build-abc/engine"  # relative: the build tree can move
    assert ((out / "model_repo") / report["engine_dir"] / "engine.json").is_file()
    settings = package.settings(ctx.card, None)
    assert settings["templates"] and settings["build"]["max_input_len"] == ctx.card.build.max_input_len


def _trtllm_ctx(tmp_path, build_report: dict) -> StageContext:
    build_dir = tmp_path / "stages" / "build-abc"
    (build_dir / "engine").mkdir(parents=True)
    (build_dir / "engine" / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "stages" / ".package-key.tmp-1"
    out.mkdir(parents=True)
    report = {"backend": "trtllm", "engine_dir": "engine", **build_report}
    return StageContext(card=load_card("tiny-qwen3"), out_dir=out, inputs={"build": build_dir},
                        reports={"build": report})  # fmt: skip


def test_package_serves_a_stock_trtllm_engine_with_the_cpp_backend(tmp_path):
    from pipeline.stages import package

    ctx = _trtllm_ctx(tmp_path, {"servable_by_tensorrtllm_backend": True,
                                 "trtllm_engines": {"engine": "engine/engine"}})  # fmt: skip
    report = package.run(ctx)
    assert report["backend"] == report["built_backend"] == "trtllm"
    assert report["engine_dir"] == "../../build-abc/engine/engine"
    assert "ensemble_vanilla" not in report["models"]  # the C++ backend has no eviction-off twin
    config = (ctx.out_dir / "model_repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'backend: "tensorrtllm"' in config


def test_package_serves_a_dms_trtllm_pair_with_its_driver(tmp_path, capsys):
    """A build directory laid out like the pair's (tests/trt_pair.py): the engine model runs the host
    driver (the torch engine's model.py, the pair's config), the vanilla twin forwards to it."""
    from pipeline.stages import package
    from tests.tiny_models import make_tiny_hf
    from tests.trt_pair import make_pair_dir

    build_dir = tmp_path / "stages" / "build-abc"
    hf = make_tiny_hf(tmp_path / "hf", "qwen3", dms="borrowed")
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text("{}")
    make_pair_dir(build_dir, hf, max_input_len=77, max_output_len=33, kv_pool_tokens=512,
                  tokenizer_dir=tokenizer)
    out = tmp_path / "stages" / ".package-key.tmp-1"
    out.mkdir(parents=True)
    built = {"backend": "trtllm", "engine_dir": "engine", "tokenizer_dir": "engine/tokenizer",
             "servable_by_tensorrtllm_backend": False,
             "trtllm_engines": {"context": "engine/context", "generation": "engine/generation"}}  # fmt: skip
    ctx = StageContext(card=load_card("tiny-qwen3"), out_dir=out, inputs={"build": build_dir},
                       reports={"build": built})  # fmt: skip
    report = package.run(ctx)
    assert report["built_backend"] == "trtllm" and report["served_engine"] == "trtllm-dms-pair"
    assert report["engine_dir"] == "../../build-abc/engine"
    assert report["max_input_len"] == 77  # the manifest's limits, not the card's
    assert report["max_tokens_in_paged_kv_cache"] == 512 and set(report["models"]) == MODELS
    repo = out / "model_repo"
    configs = validate_repository({str(p.relative_to(repo)): p.read_text() if p.suffix == ".pbtxt" else p
                                   for p in repo.rglob("*") if p.is_file()})  # fmt: skip
    engine = configs["tensorrt_llm"]
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert engine.backend == "python" and params["dms_session"] == "trtllm"
    assert params["eviction_policy"] == "dms"
    assert "eviction" in {t.name for t in engine.input}
    shipped = (repo / "tensorrt_llm" / "1" / "model.py").read_text()  # the torch engine's model.py
    assert shipped == (Path(__file__).parents[1] / "model_repo/tensorrt_llm/1/model.py").read_text()
    twin = configs["tensorrt_llm_vanilla"]
    assert twin.parameters["engine_model"].string_value == "tensorrt_llm"
    assert {t.name for t in configs["ensemble_vanilla"].output} >= {"kv_live_tokens", "kv_compression_ratio"}
    assert "host driver" in capsys.readouterr().out
