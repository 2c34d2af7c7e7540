"""Fixed guest-physical layout of the built-in guests, and per-mode vCPU setup.

The names below are also handed to the assembler (see ASM_SYMBOLS), so this
file is the single source of truth for addresses and ports.
"""
from __future__ import annotations

import operator
import struct
from pathlib import Path

from typing import TYPE_CHECKING, Any, Union

from ..errors import ArgumentTypeError, InvalidArgumentError
from ..vcpustate import settle

if TYPE_CHECKING:
    from .._core import VcpuCore
    from . import Guest

Mem = Union[memoryview, bytearray]      # guest RAM from slot 0 (or a copy of it)

# --- guest-physical layout --------------------------------------------------
# Everything sits below 64 KiB so real-mode code reaches it with segment bases 0.
IVT_ADDR = 0x0000        # real-mode interrupt vector table (we fill 32 vectors)
DATA_ADDR = 0x1000       # one page the guests write; zeroed by prepare()
COUNTER_ADDR = 0x1000    # u32 (all modes): exit-causing instructions started
RESULT_ADDR = 0x1004     # u32: running total of values read / compute result
GDT_ADDR = 0x2000        # null, code32, data, code64 descriptors
IDT_ADDR = 0x3000        # 32 gates (pm32: 8 bytes each, long64: 16 bytes each)
VECTORS_ADDR = 0x4000    # 32 exception stubs, VECTOR_STUB_SIZE bytes apart
PVM_PAGE = 0x5000        # free page for the PVM host's native-mode MSR; never written here
PML4_ADDR = 0x6000       # 8 KiB aligned: PVM rejects CR3 with bit 12 set
PDPT_ADDR = 0x7000
PD_LOW_ADDR = 0x8000     # identity-maps 0..1 GiB with 2 MiB pages
PD_MMIO_ADDR = 0x9000    # identity-maps the 1 GiB that holds MMIO_BASE
STACK_BOTTOM = 0xA000
STACK_TOP = 0xC000       # initial (R/E)SP; only exceptions push anything
LOAD_ADDR = 0xC000       # every image is linked here; entry = first byte
IMAGE_LIMIT = 0x10000    # images must end below 64 KiB (real-mode reach)
RAM_SIZE = 0x20_0000     # minimum guest RAM (2 MiB); all of the above lies below it
MMIO_BASE = 0xD000_0000  # unbacked: accesses exit as KVM_EXIT_MMIO
MMIO_WRITE_ADDR = MMIO_BASE         # mmio_write_loop: 4-byte stores
MMIO_READ_ADDR = MMIO_BASE + 0x10   # mmio_read_loop: 4-byte loads

# --- I/O ports ---------------------------------------------------------------
PORT_OUT = 0x10          # pio_out_loop: 1-byte out
PORT_IN = 0x11           # pio_in_loop: 1-byte in
PORT_RESULT = 0x12       # compute: 4-byte out of the result
PORT_DEBUG_EXIT = 0xF4   # QEMU isa-debug-exit: status = (value << 1) | 1
PORT_DEBUGCON = 0xE9     # QEMU/Bochs debug console: console_flood writes here
COM1_BASE = 0x3F8        # 8250 THR
COM1_LSR = 0x3FD         # 8250 line status register
LSR_THRE = 0x20          # LSR bit 5: transmit holding register empty
EXC_EXIT_BASE = 0x80     # exception stubs write EXC_EXIT_BASE | vector to PORT_DEBUG_EXIT
VECTOR_STUB_SIZE = 8
NUM_VECTORS = 32
COMPUTE_SEED = 0x92D68CA2  # xorshift32 start value of the compute guest

# --- segments and control registers -----------------------------------------
SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
GDT = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00AF9B000000FFFF)  # accessed bit preset: CPU never writes the GDT
CR0_REAL = 0x10          # ET only (no CD/NW: keep guest memory cacheable)
CR0_PM32 = 0x11          # PE|ET
CR0_LONG = 0x80050033    # PG|AM|WP|NE|ET|MP|PE (accepted by PVM and VT-x/AMD-V)
CR4_LONG = 0x20          # PAE only (PCIDE is EINVAL on PVM)
EFER_LONG = 0x500        # LME|LMA
PTE_TABLE = 0x7          # P|RW|US: PVM needs U/S=1 at every level
PTE_2M = 0x87            # P|RW|US|PS
RFLAGS_DEFAULT = 0x2     # reserved bit 1; IF=0, DF=0

