"""PCI configuration mechanism #1 (ports 0xcf8 address, 0xcfc-0xcff data) with bus 0.

Two buses: an i440FX-like one (the default): the host bridge (8086:1237) at 00.0, the
PIIX3 ISA bridge (8086:7000) at 01.0 and the PIIX3 IDE function (8086:7010, legacy ports
0x1f0/0x3f6) at 01.1, none with BARs (firmware finds its disk controller this way:
SeaBIOS looks for ISA ATA ports only when the bus is empty); and a Q35-like one
(``Q35``): the Q35 host bridge (8086:29c0) at 00.0 and the ICH9 LPC bridge (8086:2918) at
1f.0, to which kvmsys.q35 adds its PCI devices (``PciFunction``s with BARs, MSI).

Port 0xcf9 (a byte) is the PIIX/ICH reset control register: bit 2 resets the machine."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

from . import Device

if TYPE_CHECKING:
    from .._core import MmioExit

COMMAND_MEMORY = 1 << 1             # command register: memory space decoding (BARs)

# Writable config-space bytes of the functions without BARs: command, cache line/latency,
# interrupt line, and the device-specific registers (PAM, PIRQ routing, IDE timing):
# stored, no effect.
_WRITABLE = {off: 0xFF for off in (0x04, 0x05, 0x0C, 0x0D, 0x3C, *range(0x40, 0x100))}


def _config(vendor: int, device: int, class_code: int, *, rev: int = 0, header: int = 0) -> bytearray:
    c = bytearray(256)
    c[0:2] = vendor.to_bytes(2, "little")
    c[2:4] = device.to_bytes(2, "little")
    c[8] = rev
    c[9:12] = class_code.to_bytes(3, "little")      # prog-if, subclass, class
    c[0x0E] = header
    return c


class PciFunction:
    """One function's 256-byte configuration space.  A write changes the bits that
    *write_masks* ({offset: writable bits of that byte}) names and keeps the others
    (read-only; absent offsets: all).  A function with *bar_size* has BAR 0, a 32-bit
    memory BAR of that many bytes, whose registers are ``read``/``write``.  Accesses come
    under the PCI host's lock."""
    bar_size = 0

    def __init__(self, make: Callable[[], bytearray], write_masks: Mapping[int, int] = _WRITABLE) -> None:
        self._make, self.write_masks = make, write_masks
        self.config = make()

    def reset(self) -> None:
        self.config = self._make()

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        c = self.config
        for i, b in enumerate(value.to_bytes(size, "little")):
            m = self.write_masks.get(offset + i, 0)
            if m:
                c[offset + i] = c[offset + i] & ~m | b & m

    @property
    def command(self) -> int:
        return self.read_config(4, 2)

    @property
    def bar(self) -> int:
        return self.read_config(0x10, 4) & ~0xF

    def decodes(self, address: int) -> bool:
        """Whether BAR 0 (memory decoding on) covers *address*."""
        bar = self.bar
        return bool(self.bar_size and self.command & COMMAND_MEMORY) and bar <= address < bar + self.bar_size

    def read(self, off: int, size: int) -> int:
        """A read of BAR 0's register at *off*."""
        return (1 << (8 * size)) - 1

    def write(self, off: int, size: int, value: int) -> None:
        """A write of BAR 0's register at *off*."""


I440FX = {
    (0, 0): lambda: _config(0x8086, 0x1237, 0x060000, rev=2),
    (1, 0): lambda: _config(0x8086, 0x7000, 0x060100, header=0x80),    # multi-function
    (1, 1): lambda: _config(0x8086, 0x7010, 0x010180),                # IDE, legacy mode
}
Q35 = {
    (0, 0): lambda: _config(0x8086, 0x29C0, 0x060000),                # host bridge
    (0x1F, 0): lambda: _config(0x8086, 0x2918, 0x060100, rev=2, header=0x80),    # ICH9 LPC (ISA) bridge
}


class PciHost(Device):
    ports = ((0xCF8, 0xD00),)

    def __init__(self, functions: Mapping[tuple[int, int], PciFunction | Callable[[], bytearray]] | None = None,
                 window: tuple[int, int] | None = None) -> None:
        """*functions*: {(device, function): a config-space factory or a PciFunction};
        *window*: the MMIO range where their BARs live."""
        self.mmio_ranges = (window,) if window else ()
        self.functions = {bdf: f if isinstance(f, PciFunction) else PciFunction(f)
                          for bdf, f in (I440FX if functions is None else functions).items()}
        self.request_reset = None           # set by the machine
        super().__init__()

    def _reset(self) -> None:
        self.address = 0
        self.rcr = 0
        for f in self.functions.values():
            f.reset()

    def _target(self, port: int) -> tuple[PciFunction | None, int]:
        a = self.address
        if not a & 0x80000000 or (a >> 16) & 0xFF != 0:     # disabled, or a bus other than 0
            return None, 0
        dev, fn = (a >> 11) & 0x1F, (a >> 8) & 7
        # The address's low two bits select bytes too, ORed with the data port's (as QEMU
        # does; kvm-unit-tests reads the device id at offset 2 through port 0xcfc)
        return self.functions.get((dev, fn)), (a & 0xFF) | (port - 0xCFC)

    def read(self, port: int, size: int) -> int:
        if port == 0xCF8 and size == 4:
            return self.address
        if port == 0xCF9 and size == 1:
            return self.rcr
        if port < 0xCFC:
            return (1 << (8 * size)) - 1
        fn, off = self._target(port)
        if fn is None:
            return (1 << (8 * size)) - 1                 # no device: all-ones
        return fn.read_config(off, min(size, 256 - off))

    def write(self, port: int, size: int, value: int) -> bool:
        if port == 0xCF8 and size == 4:
            self.address = value & 0x80FFFFFF
        elif port == 0xCF9 and size == 1:
            if value & 4 and self.request_reset is not None:
                return self.request_reset("0xcf9")
            self.rcr = value & 2
        elif port >= 0xCFC:
            fn, off = self._target(port)
            if fn is not None:
                n = min(size, 256 - off)
                fn.write_config(off, n, value & ((1 << (8 * n)) - 1))
        return False

    def mmio(self, ex: MmioExit) -> bool:
        """An access in the BAR window: to the BAR that decodes it, else open bus."""
        n = ex.length
        with self.lock:                     # config writes move BARs under this lock
            fn = next((f for f in self.functions.values() if f.decodes(ex.address)), None)
            if fn is None or ex.address + n > fn.bar + fn.bar_size:
                if not ex.is_write:
                    ex.data[:n] = b"\xff" * n
            elif ex.is_write:
                fn.write(ex.address - fn.bar, n, int.from_bytes(ex.data[:n], "little"))
            else:
                ex.data[:n] = fn.read(ex.address - fn.bar, n).to_bytes(n, "little")
        return False
