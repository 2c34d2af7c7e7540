"""Linux's x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry: load a
bzImage's protected-mode kernel at its code32_start (1 MiB), an initrd high in RAM, the
command line, and a zero page (struct boot_params: the bzImage's setup header, loader
type, command line and initrd pointers, the e820 memory map), then enter the kernel's
64-bit entry point (1 MiB + 0x200) in long mode with identity-mapped page tables for the
first 4 GiB and RSI = the zero page, as Firecracker does.

Guest RAM used by the loader: GDT_ADDR (flat 64-bit code and data), the zero page at
ZERO_PAGE, the command line at CMDLINE_ADDR, page tables at PML4_ADDR.., a stack below
STACK_TOP (the protocol leaves RSP to the kernel; a valid one costs nothing)."""
from __future__ import annotations

import struct

from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from .._core import VcpuCore

HDRS = b"HdrS"
GDT_ADDR = 0x500
GDT = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)    # selectors 0x10 code64, 0x18 data
ZERO_PAGE = 0x7000
STACK_TOP = 0x8FF0
PML4_ADDR, PDPT_ADDR, PD_ADDR = 0xA000, 0xB000, 0xC000   # PD: 4 pages, 4 GiB of 2 MiB pages
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
KERNEL_ADDR = 0x100000
LOW_RAM_END = 0x9FC00
PTE_TABLE, PTE_2M = 0x7, 0x87        # present, writable, user (PVM wants U/S at every level), 2 MiB
# zero page offsets
E820_ENTRIES, SETUP_SECTS, HDR, LOADER_TYPE, LOADFLAGS = 0x1E8, 0x1F1, 0x1F1, 0x210, 0x211
RAMDISK_IMAGE, RAMDISK_SIZE, HEAP_END_PTR, CMD_LINE_PTR = 0x218, 0x21C, 0x224, 0x228
INITRD_ADDR_MAX, XLOADFLAGS, CMDLINE_SIZE, E820_TABLE = 0x22C, 0x236, 0x238, 0x2D0
XLF_KERNEL_64 = 1
LOADED_HIGH, CAN_USE_HEAP = 0x01, 0x80


class LinuxBootError(InvalidArgumentError):
    """Not a bzImage kvmsys can boot (or it does not fit)."""


def is_bzimage(image: bytes) -> bool:
    return len(image) > 0x264 and image[0x202:0x206] == HDRS


def load_linux(mem: memoryview, image: bytes, *, cmdline: str = "", initrd: bytes | None = None) -> tuple[int, int]:
    """Load bzImage *image* into *mem* (a writable view of guest RAM from 0).  Returns
    (64-bit entry point, zero page address).  Every header field is checked against the
    file and RAM before the first byte is written: a LinuxBootError leaves RAM as it was."""
    ram = len(mem)
    if not is_bzimage(image):
        raise LinuxBootError("not a bzImage (no 'HdrS' setup header at offset 0x202)")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x206 or not image[XLOADFLAGS] & XLF_KERNEL_64:
        raise LinuxBootError(f"boot protocol {version >> 8}.{version & 0xFF} without a 64-bit entry point "
                             "(kvmsys enters Linux in 64-bit mode: protocol 2.06 or later with XLF_KERNEL_64)")
    if not image[LOADFLAGS] & LOADED_HIGH:
        raise LinuxBootError("a zImage (loaded low) is not supported")
    setup_sects = image[SETUP_SECTS] or 4
    hdr_end = 0x202 + image[0x201]
    if (setup_sects + 1) * 512 >= len(image) or hdr_end > len(image):
        raise LinuxBootError(f"{setup_sects} setup sectors (and the setup header) leave no protected-mode "
                             f"kernel in a file of {len(image)} bytes")
    pm = memoryview(image)[(setup_sects + 1) * 512:]
    if KERNEL_ADDR + len(pm) > ram:
        raise LinuxBootError(f"the kernel ({len(pm)} bytes) does not fit in {ram >> 20} MiB of RAM")
    cmd = cmdline.encode() + b"\0"
    limit = struct.unpack_from("<I", image, CMDLINE_SIZE)[0] + 1
    if len(cmd) > min(limit, CMDLINE_MAX):
        raise LinuxBootError(f"command line of {len(cmd) - 1} bytes: this kernel takes at most "
                             f"{min(limit, CMDLINE_MAX) - 1}")
    if initrd:
        top = min(struct.unpack_from("<I", image, INITRD_ADDR_MAX)[0] + 1, ram)
        initrd_addr = (top - len(initrd)) & ~0xFFF
        if initrd_addr < KERNEL_ADDR + len(pm):
            raise LinuxBootError(f"the initrd ({len(initrd)} bytes) does not fit above the kernel")
    mem[KERNEL_ADDR:KERNEL_ADDR + len(pm)] = pm         # checked: now the work
    mem[CMDLINE_ADDR:CMDLINE_ADDR + len(cmd)] = cmd
    zp = bytearray(4096)
    zp[HDR:hdr_end] = image[HDR:hdr_end]
    zp[LOADER_TYPE] = 0xFF                                  # a loader with no assigned id
    zp[LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", zp, HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", zp, CMD_LINE_PTR, CMDLINE_ADDR)
    if initrd:
        mem[initrd_addr:initrd_addr + len(initrd)] = initrd
        struct.pack_into("<II", zp, RAMDISK_IMAGE, initrd_addr, len(initrd))
    e820 = [(0, LOW_RAM_END, 1), (LOW_RAM_END, 0xA0000 - LOW_RAM_END, 2), (0xF0000, 0x10000, 2),
            (KERNEL_ADDR, ram - KERNEL_ADDR, 1)]
    zp[E820_ENTRIES] = len(e820)
    for i, (base, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", zp, E820_TABLE + 20 * i, base, size, kind)
    mem[ZERO_PAGE:ZERO_PAGE + len(zp)] = zp
    mem[GDT_ADDR:GDT_ADDR + 8 * len(GDT)] = struct.pack(f"<{len(GDT)}Q", *GDT)
    mem[PML4_ADDR:PML4_ADDR + 8] = struct.pack("<Q", PDPT_ADDR | PTE_TABLE)
    mem[PDPT_ADDR:PDPT_ADDR + 32] = struct.pack("<4Q", *(PD_ADDR + 0x1000 * i | PTE_TABLE for i in range(4)))
    mem[PD_ADDR:PD_ADDR + 4 * 4096] = struct.pack("<2048Q", *((i << 21) | PTE_2M for i in range(2048)))
    return KERNEL_ADDR + 0x200, ZERO_PAGE


def enter(vcpu: VcpuCore, entry: int, zero_page: int) -> None:
    """Set *vcpu* up for the 64-bit boot protocol: long mode, paging with the identity
    map, flat segments, interrupts off, RSI = the zero page."""
    sregs = vcpu.get_sregs()

    def seg(selector: int, type_: int, l: int, db: int) -> dict[str, Any]:
        return dict(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=0,
                    db=db, s=1, l=l, g=1, avl=0, unusable=0, padding=0)
    sregs["cs"] = seg(0x10, 11, 1, 0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        sregs[name] = seg(0x18, 3, 0, 1)
    sregs["gdt"] = dict(sregs["gdt"], base=GDT_ADDR, limit=8 * len(GDT) - 1)
    sregs.update(cr0=0x80050033, cr3=PML4_ADDR, cr4=0x20, efer=0x500)     # PG|WP|NE|ET|MP|PE, PAE, LME|LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.update(rip=entry, rsi=zero_page, rsp=STACK_TOP, rbp=STACK_TOP, rflags=0x2)
    vcpu.set_regs(regs)
