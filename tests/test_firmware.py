"""Raw firmware images, loaded the way a PC does and started at the reset vector."""
import subprocess
import sys
from pathlib import Path

import pytest

import kvmsys.guests
from kvmsys import platform
from kvmsys.runner import run_firmware

FW_DIR = Path(kvmsys.guests.__file__).parent / "firmware"    # installed with the package
IMAGE = (FW_DIR / "hello.bin").read_bytes()
EXPECTED = b"kvmsys firmware: hello from the reset vector\n"


def test_firmware_runs_from_reset_vector(abi):
    r = run_firmware(IMAGE, abi=abi, timeout=10)
    assert r.reason == "STOP" and r.status == (0x10 << 1) | 1
    assert r.console == EXPECTED
    # one LSR poll (in) and one THR write (out) per byte, plus the debug-exit write
    assert r.exits == {"IO": 2 * len(EXPECTED) + 1}


def test_firmware_is_mapped_below_4g_and_below_1m():
    from kvmsys import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        platform.load_firmware(vm, IMAGE, ram_size=4 << 20)
        assert vm.read((1 << 32) - len(IMAGE), len(IMAGE)) == IMAGE
        assert vm.read(0x100000 - len(IMAGE), len(IMAGE)) == IMAGE      # <= 128 KiB: low copy too
        big = bytes(range(256)) * 1024                                    # 256 KiB: copied whole
        with kvm.create_vm() as vm2:
            platform.load_firmware(vm2, big, ram_size=4 << 20)
            assert vm2.read((1 << 32) - len(big), len(big)) == big
            assert vm2.read(0xC0000, len(big)) == big
        huge = bytes(range(256)) * 2048                                   # 512 KiB: the top 128 KiB
        with kvm.create_vm() as vm3:
            platform.load_firmware(vm3, huge, ram_size=4 << 20)
            assert vm3.read((1 << 32) - len(huge), len(huge)) == huge
            assert vm3.read(0xE0000, 128 << 10) == huge[-(128 << 10):]
            assert vm3.read(0xC0000, 128 << 10) == bytes(128 << 10)      # RAM below it, zeroed
            vm3.write(0xF0000, b"data")                                   # the low copy is writable RAM
            vm3.write(0xB8000, b"H\x07")                                  # the VGA text page is RAM


@pytest.mark.parametrize("bad", [b"", b"\0" * ((16 << 20) + 1)])
def test_firmware_size_is_validated(bad):
    from kvmsys import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(ValueError):
            platform.load_firmware(vm, bad, ram_size=4 << 20)


def test_cli_runs_firmware(abi, tmp_path):
    path = tmp_path / "fw.bin"
    path.write_bytes(IMAGE)
    p = subprocess.run([sys.executable, "-m", "kvmsys", "run", "--firmware", str(path), "--abi", abi,
                        "--timeout", "10"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)     # not the source tree: import the installed package
    assert p.returncode == 0x21, p.stderr       # the guest's isa-debug-exit status, as QEMU does
    assert EXPECTED.decode() in p.stdout
    assert "exit status 33" in p.stdout
