"""Real PC firmware on the kvmsys PC (kvmsys.pc): Debian's SeaBIOS, a GRUB disk built
here with grub-mkimage, and a small boot sector of our own, over both ABIs."""
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvmsys.guests
from kvmsys.runner import run_firmware

SEABIOS = Path("/usr/share/seabios/bios.bin")
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
BOOTSECTOR = (Path(kvmsys.guests.__file__).parent / "firmware" / "bootsector.bin").read_bytes()
ACTION = 0x1B0
NO_BOOT = b"No bootable device."
PROMPT = b"grub rescue>"

need_seabios = pytest.mark.skipif(not SEABIOS.exists(), reason="env: Debian package seabios is not installed")
need_grub = pytest.mark.skipif(not (GRUB_DIR / "boot.img").exists() or not shutil.which("grub-mkimage"),
                               reason="env: Debian package grub-pc-bin is not installed")


def seabios() -> bytes:
    return SEABIOS.read_bytes()


def plain(out: bytes) -> str:
    """Serial output without the terminal control sequences SeaBIOS's serial console
    mixes in (cursor moves, colours) wherever the screen changed."""
    return re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", out.decode(errors="replace"))


@pytest.fixture(scope="module")
def grub_disk(tmp_path_factory):
    """A 1 MiB disk: GRUB's boot.img in the MBR, its core.img from sector 1 on (no file
    system, so GRUB stops at its rescue prompt)."""
    d = tmp_path_factory.mktemp("grub")
    core = d / "core.img"
    subprocess.run(["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-p", "(hd0)/boot/grub", "biosdisk"],
                   check=True)
    disk = bytearray(1 << 20)
    disk[:512] = (GRUB_DIR / "boot.img").read_bytes()
    c = core.read_bytes()
    disk[512:512 + len(c)] = c
    (d / "disk.img").write_bytes(disk)
    return d / "disk.img"


@pytest.mark.nokvm
def test_boot_sector_is_one_sector():
    assert len(BOOTSECTOR) == 512 and BOOTSECTOR[510:] == b"\x55\xaa"


def boot_disk(tmp_path, action: int) -> Path:
    sector = bytearray(BOOTSECTOR)
    sector[ACTION] = action
    path = tmp_path / f"boot{action}.img"
    path.write_bytes(bytes(sector) + bytes((1 << 20) - 512))
    return path


def check_seabios_log(r):
    assert r.reason == "MATCHED", (r.reason, r.debug[-2000:])
    log = r.debug.decode()
    assert "SeaBIOS (version" in log and "Found QEMU fw_cfg" in log
    assert "RamSize: 0x04000000 [cmos]" in log
    assert "init bdf=00:01.1 id=8086:7010" in log           # the IDE function on the i440FX bus
    assert "sercon: using ioport 0x3f8" in log
    assert b"SeaBIOS (version" in r.console                 # the screen, mirrored to the UART
    return log


@need_seabios
def test_seabios_reaches_no_bootable_device_on_two_vcpus(abi):
    """In-kernel irqchip and PIT; SeaBIOS starts the second vCPU with INIT/SIPI."""
    r = run_firmware(seabios(), abi=abi, irqchip=True, vcpus=2, memory_size=64 << 20, timeout=40,
                     until=NO_BOOT)
    log = check_seabios_log(r)
    assert "Found 2 cpu(s) max supported 2 cpu(s)" in log
    assert "Running on KVM" in log                          # CPUID: KVM's leaves are there


@need_seabios
def test_seabios_without_irqchip_uses_the_pit():
    """Also the CPUID hook: without KVM's leaves SeaBIOS neither sees KVM nor uses kvmclock."""
    seen = []

    def no_kvm_leaves(entries, vcpu_id):
        seen.append(vcpu_id)
        return [e for e in entries if not 0x40000000 <= e["function"] < 0x40000100]

    r = run_firmware(seabios(), abi="fd", irqchip=False, memory_size=64 << 20, timeout=40, until=NO_BOOT,
                     cpuid=no_kvm_leaves)
    log = check_seabios_log(r)
    assert "Found 1 cpu(s)" in log and seen == [0]
    assert "Running on KVM" not in log and "kvmclock" not in log


