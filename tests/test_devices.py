"""The PC devices of kvmsys.devices, driven port by port (no VM needed)."""
import struct

import pytest
from conftest import FakeVm

from kvmsys.devices import AtaDisk, Cmos, FwCfg, I8042, Irq, PciHost, Pit, Port92, Uart8250

pytestmark = pytest.mark.nokvm


class FakeExit:
    """What a device's io() reads of an IoExit."""

    def __init__(self, port, size, is_in, data):
        self.port, self.size, self.is_in = port, size, is_in
        self.data = memoryview(bytearray(data))
        self.count = len(data) // size


class Memory:
    def __init__(self, size):
        self.mem = bytearray(size)

    def read(self, gpa, n):
        from kvmsys.errors import InvalidArgumentError
        if gpa + n > len(self.mem):
            raise InvalidArgumentError("outside")
        return bytes(self.mem[gpa:gpa + n])

    def write(self, gpa, data):
        self.read(gpa, len(data))           # bounds check
        self.mem[gpa:gpa + len(data)] = data


# --- CMOS ---------------------------------------------------------------------
def cmos_read(c, reg):
    c.write(0x70, 1, reg)
    return c.read(0x71, 1)


def test_cmos_clock_is_bcd_and_updating_only_at_the_end_of_a_second():
    c = Cmos(128 << 20)
    c.time = lambda: 1767225599.0          # 2025-12-31 23:59:59 UTC
    assert cmos_read(c, 0x0A) & 0x80 == 0   # update-in-progress clear: firmware waits for it
    assert [cmos_read(c, r) for r in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32)] == \
        [0x59, 0x59, 0x23, 0x31, 0x12, 0x25, 0x20]
    assert cmos_read(c, 0x0D) == 0x80
    c.time = lambda: 1767225599.9999        # within the MC146818's 244 us before the update
    assert cmos_read(c, 0x0A) & 0x80 == 0x80


