"""The folder tree is the architecture: domain packages never import Dagster, and no module
imports a package above its own layer (docs/ARCHITECTURE.md, "Layering")."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "recsae_pipeline"

# Lower numbers sit lower; a module may import its own package or a strictly lower layer
# (packages on one layer are independent of each other). Longest prefix wins.
LAYERS: dict[str, int] = {
    # 0: artifacts on disk and the torch.distributed primitives: every layer needs them.
    "recsae_pipeline.storage": 0,
    "recsae_pipeline.distributed": 0,
    "recsae_pipeline.distributed.ddp": 0,
    # 1-5: the ML stages, each consuming the one before (interp probes SAEs on models).
    "recsae_pipeline.data": 1,
    "recsae_pipeline.models": 2,
    "recsae_pipeline.activations": 3,
    "recsae_pipeline.sae": 4,
    "recsae_pipeline.interp": 5,
    # 6: consumers of the stages: reports, serving, the torchrun ranks' training entry.
    "recsae_pipeline.report": 6,
    "recsae_pipeline.serve": 6,
    "recsae_pipeline.distributed.ranks": 6,
    # 7: the Dagster wiring, which calls every domain package.
    "recsae_pipeline.defs": 7,
    # 8: the command line, which runs the jobs.
    "recsae_pipeline.cli": 8,
}

# Only `defs` and `cli` may import Dagster. The torchrun ranks (distributed.ranks) may import
# `dagster_pipes`: it is the dependency-free protocol package Dagster ships for the external
# side of a Pipes session, and it pulls in no Dagster code.
DAGSTER_ALLOWED = ("recsae_pipeline.defs", "recsae_pipeline.cli")
PIPES_ALLOWED = ("recsae_pipeline.distributed.ranks",)


class Violation(NamedTuple):
    path: str
    line: int
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.imported}: {self.rule}"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer_of(module: str) -> tuple[str, int] | None:
    """The table entry (prefix, layer) that governs `module`: its longest matching prefix."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not matches:
        return None
    prefix = max(matches, key=len)
    return prefix, LAYERS[prefix]


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every import anywhere in the tree: module level, inside functions
    and under `if TYPE_CHECKING:`; `from a import b` yields `a.b` so submodules count."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found += [(node.lineno, source)]
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names]
    return found


def check_source(source: str, path: str, module: str, is_package: bool = False) -> list[Violation]:
    """Every layering or Dagster rule that the module's imports break."""
    own = _layer_of(module)
    violations: list[Violation] = []
    seen: set[tuple[int, str]] = set()
    for line, name in _imported_names(ast.parse(source), module, is_package):
        top = name.split(".")[0]
        if top == "dagster" or top.startswith("dagster_"):
            pipes = top == "dagster_pipes" and module.startswith(PIPES_ALLOWED)
            if not module.startswith(DAGSTER_ALLOWED) and not pipes and (line, top) not in seen:
                seen.add((line, top))
                violations.append(
                    Violation(
                        path,
                        line,
                        top,
                        f"{module} is a domain package and must not import Dagster (only "
                        f"{', '.join(DAGSTER_ALLOWED)}; `dagster_pipes` only in "
                        f"{', '.join(PIPES_ALLOWED)}): move the Dagster part to recsae_pipeline/defs",
                    )
                )
            continue
        target = _layer_of(name)
        if own is None or target is None or target[0] == own[0]:
            continue
        # `from recsae_pipeline.distributed import ddp` also yields the package itself, which
        # is governed by its own entry; only the deepest matching name of a statement counts.
        if (line, target[0]) in seen:
            continue
        if target[1] >= own[1] and not own[0].startswith(target[0] + "."):
            seen.add((line, target[0]))
            relation = "a higher layer" if target[1] > own[1] else "a package on the same layer"
            violations.append(
                Violation(
                    path,
                    line,
                    name,
                    f"{own[0]} (layer {own[1]}) must not import {target[0]} (layer {target[1]}), "
                    f"{relation}; move the shared code down or invert the call",
                )
            )
    return violations


def _violations() -> list[Violation]:
    out: list[Violation] = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = _module_name(path, PACKAGE_DIR)
        rel = str(path.relative_to(PACKAGE_DIR.parent))
        out += check_source(path.read_text(), rel, module, is_package=path.name == "__init__.py")
    return out


def test_every_package_has_a_layer() -> None:
    unplaced = [
        str(p.relative_to(PACKAGE_DIR.parent))
        for p in sorted(PACKAGE_DIR.rglob("*.py"))
        if p.parent != PACKAGE_DIR and _layer_of(_module_name(p, PACKAGE_DIR)) is None
    ]
    assert not unplaced, f"add these modules' package to LAYERS in {__file__}: {unplaced}"


def test_the_architecture_doc_maps_every_module() -> None:
    doc = (PACKAGE_DIR.parent / "docs" / "ARCHITECTURE.md").read_text()
    listed = set(re.findall(r"^\| `(recsae_pipeline/[\w/]+\.py)` \|", doc, re.MULTILINE))
    modules = {
        str(p.relative_to(PACKAGE_DIR.parent))
        for p in PACKAGE_DIR.rglob("*.py")
        if p.name != "__init__.py"
    }
    assert not modules - listed, (
        f"add to the package map of docs/ARCHITECTURE.md: {sorted(modules - listed)}"
    )
    assert not listed - modules, (
        f"gone, remove from docs/ARCHITECTURE.md: {sorted(listed - modules)}"
    )


def test_imports_follow_the_layers() -> None:
    violations = _violations()
    assert not violations, "\n".join(map(str, violations))


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("recsae_pipeline.sae.model", "import dagster as dg\n", "must not import Dagster"),
        (
            "recsae_pipeline.data.ingest",
            "def f():\n    from dagster_pipes import open_dagster_pipes\n",
            "must not import Dagster",
        ),
        (
            "recsae_pipeline.models.training",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from recsae_pipeline.sae.model import TopKSae\n",
            "recsae_pipeline.models (layer 2) must not import recsae_pipeline.sae (layer 4)",
        ),
        (
            "recsae_pipeline.storage.sql",
            "from ..data import catalog\n",
            "must not import recsae_pipeline.data",
        ),
        (
            "recsae_pipeline.serve.recommend",
            "from recsae_pipeline.report import plots\n",
            "a package on the same layer",
        ),
        (
            "recsae_pipeline.distributed.ddp",
            "from recsae_pipeline.distributed import ranks\n",
            "must not import recsae_pipeline.distributed.ranks",
        ),
    ],
)
def test_the_checker_reports_each_rule(module: str, source: str, expected: str) -> None:
    violations = check_source(source, "x.py", module)
    assert len(violations) == 1, violations
    assert expected in str(violations[0])
    assert str(violations[0]).startswith("x.py:")


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("recsae_pipeline.distributed.ranks", "from dagster_pipes import PipesContext\n"),
        ("recsae_pipeline.defs.assets.sae", "import dagster as dg\nfrom ...sae import model\n"),
        ("recsae_pipeline.interp.explain", "from recsae_pipeline.distributed import ddp\n"),
        ("recsae_pipeline.cli", "from recsae_pipeline.defs.definitions import defs\n"),
    ],
)
def test_the_checker_allows_downward_imports(module: str, source: str) -> None:
    assert check_source(source, "x.py", module) == []
