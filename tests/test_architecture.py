"""The layer rules of docs/architecture.md, checked on the import graph of the source.

Every ``import`` and ``from ... import`` counts, at module level or inside a function: a
lazy import is still a dependency. Arrows point down only: a sub-package may import
``ox_quant.errors`` and the layers below it, never one above; modules import each other in no
cycle; no library layer imports ``ox_quant.commands``; only the top layers import the model zoo
(``ox_quant_models``); ``core`` and ``algorithms`` import neither onnx nor onnxruntime nor torch; ``ir`` and
``formats`` never import onnxruntime or torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ox_quant"
ZOO = REPO / "models"

#: Bottom to top. A layer may import itself and the layers before it.
LAYERS = ("errors", "core", "algorithms", "ir", "formats", "runtime", "calibration", "pipeline", "export", "verification",
          "evaluation", "study", "commands", "cli")
#: Layers that may import the model zoo.
ZOO_USERS = {"evaluation", "study", "commands", "cli"}
#: Third-party packages a layer must never import.
FORBIDDEN = {
    "core": {"onnxruntime", "onnx", "onnx_ir", "torch", "onnxscript"},
    "algorithms": {"onnxruntime", "onnx", "onnx_ir", "torch", "onnxscript"},
    "ir": {"onnxruntime", "torch"},
    "formats": {"onnxruntime", "torch"},
    "calibration": {"torch"},
}


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute module names ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p, PACKAGE, "ox_quant"): p for p in PACKAGE.rglob("*.py")}
    modules |= {module_name(p, ZOO, "ox_quant_models"): p for p in ZOO.rglob("*.py")}
    return {name: imports_of(path, name) for name, path in modules.items()}


GRAPH = graph()
INTERNAL = set(GRAPH)


def layer_of(module: str) -> str | None:
    """The layer of an ``ox_quant`` module (None for the package root and the zoo)."""
    parts = module.split(".")
    if parts[0] != "ox_quant" or len(parts) == 1:
        return None
    return parts[1]


def internal_targets(module: str) -> set[str]:
    """The project modules ``module`` imports (``from pkg import name`` resolved to a module)."""
    return {t for t in GRAPH[module] if t in INTERNAL}


def test_every_module_is_in_a_known_layer():
    stray = sorted(m for m in GRAPH if m.startswith("ox_quant.") and layer_of(m) not in LAYERS)
    assert not stray, f"modules outside the layers of docs/architecture.md: {stray}"


def test_arrows_point_down():
    wrong = []
    for module in GRAPH:
        source = layer_of(module)
        if source is None:
            continue
        for target in internal_targets(module):
            dest = layer_of(target)
            if dest is not None and LAYERS.index(dest) > LAYERS.index(source):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    colour: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(internal_targets(node)):
            if colour.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in colour:
                visit(nxt)
        stack.pop()
        colour[node] = 2

    for module in sorted(GRAPH):
        if module not in colour:
            visit(module)
    # a package importing its own submodules (``__init__`` re-exports) is not a cycle of work
    real = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:], strict=False))]  # consecutive pairs: one fewer
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_only_top_layers_use_the_zoo_and_commands():
    wrong = []
    for module, targets in GRAPH.items():
        source = layer_of(module)
        if source is None:
            continue
        for target in targets:
            top = target.split(".")[0]
            if top == "ox_quant_models" and source not in ZOO_USERS:
                wrong.append(f"{module} imports the model zoo ({target})")
            if target.startswith("ox_quant.commands") and source not in {"commands", "cli"}:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_zoo_uses_only_the_library():
    wrong = [f"{m} -> {t}" for m, ts in GRAPH.items() if m.startswith("ox_quant_models")
             for t in ts if t.startswith("ox_quant.commands")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_low_layers_stay_light(layer):
    wrong = [f"{m} imports {t}" for m, ts in GRAPH.items() if layer_of(m) == layer
             for t in ts if t.split(".")[0] in FORBIDDEN[layer]]
    assert not wrong, "\n".join(sorted(wrong))


def test_every_package_is_installed():
    """pyproject lists packages explicitly (the zoo's folder and package names differ): none forgotten."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p, PACKAGE, "ox_quant") for p in PACKAGE.rglob("__init__.py")}
    packages |= {module_name(p, ZOO, "ox_quant_models") for p in ZOO.rglob("__init__.py")}
    assert packages == listed


def test_checker_sees_lazy_imports(tmp_path):
    """The graph includes imports inside functions (the rules would be toothless otherwise)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ox_quant.commands import convert\n    import onnxruntime\n")
    assert {"ox_quant.commands", "ox_quant.commands.convert", "onnxruntime"} <= imports_of(source, "ox_quant.core.m")
