"""The project installs under one import root, beside a distribution that owns the top-level name ``evaluate``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "mbu", "data", "train", "evaluate", "search")
OTHER_EVALUATE = """[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "someone-elses-evaluate"
version = "1.0"

[tool.setuptools]
packages = ["evaluate"]
"""


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_installs_beside_another_top_level_evaluate(tmp_path: Path, editable: bool) -> None:
    # A copy of the sources, so the build leaves nothing in the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    other = tmp_path / "other"
    (other / "evaluate").mkdir(parents=True)
    (other / "evaluate" / "__init__.py").write_text('OWNER = "someone else"\n')
    (other / "pyproject.toml").write_text(OTHER_EVALUATE)

    # Dependencies (torch, MLflow, ...) come from this interpreter; only the two projects are installed.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The venv's own older setuptools would hide this interpreter's (which builds wheels without `wheel`).
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools"], check=True)
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet"]
    subprocess.run([*pip, str(other)], check=True, capture_output=True)
    subprocess.run([*pip, *(["--editable"] if editable else []), str(source)], check=True, capture_output=True)

    check = (
        "import evaluate, mbu.evaluate.report, mbu.search.running.runner, mbu.data.images, mbu.train.loop; "
        "assert evaluate.OWNER == 'someone else'; print(mbu.evaluate.report.__file__)"
    )
    imported = subprocess.run([str(python), "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    where = Path(imported.stdout.strip())
    if editable:
        assert where == source / "evaluate" / "report.py"
    else:
        assert where.parent.parent.name == "mbu" and venv in where.parents
    command = subprocess.run([str(venv / "bin" / "mbu"), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert command.returncode == 0 and "search" in command.stdout, command.stderr


def declared_requirements() -> set[str]:
    """Distribution names that setup.cfg's install_requires declares, normalised (lower case, '-')."""
    import configparser
    import re

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines()
    names = [re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0] for line in lines if line.strip()]
    return {name.lower().replace("_", "-") for name in names if name and not name.startswith("#")}


def test_every_library_the_packages_import_is_declared() -> None:
    """A third-party module imported by the product (not tests or benches) belongs to a distribution that
    setup.cfg installs; which distribution owns a module is read from the installed metadata."""
    import ast
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    declared = declared_requirements()
    extras = {"submitit", "psycopg"}  # optional, declared as extras ([slurm], [postgres]) and imported lazily
    undeclared = set()
    for folder in ("mbu", "data", "train", "evaluate", "search"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    roots = [node.module.split(".")[0]]
                else:
                    continue
                for root in roots:
                    if root in sys.stdlib_module_names or root == "mbu" or root in extras:
                        continue
                    distributions = {d.lower().replace("_", "-") for d in owners.get(root, [root])}
                    if not distributions & declared:
                        undeclared.add(f"{root} ({path.relative_to(REPO)}: from {', '.join(sorted(distributions))})")
    assert not undeclared, "imported but not in setup.cfg's install_requires: " + "; ".join(sorted(undeclared))
