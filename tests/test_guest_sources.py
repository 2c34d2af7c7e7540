"""The built-in guests: committed bins match their sources, registry and layout are sane."""
import dataclasses
import struct

import pytest

import kvmsys.guests as guests
from kvmsys.guests import build, layout

TARGETS = build.targets()
need_binutils = pytest.mark.skipif(
    bool(build.missing_tools()),
    reason=f"GNU binutils not on PATH: {', '.join(build.missing_tools())}")


# --- sources vs committed bins ----------------------------------------------------------

@need_binutils
@pytest.mark.parametrize("stem", sorted(TARGETS))
def test_bin_matches_source(stem):
    src, bits, addr = TARGETS[stem]
    committed = (build.BIN_DIR / f"{stem}.bin").read_bytes()
    assert build.assemble(src, bits, addr) == committed, \
        f"bin/{stem}.bin is stale: run `python -m kvmsys.guests.build`"


@need_binutils
def test_build_is_deterministic():
    src, bits, addr = TARGETS["hello.long64"]
    assert build.assemble(src, bits, addr) == build.assemble(src, bits, addr)


@need_binutils
@pytest.mark.parametrize("bits", [16, 64])
def test_vectors_same_in_every_mode(bits):
    # vectors.bin is built once (32-bit) but loaded in all modes.
    src, _, addr = TARGETS[build.VECTORS]
    assert build.assemble(src, bits, addr) == layout.read_bin(build.VECTORS)


def test_no_stray_bins():
    on_disk = {p.stem for p in build.BIN_DIR.glob("*.bin")}
    assert on_disk == set(TARGETS)
    firmware = {p.stem for p in build.FIRMWARE_DIR.glob("*.S")}
    assert firmware == {p.stem for p in build.FIRMWARE_DIR.glob("*.bin")} == set(build.FIRMWARE)


@need_binutils
@pytest.mark.parametrize("stem", sorted(build.FIRMWARE))
def test_firmware_image_matches_source(stem):
    """The test images of the PC (firmware/: reset-vector image, boot sector, Multiboot
    kernel, bzImage; they share firmware/debugcon.inc), from the installed package."""
    committed = (build.FIRMWARE_DIR / f"{stem}.bin").read_bytes()
    assert build.assemble_firmware(stem) == committed, \
        f"firmware/{stem}.bin is stale: run `python -m kvmsys.guests.build`"


def test_vector_stubs():
    vec = layout.read_bin(build.VECTORS)
    assert len(vec) == layout.NUM_VECTORS * layout.VECTOR_STUB_SIZE
    for v in range(layout.NUM_VECTORS):
        stub = vec[v * layout.VECTOR_STUB_SIZE:][:7]
        # mov al, 0x80|v; out 0xf4, al; hlt; jmp -3
        assert stub == bytes([0xB0, 0x80 | v, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])


# --- registry ---------------------------------------------------------------------------

def test_registry():
    bases = {g.base for g in guests.GUESTS.values()}
    assert bases == {"pio_out_loop", "pio_in_loop", "mmio_write_loop", "mmio_read_loop",
                     "hlt_loop", "compute", "hello", "debug_exit",
                     "smp_counter", "smp_pingpong", "smp_ipi", "irq_count", "console_flood",
                     "irq_window"}
    assert len(guests.GUESTS) == 3 * len(bases)
    for name, g in guests.GUESTS.items():
        assert name == g.name == f"{g.base}.{g.mode}"
        assert g.mode in ("real", "pm32", "long64")
        assert (build.SRC_DIR / f"{g.base}.S").is_file()
        assert (build.BIN_DIR / f"{name}.bin").is_file()
        assert g.image and g.image is g.image  # loaded once
        assert g.load_addr <= g.entry < g.load_addr + len(g.image)
        assert layout.LOAD_ADDR <= g.load_addr
        assert g.load_addr + len(g.image) <= layout.IMAGE_LIMIT
        assert len({p.name for p in g.params}) == len(g.params)
        for p in g.params:
            assert p.reg in layout.REG_NAMES and 0 <= p.default < 1 << p.bits
        assert g.expect["exit_status"] == guests.exit_status(g.expect["exit_value"])
        hash(g)


def test_get():
    assert guests.get("hello.real") is guests.GUESTS["hello.real"]
    with pytest.raises(KeyError) as info:
        guests.get("no_such_guest")
    assert isinstance(info.value, guests.UnknownGuestError)
    assert "no_such_guest" in str(info.value) and "hello.long64" in str(info.value)


