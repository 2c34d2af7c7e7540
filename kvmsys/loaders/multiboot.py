"""Multiboot version 1: load a kernel (ELF32, or any image with the a.out-kludge
address fields) with its command line and modules, and enter it as the specification
says: 32-bit protected mode with flat 4 GiB segments, paging and interrupts off,
EAX = 0x2BADB002, EBX = the physical address of the Multiboot information.

Guest RAM layout used here: the information structure, command lines, module list,
memory map and boot loader name in [INFO_ADDR, INFO_END); a GDT with the flat
segments at GDT_ADDR (the specification leaves GDTR undefined; having a valid one
costs nothing); modules page-aligned after the kernel's highest byte.  A kernel loaded
into that low area itself (kvm-unit-tests' realmode test lives at 0x8000) gets the GDT
and the information in the RELOCATED_SIZE bytes after its highest byte instead (where
QEMU's loader puts them), and its modules after those.  Kernel segments may use
[LOADER_LOW, LOW_RAM_END) and RAM from 1 MiB, never the hole and firmware area in between
(the ACPI tables of kvmsys.acpi are there)."""
from __future__ import annotations

import struct

from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from .._core import VcpuCore

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH = 8192
F_PAGE_ALIGN, F_MEMINFO, F_VIDEO, F_AOUT_KLUDGE = 1 << 0, 1 << 1, 1 << 2, 1 << 16
# info flags
I_MEM, I_CMDLINE, I_MODS, I_MMAP, I_LOADER_NAME = 1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9
GDT_ADDR = 0x7F00
GDT = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)      # null, flat code (0x08), flat data (0x10)
INFO_ADDR = 0x8000
INFO_END = 0x9F000
LOADER_NAME = b"kvmsys\0"
LOW_RAM_END = 0x9FC00
LOADER_LOW = 0x500              # below: the real-mode IVT and BIOS data area
RELOCATED_SIZE = 0x10000


class MultibootError(InvalidArgumentError):
    """The image is not a Multiboot kernel kvmsys can load into this RAM."""


