"""The command line follows the conventions its users know (pip, QEMU): --version, help
from a bare command, sizes with units, stdout left to the guest under --serial stdio, and
errors that name their cause."""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import kvmsys
import kvmsys.guests
from kvmsys import Kvm, cli
from kvmsys.errors import KvmOSError, KvmPermissionError, access_hint

FW = Path(kvmsys.guests.__file__).parent / "firmware" / "hello.bin"
HELLO = "kvmsys firmware: hello from the reset vector\n"


def kvmsys_cli(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "kvmsys", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir(), **kw)


@pytest.mark.nokvm
def test_version():
    p = kvmsys_cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"kvmsys {kvmsys.__version__}", p


@pytest.mark.nokvm
def test_bare_command_prints_help():
    p = kvmsys_cli()
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: kvmsys") and "run" in p.stdout and "bench" in p.stdout, p.stdout


@pytest.mark.nokvm
def test_bench_help_names_itself_kvmsys_bench():
    p = kvmsys_cli("bench", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: kvmsys bench"), p.stdout[:200]
    p = kvmsys_cli("bench", "--no-such-option")
    assert p.returncode == 2 and "kvmsys bench: error" in p.stderr, p.stderr


@pytest.mark.nokvm
@pytest.mark.parametrize("text,size", [("128", 128 << 20), ("512M", 512 << 20), ("1G", 1 << 30),
                                       ("1g", 1 << 30), ("2048K", 2 << 20), ("1GiB", 1 << 30),
                                       ("64MB", 64 << 20)])
def test_memory_sizes_take_units(text, size):
    assert cli._memory(text) == size


@pytest.mark.nokvm
@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1G", "0", "12X"])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli._memory(text)


def test_cli_memory_with_a_unit_runs_and_too_much_is_refused():
    p = kvmsys_cli("run", "--firmware", str(FW), "--memory", "64M", "--timeout", "10")
    assert p.returncode == 0x21 and HELLO in p.stdout, p.stderr
    p = kvmsys_cli("run", "--firmware", str(FW), "--memory", "4G")
    assert p.returncode == 2 and "3072 MiB" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_serial_stdio_leaves_stdout_to_the_guest():
    p = kvmsys_cli("run", "--firmware", str(FW), "--serial", "stdio", "--timeout", "10", stdin=subprocess.DEVNULL)
    assert p.returncode == 0x21, p.stderr
    assert p.stdout == HELLO                      # the guest's bytes, nothing of kvmsys's
    assert "exit status 33" in p.stderr


def test_permission_hint_names_the_real_fault():
    """A user in /dev/kvm's group while the group lacks write is told that, not to join the group."""
    from conftest import forked
    if os.geteuid() != 0:
        pytest.skip("env: needs root to make a device node and drop to another user")
    d = Path(tempfile.mkdtemp(prefix="kvmsys-perm-"))
    try:
        os.chmod(d, 0o755)
        node = d / "kvm"
        os.mknod(node, 0o640 | 0o020000, os.stat("/dev/kvm").st_rdev)     # crw-r----- root:4242
        os.chown(node, 0, 4242)
        os.chmod(node, 0o640)

        def child():
            os.setgroups([4242])
            os.setgid(4242)
            os.setuid(65534)
            try:
                Kvm(str(node))
            except KvmPermissionError as e:
                return str(e)
            return "opened"
        said = forked(child)
        assert "its group '4242', which this user is in, lacks write" in said, said
        assert "usermod" not in said
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


@pytest.mark.nokvm
def test_access_hint_cases(tmp_path):
    f = tmp_path / "dev"
    f.write_bytes(b"")
    os.chmod(f, 0o660)
    gid = os.stat(f).st_gid
    assert "add it (sudo usermod -aG" in access_hint(f, uid=12345, groups=[gid + 1])
    os.chmod(f, 0o600)
    assert "lacks read and write too" in access_hint(f, uid=12345, groups=[gid + 1])
    assert "its group" in access_hint(f, uid=12345, groups=[gid]) and "lacks read and write" in access_hint(f, uid=12345, groups=[gid])
    if os.geteuid() != 0:
        return
    os.chmod(f, 0o400)
    os.chown(f, 12345, gid)
    assert "its owner (this user) lacks write" in access_hint(f, uid=12345, groups=[])
    os.chmod(f, 0o666)
    assert "allows this user" in access_hint(f, uid=12345, groups=[])


def test_running_a_vm_without_memory_explains_enospc():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.run(timeout=2)
        except KvmOSError as e:
            assert "no memory slot" in str(e), e
        else:
            pytest.skip("host: KVM_RUN of a VM without memory did not fail here")