def test_expectations():
    assert guests.get("debug_exit.real").expect["exit_status"] == 0x43
    assert guests.get("hello.pm32").expect["serial"] == "Hello, world!\n"
    assert guests.COMPUTE_RESULT == guests.compute_reference(guests.COMPUTE_N)
    assert guests.compute_reference(0) == layout.COMPUTE_SEED
    assert guests.compute_reference(1) == 0x2B1F4D63


def test_hello_image_has_text():
    for mode in guests.MODES:
        assert b"Hello, world!\n\0" in guests.get(f"hello.{mode}").image


# --- layout -----------------------------------------------------------------------------

def test_layout_regions():
    spans = sorted(layout.REGIONS.values())
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, "layout regions overlap"
    assert spans[-1][1] <= layout.RAM_SIZE
    for addr in (layout.PML4_ADDR, layout.PDPT_ADDR, layout.PD_LOW_ADDR, layout.PD_MMIO_ADDR,
                 layout.PVM_PAGE, layout.DATA_ADDR):
        assert addr % 0x1000 == 0
    assert layout.PML4_ADDR % 0x2000 == 0  # PVM: CR3 bit 12 must be 0
    assert all(not (lo < layout.PVM_PAGE + 0x1000 and layout.PVM_PAGE < hi)
               for lo, hi in layout.REGIONS.values())
    assert layout.MMIO_BASE >= 1 << 30 and layout.MMIO_BASE >> 30 != 0
    assert layout.MMIO_READ_ADDR + 4 <= (layout.MMIO_BASE >> 30) + 1 << 30
    assert layout.STACK_TOP <= 0x10000  # reachable as a real-mode SP


def _seg():
    return dict(base=0, limit=0xFFFF, selector=0, type=3, present=1, dpl=0, db=0, s=1,
                l=0, g=0, avl=0, unusable=0, padding=0)


class FakeVcpu:
    """Stands in for the core's vCPU: same dict shapes as KVM_GET_SREGS/REGS."""

    def __init__(self):
        dt = dict(base=0, limit=0xFFFF, padding=[0, 0, 0])
        self.sregs = {**{n: _seg() for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")},
                      "gdt": dict(dt), "idt": dict(dt), "cr0": 0x60000010, "cr2": 0, "cr3": 0,
                      "cr4": 0, "cr8": 0, "efer": 0, "apic_base": 0xFEE00900,
                      "interrupt_bitmap": [0, 0, 0, 0]}
        self.regs = dict.fromkeys(layout.REG_NAMES, 0)
        self.settled = False        # complete_pending_io() came before any register was set

    active = False          # not inside run(): prepare() settles a pending access first

    def last_exit(self):
        self.settled = True     # (prepare() looked at the last exit: nothing pending in a fake)

    def complete_pending_io(self):
        raise AssertionError("no exit of a fake vCPU awaits completion")

    def get_sregs(self):
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.sregs.items()}

    def set_sregs(self, d):
        assert self.settled, "registers set before the pending access was completed"
        assert d.keys() == self.sregs.keys()
        for k in ("cs", "ds", "tr", "ldt", "gdt", "idt"):
            assert d[k].keys() == self.sregs[k].keys()
        self.sregs = d

    def get_regs(self):
        return dict(self.regs)

    def set_regs(self, d):
        assert self.settled, "registers set before the pending access was completed"
        assert d.keys() == self.regs.keys()
        self.regs = d


def _prepare(name, **inputs):
    vcpu, ram = FakeVcpu(), bytearray(layout.RAM_SIZE)
    ram[layout.COUNTER_ADDR] = 0xAA  # must be cleared
    layout.prepare(guests.get(name), vcpu, memoryview(ram), **inputs)
    return vcpu, ram


@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
def test_prepare_common(mode):
    g = guests.get(f"pio_out_loop.{mode}")
    vcpu, ram = _prepare(g.name, n=7)
    r, s = vcpu.regs, vcpu.sregs
    assert r["rip"] == g.entry and r["rcx"] == 7 and r["rsp"] == layout.STACK_TOP
    assert r["rflags"] == 2
    assert ram[g.load_addr:g.load_addr + len(g.image)] == g.image
    assert ram[layout.COUNTER_ADDR] == 0
    assert ram[layout.VECTORS_ADDR:layout.VECTORS_ADDR + 256] == layout.read_bin("vectors")
    assert s["interrupt_bitmap"] == [0, 0, 0, 0] and s["apic_base"] == 0xFEE00900
    assert s["tr"]["type"] == 11 and s["tr"]["present"] and not s["tr"]["s"]
    if mode == "real":
        assert s["cr0"] & 1 == 0 and s["cs"]["base"] + r["rip"] == g.entry
        assert s["ds"]["limit"] == 0xFFFFFFFF  # reaches MMIO_BASE
        off, seg = struct.unpack_from("<HH", ram, 4 * 13)
        assert seg * 16 + off == layout.VECTORS_ADDR + 13 * layout.VECTOR_STUB_SIZE
    else:
        gdt = struct.unpack_from("<4Q", ram, layout.GDT_ADDR)
        assert gdt == layout.GDT and s["gdt"]["base"] == layout.GDT_ADDR
        assert s["idt"]["base"] == layout.IDT_ADDR and s["ds"]["selector"] == layout.SEL_DATA


