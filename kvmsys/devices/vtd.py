"""An Intel IOMMU (VT-d, version 1.0 registers) at 0xfed90000, as QEMU's ``intel-iommu``
on Q35 with ``intremap=on,eim=off``: DMA remapping (kvmsys.devices.vtd_walk), interrupt
remapping (xAPIC mode), queued invalidation, one fault recording register.

CAP: 256 domains, 39-bit address width (3-level tables), 2 MiB and 1 GiB pages, fault
recording at 0x220, no caching mode, no protected memory regions, no write buffer
flush.  ECAP: queued invalidation, interrupt remapping, pass-through; IOTLB registers at
0x200.  Nothing is cached, so every invalidation (register or queued) completes at once
with nothing to do; an interrupt-entry-cache invalidation and each change of the
remapping state make the machine recompute the IOAPIC's routes (``routes_changed``).

Global command: TE, SRTP (latches RTADDR), QIE (IQH to 0), IRE, SIRTP (latches IRTA),
CFI; each takes effect within the write.  The queue: on an IQT write, descriptors from
IQH to IQT are run (at most the queue's size, 2^QS pages of 256): context-cache, IOTLB
and interrupt-entry-cache invalidations, and invalidation waits (status write, ICS.IWC
and the invalidation event interrupt, sent only where IWC was clear).  A descriptor of
another type, reserved bits, a tail outside the queue, or a queue outside RAM set
FSTS.IQE and stop the queue there.

A refused DMA or interrupt is recorded in the fault recording register (unless its
context entry or IRTE sets FPD): FSTS.PPF, or PFO when the register is still full; the
fault event interrupt (FEDATA/FEADDR) is sent unless FECTL.IM masks it (then FECTL.IP
is set and it is sent when IM clears).  Registers are 4 or 8 bytes; other accesses read
all-ones and are dropped."""
from __future__ import annotations

import contextlib
import struct
from typing import TYPE_CHECKING, Callable, Iterator

from .. import msi
from ..errors import KvmsysError
from . import Device
from . import vtd_walk
from .vtd_walk import Fault, Read

if TYPE_CHECKING:
    from .._core import MmioExit, VmCore

