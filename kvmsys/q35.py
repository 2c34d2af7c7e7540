"""The Q35-like parts of a PC (``Pc(machine="q35")``, ``kvmsys run --machine q35``), as
kvm-unit-tests' intel_iommu test runs on QEMU's ``-M q35,kernel-irqchip=split -device
intel-iommu,intremap=on,eim=off -device edu``:

- the split irqchip: local APICs in KVM, the IOAPIC in user space
  (kvmsys.devices.ioapic), its interrupts sent as messages (KVM_SIGNAL_MSI) through the
  IOMMU when there is one; no PIC (so no in-kernel PIT: kvmsys's own PIT, which raises
  no interrupts, as with ``--irqchip none``);
- PCI bus 0 through configuration mechanism #1 (no MMCONFIG): the Q35 host bridge,
  the ICH9 LPC bridge at 1f.0, and the devices asked for: ``edu`` (kvmsys.devices.edu)
  at 01.0, its BAR 0 at 0xfe000000 and INTA# on IOAPIC pin 16 (PIRQA), the interrupt
  line register saying so, as firmware would have left them;
- ``intel-iommu`` (kvmsys.devices.vtd) at 0xfed90000, described by a DMAR table.

Every device's DMA and MSI go through ``Bus``: the IOMMU's translation and remapping
(with the device's requester id) when there is one, else straight to RAM and the
local APICs.  A DMA is done a page at a time, each page translated and checked to be
RAM; a refused one is dropped (and recorded as a VT-d fault)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ._core import IRQ_ROUTING
from .devices import PciHost
from .devices.edu import Edu
from .devices.ioapic import Ioapic
from .devices.pci import Q35
from .devices.vtd import BASE as _IOMMU_BASE, IntelIommu, guest_memory
from .errors import InvalidArgumentError
from .msi import halves, is_interrupt

if TYPE_CHECKING:
    from .fd import Vm

MACHINES = ("pc", "q35")
DEVICES = ("edu", "intel-iommu")
IOMMU_BASE = _IOMMU_BASE                    # where the IOMMU's registers are (the ACPI DMAR table says)
PCI_WINDOW = (0xE0000000, 0xFEC00000)       # BARs live here: RAM must end below it
EDU_DEVFN, EDU_BAR, EDU_PIN = 0x08, 0xFE000000, 16


def check(machine: str, devices: Iterable[str]) -> tuple[str, ...]:
    """Validate a machine name and its devices (InvalidArgumentError); the devices, sorted."""
    if machine not in MACHINES:
        raise InvalidArgumentError(f"machine must be one of {MACHINES}, not {machine!r}")
    devices = tuple(devices)
    for d in devices:
        if d not in DEVICES:
            raise InvalidArgumentError(f"device {d!r}: kvmsys has {', '.join(DEVICES)}")
    if len(set(devices)) != len(devices):
        raise InvalidArgumentError(f"a device given twice: {', '.join(devices)}")
    if devices and machine != "q35":
        raise InvalidArgumentError(f"{', '.join(devices)} need(s) the q35 machine")
    return tuple(sorted(devices))


class Bus:
    """The machine's side of its PCI devices (DMA, MSI, INTx) and of its IOAPIC."""

    def __init__(self, vm: Vm, ioapic_pin_of: Callable[[Any], int]) -> None:
        self.vm = vm
        self.iommu: IntelIommu | None = None
        self.ioapic: Ioapic | None = None
        self.read, self.write = guest_memory(vm)
        self.pin_of = ioapic_pin_of
        self._routes: list[tuple[int, int, int, int, int]] | None = None     # what KVM has (None: not set)
        self._routes_lock = threading.Lock()

    # --- DMA ------------------------------------------------------------------
    def _pages(self, sid: int, addr: int, n: int, write: bool) -> list[tuple[int, int]] | None:
        """[(guest-physical address, length)] of a DMA, a page at a time, or None."""
        out = []
        while n > 0:
            chunk = min(n, 0x1000 - (addr & 0xFFF))
            gpa = addr if self.iommu is None else self.iommu.translate(sid, addr, write)
            if gpa is None:
                return None
            out.append((gpa, chunk))
            addr, n = addr + chunk, n - chunk
        return out

    def dma_read(self, sid: int, addr: int, n: int) -> bytes | None:
        pages = self._pages(sid, addr, n, False)
        if pages is None:
            return None
        parts = [self.read(gpa, k) for gpa, k in pages]
        return None if any(p is None for p in parts) else b"".join(p for p in parts if p is not None)

    def dma_write(self, sid: int, addr: int, data: bytes) -> bool:
        pages = self._pages(sid, addr, len(data), True)
        if pages is None or any(self.read(gpa, k) is None for gpa, k in pages):
            return False            # checked first: a write is all or nothing
        at = 0
        for gpa, k in pages:
            self.write(gpa, data[at:at + k])
            at += k
        return True

    # --- interrupts -----------------------------------------------------------
    def _remapped(self, address: int, data: int, sid: int | None, record: bool = True) -> tuple[int, int] | None:
        """(address, data) of a message after the IOMMU's remapping (when there is one), or None."""
        return (address, data) if self.iommu is None else self.iommu.remap(address, data, sid, record=record)

    def msi(self, address: int, data: int, sid: int | None = None) -> None:
        """A message from a device (*sid*) or the IOAPIC (None): remapped, then sent."""
        out = self._remapped(address, data, sid)
        if out is not None:
            self.signal(*out)

    def signal(self, address: int, data: int) -> None:
        if is_interrupt(address):           # anything else is a memory write, not an interrupt
            low, high = halves(address)
            self.vm.signal_msi(low, data & 0xFFFFFFFF, high)

    def intx(self, device: Any, level: int) -> None:
        assert self.ioapic is not None          # set by Q35Parts before any device runs
        self.ioapic.irq_line(self.pin_of(device), level)

    def routes_changed(self) -> None:
        """Tell KVM which vectors are the IOAPIC's level-triggered ones (for their EOI
        exits): an MSI route per such pin, as remapped now (none if refused).  Every
        IOREDTBL write comes here: the VM ioctl is made only when the routes differ from
        KVM's.  Under a lock, so a route computed before another vCPU's write never
        replaces the one computed after it."""
        assert self.ioapic is not None
        with self._routes_lock:
            routes = []
            for pin, address, data in self.ioapic.routes():
                out = self._remapped(address, data, None, record=False)
                if out is not None:
                    routes.append((pin, IRQ_ROUTING["MSI"], *halves(out[0]), out[1]))
            if routes != self._routes:
                self.vm.set_gsi_routing(routes)
                self._routes = routes


