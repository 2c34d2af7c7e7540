"""PC platform conventions for guests, compatible with QEMU's test setups.

- port 0xf4: isa-debug-exit, a write stops the run with status (value << 1) | 1;
- port 0xe9: debugcon, bytes collected on the console;
- ports 0x3f8-0x3ff: enough of an 8250 UART for a polling guest (THR collected,
  LSR says "transmitter empty");
- any other port reads as all-ones and ignores writes, counted per port.

All of it is handled by the run loop in C: no exit reaches Python.
"""
from __future__ import annotations

from . import _core
from .enums import Kind, Space
from typing import TYPE_CHECKING

from .errors import ArgumentTypeError, InvalidArgumentError

if TYPE_CHECKING:
    from ._core import VmCore

PIO, MMIO = Space.PIO, Space.MMIO

DEBUG_EXIT_PORT = 0xF4
DEBUGCON_PORT = 0xE9
COM1 = 0x3F8
LSR_THRE_TEMT = 0x60

FOUR_GIB = 1 << 32
MAX_FIRMWARE_SIZE = 16 << 20
BIOS_AREA = 0xC0000             # [0xC0000, 1 MiB): option ROMs and the BIOS, RAM here
LOW_COPY_MAX = 128 * 1024       # the top of a larger image that is visible below 1 MiB
VGA_TEXT = (0xB8000, 0xC0000)   # colour text page (RAM, no VGA behind it)
RAM_MAX = 3 << 30               # RAM below the 32-bit PCI/firmware hole


def install_pc_ports(vm: VmCore) -> None:
    """Install the PC port semantics above on *vm* (fd or process VM)."""
    vm.add_handler(PIO, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 1, Kind.EXIT)
    vm.add_handler(PIO, DEBUGCON_PORT, DEBUGCON_PORT + 1, Kind.SINK)
    vm.add_handler(PIO, COM1, COM1 + 1, Kind.SINK)                       # THR (RBR reads 0)
    vm.add_handler(PIO, COM1 + 1, COM1 + 8, Kind.CONST, 0)              # IER..SCR read 0
    vm.add_handler(PIO, COM1 + 5, COM1 + 6, Kind.CONST, LSR_THRE_TEMT)  # LSR (later wins)
    vm.set_default(PIO, Kind.IGNORE)


def _low_copy(size: int) -> int:
    """How much of an image ends at 1 MiB: all of one up to 256 KiB (as SeaBIOS's
    bios-256k.bin needs), else the top 128 KiB, as a PC's chipset aliases it."""
    return size if size <= 0x100000 - BIOS_AREA else LOW_COPY_MAX


def load_firmware(vm: VmCore, image: bytes, *, ram_size: int, first_slot: int = 0) -> list[int]:
    """Map a raw firmware image the way a PC does; returns the slots used.

    RAM covers [0, 640 KiB), the VGA text page [0xB8000, 0xC0000), [0xC0000, 1 MiB)
    and [1 MiB, ram_size).  The image ends at 4 GiB (the reset vector F000:FFF0 lands
    16 bytes below its end) and its top (see _low_copy) is copied to end at 1 MiB, into
    writable RAM: firmware writes its own data there (and CPUs set accessed bits in
    descriptor tables there, which a read-only slot would make hang).  Both copies are
    RAM, rewritten by copy_firmware() at every reset."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"firmware image must be bytes, not {type(image).__name__}")
    size = len(image)
    if not 0 < size <= MAX_FIRMWARE_SIZE:
        raise InvalidArgumentError(f"firmware image of {size} bytes: expected 1 byte .. 16 MiB")
    if not isinstance(ram_size, int) or not 2 << 20 <= ram_size <= RAM_MAX or ram_size % 4096:
        raise InvalidArgumentError(f"firmware needs 2 MiB .. {RAM_MAX >> 20} MiB of page-aligned RAM")
    mapped = (size + 4095) & ~4095
    regions = [(0, 0xA0000), (VGA_TEXT[0], VGA_TEXT[1] - VGA_TEXT[0]), (BIOS_AREA, 0x100000 - BIOS_AREA),
               (0x100000, ram_size - 0x100000), (FOUR_GIB - mapped, mapped)]
    slots = []
    for i, (gpa, length) in enumerate(regions):
        vm.add_memory(first_slot + i, gpa, length)
        slots.append(first_slot + i)
    copy_firmware(vm, image)
    return slots


def copy_firmware(vm: VmCore, image: bytes) -> None:
    """(Re)write the image below 4 GiB and its copy below 1 MiB: the power-on contents."""
    vm.write(FOUR_GIB - len(image), image)
    low = _low_copy(len(image))
    vm.write(0x100000 - low, image[-low:])
