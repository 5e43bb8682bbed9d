"""Dependencies are true: every third-party module the package, its tests and benchmarks import is declared
in pyproject.toml, and an open_clip older than the declared bound is refused in one line."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("weakclip", "tests", "benchmarks")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    """Names of the distributions pyproject.toml declares (core and every extra)."""
    tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    names = {_canonical(re.match(r"[A-Za-z0-9._-]+", spec).group(0)) for spec in specs}
    return names - {"weakclip"}


def imported_modules() -> dict[str, str]:
    """Top-level third-party module -> the first file importing it (absolute imports, at any depth)."""
    local = {p.stem for d in SOURCES for p in (REPO / d).glob("*.py")} | {"weakclip"}
    found: dict[str, str] = {}
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared():
    declared = declared_distributions()
    owners = importlib.metadata.packages_distributions()
    modules = imported_modules()
    assert {"torch", "open_clip", "scipy", "numpy"} <= set(modules)  # the scan sees real imports
    problems = []
    for module, where in sorted(modules.items()):
        dists = {_canonical(d) for d in owners.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported in {where}) is not installed")
        elif not dists & declared:
            problems.append(f"{module} (imported in {where}) comes from {sorted(dists)}, not declared")
    assert not problems, "; ".join(problems)


def test_a_sequence_first_open_clip_is_refused_in_one_line(tiny_clip_cfg):
    """open_clip before 2.26.1 runs its transformers sequence-first: the wrappers would mix the batch."""
    from weakclip.backbones import ClipViT
    from weakclip.clip import PromptTextEncoder, load_clip
    from weakclip.errors import WeakclipError

    model = load_clip(tiny_clip_cfg)
    ClipViT(model.visual)
    model.visual.transformer.batch_first = False
    with pytest.raises(WeakclipError, match="sequence-first.*open_clip_torch>=2.26.1"):
        ClipViT(model.visual)
    model.visual.transformer.batch_first = True
    model.transformer.batch_first = False
    with pytest.raises(WeakclipError, match="sequence-first.*open_clip_torch>=2.26.1"):
        PromptTextEncoder(model, ["background", "cat"])
