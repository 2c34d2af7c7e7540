"""The PC devices of kvmsys.devices, driven port by port (no VM needed)."""
import struct

import pytest

from kvmsys.devices import AtaDisk, Cmos, FwCfg, I8042, Irq, PciHost, Pit, Port92, Uart8250

pytestmark = pytest.mark.nokvm


class FakeExit:
    """What a device's io() reads of an IoExit."""

    def __init__(self, port, size, is_in, data):
        self.port, self.size, self.is_in = port, size, is_in
        self.data = memoryview(bytearray(data))
        self.count = len(data) // size


class FakeVm:
    has_irqchip = True

    def __init__(self):
        self.lines = []

    def irq_line(self, line, level):
        self.lines.append((line, level))


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
