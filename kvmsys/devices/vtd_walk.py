"""The table walks of the Intel IOMMU (kvmsys.devices.vtd), as pure functions over a
guest-memory reader ``read(gpa, n) -> bytes | None`` (None: not RAM).

Everything they read is the guest's, so each entry is checked before it is used: present
bits, reserved fields, the address width, and that each table lies in RAM.  A walk ends
in a result or a ``Fault`` (a VT-d fault reason, Intel VT-d spec appendix A), never in an
exception; it reads at most 2 + 3 entries (DMA) or one (interrupts), whatever the guest
wrote.  Nothing is cached, so no invalidation can be missed.

DMA: legacy-mode root table (256 entries) -> context table (256) -> a 3-level
second-level page table (39-bit address width, the only one CAP.SAGAW offers), with
2 MiB and 1 GiB pages; context translation type 0 (untranslated requests), 2 (pass-through).
Interrupts: the remapping table's 128-bit entries, xAPIC mode (EIME off): fixed-format
IRTEs only (no posted interrupts), with source-id verification."""
from __future__ import annotations

import struct
from typing import Callable

from .. import msi
from ..acpi import DMAR_HAW

Read = Callable[[int, int], "bytes | None"]     # guest memory: (gpa, n) -> bytes, None outside RAM

AW = 39                                     # input address width (3 levels)
HAW = DMAR_HAW                              # host address width (addresses in entries), as the DMAR says
_ADDR = ((1 << HAW) - 1) & ~0xFFF
_ABOVE_HAW = ((1 << 52) - 1) & ~((1 << HAW) - 1)     # address bits 51:HAW of an entry (63:52: ignored)
# fault reasons
ROOT_NOT_PRESENT, CONTEXT_NOT_PRESENT, CONTEXT_INVALID, ADDRESS_BEYOND_AW = 0x1, 0x2, 0x3, 0x4
WRITE_DENIED, READ_DENIED, PAGE_TABLE_ERROR, ROOT_TABLE_ERROR, CONTEXT_TABLE_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ROOT_RESERVED, CONTEXT_RESERVED, PTE_RESERVED = 0xA, 0xB, 0xC
IR_REQUEST_RESERVED, IR_INDEX_BEYOND, IRTE_NOT_PRESENT, IRT_ERROR = 0x20, 0x21, 0x22, 0x23
IRTE_RESERVED, IR_COMPAT_BLOCKED, IR_SID_MISMATCH = 0x24, 0x25, 0x26
_SQ_MASKS = (0xFFFF, 0xFFFB, 0xFFF9, 0xFFF8)


class Fault(Exception):
    """A translation or remapping that the IOMMU refuses: *reason*, the request's *sid*,
    *info* (the page address of a DMA, the interrupt index << 48), *fpd* (the entry said
    not to record it), *write* (a DMA write)."""

    def __init__(self, reason: int, sid: int, info: int, *, fpd: bool = False, write: bool = False):
        super().__init__(f"VT-d fault {reason:#x} sid {sid:#06x} info {info:#x}")
        self.reason, self.sid, self.info, self.fpd, self.write = reason, sid, info, fpd, write


def _q(read: Read, gpa: int, n: int, reason: int, fault: Callable[[int], Fault]) -> tuple[int, ...]:
    data = read(gpa, 8 * n)
    if data is None or len(data) != 8 * n:
        raise fault(reason)
    return struct.unpack(f"<{n}Q", data)


