"""The stage runner: caching, atomic outputs, resume after failure, --force, --until, the report.

The stages here are small real stage modules (they write files and report figures); the runner under
test is the real one.
"""

import json
import os
import signal
import socket
import types
from pathlib import Path

import pytest

from pipeline.card import load_card
from pipeline.runner import GateFailed, Options, StageFailed, fingerprint, run_pipeline
from pipeline.stages import STAGE_ORDER, load_stage


class Recorder:
    """Builds stage modules that append to `calls` when they run, and can be told to fail."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.value = "v1"
        self.limit = 0.0  # evaluate's gate: passes when its figure (1.0) is at least this

    def module(self, name: str, depends: tuple[str, ...]) -> types.ModuleType:
        mod = types.ModuleType(f"fake_{name}")
        mod.NAME, mod.DEPENDS, mod.VERSION = name, depends, 1

        def settings(card, options):
            return {"value": self.value if name == "prepare" else None}

        def run(ctx):
            self.calls.append(name)
            (ctx.out_dir / "out.txt").write_text(f"{name}:{self.value}")
            if name == "evaluate":  # stands in for package: the runner links build/<model>/model_repo
                (ctx.out_dir / "model_repo").mkdir()
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            for dep in depends:
                assert (ctx.inputs[dep] / "out.txt").is_file()
            return {"wrote": name}

        def gate(report, card):
            passed = 1.0 >= self.limit
            return {"passed": passed, **({} if passed else {"message": f"1.0 is below {self.limit}"})}

        mod.settings, mod.run = settings, run
        if name == "evaluate":
            mod.gate = gate
        return mod

    def loader(self, stages=("prepare", "retrofit", "evaluate")):
        chain = {}
        prev: tuple[str, ...] = ()
        for name in stages:
            chain[name] = self.module(name, prev)
            prev = (name,)
        return lambda name: chain.get(name)


@pytest.fixture
def card():
    return load_card("tiny-qwen3")


def run(card, tmp_path, rec, **kw):
    return run_pipeline(card, tmp_path, load=rec.loader(), log=lambda *_: None, **kw)


def test_second_run_is_cached(card, tmp_path):
    rec = Recorder()
    report = run(card, tmp_path, rec)
    assert rec.calls == ["prepare", "retrofit", "evaluate"]
    assert report["stages"]["retrofit"]["cached"] is False
    report = run(card, tmp_path, rec)
    assert rec.calls == ["prepare", "retrofit", "evaluate"]  # nothing ran again
    assert all(s["cached"] for s in report["stages"].values())
    assert report["retrofit"] == {"wrote": "retrofit"}


def test_outputs_have_manifest_and_link(card, tmp_path):
    rec = Recorder()
    run(card, tmp_path, rec)
    link = tmp_path / card.name / "retrofit"
    manifest = json.loads((link / "manifest.json").read_text())
    assert manifest["stage"] == "retrofit"
    assert manifest["outputs"] == ["out.txt"]
    assert set(manifest["inputs"]) == {"prepare"}
    assert len(manifest["output_hash"]) == 64 and manifest["seconds"] >= 0


def test_failed_stage_keeps_earlier_outputs_and_resumes(card, tmp_path):
    rec = Recorder()
    rec.fail = {"retrofit"}
    with pytest.raises(StageFailed, match="stage 'retrofit' failed: retrofit broke"):
        run(card, tmp_path, rec)
    stages_dir = tmp_path / card.name / "stages"
    # Nothing half-written: only prepare's complete directory exists.
    assert sorted(p.name.split("-")[0] for p in stages_dir.iterdir()) == ["prepare"]
    rec.fail = set()
    run(card, tmp_path, rec)
    assert rec.calls == ["prepare", "retrofit", "retrofit", "evaluate"]  # prepare not rerun


def test_failed_stage_keeps_its_logs(card, tmp_path):
    loader = Recorder().loader()

    def failing_with_a_log(name):
        mod = loader(name)
        if name == "retrofit":

            def run_and_fail(ctx):  # like a trtllm-build that fails: the log explains why
                (ctx.out_dir / "sub").mkdir()
                (ctx.out_dir / "sub" / "train.log").write_text("step 1: loss nan")
                raise RuntimeError("diverged")

            mod.run = run_and_fail
        return mod

    with pytest.raises(StageFailed, match="diverged \\(its logs are kept in .*failed/retrofit\\)") as err:
        run_pipeline(card, tmp_path, load=failing_with_a_log, log=lambda *_: None)
    assert err.value.logs == tmp_path / card.name / "failed" / "retrofit"
    assert (err.value.logs / "sub" / "train.log").read_text() == "step 1: loss nan"


def test_force_reruns_one_stage_and_keeps_downstream_if_output_same(card, tmp_path):
    rec = Recorder()
    run(card, tmp_path, rec)
    report = run(card, tmp_path, rec, force=("retrofit",))
    assert rec.calls[3:] == ["retrofit"]  # same output hash, so evaluate stays cached
    assert report["stages"]["retrofit"]["cached"] is False
    assert report["stages"]["evaluate"]["cached"] is True


def test_changed_settings_rerun_downstream(card, tmp_path):
    rec = Recorder()
    run(card, tmp_path, rec)
    rec.value = "v2"
    run(card, tmp_path, rec)
    assert rec.calls[3:] == ["prepare", "retrofit", "evaluate"]


def test_until_stops_early(card, tmp_path):
    rec = Recorder()
    report = run(card, tmp_path, rec, until="retrofit")
    assert rec.calls == ["prepare", "retrofit"]
    assert "evaluate" not in report["stages"]


def test_until_keeps_later_links_only_while_they_match(card, tmp_path):
    rec = Recorder()
    run(card, tmp_path, rec)
    root = tmp_path / card.name
    assert (root / "model_repo").is_dir()
    report = run(card, tmp_path, rec, until="retrofit")  # same inputs: evaluate's output still matches
    assert (root / "evaluate").is_symlink() and report["eval"]["wrote"] == "evaluate"
    assert (root / "model_repo").is_dir()
    rec.value = "v2"  # retrained: the old evaluate output (and its model_repo) describe the old model
    report = run(card, tmp_path, rec, until="retrofit")
    assert (root / "retrofit" / "out.txt").read_text() == "retrofit:v2"
    assert not (root / "evaluate").exists() and not (root / "model_repo").exists() and "eval" not in report


def test_failed_stage_unlinks_its_stale_output(card, tmp_path):
    rec = Recorder()
    run(card, tmp_path, rec)
    rec.value, rec.fail = "v2", {"evaluate"}
    with pytest.raises(StageFailed):
        run(card, tmp_path, rec)
    root = tmp_path / card.name
    report = json.loads((root / "report.json").read_text())
    assert not (root / "evaluate").exists() and "eval" not in report
    assert (root / "retrofit" / "out.txt").read_text() == "retrofit:v2"


def test_missed_gate_keeps_the_measurement_and_no_gate_reuses_it(card, tmp_path):
    rec = Recorder()
    rec.limit = 2.0
    with pytest.raises(StageFailed, match="1.0 is below 2.0") as err:
        run(card, tmp_path, rec)
    assert isinstance(err.value.cause, GateFailed)
    root = tmp_path / card.name
    assert (root / "evaluate" / "out.txt").is_file()  # kept and linked
    gate = json.loads((root / "report.json").read_text())["eval"]["gate"]
    assert gate == {"passed": False, "message": "1.0 is below 2.0", "bypassed": False}
    report = run(card, tmp_path, rec, options=Options(no_gate=True))
    assert rec.calls == ["prepare", "retrofit", "evaluate"]  # judged again, not measured again
    assert report["eval"]["gate"]["bypassed"] is True and report["stages"]["evaluate"]["cached"] is True
    rec.limit = 0.5  # a looser limit in the card: passes on the same measurement
    assert run(card, tmp_path, rec)["eval"]["gate"] == {"passed": True, "bypassed": False}
    assert rec.calls == ["prepare", "retrofit", "evaluate"]


def test_a_later_stage_whose_settings_fail_now_is_unlinked_not_raised(card, tmp_path):
    rec = Recorder()
    run(card, tmp_path, rec)
    loader = rec.loader()

    def settings_fail(card, options):  # e.g. a file the stage keys on is gone since the last build
        raise OSError("traces are gone")

    def broken_evaluate(name):
        mod = loader(name)
        if name == "evaluate":
            mod.settings = settings_fail
        return mod

    report = run_pipeline(card, tmp_path, until="retrofit", load=broken_evaluate, log=lambda *_: None)
    assert not (tmp_path / card.name / "evaluate").exists() and "eval" not in report


def test_a_gate_that_cannot_judge_is_a_stage_failure(card, tmp_path):
    rec = Recorder()
    loader = rec.loader()

    def unjudgeable(name):
        mod = loader(name)
        if name == "evaluate":
            mod.gate = lambda report, card: report["accuracy"]  # the report has no such figure
        return mod

    with pytest.raises(StageFailed, match="stage 'evaluate' failed: 'accuracy'"):
        run_pipeline(card, tmp_path, load=unjudgeable, log=lambda *_: None)


def test_unknown_stage_name(card, tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'retro'"):
        run(card, tmp_path, Recorder(), until="retro")


def test_report_gathers_figures(card, tmp_path):
    run(card, tmp_path, Recorder(), options=Options())
    report = json.loads((tmp_path / card.name / "report.json").read_text())
    assert report["model"] == "tiny-qwen3"
    assert report["prepare"] == {"wrote": "prepare"}
    assert set(report["stages"]) == {"prepare", "retrofit", "evaluate"}
    assert report["eval"]["wrote"] == "evaluate" and "evaluate" not in report  # the key


def test_every_shipped_stage_has_the_interface():
    for name in STAGE_ORDER:
        stage = load_stage(name)
        if stage is None:
            continue
        assert stage.NAME == name
        assert all(dep in STAGE_ORDER[: STAGE_ORDER.index(name)] for dep in stage.DEPENDS)
        assert isinstance(stage.VERSION, int) and callable(stage.settings) and callable(stage.run)


def test_interrupted_stage_leaves_no_temporary_directory(card, tmp_path):
    rec = Recorder()
    loader = rec.loader()

    def interrupting(name):
        mod = loader(name)
        if mod is not None and name == "retrofit":

            def run_then_interrupt(ctx):
                (ctx.out_dir / "partial.bin").write_bytes(b"x")
                raise KeyboardInterrupt

            mod.run = run_then_interrupt
        return mod

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(card, tmp_path, load=interrupting, log=lambda *_: None)
    leftovers = [p.name for p in Path(tmp_path / card.name / "stages").iterdir()]
    assert all(name.startswith("prepare-") for name in leftovers), leftovers


def test_fingerprint_notices_a_replaced_file_but_not_a_move(tmp_path):
    model = tmp_path / "a"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"x" * 10)
    before = fingerprint(model)
    assert fingerprint(model) == before
    weights.write_bytes(b"y" * 11)  # a re-download of a different size
    assert fingerprint(model) != before
    resized = fingerprint(model)
    info = weights.stat()
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # same size, newer
    assert fingerprint(model) != resized
    assert fingerprint(weights)[0][:2] == ["model.safetensors", 11]
    here = fingerprint(model)
    model.rename(tmp_path / "b")  # moved, times kept: the same input, nothing retrains
    assert fingerprint(tmp_path / "b") == here


def test_leftovers_of_killed_runs_are_removed(card, tmp_path):
    stages = tmp_path / card.name / "stages"
    stages.mkdir(parents=True)
    host = socket.gethostname()
    dead = stages / f".retrofit-abc.tmp-{host}-999999999"  # no such process (above any pid_max)
    alive = stages / f".retrofit-abc.tmp-{host}-{os.getppid()}"  # a run still going
    elsewhere = stages / ".retrofit-abc.tmp-other-host-999999999"  # another container's: not ours to judge
    resume = stages / ".retrofit-abc.resume"  # an interrupted retrofit's state: kept to resume
    for path in (dead, alive, elsewhere, resume):
        path.mkdir()
    run(card, tmp_path, Recorder())
    assert not dead.exists() and alive.exists() and elsewhere.exists() and resume.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_like_ctrl_c(signum):
    from pipeline.signals import stop_on_sigterm

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_prune_removes_only_what_no_link_uses(card, tmp_path):
    from pipeline.runner import prune

    rec = Recorder()
    run(card, tmp_path, rec)
    rec.value = "v2"  # a changed card: every stage gets a new output, the old ones are superseded
    run(card, tmp_path, rec)
    root = tmp_path / card.name
    resume = root / "stages" / ".retrofit-old.resume"  # an interrupted retrofit: never pruned
    resume.mkdir()
    removed = prune(root)
    assert sorted(p.name.split("-")[0] for p in removed) == ["evaluate", "prepare", "retrofit"]
    assert all(size > 0 for size in removed.values())
    assert resume.is_dir() and (root / "model_repo").is_dir()
    assert rec.calls.count("evaluate") == 2
    run(card, tmp_path, rec)  # everything the links name is still there: nothing reruns
    assert rec.calls.count("evaluate") == 2


def _corrupt(path: Path, data: bytes, keep_time: bool = False) -> None:
    info = path.stat()
    path.write_bytes(data)
    if keep_time:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    else:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda f: _corrupt(f, b"retro"), "out.txt is 5 bytes, the manifest says 11"),  # truncated
        (lambda f: _corrupt(f, b"retrofit:NaN"[:11]), "out.txt was modified after the stage finished"),
        (lambda f: f.unlink(), "out.txt is missing"),
        (lambda f: (f.parent / "__pycache__").mkdir() or (f.parent / "__pycache__" / "x.pyc").write_text("b"),
         "__pycache__/x.pyc was added after the stage finished"),  # fmt: skip
        (lambda f: (f.parent / "manifest.json").write_text("{truncated"),
         "manifest.json is missing or unreadable"),  # fmt: skip
    ],
    ids=["truncated", "same-size-edit", "deleted", "added", "bad-manifest"],
)
def test_a_cached_output_that_no_longer_matches_its_manifest_runs_again(card, tmp_path, damage, why):
    """A truncated engine, NaNs written into a checkpoint or serving's __pycache__ were once reported as
    "up to date"; the next run now sees the change, says why, and rebuilds only that stage."""
    rec = Recorder()
    run(card, tmp_path, rec)
    damage(tmp_path / card.name / "retrofit" / "out.txt")
    logs: list[str] = []
    report = run_pipeline(card, tmp_path, load=rec.loader(), log=logs.append)
    assert rec.calls == ["prepare", "retrofit", "evaluate", "retrofit"]  # evaluate's input is whole again
    said = [line for line in logs if line.startswith("[retrofit]") and "does not match its manifest" in line]
    assert len(said) == 1 and why in said[0] and "running the stage again" in said[0]
    assert (tmp_path / card.name / "retrofit" / "out.txt").read_text() == "retrofit:v1"
    assert report["stages"]["evaluate"]["cached"] and not report["stages"]["retrofit"]["cached"]


def test_a_touched_but_unchanged_output_is_still_cached(card, tmp_path):
    rec = Recorder()
    run(card, tmp_path, rec)
    out = tmp_path / card.name / "retrofit" / "out.txt"
    _corrupt(out, out.read_bytes())  # a copy that did not keep times: same bytes, new mtime
    run(card, tmp_path, rec)
    assert rec.calls == ["prepare", "retrofit", "evaluate"]


def test_verify_hashes_what_the_cheap_check_cannot_see(card, tmp_path):
    rec = Recorder()
    run(card, tmp_path, rec)
    out = tmp_path / card.name / "retrofit" / "out.txt"
    _corrupt(out, b"retrofit:v2", keep_time=True)  # same size, same mtime, other bytes
    run(card, tmp_path, rec)
    assert rec.calls == ["prepare", "retrofit", "evaluate"]  # sizes and times cannot tell
    logs: list[str] = []
    run_pipeline(card, tmp_path, load=rec.loader(), log=logs.append, verify=True)
    assert rec.calls[-1] == "retrofit" and out.read_text() == "retrofit:v1"
    assert any("its content hash differs from the manifest's" in line for line in logs)
