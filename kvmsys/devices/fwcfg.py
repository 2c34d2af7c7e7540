"""QEMU's firmware configuration device (fw_cfg), the x86 I/O port flavour.

Ports: 0x510 selector (16-bit write), 0x511 data (8-bit reads, auto-incrementing),
0x514-0x51b the DMA address register (big-endian, a write of the low half at 0x518
starts the transfer).  Items are those QEMU's pc machine provides and SeaBIOS reads:
the signature, the interface ID, RAM size, CPU counts, boot device and boot menu, and
the file directory with named files (bootorder, etc/show-boot-menu, ...).
Layout of the items and the DMA descriptor: QEMU's docs/specs/fw_cfg.rst."""
from __future__ import annotations

import struct

from ..errors import KvmsysError
from typing import TYPE_CHECKING

from . import Device

if TYPE_CHECKING:
    from .._core import IoExit, VmCore

SIGNATURE, ID, UUID, RAM_SIZE, NOGRAPHIC, NB_CPUS = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
BOOT_DEVICE, MAX_CPUS, BOOT_MENU, FILE_DIR = 0x0C, 0x0F, 0x10, 0x19
FILE_FIRST = 0x20
ID_TRADITIONAL, ID_DMA = 1, 2
DMA_SIGNATURE = b"QEMU CFG"
# DMA control bits
DMA_ERROR, DMA_READ, DMA_SKIP, DMA_SELECT, DMA_WRITE = 0x01, 0x02, 0x04, 0x08, 0x10
# A DMA moves at most this many bytes through the host at a time: its length is the
# guest's (up to 4 GiB), so the transfer goes into guest memory piece by piece and stops
# at the first piece outside it (its work is bounded by the guest's RAM, not the length).
DMA_CHUNK = 64 << 10
_ZEROS = bytes(DMA_CHUNK)


class FwCfg(Device):
    ports = ((0x510, 0x512), (0x514, 0x51C))

    def __init__(self, memory: VmCore, *, ram_size: int, cpus: int = 1, boot_menu: bool = False,
                 boot_menu_wait_ms: int | None = None, bootorder: list[str] | None = None,
                 files: dict[str, bytes] | None = None) -> None:
        """*memory*: the VM (its read/write of guest-physical memory serve DMA)."""
        self.memory = memory
        self.items: dict[int, bytes] = {
            SIGNATURE: b"QEMU",
            ID: struct.pack("<I", ID_TRADITIONAL | ID_DMA),
            UUID: bytes(16),
            RAM_SIZE: struct.pack("<Q", ram_size),
            NOGRAPHIC: struct.pack("<H", 1),
            NB_CPUS: struct.pack("<H", cpus),
            MAX_CPUS: struct.pack("<H", cpus),
            BOOT_DEVICE: struct.pack("<H", ord("c")),
            BOOT_MENU: struct.pack("<H", 1 if boot_menu else 0),
        }
        self.files: dict[str, bytes] = {"etc/show-boot-menu": struct.pack("<H", 1 if boot_menu else 0)}
        if boot_menu_wait_ms is not None:
            self.files["etc/boot-menu-wait"] = struct.pack("<H", boot_menu_wait_ms)
        if bootorder:
            self.files["bootorder"] = ("\n".join(bootorder) + "\n").encode() + b"\0"
        self.files.update(files or {})
        self._build_directory()
        super().__init__()

    def add_file(self, name: str, data: bytes) -> None:
        self.files[name] = bytes(data)
        self._build_directory()

    def _build_directory(self) -> None:
        if len(self.files) > 0x3FE0:
            raise ValueError("too many fw_cfg files")
        directory = struct.pack(">I", len(self.files))
        for i, (name, data) in enumerate(sorted(self.files.items())):
            raw = name.encode()
            if len(raw) >= 56:
                raise ValueError(f"fw_cfg file name {name!r} is longer than 55 bytes")
            directory += struct.pack(">IHH56s", len(data), FILE_FIRST + i, 0, raw)
            self.items[FILE_FIRST + i] = data
        self.items[FILE_DIR] = directory

    def _reset(self) -> None:
        self.selector = 0
        self.offset = 0
        self.dma_high = 0

    def _select(self, key: int) -> None:
        self.selector = key & 0xFFFF
        self.offset = 0

    def _take(self, n: int) -> bytes:
        item = self.items.get(self.selector, b"")
        out = item[self.offset:self.offset + n]
        self.offset += n
        return out + bytes(n - len(out))            # past the end reads as zeros

    def _io(self, ex: IoExit) -> bool:
        if ex.port == 0x511 and ex.is_in:           # `rep insb` of a whole item in one exit
            ex.data[:] = self._take(ex.size * ex.count)
            return False
        return super()._io(ex)

    def read(self, port: int, size: int) -> int:
        if port == 0x511:
            return self._take(1)[0]
        if port >= 0x514:
            off = port - 0x514
            return int.from_bytes(DMA_SIGNATURE[off:off + size], "big")
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        if port == 0x510 and size == 2:
            self._select(value)
        elif port == 0x514 and size == 4:
            self.dma_high = int.from_bytes(value.to_bytes(4, "little"), "big")
        elif port == 0x518 and size == 4:
            low = int.from_bytes(value.to_bytes(4, "little"), "big")
            self._dma((self.dma_high << 32) | low)
            self.dma_high = 0
        elif port == 0x514 and size == 8:
            self._dma(int.from_bytes(value.to_bytes(8, "little"), "big"))

    def _dma(self, addr: int) -> None:
        """Run one DMA descriptor {be32 control, be32 length, be64 address} at *addr*."""
        try:
            control, length, target = struct.unpack(">IIQ", self.memory.read(addr, 16))
        except KvmsysError:
            return                                  # descriptor outside RAM: nothing to report to
        status = 0
        try:
            if control & DMA_SELECT:
                self._select(control >> 16)
            if control & DMA_READ:
                self._dma_read(target, length)
            elif control & DMA_WRITE:
                status = DMA_ERROR                  # no writable items
            elif control & DMA_SKIP:
                self.offset += length
        except KvmsysError:
            status = DMA_ERROR
        try:
            self.memory.write(addr, struct.pack(">I", status))
        except KvmsysError:
            pass                                    # read-only descriptor: nothing to report to

    def _dma_read(self, target: int, length: int) -> None:
        """The selected item's next *length* bytes (zeros past its end) to guest *target*."""
        item = self.items.get(self.selector, b"")
        while length > 0:
            n = min(length, DMA_CHUNK)
            if self.offset >= len(item):
                chunk = _ZEROS[:n]
            else:
                chunk = item[self.offset:self.offset + n]
                chunk += _ZEROS[:n - len(chunk)]
            self.memory.write(target, chunk)        # KvmsysError outside RAM: DMA_ERROR
            self.offset += n
            target += n
            length -= n
