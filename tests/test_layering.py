"""The import graph and the engine's boundary, checked on the source (no import runs).

- pipeline/ has no import cycle (imports inside functions count: a lazy import is still a dependency);
- nothing outside pipeline/runtime reaches into an engine's scheduler, model runner or step lock:
  evaluation, conversion and serving use Engine's public API (submit, score, generate, pool_stats).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE_INTERNALS = {"scheduler", "runner", "_step_lock"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "pipeline") -> dict[str, set[str]]:
    files = {_module_name(f): f for f in sorted((ROOT / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, file in files.items():
        here = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pipeline_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_nothing_outside_the_runtime_touches_engine_internals():
    files = [f for d in ("pipeline", "model_repo", "plugins", "ci") for f in sorted((ROOT / d).rglob("*.py"))]
    runtime = ROOT / "pipeline" / "runtime"
    bad = []
    for file in files:
        if runtime in file.parents:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNALS:
                bad.append(f"{file.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not bad, bad


def test_stages_import_the_stage_api_not_the_orchestrator():
    graph = import_graph()
    stages = (m for m in graph if m.startswith("pipeline.stages."))
    bad = sorted(m for m in stages if "pipeline.runner" in graph[m])
    assert not bad, f"{bad} import pipeline.runner; stages import pipeline.stages.api"


def test_dms_core_imports_nothing_of_the_project():
    """The rule is a leaf: pipeline, plugins and the TensorRT side import it, it imports none of them."""
    graph = import_graph("dms_core")
    for file in sorted((ROOT / "dms_core").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & {"pipeline", "plugins"}, (file.name, names)
    assert cycles(graph) == []
