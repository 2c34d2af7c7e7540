"""The q35 machine's devices (kvmsys.q35): QEMU's edu PCI device, the Intel IOMMU's DMA and
interrupt remapping, queued invalidation and fault recording, the user-space IOAPIC on
the split irqchip.  Driven from the host as a guest's MMIO would drive them, over real
guest memory and real interrupt delivery (KVM_SIGNAL_MSI into a vCPU's local APIC), on
both ABIs; the guest's tables are hostile where the test says so."""
import struct

import pytest
from conftest import FakeVm

from kvmsys import acpi, q35
from kvmsys.devices import edu as edu_mod, vtd, vtd_walk
from kvmsys.devices.pci import PciHost
from kvmsys.errors import InvalidArgumentError
from kvmsys.machine import Machine

RAM = 16 << 20
ROOT, CTX, L3, L2, L1, PAGE = 0x10000, 0x11000, 0x12000, 0x13000, 0x14000, 0x20000
IRT, QUEUE = 0x30000, 0x31000
EDU_SID = q35.EDU_DEVFN


class Access:
    """One MMIO access as KVM reports it (address, length, is_write, data)."""

    def __init__(self, address, length, value=None):
        self.address, self.length, self.is_write = address, length, value is not None
        self.data = memoryview(bytearray((value or 0).to_bytes(8, "little")))