class Q35Parts:
    """What ``machine="q35"`` adds to a PC on a VM with the split irqchip."""

    def __init__(self, vm: Vm, *, ram_size: int, devices: Iterable[str] = ()) -> None:
        devices = check("q35", devices)
        if not getattr(vm, "split_irqchip", False):
            raise InvalidArgumentError("the q35 machine needs a VM with the split irqchip")
        if ram_size > PCI_WINDOW[0]:
            raise InvalidArgumentError(f"the q35 machine has at most {PCI_WINDOW[0] >> 20} MiB of RAM "
                                       f"(below its PCI window), not {ram_size >> 20} MiB")
        self.bus = Bus(vm, lambda device: EDU_PIN)
        self.ioapic = Ioapic(self.bus.msi, self.bus.routes_changed)
        self.bus.ioapic = self.ioapic
        self.iommu = None
        if "intel-iommu" in devices:
            self.iommu = IntelIommu(self.bus.read, self.bus.write, self.bus.signal, self.bus.routes_changed)
            self.bus.iommu = self.iommu
        self.edu = Edu(self.bus, devfn=EDU_DEVFN, bar=EDU_BAR, line=EDU_PIN) if "edu" in devices else None
        functions: dict[tuple[int, int], Any] = dict(Q35)
        if self.edu is not None:
            functions[(EDU_DEVFN >> 3, EDU_DEVFN & 7)] = self.edu
        self.pci = PciHost(functions, window=PCI_WINDOW)
        self.devices = [self.pci, self.ioapic] + ([self.iommu] if self.iommu else [])

    def eoi(self, vector: int) -> None:
        self.ioapic.eoi(vector)