# --- SMP guests (smp_counter, smp_pingpong, smp_ipi) and irq_count -----------
# Shared words live in the data page (zeroed by prepare(), so before any vCPU runs
# when the runner prepares every vCPU first), each on its own 64-byte line.
SMP_MAX_CPUS = 64
SMP_LOCK_ADDR = 0x1040     # u32 spinlock: 0 free, 1 taken
SMP_VALUE_ADDR = 0x1080    # u32: the shared counter / ping-pong hop count
SMP_DONE_ADDR = 0x10C0     # u32: vCPUs finished (lock xadd)
SMP_VERDICT_ADDR = 0x1100  # u32: 0 undecided, else (debug-exit value + 1), set by the last vCPU
SMP_FAIL_ADDR = 0x1140     # u32: nonzero if some vCPU saw a message out of order
SMP_READY_ADDR = 0x1180    # u32: vCPUs (irq guests: LAPICs) ready
SMP_MAILBOX_ADDR = 0x1800  # per vCPU i: 16 bytes at +i*STRIDE: u32 token, u32 APIC id
SMP_MAILBOX_STRIDE = 0x10
IRQ_COUNTS_ADDR = 0x1C00   # u32 per APIC id (0..255): interrupts taken on vector IRQ_VECTOR
SMP_PASS_VALUE = 0         # debug-exit value of a passing SMP guest (status 1)
SMP_FAIL_VALUE = 2         # ... of a failing one (status 5)
# Per-vCPU stacks: vCPU i owns [SMP_STACKS_ADDR + i*SMP_STACK_SIZE, + SMP_STACK_SIZE);
# prepare() points (R/E)SP there for guests with a `cpu` input (real mode: SS base).
SMP_STACKS_ADDR = 0x10000
SMP_STACK_SIZE = 0x400
IRQ_VECTOR = 0x40          # irq guests: vector counted per APIC id (IDT gate set by the guest)
IRQ_SPURIOUS_VECTOR = 0x41 # LAPIC SVR spurious vector (its handler only returns)
LAPIC_BASE = 0xFEE00000    # xAPIC MMIO (in-kernel irqchip)
LAPIC_ID = 0x20
LAPIC_EOI = 0xB0
LAPIC_SVR = 0xF0
LAPIC_ICR_LOW = 0x300
LAPIC_ICR_HIGH = 0x310
LAPIC_SVR_ENABLE = 0x100
MP_STATE_RUNNABLE = 0      # KVM_MP_STATE_RUNNABLE

MODE_BITS = {"real": 16, "pm32": 32, "long64": 64}
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")

# Names passed to `as --defsym` by build.py.
ASM_SYMBOLS = {k: v for k, v in globals().items()
               if k.isupper() and isinstance(v, int) and not isinstance(v, bool)}

# Regions prepare() writes (start, end); PVM_PAGE must stay out of all of them.
_PAGE = 0x1000
REGIONS = {
    "ivt": (IVT_ADDR, IVT_ADDR + 4 * NUM_VECTORS),
    "data": (DATA_ADDR, DATA_ADDR + _PAGE),
    "gdt": (GDT_ADDR, GDT_ADDR + 8 * len(GDT)),
    "idt": (IDT_ADDR, IDT_ADDR + 16 * NUM_VECTORS),
    "vectors": (VECTORS_ADDR, VECTORS_ADDR + VECTOR_STUB_SIZE * NUM_VECTORS),
    "pml4": (PML4_ADDR, PML4_ADDR + _PAGE),
    "pdpt": (PDPT_ADDR, PDPT_ADDR + _PAGE),
    "pd_low": (PD_LOW_ADDR, PD_LOW_ADDR + _PAGE),
    "pd_mmio": (PD_MMIO_ADDR, PD_MMIO_ADDR + _PAGE),
    "stack": (STACK_BOTTOM, STACK_TOP),
    "image": (LOAD_ADDR, IMAGE_LIMIT),
    "smp_stacks": (SMP_STACKS_ADDR, SMP_STACKS_ADDR + SMP_MAX_CPUS * SMP_STACK_SIZE),
}


def smp_stack_top(cpu: int) -> int:
    """Initial stack pointer (flat address) of vCPU *cpu* in an SMP guest."""
    if not 0 <= cpu < SMP_MAX_CPUS:
        raise InvalidArgumentError(f"cpu {cpu} is out of range 0..{SMP_MAX_CPUS - 1}")
    return SMP_STACKS_ADDR + (cpu + 1) * SMP_STACK_SIZE


_BIN = Path(__file__).resolve().parent / "bin"


