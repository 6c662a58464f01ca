"""The house's rules, read off the package's source: who may import what, and room sizes.

- No module imports a ``_private`` name (or a ``_private`` module) from another room. Allowed:
  the compiled kernels (``cnnserve._ext``); a private helper module of the importer's own
  package folder or of a folder above it (``cnnserve/_checks.py`` for every module,
  ``cnnserve/layers/_runtime.py`` for the layers); and, from such a helper module, its names.
  Attribute access such as ``L._check_labels`` on an imported cnnserve module counts too.
- The inference path (decoding, networks, conversion, maps, predictions, the service) never
  imports the training-data package ``cnnserve.data``, directly or through another module.
- The rooms run one way: each has a rank (:data:`RANKS`) and imports only rooms of a lower
  rank, at any depth of its code, so there are no cycles and nothing imports upward.
- No file of the package is over about 700 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cnnserve"
MAX_LINES = 700

# The modules a served request runs through, and what they are built on.
INFERENCE_PATH = (
    "cnnserve.images",
    "cnnserve.specs",
    "cnnserve.network",
    "cnnserve.modelfile",
    "cnnserve.geometry",
    "cnnserve.convert",
    "cnnserve.dense",
    "cnnserve.large",
    "cnnserve.predict",
    "cnnserve.heatmap",
    "cnnserve.detect",
    "cnnserve.boxes",
    "cnnserve.layers",
    "cnnserve.service",
)

# The house from the bottom up: a room may import rooms of a lower rank only. A new module
# belongs to the room of its longest listed prefix; a new room needs a rank here.
RANKS = {
    "cnnserve._ext": 0,
    "cnnserve": 1,  # thread defaults, then the kernels' loader
    "cnnserve._checks": 1,
    "cnnserve._files": 1,
    "cnnserve._buffers": 1,
    "cnnserve.encoding": 1,  # arrays as base64 JSON (dense maps, the service)
    "cnnserve.layers": 2,
    "cnnserve.reference": 2,
    "cnnserve.specs": 3,
    "cnnserve.geometry": 3,
    "cnnserve.images": 3,
    "cnnserve.optim": 3,
    "cnnserve.history": 3,
    "cnnserve.evaluate": 3,
    "cnnserve.heatmap": 3,
    "cnnserve.progress": 3,  # the per-epoch progress display (tqdm on a terminal)
    "cnnserve.stopping": 3,  # early stopping and divergence
    "cnnserve.boxes": 3,  # detection boxes drawn on pictures (Pillow)
    "cnnserve.engine": 3.5,  # compiled inference plans: networks read by duck type, no import
    "cnnserve.network": 4,
    "cnnserve.modelfile": 5,
    "cnnserve.model": 6,  # re-exports of specs, network and modelfile
    "cnnserve.convert": 6,
    "cnnserve.data": 6,
    "cnnserve.checkpoint": 6,
    "cnnserve.solver": 7,
    "cnnserve.predict": 7,
    "cnnserve.onnx": 7,  # ONNX import and export (the onnx package imported lazily)
    "cnnserve.visualise": 7,  # activations and filters: network and convert, drawn
    "cnnserve.detect": 7.5,  # peaks of maps as boxes, non-maximum suppression (dense's)
    "cnnserve.dense": 8,
    "cnnserve.large": 8.5,  # out-of-core maps: sources, zarr sinks, Dask (on dense)
    "cnnserve.service": 9,
    "cnnserve.cli": 10,
    "cnnserve.__main__": 11,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_of(name: str, path: Path) -> str:
    """The package a module belongs to (a package's __init__ belongs to itself)."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def helper_allowed(importer_package: str, module: str) -> bool:
    """May a module of ``importer_package`` use the private module ``module``?"""
    if module == "cnnserve._ext" or module.startswith("cnnserve._ext."):
        return True
    parts = module.split(".")
    private = [i for i, part in enumerate(parts) if is_private(part)]
    if private != [len(parts) - 1]:  # only the last component may be private
        return False
    folder = ".".join(parts[:-1])
    return importer_package == folder or importer_package.startswith(folder + ".")


def imports(tree: ast.AST, name: str, path: Path) -> list[tuple[int, str, list[tuple[str, str]]]]:
    """``(line, module, [(name, bound_as), ...])`` for every import (the list is empty for
    ``import x``, whose binding is handled by the caller)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package_of(name, path).split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [(alias.name, alias.asname or alias.name) for alias in node.names]
            found.append((node.lineno, base, names))
    return found


def private_imports() -> list[str]:
    problems = []
    all_modules = modules()
    for name, path in all_modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = package_of(name, path)
        aliases: dict[str, str] = {}  # local name -> cnnserve module it is bound to
        for line, module, names in imports(tree, name, path):
            if not module.startswith("cnnserve"):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            parts = module.split(".")
            if any(is_private(p) for p in parts) and not helper_allowed(package, module):
                problems.append(f"{where}: imports the private module {module}")
                continue
            module_is_helper = any(is_private(p) for p in parts)
            for imported, bound in names:
                target = f"{module}.{imported}"
                if target in all_modules:  # `from cnnserve import layers`: a module
                    aliases[bound] = target
                    if is_private(imported) and not helper_allowed(package, target):
                        problems.append(f"{where}: imports the private module {target}")
                elif is_private(imported) and not module_is_helper:
                    problems.append(f"{where}: imports the private name {imported} of {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) or isinstance(node, ast.Import):
                for alias in node.names:
                    full = alias.name if isinstance(node, ast.Import) else None
                    if full and full.startswith("cnnserve") and alias.asname:
                        aliases[alias.asname] = full
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and is_private(node.attr)
            ):
                target = aliases[node.value.id]
                if not helper_allowed(package, f"{target}.{node.attr}") and not (
                    target == "cnnserve._ext" or target.startswith("cnnserve._ext.")
                ):
                    problems.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: uses the private "
                        f"name {node.attr} of {target}"
                    )
    return problems


def import_graph() -> dict[str, set[str]]:
    """Every cnnserve module and the cnnserve modules it imports (at any depth of its code)."""
    all_modules = modules()
    graph: dict[str, set[str]] = {}
    for name, path in all_modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for _, module, names in imports(tree, name, path):
            if not module.startswith("cnnserve"):
                continue
            edges.add(module)
            edges.update(f"{module}.{n}" for n, _ in names if f"{module}.{n}" in all_modules)
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        closed = set()
        for target in edges:
            parts = target.split(".")
            closed.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
        graph[name] = {m for m in closed if m in all_modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_imports_another_rooms_private_names():
    assert private_imports() == []


def test_the_rule_catches_what_it_should(tmp_path, monkeypatch):
    """The checker itself, on a small fake package: each kind of breach is found, and only
    those."""
    files = {
        "__init__.py": "",
        "_helper.py": "def check(): ...\n",
        "b.py": "def _secret(): ...\n",
        "a.py": "from cnnserve.b import _secret\nfrom cnnserve._helper import check\n",
        "e.py": "from cnnserve import b as B\nB._secret()\nfrom cnnserve._ext import conv\n",
        "sub/__init__.py": "",
        "sub/_own.py": "def _inner(): ...\n",
        "sub/c.py": "from cnnserve._helper import check\nfrom cnnserve.sub._own import _inner\n",
        "other/__init__.py": "",
        "other/_own.py": "",
        "sub/d.py": "from cnnserve.other._own import x\nimport cnnserve.other._own as O\n",
    }
    root = tmp_path / "cnnserve"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", root)
    found = sorted(p.split(": ", 1)[1] for p in private_imports())
    assert found == [
        "imports the private module cnnserve.other._own",
        "imports the private module cnnserve.other._own",
        "imports the private name _secret of cnnserve.b",
        "uses the private name _secret of cnnserve.b",
    ]


@pytest.mark.parametrize("module", INFERENCE_PATH)
def test_the_inference_path_never_imports_the_training_data(module):
    graph = import_graph()
    names = [m for m in graph if m == module or m.startswith(module + ".")]
    assert names, f"no module {module}"
    for name in names:
        found = {
            m
            for m in reachable(graph, name)
            if m == "cnnserve.data" or m.startswith("cnnserve.data.")
        }
        assert not found, f"{name} imports {sorted(found)}"


def test_serving_an_image_loads_no_training_data_module():
    """The same, at run time: the service's app and a prediction in a fresh interpreter."""
    code = (
        "import sys\n"
        "import cnnserve.service.app, cnnserve.predict, cnnserve.dense\n"
        "print(sorted(m for m in sys.modules if m.startswith('cnnserve.data')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def room_of(module: str) -> str:
    """The room (a key of :data:`RANKS`) a module belongs to: its longest listed prefix."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in RANKS:
            return ".".join(parts[:k])
    raise AssertionError(f"{module} belongs to no room of RANKS: give it a rank")


def upward_imports() -> list[str]:
    """Each import of a room by a room of the same or a lower rank. Importing any module runs
    the package's ``__init__`` first, so ``cnnserve`` itself is never counted as a target."""
    upward = []
    for name, targets in import_graph().items():
        room = room_of(name)
        for target in sorted(targets - {"cnnserve"}):
            other = room_of(target)
            if other != room and RANKS[other] >= RANKS[room]:
                upward.append(f"{name} (rank {RANKS[room]}) imports {target} (rank {RANKS[other]})")
    return upward


def test_the_rooms_import_only_rooms_below_them():
    assert upward_imports() == []


def test_the_rank_rule_catches_an_upward_import(monkeypatch):
    monkeypatch.setitem(RANKS, "cnnserve.network", 2)  # pretend network sat beside layers
    found = upward_imports()
    assert "cnnserve.network (rank 2) imports cnnserve.layers (rank 2)" in found
    assert all(line.startswith("cnnserve.network") for line in found)


def test_no_file_of_the_package_is_over_700_lines():
    sizes = {
        str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}