@need_seabios
def test_debug_sink_streams_while_the_firmware_runs(abi):
    """debug_sink gets SeaBIOS's log as it is written, not when the run ends, and all of it."""
    import threading
    chunks, pcs = [], []
    streamed = threading.Event()

    def sink(data):
        pc = pcs[0]
        chunks.append((data, pc.pending is None))           # the run still going?
        if b"Found QEMU fw_cfg" in b"".join(c for c, _ in chunks):
            streamed.set()

    def stop_once_streamed(pc):
        pcs.append(pc)

        def run():
            if streamed.wait(60):
                pc.stop("DONE")
        threading.Thread(target=run, daemon=True).start()

    r = run_firmware(seabios(), abi=abi, irqchip=True, memory_size=32 << 20, timeout=60,
                     on_start=stop_once_streamed, debug_sink=sink)
    assert r.reason == "DONE", (r.reason, r.debug[-500:])
    assert any(live for _, live in chunks)                  # before the stop: streamed
    assert len(chunks) > 1
    assert b"".join(c for c, _ in chunks) == r.debug        # and complete, the end drained too


@need_seabios
def test_cli_debug_log_is_written_while_the_run_goes_on(tmp_path):
    """--debug-log: `tail -f` (or a run killed now) sees SeaBIOS's log while it runs; after
    Ctrl-C the file still holds it, with whatever came after."""
    from conftest import interrupt_cli
    log = tmp_path / "debug.log"
    seen = []

    def log_shows_fw_cfg(proc):
        seen[:] = [log.read_bytes() if log.exists() else b""]
        return b"Found QEMU fw_cfg" in seen[0]

    code, err = interrupt_cli(["run", "--firmware", str(SEABIOS), "--debug-log", str(log), "--timeout", "120",
                               "--memory", "32"], ready=log_shows_fw_cfg, cwd=tmp_path)
    assert code == 130, err                                 # it ran on after the log showed it
    final = log.read_bytes()
    assert final.startswith(seen[0]) and b"SeaBIOS (version" in final


@pytest.mark.nokvm
def test_watcher_finds_a_pattern_across_looks_and_reads_only_new_bytes():
    """The runner's watcher (until=, debug_sink=): a pattern split between two looks is
    found, on the debug console or the serial line; each look asks only for new bytes."""
    from kvmsys.runner import _Watcher

    class Vm:
        def __init__(self):
            self.buf, self.starts = b"", []

        def console(self, start=0):
            self.starts.append(start)
            return self.buf[start:]

    class Pc:
        def __init__(self):
            self.vm, self.uart, self.pending = Vm(), type("Uart", (), {"output": bytearray()})(), None

        def stop(self, why):
            self.pending = why

    for where in ("debug", "serial"):
        pc, got = Pc(), []
        w = _Watcher(pc, b"No bootable", got.append)
        for part in (b"xx No boo", b"table device"):
            if where == "debug":
                pc.vm.buf += part
            else:
                pc.uart.output += part
            w.look()
        assert pc.pending == "MATCHED", where
        assert b"".join(got) == pc.vm.buf
        assert pc.vm.starts == [0, len(pc.vm.buf) - len(b"table device") if where == "debug" else 0]
        w.look(final=True)
        assert b"".join(got) == pc.vm.buf                   # nothing twice


@need_seabios
@need_grub
@pytest.mark.timeout(300)     # its own deadline is 120 s: a boot takes 15-40 s here under load
def test_grub_prompt_answers_a_command_on_the_serial_line(grub_disk, tmp_path):
    """The library: fd ABI (the command line below runs the syscall ABI)."""
    disk = tmp_path / "disk.img"
    shutil.copy(grub_disk, disk)
    t0 = time.monotonic()

    def typist(pc):
        import threading

        def wait_for(n_prompts):
            while plain(bytes(pc.uart.output)).count(PROMPT.decode()) < n_prompts:
                if pc.finished.wait(0.02):
                    return False
            return True

        def run():
            if wait_for(1):
                pc.uart.feed(b"set\r")
                if wait_for(2):                  # the answer, then the prompt again
                    pc.stop("DONE")
        threading.Thread(target=run, daemon=True).start()

    r = run_firmware(seabios(), abi="fd", irqchip=True, memory_size=64 << 20, disk=str(disk), timeout=120,
                     on_start=typist)
    assert r.reason == "DONE", (r.reason, r.console[-500:], time.monotonic() - t0)
    out = plain(r.console)
    assert "GRUB loading." in out and "Welcome to GRUB!" in out
    assert "grub rescue> set\r\n" in out and "prefix=(hd0)/boot/grub\r\n" in out