def test_cmos_memory_registers_and_nmi_mask():
    c = Cmos(128 << 20, cpus=4)
    assert cmos_read(c, 0x15) | cmos_read(c, 0x16) << 8 == 640
    assert cmos_read(c, 0x30) | cmos_read(c, 0x31) << 8 == 0xFFFF              # KiB above 1 MiB, capped
    assert Cmos(32 << 20).ram[0x30:0x32] == ((31 << 20) // 1024).to_bytes(2, "little")
    assert cmos_read(c, 0x34) | cmos_read(c, 0x35) << 8 == (112 << 20) // 65536
    assert cmos_read(c, 0x5F) == 3
    c.write(0x70, 1, 0x80 | 0x0F)           # NMI masked, shutdown status register
    assert c.nmi_masked and c.index == 0x0F
    c.write(0x71, 1, 0x0A)
    assert cmos_read(c, 0x0F) == 0x0A
    c.write(0x70, 1, 0x0A)
    c.write(0x71, 1, 0xA6)                  # UIP cannot be set by software
    c.time = lambda: 1000.5                 # mid-second: no update in progress
    assert cmos_read(c, 0x0A) == 0x26


# --- PIT ----------------------------------------------------------------------
def test_pit_channel2_one_shot_sets_out_after_the_count():
    p = Pit()
    now = [0]
    p.clock = lambda: now[0]
    p.write(0x61, 1, 0x01)                  # gate 2 on, speaker off
    p.write(0x43, 1, 0xB0)                  # channel 2, lo/hi, mode 0
    p.write(0x42, 1, 1193 & 0xFF)
    p.write(0x42, 1, 1193 >> 8)             # ~1 ms
    assert p.read(0x61, 1) & 0x20 == 0
    now[0] = 500_000                        # 0.5 ms: half way
    p.write(0x43, 1, 0x80)                  # latch channel 2
    v = p.read(0x42, 1) | p.read(0x42, 1) << 8
    assert 590 <= v <= 600
    now[0] = 1_000_100
    assert p.read(0x61, 1) & 0x20


def test_pit_periodic_counter_wraps_to_reload():
    p = Pit()
    now = [0]
    p.clock = lambda: now[0]
    p.write(0x43, 1, 0x34)                  # channel 0, lo/hi, mode 2
    p.write(0x40, 1, 0)
    p.write(0x40, 1, 0x10)                  # reload 0x1000
    now[0] = 3 * 0x1000 * 1_000_000_000 // 1193182 + 1000
    v = p.read(0x40, 1) | p.read(0x40, 1) << 8
    assert 0 < v <= 0x1000


# --- fw_cfg -------------------------------------------------------------------
def fw_item(f, key, n):
    f.write(0x510, 2, key)
    ex = FakeExit(0x511, 1, True, bytes(n))
    f.io(ex)
    return bytes(ex.data)


def test_fw_cfg_signature_id_ram_and_file_directory():
    f = FwCfg(Memory(4096), ram_size=64 << 20, cpus=2, files={"etc/sercon-port": b"\xf8\x03"})
    assert fw_item(f, 0x00, 4) == b"QEMU"
    assert struct.unpack("<I", fw_item(f, 0x01, 4))[0] == 3        # traditional + DMA
    assert struct.unpack("<Q", fw_item(f, 0x03, 8))[0] == 64 << 20
    assert struct.unpack("<H", fw_item(f, 0x05, 2))[0] == 2
    assert struct.unpack("<H", fw_item(f, 0x10, 2))[0] == 0        # no boot menu
    count = struct.unpack(">I", fw_item(f, 0x19, 4))[0]
    raw = fw_item(f, 0x19, 4 + 64 * count)[4:]
    files = {}
    for i in range(count):
        size, sel, _, name = struct.unpack(">IHH56s", raw[64 * i:64 * i + 64])
        files[name.rstrip(b"\0").decode()] = (size, sel)
    size, sel = files["etc/sercon-port"]
    assert fw_item(f, sel, size) == b"\xf8\x03"
    assert "etc/show-boot-menu" in files


def test_fw_cfg_dma_read_and_error():
    mem = Memory(8192)
    f = FwCfg(mem, ram_size=64 << 20)
    mem.write(0x1000, struct.pack(">IIQ", (0x0000 << 16) | 0x08 | 0x02, 4, 0x1800))  # select 0 + read 4
    f.write(0x514, 4, 0)
    f.write(0x518, 4, int.from_bytes((0x1000).to_bytes(4, "big"), "little"))        # big-endian address
    assert mem.read(0x1800, 4) == b"QEMU"
    assert mem.read(0x1000, 4) == bytes(4)                  # control cleared: done, no error
    mem.write(0x1000, struct.pack(">IIQ", 0x02, 16, 0x10000))                        # target outside
    f.write(0x518, 4, int.from_bytes((0x1000).to_bytes(4, "big"), "little"))
    assert struct.unpack(">I", mem.read(0x1000, 4))[0] & 1                           # error bit
    assert f.read(0x514, 4) == int.from_bytes(b"QEMU", "big")                        # DMA signature


# --- PCI ----------------------------------------------------------------------
def pci_read(p, dev, fn, reg, size=4):
    p.write(0xCF8, 4, 0x80000000 | dev << 11 | fn << 8 | (reg & 0xFC))
    return p.read(0xCFC + (reg & 3), size)


def test_pci_i440fx_bus_and_write_mask():
    p = PciHost()
    assert pci_read(p, 0, 0, 0) == 0x12378086
    assert pci_read(p, 1, 0, 0x0C) >> 16 & 0xFF == 0x80     # multi-function
    assert pci_read(p, 1, 1, 0x08) >> 8 == 0x010180         # IDE, legacy ports
    assert pci_read(p, 2, 0, 0) == 0xFFFFFFFF               # nothing else
    p.write(0xCF8, 4, 0x80000000 | 1 << 11 | 1 << 8 | 0x10)
    p.write(0xCFC, 4, 0xFFFFFFFF)                           # BAR sizing: no BARs
    assert pci_read(p, 1, 1, 0x10) == 0
    p.write(0xCF8, 4, 0x80000000 | 0x40)
    p.write(0xCFE, 2, 0x8000)                               # device-specific registers are kept
    assert pci_read(p, 0, 0, 0x42, 2) == 0x8000
    p.write(0xCF8, 4, 0x80000000)
    p.write(0xCFC, 2, 0xBEEF)                               # vendor id is read-only
    assert pci_read(p, 0, 0, 0, 2) == 0x8086


def test_reset_ports_request_a_reset():
    why = []
    p, k, s = PciHost(), I8042(), Port92()
    for d in (p, k, s):
        d.request_reset = lambda w: why.append(w) or True
    assert not p.write(0xCF9, 1, 0x02)
    assert p.write(0xCF9, 1, 0x06)
    assert k.write(0x64, 1, 0xFE)
    assert not s.write(0x92, 1, 0x02)
    assert s.write(0x92, 1, 0x03)
    assert why == ["0xcf9", "i8042 0xfe", "port 0x92"]


def test_i8042_self_test_and_keyboard_reset():
    k = I8042()
    k.write(0x64, 1, 0xAA)
    assert k.read(0x64, 1) & 1 and k.read(0x60, 1) == 0x55
    k.write(0x60, 1, 0xFF)
    assert [k.read(0x60, 1), k.read(0x60, 1)] == [0xFA, 0xAA]
    assert k.read(0x64, 1) & 1 == 0
    k.write(0x64, 1, 0x60)
    k.write(0x60, 1, 0x61)
    k.write(0x64, 1, 0x20)
    assert k.read(0x60, 1) == 0x61


# --- UART ---------------------------------------------------------------------
def test_uart_is_detected_and_receives():
    vm = FakeVm()
    u = Uart8250(irq=Irq(vm, 4))
    u.write(0x3F9, 1, 0x02)                 # SeaBIOS's probe: IER reads back,
    assert u.read(0x3F9, 1) == 0x02
    assert u.read(0x3FA, 1) & 0x3F == 0x02  # IIR says "transmitter empty"
    u.write(0x3F9, 1, 0x01)                 # receive interrupts, OUT2 on
    u.write(0x3FC, 1, 0x08)
    assert u.read(0x3FD, 1) & 1 == 0
    u.feed(b"ok")
    assert vm.lines[-1] == (4, 1)
    assert u.read(0x3FA, 1) & 0x0F == 0x04
    assert u.read(0x3FD, 1) & 1 and u.read(0x3F8, 1) == ord("o") and u.read(0x3F8, 1) == ord("k")
    assert u.read(0x3FD, 1) & 1 == 0 and vm.lines[-1] == (4, 0)
    got = []
    u.sink = got.append
    u.write(0x3F8, 1, ord("A"))
    assert got == [b"A"] and u.output.endswith(b"A")
    u.write(0x3FB, 1, 0x80)                 # DLAB: the divisor, not THR
    u.write(0x3F8, 1, 1)
    assert u.read(0x3F8, 1) == 1 and got == [b"A"]


# --- ATA ----------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([i]) * 512 for i in range(64)))
    return path


def ata_command(d, cmd, lba=0, count=1):
    d.write(0x1F6, 1, 0xE0 | (lba >> 24 & 0x0F))
    d.write(0x1F2, 1, count)
    d.write(0x1F3, 1, lba & 0xFF)
    d.write(0x1F4, 1, lba >> 8 & 0xFF)
    d.write(0x1F5, 1, lba >> 16 & 0xFF)
    d.write(0x1F7, 1, cmd)


def ata_in(d, n):
    ex = FakeExit(0x1F0, 2, True, bytes(n))
    d.io(ex)
    return bytes(ex.data)


def test_ata_identify_and_read(image):
    d = AtaDisk(str(image))
    assert (d.read(0x1F2, 1), d.read(0x1F3, 1), d.read(0x1F4, 1), d.read(0x1F5, 1)) == (1, 1, 0, 0)
    ata_command(d, 0xEC)
    assert d.read(0x1F7, 1) & 0x08
    ident = ata_in(d, 512)
    words = struct.unpack("<256H", ident)
    assert words[60] | words[61] << 16 == 64 and words[83] & 0x0400
    assert ident[54:60] == b"vksmsy"        # "kvmsys" with the bytes of each word swapped
    assert d.read(0x1F7, 1) & 0x08 == 0
    ata_command(d, 0x20, lba=5, count=2)
    assert ata_in(d, 1024) == bytes([5]) * 512 + bytes([6]) * 512
    d.write(0x1F6, 1, 0xF0)                 # the slave: not there
    assert d.read(0x1F7, 1) == 0
    d.close()


def test_ata_write_reaches_the_file_and_readonly_refuses(image):
    d = AtaDisk(str(image))
    ata_command(d, 0x30, lba=3, count=1)
    d.io(FakeExit(0x1F0, 2, False, b"\xab" * 512))
    assert d.read(0x1F7, 1) & 0x09 == 0     # no DRQ, no error
    d.close()
    assert image.read_bytes()[3 * 512:4 * 512] == b"\xab" * 512
    r = AtaDisk(str(image), readonly=True)
    ata_command(r, 0x30, lba=3, count=1)
    assert r.read(0x1F7, 1) & 0x01 and r.read(0x1F1, 1) == 0x04      # ERR, ABRT
    ata_command(r, 0x20, lba=64, count=1)                            # past the end
    assert r.read(0x1F7, 1) & 0x01
    r.close()


def test_ata_lba48_read(image):
    d = AtaDisk(str(image))
    d.write(0x1F6, 1, 0x40)
    for reg, hi, lo in ((0x1F2, 0, 1), (0x1F3, 0, 9), (0x1F4, 0, 0), (0x1F5, 0, 0)):
        d.write(reg, 1, hi)
        d.write(reg, 1, lo)
    d.write(0x1F7, 1, 0x24)
    assert ata_in(d, 512) == bytes([9]) * 512
    d.close()


def test_ata_rejects_a_tiny_image(tmp_path):
    (tmp_path / "t.img").write_bytes(b"x" * 100)
    with pytest.raises(ValueError):
        AtaDisk(str(tmp_path / "t.img"))
    with pytest.raises(ValueError, match="No such file"):
        AtaDisk(str(tmp_path / "missing.img"))


# --- the host side: terminal keys and the screen ---------------------------------
def test_ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_ctrl_a():
    from kvmsys.terminal import Stdio

    class Pc:
        stopped = None

        def stop(self, why):
            self.stopped = why
    t, pc = Stdio(), Pc()
    assert t.keys(b"ls\r\x01\x01", pc) == b"ls\r\x01" and pc.stopped is None
    assert t.keys(b"a\x01", pc) == b"a"                     # the escape waits for its next key
    assert t.keys(b"xb", pc) == b"" and pc.stopped == "QUIT"


def test_screen_text_of_the_vga_page():
    from kvmsys.terminal import Screen
    page = bytearray(b" \x07" * 80 * 25)
    page[0:4] = b"H\x07i\x07"
    page[2 * 80 * 3:2 * 80 * 3 + 2] = b"!\x1f"
    assert Screen.text(bytes(page)) == "Hi\n\n\n!"


# --- the guest is untrusted: bounded state, device errors, one access at a time ------
def peak_allocation(fn) -> int:
    """Bytes Python allocated at the peak of fn() beyond what it held before."""
    import tracemalloc
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def fw_dma(f, mem, control, length, target, desc=0x1000):
    mem.write(desc, struct.pack(">IIQ", control, length, target))
    f.write(0x514, 4, 0)
    f.write(0x518, 4, int.from_bytes(desc.to_bytes(4, "big"), "little"))
    return struct.unpack(">I", mem.read(desc, 4))[0]


@pytest.mark.parametrize("target", [0x2000, 1 << 40])
def test_fw_cfg_dma_length_is_never_allocated_on_the_host(target):
    """A DMA's length is the guest's (32 bits): the host moves it in bounded pieces into
    guest memory and stops at the first piece outside it."""
    mem = Memory(1 << 20)
    f = FwCfg(mem, ram_size=1 << 20)
    status = []
    peak = peak_allocation(lambda: status.append(fw_dma(f, mem, 0x08 | 0x02, 1 << 28, target)))
    assert status == [1]                                    # DMA_ERROR: it ran off the RAM
    assert peak < 1 << 20, peak
    if target < len(mem.mem):
        assert mem.mem[target:target + 4] == b"QEMU" and not any(mem.mem[target + 4:])
    assert fw_dma(f, mem, 0x08 | 0x02, 4, 0x3000) == 0 and mem.read(0x3000, 4) == b"QEMU"   # it goes on


def test_fw_cfg_dma_reads_a_file_across_pieces():
    data = bytes(range(256)) * 600 + b"end"                # more than two pieces
    mem = Memory(1 << 20)
    f = FwCfg(mem, ram_size=1 << 20, files={"big": data})
    sel = 0x20 + sorted(f.files).index("big")              # the file directory's order
    assert fw_dma(f, mem, sel << 16 | 0x08 | 0x02, len(data) + 10, 0x10000) == 0
    assert mem.read(0x10000, len(data) + 10) == data + bytes(10)


def test_i8042_output_buffer_holds_what_the_hardware_holds():
    from kvmsys.devices.i8042 import OUT_MAX
    k = I8042()
    for _ in range(100_000):
        k.write(0x60, 1, 0xEE)                  # echo: one reply byte each
    assert len(k.out) == OUT_MAX == 16
    assert [k.read(0x60, 1) for _ in range(OUT_MAX)] == [0xEE] * OUT_MAX
    assert k.read(0x64, 1) & 1 == 0             # empty: OBF clear
    k.write(0x60, 1, 0xEE)
    assert k.read(0x60, 1) == 0xEE              # it goes on


@pytest.mark.parametrize("fifo,holds", [(True, 16), (False, 1)])
def test_uart_loopback_is_bounded_by_the_fifo_and_overruns(fifo, holds):
    u = Uart8250()
    u.write(0x3FA, 1, 0x01 if fifo else 0x00)   # FCR: FIFO on / off
    u.write(0x3FC, 1, 0x10)                     # MCR: loopback
    for i in range(100_000):
        u.write(0x3F8, 1, i & 0xFF)
    assert len(u.rx) == holds
    lsr = u.read(0x3FD, 1)
    assert lsr & 0x03 == 0x03                   # data ready, overrun
    assert u.read(0x3FD, 1) & 0x02 == 0         # reading LSR cleared OE
    assert [u.read(0x3F8, 1) for _ in range(holds)] == list(range(holds))   # the first ones stay
    assert u.read(0x3FD, 1) & 1 == 0


def test_uart_host_input_is_bounded():
    from kvmsys.devices.uart import RX_HOST_MAX
    u = Uart8250()
    for _ in range(10):
        u.feed(bytes(RX_HOST_MAX // 4 + 1))
    assert len(u.rx) == RX_HOST_MAX and u.read(0x3FD, 1) & 0x03 == 0x03


def ata_lba48(d, cmd, lba, count):
    d.write(0x1F6, 1, 0x40)
    for reg, value in ((0x1F2, count), (0x1F3, lba), (0x1F4, lba >> 8), (0x1F5, lba >> 16)):
        d.write(reg, 1, value >> (8 if reg == 0x1F2 else 24) & 0xFF)
        d.write(reg, 1, value & 0xFF)
    d.write(0x1F7, 1, cmd)


def test_ata_transfers_are_buffered_in_bounded_pieces(tmp_path):
    """A command's count is the guest's (up to 65536 sectors, 32 MiB): the host holds a
    bounded piece of it at a time, reading and writing, and a transfer word by word is
    linear (each `out` appends, never rebuilds the buffer)."""
    path = tmp_path / "big.img"
    with open(path, "wb") as fh:
        fh.truncate(32 << 20)
    d = AtaDisk(str(path))
    pattern = bytes(range(256)) * 16                        # 4 KiB per `rep outsw`

    def write_all():
        ata_lba48(d, 0x34, 0, 0)                            # count 0: 65536 sectors
        for _ in range((32 << 20) // len(pattern)):
            d.io(FakeExit(0x1F0, 2, False, pattern))
    assert peak_allocation(write_all) < 1 << 20
    assert d.read(0x1F7, 1) & 0x09 == 0                     # done: no DRQ, no ERR
    got = []

    def read_all():
        ata_lba48(d, 0x24, 0, 0)
        for _ in range((32 << 20) // len(pattern)):
            got.append(ata_in(d, len(pattern)) == pattern)
    assert peak_allocation(read_all) < 1 << 20
    assert all(got) and len(got) == 8192 and d.read(0x1F7, 1) & 0x09 == 0
    ata_command(d, 0x30, lba=7, count=2)                    # word by word
    for i in range(512):
        d.write(0x1F0, 2, 0x0102 * (i & 0xFF) & 0xFFFF)
    assert d.read(0x1F7, 1) & 0x09 == 0
    d.close()
    raw = path.read_bytes()[7 * 512:9 * 512]
    assert raw == b"".join((0x0102 * (i & 0xFF) & 0xFFFF).to_bytes(2, "little") for i in range(512))


def test_ata_chs_sector_0_and_addresses_past_the_end_abort(image):
    d = AtaDisk(str(image))
    for cmd in (0x20, 0x30):
        d.write(0x1F6, 1, 0xA0)                 # CHS mode, head 0
        d.write(0x1F2, 1, 1)
        d.write(0x1F3, 1, 0)                    # sector 0: there is none (sectors count from 1)
        d.write(0x1F4, 1, 0)
        d.write(0x1F5, 1, 0)
        d.write(0x1F7, 1, cmd)
        assert d.read(0x1F7, 1) & 0x09 == 0x01 and d.read(0x1F1, 1) == 0x04     # ERR, ABRT
    ata_command(d, 0x20, lba=63, count=2)       # one sector past the end
    assert d.read(0x1F7, 1) & 0x01 and d.read(0x1F1, 1) == 0x04
    ata_command(d, 0x20, lba=0x0FFFFFFF, count=0)
    assert d.read(0x1F7, 1) & 0x01
    ata_command(d, 0x20, lba=2, count=1)        # and the disk goes on
    assert ata_in(d, 512) == bytes([2]) * 512
    d.close()


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EFBIG", "EIO"])
def test_ata_host_errors_become_device_errors(image, monkeypatch, errno_name):
    import errno
    import os
    from kvmsys.devices import ata

    def fail(*_):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
    d = AtaDisk(str(image))
    monkeypatch.setattr(ata.os, "pwrite", fail)
    ata_command(d, 0x30, lba=3, count=1)
    d.io(FakeExit(0x1F0, 2, False, b"\xab" * 512))
    assert d.read(0x1F7, 1) & 0x09 == 0x01 and d.read(0x1F1, 1) == 0x04        # ERR, ABRT
    monkeypatch.setattr(ata.os, "pread", fail)
    ata_command(d, 0x20, lba=3, count=1)
    assert d.read(0x1F7, 1) & 0x09 == 0x01 and d.read(0x1F1, 1) == 0x40        # ERR, UNC
    monkeypatch.undo()
    ata_command(d, 0x20, lba=3, count=1)                                        # it goes on
    assert ata_in(d, 512) == bytes([3]) * 512
    d.close()


def test_ata_write_past_the_file_size_limit_is_a_device_error(image):
    """A real EFBIG (RLIMIT_FSIZE) in a process of its own: ERR + ABRT, no exception."""
    import subprocess
    import sys
    code = f"""
import resource, signal
from kvmsys.devices import AtaDisk
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 512, 8 * 512))
d = AtaDisk({str(image)!r})
for lba, want in ((3, 0x00), (20, 0x01)):
    for reg, v in ((0x1F6, 0xE0), (0x1F2, 1), (0x1F3, lba), (0x1F4, 0), (0x1F5, 0), (0x1F7, 0x30)):
        d.write(reg, 1, v)
    for _ in range(256):
        d.write(0x1F0, 2, 0xCDCD)
    assert d.read(0x1F7, 1) & 0x09 == want, (lba, d.read(0x1F7, 1))
assert d.read(0x1F1, 1) == 0x04
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr


def test_ata_disk_refuses_what_is_not_a_disk_image(tmp_path):
    import os
    from kvmsys.errors import InvalidArgumentError
    os.mkfifo(tmp_path / "fifo")
    for bad in (tmp_path, tmp_path / "fifo", "/dev/zero"):
        for readonly in (True, False):
            with pytest.raises(InvalidArgumentError, match="not a regular file|Is a directory"):
                AtaDisk(str(bad), readonly=readonly)


def test_ata_disk_images_are_locked(image):
    """As QEMU: read-write alone, readonly shared with readonly users only, across open
    file descriptions (also in one process); the lock goes with close()."""
    from kvmsys.errors import InvalidArgumentError
    rw = AtaDisk(str(image))
    for readonly in (False, True):
        with pytest.raises(InvalidArgumentError, match="in use by another process"):
            AtaDisk(str(image), readonly=readonly)
    rw.close()
    ro1, ro2 = AtaDisk(str(image), readonly=True), AtaDisk(str(image), readonly=True)
    with pytest.raises(InvalidArgumentError, match="in use"):
        AtaDisk(str(image))
    ro1.close()
    ro2.close()
    AtaDisk(str(image)).close()
