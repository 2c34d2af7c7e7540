"""Type checkers see the API as it is: the stubs match the compiled core (stubtest),
the whole package and README's examples pass mypy --strict, `from kvmsys import X` is an explicit export, and
the keyword names the stubs and docs use work at run time."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvmsys
from kvmsys import errors

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def _mypy(*args, cwd):
    """mypy (the dev extra) on *args*, finding kvmsys where this test imports it from."""
    pytest.importorskip("mypy", reason="env: mypy is not installed (pip install '.[dev]')")
    pkg_parent = Path(kvmsys.__file__).resolve().parent.parent
    env = dict(os.environ)
    if "site-packages" not in str(pkg_parent):     # an in-place build: point mypy at it
        env["MYPYPATH"] = str(pkg_parent)
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull, *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def readme_examples():
    """README's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.nokvm
def test_stubtest_is_clean(tmp_path):
    pytest.importorskip("mypy", reason="env: mypy is not installed (pip install '.[dev]')")
    pkg_parent = Path(kvmsys.__file__).resolve().parent.parent
    env = dict(os.environ)
    if "site-packages" not in str(pkg_parent):
        env["MYPYPATH"] = str(pkg_parent)
    p = subprocess.run([sys.executable, "-m", "mypy.stubtest", "kvmsys._core", "kvmsys.enums",
                        "--allowlist", str(HERE / "stubtest-allowlist.txt")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    # cwd: not site-packages, whose other top-level modules mypy would take for ours
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]


@pytest.mark.nokvm
def test_the_whole_package_passes_mypy_strict():
    # The package's source (this checkout's kvmsys/, with the core's stubs), every module:
    # annotations that type checkers and readers can trust, kept so.
    pytest.importorskip("mypy", reason="env: mypy is not installed (pip install '.[dev]')")
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    p = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", os.devnull,
                        "-p", "kvmsys"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]


@pytest.mark.nokvm
def test_readme_examples_pass_mypy_strict(tmp_path):
    examples = readme_examples()
    assert len(examples) >= 2
    for i, code in enumerate(examples):
        (tmp_path / f"readme_example_{i}.py").write_text(code)
    (tmp_path / "types_of_the_api.py").write_text(
        "import kvmsys\n"
        "from kvmsys import Kvm\n"
        "reveal_type(kvmsys.add_vcpu())\n"
        "reveal_type(kvmsys.run())\n"
        "with Kvm() as kvm, kvm.create_vm() as vm:\n"
        "    reveal_type(kvm)\n"
        "    reveal_type(vm)\n"
        "    reveal_type(vm.create_vcpu(0))\n")
    p = _mypy("--strict", "--follow-imports=silent", *sorted(f.name for f in tmp_path.glob("*.py")), cwd=tmp_path)
    errors_ = [l for l in p.stdout.splitlines() if ": error:" in l]
    assert errors_ == [], p.stdout
    revealed = re.findall(r'Revealed type is "([^"]+)"', p.stdout)
    assert revealed == ["memoryview[int]", "kvmsys._core.Exit", "kvmsys.fd.Kvm", "kvmsys.fd.Vm",
                        "kvmsys.fd.Vcpu"], p.stdout


@pytest.mark.nokvm
def test_all_is_a_literal_list_of_what_the_package_exports():
    tree = ast.parse(Path(kvmsys.__file__).read_text())
    [node] = [n for n in tree.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    assert isinstance(node.value, ast.List) and all(isinstance(e, ast.Constant) for e in node.value.elts)
    names = [e.value for e in node.value.elts]
    assert len(names) == len(set(names))
    assert set(errors.__all__) <= set(names)
    for name in names:
        assert hasattr(kvmsys, name), name


def test_keyword_names_of_the_stubs_work(fdvm):
    """The names the stubs (and so the docs) give the parameters are the run-time ones."""
    vm = fdvm
    vm.add_memory(slot=1, guest_phys_addr=1 << 30, size=1 << 16)
    vm.write(gpa=1 << 30, data=b"abcd")
    assert vm.read(gpa=1 << 30, length=4) == b"abcd"
    vm.set_memory_flags(slot=1, log_dirty=True)
    vm.remove_memory(slot=1)
    from kvmsys import Kind, Space
    index = vm.add_handler(space=Space.PIO, start=0x80, end=0x81, kind=Kind.IGNORE)
    vm.remove_handler(index=index)
