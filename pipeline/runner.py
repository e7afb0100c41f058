"""The stage runner: each stage turns earlier stages' output directories into one new directory.

An output directory is keyed by a hash of the stage's settings and of its inputs' contents, written
under a temporary name and renamed when complete, and carries a `manifest.json`. A stage whose key
already has a complete directory is skipped. A failing or interrupted stage leaves nothing behind and
never touches earlier outputs, so the next run resumes where this one stopped. A stage's `gate` is
judged apart: a missed gate stops the build but keeps (and links) the complete measurement.

Layout under build/<model>/:
    stages/<stage>-<key>/     complete outputs (manifest.json inside)
    failed/<stage>/           the *.log files of the last failed attempt at a stage
    <stage> -> stages/...     a link to the output of the stage's current key: this run's, or an earlier
                              run's for a stage this run did not reach (removed when no longer current)
    report.json               those outputs' figures, plus {"stages": {stage: {seconds, cached}}} for the
                              stages this run went through
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from pipeline.card import Card
from pipeline.processes import pid_alive
from pipeline.stages import STAGE_ORDER, load_stage
from pipeline.stages.api import Options, StageContext, fingerprint  # noqa: F401 (tests import them here)

MANIFEST = "manifest.json"
# Temporary directories are named after the process that writes them (host too: build/ may be shared
# between containers), so leftovers of a killed run can be told from those of a run still going.
OWNER = f"{socket.gethostname()}-{os.getpid()}"


class GateFailed(RuntimeError):
    """A stage's measurement missed a limit in the card; the measurement itself is kept and linked."""


class StageFailed(RuntimeError):
    """A stage raised; the message names the stage, what to do, and where its logs were kept."""

    def __init__(self, stage: str, cause: BaseException, logs: Path | None = None):
        self.stage = stage
        self.cause = cause
        self.logs = logs
        kept = f" (its logs are kept in {logs})" if logs else ""
        super().__init__(f"stage '{stage}' failed: {cause}{kept}")


def _tree_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _file_sha256(file: Path) -> bytes:
    with file.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").digest()


def hash_tree(path: Path, digests: dict[str, bytes] | None = None) -> str:
    """Content hash of every file under `path` (names and bytes), manifest excluded. `digests`, when
    given, is filled with each file's own sha256."""
    digest = hashlib.sha256()
    for file in _tree_files(path):
        rel = str(file.relative_to(path))
        file_digest = _file_sha256(file)
        digest.update(rel.encode())
        digest.update(file_digest)
        if digests is not None:
            digests[rel] = file_digest
    return digest.hexdigest()


def file_records(path: Path) -> dict[str, list[Any]]:
    """{relative path: [size, mtime_ns, sha256]} of a finished output, for the manifest."""
    digests: dict[str, bytes] = {}
    hash_tree(path, digests)
    out = {}
    for rel, digest in digests.items():
        info = (path / rel).stat()
        out[rel] = [info.st_size, info.st_mtime_ns, digest.hex()]
    return out


def output_mismatch(out_dir: Path, manifest: dict[str, Any], full: bool = False) -> str | None:
    """Why a cached output no longer is what its manifest says, or None.

    Cheap by default: every file present, none added, sizes equal, and a file whose modification time
    changed hashed again (a copy that did not keep times costs a read, not a rerun). `full` hashes the
    whole tree against the manifest's output_hash, which also catches a change that kept size and time."""
    recorded = manifest.get("files")
    if recorded is None:  # a manifest from before per-file records: names only
        recorded = {rel: None for rel in manifest.get("outputs", [])}
    actual = {str(f.relative_to(out_dir)): f for f in _tree_files(out_dir)}
    missing = sorted(set(recorded) - set(actual))
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    added = sorted(set(actual) - set(recorded))
    if added:
        return f"{added[0]} was added after the stage finished"
    for rel, record in recorded.items():
        if record is None:
            continue
        size, mtime_ns, sha = record
        info = actual[rel].stat()
        if info.st_size != size:
            return f"{rel} is {info.st_size} bytes, the manifest says {size}"
        if info.st_mtime_ns != mtime_ns and _file_sha256(actual[rel]).hex() != sha:
            return f"{rel} was modified after the stage finished (its content hash differs)"
    if full and hash_tree(out_dir) != manifest["output_hash"]:
        return "its content hash differs from the manifest's"
    return None


