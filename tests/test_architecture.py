"""The import structure: one import root, layers that import only downward, no circles.

Layers, lowest first (a module may import its own layer and the ones below):

    kernels       sparse_index_jax.kernels    (folder pallas_kernels/)
    selection     sparse_index_jax.selection
    layers        sparse_index_jax.layers
    models        sparse_index_jax.models     (folder models/)
    training      sparse_index_jax.training
    applications  sparse_index_jax.cli, sparse_index_jax.bench (folder bench/)

Every import counts, also those inside functions: a lazy import cannot hide an upward edge or a circle.
"""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
LAYERS = {"sparse_index_jax.kernels": 0, "sparse_index_jax.selection": 1, "sparse_index_jax.layers": 2,
          "sparse_index_jax.models": 3, "sparse_index_jax.training": 4, "sparse_index_jax.cli": 5,
          "sparse_index_jax.bench": 5}
FOLDERS = ("pallas_kernels", "models", "bench")  # the repository's folders; never an import root of their own


def package_dirs() -> dict[str, pathlib.Path]:
    """Package name -> folder, from pyproject.toml's mapping (the one place the installed layout is set)."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in table.items()}


def modules() -> dict[str, pathlib.Path]:
    """Every module of the installed tree: dotted name -> file (each mapped folder is a separate tree)."""
    found: dict[str, pathlib.Path] = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def imports_of(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """Every module ``name`` imports (resolved to a known module or package), anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, name, known) for name, path in found.items()}


def layer_of(module: str) -> int | None:
    matches = [(len(prefix), layer) for prefix, layer in LAYERS.items()
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Upward imports, imports of the root package from inside it, and imports of the folders' own names."""
    found = []
    for source, targets in edges.items():
        for target in targets:
            top = target.split(".")[0]
            if top in FOLDERS:
                found.append(f"{source} imports {target}: the folder {top}/ installs as a sub-package of "
                             f"sparse_index_jax")
            elif target == "sparse_index_jax" and source != "sparse_index_jax":
                found.append(f"{source} imports the root package sparse_index_jax (its public re-exports are for "
                             f"users; inside, import the module that defines the name)")
            elif top == "sparse_index_jax":
                a, b = layer_of(source), layer_of(target)
                if a is None:  # the root package: the public names of the selection and layers layers
                    a = LAYERS["sparse_index_jax.layers"]
                if b is not None and b > a:
                    found.append(f"{source} (layer {a}) imports {target} (layer {b}): upward")
    return sorted(found)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import circles among the package's modules (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_every_module_has_a_layer():
    names = set(graph())
    assert "sparse_index_jax.kernels.dsa_topk.reference" in names and "sparse_index_jax.bench.speed" in names
    assert [n for n in names if n != "sparse_index_jax" and layer_of(n) is None] == []


def test_layers_import_only_downward():
    assert violations(graph()) == []


def test_no_import_circles():
    assert circles(graph()) == []


@pytest.mark.parametrize("edges, expected", [
    ({"sparse_index_jax.kernels.x": {"sparse_index_jax.layers.y"}, "sparse_index_jax.layers.y": set()}, "upward"),
    ({"sparse_index_jax.layers.y": {"models.config"}}, "installs as a sub-package"),
    ({"sparse_index_jax.models.m": {"sparse_index_jax"}}, "root package"),
    ({"sparse_index_jax": {"sparse_index_jax.models.m"}}, "upward"),
])
def test_the_checks_catch_what_they_forbid(edges, expected):
    assert any(expected in v for v in violations(edges))


def test_the_circle_check_catches_a_circle():
    edges = {"sparse_index_jax.layers.a": {"sparse_index_jax.layers.b"},
             "sparse_index_jax.layers.b": {"sparse_index_jax.layers.a"}}
    assert circles(edges) == [["sparse_index_jax.layers.a", "sparse_index_jax.layers.b", "sparse_index_jax.layers.a"]]


def test_the_library_prints_nothing():
    """Below the applications, nothing calls print: progress goes through progress= and log= arguments."""
    found = []
    for name, path in modules().items():
        if (layer_of(name) or 0) >= LAYERS["sparse_index_jax.cli"]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{name}:{node.lineno}")
    assert found == []
