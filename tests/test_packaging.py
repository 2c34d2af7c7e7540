"""What a user of pip and of the repository sees: README's test command is CI's, the
licence ships, the build requirements are pinned, the metadata is complete."""
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.nokvm


def _block_after(text, heading):
    """The first ```sh block after *heading* in README.md."""
    rest = text[text.index(heading):]
    return re.search(r"```sh\n(.*?)```", rest, re.S).group(1).strip()


def test_readme_test_command_is_ci():
    readme = (ROOT / "README.md").read_text()
    assert _block_after(readme, "**Run the tests**") == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^pytest -q -rs tests$", ci, re.M), "CI's pytest shows the skip summary"
    packages = re.search(r"for pkg in ([\w\- ]+); do", ci).group(1).split()
    assert set(packages) == {"seabios", "grub-pc-bin", "grub-invaders", "qemu-system-x86", "gdb"}
    for pkg in packages:                     # README names what CI installs
        assert pkg in readme[readme.index("**Run the tests**"):readme.index("## Quick start")], pkg
    for step in ("python -m build", "twine check"):
        assert step in ci, step


def test_license_and_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == "MIT"                        # an SPDX expression, not a table
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "include LICENSE" in (ROOT / "MANIFEST.in").read_text().splitlines()
    assert any(c.startswith("Operating System :: POSIX :: Linux") for c in project["classifiers"])
    assert "Typing :: Typed" in project["classifiers"]
    # every build requirement pinned to the version this project is built with
    for req in meta["build-system"]["requires"]:
        assert re.fullmatch(r"[\w\-]+==[\d.]+", req), req


def test_the_tests_refuse_another_checkouts_code(tmp_path):
    # conftest's check: an editable install of one checkout (or a path entry) serving
    # `import kvmsys` to another checkout's tests is refused by name; an installed package
    # (CI tests the wheel) and this checkout's own are not
    from conftest import other_checkout
    tests = ROOT / "tests"
    other = tmp_path / "other"
    for d in ("kvmsys", "pyx", "benchmarks"):
        (other / d).mkdir(parents=True)
    (other / "setup.py").write_text("")
    assert other_checkout(tests, other / "kvmsys" / "__init__.py") == other.resolve()
    assert other_checkout(tests, other / "benchmarks" / "__init__.py") == other.resolve()
    assert other_checkout(tests, ROOT / "kvmsys" / "__init__.py") is None
    site = tmp_path / "venv" / "lib" / "python3" / "site-packages"
    (site / "kvmsys").mkdir(parents=True)
    assert other_checkout(tests, site / "kvmsys" / "__init__.py") is None
    (tmp_path / "link").symlink_to(ROOT / "kvmsys")      # a path entry pointing back here
    assert other_checkout(tests, tmp_path / "link" / "__init__.py") is None
