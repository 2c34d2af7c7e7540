"""PC devices for real firmware, one small class each.

A device owns port ranges and answers the accesses KVM returns for them.  Hot
paths stay in the C run loop (debugcon is a console sink with a read-back value,
no exit reaches Python); the rest are Python handlers, which cost a few µs more
per access than a C one and are used where firmware touches a port rarely.

Each device has ``reset()`` (power-on state), and ``install(vm)`` adds its
handlers to a VM (either ABI) and returns their indexes (``uninstall`` removes
them).  A handler that needs the machine's attention (a reset request) returns
True from ``write``: the vCPU's ``run()`` then returns and the runner looks at
``Machine.pending``.  Accesses reach ``read``/``write`` one element at a time, decoded by
the run loop (``AccessOps``), unless the device takes whole strings in its own ``_io``.

Each access is handled under the device's lock (``Device.lock``), as a device on a real
bus sees one access at a time: vCPU threads (and host threads feeding input) never
interleave inside one device, also where a handler lets the GIL go (file I/O, ioctls).
State held for the guest is bounded as the hardware bounds it (a FIFO's size), never
by a count or length the guest chose.
"""
from __future__ import annotations
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from .._core import IoExit, MmioExit, VmCore

import threading

from .._core import AccessOps
from ..enums import Kind, Space

PIO = Space.PIO


class Device:
    """A device answering port accesses (and MMIO accesses, in ``mmio``) from Python."""
    ports: tuple[tuple[int, int], ...] = ()     # [start, end) ranges
    mmio_ranges: tuple[tuple[int, int], ...] = ()   # [start, end) guest-physical ranges ``mmio`` handles

    def __init__(self) -> None:
        self._handlers: list[int] = []
        self._vm: VmCore | None = None
        self.lock = threading.RLock()      # one access at a time (re-entrant: reset() in a write)
        self.reset()

    def reset(self) -> None:
        """Back to the power-on state (subclasses: _reset, run under the lock)."""
        with self.lock:
            self._reset()

    def _reset(self) -> None:
        pass

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1            # nothing there: all-ones, like an open bus

    def write(self, port: int, size: int, value: int) -> bool | None:
        """Handle a write; return True to make the vCPU's run() return (the machine must act)."""
        return None

    def io(self, ex: IoExit) -> bool:
        """The Python handler KVM's exits reach: one access, under the device's lock."""
        with self.lock:
            return self._io(ex)

    def _io(self, ex: IoExit) -> bool:
        """Every element of a (string) port access (subclasses may take a whole string)."""
        size, count, data, port = ex.size, ex.count, ex.data, ex.port
        if ex.is_in:
            mask = (1 << (8 * size)) - 1
            for i in range(count):
                data[i * size:(i + 1) * size] = (self.read(port, size) & mask).to_bytes(size, "little")
            return False
        stop = False
        for i in range(count):
            stop = bool(self.write(port, size, int.from_bytes(data[i * size:(i + 1) * size], "little"))) or stop
        return stop

    def mmio(self, ex: MmioExit) -> bool:
        """The Python handler of an access in ``mmio_ranges`` (the subclass takes its lock)."""
        raise NotImplementedError

    def _read_locked(self, port: int, size: int) -> int:
        with self.lock:
            return self.read(port, size) & ((1 << (8 * size)) - 1)

    def _write_locked(self, port: int, size: int, value: int) -> bool | None:
        with self.lock:
            return self.write(port, size, value)

    def install(self, vm: VmCore) -> list[int]:
        self._vm = vm
        # A device that takes accesses one element at a time gets them decoded by the run
        # loop (AccessOps: no exit object, about half the cost per access); one that takes
        # a whole string at once (its own _io) gets the exit
        ports: Callable[..., object] | AccessOps = self.io
        if type(self)._io is Device._io:
            ports = AccessOps(self._read_locked, self._write_locked)
        self._handlers = [vm.add_handler(PIO, start, end, Kind.PYTHON, 0, ports)
                          for start, end in self.ports]
        self._handlers += [vm.add_handler(Space.MMIO, start, end, Kind.PYTHON, 0, self.mmio)
                           for start, end in self.mmio_ranges]
        return self._handlers

    def uninstall(self) -> None:
        for h in self._handlers:
            assert self._vm is not None         # handlers only after install()
            self._vm.remove_handler(h)
        self._handlers = []


class IrqSink(Protocol):
    """Where Irq lines go: a VM (its in-kernel irqchip, when it has one) or a user-space IOAPIC."""
    @property
    def has_irqchip(self) -> int: ...
    def irq_line(self, irq: int, level: int, /) -> object: ...


class Irq:
    """An ISA interrupt line: into the in-kernel PIC/IOAPIC when the VM has one, else nowhere
    (firmware without an interrupt controller polls)."""

    def __init__(self, vm: IrqSink | None, line: int) -> None:
        self.vm, self.line, self.level = vm, line, 0

    def set(self, level: int) -> None:
        level = 1 if level else 0
        if level != self.level:
            self.level = level
            if self.vm is not None and self.vm.has_irqchip:
                self.vm.irq_line(self.line, level)


from .acpipm import AcpiPm               # noqa: E402  (the classes above come first)
from .ata import AtaDisk                 # noqa: E402
from .cmos import Cmos                   # noqa: E402
from .debugcon import Debugcon           # noqa: E402
from .edu import Edu                     # noqa: E402
from .fwcfg import FwCfg                 # noqa: E402
from .i8042 import I8042, Port92         # noqa: E402
from .ioapic import Ioapic               # noqa: E402
from .pci import PciHost                 # noqa: E402
from .pit import Pit                     # noqa: E402
from .testdev import PcTestdev           # noqa: E402
from .uart import Uart8250               # noqa: E402
from .vtd import IntelIommu              # noqa: E402

__all__ = ["Device", "Irq", "AcpiPm", "AtaDisk", "Cmos", "Debugcon", "Edu", "FwCfg", "I8042", "IntelIommu",
           "Ioapic", "Port92", "PciHost", "PcTestdev", "Pit", "Uart8250"]
