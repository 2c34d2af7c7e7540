"""ACPI fixed-hardware PM registers at the ports the FADT of kvmsys.acpi names (base
0x600, as QEMU's PIIX4): PM1a status/enable, PM1a control, and the PM timer.

- PM timer (base + 8, 4 bytes): a 24-bit counter at 3.579545 MHz from the host's
  monotonic clock (ACPI's rate; the FADT does not claim TMR_VAL_EXT).  No TMR_STS or
  SCI: no interrupt is delivered.
- PM1a_STS (base, 2 bytes): write 1 to clear; WAK_STS is set on a resume from S3.
  PM1a_EN (base + 2): read/write (RTC_EN lets the RTC alarm wake the machine from S3).
- PM1a_CNT (base + 4, 2 bytes): SCI_EN reads 1 (there is no SMI command to switch modes);
  writing SLP_EN with SLP_TYP 1 asks for S3 (suspend to RAM), SLP_TYP 0 for S5 (soft off),
  the sleep types QEMU's PIIX4 uses: *on_sleep(state)* is called with 3 or 5."""
from __future__ import annotations
from typing import Callable

import time

from . import Device

PM_TIMER_HZ = 3_579_545
TMR_MASK = 0xFFFFFF
WAK_STS, RTC_STS = 1 << 15, 1 << 10
RTC_EN = 1 << 10
SCI_EN, SLP_EN = 1 << 0, 1 << 13
SLP_TYP_SHIFT = 10
SLEEP_STATES = {1: 3, 0: 5}     # SLP_TYP -> S state


class AcpiPm(Device):
    def __init__(self, base: int = 0x600, on_sleep: Callable[[int], object] | None = None) -> None:
        self.base = base
        self.ports = ((base, base + 12),)
        self.on_sleep = on_sleep
        self.clock = time.monotonic_ns          # replaceable (tests)
        self.t0 = self.clock()
        super().__init__()

    def _reset(self) -> None:
        self.status = 0
        self.enable = 0
        self.control = SCI_EN

    def timer(self) -> int:
        return (self.clock() - self.t0) * PM_TIMER_HZ // 1_000_000_000 & TMR_MASK

    def _reg(self, offset: int) -> tuple[int, int]:
        """(register value, its first offset) of the 32-bit-aligned register at *offset*."""
        if offset < 4:
            return self.status | self.enable << 16, 0
        if offset < 8:
            return self.control, 4
        return self.timer(), 8

    def read(self, port: int, size: int) -> int:
        value, start = self._reg(port - self.base)
        return (value >> (8 * (port - self.base - start))) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> bool | None:
        offset = port - self.base
        for i in range(size):                   # byte by byte: any width at any offset
            byte = (value >> (8 * i)) & 0xFF
            o = offset + i
            if o < 2:
                self.status &= ~(byte << (8 * o))           # write 1 to clear
            elif o < 4:
                shift = 8 * (o - 2)
                self.enable = (self.enable & ~(0xFF << shift)) | byte << shift
            elif o < 6:
                shift = 8 * (o - 4)
                self.control = (self.control & ~(0xFF << shift)) | byte << shift
        self.control |= SCI_EN                  # always in ACPI mode
        if self.control & SLP_EN:
            self.control &= ~SLP_EN             # write-only: reads 0
            state = SLEEP_STATES.get((self.control >> SLP_TYP_SHIFT) & 7)
            if state is not None and self.on_sleep is not None:
                return bool(self.on_sleep(state))
        return None

    def woke(self, by_rtc: bool) -> None:
        """The machine resumed from S3: WAK_STS (and RTC_STS when the RTC alarm woke it)."""
        with self.lock:
            self.status |= WAK_STS | (RTC_STS if by_rtc else 0)