def find_header(image: bytes) -> tuple[int, int, tuple[int, ...]]:
    """(offset, flags, the five a.out-kludge address fields) of the Multiboot header."""
    for off in range(0, min(len(image), SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & F_AOUT_KLUDGE and len(image) < off + 32:
                raise MultibootError("the Multiboot header's a.out-kludge fields lie past the end of the file")
            fields = struct.unpack_from("<5I", image, off + 12) if len(image) >= off + 32 else (0,) * 5
            return off, flags, fields
    raise MultibootError("no Multiboot header (magic 0x1BADB002 with a valid checksum) in the first 8 KiB")


ELF_HEADER, PHDR = 52, 32       # sizeof(Elf32_Ehdr), sizeof(Elf32_Phdr)
PT_LOAD, EM_386 = 1, 3


def _aout_segment(image: bytes, off: int, fields: tuple[int, ...]) -> tuple[list[tuple[int, int, int, int]], int]:
    header_addr, load_addr, load_end, bss_end, entry = fields
    start = off - (header_addr - load_addr)
    if header_addr < load_addr or start < 0:
        raise MultibootError("a.out kludge: header_addr lies below load_addr or before the file's start")
    if load_end == 0:
        end = len(image)
    elif load_end < load_addr or start + (load_end - load_addr) > len(image):
        raise MultibootError("a.out kludge: load_end_addr lies below load_addr or past the end of the file")
    else:
        end = start + (load_end - load_addr)
    if bss_end and bss_end < load_addr + (end - start):
        raise MultibootError("a.out kludge: bss_end_addr lies below the end of the loaded image")
    return [(load_addr, start, end - start, max(end - start, bss_end - load_addr if bss_end else 0))], entry


def _elf_segments(image: bytes) -> tuple[list[tuple[int, int, int, int]], int]:
    if (len(image) < ELF_HEADER or image[:4] != b"\x7fELF" or image[4] != 1 or image[5] != 1
            or struct.unpack_from("<H", image, 18)[0] != EM_386):
        raise MultibootError("not a 32-bit little-endian x86 ELF and no a.out-kludge fields in the header")
    entry, phoff = struct.unpack_from("<II", image, 24)
    phentsize, phnum = struct.unpack_from("<HH", image, 42)
    if phnum and phentsize < PHDR:
        raise MultibootError(f"ELF program header entries of {phentsize} bytes: at least {PHDR} needed")
    if phoff + phnum * phentsize > len(image):
        raise MultibootError(f"ELF program headers ({phnum} of {phentsize} bytes at {phoff:#x}) "
                             "reach past the end of the file")
    segs = []
    for i in range(phnum):
        p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<6I", image, phoff + i * phentsize)
        if p_type == PT_LOAD and p_memsz:
            if p_offset + p_filesz > len(image) or p_filesz > p_memsz:
                raise MultibootError(f"ELF program header {i} points outside the file")
            segs.append((p_paddr, p_offset, p_filesz, p_memsz))
    return segs, entry


def _segments(image: bytes, off: int, flags: int, fields: tuple[int, ...], ram: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """[(guest address, file offset, bytes from the file, size in memory)], entry point:
    each inside RAM (above the IVT, not in the hole below 1 MiB), none overlapping another
    (so loading them costs at most the file and the RAM, whatever the headers say)."""
    segs, entry = _aout_segment(image, off, fields) if flags & F_AOUT_KLUDGE else _elf_segments(image)
    if not segs:
        raise MultibootError("ELF kernel without loadable segments")
    end = 0
    for addr, _off, _filesz, size in sorted(segs):
        if addr < LOADER_LOW or addr < 0x100000 and addr + size > LOW_RAM_END or addr + size > ram:
            raise MultibootError(f"kernel segment [{addr:#x}, {addr + size:#x}) overlaps the real-mode IVT, "
                                 f"the area below 1 MiB that is not RAM, or lies outside {ram >> 20} MiB of RAM")
        if addr < end:
            raise MultibootError(f"kernel segments overlap at {addr:#x}")
        end = addr + size
    return segs, entry


def load_multiboot(mem: memoryview, image: bytes, *, cmdline: str = "",
                   modules: Sequence[tuple[bytes, str]] = ()) -> tuple[int, int]:
    """Load *image* and its *modules* ([(bytes, command line)]) into *mem* (a writable view
    of guest RAM from address 0).  Returns (entry point, address of the Multiboot info).
    Everything is checked before the first byte is written: a MultibootError leaves RAM
    as it was."""
    ram = len(mem)
    off, flags, fields = find_header(image)
    if flags & 0xFFFC & ~F_AOUT_KLUDGE & 0xFFFF:
        raise MultibootError(f"the kernel requires Multiboot features kvmsys lacks (flags {flags:#x})")
    segs, entry = _segments(image, off, flags, fields, ram)
    top = max(addr + size for addr, _o, _f, size in segs)
    low = any(addr < INFO_END and addr + size > GDT_ADDR for addr, _o, _f, size in segs)
    gdt_addr, info_addr, info_end = GDT_ADDR, INFO_ADDR, INFO_END
    if low:                         # the kernel is in the loader's low area: the loader goes after it
        gdt_addr = (top + 0xFFF) & ~0xFFF
        info_addr, info_end = gdt_addr + 0x100, gdt_addr + RELOCATED_SIZE
        if info_end > (LOW_RAM_END if top <= LOW_RAM_END else ram):
            raise MultibootError(f"no room for the Multiboot information after the kernel's end {top:#x}")
        top = info_end
    info = bytearray(120)
    strings = bytearray()
    str_base = info_addr + len(info) + 16 * len(modules) + 24 * 4

    def string(s: bytes) -> int:
        addr = str_base + len(strings)
        strings.extend(s + b"\0")
        return addr

    mods, placed = bytearray(), []
    place = (top + 0xFFF) & ~0xFFF
    for data, args in modules:
        if place < 0x100000 and place + len(data) > LOW_RAM_END:
            place = 0x100000        # not into the hole below 1 MiB (a kernel and loader all low)
        if place + len(data) > ram:
            raise MultibootError(f"modules do not fit in {ram >> 20} MiB of RAM")
        placed.append((place, data))
        mods += struct.pack("<4I", place, place + len(data), string(args.encode()), 0)
        place = (place + len(data) + 0xFFF) & ~0xFFF
    regions = [(0, LOW_RAM_END, 1), (LOW_RAM_END, 0xA0000 - LOW_RAM_END, 2), (0xF0000, 0x10000, 2),
               (0x100000, ram - 0x100000, 1)]
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in regions)
    mods_addr = info_addr + len(info)
    mmap_addr = mods_addr + len(mods)
    struct.pack_into("<III", info, 0, I_MEM | I_CMDLINE | I_MODS | I_MMAP | I_LOADER_NAME,
                     LOW_RAM_END // 1024, (ram - 0x100000) // 1024)
    struct.pack_into("<III", info, 16, string(cmdline.encode()), len(modules), mods_addr)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, string(LOADER_NAME[:-1]))
    blob = bytes(info) + bytes(mods) + mmap
    if len(blob) > str_base - info_addr:
        raise MultibootError("too many modules")
    blob = blob.ljust(str_base - info_addr, b"\0") + bytes(strings)
    if info_addr + len(blob) > info_end:
        raise MultibootError("command lines too long for the loader's area")
    for addr, foff, filesz, size in segs:          # checked: now the work
        mem[addr:addr + filesz] = image[foff:foff + filesz]
        mem[addr + filesz:addr + size] = bytes(size - filesz)
    for addr, data in placed:
        mem[addr:addr + len(data)] = data
    mem[info_addr:info_addr + len(blob)] = blob
    mem[gdt_addr:gdt_addr + 8 * len(GDT)] = struct.pack(f"<{len(GDT)}Q", *GDT)
    return entry, info_addr


def enter(vcpu: VcpuCore, entry: int, info_addr: int) -> None:
    """Set *vcpu* up as Multiboot says the kernel finds it."""
    sregs = vcpu.get_sregs()

    def seg(selector: int, type_: int) -> dict[str, Any]:
        return dict(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=0,
                    db=1, s=1, l=0, g=1, avl=0, unusable=0, padding=0)
    sregs["cs"] = seg(0x08, 11)
    for name in ("ds", "es", "fs", "gs", "ss"):
        sregs[name] = seg(0x10, 3)
    gdt_addr = GDT_ADDR if info_addr == INFO_ADDR else info_addr - 0x100      # see load_multiboot
    sregs["gdt"] = dict(sregs["gdt"], base=gdt_addr, limit=8 * len(GDT) - 1)
    sregs.update(cr0=0x11, cr3=0, cr4=0, efer=0)        # PE|ET: protected mode, no paging
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.update(rip=entry, rax=BOOTLOADER_MAGIC, rbx=info_addr, rflags=0x2)
    vcpu.set_regs(regs)
