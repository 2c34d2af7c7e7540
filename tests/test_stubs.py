"""The .pyi stubs describe the compiled module: every name they declare exists."""
import ast
from pathlib import Path

import pytest

import kvmsys._core as core

STUB = Path(core.__file__).with_name("_core.pyi")


@pytest.mark.nokvm
def test_every_stubbed_name_exists():
    tree = ast.parse(STUB.read_text())
    missing = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(core, node.name, None)
            if cls is None:
                missing.append(node.name)
                continue
            for item in node.body:
                name = getattr(item, "name", None) or (item.target.id if isinstance(item, ast.AnnAssign) else None)
                if name and not name.startswith("__") and not hasattr(cls, name):
                    missing.append(f"{node.name}.{name}")
        elif isinstance(node, ast.FunctionDef) and not hasattr(core, node.name):
            missing.append(node.name)
        elif isinstance(node, ast.AnnAssign) and not hasattr(core, node.target.id):
            missing.append(node.target.id)
    assert missing == []


@pytest.mark.nokvm
def test_every_public_class_and_function_is_stubbed():
    tree = ast.parse(STUB.read_text())
    stubbed = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    public = {n for n in dir(core) if not n.startswith("_") and getattr(getattr(core, n), "__module__", "")
              == core.__name__ and callable(getattr(core, n))}
    assert public - stubbed == set()
