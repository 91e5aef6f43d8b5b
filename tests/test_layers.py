"""The package reads top to bottom: every import inside `exporter` points to its own layer or a
lower one, so no module depends on one above it and the import graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"
# Top to bottom. A module belongs to the first layer one of whose prefixes it matches.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("integrations", ("exporter.integrations",)),  # runs in the user's LLM stack: imports nothing below
    ("command line", ("exporter.cli",)),
    ("sources", ("exporter.sources",)),
    ("web", ("exporter.web",)),
    ("engine", ("exporter.engine",)),
    ("settings", ("exporter.config",)),          # composes the detectors' settings models
    ("collectors", ("exporter.collectors",)),
    ("anomaly", ("exporter.anomaly",)),
    ("detectors", ("exporter.detectors",)),
    ("storage", ("exporter.storage",)),
    ("ingest", ("exporter.ingest",)),
    ("primitives", ("exporter.codes", "exporter.sketch", "exporter.evidence", "exporter.durations", "exporter.floats",
                    "exporter.components", "exporter.sharding", "exporter.client", "exporter.zones", "exporter")),
)


def layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The exporter modules `path` imports (relative imports resolved; `from . import x` as x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("exporter"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("exporter"):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).exists()
                    or (PACKAGE.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists()]
            found.update(subs or [target])
    return found


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer(module_name(path))


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        for target in sorted(imports(path)):
            if layer(target) < layer(src):
                upward.append(f"{src} ({LAYERS[layer(src)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_check_sees_imports() -> None:
    """The parser finds what it must: relative, nested and `from . import` imports."""
    assert "exporter.engine" in imports(PACKAGE / "web" / "app.py")
    assert "exporter.sources.demo" in imports(PACKAGE / "cli.py")                 # inside a function
    assert "exporter.sketch" in imports(PACKAGE / "storage" / "buckets.py")      # from .. import sketch
    assert layer("exporter.web.routes.ingest") < layer("exporter.engine") < layer("exporter.ingest.records")
