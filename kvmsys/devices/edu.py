"""QEMU's ``edu`` PCI device (docs/specs/edu.rst in QEMU), which kvm-unit-tests' intel_iommu
test drives: a 1 MiB memory BAR of registers, a 4 KiB DMA buffer, INTx and one MSI.

Registers (BAR 0; 4-byte accesses below 0x80, 4 or 8 from 0x80, others read all-ones
and are dropped): 0x00 id 0x010000ed; 0x04 liveness (reads back the complement);
0x08 factorial (the result, mod 2^32, is there at once); 0x20 status (bit 7: raise
interrupt 0x1 when a factorial is done); 0x24 interrupt status; 0x60 raise, 0x64
acknowledge interrupt bits; 0x80/0x88/0x90 DMA source, destination, count; 0x98 DMA
command (bit 0 start, bit 1 from the device to RAM, bit 2 raise interrupt 0x100 when
done).  The device's side of a DMA is [0x40000, 0x41000): a transfer that does not fit
there is dropped (QEMU aborts the VM); the RAM side goes through the machine's DMA
path (kvmsys.q35: the IOMMU when there is one), and a refused one is dropped too.  A
DMA completes within the write that starts it.  While MSI is enabled an interrupt is
a message, else INTx (level, held while any status bit is set)."""
from __future__ import annotations

from typing import Any

from .pci import COMMAND_MEMORY, PciFunction

VENDOR, DEVICE = 0x1234, 0x11E8
ID = 0x010000ED
BAR_SIZE = 1 << 20
DMA_START, DMA_SIZE = 0x40000, 4096
MSI_CAP = 0x40                      # capability list: MSI (64-bit address, one vector) only
DMA_MASK = (1 << 28) - 1            # QEMU's default dma_mask: the addresses the device can drive
FACT_IRQ, DMA_IRQ = 0x1, 0x100
CMD_START, CMD_FROM_DEVICE, CMD_IRQ = 1, 2, 4
COMMAND_MASTER, COMMAND_INTX_DISABLE = 1 << 2, 1 << 10
# Writable config bits: command (memory space, bus master; interrupt disable), BAR 0 (1 MiB
# aligned, 32-bit memory), cache line/latency, interrupt line, MSI enable (one vector:
# MME stays 0, 64-bit stays set), the message address (low dword 4-aligned), high, data
_WRITE_MASKS = {4: 0x06, 5: 0x04, 0x0C: 0xFF, 0x0D: 0xFF, 0x3C: 0xFF, MSI_CAP + 2: 0x01, MSI_CAP + 4: 0xFC,
                **{0x10 + i: (~(BAR_SIZE - 1) & 0xFFFFFFFF) >> (8 * i) & 0xFF for i in range(4)},
                **{off: 0xFF for off in range(MSI_CAP + 5, MSI_CAP + 0x0E)}}


def factorial_u32(n: int) -> int:
    """n! mod 2^32: 0 from 34! on (it has 32 factors of 2), so at most 33 steps."""
    r = 1
    for i in range(2, min(n, 34) + 1):
        r = (r * i) & 0xFFFFFFFF
    return r


