"""SMBIOS tables for the PC's firmware, served through fw_cfg as QEMU does.

The firmware finds ``etc/smbios/smbios-anchor`` (an SMBIOS 2.1 entry point) and
``etc/smbios/smbios-tables`` (the structures), adds its own BIOS information (type 0)
and publishes them where the guest OS looks (``dmidecode``).  Without them SeaBIOS
builds a set of its own, which costs ~0.2 s of emulated instructions on a host whose
KVM emulates real and flat protected mode (measured on our development host) and
describes a "QEMU" machine.

Structures (layouts from the DMTF SMBIOS specification, DSP0134, version 2.8):
1 system, 3 enclosure, 4 processor (one per vCPU), 16 memory array, 17 memory device
(one per 16 GiB), 19 memory array mapped address, 32 boot information, 127 end."""
from __future__ import annotations

import struct

from typing import Sequence

from . import __version__
from .acpi import checksum
from .errors import ArgumentTypeError, InvalidArgumentError

MANUFACTURER = "kvmsys"
PRODUCT = "kvmsys PC"
MEMORY_DEVICE_MAX_MIB = 16 << 10        # one type 17 structure per 16 GiB, as QEMU's
UNKNOWN_HANDLE, NO_ERROR_INFO = 0xFFFF, 0xFFFE


def _structure(kind: int, handle: int, formatted: bytes, strings: Sequence[str] = ()) -> bytes:
    """One structure: header, formatted area (after the header), string set."""
    body = struct.pack("<BBH", kind, 4 + len(formatted), handle) + formatted
    if not strings:
        return body + b"\0\0"
    return body + b"".join(s.encode("ascii") + b"\0" for s in strings) + b"\0"


def _check_int(value: object, what: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentTypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidArgumentError(f"{what} must be {low:#x} .. {high:#x}, not {value:#x}")


def tables(*, ram_size: int, cpus: int, cpuid_1: tuple[int, int] = (0, 0)) -> tuple[bytes, bytes]:
    """(anchor, tables) for a PC with *ram_size* bytes of RAM from address 0 and
    *cpus* single-core processors; *cpuid_1*: (EAX, EDX) of CPUID leaf 1, the
    processor ID of type 4."""
    _check_int(ram_size, "ram_size", 1 << 20, 1 << 40)       # with 1024 CPUs still under 64 KiB
    _check_int(cpus, "cpus", 1, 1024)
    if not isinstance(cpuid_1, tuple) or len(cpuid_1) != 2:
        raise ArgumentTypeError("cpuid_1 must be a tuple (EAX, EDX)")
    for v in cpuid_1:
        _check_int(v, "a cpuid_1 register", 0, 0xFFFFFFFF)
    out = []
    handle = 0x100

    def add(kind: int, formatted: bytes, strings: Sequence[str] = ()) -> int:
        nonlocal handle
        out.append(_structure(kind, handle, formatted, strings))
        handle += 1
        return handle - 1

    # type 1: manufacturer, product, version, serial; UUID (none: zeros), wake-up type
    # (power switch), SKU, family
    add(1, struct.pack("<BBBB16sBBB", 1, 2, 3, 0, bytes(16), 0x06, 0, 4),
        (MANUFACTURER, PRODUCT, __version__, MANUFACTURER))
    # type 3: manufacturer, type "other", version, serial, asset tag, states "safe",
    # security unknown, OEM, height, power cords, no contained elements, SKU
    add(3, struct.pack("<BBBBBBBBBIBBBBB", 1, 0x01, 0, 0, 0, 0x03, 0x03, 0x03, 0x02, 0, 0, 0, 0, 0, 0),
        (MANUFACTURER,))
    eax, edx = cpuid_1
    for i in range(cpus):
        # type 4: socket, central processor, family "other", manufacturer, ID (CPUID 1
        # EAX, EDX), version, voltage/clocks unknown, populated + enabled, upgrade
        # "other", no caches, serial/asset/part none, 1 core, 1 enabled, 1 thread,
        # characteristics unknown, family 2 "other"
        add(4, struct.pack("<BBBBIIBBHHHBBHHHBBBBBBHH", 1, 0x03, 0x01, 2, eax, edx, 0, 0, 0, 0, 0, 0x41, 0x01,
                           UNKNOWN_HANDLE, UNKNOWN_HANDLE, UNKNOWN_HANDLE, 0, 0, 0, 1, 1, 1, 0x02, 0x01),
            (f"CPU {i}", MANUFACTURER))
    ram_kib = ram_size >> 10
    ram_mib = ram_size >> 20
    devices = max(1, -(-ram_mib // MEMORY_DEVICE_MAX_MIB))
    # type 16: location "other", system memory, ECC none, max capacity (KiB), no error
    # info, devices, extended capacity (unused)
    array = add(16, struct.pack("<BBBIHHQ", 0x01, 0x03, 0x03, min(ram_kib, 0x7FFFFFFF), NO_ERROR_INFO,
                                devices, 0))
    left = ram_mib
    for i in range(devices):
        size = min(left, MEMORY_DEVICE_MAX_MIB)
        left -= size
        # type 17: array, no error info, widths unknown, size (MiB), DIMM, locator,
        # type RAM, detail "other", speed unknown, strings none, extended size unused
        add(17, struct.pack("<HHHHHBBBBBHHBBBBBIHHHH", array, NO_ERROR_INFO, 0xFFFF, 0xFFFF, size, 0x09, 0,
                            1, 0, 0x07, 0x0002, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
            (f"DIMM {i}",))
    # type 19: [0, ram_size) in KiB (end inclusive), the array, partition width 1
    add(19, struct.pack("<IIHBQQ", 0, ram_kib - 1, array, 1, 0, 0))
    add(32, bytes(6) + b"\0")                # type 32: boot status "no errors"
    add(127, b"")
    blob = b"".join(out)
    if len(blob) > 0xFFFF:          # the 2.1 entry point has 16 bits for it
        raise InvalidArgumentError(f"SMBIOS tables of {len(blob)} bytes for {cpus} CPUs: more than 64 KiB")
    anchor = bytearray(struct.pack("<4sBBBBHB5s5sBHIHB", b"_SM_", 0, 0x1F, 2, 8, max(map(len, out)), 0, bytes(5),
                                   b"_DMI_", 0, len(blob), 0, len(out), 0x28))
    anchor[0x15] = checksum(anchor[0x10:])      # intermediate checksum: the _DMI_ part
    anchor[0x04] = checksum(anchor)             # the whole entry point
    return bytes(anchor), blob
