"""The build stages, in order. Each module defines:

    NAME: str                      the stage's name (its key in report.json)
    DEPENDS: tuple[str, ...]       stages whose output directories it reads (ctx.inputs[name])
    VERSION: int                   bump when the stage's output format or method changes
    settings(card, options) -> dict  the card parts and options its output depends on (the cache key)
    run(ctx: StageContext) -> dict   writes into ctx.out_dir; returns the figures for report.json
and optionally:
    check_card(card) -> None         raises CardError; run for every planned stage before the first one
    gate(report, card) -> dict       {passed, message if not, ...}: the card's limits judged on the (cached
                                     or fresh) measurement; the runner records it as report["gate"] and
                                     stops the build on a miss unless --no-gate (limits stay out of settings)
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_ORDER = ("prepare", "retrofit", "evaluate", "convert", "build", "package", "perf")


def load_stage(name: str) -> ModuleType | None:
    """The stage's module, or None while that stage is not part of the build yet."""
    try:
        return importlib.import_module(f"pipeline.stages.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"pipeline.stages.{name}":
            return None
        raise
