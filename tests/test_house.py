"""The house's limits, checked on the source: short functions, training's engine and
runner and the loop's Worker within their sizes, submission without the runner, the
kit naming no service, and the training loop free of the API's messages."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[1] / "services" / "atelier"
#: Declarative builders (a tiny model's whole config), allowed to be long.
LONG_BUILDERS = {("tiny_models/qwen3_vl.py", "build_tiny_qwen3_vl")}


def tree(relative: str) -> ast.Module:
    return ast.parse((SERVICES / relative).read_text())


def imported(relative: str) -> set[str]:
    """Every module the file imports, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(tree(relative)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_function_is_over_80_lines():
    long = []
    for path in sorted(SERVICES.rglob("*.py")):
        relative = path.relative_to(SERVICES).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines(node) > 80 \
                    and (relative, node.name) not in LONG_BUILDERS:
                long.append(f"{relative}:{node.name} ({lines(node)} lines)")
    assert long == []


def test_trainings_rooms_keep_their_sizes():
    for relative in ("training/engine.py", "training/runner.py"):
        assert len((SERVICES / relative).read_text().splitlines()) < 300, relative
    (worker,) = [n for n in tree("training/loop.py").body
                 if isinstance(n, ast.ClassDef) and n.name == "Worker"]
    assert lines(worker) < 250


def test_submission_resolves_bases_without_the_runner():
    assert "atelier.training.runner" not in imported("training/submission.py")
    assert "atelier.training.bases" in imported("training/submission.py")


def test_the_training_loop_speaks_no_proto_and_the_kit_names_no_service():
    assert not any(name.startswith("atelier.v1") for name in imported("training/loop.py"))
    services = ("atelier.training", "atelier.generation", "atelier.analysis",
                "atelier.gateway")
    for path in (SERVICES / "kit").glob("*.py"):
        # Neither imported nor named in a string (an import by name).
        assert not any(name in path.read_text() for name in services), path.name
