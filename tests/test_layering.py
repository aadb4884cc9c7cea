"""The package's layers import only downwards, and nothing imports in a cycle.

Read from the source (every import statement, lazy ones inside functions
included), so a new import that breaks the architecture fails here before
anyone runs it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_frag_otel"
ROOT = "vllm_frag_otel"

# layer -> the layers it may import (besides itself); top-level modules are layers of their own
ALLOWED = {
    "core": set(),
    "config": set(),
    "jsonlines": set(),
    "export": {"core", "config", "__init__"},
    "plugin": {"core", "export", "config"},
    "sim": {"core", "jsonlines"},
    "analysis": {"core", "export", "sim", "jsonlines"},
    "cli": {"__init__", "config", "jsonlines", "core", "export", "plugin", "sim", "analysis"},
    "__init__": {"core", "config", "plugin"},
}
# third-party roots a layer must not import (vLLM is imported only where vLLM runs or is driven)
FORBIDDEN = {
    "core": {"vllm", "opentelemetry", "matplotlib", "tqdm"},
    "export": {"vllm", "matplotlib", "tqdm"},
    "plugin": {"matplotlib", "tqdm"},
    "sim": {"opentelemetry", "matplotlib"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute, at any depth of the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.add(target)
            # `from package import module`: the module is what is imported
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _third_party(path: Path) -> set[str]:
    return {m.split(".")[0] for m in _imports(path)} - {ROOT}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_the_layers_below_it(path):
    module = _module_name(path)
    layer = _layer(module)
    assert layer in ALLOWED, f"{module}: layer {layer!r} is not in the architecture (tests/test_layering.py)"
    graph = _graph()
    wrong = {m for m in graph[module] if _layer(m) != layer and _layer(m) not in ALLOWED[layer]
             and m != ROOT + ".__init__"}
    # `from vllm_frag_otel import x` names the package itself; only its submodules count
    wrong.discard(ROOT)
    assert not wrong, f"{module} ({layer}) imports {sorted(wrong)}; {layer} may import only {sorted(ALLOWED[layer])}"
    banned = _third_party(path) & FORBIDDEN.get(layer, set())
    assert not banned, f"{module} ({layer}) imports {sorted(banned)}"


def test_no_import_cycle():
    graph = _graph()
    graph = {m: deps - {ROOT} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_broken_layering(tmp_path, monkeypatch):
    """The checker itself: an import from core into export, and a cycle, are found."""
    fake = tmp_path / ROOT
    (fake / "core").mkdir(parents=True)
    (fake / "export").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "export" / "__init__.py").write_text("")
    (fake / "core" / "state.py").write_text("def f():\n    from vllm_frag_otel.export import telemetry\n")
    (fake / "export" / "telemetry.py").write_text("from vllm_frag_otel.core.state import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"core\.state \(core\) imports \[.*'vllm_frag_otel\.export\.telemetry'\]"):
        test_each_module_imports_only_the_layers_below_it(fake / "core" / "state.py")
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()