class Edu(PciFunction):
    """The edu function at *bdf* (bus 0).  *bus*: the machine's side (kvmsys.q35.Bus):
    ``dma_read(sid, addr, n)``, ``dma_write(sid, addr, data)``, ``msi(addr, data, sid)``,
    ``intx(self, level)``.  *bar*: where firmware would have put BAR 0; *line*: the
    interrupt line register (the IOAPIC pin INTA# drives)."""
    bar_size = BAR_SIZE

    def __init__(self, bus: Any, *, devfn: int, bar: int, line: int) -> None:
        self.bus, self.devfn, self.sid = bus, devfn, devfn      # bus 0: the requester id is devfn
        self.power_on_bar, self.line = bar, line
        super().__init__(self._power_on_config, _WRITE_MASKS)
        self._reset_regs()

    def _power_on_config(self) -> bytearray:
        c = bytearray(256)
        c[0:4] = (VENDOR | DEVICE << 16).to_bytes(4, "little")
        c[4:6] = COMMAND_MEMORY.to_bytes(2, "little")         # firmware enabled memory decoding
        c[6:8] = (1 << 4).to_bytes(2, "little")                # status: capability list
        c[8] = 0x10                                            # revision
        c[9:12] = (0x00FF00).to_bytes(3, "little")             # class: unclassified / other
        c[0x10:0x14] = self.power_on_bar.to_bytes(4, "little")     # 32-bit memory BAR
        c[0x2C:0x30] = (0x1AF4 | 0x1100 << 16).to_bytes(4, "little")
        c[0x34] = MSI_CAP
        c[0x3C], c[0x3D] = self.line, 1                        # INTA#
        c[MSI_CAP:MSI_CAP + 4] = (0x05 | 0 << 8 | 0x0080 << 16).to_bytes(4, "little")    # MSI, 64-bit
        return c

    def reset(self) -> None:
        super().reset()
        self._reset_regs()

    def _reset_regs(self) -> None:
        self.alive = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0
        self.buffer = bytearray(DMA_SIZE)
        self.level = 0
        self.dma_errors = 0         # transfers dropped (outside the buffer, or refused by the DMA path)

    # --- configuration space ------------------------------------------------------
    def msi_enabled(self) -> bool:
        return bool(self.read_config(MSI_CAP + 2, 2) & 1)

    def write_config(self, offset: int, size: int, value: int) -> None:
        super().write_config(offset, size, value)
        self._update_intx()                         # interrupt disable, MSI enable may have changed

    def msi_message(self) -> tuple[int, int]:
        return self.read_config(MSI_CAP + 4, 8), self.read_config(MSI_CAP + 12, 2)

    # --- interrupts ---------------------------------------------------------------
    def _raise(self, bits: int) -> None:
        self.irq_status |= bits
        if self.irq_status and self.msi_enabled():
            addr, data = self.msi_message()
            if self.command & COMMAND_MASTER:       # a message is a memory write: bus master
                self.bus.msi(addr, data, self.sid)
        self._update_intx()

    def _lower(self, bits: int) -> None:
        self.irq_status &= ~bits
        self._update_intx()

    def _update_intx(self) -> None:
        level = int(bool(self.irq_status) and not self.msi_enabled()
                    and not self.command & COMMAND_INTX_DISABLE)
        if level != self.level:
            self.level = level
            self.bus.intx(self, level)

    # --- registers ----------------------------------------------------------------
    def read(self, off: int, size: int) -> int:
        if (size != 4 if off < 0x80 else size not in (4, 8)):
            return (1 << (8 * size)) - 1
        value = {0x00: ID, 0x04: self.alive, 0x08: self.fact, 0x20: self.status, 0x24: self.irq_status,
                 0x80: self.dma_src, 0x88: self.dma_dst, 0x90: self.dma_count, 0x98: self.dma_cmd}.get(off)
        return (1 << (8 * size)) - 1 if value is None else value & ((1 << (8 * size)) - 1)

    def write(self, off: int, size: int, value: int) -> None:
        if (size != 4 if off < 0x80 else size not in (4, 8)):
            return
        if off == 0x04:
            self.alive = ~value & 0xFFFFFFFF
        elif off == 0x08:
            self.fact = factorial_u32(value)
            if self.status & 0x80:
                self._raise(FACT_IRQ)
        elif off == 0x20:
            self.status = value & 0x80              # bit 0 (computing) is never seen set
        elif off == 0x60:
            self._raise(value & 0xFFFFFFFF)
        elif off == 0x64:
            self._lower(value & 0xFFFFFFFF)
        elif off == 0x80:
            self.dma_src = value
        elif off == 0x88:
            self.dma_dst = value
        elif off == 0x90:
            self.dma_count = value
        elif off == 0x98 and value & CMD_START:
            self.dma_cmd = value & 0x7
            self._dma()

    def _dma(self) -> None:
        cmd, n = self.dma_cmd, self.dma_count
        from_device = bool(cmd & CMD_FROM_DEVICE)
        dev_addr, ram_addr = (self.dma_src, self.dma_dst) if from_device else (self.dma_dst, self.dma_src)
        off = dev_addr - DMA_START
        ok = 0 <= off and n <= DMA_SIZE - off and self.command & COMMAND_MASTER
        if ok and n:
            ram_addr &= DMA_MASK
            if from_device:
                ok = self.bus.dma_write(self.sid, ram_addr, bytes(self.buffer[off:off + n]))
            else:
                data = self.bus.dma_read(self.sid, ram_addr, n)
                ok = data is not None
                if ok:
                    self.buffer[off:off + n] = data
        if not ok:
            self.dma_errors += 1
        self.dma_cmd &= ~CMD_START
        if cmd & CMD_IRQ:
            self._raise(DMA_IRQ)