class Rig:
    """A q35 machine's parts on a split-irqchip VM with one vCPU whose local APIC is on."""

    def __init__(self, m, devices=("edu", "intel-iommu")):
        self.m, self.vm = m, m.vm
        self.vcpu = m.attach()
        lapic = bytearray(self.vcpu.get_lapic())
        lapic[0xF0:0xF4] = (0x1FF).to_bytes(4, "little")       # SVR: software enabled
        self.vcpu.set_lapic(bytes(lapic))
        self.parts = q35.Q35Parts(self.vm, ram_size=RAM, devices=devices)
        self.iommu, self.edu, self.ioapic = self.parts.iommu, self.parts.edu, self.parts.ioapic
        self.config(0x04, 2, 6)                                 # memory decoding, bus master (as the guest)

    def config(self, off, size, value):
        """A configuration write to edu (mechanism #1)."""
        self.parts.pci.write(0xCF8, 4, 0x80000000 | EDU_SID << 8 | (off & 0xFC))
        self.parts.pci.write(0xCFC + (off & 3), size, value)

    def irr(self, vector):
        lapic = self.vcpu.get_lapic()
        word = int.from_bytes(lapic[0x200 + (vector // 32) * 16:][:4], "little")
        return bool(word >> (vector % 32) & 1)

    def q(self, gpa, *values):
        self.vm.write(gpa, struct.pack(f"<{len(values)}Q", *values))

    def u32(self, gpa):
        return int.from_bytes(self.vm.read(gpa, 4), "little")

    # the IOMMU's registers
    def reg(self, off, n=4, value=None):
        a = Access(vtd.BASE + off, n, value)
        self.iommu.mmio(a)
        return int.from_bytes(a.data[:n], "little")

    def gcmd(self, bit):
        self.reg(0x18, 4, self.reg(0x1C) | bit)

    # edu through its BAR
    def edu_reg(self, off, n=4, value=None):
        a = Access(q35.EDU_BAR + off, n, value)
        self.parts.pci.mmio(a)
        return int.from_bytes(a.data[:n], "little")

    def dma(self, iova, n, dev_offset, from_device):
        src, dst = (edu_mod.DMA_START + dev_offset, iova) if from_device else (iova, edu_mod.DMA_START + dev_offset)
        self.edu_reg(0x80, 8, src)
        self.edu_reg(0x88, 8, dst)
        self.edu_reg(0x90, 8, n)
        self.edu_reg(0x98, 4, 1 | (2 if from_device else 0))
        assert self.edu_reg(0x98) & 1 == 0          # done within the write

    def map_page(self, iova=0, gpa=PAGE, perm=3):
        """Tables for requester EDU_SID: iova -> gpa (4 KiB), translation enabled."""
        self.q(ROOT, CTX | 1, 0)
        self.q(CTX + EDU_SID * 16, L3 | 1, 1 | EDU_SID << 8)    # multi-level, AW 39 bits, domain
        self.q(L3 + ((iova >> 30) & 0x1FF) * 8, L2 | 3)
        self.q(L2 + ((iova >> 21) & 0x1FF) * 8, L1 | 3)
        self.q(L1 + ((iova >> 12) & 0x1FF) * 8, gpa | perm)
        self.reg(0x20, 8, ROOT)
        self.gcmd(vtd.SRTP)
        self.gcmd(vtd.TE)

    def fault(self):
        """(FSTS, fault reason, sid, info) of the fault recording register."""
        lo, hi = self.reg(vtd.FRCD, 8), self.reg(vtd.FRCD + 8, 8)
        return self.reg(0x34), (hi >> 32) & 0xFF if hi >> 63 else None, hi & 0xFFFF, lo


@pytest.fixture
def rig(abi):
    with Machine(abi, memory_size=RAM, irqchip="split") as m:
        yield Rig(m)


def test_edu_dma_goes_through_the_iommu_mapping(rig):
    rig.edu_reg(0x04, 4, 0x1234)
    assert rig.edu_reg(0x00) == 0x010000ED and rig.edu_reg(0x04) == ~0x1234 & 0xFFFFFFFF
    rig.map_page(iova=0, gpa=PAGE)
    rig.vm.write(0, b"\x11\x11\x11\x11")            # what an untranslated DMA would read
    rig.vm.write(PAGE, struct.pack("<I", 0x12345678))
    rig.dma(0, 4, 0, from_device=False)
    rig.dma(4, 4, 0, from_device=True)
    assert rig.u32(PAGE + 4) == 0x12345678 and rig.u32(4) == 0
    assert rig.reg(0x34) == 0 and rig.edu.dma_errors == 0
    rig.map_page(iova=0x40000000 + 0x3000, gpa=PAGE + 0x1000)    # a second page, in another L3 slot
    rig.dma(0x40003000 + 8, 4, 0, from_device=True)
    assert rig.u32(PAGE + 0x1008) == 0x12345678


def test_dma_to_an_unmapped_or_read_only_page_faults(rig):
    rig.map_page(iova=0, gpa=PAGE, perm=1)          # read-only
    rig.vm.write(PAGE, struct.pack("<I", 0xCAFE))
    rig.dma(0x5000, 4, 0, from_device=False)        # not mapped: a read fault
    fsts, reason, sid, info = rig.fault()
    assert (fsts & vtd.PPF, reason, sid, info) == (vtd.PPF, vtd_walk.READ_DENIED, EDU_SID, 0x5000)
    assert rig.edu.dma_errors == 1
    rig.dma(0, 4, 0, from_device=True)              # a write to the read-only page: dropped
    assert rig.u32(PAGE) == 0xCAFE and rig.reg(0x34) & vtd.PFO    # the register was still full
    rig.reg(vtd.FRCD + 12, 4, 1 << 31)              # software clears F, then PFO
    rig.reg(0x34, 4, vtd.PFO)
    assert rig.reg(0x34) == 0
    rig.reg(0x3C, 4, 0x51)                          # fault event: vector 0x51 to APIC 0
    rig.reg(0x40, 4, 0xFEE00000)
    assert not rig.irr(0x51) and rig.reg(0x38) == vtd.IM | vtd.IP     # masked: pending
    rig.reg(0x38, 4, 0)                             # unmasked: the pending event is sent
    assert rig.irr(0x51) and rig.reg(0x38) == 0
    rig.reg(0x3C, 4, 0x52)
    rig.dma(0, 4, 0, from_device=True)
    assert rig.fault()[1] == vtd_walk.WRITE_DENIED and rig.irr(0x52)


def _fault_of(rig, iova=0, write=False):
    assert rig.iommu.translate(EDU_SID, iova, write) is None
    reason = rig.fault()[1]
    rig.reg(vtd.FRCD + 12, 4, 1 << 31)
    return reason


def test_hostile_translation_tables_give_faults_not_errors(rig):
    rig.map_page()
    assert rig.iommu.translate(EDU_SID, 0x123, False) == PAGE + 0x123
    cases = [
        (lambda: rig.q(ROOT, (RAM + 0x100000) | 1, 0), vtd_walk.CONTEXT_TABLE_ERROR),   # context table beyond RAM
        (lambda: rig.q(ROOT, CTX | 1 | 0x10, 0), vtd_walk.ROOT_RESERVED),
        (lambda: rig.q(ROOT, CTX, 0), vtd_walk.ROOT_NOT_PRESENT),
        (lambda: rig.q(CTX + EDU_SID * 16, L3 | 1, 2), vtd_walk.CONTEXT_INVALID),      # 48-bit AW: not offered
        (lambda: rig.q(CTX + EDU_SID * 16, L3 | 1 | 3 << 2, 1), vtd_walk.CONTEXT_INVALID),    # TT 3
        (lambda: rig.q(CTX + EDU_SID * 16, L3 | 1, 1 | 1 << 40), vtd_walk.CONTEXT_RESERVED),
        (lambda: rig.q(L3, (0xFFFFF000 & ~0xFFF) | 3), vtd_walk.PAGE_TABLE_ERROR),      # next table not RAM
        (lambda: rig.q(L3, L2 | 3 | 1 << 45), vtd_walk.PTE_RESERVED),                  # beyond the address width
        (lambda: rig.q(L2, (PAGE + 0x1000) | 0x83), vtd_walk.PTE_RESERVED),            # unaligned 2 MiB page
    ]
    for corrupt, reason in cases:
        rig.map_page()
        corrupt()
        assert _fault_of(rig) == reason, hex(reason)
    rig.map_page()
    rig.q(L3, L3 | 3)                               # tables that point at themselves: three reads, no loop
    rig.q(L2, L2 | 3)
    rig.q(L1, L1 | 3)
    rig.q(L3, L3 | 3)
    assert rig.iommu.translate(EDU_SID, 0, False) == L3     # the walk ends at level 1, whatever the loop
    rig.map_page()
    assert _fault_of(rig, iova=1 << 39) == vtd_walk.ADDRESS_BEYOND_AW
    rig.reg(0x20, 8, 1 << 38)                       # a root table outside RAM
    rig.gcmd(vtd.SRTP)
    assert _fault_of(rig) == vtd_walk.ROOT_TABLE_ERROR
    rig.map_page()
    rig.q(CTX + EDU_SID * 16, L3 | 3, 1)            # FPD: refused, not recorded
    rig.q(L3, 0)
    assert rig.iommu.translate(EDU_SID, 0, False) is None and rig.fault()[1] is None


def test_large_pages_and_pass_through(rig):
    rig.map_page()
    rig.q(L2, 0x200000 | 0x83)                      # iova [0, 2 MiB) -> [2 MiB, 4 MiB)
    assert rig.iommu.translate(EDU_SID, 0x12345, True) == 0x212345
    rig.q(L3, 0x83)                                 # a 1 GiB page at 0
    assert rig.iommu.translate(EDU_SID, 0x12345, True) == 0x12345
    rig.q(CTX + EDU_SID * 16, 1 | 2 << 2, 0)        # pass-through
    assert rig.iommu.translate(EDU_SID, 0xABC000, True) == 0xABC000


def _irte(vector, dest=0, sid=EDU_SID, svt=1, sq=0, present=True, extra=0):
    return (int(present) | vector << 16 | dest << 40 | extra), sid | sq << 16 | svt << 18


def _enable_ir(rig, size_bits=3):
    rig.reg(0xB8, 8, IRT | size_bits)               # 2^(3+1) = 16 entries
    rig.gcmd(vtd.SIRTP)
    rig.gcmd(vtd.IRE)


def _edu_msi(rig, address, data=0):
    for off, size, value in ((0x44, 4, address), (0x48, 4, 0), (0x4C, 2, data), (0x42, 2, 1)):
        rig.config(off, size, value)


def test_msi_is_remapped_and_its_source_verified(rig):
    _enable_ir(rig)
    rig.q(IRT + 2 * 16, *_irte(0x62))
    rig.q(IRT + 3 * 16, *_irte(0x63, sid=EDU_SID + 1))          # another requester's entry
    handle = lambda i: 0xFEE00000 | 1 << 4 | (i & 0x7FFF) << 5    # noqa: E731
    _edu_msi(rig, handle(2))
    rig.edu_reg(0x60, 4, 1)
    assert rig.irr(0x62) and rig.fault()[1] is None
    rig.edu_reg(0x64, 4, 1)
    _edu_msi(rig, handle(3))
    rig.edu_reg(0x60, 4, 1)
    assert not rig.irr(0x63) and rig.fault()[1:3] == (vtd_walk.IR_SID_MISMATCH, EDU_SID)
    rig.reg(vtd.FRCD + 12, 4, 1 << 31)
    for index, entry, reason in ((16, None, vtd_walk.IR_INDEX_BEYOND),
                                 (4, _irte(0x64, present=False), vtd_walk.IRTE_NOT_PRESENT),
                                 (5, _irte(0x65, extra=1 << 15), vtd_walk.IRTE_RESERVED),    # posted: not offered
                                 (6, _irte(0x66, svt=3), vtd_walk.IRTE_RESERVED)):
        if entry:
            rig.q(IRT + index * 16, *entry)
        assert rig.iommu.remap(handle(index), 0, EDU_SID) is None
        assert rig.fault()[1] == reason, hex(reason)
        rig.reg(vtd.FRCD + 12, 4, 1 << 31)
    assert rig.iommu.remap(0xFEE00000, 0x40, EDU_SID) is None                # compatibility format blocked
    assert rig.fault()[1] == vtd_walk.IR_COMPAT_BLOCKED
    rig.reg(vtd.FRCD + 12, 4, 1 << 31)
    rig.gcmd(vtd.CFI)
    assert rig.iommu.remap(0xFEE00000, 0x40, EDU_SID) == (0xFEE00000, 0x40)
    rig.reg(0xB8, 8, (RAM - 0x1000) | 0xF)          # a table running out of RAM: an access error
    rig.gcmd(vtd.SIRTP)
    assert rig.iommu.remap(handle(300), 0, EDU_SID) is None and rig.fault()[1] == vtd_walk.IRT_ERROR


def test_ioapic_interrupts_are_remapped(rig):
    _enable_ir(rig)
    rig.q(IRT + 1 * 16, *_irte(0xED, sid=0x1234))   # the IOAPIC sends no source-id, as QEMU's
    entry = 0xED | 1 << 48 | 1 << 49                # remappable format, index 1, edge
    for reg, value in ((0x10 + 2 * 16, entry & 0xFFFFFFFF), (0x11 + 2 * 16, entry >> 32)):
        rig.ioapic.mmio(Access(0xFEC00000, 4, reg))
        rig.ioapic.mmio(Access(0xFEC00010, 4, value))
    rig.edu_reg(0x60, 4, 1)                         # INTx (MSI off) -> pin 16 -> IRTE 1
    assert rig.irr(0xED)


def test_level_triggered_ioapic_pin_waits_for_the_eoi(rig):
    rig.parts.iommu = None                          # compatibility messages, straight to the APIC
    rig.parts.bus.iommu = None
    entry = 0x71 | 1 << 15                          # level, APIC 0, fixed
    rig.ioapic.mmio(Access(0xFEC00000, 4, 0x10 + 2 * 5))
    rig.ioapic.mmio(Access(0xFEC00010, 4, entry))
    assert rig.ioapic.routes() == [(5, 0xFEE00000, 0x71 | 1 << 15 | 1 << 14)]
    sent = []
    rig.ioapic.msi = lambda a, d: sent.append((a, d))
    rig.ioapic.irq_line(5, 1)
    rig.ioapic.irq_line(5, 1)
    assert len(sent) == 1 and rig.ioapic.entries[5] & (1 << 14)        # Remote IRR
    rig.ioapic.eoi(0x71)                            # line still high: again
    assert len(sent) == 2
    rig.ioapic.irq_line(5, 0)
    rig.ioapic.eoi(0x71)
    assert len(sent) == 2 and not rig.ioapic.entries[5] & (1 << 14)
    rig.parts.bus.routes_changed()                  # KVM takes the route (for its EOI exits)
    rig.ioapic.irq_line(99, 1)                      # no such pin: nothing
    assert len(sent) == 2


def test_kvm_gets_the_level_triggered_routes_only_when_they_change(rig, monkeypatch):
    """Every IOREDTBL write recomputes the IOAPIC's level-triggered routes; the VM ioctl that
    gives them to KVM is made only when they differ from what it has."""
    rig.parts.iommu = None                          # compatibility messages, straight to the APIC
    rig.parts.bus.iommu = None
    sent = []
    real = rig.vm.set_gsi_routing
    monkeypatch.setattr(rig.vm, "set_gsi_routing", lambda routes: (sent.append(list(routes)), real(routes))[1])

    def entry(pin, value):
        rig.ioapic.mmio(Access(0xFEC00000, 4, 0x10 + 2 * pin))
        rig.ioapic.mmio(Access(0xFEC00010, 4, value))

    level = 0x71 | 1 << 15                          # level, APIC 0, fixed
    entry(5, level)
    entry(5, level)                                 # the same again: KVM has it
    entry(6, 0x72)                                  # an edge-triggered pin: no route
    assert len(sent) == 1 and [r[0] for r in sent[0]] == [5]
    entry(5, level | 1 << 16)                       # masked: its route goes
    entry(6, 0x72 | 1 << 15)                        # level now: a route
    assert [[r[0] for r in routes] for routes in sent] == [[5], [], [6]]


def test_queued_invalidation(rig):
    rig.reg(0x90, 8, QUEUE)                         # one page: 256 descriptors
    rig.gcmd(vtd.QIE)
    assert rig.reg(0x1C) & vtd.QIE and rig.reg(0x80, 8) == 0
    rig.q(QUEUE, 0x1 | 1 << 4, 0)                   # context cache (global)
    rig.q(QUEUE + 16, 0x2 | 1 << 4, 0)              # IOTLB (global)
    rig.q(QUEUE + 32, 0x4, 0)                       # interrupt entry cache
    rig.q(QUEUE + 48, 0x5 | 1 << 5 | 0xAB << 32, 0x40000)     # wait: write 0xab to 0x40000
    rig.reg(0x88, 8, 4 << 4)
    assert rig.reg(0x80, 8) == 4 << 4 and rig.u32(0x40000) == 0xAB and rig.reg(0x34) == 0
    rig.q(QUEUE + 64, 0x9, 0)                       # no such descriptor: IQE, the head stays
    rig.q(QUEUE + 80, 0x5 | 1 << 5 | 0xCD << 32, 0x40000)
    rig.reg(0x88, 8, 6 << 4)
    assert rig.reg(0x34) & vtd.IQE and rig.reg(0x80, 8) == 4 << 4 and rig.u32(0x40000) == 0xAB
    rig.q(QUEUE + 64, 0x2 | 1 << 4, 0)              # fixed; clearing IQE runs the rest
    rig.reg(0x34, 4, vtd.IQE)
    assert rig.reg(0x80, 8) == 6 << 4 and rig.u32(0x40000) == 0xCD
    rig.q(QUEUE + 96, 0x5 | 1 << 5, RAM + 0x1000)   # a status write outside RAM
    rig.reg(0x88, 8, 7 << 4)
    assert rig.reg(0x34) & vtd.IQE
    rig.reg(0x34, 4, vtd.IQE)                       # still bad: IQE again, at once
    assert rig.reg(0x34) & vtd.IQE and rig.reg(0x80, 8) == 6 << 4
    rig.q(RAM - 0x1000, *[0x2 | 1 << 4, 0] * 256)   # a page of IOTLB invalidations ...
    rig.reg(0x90, 8, (RAM - 0x1000) | 7)            # ... the first of 128 pages, the rest outside RAM
    rig.reg(0x18, 4, 0)                             # QI off ...
    rig.gcmd(vtd.QIE)                               # ... and on: IQH 0
    rig.reg(0x34, 4, vtd.IQE)
    rig.reg(0x88, 8, 300 << 4)                      # 256 run, then the queue leaves RAM
    assert rig.reg(0x34) & vtd.IQE and rig.reg(0x80, 8) == 256 << 4


def test_invalidation_waits_interrupt_once_until_iwc_is_cleared(rig):
    """A wait descriptor with IF is a new interrupt condition only while ICS.IWC is clear
    (VT-d): a queue full of them sends one message, not one per descriptor, until the
    guest clears IWC; a masked one stays pending (IP) until it is unmasked."""
    sent = []
    rig.iommu.signal = lambda address, data: sent.append((address, data))
    rig.reg(vtd.IECTL + 4, 4, 0x41)
    rig.reg(vtd.IECTL + 8, 4, 0xFEE00000)
    rig.reg(vtd.IECTL, 4, 0)                        # unmasked
    rig.reg(0x90, 8, QUEUE)
    rig.gcmd(vtd.QIE)
    rig.q(QUEUE, *[0x5 | 1 << 4, 0] * 256)          # a page of waits with IF
    rig.reg(0x88, 8, 200 << 4)
    assert rig.reg(0x80, 8) == 200 << 4 and rig.reg(0x9C) == 1
    assert sent == [(0xFEE00000, 0x41)]
    rig.reg(0x88, 8, 210 << 4)                      # IWC still set: no new condition
    assert rig.reg(0x80, 8) == 210 << 4 and len(sent) == 1
    rig.reg(0x9C, 4, 1)                             # cleared: the next wait interrupts
    assert rig.reg(0x9C) == 0
    rig.reg(0x88, 8, 220 << 4)
    assert len(sent) == 2 and rig.reg(0x9C) == 1
    rig.reg(vtd.IECTL, 4, vtd.IM)                   # masked: held pending
    rig.reg(0x9C, 4, 1)
    rig.reg(0x88, 8, 230 << 4)
    assert len(sent) == 2 and rig.reg(vtd.IECTL) & vtd.IP
    rig.reg(vtd.IECTL, 4, 0)
    assert len(sent) == 3 and not rig.reg(vtd.IECTL) & vtd.IP


def test_registers_refuse_odd_accesses(rig):
    assert rig.reg(0x00) == 0x10 and rig.reg(0x08, 8) == vtd.CAP and rig.reg(0x10, 8) == vtd.ECAP
    for off, n in ((0x01, 4), (0x00, 2), (0x00, 1), (0xFF8, 8)):
        assert rig.reg(off, n) == (1 << (8 * n)) - 1
    rig.reg(0x08, 8, 0)                             # read-only: unchanged
    assert rig.reg(0x08, 8) == vtd.CAP
    rig.reg(0x2C, 4, 1 << 31 | 1 << 29)             # context command: done at once
    assert rig.reg(0x2C) >> 31 == 0


def test_random_tables_and_registers_never_break_the_host(rig):
    """Seeded random guest behaviour: tables of random entries (pointers into the table
    pages, past RAM, at themselves), random register writes, DMA and interrupts through
    them.  Whatever it is, each request ends in a result or a VT-d fault, nothing raises,
    and the work per request is bounded (the whole run takes well under its budget)."""
    import random
    import time
    rnd = random.Random(22)
    pages = [ROOT, CTX, L3, L2, L1, IRT, QUEUE]
    pointers = pages + [RAM, RAM - 0x1000, 1 << 38, 0xFFFFFFFFF000, 0]
    regs = [0x18, 0x20, 0x24, 0x28, 0x2C, 0x34, 0x38, 0x3C, 0x40, 0x80, 0x88, 0x90, 0x9C, 0xA0, 0xB8,
            vtd.IOTLB_REGS + 8, vtd.FRCD + 12]
    t0 = time.monotonic()
    for step in range(1500):
        what = rnd.randrange(6)
        if what == 0:                               # a random entry in a table page
            entry = rnd.choice(pointers) | rnd.getrandbits(12) if rnd.random() < 0.7 else rnd.getrandbits(64)
            rig.q(rnd.choice(pages) + 8 * rnd.randrange(512), entry & (2 ** 64 - 1))
        elif what == 1:
            value = rnd.choice([rnd.getrandbits(32), rnd.choice(pointers) & 0xFFFFFFFF | rnd.getrandbits(4),
                                0xFFFFFFFF, vtd.TE | vtd.QIE | vtd.IRE | vtd.SRTP | vtd.SIRTP])
            rig.reg(rnd.choice(regs), 4, value)
        elif what == 2:
            rig.dma(rnd.getrandbits(rnd.choice([12, 28, 40])), rnd.randrange(1, 4097), 0, rnd.random() < 0.5)
        elif what == 3:
            rig.iommu.translate(rnd.getrandbits(16), rnd.getrandbits(rnd.choice([21, 39, 64])), rnd.random() < 0.5)
            rig.iommu.remap(0xFEE00000 | rnd.getrandbits(20), rnd.getrandbits(32), rnd.getrandbits(16))
        elif what == 4:
            _edu_msi(rig, 0xFEE00000 | rnd.getrandbits(20), rnd.getrandbits(16))
            rig.edu_reg(0x60, 4, 1)
            rig.edu_reg(0x64, 4, 1)
        else:
            rig.ioapic.mmio(Access(0xFEC00000, 4, 0x10 + rnd.randrange(48)))
            rig.ioapic.mmio(Access(0xFEC00010, 4, rnd.getrandbits(32)))
            rig.ioapic.irq_line(rnd.randrange(24), rnd.randrange(2))
            rig.ioapic.eoi(rnd.randrange(256))
    assert rig.iommu.faults > 0 and time.monotonic() - t0 < 60


# --- a kernel on the q35 machine ---------------------------------------------------------
def test_an_smp_kernel_runs_on_the_q35_machine(abi):
    """INIT/SIPI through the in-kernel local APICs of the split irqchip, the PC's ports,
    ACPI with the DMAR table: our own SMP Multiboot kernel as on the pc machine."""
    from test_kut import SMP_KERNEL
    from kvmsys.runner import run_kernel
    r = run_kernel(SMP_KERNEL, abi=abi, vcpus=2, irqchip=True, machine="q35", devices=("edu", "intel-iommu"),
                   timeout=30)
    assert (r.reason, r.status, r.vcpus) == ("STOP", 3, 2), r
    assert r.debug == b"smp ok\n"


def test_a_guest_drives_the_ioapic_edu_and_iommu_itself(abi):
    """Our own kernel (kvmsys/guests/firmware/q35_multiboot.S): level-triggered IOAPIC pins
    delivered again on the EOI KVM reports (IOAPIC_EOI), edu DMA through its IOMMU mapping,
    a fault record for an unmapped IOVA, a remapped MSI and a remapped level pin; every access
    through real exits."""
    from test_kut import FIRMWARE
    from kvmsys.runner import run_kernel
    kernel = (FIRMWARE / "q35_multiboot.bin").read_bytes()
    r = run_kernel(kernel, abi=abi, irqchip=True, machine="q35", devices=("edu", "intel-iommu"), test_device=True,
                   timeout=30)
    assert (r.reason, r.status, r.debug) == ("STOP", 1, b"q35 ok\n"), r
    assert r.exits.get("IOAPIC_EOI") == 4, r.exits      # two per level pin (steps 1 and 5)


def test_q35_options_are_refused_where_they_cannot_apply():
    import subprocess
    import sys
    from test_kut import FIRMWARE
    from kvmsys.runner import run_kernel
    with pytest.raises(InvalidArgumentError, match="irqchip"):
        run_kernel(b"", machine="q35", irqchip=False)
    with pytest.raises(InvalidArgumentError, match="q35"):
        run_kernel(b"", devices=("edu",), irqchip=True)
    kernel = str(FIRMWARE / "smp_multiboot.bin")
    for args, why in ((["--guest", "hello.pm32", "--machine", "q35"], "applies to --kernel"),
                      (["--kernel", kernel, "--device", "edu"], "q35"),
                      (["--kernel", kernel, "--device", "vga"], "invalid choice")):
        p = subprocess.run([sys.executable, "-m", "kvmsys", "run", *args], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2 and why in p.stderr, (args, p.stdout + p.stderr)


# --- without KVM ----------------------------------------------------------------------
class _Bus:
    def __init__(self):
        self.mem = bytearray(0x10000)
        self.msis, self.lines = [], []

    def dma_read(self, sid, addr, n):
        return bytes(self.mem[addr:addr + n]) if addr + n <= len(self.mem) else None

    def dma_write(self, sid, addr, data):
        if addr + len(data) > len(self.mem):
            return False
        self.mem[addr:addr + len(data)] = data
        return True

    def msi(self, address, data, sid):
        self.msis.append((address, data, sid))

    def intx(self, dev, level):
        self.lines.append(level)


@pytest.mark.nokvm
def test_edu_config_space_bar_sizing_and_msi_capability():
    e = edu_mod.Edu(_Bus(), devfn=0x08, bar=0xFE000000, line=16)
    host = PciHost({(1, 0): e})

    def cfg(off, size=4, value=None):
        host.write(0xCF8, 4, 0x80000000 | 1 << 11 | off)      # low bits kept (QEMU's behaviour)
        if value is None:
            return host.read(0xCFC, size)
        host.write(0xCFC, size, value)
    assert cfg(0, 2) == 0x1234 and cfg(2, 2) == 0x11E8 and cfg(0x3C, 1) == 16 and cfg(0x3D, 1) == 1
    assert cfg(0x10) == 0xFE000000
    cfg(0x10, 4, 0xFFFFFFFF)
    assert cfg(0x10) == 0xFFF00000                  # 1 MiB, 32-bit memory
    cfg(0x10, 4, 0xFE100000)
    assert e.decodes(0xFE100010) and not e.decodes(0xFE000010)
    for bar in range(1, 6):
        cfg(0x10 + 4 * bar, 4, 0xFFFFFFFF)
        assert cfg(0x10 + 4 * bar) == 0             # no other BARs
    assert cfg(0x34, 1) == 0x40 and cfg(0x40, 1) == 0x05 and cfg(0x42, 2) == 0x0080     # MSI, 64-bit
    cfg(0x42, 2, 0xFFFF)
    assert cfg(0x42, 2) == 0x0081 and e.msi_enabled()
    assert host.read(0xCF8, 4) & 0xFF == 0x42       # (the address register reads back as written)


# The writable bits of each config byte (others read-only): edu's as QEMU has them, and
# those of the bridges (whole bytes)
_EDU_WRITABLE = {0x04: 0x06, 0x05: 0x04, 0x0C: 0xFF, 0x0D: 0xFF, 0x3C: 0xFF, 0x10: 0, 0x11: 0, 0x12: 0xF0,
                 0x13: 0xFF, 0x42: 0x01, 0x44: 0xFC, **{off: 0xFF for off in range(0x45, 0x4E)}}
_BRIDGE_WRITABLE = {off: 0xFF for off in (0x04, 0x05, 0x0C, 0x0D, 0x3C, *range(0x40, 0x100))}


@pytest.mark.nokvm
@pytest.mark.parametrize("which", ["edu", "bridge"])
def test_config_writes_change_only_the_writable_bits(which):
    import random
    from kvmsys.devices.pci import Q35, PciFunction
    fn = edu_mod.Edu(_Bus(), devfn=0x08, bar=0xFE000000, line=16) if which == "edu" else PciFunction(Q35[(0, 0)])
    writable = _EDU_WRITABLE if which == "edu" else _BRIDGE_WRITABLE
    rnd = random.Random(21)
    for _ in range(3000):
        size = rnd.choice((1, 2, 4))
        off = rnd.randrange(0, 257 - size) if rnd.getrandbits(1) else rnd.randrange(0, 0x50 - size)
        value = rnd.getrandbits(8 * size)
        before = bytes(fn.config)
        fn.write_config(off, size, value)
        for o in range(256):
            m = writable.get(o, 0) if off <= o < off + size else 0
            b = value >> (8 * (o - off)) & 0xFF if m else 0
            assert fn.config[o] == before[o] & ~m | b & m, (hex(off), size, hex(value), hex(o))


@pytest.mark.nokvm
def test_edu_registers_and_bounded_work():
    bus = _Bus()
    e = edu_mod.Edu(bus, devfn=0x08, bar=0xFE000000, line=16)
    e.write(0x08, 4, 10)
    assert e.read(0x08, 4) == 3628800
    e.write(0x08, 4, 0xFFFFFFFF)                    # 4 billion steps in QEMU's thread; 0 here at once
    assert e.read(0x08, 4) == 0 and edu_mod.factorial_u32(33) != 0
    assert e.read(0x00, 2) == 0xFFFF and e.read(0x80, 2) == 0xFFFF          # sizes the device has not
    e.config[4] |= 4                                # bus master
    bus.mem[0x100:0x104] = b"abcd"
    e.write(0x80, 8, 0x100)
    e.write(0x88, 8, edu_mod.DMA_START + edu_mod.DMA_SIZE - 2)     # runs past the buffer: dropped
    e.write(0x90, 8, 4)
    e.write(0x98, 4, 1 | 4)                         # with its interrupt
    assert e.dma_errors == 1 and bytes(e.buffer[-2:]) == b"\0\0" and e.read(0x24, 4) == 0x100
    assert bus.lines == [1]                         # INTx while MSI is off
    e.write(0x64, 4, 0x100)
    assert bus.lines == [1, 0]
    e.write(0x88, 8, edu_mod.DMA_START)
    e.write(0x90, 8, 1 << 40)                       # a count the buffer cannot hold: nothing, no allocation
    e.write(0x98, 4, 1)
    assert e.dma_errors == 2


@pytest.mark.nokvm
def test_dmar_table_describes_the_iommu():
    addr, blob = acpi.tables(cpus=2, iommu=vtd.BASE)
    from test_kut import parse_acpi
    mem = bytearray(0x100000)
    mem[acpi.BASE:acpi.BASE + len(blob)] = blob
    t = parse_acpi(mem)
    dmar = t[b"DMAR"][1]
    assert dmar[36] == 38 and dmar[37] & 1          # 39-bit host address width, interrupt remapping
    kind, length, flags, _, seg, base = struct.unpack_from("<HHBBHQ", dmar, 48)
    assert (kind, flags, seg, base) == (0, 1, 0, vtd.BASE) and 48 + length == len(dmar)
    assert dmar[64] == 3                            # device scope: the IOAPIC
    assert b"DMAR" not in parse_acpi(_placed(acpi.tables(cpus=2)[1]))


def _placed(blob):
    mem = bytearray(0x100000)
    mem[acpi.BASE:acpi.BASE + len(blob)] = blob
    return mem


@pytest.mark.nokvm
def test_machine_and_device_names_are_checked():
    assert q35.check("q35", ["intel-iommu", "edu"]) == ("edu", "intel-iommu")
    for machine, devices in (("q36", ()), ("pc", ("edu",)), ("q35", ("vga",)), ("q35", ("edu", "edu"))):
        with pytest.raises(InvalidArgumentError):
            q35.check(machine, devices)
    with pytest.raises(InvalidArgumentError, match="split"):
        q35.Q35Parts(FakeVm(), ram_size=RAM)
