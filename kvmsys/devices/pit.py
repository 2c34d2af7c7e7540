"""Intel 8254 PIT (ports 0x40-0x43) and the port-0x61 bits that reach it, in Python.

Counters follow the host's monotonic clock at 1.193182 MHz, so firmware that measures
time with them (SeaBIOS calibrates the TSC on channel 2, gated through port 0x61) sees
real time.  Without an interrupt controller nothing delivers channel 0's IRQ 0; with
the in-kernel irqchip, use KVM's in-kernel PIT instead of this class."""
from __future__ import annotations

import time

from . import Device

HZ = 1193182


class _Channel:
    def __init__(self) -> None:
        self.mode = 0
        self.access = 3            # 1: low byte, 2: high byte, 3: low then high
        self.reload = 0x10000
        self.start: int | None = None          # ns when counting began (None: not counting)
        self.latch: list[int] = []
        self.write_lo: int | None = None
        self.read_hi = False       # access 3: the next read returns the high byte

    def elapsed(self, now: int) -> int:
        return 0 if self.start is None else (now - self.start) * HZ // 1_000_000_000

    def count(self, now: int) -> int:
        n = self.elapsed(now)
        if self.mode in (2, 3):                     # periodic
            return self.reload - n % self.reload
        return (self.reload - n) & 0xFFFF           # one-shot: wraps past 0

    def out(self, now: int) -> bool:
        n = self.elapsed(now)
        if self.start is None:
            return False
        if self.mode in (0, 1):
            return n >= self.reload
        if self.mode == 3:
            return n % self.reload < self.reload // 2
        return n % self.reload != self.reload - 1


class Pit(Device):
    ports = ((0x40, 0x44), (0x61, 0x62))

    def __init__(self) -> None:
        self.clock = time.monotonic_ns     # replaceable clock (tests)
        super().__init__()

    def _reset(self) -> None:
        self.ch = [_Channel() for _ in range(3)]
        self.port61 = 0
        self.refresh = False

    def read(self, port: int, size: int) -> int:
        now = self.clock()
        if port == 0x61:
            self.refresh = not self.refresh        # bit 4 toggles, as DRAM refresh does
            return (self.port61 & 0x0F) | (0x10 if self.refresh else 0) | (0x20 if self.ch[2].out(now) else 0)
        if port == 0x43:
            return 0xFF
        c = self.ch[port - 0x40]
        if c.latch:
            return c.latch.pop(0)
        v = c.count(now) & 0xFFFF
        if c.access == 1:
            return v & 0xFF
        if c.access == 2:
            return v >> 8
        c.read_hi = not c.read_hi
        return v & 0xFF if c.read_hi else v >> 8

    def _latch(self, c: _Channel, now: int) -> None:
        v = c.count(now) & 0xFFFF
        c.latch = [v & 0xFF, v >> 8] if c.access == 3 else [v & 0xFF if c.access == 1 else v >> 8]

    def write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        now = self.clock()
        if port == 0x61:
            gate_rises = value & 1 and not self.port61 & 1
            self.port61 = value & 0x0F
            if gate_rises and self.ch[2].mode in (1, 5):
                self.ch[2].start = now             # gate-triggered modes start on the rising edge
            return
        if port == 0x43:
            sel = value >> 6
            if sel == 3:                            # read-back: latch the selected counters
                for i in range(3):
                    if value & (2 << i) and not value & 0x20:
                        self._latch(self.ch[i], now)
                return
            c = self.ch[sel]
            if (value >> 4) & 3 == 0:
                self._latch(c, now)
                return
            c.access = (value >> 4) & 3
            c.mode = (value >> 1) & 7
            if c.mode > 5:
                c.mode &= 3
            c.start, c.latch, c.write_lo, c.read_hi = None, [], None, False
            return
        c = self.ch[port - 0x40]
        if c.access == 3 and c.write_lo is None:
            c.write_lo = value
            return
        if c.access == 3 and c.write_lo is not None:
            reload = c.write_lo | (value << 8)
            c.write_lo = None
        elif c.access == 1:
            reload = value
        else:
            reload = value << 8
        c.reload = reload or 0x10000
        c.start = now
