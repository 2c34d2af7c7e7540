"""The i8042 keyboard controller (ports 0x60 data, 0x64 status/command) with a keyboard
that answers its commands but never types, and the PS/2 system control port 0x92.

Resets: command 0xFE (pulse the reset line) or writing the output port with bit 0
clear; port 0x92 bit 0 going 0 -> 1.  The A20 bits are stored but A20 is never masked
(the address line stays enabled, as after every modern firmware's first steps)."""
from __future__ import annotations

import collections

from . import Device

OBF, SYS, CMD = 0x01, 0x04, 0x08
# Bytes the controller holds for the guest to read: a real i8042 holds one, QEMU's PS/2
# queue 16; replies beyond that are lost, as QEMU drops them (the guest reads too slowly).
OUT_MAX = 16
ACK, SELF_TEST_OK, KBD_RESET_OK = 0xFA, 0x55, 0xAA


class I8042(Device):
    ports = ((0x60, 0x61), (0x64, 0x65))

    def __init__(self) -> None:
        self.request_reset = None           # set by the machine
        super().__init__()

    def _reset(self) -> None:
        self.out: collections.deque[int] = collections.deque()     # at most OUT_MAX
        self.ctr = 0x45                     # keyboard interrupt on, system flag, translation
        self.status = 0
        self.pending: int | None = None     # the controller command whose data byte comes next
        self.kbd_arg = False                # the keyboard waits for a command's argument
        self.outport = 0x03                 # reset line high (inactive), A20 on

    def read(self, port: int, size: int) -> int:
        if port == 0x64:
            return self.status | (OBF if self.out else 0) | (self.ctr & SYS)
        return self.out.popleft() if self.out else 0

    def write(self, port: int, size: int, value: int) -> bool:
        value &= 0xFF
        if port == 0x64:
            self.status |= CMD
            return self._command(value)
        self.status &= ~CMD
        if self.pending is not None:
            cmd, self.pending = self.pending, None
            if cmd == 0x60:
                self.ctr = value
            elif cmd == 0xD1:
                self.outport = value
                if not value & 1:
                    return self._pulse_reset("i8042 output port")
            elif cmd == 0xD2:
                self._put(value)      # "write keyboard output buffer": echoes it
            return False                    # 0xD3/0xD4 (mouse): no mouse
        self._keyboard(value)
        return False

    def _command(self, cmd: int) -> bool:
        if cmd == 0x20:
            self._put(self.ctr)
        elif cmd in (0x60, 0xD1, 0xD2, 0xD3, 0xD4):
            self.pending = cmd
        elif cmd == 0xAA:
            self._put(SELF_TEST_OK)
        elif cmd in (0xAB, 0xA9):
            self._put(0x00)           # interface test passed
        elif cmd == 0xD0:
            self._put(self.outport)
        elif cmd == 0xFE or (cmd & 0xF0 == 0xF0 and not cmd & 1):
            return self._pulse_reset("i8042 0xfe")    # pulse output bit 0: the CPU reset line
        return False

    def _put(self, *data: int) -> None:
        for b in data:
            if len(self.out) < OUT_MAX:
                self.out.append(b)

    def _keyboard(self, byte: int) -> None:
        if self.kbd_arg:                    # argument of LEDs, typematic rate, scan code set
            self.kbd_arg = False
            self._put(ACK)
        elif byte == 0xFF:
            self._put(ACK, KBD_RESET_OK)
        elif byte == 0xF2:
            self._put(ACK, 0xAB, 0x83)  # MF2 keyboard id
        elif byte in (0xED, 0xF0, 0xF3):
            self.kbd_arg = True
            self._put(ACK)
        elif byte == 0xEE:
            self._put(0xEE)           # echo
        else:
            self._put(ACK)

    def _pulse_reset(self, why: str) -> bool:
        return bool(self.request_reset(why)) if self.request_reset is not None else False


class Port92(Device):
    """System control port A: bit 0 (0 -> 1) resets the machine, bit 1 is A20."""
    ports = ((0x92, 0x93),)

    def __init__(self) -> None:
        self.request_reset = None
        super().__init__()

    def _reset(self) -> None:
        self.value = 0x02

    def read(self, port: int, size: int) -> int:
        return self.value

    def write(self, port: int, size: int, value: int) -> bool:
        rising = value & 1 and not self.value & 1
        self.value = value & 0x02
        if rising and self.request_reset is not None:
            return bool(self.request_reset("port 0x92"))
        return False