def stage_key(name: str, version: int, settings: dict[str, Any], input_hashes: dict[str, str]) -> str:
    blob = json.dumps(
        {"stage": name, "version": version, "settings": settings, "inputs": input_hashes},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The output's manifest; None when there is none, or it is not readable JSON (then not trusted)."""
    path = out_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def run_pipeline(
    card: Card,
    build_root: Path,
    until: str | None = None,
    force: tuple[str, ...] = (),
    options: Options | None = None,
    log=print,
    load=load_stage,
    verify: bool = False,
) -> dict[str, Any]:
    """Run the stages in order up to `until`; return the report. `load(name)` gives a stage module.

    A cached output is checked against its manifest first (output_mismatch; `verify`: full hashes) and
    run again, saying why, when it no longer matches."""
    options = options or Options()
    for name in (*force, *([until] if until else [])):
        if name not in STAGE_ORDER:
            raise ValueError(f"unknown stage '{name}': stages are {', '.join(STAGE_ORDER)}")
    planned = STAGE_ORDER[: STAGE_ORDER.index(until) + 1] if until else STAGE_ORDER
    for name in planned:  # a card mistake in a late stage is found before hours of early ones
        check = getattr(load(name), "check_card", None)
        if check is not None:
            check(card)
    model_root = build_root / card.name
    (model_root / "stages").mkdir(parents=True, exist_ok=True)
    _remove_leftovers(model_root / "stages", log)
    outputs: dict[str, Path] = {}
    manifests: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, Any]] = {}

    try:
        for name in STAGE_ORDER:
            stage = load(name)
            if stage is None:
                log(f"[{name}] not part of this build yet; stopping here")
                break
            missing = [d for d in stage.DEPENDS if d not in outputs]
            if missing:
                raise StageFailed(name, RuntimeError(f"needs stages {missing} first"))
            settings, input_hashes, key = _key_of(stage, card, options, manifests)
            out_dir = model_root / "stages" / f"{name}-{key}"
            manifest = read_manifest(out_dir)
            cached = manifest is not None and name not in force
            problem = None
            if cached:
                problem = output_mismatch(out_dir, manifest, full=verify)
            elif out_dir.is_dir() and name not in force:
                problem = f"{MANIFEST} is missing or unreadable"
            if problem:
                log(f"[{name}] {out_dir.relative_to(build_root)} does not match its manifest: {problem}; "
                    "running the stage again")  # fmt: skip
                cached = False
            if cached:
                log(f"[{name}] up to date ({out_dir.relative_to(build_root)})")
            else:
                ctx = StageContext(
                    card=card,
                    out_dir=out_dir,  # replaced by the temporary directory in _run_stage
                    inputs={d: outputs[d] for d in stage.DEPENDS},
                    reports={d: m["report"] for d, m in manifests.items()},
                    options=options,
                    build_root=build_root,
                )
                log(f"[{name}] running")
                manifest = _run_stage(stage, ctx, settings, input_hashes, key)
                log(f"[{name}] done in {manifest['seconds']:.1f} s")
            try:
                manifest, missed = _apply_gate(stage, manifest, card, options, log)
            except Exception as exc:  # a broken or unjudgeable report: say which stage, as for run()
                raise StageFailed(name, exc) from exc
            outputs[name] = out_dir
            manifests[name] = manifest
            timings[name] = {"seconds": manifest["seconds"], "cached": cached}
            _point_link(model_root / name, out_dir)
            if (out_dir / "model_repo").is_dir():  # the product: build/<model>/model_repo
                _point_link(model_root / "model_repo", out_dir / "model_repo")
            write_report(model_root, card, manifests, timings)
            if missed:
                raise StageFailed(name, GateFailed(missed))
            if name == until:
                break
    finally:
        # Links to stages this run did not reach (and the report) must not describe stale outputs.
        current = _keep_current_links(model_root, card, options, manifests, load, log)
        write_report(model_root, card, current, timings)
    return json.loads((model_root / "report.json").read_text())


def prune(model_root: Path) -> dict[Path, int]:
    """Remove stage outputs no link points at (superseded by a changed card or a retrain); returns what
    went and its size in bytes. Linked outputs stay, so the next run finds every stage it uses cached;
    so do the hidden directories (a running stage's temporary one, an interrupted retrofit's resume
    state)."""
    stages = model_root / "stages"
    if not stages.is_dir():
        return {}
    linked = {link.resolve() for link in model_root.iterdir() if link.is_symlink()}
    linked |= {path.parent for path in linked}  # model_repo links into the package output
    removed = {}
    for path in sorted(stages.iterdir()):
        if path.resolve() not in linked and not path.name.startswith("."):
            files = (f for f in path.rglob("*") if f.is_file() and not f.is_symlink())  # not linked weights
            removed[path] = sum(f.stat().st_size for f in files)
            shutil.rmtree(path)
    return removed


def _key_of(stage, card: Card, options: Options, manifests: dict) -> tuple[dict, dict[str, str], str]:
    """(settings, input hashes, key) of `stage` on the outputs described by `manifests`."""
    settings = stage.settings(card, options)
    input_hashes = {d: manifests[d]["output_hash"] for d in stage.DEPENDS}
    return settings, input_hashes, stage_key(stage.NAME, stage.VERSION, settings, input_hashes)


