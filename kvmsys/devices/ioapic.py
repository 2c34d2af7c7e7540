"""An IOAPIC in user space (82093AA-like, version 0x20, 24 pins) for a VM with the split
irqchip (KVM_CAP_SPLIT_IRQCHIP: local APICs in the kernel, the rest here), as QEMU's
``kernel-irqchip=split`` has it.  Why: an IOMMU's interrupt remapping must see the
IOAPIC's messages, which KVM's own IOAPIC sends to the local APICs directly.

MMIO at 0xfec00000: IOREGSEL (+0x00), IOWIN (+0x10), the EOI register (+0x40).  Registers:
0 id, 1 version (pins - 1 in bits 23:16), 2 arbitration, 0x10 + 2n / + 2n + 1 the
redirection entry of pin n.  A pin's entry becomes a message (``msi(address, data)``,
the machine's interrupt path: through the IOMMU when there is one): compatibility format
(destination, destination mode, delivery mode, vector, trigger mode), or, with bit 48 set,
VT-d's remappable format (the interrupt index in bits 63:49 and bit 11) with no
source-id, as QEMU's IOAPIC sends it.  Edge pins deliver on a rising line; a level pin
delivers while its line is high and Remote IRR is clear, sets Remote IRR, and the guest's
EOI of the entry's vector clears it (and delivers again if the line is still high).
Polarity is stored, not applied (lines here are logical: 1 is asserted).

KVM reports an EOI to user space (exit IOAPIC_EOI) only for vectors its GSI routing names
as level-triggered MSIs on the IOAPIC's pins: ``routes()`` gives those (the machine sets
them whenever an entry or the remapping changes)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..acpi import IOAPIC_ADDR
from ..msi import compat_message, remappable_address
from . import Device

if TYPE_CHECKING:
    from .._core import MmioExit

BASE, SIZE = IOAPIC_ADDR, 0x1000       # where the ACPI MADT says it is
PINS = 24
VERSION = 0x20
MASK, REMOTE_IRR, LEVEL, REMAPPABLE = 1 << 16, 1 << 14, 1 << 15, 1 << 48
_RO_BITS = REMOTE_IRR | 1 << 12             # remote IRR, delivery status: the IOAPIC's own


def message(entry: int) -> tuple[int, int]:
    """(MSI address, data) of a redirection *entry* (either format)."""
    if entry & REMAPPABLE:
        return remappable_address((entry >> 49) & 0x7FFF | ((entry >> 11) & 1) << 15), 0
    return compat_message((entry >> 56) & 0xFF, entry & 0xFF, dest_mode=(entry >> 11) & 1,
                          delivery_mode=(entry >> 8) & 7, level=bool(entry & LEVEL))


class Ioapic(Device):
    """*msi(address, data)*: deliver a message; *routes_changed()*: the level-triggered
    entries changed (see ``routes``).  Both are called without this device's lock."""
    has_irqchip = True          # an interrupt sink for kvmsys.devices.Irq
    mmio_ranges = ((BASE, BASE + SIZE),)

    def __init__(self, msi: Callable[[int, int], object], routes_changed: Callable[[], object] = lambda: None) -> None:
        self.msi, self.routes_changed = msi, routes_changed
        super().__init__()

    def _reset(self) -> None:
        self.select = 0
        self.id = 0
        self.entries = [MASK] * PINS
        self.lines = [0] * PINS

    # --- the lines ----------------------------------------------------------------
    def irq_line(self, pin: int, level: int) -> None:
        """Set input *pin* (0..23; others are no pins) to *level*."""
        if not 0 <= pin < PINS:
            return
        with self.lock:
            old, self.lines[pin] = self.lines[pin], 1 if level else 0
            e = self.entries[pin]
            send = self._service(pin) if e & LEVEL else (self.lines[pin] and not old and not e & MASK)
        if send:
            self.msi(*message(e))

    def _service(self, pin: int) -> bool:
        """A level pin: whether to deliver now (setting Remote IRR)."""
        e = self.entries[pin]
        if self.lines[pin] and e & LEVEL and not e & (MASK | REMOTE_IRR):
            self.entries[pin] = e | REMOTE_IRR
            return True
        return False

    def eoi(self, vector: int) -> None:
        """The guest ended a level-triggered interrupt of *vector* (exit IOAPIC_EOI, or the
        EOI register): Remote IRR clears on the entries with that vector."""
        send = []
        with self.lock:
            for pin, e in enumerate(self.entries):
                if e & REMOTE_IRR and e & 0xFF == vector:
                    self.entries[pin] = e & ~REMOTE_IRR
                    if self._service(pin):
                        send.append(self.entries[pin])
        for e in send:
            self.msi(*message(e))

    def routes(self) -> list[tuple[int, int, int]]:
        """(pin, MSI address, data) of each unmasked level-triggered entry."""
        with self.lock:
            return [(pin, *message(e)) for pin, e in enumerate(self.entries) if e & LEVEL and not e & MASK]

    # --- registers ----------------------------------------------------------------
    def mmio(self, ex: MmioExit) -> bool:
        off, n = ex.address - BASE, ex.length
        if ex.is_write:
            value = int.from_bytes(ex.data[:n], "little")
            if off == 0x00:
                with self.lock:
                    self.select = value & 0xFF
            elif off == 0x10 and n == 4:
                self._write_register(value)
            elif off == 0x40 and n == 4:
                self.eoi(value & 0xFF)
            return False
        value = 0xFFFFFFFF
        if off == 0x00:
            value = self.select
        elif off == 0x10 and n == 4:
            value = self._read_register()
        ex.data[:n] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little") if n <= 4 else b"\xff" * n
        return False

    def _read_register(self) -> int:
        with self.lock:
            r = self.select
            if r == 0:
                return self.id << 24
            if r == 1:
                return (PINS - 1) << 16 | VERSION
            if r == 2:
                return self.id << 24
            pin, high = divmod(r - 0x10, 2)
            if 0 <= pin < PINS:
                return (self.entries[pin] >> (32 * high)) & 0xFFFFFFFF
            return 0xFFFFFFFF

    def _write_register(self, value: int) -> None:
        send = None
        with self.lock:
            r = self.select
            if r == 0:
                self.id = (value >> 24) & 0xF
                return
            pin, high = divmod(r - 0x10, 2)
            if not 0 <= pin < PINS:
                return
            e = self.entries[pin]
            if high:
                e = (e & 0xFFFFFFFF) | value << 32
            else:
                e = (e & ~0xFFFFFFFF) | (value & ~_RO_BITS) | (e & _RO_BITS)
                if not e & LEVEL:
                    e &= ~REMOTE_IRR
            self.entries[pin] = e
            if self._service(pin):
                send = self.entries[pin]
        self.routes_changed()
        if send is not None:
            self.msi(*message(send))
