"""Intra-package imports sit at module top, where import-linter (``lint-imports``, run by CI) and a
reader see them. An import inside a function needs its reason on its line or the line above (a
cycle, or a heavy optional dependency such as faiss/fastapi/pyarrow loaded only when used).

``clipforge/cli`` is exempt: each command imports its capability when it runs, so ``clipforge
--help`` and every command do not import all of training, eval, search and curation first."""

from __future__ import annotations

import ast
from pathlib import Path

import clipforge

ROOT = Path(clipforge.__file__).parent


def _nested_intra_package_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, ast.ImportFrom) and (child.level or (child.module or "").startswith("clipforge")):
                found.append((child.lineno, f"from {'.' * child.level}{child.module or ''} import ..."))
            elif in_function and isinstance(child, ast.Import) and any(a.name.startswith("clipforge") for a in child.names):
                found.append((child.lineno, f"import {child.names[0].name}"))
            visit(child, nested)

    visit(tree, False)
    return found


def test_function_level_imports_state_their_reason():
    unexplained = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "cli":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, text in _nested_intra_package_imports(path):
            here, above = lines[lineno - 1], lines[lineno - 2].strip() if lineno > 1 else ""
            if "#" not in here and not above.startswith("#"):
                unexplained.append(f"clipforge/{rel}:{lineno}: {text}")
    assert not unexplained, ("imports inside functions without a stated reason (move them to the module top, "
                             "or say why on the line):\n" + "\n".join(unexplained))