def read_bin(stem: str) -> bytes:
    """Bytes of bin/<stem>.bin shipped with the package.  A plain file read: through
    importlib.resources the first read imports modules, and a fork child whose parent
    forked while another thread was inside that import waits for the import's lock for
    ever (CPython resets no module lock at fork)."""
    return (_BIN / f"{stem}.bin").read_bytes()


def _put(mem: Mem, gpa: int, data: bytes | bytearray) -> None:
    mem[gpa:gpa + len(data)] = data


def _seg(d: dict[str, Any], *, selector: int = 0, base: int = 0, limit: int = 0xFFFF, type: int = 3,
         s: int = 1, db: int = 0, l: int = 0, g: int = 0, present: int = 1, dpl: int = 0) -> None:
    d.update(base=base, limit=limit, selector=selector, type=type, present=present, dpl=dpl,
             db=db, s=s, l=l, g=g, avl=0, unusable=0)


def _tables_real(mem: Mem) -> None:
    # IVT entries are offset:segment with segment 0 (stubs lie below 64 KiB).
    ivt = b"".join(struct.pack("<HH", VECTORS_ADDR + VECTOR_STUB_SIZE * v, 0)
                   for v in range(NUM_VECTORS))
    _put(mem, IVT_ADDR, ivt)


def _tables_pm32(mem: Mem) -> None:
    idt = b"".join(struct.pack("<HHHH", off & 0xFFFF, SEL_CODE32, 0x8E00, off >> 16)
                   for off in (VECTORS_ADDR + VECTOR_STUB_SIZE * v for v in range(NUM_VECTORS)))
    _put(mem, IDT_ADDR, idt)


def _tables_long64(mem: Mem) -> None:
    idt = b"".join(struct.pack("<HHHHII", off & 0xFFFF, SEL_CODE64, 0x8E00,
                               (off >> 16) & 0xFFFF, off >> 32, 0)
                   for off in (VECTORS_ADDR + VECTOR_STUB_SIZE * v for v in range(NUM_VECTORS)))
    _put(mem, IDT_ADDR, idt)
    mmio_gib = MMIO_BASE >> 30
    pml4 = bytearray(_PAGE)
    pdpt = bytearray(_PAGE)
    struct.pack_into("<Q", pml4, 0, PDPT_ADDR | PTE_TABLE)
    struct.pack_into("<Q", pdpt, 0, PD_LOW_ADDR | PTE_TABLE)
    struct.pack_into("<Q", pdpt, 8 * mmio_gib, PD_MMIO_ADDR | PTE_TABLE)
    _put(mem, PML4_ADDR, pml4)
    _put(mem, PDPT_ADDR, pdpt)
    for pd, gib in ((PD_LOW_ADDR, 0), (PD_MMIO_ADDR, mmio_gib)):
        _put(mem, pd, struct.pack("<512Q", *(((gib << 30) + (i << 21)) | PTE_2M
                                               for i in range(512))))


def _sregs(sregs: dict[str, Any], mode: str) -> None:
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        sregs[name] = dict(sregs[name])
    # TR/LDT as after reset (busy TSS, valid LDT): VT-x checks them on entry in every mode.
    _seg(sregs["tr"], type=11, s=0)
    _seg(sregs["ldt"], type=2, s=0)
    if mode == "real":
        _seg(sregs["cs"], type=11)
        _seg(sregs["ss"])
        for name in ("ds", "es", "fs", "gs"):
            # "Unreal" 4 GiB limit so 32-bit addressing reaches MMIO_BASE.
            _seg(sregs[name], limit=0xFFFFFFFF, g=1)
        sregs["idt"] = dict(sregs["idt"], base=IVT_ADDR, limit=4 * 256 - 1)
        sregs["gdt"] = dict(sregs["gdt"], base=0, limit=0xFFFF)
        sregs.update(cr0=CR0_REAL, cr3=0, cr4=0, efer=0)
        return
    flat = dict(base=0, limit=0xFFFFFFFF, g=1)
    if mode == "pm32":
        _seg(sregs["cs"], selector=SEL_CODE32, type=11, db=1, **flat)
        sregs.update(cr0=CR0_PM32, cr3=0, cr4=0, efer=0)
        idt_limit = 8 * NUM_VECTORS - 1
    else:
        _seg(sregs["cs"], selector=SEL_CODE64, type=11, l=1, **flat)
        sregs.update(cr0=CR0_LONG, cr3=PML4_ADDR, cr4=CR4_LONG, efer=EFER_LONG)
        idt_limit = 16 * NUM_VECTORS - 1
    for name in ("ds", "es", "fs", "gs", "ss"):
        _seg(sregs[name], selector=SEL_DATA, type=3, db=1, **flat)
    sregs["gdt"] = dict(sregs["gdt"], base=GDT_ADDR, limit=8 * len(GDT) - 1)
    sregs["idt"] = dict(sregs["idt"], base=IDT_ADDR, limit=idt_limit)


