"""What a stage module imports to be a stage: the run's options, its context, and the helpers stages
share (pipeline/stages/__init__.py lists the interface; pipeline/runner.py runs the stages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.card import Card


@dataclass(frozen=True)
class Options:
    """Run-wide choices from the command line that some stages read (and key on)."""

    from_scratch: bool = False
    no_gate: bool = False
    backend: str | None = None  # overrides card.build.backend when given


@dataclass
class StageContext:
    card: Card
    out_dir: Path  # write here (a temporary directory; renamed when the stage returns)
    inputs: dict[str, Path]  # completed output directories of the stages this one depends on
    reports: dict[str, dict[str, Any]]  # figures that earlier stages reported
    options: Options = field(default_factory=Options)
    build_root: Path = Path("build")



def fingerprint(path: Path) -> list[list[Any]]:
    """Cheap identity of files the user keeps outside build/ (weights, traces): each file's name, size
    and modification time, as make and rsync judge files. Hashing tens of GB on every run would cost
    minutes; a changed file changes its size or time. Not the location: a moved directory (or a copy
    that keeps times, `cp -p`) is the same input and retrains nothing."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    rows = []
    for file in files:
        info = file.stat()
        name = file.relative_to(path).as_posix() if file != path else file.name
        rows.append([name, info.st_size, info.st_mtime_ns])
    return rows


def cr_label(cr: float) -> str:
    """2.0 -> "2", 2.5 -> "2.5" (docs/CONTRACTS.md)."""
    return f"{float(cr):g}"
