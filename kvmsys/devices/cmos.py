"""MC146818 CMOS/RTC at ports 0x70 (index, bit 7 = NMI mask) and 0x71 (data).

The clock reads the host's time (UTC), in BCD and 24-hour mode; the update-in-progress
bit of status A is set in the last UIP_S of every second, as the MC146818 sets it before
its update (firmware waits for it to clear; kvm-unit-tests' s3 test waits for it to be
set, then clear, to time its alarm).  The alarm registers (with the don't-care values
0xC0-0xFF) are compared by ``alarm_matches`` (the ACPI PM's S3 wake-up); no IRQ 8.  The memory registers say
how much RAM the machine has, in the places PC firmware (and SeaBIOS on QEMU) reads."""
from __future__ import annotations

import time

from . import Device

REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
SHUTDOWN_STATUS = 0x0F
MB = 1 << 20
UIP, AIE = 0x80, 0x20
UIP_S = 244e-6                  # the MC146818's update cycle warning time
ALARMS = ((0x01, 0x00), (0x03, 0x02), (0x05, 0x04))    # (alarm register, the clock register it matches)


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


class Cmos(Device):
    ports = ((0x70, 0x72),)

    def __init__(self, ram_size: int, *, cpus: int = 1, below_4g: int | None = None) -> None:
        self.ram_size, self.cpus = ram_size, cpus
        self.below_4g = min(ram_size, below_4g if below_4g is not None else ram_size)
        self.time = time.time          # replaceable clock (tests)
        super().__init__()

    def _reset(self) -> None:
        self.index = 0
        self.nmi_masked = False
        ram = bytearray(128)
        ram[REG_A] = 0x26               # 32.768 kHz time base, 1024 Hz rate, UIP clear
        ram[REG_B] = 0x02               # 24-hour, BCD, no interrupts
        ram[REG_D] = 0x80               # RAM and time valid
        ram[0x10] = 0                   # no floppy drives
        ram[0x14] = 0x06                # equipment: FPU, VGA/EGA display
        ram[0x15:0x17] = (640).to_bytes(2, "little")              # base memory, KiB
        ext = min((self.below_4g - MB) // 1024, 0xFFFF)           # KiB above 1 MiB
        ram[0x17:0x19] = ram[0x30:0x32] = ext.to_bytes(2, "little")
        high = max(self.below_4g - 16 * MB, 0) // 65536           # 64 KiB units above 16 MiB
        ram[0x34:0x36] = min(high, 0xFFFF).to_bytes(2, "little")
        above = max(self.ram_size - self.below_4g, 0) // 65536    # 64 KiB units above 4 GiB
        ram[0x5B:0x5E] = above.to_bytes(3, "little")
        ram[0x5F] = self.cpus - 1       # SeaBIOS on QEMU: number of CPUs - 1
        self.ram = ram

    def _clock(self, reg: int, now: float | None = None) -> int | None:
        t = time.gmtime(self.time() if now is None else now)
        values = {0x00: t.tm_sec, 0x02: t.tm_min, 0x04: t.tm_hour, 0x06: (t.tm_wday + 1) % 7 + 1,
                  0x07: t.tm_mday, 0x08: t.tm_mon, 0x09: t.tm_year % 100, 0x32: t.tm_year // 100}
        v = values.get(reg)
        if v is None:
            return None
        return v if self.ram[REG_B] & 0x04 else _bcd(v)

    def read(self, port: int, size: int) -> int:
        if port == 0x70:
            return 0xFF
        reg = self.index
        v = self._clock(reg)
        if v is not None:
            return v
        v = self.ram[reg]
        if reg == REG_A and self.time() % 1.0 >= 1.0 - UIP_S:
            v |= UIP
        if reg == REG_C:
            self.ram[REG_C] = 0         # reading status C acknowledges its interrupt flags
        return v

    def alarm_matches(self, now: float) -> bool:
        """Whether the alarm, enabled (status B's AIE), fires at the second *now* is in."""
        if not self.ram[REG_B] & AIE:
            return False
        return all(self.ram[a] >= 0xC0 or self.ram[a] == self._clock(c, now) for a, c in ALARMS)

    def write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == 0x70:
            self.nmi_masked = bool(value & 0x80)
            self.index = value & 0x7F
        elif self.index not in (REG_C, REG_D):      # read-only status registers
            if self.index == REG_A:
                value &= 0x7F                       # UIP is read-only
            self.ram[self.index] = value
