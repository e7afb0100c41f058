"""build stage: the torch engine from the converted checkpoint, backend choice and its errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.card import load_card
from pipeline.runner import Options, StageContext
from pipeline.stages import build
from tests.tiny_models import make_hf

torch.set_num_threads(1)


def _card():
    card = load_card("tiny-qwen3")
    return dataclasses.replace(card, build=dataclasses.replace(card.build, kv_block_size=4, max_batch_size=2))


def _converted(tmp_path: Path, tp: int) -> tuple[Path, dict]:
    from pipeline.convert.export import convert_checkpoint

    hf = make_hf(tmp_path / "hf", "qwen3", "borrowed")
    conv = tmp_path / "convert"
    convert_checkpoint(hf, conv / "trtllm_ckpt", tp_size=tp, dtype="float32", log=lambda *_: None)
    (conv / "tokenizer").mkdir()
    return conv, {"checkpoint_dir": "trtllm_ckpt", "tokenizer_dir": "tokenizer", "tp_size": tp}


@pytest.fixture
def no_trtllm(monkeypatch):
    """This CPU machine, stated explicitly so the test does not depend on what is installed."""
    monkeypatch.setattr(build, "gpu_present", lambda: False)
    monkeypatch.delenv("DMS_TRTLLM_PYTHON", raising=False)


@pytest.mark.parametrize("tp", [1, 2])
def test_torch_engine_from_checkpoint(tmp_path, no_trtllm, tp):
    from pipeline.runtime.engine import Engine
    from pipeline.runtime.engine_dir import load_hf_checkpoint

    conv, report = _converted(tmp_path, tp)
    out = tmp_path / "build"
    out.mkdir()
    ctx = StageContext(card=_card(), out_dir=out, inputs={"convert": conv}, reports={"convert": report},
                       options=Options(backend=None))
    got = build.run(ctx)
    assert got["backend"] == "torch" and got["engine_dir"] == "engine"
    assert "no NVIDIA GPU" in got["backend_reason"]
    meta = json.loads((out / "engine" / "engine.json").read_text())
    assert meta["extra"]["tp_size_merged"] == tp and meta["hf_config"]["dms_window_size"] == 8
    _, state = load_hf_checkpoint(tmp_path / "hf")
    engine = Engine.from_dir(out / "engine")
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_failed_trtllm_build_falls_back_only_in_auto(tmp_path, monkeypatch):
    """A trtllm-build that fails (here: an interpreter that exits 1) keeps its log; auto then builds the
    torch engine, --backend trtllm fails."""
    monkeypatch.setattr(build, "gpu_present", lambda: True)
    monkeypatch.setattr(build, "find_trtllm_env", lambda: (build.TrtllmEnv(python="false"), "test env"))
    conv, report = _converted(tmp_path, 1)
    card = dataclasses.replace(_card(), build=dataclasses.replace(_card().build, dtype="bfloat16"))
    for backend in ("trtllm", None):
        out = tmp_path / f"build-{backend}"
        out.mkdir()
        ctx = StageContext(card=card, out_dir=out, inputs={"convert": conv}, reports={"convert": report},
                           options=Options(backend=backend))
        if backend == "trtllm":
            with pytest.raises(RuntimeError, match="trtllm-build failed"):
                build.run(ctx)
        else:
            got = build.run(ctx)
            assert got["backend"] == "torch" and "trtllm build failed" in got["backend_reason"]
            assert (out / "engine" / "engine.json").is_file()
        assert (out / "build.log").read_text().startswith("$ false ")


def test_dms_trtllm_pair_is_reported_for_its_driver(tmp_path, monkeypatch):
    """trtllm-build cannot run here: a stand-in interpreter writes the driver's manifest of a DMS pair.
    The stage reports the pair (the package stage serves it with the host driver) and builds no torch
    engine beside it any more."""
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\n"
        'while [ "$1" != "--output_dir" ]; do shift; done\n'
        'mkdir -p "$2" && echo \'{"engines": {"context": {}, "generation": {}}}\' > "$2/dms_build.json"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(build, "gpu_present", lambda: True)
    monkeypatch.setattr(build, "find_trtllm_env", lambda: (build.TrtllmEnv(python=str(fake)), "test env"))
    conv, report = _converted(tmp_path, 2)
    card = dataclasses.replace(_card(), build=dataclasses.replace(_card().build, dtype="bfloat16"))
    out = tmp_path / "build"
    out.mkdir()
    ctx = StageContext(card=card, out_dir=out, inputs={"convert": conv}, reports={"convert": report},
                       options=Options(backend="trtllm"))  # fmt: skip
    got = build.run(ctx)
    assert got["backend"] == "trtllm" and not got["servable_by_tensorrtllm_backend"]
    assert got["trtllm_engines"] == {"context": "engine/context", "generation": "engine/generation"}
    assert "serving" not in got and not (out / "torch_engine").exists()
    assert got["tokenizer_dir"] == "engine/tokenizer" and got["build_manifest"] == "engine/dms_build.json"


def test_forced_trtllm_without_gpu_fails_clearly(tmp_path, no_trtllm):
    card = _card()
    with pytest.raises(build.BackendUnavailable, match="no NVIDIA GPU"):
        build.run(StageContext(card=card, out_dir=tmp_path, inputs={}, reports={},
                               options=Options(backend="trtllm")))
    forced_in_card = dataclasses.replace(card, build=dataclasses.replace(card.build, backend="trtllm"))
    assert build.settings(forced_in_card, Options())["backend_resolved"] == "unavailable"


def test_missing_environment_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "gpu_present", lambda: True)
    monkeypatch.setenv("DMS_TRTLLM_PYTHON", str(tmp_path / "no-such-python"))
    backend, reason, env = build.resolve_backend("auto")
    assert backend == "torch" and env is None and "no-such-python cannot run" in reason
    with pytest.raises(build.BackendUnavailable, match="build.dtype is float32"):
        build.resolve_backend("trtllm", "float32")


def test_trtllm_commands_are_argument_lists(tmp_path):
    local = build.TrtllmEnv(python="/opt/trtllm/bin/python").command(["--x", "1"], tmp_path)
    assert local[0] == "/opt/trtllm/bin/python" and local[1].endswith("plugins/trtllm/build_engine.py")
    docker = build.TrtllmEnv(image="img:tag").command(["--x", "1"], tmp_path)
    assert docker[:3] == ["docker", "run", "--rm"] and "img:tag" in docker and docker[-2:] == ["--x", "1"]
    assert f"{tmp_path}:{tmp_path}" in docker


def test_convert_and_build_through_the_runner(tmp_path, no_trtllm):
    """retrofit (a tiny DMS checkpoint) -> convert -> build with the real runner; report keys."""
    import types

    from pipeline.runner import run_pipeline
    from pipeline.stages import convert

    def fake(name, depends, run):
        return types.SimpleNamespace(NAME=name, DEPENDS=depends, VERSION=1,
                                     settings=lambda card, options: {}, run=run)

    def retrofit_run(ctx):
        hf = make_hf(ctx.out_dir / "checkpoints" / "cr8", "qwen3", "adapter")
        (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "bos_token_id": 1}))
        return {"checkpoints": {"8": "checkpoints/cr8"}}

    stages = {
        "prepare": fake("prepare", (), lambda ctx: {}),
        "retrofit": fake("retrofit", ("prepare",), retrofit_run),
        "evaluate": fake("evaluate", ("retrofit",), lambda ctx: {}),
        "convert": convert,
        "build": build,
    }
    card = _card()
    card = dataclasses.replace(card, build=dataclasses.replace(card.build, tp_size=2))
    report = run_pipeline(card, tmp_path, load=stages.get, log=lambda *_: None)
    assert report["convert"]["checkpoint_dir"] == "trtllm_ckpt" and report["convert"]["tp_size"] == 2
    assert report["convert"]["roundtrip_max_abs_diff"] < 1e-4
    assert report["build"]["backend"] == "torch" and report["build"]["engine_dir"] == "engine"
    engine_json = tmp_path / card.name / "build" / "engine" / "engine.json"
    hf_config = json.loads(engine_json.read_text())["hf_config"]
    assert hf_config["dms_separate_alpha"] is True and hf_config["eos_token_id"] == 3


def test_convert_stops_when_the_engine_disagrees_with_the_hf_model(tmp_path, monkeypatch):
    """The round trip is a gate in float32: a difference far above summation noise (what the adapter
    input bug gave: 0.157) stops the stage with a message naming it. The measured difference is
    replaced here; the real comparison is tested in tests/test_convert.py."""
    from pipeline.convert import roundtrip
    from pipeline.stages import convert

    hf = make_hf(tmp_path / "retrofit" / "checkpoints" / "cr8", "qwen3", "adapter")
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "bos_token_id": 1}))
    card = _card()
    card = dataclasses.replace(card, build=dataclasses.replace(card.build, dtype="float32"))
    ctx = StageContext(
        card=card, out_dir=tmp_path / "out", inputs={"retrofit": tmp_path / "retrofit"},
        reports={"retrofit": {"checkpoints": {"8": "checkpoints/cr8"}}},
    )
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(roundtrip, "roundtrip_max_abs_diff", lambda *a, **k: 0.157)
    with pytest.raises(RuntimeError, match=r"disagrees with the HF model \(max \|logit diff\| 0.157"):
        convert.run(ctx)