@need_seabios
@need_grub
@pytest.mark.timeout(300)     # its own deadline is 120 s: a boot takes 15-40 s here under load
def test_cli_boots_grub_and_talks_on_stdio(grub_disk, tmp_path):
    """kvmsys run --firmware bios.bin --disk disk.img --serial stdio, with Ctrl-A x to quit."""
    disk = tmp_path / "disk.img"
    shutil.copy(grub_disk, disk)
    p = subprocess.Popen([sys.executable, "-m", "kvmsys", "run", "--firmware", str(SEABIOS), "--disk",
                          str(disk), "--serial", "stdio", "--abi", "sys"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    out = b""
    deadline = time.monotonic() + 120
    try:
        def wait_for(text):
            nonlocal out
            while text.decode() not in plain(out):
                assert time.monotonic() < deadline, out[-500:]
                if select.select([p.stdout], [], [], 0.5)[0]:
                    chunk = os.read(p.stdout.fileno(), 4096)
                    assert chunk, (out[-500:], p.stderr.read())
                    out += chunk
        wait_for(PROMPT)
        p.stdin.write(b"set\r")
        p.stdin.flush()
        wait_for(b"root=hd0")
        p.stdin.write(b"\x01x")                             # Ctrl-A x: quit
        p.stdin.flush()
        rest, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out += rest
    assert p.returncode == 0, err
    assert "prefix=(hd0)/boot/grub" in plain(out)
    assert b"QUIT" not in out and b"QUIT" in err     # stdout is the guest's, the summary on stderr


@need_seabios
def test_disk_write_reaches_the_image(abi, tmp_path):
    disk = boot_disk(tmp_path, 1)
    r = run_firmware(seabios(), abi=abi, irqchip=True, memory_size=32 << 20, disk=str(disk), timeout=40)
    assert (r.reason, r.status) == ("STOP", 3), r.debug[-500:]
    assert b"kvmsys boot sector: written" in r.debug
    data = disk.read_bytes()
    assert data[512:1024] == data[:512]                     # the sector wrote itself to LBA 1


@need_seabios
def test_readonly_disk_refuses_the_write(tmp_path):
    disk = boot_disk(tmp_path, 1)
    before = disk.read_bytes()
    r = run_firmware(seabios(), abi="sys", irqchip=True, memory_size=32 << 20, disk=str(disk),
                     disk_readonly=True, timeout=40)
    assert (r.reason, r.status) == ("STOP", 5)               # the BIOS reported the error
    assert b"kvmsys boot sector: write failed" in r.debug
    assert disk.read_bytes() == before


@need_seabios
@pytest.mark.parametrize("action,why", [(2, "0xcf9"), (3, "i8042 0xfe"), (4, "port 0x92")])
def test_reset_ends_the_run_with_no_reboot(tmp_path, action, why):
    r = run_firmware(seabios(), abi="fd", irqchip=True, memory_size=32 << 20, disk=str(boot_disk(tmp_path, action)),
                     timeout=40, no_reboot=True)
    assert r.reason == "RESET" and r.resets == 0, r.debug[-500:]
    assert r.debug.count(b"kvmsys boot sector: reset") == 1


@need_seabios
@pytest.mark.timeout(300)     # its own deadline is 120 s: a boot takes 15-40 s here under load
def test_reset_restarts_the_firmware(abi, tmp_path):
    """A reset goes back to the reset vector with the devices at power-on: SeaBIOS boots again."""
    import threading

    def stop_after_a_reset(pc):
        def run():
            while pc.resets < 1 or pc.vm.console().count(b"kvmsys boot sector: reset") < 2:
                if pc.finished.wait(0.02):
                    return
            pc.stop("DONE")
        threading.Thread(target=run, daemon=True).start()

    r = run_firmware(seabios(), abi=abi, irqchip=True, vcpus=2, memory_size=32 << 20,
                     disk=str(boot_disk(tmp_path, 2)), timeout=120, on_start=stop_after_a_reset)
    # (resets and exits say, if it fails, whether the reset was reached and what the vCPUs did)
    assert r.reason == "DONE" and r.resets >= 1, (r.reason, r.resets, r.exits, r.debug[-800:])
    assert r.debug.count(b"SeaBIOS (version") >= 2
    assert r.debug.count(b"Found 2 cpu(s)") >= 2           # the AP was reset and started again


@need_seabios
def test_triple_fault_resets(tmp_path):
    r = run_firmware(seabios(), abi="sys", irqchip=True, memory_size=32 << 20, disk=str(boot_disk(tmp_path, 5)),
                     timeout=40, no_reboot=True)
    if r.reason == "INTERNAL_ERROR":
        pytest.skip("host: KVM's instruction emulator cannot deliver the protected-mode exception "
                    "(PVM runs this mode emulated), so the triple fault never happens")
    assert r.reason == "RESET", r.debug[-500:]


# --- Multiboot ------------------------------------------------------------------
MB_PATH = Path(kvmsys.guests.__file__).parent / "firmware" / "multiboot.bin"
MB_KERNEL = MB_PATH.read_bytes()
INVADERS = Path("/boot/invaders.exec")


def test_multiboot_kernel_gets_its_information(abi):
    from kvmsys.runner import run_kernel
    r = run_kernel(MB_KERNEL, abi=abi, cmdline="console=ttyS0 quiet", memory_size=64 << 20,
                   modules=[(b"first module", "mod1 arg"), (b"x" * 5000, "m2")])
    assert (r.reason, r.status) == ("STOP", (2 << 1) | 1), r.debug
    assert r.debug == (b"multiboot ok\nconsole=ttyS0 quiet\n%08x\nmod1 arg:first module\nm2:" % (63 * 1024)
                       + b"x" * 5000 + b"\n")


@pytest.mark.nokvm
def test_multiboot_loader_places_everything():
    import struct
    from kvmsys.loaders import MultibootError, load_multiboot
    mem = memoryview(bytearray(16 << 20))
    entry, info = load_multiboot(mem, MB_KERNEL, cmdline="c", modules=[(b"abc", "m")])
    flags, lower, upper = struct.unpack_from("<III", mem, info)
    assert entry == 0x100024 and flags & 0x24D == 0x24D and (lower, upper) == (639, 15 * 1024)
    mod_start, mod_end = struct.unpack_from("<II", mem, struct.unpack_from("<I", mem, info + 24)[0])
    assert mod_start % 4096 == 0 and mod_start >= 0x100000 + len(MB_KERNEL) and bytes(mem[mod_start:mod_end]) == b"abc"
    mmap_len, mmap_addr = struct.unpack_from("<II", mem, info + 44)
    entries = [struct.unpack_from("<IQQI", mem, mmap_addr + o) for o in range(0, mmap_len, 24)]
    assert (20, 0x100000, (15 << 20), 1) in entries
    assert bytes(mem[0x100000:0x100000 + len(MB_KERNEL)]) == MB_KERNEL
    with pytest.raises(MultibootError):
        load_multiboot(mem, b"\0" * 9000)                   # no header
    with pytest.raises(MultibootError):
        load_multiboot(memoryview(bytearray(1 << 20)), MB_KERNEL)    # the kernel's 1 MiB is not there
    with pytest.raises(MultibootError):
        load_multiboot(mem, MB_KERNEL, modules=[(bytes(16 << 20), "too big")])


def test_cli_runs_a_multiboot_kernel(tmp_path):
    (tmp_path / "mod").write_bytes(b"module text")
    log = tmp_path / "debug.log"
    p = subprocess.run([sys.executable, "-m", "kvmsys", "run", "--kernel",
                        str(MB_PATH),
                        "--append", "root=/dev/null", "--module", f"{tmp_path / 'mod'},modarg",
                        "--debug-log", str(log), "--abi", "fd"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert p.returncode == 3, p.stderr                       # one module: status (1 << 1) | 1
    assert log.read_bytes().startswith(b"multiboot ok\nroot=/dev/null\n")
    assert b"modarg:module text\n" in log.read_bytes()


@pytest.mark.parametrize("path,says", [("/dev/full", "--debug-log: cannot write /dev/full"),
                                       ("/nonexistent/debug.log", "--debug-log: cannot open /nonexistent/debug.log")])
def test_cli_debug_log_errors_are_one_line(tmp_path, path, says):
    p = subprocess.run([sys.executable, "-m", "kvmsys", "run", "--kernel", str(MB_PATH), "--debug-log", path],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.skipif(not INVADERS.exists(), reason="env: Debian package grub-invaders is not installed")
def test_grub_invaders_draws_its_screen(tmp_path):
    """Debian's grub-invaders, a Multiboot ELF kernel; --screen shows its VGA text page."""
    p = subprocess.run([sys.executable, "-m", "kvmsys", "run", "--kernel", str(INVADERS), "--screen",
                        "--timeout", "3"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "--- screen ---" in p.stdout, p.stderr
    assert p.stdout.count("-*-") >= 40                      # its rows of invaders


# --- Linux boot protocol ----------------------------------------------------------
BZIMAGE = (Path(kvmsys.guests.__file__).parent / "firmware" / "bzimage.bin").read_bytes()


def test_linux_boot_protocol_passes_cmdline_initrd_and_memory_map(abi):
    """The 64-bit entry of our own minimal bzImage reads the zero page the loader built."""
    from kvmsys.runner import run_kernel
    r = run_kernel(BZIMAGE, abi=abi, cmdline="console=ttyS0 root=/dev/ram0", initrd=b"initrd bytes " * 100,
                   memory_size=64 << 20)
    assert (r.reason, r.status) == ("STOP", (4 << 1) | 1), r.debug          # four e820 entries
    assert r.debug == b"linux boot ok\nconsole=ttyS0 root=/dev/ram0\n" + b"initrd bytes " * 100 + b"\n"


@pytest.mark.nokvm
def test_linux_loader_zero_page_and_errors():
    import struct
    from kvmsys.loaders import LinuxBootError, load_linux
    mem = memoryview(bytearray(32 << 20))
    entry, zp = load_linux(mem, BZIMAGE, cmdline="quiet", initrd=b"R" * 5000)
    assert entry == 0x100200
    assert bytes(mem[zp + 0x202:zp + 0x206]) == b"HdrS" and mem[zp + 0x210] == 0xFF    # header, loader type
    image, size = struct.unpack_from("<II", mem, zp + 0x218)
    assert size == 5000 and image % 4096 == 0 and image + size <= 32 << 20 and bytes(mem[image:image + 4]) == b"RRRR"
    cmd = struct.unpack_from("<I", mem, zp + 0x228)[0]
    assert bytes(mem[cmd:cmd + 6]) == b"quiet\0"
    assert bytes(mem[0x100000:0x100000 + len(BZIMAGE) - 0x400]) == BZIMAGE[0x400:]     # protected-mode part
    e820 = [struct.unpack_from("<QQI", mem, zp + 0x2D0 + 20 * i) for i in range(mem[zp + 0x1E8])]
    assert (0x100000, (32 << 20) - 0x100000, 1) in e820
    with pytest.raises(LinuxBootError):
        load_linux(mem, MB_KERNEL)                          # not a bzImage
    with pytest.raises(LinuxBootError):
        load_linux(mem, BZIMAGE, cmdline="x" * 3000)        # longer than its cmdline_size
    old = bytearray(BZIMAGE)
    old[0x236] = 0                                          # no 64-bit entry point
    with pytest.raises(LinuxBootError):
        load_linux(mem, bytes(old))


LINUX = sorted(Path("/boot").glob("vmlinuz*"))


@pytest.mark.skipif(not LINUX, reason="env: no Linux kernel in /boot (vmlinuz*)")
def test_real_linux_kernel_boots():
    """A real bzImage prints on the serial console (earlyprintk from its decompressor on)."""
    from kvmsys import pvm
    from kvmsys.runner import run_kernel
    if pvm.host_flavour() == "PVM":
        pytest.skip("host: on PVM a Linux kernel never leaves its decompressor, which runs in KVM's "
                    "instruction emulator (measured: Debian 6.1, 150 s, no output; QEMU likewise)")
    r = run_kernel(LINUX[-1].read_bytes(), abi="fd", cmdline="earlyprintk=ttyS0 console=ttyS0",
                   memory_size=256 << 20, irqchip=True, timeout=60, until=b"Linux version")
    assert r.reason == "MATCHED", (r.reason, r.console[-500:])


# --- SMBIOS ---------------------------------------------------------------------
def smbios_structures(table: bytes) -> list:
    """[(type, formatted area, strings)] of an SMBIOS structure table."""
    out, i = [], 0
    while i < len(table):
        kind, length = table[i], table[i + 1]
        end = table.index(b"\0\0", i + length)
        strings = [s.decode() for s in table[i + length:end].split(b"\0") if s]
        out.append((kind, table[i:i + length], strings))
        i = end + 2
    return out


@pytest.mark.nokvm
def test_smbios_tables_follow_the_specification():
    from kvmsys import smbios
    anchor, table = smbios.tables(ram_size=40 << 30, cpus=3, cpuid_1=(0x806F8, 0x178BFBFF))
    assert len(anchor) == 0x1F and anchor[:4] == b"_SM_" and anchor[0x10:0x15] == b"_DMI_"
    assert sum(anchor) & 0xFF == 0 and sum(anchor[0x10:]) & 0xFF == 0       # both checksums
    structures = smbios_structures(table)
    assert int.from_bytes(anchor[0x16:0x18], "little") == len(table)
    assert int.from_bytes(anchor[0x1C:0x1E], "little") == len(structures)
    # formatted lengths of SMBIOS 2.8 for each type
    lengths = {1: 0x1B, 3: 0x16, 4: 0x2A, 16: 0x17, 17: 0x28, 19: 0x1F, 32: 0x0B, 127: 4}
    assert [s[0] for s in structures] == [1, 3, 4, 4, 4, 16, 17, 17, 17, 19, 32, 127]
    assert all(len(f) == lengths[k] for k, f, _ in structures)
    handles = [int.from_bytes(f[2:4], "little") for _, f, _ in structures]
    assert len(set(handles)) == len(handles)
    assert max(len(f) + len(b"\0".join(s.encode() for s in st)) + 2 for _, f, st in structures) \
        <= int.from_bytes(anchor[8:10], "little")
    assert structures[0][2][:2] == ["kvmsys", "kvmsys PC"]
    cpus = [s for s in structures if s[0] == 4]
    assert [c[2][0] for c in cpus] == ["CPU 0", "CPU 1", "CPU 2"]
    assert cpus[0][1][8:16] == (0x806F8).to_bytes(4, "little") + (0x178BFBFF).to_bytes(4, "little")
    dimms = [int.from_bytes(f[0xC:0xE], "little") for k, f, _ in structures if k == 17]
    assert dimms == [16384, 16384, 8192]                    # MiB, one device per 16 GiB
    t19 = next(f for k, f, _ in structures if k == 19)
    assert int.from_bytes(t19[8:12], "little") == (40 << 20) - 1  # last KiB, inclusive
    anchor, table = smbios.tables(ram_size=1 << 40, cpus=1024)          # the largest
    assert len(smbios_structures(table)) == 1024 + 64 + 6
    for kw in (dict(cpus=0), dict(cpus=1025), dict(ram_size=0), dict(ram_size=(1 << 40) + 1),
               dict(cpuid_1=(-1, 0)), dict(cpuid_1=(0, 1 << 32))):
        with pytest.raises(kvmsys.InvalidArgumentError):
            smbios.tables(**{"ram_size": 1 << 30, "cpus": 1, **kw})
    for kw in (dict(ram_size="1G"), dict(cpus=1.0), dict(cpus=True), dict(cpuid_1=[0, 0])):
        with pytest.raises(kvmsys.ArgumentTypeError):
            smbios.tables(**{"ram_size": 1 << 30, "cpus": 1, **kw})


@need_seabios
def test_seabios_publishes_the_smbios_tables_of_kvmsys(abi):
    """The guest finds our SMBIOS (SeaBIOS adds only its type 0): what dmidecode reads."""
    import threading
    found = {}

    def read_smbios(pc):
        def run():
            while NO_BOOT not in pc.uart.output:
                if pc.finished.wait(0.02):
                    return
            fseg = pc.vm.read(0xF0000, 0x10000)
            at = next(i for i in range(0, len(fseg), 16) if fseg[i:i + 4] == b"_SM_")
            found["anchor"] = anchor = fseg[at:at + 0x1F]
            addr, length = int.from_bytes(anchor[0x18:0x1C], "little"), int.from_bytes(anchor[0x16:0x18], "little")
            found["table"] = pc.vm.read(addr, length)
            pc.stop("DONE")
        threading.Thread(target=run, daemon=True).start()

    r = run_firmware(seabios(), abi=abi, irqchip=True, vcpus=2, memory_size=64 << 20, timeout=40,
                     on_start=read_smbios)
    assert r.reason == "DONE", (r.reason, r.debug[-800:])
    anchor, structures = found["anchor"], smbios_structures(found["table"])
    assert sum(anchor) & 0xFF == 0 and sum(anchor[0x10:]) & 0xFF == 0
    assert int.from_bytes(anchor[0x1C:0x1E], "little") == len(structures)
    by_type = {}
    for kind, formatted, strings in structures:
        by_type.setdefault(kind, []).append((formatted, strings))
    assert by_type[0][0][1][0] == "SeaBIOS"                 # the firmware's own BIOS information
    assert by_type[1][0][1][:2] == ["kvmsys", "kvmsys PC"]  # ours, not the firmware's "QEMU"
    assert len(by_type[4]) == 2
    assert int.from_bytes(by_type[17][0][0][0xC:0xE], "little") == 64
    assert int.from_bytes(by_type[19][0][0][8:12], "little") == (64 << 10) - 1
