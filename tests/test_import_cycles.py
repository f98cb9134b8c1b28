"""No import cycle among the package's modules (kernels and the benchmark harness included).

The graph is read from the source files' syntax trees, not by importing them: every `import` and `from …
import` anywhere in a module counts (inside a function too, since a deferred import that closes a cycle
only hides it), resolved to the package's own modules; third-party imports are left out.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_roots() -> dict[str, Path]:
    """Top-level package name → its folder, from pyproject's `package-dir` (the wheel's layout)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    source = Path(config["package-dir"].get("", "."))
    roots = {name: ROOT / folder for name, folder in config["package-dir"].items() if name}
    for name in config["packages"]:
        if name not in roots and "." not in name:
            roots[name] = ROOT / source / name
    return roots


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name → source file, for every .py file under each package folder."""
    modules = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import module` imports the module, `from pkg import name` pkg
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found & known - {name}


def import_graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    modules = module_files(roots)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(package_roots())
    assert {"prodsample.sampling", "prodsample.fused", "prodsample.kernels.compiled"} <= graph.keys()
    assert "prodsample.fused" in graph["prodsample.kernels.product_sample"]  # the graph sees the kernels' imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_fused_contract_is_a_leaf_of_the_core():
    graph = import_graph(package_roots())
    assert graph["prodsample.fused"] <= {"prodsample.mixing", "prodsample.noise"}
    for user in ("prodsample.sampling", "prodsample.dispatch", "prodsample.kernels.compiled",
                 "prodsample.kernels.product_sample"):
        assert "prodsample.fused" in graph[user], user


def test_a_constructed_cycle_is_found(tmp_path):
    """The check can fail: a deferred relative import closing a cycle in a throwaway package is reported."""
    package = tmp_path / "loop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "first.py").write_text("from . import second\n")
    (package / "second.py").write_text("import os\n\ndef late():\n    from .third import value\n")
    (package / "third.py").write_text("from loop.first import second\nvalue = 1\n")
    graph = import_graph({"loop": package})
    assert graph["loop.first"] == {"loop.second"} and graph["loop.third"] == {"loop.first"}
    assert find_cycle(graph) == ["loop.first", "loop.second", "loop.third", "loop.first"]
    (package / "third.py").write_text("value = 1\n")
    assert find_cycle(import_graph({"loop": package})) is None


INTEGRATIONS = ("prodsample.vllm", "prodsample.trl", "prodsample.verl")


def package_of(module: str) -> str | None:
    return next((package for package in INTEGRATIONS if module == package or module.startswith(package + ".")), None)


def test_the_core_is_the_ground_floor():
    """The modules at the top of `prodsample` import no integration package; an integration imports no other
    one above it (verl builds on vllm, nothing builds on verl or trl but their own modules)."""
    graph = import_graph(package_roots())
    floor = [name for name in graph if name.startswith("prodsample") and name.count(".") <= 1
             and package_of(name) is None]
    assert {"prodsample.mixing", "prodsample.hf", "prodsample.settings"} <= set(floor)
    for name in floor:
        assert not {target for target in graph[name] if package_of(target)}, name
    allowed = {"prodsample.vllm": set(), "prodsample.trl": {"prodsample.vllm"}, "prodsample.verl": {"prodsample.vllm"}}
    for name, targets in graph.items():
        if (package := package_of(name)) is not None:
            above = {package_of(target) for target in targets} - {None, package}
            assert above <= allowed[package], (name, above)