def test_prepare_pm32():
    vcpu, ram = _prepare("compute.pm32")
    s = vcpu.sregs
    assert vcpu.regs["rcx"] == guests.COMPUTE_N
    assert s["cr0"] == 0x11 and s["efer"] == 0 and s["cr4"] == 0
    assert s["cs"]["selector"] == layout.SEL_CODE32 and s["cs"]["db"] == 1
    assert s["cs"]["limit"] == 0xFFFFFFFF and s["cs"]["g"] == 1
    lo, hi = struct.unpack_from("<II", ram, layout.IDT_ADDR + 8 * 14)
    assert (lo & 0xFFFF) | (hi & 0xFFFF0000) == layout.VECTORS_ADDR + 14 * 8
    assert lo >> 16 == layout.SEL_CODE32 and (hi >> 8) & 0xFF == 0x8E


def test_prepare_long64():
    vcpu, ram = _prepare("mmio_write_loop.long64", n=3)
    s = vcpu.sregs
    assert (s["cr0"], s["cr4"], s["efer"]) == (0x80050033, 0x20, 0x500)
    assert s["cr3"] == layout.PML4_ADDR and s["cr3"] & 0x1000 == 0
    assert s["cs"]["l"] == 1 and s["cs"]["db"] == 0 and s["cs"]["selector"] == layout.SEL_CODE64
    q = lambda a: struct.unpack_from("<Q", ram, a)[0]

    def walk(va):  # 4-level walk; every level must carry U/S for PVM
        e = q(layout.PML4_ADDR + 8 * ((va >> 39) & 511))
        for shift in (30, 21):
            assert e & 0x7 == 0x7
            e = q((e & ~0xFFF) + 8 * ((va >> shift) & 511))
        assert e & 0xFF == 0x87
        return (e & ~0x1FFFFF & (1 << 52) - 1) | va & 0x1FFFFF

    for va in (0, layout.LOAD_ADDR, layout.RAM_SIZE - 1, (1 << 30) - 1,
               layout.MMIO_WRITE_ADDR, layout.MMIO_READ_ADDR):
        assert walk(va) == va
    lo, hi, hi32, _ = struct.unpack_from("<IIII", ram, layout.IDT_ADDR + 16 * 13)
    assert (lo & 0xFFFF) | (hi & 0xFFFF0000) | hi32 << 32 == layout.VECTORS_ADDR + 13 * 8
    assert lo >> 16 == layout.SEL_CODE64 and (hi >> 8) & 0xFF == 0x8E
    assert s["idt"]["limit"] == 16 * 32 - 1


def test_prepare_inputs():
    vcpu, _ = _prepare("debug_exit.real")
    assert vcpu.regs["rax"] == 0x21
    vcpu, _ = _prepare("debug_exit.long64", value=0x7F)
    assert vcpu.regs["rax"] == 0x7F
    for bad in ({"value": 256}, {"value": -1}):
        with pytest.raises(ValueError):
            _prepare("debug_exit.pm32", **bad)
    with pytest.raises(TypeError):
        _prepare("hello.pm32", n=1)
    with pytest.raises(TypeError):
        _prepare("hlt_loop.pm32", n=1.5)


def test_prepare_checks_ram_and_pvm_page():
    g = guests.get("hlt_loop.long64")
    with pytest.raises(ValueError):
        layout.prepare(g, FakeVcpu(), memoryview(bytearray(0x10000)))
    ram = memoryview(bytearray(layout.RAM_SIZE))
    for bad in (layout.PML4_ADDR, layout.PVM_PAGE + 1, layout.RAM_SIZE):
        with pytest.raises(ValueError):
            layout.prepare(g, FakeVcpu(), ram, pvm_page=bad)
    layout.prepare(g, FakeVcpu(), ram, pvm_page=layout.PVM_PAGE)


def test_guest_is_frozen():
    g = guests.get("hello.real")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.mode = "pm32"
