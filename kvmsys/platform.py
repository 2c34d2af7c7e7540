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
from .errors import ArgumentTypeError, InvalidArgumentError

PIO, MMIO = Space.PIO, Space.MMIO

DEBUG_EXIT_PORT = 0xF4
DEBUGCON_PORT = 0xE9
COM1 = 0x3F8
LSR_THRE_TEMT = 0x60

FIRMWARE_LOW_MAX = 128 * 1024
MAX_FIRMWARE_SIZE = 16 << 20
FOUR_GIB = 1 << 32


def install_pc_ports(vm) -> None:
    """Install the PC port semantics above on *vm* (fd or process VM)."""
    vm.add_handler(PIO, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 1, Kind.EXIT)
    vm.add_handler(PIO, DEBUGCON_PORT, DEBUGCON_PORT + 1, Kind.SINK)
    vm.add_handler(PIO, COM1, COM1 + 1, Kind.SINK)                       # THR (RBR reads 0)
    vm.add_handler(PIO, COM1 + 5, COM1 + 6, Kind.CONST, LSR_THRE_TEMT)  # LSR
    vm.add_handler(PIO, COM1 + 1, COM1 + 8, Kind.CONST, 0)              # IER..SCR read 0
    vm.set_default(PIO, Kind.IGNORE)


def load_firmware(vm, image: bytes, *, ram_size: int, first_slot: int = 0) -> list[int]:
    """Map a raw firmware image the way a PC does; returns the slots used.

    The image ends at 4 GiB (so the reset vector F000:FFF0 lands 16 bytes below
    its end) and, if it is 128 KiB or smaller, is also copied to end at 1 MiB.
    RAM covers [0, 640 KiB) and [1 MiB, ram_size)."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"firmware image must be bytes, not {type(image).__name__}")
    size = len(image)
    if not 0 < size <= MAX_FIRMWARE_SIZE:
        raise InvalidArgumentError(f"firmware image of {size} bytes: expected 1 byte .. 16 MiB")
    if not isinstance(ram_size, int) or not 2 << 20 <= ram_size <= FOUR_GIB - (16 << 20) or ram_size % 4096:
        raise InvalidArgumentError("firmware needs 2 MiB .. 4 GiB - 16 MiB of page-aligned RAM")
    mapped = (size + 4095) & ~4095
    slots = []
    slot = first_slot

    def add(gpa, length, data=None):
        nonlocal slot
        view = vm.add_memory(slot, gpa, length)
        if data is not None:
            view[length - len(data):] = data     # right-aligned: the image ends at the top
        slots.append(slot)
        slot += 1

    add(0, 0xA0000)
    if size <= FIRMWARE_LOW_MAX:
        add(0x100000 - mapped, mapped, image)
    add(0x100000, ram_size - 0x100000)
    add(FOUR_GIB - mapped, mapped, image)
    return slots
