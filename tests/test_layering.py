"""DESIGN §2: ``pcdms`` is a generic synthesis library and never imports ``reid_aug``."""

from __future__ import annotations

import ast
from pathlib import Path

import pcdms

PCDMS_ROOT = Path(pcdms.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_pcdms_never_imports_reid_aug() -> None:
    files = sorted(PCDMS_ROOT.rglob("*.py"))
    assert len(files) > 5  # the walk found the package
    offenders = {
        str(f.relative_to(PCDMS_ROOT)): sorted(m for m in _imported_modules(f) if m.split(".")[0] == "reid_aug")
        for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}