def prepare(guest: Guest, vcpu: VcpuCore, mem: Mem, *, pvm_page: int | None = None,
            **inputs: int) -> dict[str, int]:
    """Load `guest` into `mem` and set up `vcpu` for its mode; return the regs set.

    `inputs` are the guest's params by name (e.g. n=1000); missing ones take
    their defaults. `pvm_page`, if given, is only checked not to collide with
    anything written here (the caller programs the PVM MSR itself).
    """
    if guest.mode not in MODE_BITS:
        raise InvalidArgumentError(f"unknown mode {guest.mode!r}")
    if len(mem) < RAM_SIZE:
        raise InvalidArgumentError(f"guest RAM is {len(mem):#x} bytes, need at least {RAM_SIZE:#x}")
    if pvm_page is not None:
        if pvm_page % _PAGE or not 0 <= pvm_page <= len(mem) - _PAGE:
            raise InvalidArgumentError(f"pvm_page {pvm_page:#x} must be a page-aligned address in RAM")
        for region, (lo, hi) in REGIONS.items():
            if pvm_page < hi and lo < pvm_page + _PAGE:
                raise InvalidArgumentError(f"pvm_page {pvm_page:#x} overlaps the {region} region")
    params = {p.name: p for p in guest.params}
    unknown = set(inputs) - set(params)
    if unknown:
        raise ArgumentTypeError(f"{guest.name}: unknown input(s) {sorted(unknown)}; "
                        f"accepted: {sorted(params)}")
    regs = dict.fromkeys(REG_NAMES, 0)
    regs.update(rip=guest.entry, rsp=STACK_TOP, rflags=RFLAGS_DEFAULT)
    for name, p in params.items():
        try:
            value = operator.index(inputs.get(name, p.default))
        except TypeError:
            raise ArgumentTypeError(f"{guest.name}: {name} must be an int, not "
                                    f"{type(inputs[name]).__name__}") from None
        if not 0 <= value < (1 << p.bits):
            raise InvalidArgumentError(f"{guest.name}: {name}={value} does not fit in {p.bits} bits")
        regs[p.reg] = value

    if "ncpus" in params and not 1 <= regs[params["ncpus"].reg] <= SMP_MAX_CPUS:
        raise InvalidArgumentError(f"{guest.name}: ncpus must be 1..{SMP_MAX_CPUS}")
    if "cpu" in params and "ncpus" in params and regs[params["cpu"].reg] >= regs[params["ncpus"].reg]:
        raise InvalidArgumentError(f"{guest.name}: cpu must be below ncpus")

    image = guest.image
    if not (LOAD_ADDR <= guest.load_addr and guest.load_addr + len(image) <= IMAGE_LIMIT):
        raise InvalidArgumentError(f"{guest.name}: image does not fit below {IMAGE_LIMIT:#x}")
    # An access the vCPU's last exit left for user space (an IN, an MMIO read) is finished
    # by KVM at the next KVM_RUN, which stores the value read (in memory, for string I/O)
    # and writes back the registers its emulator decoded then: over the ones set below.
    settle(vcpu, f"load guest {guest.name}")
    _put(mem, DATA_ADDR, bytes(_PAGE))
    _put(mem, guest.load_addr, image)
    _put(mem, VECTORS_ADDR, read_bin("vectors"))
    _put(mem, GDT_ADDR, struct.pack(f"<{len(GDT)}Q", *GDT))
    {"real": _tables_real, "pm32": _tables_pm32, "long64": _tables_long64}[guest.mode](mem)

    sregs = vcpu.get_sregs()
    _sregs(sregs, guest.mode)
    if "cpu" in params:
        # SMP guest: each vCPU its own stack (real mode: SS base, SP at the top of it).
        top = smp_stack_top(regs[params["cpu"].reg])
        if guest.mode == "real":
            base = top - SMP_STACK_SIZE
            sregs["ss"].update(base=base, selector=base >> 4)
            regs["rsp"] = SMP_STACK_SIZE
        else:
            regs["rsp"] = top
        # With the in-kernel LAPIC every vCPU but 0 waits for INIT/SIPI; SMP guests
        # start all of them at once.
        if getattr(getattr(vcpu, "vm", None), "has_irqchip", False):
            vcpu.set_mp_state(MP_STATE_RUNNABLE)
    vcpu.set_sregs(sregs)

    vcpu.set_regs(regs)
    return regs
