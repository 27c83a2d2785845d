"""The packages import one way and no module imports itself through others (read from the source with `ast`)."""

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("tokenizer", "model", "serving", "textgen", "tools", "bench")
# Which packages each may import: tokenizer <- model <- {serving, tools} <- textgen; bench measures them all.
ALLOWED = {
    "tokenizer": set(),
    "model": {"tokenizer"},
    "serving": {"model", "tokenizer"},
    "tools": {"model", "tokenizer"},
    "textgen": {"model", "tokenizer", "tools"},
    "bench": {"model", "tokenizer", "serving", "tools"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def test_packages_import_only_downwards():
    graph = _imports(_modules())
    wrong = sorted(
        (a, b) for a, bs in graph.items() for b in bs
        if a.split(".")[0] != b.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]
    )
    assert wrong == []


def test_no_import_cycles():
    graph = _imports(_modules())
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_the_checker_sees_relative_and_absolute_imports():
    graph = _imports(_modules())
    assert "model.gpt2" in graph["model.inference"]  # from .gpt2 import ...
    assert "model.sampler" in graph["serving.engine.model_runner"]  # from model import sampler
    assert "model.checkpoint" in graph["textgen.models"]
