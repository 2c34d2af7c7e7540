"""An ATA disk on the primary channel (ports 0x1f0-0x1f7, control 0x3f6), PIO only,
backed by a raw image file or block device (read-write, or read-only: writes are refused
with ABRT), opened and locked by kvmsys.hostfiles.open_disk.

Commands: IDENTIFY DEVICE, READ/WRITE SECTORS (LBA28, CHS), READ/WRITE MULTIPLE,
READ/WRITE SECTORS EXT (LBA48), SET MULTIPLE MODE, SET FEATURES, FLUSH CACHE,
INITIALIZE DEVICE PARAMETERS, RECALIBRATE and power commands (accepted); anything else
(IDENTIFY PACKET DEVICE included: this is no ATAPI device) is aborted.  The slave
position is empty.  No interrupts: firmware polls the status register (BIOSes set nIEN).

Errors are the device's, never the host's: an address outside the disk (CHS sector 0
included) and a write the host refuses (ENOSPC, EFBIG, EIO) end the command with ERR and
ABRT, as QEMU reports them (ide_rw_error); a read the host fails ends it with ERR and UNC
(uncorrectable data, a real disk's medium error).  A transfer goes through the host
CHUNK_SECTORS at a time: memory per command is bounded whatever count the guest wrote."""
from __future__ import annotations
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._core import IoExit

import os

from .. import hostfiles
from . import Device

SECTOR = 512
BSY, DRDY, DSC, DRQ, ERR = 0x80, 0x40, 0x10, 0x08, 0x01
UNC, ABRT = 0x40, 0x04
HEADS, SPT = 16, 63
MULTIPLE_MAX = 16
CHUNK_SECTORS = 128         # 64 KiB of a transfer buffered at a time