BASE, SIZE = 0xFED90000, 0x1000
FRCD, IOTLB_REGS = 0x220, 0x200
VERSION = 0x10
CAP = (2 | 0x2 << 8 | (vtd_walk.AW - 1) << 16 | (FRCD // 16) << 24 | 3 << 34)
ECAP = (1 << 1 | 1 << 3 | 1 << 6 | (IOTLB_REGS // 16) << 8)
TE, SRTP, QIE, IRE, SIRTP, CFI = 1 << 31, 1 << 30, 1 << 26, 1 << 25, 1 << 24, 1 << 23
RTPS, IRTPS = SRTP, SIRTP
PFO, PPF, IQE = 1 << 0, 1 << 1, 1 << 4
FSTS_W1C = PFO | 1 << 2 | 1 << 3 | IQE | 1 << 5 | 1 << 6
IM, IP = 1 << 31, 1 << 30
FECTL, IECTL = 0x38, 0xA0             # event control registers: data at +4, address at +8

# 32-bit halves that software may write, and the bits it may: {offset: mask}
_RW = {0x20: 0xFFFFF000, 0x24: 0xFFFFFFFF, 0x3C: 0xFFFFFFFF, 0x40: 0xFFFFFFFC, 0x44: 0xFFFFFFFF,
       0x88: 0x7FFF0, 0x90: 0xFFFFF007, 0x94: 0xFFFFFFFF, 0xA4: 0xFFFFFFFF, 0xA8: 0xFFFFFFFC,
       0xAC: 0xFFFFFFFF, 0xB8: 0xFFFFF80F, 0xBC: 0xFFFFFFFF, 0x28: 0xFFFFFFFF, 0x2C: 0xFFFFFFFF,
       IOTLB_REGS: 0xFFFFF07F, IOTLB_REGS + 4: 0xFFFFFFFF, IOTLB_REGS + 8: 0xFFFFFFFF,
       IOTLB_REGS + 12: 0xFFFFFFFF}


class IntelIommu(Device):
    """*read(gpa, n)*: guest memory (None where there is no RAM); *write(gpa, data)*:
    returns False where there is no RAM; *signal(address, data)*: send an interrupt
    message of the IOMMU's own (fault and invalidation events) to the local APICs;
    *routes_changed()*: see the module doc.  The last two are called without the lock."""
    mmio_ranges = ((BASE, BASE + SIZE),)

    def __init__(self, read: Read, write: Callable[[int, bytes], bool], signal: Callable[[int, int], object],
                 routes_changed: Callable[[], object] = lambda: None) -> None:
        self.mem_read, self.mem_write, self.signal, self.routes_changed = read, write, signal, routes_changed
        self.faults = 0             # refused requests (recorded or not)
        super().__init__()

    def _reset(self) -> None:
        self.r = bytearray(0x230)
        self._put(0x00, 4, VERSION)
        self._put(0x08, 8, CAP)
        self._put(0x10, 8, ECAP)
        self._put(FECTL, 4, IM)
        self._put(IECTL, 4, IM)
        self.status = 0             # GSTS
        self.root_table = 0         # latched by SRTP
        self.irta = 0               # latched by SIRTP
        self._events: list[tuple[int, int]] = []     # interrupt messages to send once the lock is released
        self._routes_dirty = False

    def _get(self, off: int, n: int) -> int:
        return int.from_bytes(self.r[off:off + n], "little")

    def _put(self, off: int, n: int, value: int) -> None:
        self.r[off:off + n] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    # --- what devices and the IOAPIC ask -------------------------------------------
    def translate(self, sid: int, iova: int, write: bool) -> int | None:
        """The guest-physical address of a DMA access to *iova* by requester *sid*, or None
        (refused: the fault is recorded)."""
        result: int | None
        with self._locked():
            result = iova
            if self.status & TE:
                try:
                    result = vtd_walk.translate(self.mem_read, self.root_table, sid, iova, write)
                except Fault as f:
                    self._fault(f)
                    result = None
        return result

    def remap(self, address: int, data: int, sid: int | None, *, record: bool = True) -> tuple[int, int] | None:
        """(address, data) of an interrupt message after remapping, or None (refused; the
        fault is recorded when *record*).  *sid* None: no source-id (the IOAPIC)."""
        with self._locked():
            try:
                result = self._remap(address, data, sid)
            except Fault as f:
                if record:
                    self._fault(f)
                result = None
        return result

    def _remap(self, address: int, data: int, sid: int | None) -> tuple[int, int]:
        if not self.status & IRE:
            return address, data
        if not address & msi.REMAPPABLE:        # compatibility format
            if self.status & CFI:
                return address, data
            raise Fault(vtd_walk.IR_COMPAT_BLOCKED, sid or 0, 0)
        irta = self.irta
        return vtd_walk.remap(self.mem_read, irta & ~0xFFF, 2 << (irta & 0xF), address, data, sid)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The lock, and the interrupt messages queued under it (fault and invalidation
        # events) sent once it is released: never signal with the lock held
        with self.lock:
            yield
            events, self._events = self._events, []
        for address, data in events:
            self.signal(address, data)

    # --- faults -------------------------------------------------------------------
    def _fault(self, f: Fault) -> None:
        self.faults += 1
        if f.fpd:
            return
        fsts = self._get(0x34, 4)
        if self._get(FRCD + 12, 4) & (1 << 31):         # the one register is still full
            self._put(0x34, 4, fsts | PFO)
            return
        self._put(FRCD, 8, f.info)
        self._put(FRCD + 8, 8, f.sid | f.reason << 32 | (0 if f.write else 1) << 62 | 1 << 63)
        self._put(0x34, 4, (fsts | PPF) & ~0xFF00)      # FRI 0
        self._event(FECTL)

    # The fault event (FECTL, its data and address after it) and the invalidation event
    # (IECTL) work alike: sent at once, or left pending (IP) while masked (IM).
    def _event(self, ctl: int) -> None:
        control = self._get(ctl, 4)
        if control & IM:
            self._put(ctl, 4, control | IP)
        else:
            self._events.append(self._event_message(ctl))

    def _write_event_control(self, ctl: int, value: int) -> None:
        control = (self._get(ctl, 4) & IP) | (value & IM)
        if not control & IM and control & IP:   # unmasked with one pending: sent now
            control &= ~IP
            self._events.append(self._event_message(ctl))
        self._put(ctl, 4, control)

    def _event_message(self, ctl: int) -> tuple[int, int]:
        return self._get(ctl + 8, 4), self._get(ctl + 4, 4) & 0xFFFF    # (address, data)

    # --- registers ----------------------------------------------------------------
    def mmio(self, ex: MmioExit) -> bool:
        off, n = ex.address - BASE, ex.length
        with self._locked():
            if ex.is_write:
                if n in (4, 8) and off % n == 0:
                    value = int.from_bytes(ex.data[:n], "little")
                    for k in range(0, n, 4):
                        self._write32(off + k, (value >> (8 * k)) & 0xFFFFFFFF)
            elif n in (4, 8) and off % n == 0 and off + n <= len(self.r):
                value = self.status if off == 0x1C else self._get(off, n)
                if off == 0x18 and n == 8:
                    value = self._get(0x18, 4) | self.status << 32
                ex.data[:n] = value.to_bytes(n, "little")
            else:
                ex.data[:n] = b"\xff" * n
            dirty, self._routes_dirty = self._routes_dirty, False
        if dirty:
            self.routes_changed()
        return False

    def _write32(self, off: int, value: int) -> None:
        if off == 0x18:
            self._command(value)
        elif off == 0x34:
            fsts = self._get(0x34, 4) & ~(value & FSTS_W1C)
            self._put(0x34, 4, fsts)
            if value & IQE:
                self._run_queue()               # a queue stopped by an error goes on
        elif off in (FECTL, IECTL):
            self._write_event_control(off, value)
        elif off == 0x9C:
            self._put(0x9C, 4, self._get(0x9C, 4) & ~(value & 1))      # IWC: write 1 to clear
        elif off == FRCD + 12:
            if value & (1 << 31):               # F: write 1 to clear
                self._put(FRCD + 12, 4, self._get(FRCD + 12, 4) & ~(1 << 31))
                self._put(0x34, 4, self._get(0x34, 4) & ~PPF)
        elif off in _RW:
            self._put(off, 4, value & _RW[off])
            if off == 0x2C and value & (1 << 31):               # CCMD.ICC: done at once, CAIG = CIRG
                self._put(0x2C, 4, (value & 0x7FFFFFFF & ~(3 << 27)) | ((value >> 29) & 3) << 27)
            elif off == IOTLB_REGS + 12 and value & (1 << 31):  # IOTLB.IVT: the same, IAIG = IIRG
                self._put(off, 4, (value & 0x7FFFFFFF & ~(3 << 25)) | ((value >> 28) & 3) << 25)
            elif off == 0x88:
                self._run_queue()

    def _command(self, value: int) -> None:
        old = self.status
        s = old & ~(TE | QIE | IRE | CFI) | value & (TE | QIE | IRE | CFI)
        if value & SRTP:
            self.root_table = self._get(0x20, 8) & ~0xFFF
            s |= RTPS
        if value & SIRTP:
            self.irta = self._get(0xB8, 8)
            s |= IRTPS
        if s & QIE and not old & QIE:
            self._put(0x80, 8, 0)               # IQH
        self.status = s
        if (old ^ s) & (IRE | CFI) or value & SIRTP:
            self._routes_dirty = True
        if s & QIE and not old & QIE:
            self._run_queue()

    def _run_queue(self) -> None:
        """Run the descriptors from IQH to IQT (at most the queue's size)."""
        if not self.status & QIE or self._get(0x34, 4) & IQE:
            return
        iqa = self._get(0x90, 8)
        size = 256 << (iqa & 7)
        head, tail = self._get(0x80, 8) >> 4, self._get(0x88, 8) >> 4
        if tail >= size or head >= size:
            self._queue_error()
            return
        for _ in range(size):
            if head == tail:
                break
            raw = self.mem_read((iqa & ~0xFFF) + head * 16, 16)
            if raw is None or not self._descriptor(*struct.unpack("<QQ", raw)):
                self._queue_error()
                break
            head = (head + 1) % size
            self._put(0x80, 8, head << 4)

    def _queue_error(self) -> None:
        self._put(0x34, 4, self._get(0x34, 4) | IQE)
        self._event(FECTL)

    def _descriptor(self, lo: int, hi: int) -> bool:
        """Run one descriptor; False if it is invalid."""
        kind = lo & 0xF
        if lo & 0xE00:                          # type bits 11:9 (256-bit descriptors): none here
            return False
        if kind in (1, 2):                      # context cache, IOTLB: nothing cached
            return True
        if kind == 4:                           # interrupt entry cache
            self._routes_dirty = True
            return True
        if kind == 5:                           # invalidation wait
            if lo & (1 << 5):                   # SW: write the status data
                if not self.mem_write(hi & ~3, (lo >> 32).to_bytes(4, "little")):
                    return False
            if lo & (1 << 4) and not self._get(0x9C, 4) & 1:
                # IF: ICS.IWC set, and an interrupt condition only if IWC was clear (VT-d):
                # a queue of such waits is one message until the guest clears IWC
                self._put(0x9C, 4, 1)
                self._event(IECTL)
            return True
        return False


def guest_memory(vm: VmCore) -> tuple[Read, Callable[[int, bytes], bool]]:
    """(read, write) over *vm*'s RAM for the IOMMU: None / False outside a memory slot."""
    def read(gpa: int, n: int) -> bytes | None:
        try:
            return vm.read(gpa, n)
        except (KvmsysError, ValueError, OverflowError):
            return None

    def write(gpa: int, data: bytes) -> bool:
        try:
            vm.write(gpa, data)
            return True
        except (KvmsysError, ValueError, OverflowError):
            return False
    return read, write
