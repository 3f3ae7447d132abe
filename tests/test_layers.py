"""The handler's layers import downward only (docs/architecture.md, "Code layers")."""

from __future__ import annotations

import ast
from pathlib import Path

HANDLER = Path(__file__).resolve().parent.parent / "handler"

# Lowest first; a module may import its own layer and the ones below it.
LAYERS: list[set[str]] = [
    {"errors", "settings", "audio", "tasks", "fair_slots"},
    {"triton", "storage", "moderation"},
    {"engines", "author_lm", "transcription"},
    {"schemas"},
    {"services"},
    {"sessions"},
    {"deps", "routes"},
    {"app", "lambda_function"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def handler_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("handler."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("handler."))
    return found


def test_every_handler_module_has_a_layer() -> None:
    for path in HANDLER.rglob("*.py"):
        parts = path.relative_to(HANDLER.parent).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) == 2:
            continue
        layer_of(".".join(parts))


def test_imports_go_downward_only() -> None:
    upward = []
    for path in HANDLER.rglob("*.py"):
        parts = path.relative_to(HANDLER.parent).with_suffix("").parts
        if len(parts) < 2 or parts[1] == "__init__":
            continue
        module = ".".join(parts)
        for imported in handler_imports(path):
            if layer_of(imported) > layer_of(module):
                upward.append(f"{module} imports {imported}")
    assert upward == []
