"""QEMU's pc-testdev (``-device pc-testdev``), the ports kvm-unit-tests probes:

- 0xe0-0xe3: a 32-bit register; an access of 1, 2 or 4 bytes at 0xe0 + k reads or writes
  its bytes k.. (the emulator and realmode tests check string and plain I/O with it);
- 0xe4-0xe7: "flush page": the guest writes a page's address so that the host drops its
  mapping (eventinj uses it to make KVM fault the page in again).  Accepted and ignored:
  the guest cannot tell, only the host's page tables would differ;
- 0x2000-0x2017: one port per interrupt line (GSI 0..23); writing a nonzero value raises
  the line, zero lowers it (the ioapic test's set_irq_line), into the in-kernel irqchip
  (or the user-space IOAPIC of kvmsys.q35).

- MMIO [0xff000000, +64 KiB): memory that is not RAM, so every guest access to it exits
  (the emulator test runs instructions on it through KVM's instruction emulator)."""
from __future__ import annotations
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._core import MmioExit

from . import Device

DATA, FLUSH, IRQ_BASE, IRQ_LINES = 0xE0, 0xE4, 0x2000, 24
IOMEM, IOMEM_LEN = 0xFF000000, 0x10000


class PcTestdev(Device):
    ports = ((DATA, FLUSH + 4), (IRQ_BASE, IRQ_BASE + IRQ_LINES))
    mmio_ranges = ((IOMEM, IOMEM + IOMEM_LEN),)

    def __init__(self, irqs: Any = None) -> None:
        """*irqs*: where the lines go (``irq_line(line, level)``): the VM it is installed
        on (its in-kernel irqchip) by default, or a user-space IOAPIC (kvmsys.q35)."""
        self.flushes = 0
        self.irqs = irqs
        super().__init__()

    def _reset(self) -> None:
        self.data = 0
        self.iomem = bytearray(IOMEM_LEN)

    def mmio(self, ex: MmioExit) -> bool:
        """The MMIO window's handler: a read or write of 1..8 bytes inside it."""
        offset, n = ex.address - IOMEM, ex.length
        inside = max(0, min(n, IOMEM_LEN - offset))     # an access that runs past the end: the rest is open bus
        with self.lock:                                 # one access at a time, as through io()
            if ex.is_write:
                self.iomem[offset:offset + inside] = ex.data[:inside]
            else:
                ex.data[:n] = bytes(self.iomem[offset:offset + inside]) + b"\xff" * (n - inside)
        return False

    def read(self, port: int, size: int) -> int:
        if DATA <= port < FLUSH:
            return (self.data >> (8 * (port - DATA))) & ((1 << (8 * size)) - 1)
        return super().read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        if DATA <= port < FLUSH:
            shift = 8 * (port - DATA)
            mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF
            self.data = (self.data & ~mask) | ((value << shift) & mask)
        elif FLUSH <= port < FLUSH + 4:
            self.flushes += 1
        elif IRQ_BASE <= port < IRQ_BASE + IRQ_LINES:
            irqs = self.irqs if self.irqs is not None else self._vm     # default: the VM it is installed on
            if irqs is not None and irqs.has_irqchip:
                irqs.irq_line(port - IRQ_BASE, 1 if value else 0)
