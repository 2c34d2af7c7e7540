"""The reference documentation: every public name has a docstring, and Sphinx builds the
docs from them (docs/) without a warning, with every name of kvmsys.__all__ in them."""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvmsys

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.nokvm


def _doc(obj) -> str:
    """*obj*'s docstring without the signature line Cython embeds."""
    lines = (inspect.getdoc(obj) or "").strip().splitlines()
    if lines and re.match(r"^[\w.]+\(.*\)( -> .*)?$", lines[0].strip()):
        lines = lines[1:]
    return "\n".join(lines).strip()


def undocumented():
    """Public names of kvmsys (its __all__, and their public methods, properties and
    attributes) without documentation: a docstring, or for a plain attribute of a
    compiled class a mention in its class's docstring."""
    missing = []
    for name in kvmsys.__all__:
        obj = getattr(kvmsys, name)
        if name.startswith("__"):
            continue
        if not _doc(obj):
            missing.append(name)
        if not inspect.isclass(obj) or issubclass(obj, (int, tuple)):
            continue        # enums and named tuples: their members are documented as a whole
        for attr in dir(obj):
            if attr.startswith("_"):
                continue
            owner = next((k for k in obj.__mro__ if attr in vars(k)), None)
            if owner is None or owner.__module__ == "builtins" or not owner.__module__.startswith("kvmsys"):
                continue
            val = vars(owner)[attr]
            if isinstance(val, (int, str, bool, float, type(None), dict)):
                continue    # class-level constants and defaults
            if inspect.ismemberdescriptor(val) or inspect.isgetsetdescriptor(val) and not _doc(val):
                if not re.search(rf"\b{attr}\b", _doc(owner)) and not _doc(val):
                    missing.append(f"{owner.__name__}.{attr}")
            elif not _doc(val.__func__ if isinstance(val, (staticmethod, classmethod)) else val):
                missing.append(f"{owner.__name__}.{attr}")
    return sorted(set(missing))


def test_every_public_name_is_documented():
    assert undocumented() == []


def test_sphinx_builds_the_docs_without_a_warning(tmp_path):
    pytest.importorskip("sphinx", reason="env: Sphinx is not installed (pip install '.[dev]')")
    p = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-q", "-W", "--keep-going", "-b", "html",
                        str(ROOT / "docs"), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-5000:]
    html = "".join(f.read_text() for f in tmp_path.glob("*.html"))
    ids = set(re.findall(r'id="(kvmsys[\w.]+)"', html))
    for name in kvmsys.__all__:
        if name != "__version__":
            assert any(i.endswith(f".{name}") for i in ids), name
