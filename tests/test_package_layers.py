"""The packages' layering: each imports only the layers below it, lazy imports included.

``mbu.base`` (``mbu/base/``: exit codes, atomic writes, run-folder names, URL checks) imports none of
them; data imports base; train imports data; evaluate imports train and data; search imports all
of those; ``mbu/`` (the command line on top) is imported by nobody.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package -> the packages it may import (besides itself)
ALLOWED = {
    "base": set(),
    "data": {"base"},
    "train": {"base", "data"},
    "evaluate": {"base", "data", "train"},
    "search": {"base", "data", "train", "evaluate"},
    "mbu": {"base", "data", "train", "evaluate", "search"},
}
FOLDERS = {"base": REPO / "mbu" / "base"}  # the others are top-level folders of their own name


def imported_modules(node: ast.AST, package: str) -> list[str]:
    """The ``mbu...`` modules one import statement names (a relative import stays in its package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            return [f"mbu.{package}"]
        if node.module == "mbu":  # from mbu import cli
            return [f"mbu.{alias.name}" for alias in node.names]
        return [node.module or ""]
    return []


def layer_of(module: str) -> str | None:
    """The package a module of the project belongs to; None for a module outside it."""
    parts = module.split(".")
    if parts[0] != "mbu":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "mbu"


def wrong_way_imports(package: str, source: str, filename: str) -> list[str]:
    """``file:line: from -> to (module)`` for each import in ``source`` that breaks the layering."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):  # every import, at the top or inside a function
        for module in imported_modules(node, package):
            target = layer_of(module)
            if target is not None and target != package and target not in ALLOWED[package]:
                found.append(f"{filename}:{node.lineno}: {package} -> {target} ({module})")
    return found


def test_every_import_of_the_project_follows_the_layers() -> None:
    found = []
    for package in ALLOWED:
        folder = FOLDERS.get(package, REPO / package)
        files = sorted(folder.glob("*.py") if package == "mbu" else folder.rglob("*.py"))  # mbu/base/ is base
        assert files, f"no Python files in {package}/"
        for path in files:
            found += wrong_way_imports(package, path.read_text(), str(path.relative_to(REPO)))
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_a_wrong_way_import_is_named_with_its_file_line_and_arrow() -> None:
    source = (
        "from mbu.data.files import check_writable\n"
        "\n"
        "def later():\n"
        "    from mbu.search.running.runner import run_trials  # lazy, still an arrow\n"
        "    import mbu.cli\n"
        "    from mbu import cli\n"
        "    from . import checkpoint\n"
    )
    assert wrong_way_imports("train", source, "train/x.py") == [
        "train/x.py:4: train -> search (mbu.search.running.runner)",
        "train/x.py:5: train -> mbu (mbu.cli)",
        "train/x.py:6: train -> mbu (mbu.cli)",
    ]
    assert wrong_way_imports("search", source, "search/x.py") == [
        "search/x.py:5: search -> mbu (mbu.cli)",
        "search/x.py:6: search -> mbu (mbu.cli)",
    ]
    assert wrong_way_imports("data", "import mbu.train.loop\n", "data/x.py") == [
        "data/x.py:1: data -> train (mbu.train.loop)"
    ]
    assert wrong_way_imports("base", "from mbu.data.files import check_writable\n", "mbu/base/x.py") == [
        "mbu/base/x.py:1: base -> data (mbu.data.files)"
    ]
    assert wrong_way_imports("data", "from mbu.base.files import atomic_write\n", "data/x.py") == []


def test_each_room_of_search_names_its_concern() -> None:
    """search/ is grouped in sub-packages; each says in its docstring what it holds, and holds modules."""
    rooms = [path.parent for path in (REPO / "search").glob("*/__init__.py")]
    assert len(rooms) >= 4
    for room in rooms:
        docstring = ast.get_docstring(ast.parse((room / "__init__.py").read_text()))
        assert docstring and len(docstring.split()) >= 5, f"{room.name}/__init__.py: say what the room holds"
        assert len(list(room.glob("*.py"))) >= 3, f"search/{room.name}/ holds too little to be a room"
