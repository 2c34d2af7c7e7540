"""An 8250/16550 UART (COM1 at 0x3f8): enough to be detected, to transmit and to receive.

Transmitted bytes are collected in ``output`` and passed to ``sink`` (a callable, e.g.
the terminal).  ``feed(data)`` queues received bytes (from any thread); with the in-kernel
irqchip the UART raises its IRQ (4 for COM1) for received data and for an empty
transmitter when the guest enabled those interrupts and OUT2, as a PC's does.

The receive queue holds what a 16550 holds: 16 bytes with the FIFO on, 1 without; a
byte the guest sends itself in loopback mode finds it full is lost and sets the overrun
bit (LSR.OE), as on the chip.  Bytes typed on the host wait in a queue of RX_HOST_MAX."""
from __future__ import annotations

import collections
from typing import Callable

from . import Device, Irq

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
IER_RDA, IER_THRE = 0x01, 0x02
IIR_NONE, IIR_THRE, IIR_RDA = 0x01, 0x02, 0x04
MCR_OUT2, MCR_LOOP = 0x08, 0x10
OUTPUT_MAX = 16 << 20
FIFO_SIZE = 16              # the 16550's receive FIFO (1 byte, the RBR, with the FIFO off)
RX_HOST_MAX = 64 << 10      # typed-ahead bytes from the host the guest has not read yet


class Uart8250(Device):

    def __init__(self, base: int = 0x3F8, irq: Irq | None = None,
                 sink: Callable[[bytes], object] | None = None) -> None:
        self.base = base
        self.ports = ((base, base + 8),)
        self.irq = irq or Irq(None, 4)
        self.sink = sink
        self.output = bytearray()
        self.rx: collections.deque[int] = collections.deque()
        super().__init__()

    def _reset(self) -> None:
        self.ier = self.lcr = self.mcr = self.scr = 0
        self.dll, self.dlm = 12, 0          # 9600 baud
        self.fcr = 0
        self.thr_irq = False                # "transmitter empty" interrupt pending
        self.overrun = False                # LSR.OE: a received byte was lost
        self.rx.clear()
        self._update()

    def feed(self, data: bytes) -> None:
        """Bytes arriving on the serial line (callable from any thread)."""
        with self.lock:
            room = RX_HOST_MAX - len(self.rx)
            self.rx.extend(data[:max(room, 0)])
            self.overrun = self.overrun or len(data) > room
            self._update()

    def _receive_loopback(self, byte: int) -> None:
        if len(self.rx) < (FIFO_SIZE if self.fcr & 1 else 1):
            self.rx.append(byte)
        else:
            self.overrun = True

    def _update(self) -> None:
        pending = bool(self.ier & IER_RDA and self.rx) or bool(self.ier & IER_THRE and self.thr_irq)
        self.irq.set(pending and bool(self.mcr & MCR_OUT2))

    def _iir(self) -> int:
        fifo = 0xC0 if self.fcr & 1 else 0
        if self.ier & IER_RDA and self.rx:
            return fifo | IIR_RDA
        if self.ier & IER_THRE and self.thr_irq:
            return fifo | IIR_THRE
        return fifo | IIR_NONE

    def read(self, port: int, size: int) -> int:
        reg = port - self.base
        if reg == RBR_THR:
            if self.lcr & 0x80:
                return self.dll
            v = self.rx.popleft() if self.rx else 0
            self._update()
            return v
        if reg == IER:
            return self.dlm if self.lcr & 0x80 else self.ier
        if reg == IIR_FCR:
            v = self._iir()
            if v & 0x0F == IIR_THRE:
                self.thr_irq = False        # reading IIR acknowledges "transmitter empty"
                self._update()
            return v
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            oe, self.overrun = self.overrun, False      # reading LSR clears OE
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0) | (LSR_OE if oe else 0)
        if reg == MSR:
            if self.mcr & MCR_LOOP:         # loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
                m = self.mcr
                return ((m & 2) << 3) | ((m & 1) << 5) | ((m & 4) << 4) | ((m & 8) << 4)
            return 0xB0                     # DCD, DSR, CTS: a terminal is attached
        return self.scr

    def write(self, port: int, size: int, value: int) -> None:
        reg = port - self.base
        value &= 0xFF
        if reg == RBR_THR:
            if self.lcr & 0x80:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                self._receive_loopback(value)
            else:
                self._transmit(value)
            self.thr_irq = True             # sent at once: the transmitter is empty again
        elif reg == IER:
            if self.lcr & 0x80:
                self.dlm = value
                return
            if value & IER_THRE and not self.ier & IER_THRE:
                self.thr_irq = True         # enabling it with THR empty raises it
            self.ier = value & 0x0F
        elif reg == IIR_FCR:
            self.fcr = value & 0xC9
            if value & 2:
                self.rx.clear()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value
        self._update()

    def _transmit(self, byte: int) -> None:
        if len(self.output) < OUTPUT_MAX:
            self.output.append(byte)
        if self.sink is not None:
            self.sink(bytes((byte,)))
