"""PCI configuration mechanism #1 (ports 0xcf8 address, 0xcfc-0xcff data) with an
i440FX-like bus 0: the host bridge (8086:1237) at 00.0, the PIIX3 ISA bridge
(8086:7000) at 01.0 and the PIIX3 IDE function (8086:7010, legacy ports 0x1f0/0x3f6)
at 01.1, none with BARs.  Firmware finds its disk controller this way (SeaBIOS looks
for ISA ATA ports only when the bus is empty).

Port 0xcf9 (a byte) is the PIIX reset control register: bit 2 resets the machine."""
from __future__ import annotations

from . import Device

# Writable config-space bytes: command, cache line/latency, interrupt line, and the
# device-specific registers (PAM, PIRQ routing, IDE timing): stored, no effect.
_WRITABLE = {0x04, 0x05, 0x0C, 0x0D, 0x3C} | set(range(0x40, 0x100))


def _config(vendor: int, device: int, class_code: int, *, rev: int = 0, header: int = 0) -> bytearray:
    c = bytearray(256)
    c[0:2] = vendor.to_bytes(2, "little")
    c[2:4] = device.to_bytes(2, "little")
    c[8] = rev
    c[9:12] = class_code.to_bytes(3, "little")      # prog-if, subclass, class
    c[0x0E] = header
    return c


I440FX = {
    (0, 0): lambda: _config(0x8086, 0x1237, 0x060000, rev=2),
    (1, 0): lambda: _config(0x8086, 0x7000, 0x060100, header=0x80),    # multi-function
    (1, 1): lambda: _config(0x8086, 0x7010, 0x010180),                # IDE, legacy mode
}


class PciHost(Device):
    ports = ((0xCF8, 0xD00),)

    def __init__(self, functions=None) -> None:
        self.functions = dict(I440FX if functions is None else functions)
        self.request_reset = None           # set by the machine
        super().__init__()

    def _reset(self) -> None:
        self.address = 0
        self.rcr = 0
        self.config = {bdf: make() for bdf, make in self.functions.items()}

    def _target(self, port: int):
        a = self.address
        if not a & 0x80000000 or (a >> 16) & 0xFF != 0:     # disabled, or a bus other than 0
            return None, 0
        dev, fn = (a >> 11) & 0x1F, (a >> 8) & 7
        return self.config.get((dev, fn)), (a & 0xFC) + (port - 0xCFC)

    def read(self, port: int, size: int) -> int:
        if port == 0xCF8 and size == 4:
            return self.address
        if port == 0xCF9 and size == 1:
            return self.rcr
        if port < 0xCFC:
            return (1 << (8 * size)) - 1
        cfg, off = self._target(port)
        if cfg is None:
            return (1 << (8 * size)) - 1                 # no device: all-ones
        return int.from_bytes(cfg[off:off + size], "little")

    def write(self, port: int, size: int, value: int) -> bool:
        if port == 0xCF8 and size == 4:
            self.address = value & 0x80FFFFFC
        elif port == 0xCF9 and size == 1:
            if value & 4 and self.request_reset is not None:
                return self.request_reset("0xcf9")
            self.rcr = value & 2
        elif port >= 0xCFC:
            cfg, off = self._target(port)
            if cfg is not None:
                for i, b in enumerate(value.to_bytes(size, "little")):
                    if off + i in _WRITABLE:
                        cfg[off + i] = b
        return False