def _keep_current_links(model_root: Path, card: Card, options: Options, manifests, load, log) -> dict:
    """This run's manifests plus those of stages it did not reach whose linked output is exactly what
    the run would have made (same key: same settings, built on these outputs). Other links go: after
    `--until retrofit` retrains, `build/<model>/model_repo` would otherwise still serve the old model."""
    current = dict(manifests)
    for name in STAGE_ORDER:
        link = model_root / name
        if name in current or not link.is_symlink():
            continue
        try:
            kept = _still_current(load(name), read_manifest(link), card, options, current)
        except Exception:  # settings or gate that cannot be worked out now: not provably current
            kept = None
        if kept is not None:
            current[name] = kept
            continue
        link.unlink()
        log(f"[{name}] unlinked its last output: it no longer matches the card and the stages before it")
    repo = model_root / "model_repo"
    if repo.is_symlink() and not any((model_root / n).resolve() == repo.resolve().parent for n in current):
        repo.unlink()
        log("[model_repo] unlinked: the repository no longer matches the card and the stages before it")
    return current


def _still_current(stage, manifest, card: Card, options: Options, current: dict) -> dict | None:
    """The linked output's manifest (gate judged) when its key is what this run would compute, else None."""
    if stage is None or manifest is None or any(d not in current for d in stage.DEPENDS):
        return None
    if manifest["key"] != _key_of(stage, card, options, current)[2]:
        return None
    return _apply_gate(stage, manifest, card, options, log=lambda *_: None)[0]


def _remove_leftovers(stages_dir: Path, log) -> None:
    """Temporary directories of runs on this host that were killed (SIGKILL, power loss) before they
    could clean up. Those of a run still going, or of another host, stay; so does resume state."""
    host = socket.gethostname()
    for path in stages_dir.glob(".*"):
        owner = re.fullmatch(r"\..+\.(?:tmp|old)-(.+)-(\d+)", path.name)
        if owner and owner[1] == host and (int(owner[2]) == os.getpid() or not pid_alive(int(owner[2]))):
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path.name}, left by an interrupted run")


def _apply_gate(stage, manifest: dict, card: Card, options: Options, log) -> tuple[dict, str | None]:
    """The manifest with the stage's verdict on the card's limits in its report (`gate`), and the message
    that stops the build (None: passed, or --no-gate). Judged apart from the measurement, so a changed
    limit or a rerun with --no-gate uses the cached measurement instead of measuring again."""
    judge = getattr(stage, "gate", None)
    if judge is None:
        return manifest, None
    verdict = judge(manifest["report"], card)
    verdict["bypassed"] = not verdict["passed"] and options.no_gate
    if verdict["bypassed"]:
        log(f"[{stage.NAME}] {verdict['message']} (recorded: --no-gate)")
    missed = None if verdict["passed"] or options.no_gate else verdict["message"]
    report = manifest["report"]
    annotate = getattr(stage, "with_verdict", None)  # a stage may mark its own sections passed/failed
    if annotate is not None:
        report = annotate(report, verdict)
    return {**manifest, "report": {**report, "gate": verdict}}, missed


def _run_stage(stage, ctx: StageContext, settings, input_hashes, key: str) -> dict[str, Any]:
    final_dir = ctx.out_dir
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp-{OWNER}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    ctx.out_dir = tmp_dir
    start = time.monotonic()
    try:
        report = stage.run(ctx) or {}
    except BaseException as exc:
        logs = _keep_logs(tmp_dir, final_dir.parent.parent / "failed" / stage.NAME)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            raise
        if os.environ.get("DMS_DEBUG"):
            traceback.print_exc()
        raise StageFailed(stage.NAME, exc, logs) from exc
    seconds = time.monotonic() - start
    manifest = {
        "stage": stage.NAME,
        "key": key,
        "version": stage.VERSION,
        "card": ctx.card.name,
        "settings": settings,
        "inputs": {d: {"dir": str(p), "hash": input_hashes[d]} for d, p in ctx.inputs.items()},
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs": sorted(str(p.relative_to(tmp_dir)) for p in tmp_dir.rglob("*") if p.is_file()),
        "files": file_records(tmp_dir),
        "output_hash": hash_tree(tmp_dir),
        "report": report,
    }
    (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    # Swap in atomically; an older output of the same key (a --force rerun) goes only once the new is whole.
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{OWNER}")
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)
    ctx.out_dir = final_dir
    return manifest


def _keep_logs(tmp_dir: Path, dest: Path) -> Path | None:
    """Copy a failed stage's *.log files (a trtllm-build log, say) to `dest` before its directory goes:
    the log is what explains the failure. None when it wrote none."""
    logs = sorted(tmp_dir.rglob("*.log"))
    if not logs:
        return None
    shutil.rmtree(dest, ignore_errors=True)
    for log in logs:
        target = dest / log.relative_to(tmp_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, target)
    return dest


def _point_link(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.relative_to(link.parent))
    os.replace(tmp, link)


# Report sections named differently from their stage (the issues' report contracts).
REPORT_KEYS = {"evaluate": "eval"}


def write_report(
    model_root: Path, card: Card, manifests: dict[str, dict], timings: dict[str, dict]
) -> None:
    report: dict[str, Any] = {"model": card.name, "card": card.path}
    for name, manifest in manifests.items():
        report[REPORT_KEYS.get(name, name)] = manifest["report"]
    report["stages"] = timings
    tmp = model_root / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, model_root / "report.json")