class AtaDisk(Device):
    ports = ((0x1F0, 0x1F8), (0x3F6, 0x3F7))

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path, self.readonly = path, readonly
        self.fd, size = hostfiles.open_disk(path, readonly=readonly)
        self.sectors = size // SECTOR
        super().__init__()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)           # also drops the image's lock
            self.fd = -1

    def _reset(self) -> None:
        self.features = 0
        self.regs = {2: 1, 3: 1, 4: 0, 5: 0}    # count, lba low/mid/high: the ATA signature
        self.hob = {2: 0, 3: 0, 4: 0, 5: 0}     # previous values (LBA48's high bytes)
        self.dh = 0xA0
        self.control = 0
        self.error = 1                          # diagnostic: device 0 passed
        self.multiple = 0
        self._end_transfer()                    # status DRDY | DSC

    # --- registers -------------------------------------------------------------
    def _slave(self) -> bool:
        return bool(self.dh & 0x10)

    def read(self, port: int, size: int) -> int:
        if port == 0x1F0:
            return self._data_in(size)
        if port in (0x1F7, 0x3F6):
            return 0 if self._slave() else self.status     # no slave drive: status 0
        if port == 0x1F1:
            return self.error
        if port == 0x1F6:
            return self.dh
        reg = port - 0x1F0
        return (self.hob if self.control & 0x80 else self.regs)[reg]

    def write(self, port: int, size: int, value: int) -> None:
        if port == 0x1F0:
            self._data_out(value, size)
        elif port == 0x3F6:
            if self.control & 4 and not value & 4:         # SRST falls: software reset done
                self.reset()
            self.control = value & 0x86
            if value & 4:
                self.status = BSY
        elif port == 0x1F7:
            if not self._slave():
                self._command(value & 0xFF)
        elif port == 0x1F6:
            self.dh = value & 0xFF
        elif port == 0x1F1:
            self.features = value & 0xFF
        else:
            reg = port - 0x1F0
            self.hob[reg] = self.regs[reg]
            self.regs[reg] = value & 0xFF
        self.control &= ~0x80                       # any register write clears HOB

    def _io(self, ex: IoExit) -> bool:
        if ex.port == 0x1F0 and ex.count > 1:       # `rep insw/outsw`: a whole block per exit
            if ex.is_in:
                n, done = ex.size * ex.count, 0
                while done < n and self.status & DRQ and self.writing is None:
                    chunk = self.buf[self.pos:self.pos + n - done]
                    ex.data[done:done + len(chunk)] = chunk
                    done += len(chunk)
                    self._advance(len(chunk))
                ex.data[done:] = b"\xff" * (n - done)
            else:
                self._receive(ex.data)
            return False
        return super()._io(ex)

    # --- data transfer ---------------------------------------------------------
    def _end_transfer(self, status: int = DRDY | DSC) -> None:
        self.buf = bytearray()                  # the chunk being read by or received from the guest
        self.pos = 0
        self.reading: tuple[int, int] | None = None     # (next lba, sectors) still to load
        self.writing: tuple[int, int] | None = None     # (lba, sectors) still to receive
        self.status = status

    def _data_in(self, size: int) -> int:
        if not self.status & DRQ or self.writing is not None:
            return (1 << (8 * size)) - 1
        chunk = self.buf[self.pos:self.pos + size]
        self._advance(len(chunk))
        return int.from_bytes(bytes(chunk).ljust(size, b"\xff"), "little")

    def _advance(self, n: int) -> None:
        self.pos += n
        if self.pos >= len(self.buf):
            if self.reading is not None and self.reading[1]:
                self._load()
            else:
                self._end_transfer()

    def _load(self) -> None:
        """The next chunk of a read into the buffer (ERR|UNC if the host cannot read it)."""
        assert self.reading is not None     # (a read in progress)
        lba, left = self.reading
        n = min(left, CHUNK_SECTORS)
        try:
            data = os.pread(self.fd, n * SECTOR, lba * SECTOR)
        except OSError:
            return self._fail(UNC)
        self.buf = bytearray(data.ljust(n * SECTOR, b"\0"))   # an image shrunk meanwhile reads as zeros
        self.pos = 0
        self.reading = (lba + n, left - n)
        self.status = DRDY | DSC | DRQ

    def _data_out(self, value: int, size: int) -> None:
        self._receive(value.to_bytes(size, "little"))

    def _receive(self, data: bytes | memoryview) -> None:
        while data and self.writing is not None and self.status & DRQ:
            lba, left = self.writing
            room = min(left, CHUNK_SECTORS) * SECTOR - len(self.buf)
            self.buf += data[:room]
            data = data[room:]
            if len(self.buf) < min(left, CHUNK_SECTORS) * SECTOR:
                return
            try:
                written = os.pwrite(self.fd, self.buf, lba * SECTOR)
            except OSError:
                written = -1
            if written != len(self.buf):        # ENOSPC, EFBIG, EIO, a short write
                return self._fail(ABRT)
            n = len(self.buf) // SECTOR
            self.buf = bytearray()
            self.writing = (lba + n, left - n) if left > n else None
            if self.writing is None:
                self._end_transfer()

    # --- commands --------------------------------------------------------------
    def _lba(self, ext: bool) -> int:
        r, h = self.regs, self.hob
        if ext:
            return (r[3] | r[4] << 8 | r[5] << 16 | h[3] << 24 | h[4] << 32 | h[5] << 40)
        if self.dh & 0x40:
            return r[3] | r[4] << 8 | r[5] << 16 | (self.dh & 0x0F) << 24
        cyl = r[4] | r[5] << 8
        return (cyl * HEADS + (self.dh & 0x0F)) * SPT + r[3] - 1    # CHS: sector 0 gives -1

    def _count(self, ext: bool) -> int:
        n = self.regs[2] | (self.hob[2] << 8 if ext else 0)
        return n or (65536 if ext else 256)

    def _fail(self, error: int) -> None:
        self.error = error
        self._end_transfer(DRDY | ERR)

    def _abort(self) -> None:
        self._fail(ABRT)

    def _command(self, cmd: int) -> None:
        self.error = 0
        self._end_transfer()
        if cmd == 0xEC:                                         # IDENTIFY DEVICE
            self.buf, self.status = bytearray(self._identify()), DRDY | DSC | DRQ
        elif cmd in (0x20, 0x21, 0xC4, 0x24, 0x29):             # READ SECTORS / MULTIPLE (EXT)
            ext = cmd in (0x24, 0x29)
            lba, n = self._lba(ext), self._count(ext)
            if not 0 <= lba <= self.sectors - n:
                return self._abort()
            self.reading = (lba, n)
            self._load()
        elif cmd in (0x30, 0x31, 0xC5, 0x34, 0x39):             # WRITE SECTORS / MULTIPLE (EXT)
            ext = cmd in (0x34, 0x39)
            lba, n = self._lba(ext), self._count(ext)
            if self.readonly or not 0 <= lba <= self.sectors - n:
                return self._abort()
            self.writing = (lba, n)
            self.status = DRDY | DSC | DRQ
        elif cmd == 0xC6:                                       # SET MULTIPLE MODE
            n = self.regs[2]
            if n > MULTIPLE_MAX or n & (n - 1):
                return self._abort()
            self.multiple, self.status = n, DRDY | DSC
        elif cmd in (0xEF, 0xE7, 0xEA, 0x91, 0x10, 0x40, 0x41, 0x42, 0x70,
                     0xE0, 0xE1, 0xE2, 0xE3, 0xE5, 0xE6, 0xF8):   # accepted, nothing to do
            if cmd == 0xE5:
                self.regs[2] = 0xFF                                 # CHECK POWER MODE: active
            self.status = DRDY | DSC
        else:                                                   # incl. 0xA1 IDENTIFY PACKET
            self._abort()

    def _identify(self) -> bytes:
        w = [0] * 256
        cyl = max(1, min(self.sectors // (HEADS * SPT), 16383))   # at least one: BIOSes read by CHS

        def text(first: int, words: int, s: str) -> None:
            b = s.encode().ljust(2 * words)
            for i in range(words):
                w[first + i] = b[2 * i] << 8 | b[2 * i + 1]    # ATA strings: bytes swapped per word

        w[0] = 0x0040                                           # fixed disk
        w[1], w[3], w[6] = cyl, HEADS, SPT
        text(10, 10, "KVMSYS0001")
        text(23, 4, "1.0")
        text(27, 20, "kvmsys ATA disk")
        w[47] = 0x8000 | MULTIPLE_MAX
        w[49] = 0x0200                                          # LBA
        w[53] = 0x0001                                          # words 54-58 valid
        w[54], w[55], w[56] = cyl, HEADS, SPT
        chs = cyl * HEADS * SPT
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        w[59] = (0x0100 | self.multiple) if self.multiple else 0
        lba28 = min(self.sectors, 0x0FFFFFFF)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[80] = 0x00F0                                          # ATA-4..7
        w[83] = 0x4400                                          # LBA48 supported
        w[86] = 0x0400                                          # LBA48 enabled
        for i in range(4):
            w[100 + i] = (self.sectors >> (16 * i)) & 0xFFFF
        return b"".join(x.to_bytes(2, "little") for x in w)