def translate(read: Read, root_table: int, sid: int, iova: int, write: bool) -> int:
    """The guest-physical address DMA request (*sid*, *iova*, *write*) reaches, through
    the tables at *root_table*; raises Fault."""
    fpd = False
    page = iova & ~0xFFF

    def fault(reason: int) -> Fault:
        return Fault(reason, sid, page, fpd=fpd, write=write)
    lo, hi = _q(read, root_table + (sid >> 8) * 16, 2, ROOT_TABLE_ERROR, fault)
    if not lo & 1:
        raise fault(ROOT_NOT_PRESENT)
    if lo & 0xFFE or lo & _ABOVE_HAW or hi:
        raise fault(ROOT_RESERVED)
    lo, hi = _q(read, (lo & _ADDR) + (sid & 0xFF) * 16, 2, CONTEXT_TABLE_ERROR, fault)
    if not lo & 1:
        raise fault(CONTEXT_NOT_PRESENT)
    fpd = bool(lo & 2)
    if lo & 0xFF0 or lo & _ABOVE_HAW or hi & 0x80 or hi >> 24:
        raise fault(CONTEXT_RESERVED)
    tt = (lo >> 2) & 3
    if iova >> AW:
        raise fault(ADDRESS_BEYOND_AW)
    if tt == 2:                                 # pass-through
        return iova
    if tt != 0 or hi & 7 != 1:                  # device-TLB (no ATS here), reserved; AW other than 39 bits
        raise fault(CONTEXT_INVALID)
    table, perms = lo & _ADDR, 3
    for level in (3, 2, 1):
        (pte,) = _q(read, table + ((iova >> (12 + 9 * (level - 1))) & 0x1FF) * 8, 1, PAGE_TABLE_ERROR, fault)
        perms &= pte & 3
        if not pte & 3:
            raise fault(WRITE_DENIED if write else READ_DENIED)
        if pte & _ABOVE_HAW:                    # an address beyond what the IOMMU can reach
            raise fault(PTE_RESERVED)
        size = 1 << (12 + 9 * (level - 1))
        if level == 1 or pte & 0x80:            # a 4 KiB page, or a 2 MiB / 1 GiB one
            if pte & (size - 1) & _ADDR:
                raise fault(PTE_RESERVED)       # a large page's address not aligned to its size
            if not perms & (2 if write else 1):
                raise fault(WRITE_DENIED if write else READ_DENIED)
            return (pte & _ADDR & ~(size - 1)) | (iova & (size - 1))
        table = pte & _ADDR
    raise AssertionError("unreachable")


def remap(read: Read, irta: int, entries: int, address: int, data: int, sid: int | None) -> tuple[int, int]:
    """(MSI address, data) of a remappable-format interrupt request, through the
    remapping table at *irta* of *entries* entries; raises Fault.  *sid* None: a request
    without a source-id (the IOAPIC's, as QEMU sends them), which is not verified."""
    index = msi.handle(address)
    if address & msi.SHV:                       # the subhandle in the data adds to the handle
        index = (index + (data & 0xFFFF)) & 0xFFFF
    fpd = False

    def fault(reason: int) -> Fault:
        return Fault(reason, 0 if sid is None else sid, index << 48, fpd=fpd)
    if address & 3 or address >> 32 or (address & msi.SHV and data >> 16):
        raise fault(IR_REQUEST_RESERVED)
    if index >= entries:
        raise fault(IR_INDEX_BEYOND)
    lo, hi = _q(read, irta + index * 16, 2, IRT_ERROR, fault)
    if not lo & 1:
        raise fault(IRTE_NOT_PRESENT)
    fpd = bool(lo & 2)
    svt, sq, esid = (hi >> 18) & 3, (hi >> 16) & 3, hi & 0xFFFF
    # reserved: 14:12, 15 (IM: posted, not offered), 31:24, xAPIC destination's 39:32 and 63:48, 127:84
    if lo & 0xFF00F000 or lo & 0xFFFF00FF00000000 or hi >> 20 or svt == 3:
        raise fault(IRTE_RESERVED)
    if sid is not None:
        if svt == 1 and sid & _SQ_MASKS[sq] != esid & _SQ_MASKS[sq]:
            raise fault(IR_SID_MISMATCH)
        if svt == 2 and not esid >> 8 <= sid >> 8 <= esid & 0xFF:
            raise fault(IR_SID_MISMATCH)
    dest, dm, rh, tm, dlm, vector = (lo >> 40) & 0xFF, (lo >> 2) & 1, (lo >> 3) & 1, (lo >> 4) & 1, \
        (lo >> 5) & 7, (lo >> 16) & 0xFF
    return msi.compat_message(dest, vector, dest_mode=dm, redirection_hint=rh, delivery_mode=dlm, level=bool(tm))
