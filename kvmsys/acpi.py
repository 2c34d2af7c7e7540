"""ACPI tables for a kernel booted without firmware (kvmsys.loaders): what a guest finds
by scanning for the RSDP in [0xE0000, 1 MiB) as on a PC, and what kvmsys provides
behind it: RSDT -> FADT (-> FACS, DSDT) and MADT.

The FADT (revision 1 layout, 116 bytes) names the PM registers of
kvmsys.devices.acpipm (PM1a event and control blocks, the 24-bit PM timer), SCI on
IRQ 9 and no SMI command port (the machine is always in ACPI mode).  The FACS holds the
waking vector a guest sets before S3.  The DSDT is an empty definition block.  The MADT
lists one local APIC per vCPU (APIC id = vCPU id), the IOAPIC and the ISA IRQ 0 -> GSI 2
override, as KVM's in-kernel irqchip wires them (and kvmsys.q35's user-space IOAPIC).  A
machine with an Intel IOMMU (kvmsys.q35) also gets a DMAR table.  Every table's checksum
makes its bytes sum to 0 mod 256 (the RSDP's over its first 20 bytes)."""
from __future__ import annotations

import struct

from .errors import ArgumentTypeError, InvalidArgumentError

BASE = 0xF0000                  # tables in [BASE, BASE + SIZE): reserved in the loader's memory map
SIZE = 0x10000
FACS = BASE                     # the first table tables() lays out (64-byte aligned)
OEM_ID, OEM_TABLE_ID = b"KVMSYS", b"KVMSYSPC"
PM_BASE = 0x600                 # PM1a_EVT (4 bytes), PM1a_CNT at +4 (2), PM_TMR at +8 (4): as QEMU's PIIX4
SCI_IRQ = 9
LAPIC_ADDR, IOAPIC_ADDR = 0xFEE00000, 0xFEC00000
MAX_CPUS = 255


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes *data* plus it sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _table(sig: bytes, body: bytes, revision: int = 1) -> bytes:
    header = struct.pack("<4sIBB6s8sI4sI", sig, 36 + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                         b"KVMS", 1)
    t = bytearray(header + body)
    t[9] = checksum(t)
    return bytes(t)


def _fadt(facs: int, dsdt: int, pm_base: int) -> bytes:
    body = bytearray(116 - 36)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)
    put(36, "<II", facs, dsdt)
    put(46, "<H", SCI_IRQ)
    put(56, "<I", pm_base)              # PM1a_EVT_BLK
    put(64, "<I", pm_base + 4)          # PM1a_CNT_BLK
    put(76, "<I", pm_base + 8)          # PM_TMR_BLK
    put(88, "<BBBB", 4, 2, 0, 4)        # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    put(96, "<HH", 101, 1001)           # no C2, no C3 (latencies above their limits)
    put(109, "<H", 1 << 0)              # IAPC_BOOT_ARCH: legacy devices (CMOS, PIT, i8042)
    put(112, "<I", (1 << 0) | (1 << 2) | (1 << 5))     # WBINVD, PROC_C1, SLP_BUTTON (no button)
    return _table(b"FACP", bytes(body))


def _madt(cpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_ADDR, 1)                                   # PCAT_COMPAT: 8259s present
    for i in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)                          # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, 0, 0, IOAPIC_ADDR, 0)                # IOAPIC id 0, GSI base 0
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)                          # ISA IRQ 0 -> GSI 2
    body += struct.pack("<BBBBIH", 2, 10, 0, SCI_IRQ, SCI_IRQ, 0x000D)         # SCI: level, active high
    return _table(b"APIC", body, revision=1)


DMAR_HAW = 39                   # the IOMMU's host address width (kvmsys.devices.vtd_walk walks with it)
IOAPIC_SID = 0xFF00             # the IOAPIC's requester id in the DMAR's device scope (bus 0xff, 00.0)


def _dmar(iommu_base: int) -> bytes:
    """One DRHD for every PCI device (INCLUDE_PCI_ALL) at *iommu_base*, interrupt
    remapping on, x2APIC mode opted out (no EIM), the IOAPIC in its device scope."""
    scope = struct.pack("<BBHBBBB", 3, 8, 0, 0, IOAPIC_SID >> 8, (IOAPIC_SID >> 3) & 0x1F, IOAPIC_SID & 7)
    drhd = struct.pack("<HHBBHQ", 0, 16 + len(scope), 1, 0, 0, iommu_base) + scope
    return _table(b"DMAR", struct.pack("<BB10x", DMAR_HAW - 1, 0b11) + drhd, revision=1)


def tables(*, cpus: int, pm_base: int = PM_BASE, base: int = BASE, iommu: int | None = None) -> tuple[int, bytes]:
    """(the guest-physical address of the RSDP, the bytes to place at *base*): every table
    laid out from *base*, the FACS 64-byte aligned, the RSDP 16-byte aligned below 1 MiB.
    *iommu*: the register base of an Intel IOMMU to describe in a DMAR table."""
    if not isinstance(cpus, int) or isinstance(cpus, bool):
        raise ArgumentTypeError(f"cpus must be an int, not {type(cpus).__name__}")
    if not 1 <= cpus <= MAX_CPUS:
        raise InvalidArgumentError(f"ACPI tables for 1 .. {MAX_CPUS} CPUs, not {cpus}")
    if base % 64 or not 0xE0000 <= base or base + SIZE > 0x100000:
        raise InvalidArgumentError(f"ACPI tables at {base:#x}: expected a 64-byte aligned address in "
                                   "[0xE0000, 1 MiB - 64 KiB]")
    blob = bytearray()

    def place(data: bytes, align: int = 16) -> int:
        blob.extend(bytes(-len(blob) % align))
        addr = base + len(blob)
        blob.extend(data)
        return addr
    facs = place(struct.pack("<4sIIIIIQB31x", b"FACS", 64, 0, 0, 0, 0, 0, 1), align=64)
    dsdt = place(_table(b"DSDT", b"", revision=1))
    fadt = place(_fadt(facs, dsdt, pm_base))
    entries = [fadt, place(_madt(cpus))]
    if iommu is not None:
        entries.append(place(_dmar(iommu)))
    rsdt = place(_table(b"RSDT", struct.pack(f"<{len(entries)}I", *entries)))
    rsdp = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt))
    rsdp[8] = checksum(rsdp)
    addr = place(bytes(rsdp))
    assert len(blob) <= SIZE
    return addr, bytes(blob)
