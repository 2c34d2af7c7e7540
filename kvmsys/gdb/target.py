"""The x86 target as gdb sees it: register sets per CPU mode, their target
description XML, and the debug-register (DR7) encoding of hardware breakpoints.

Register names, order and feature names follow GDB's manual ("Target Descriptions",
"i386 Features": org.gnu.gdb.i386.core, .sse and, for 64-bit guests, .segments); the values come from KVM_GET_REGS,
KVM_GET_SREGS and KVM_GET_FPU (struct kvm_fpu in <linux/kvm.h>).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MODES = ("real", "pm32", "long64")
_ARCH = {"real": "i8086", "pm32": "i386", "long64": "i386:x86-64"}

_GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_X87_CTRL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")

# struct kvm_fpu: fpr[8][16], fcw u16, fsw u16, ftwx u8, pad u8, last_opcode u16,
# last_ip u64, last_dp u64, xmm[16][16], mxcsr u32, pad u32 (416 bytes)
_FPU_CTRL = struct.Struct("<HHBxHQQ")
_FPU_CTRL_OFF = 128
_FPU_XMM_OFF = 152
_FPU_MXCSR_OFF = 408


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    kind: str           # "gpr" (kvm_regs key in .src), "seg", "st", "x87", "xmm", "mxcsr"
    src: str = ""
    feature: str = "core"


def registers(mode: str) -> tuple[Reg, ...]:
    """gdb's register list (in 'g' packet order) for a guest in *mode*."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "long64":
        gprs = [Reg(n, 64, "data_ptr" if n in ("rsp", "rbp") else "int64", "gpr", n) for n in _GPR64]
        gprs.append(Reg("rip", 64, "code_ptr", "gpr", "rip"))
    else:
        gprs = [Reg(n, 32, "data_ptr" if n in ("esp", "ebp") else "int32", "gpr", "r" + n[1:])
                for n in _GPR32]
        gprs.append(Reg("eip", 32, "code_ptr", "gpr", "rip"))
    gprs.append(Reg("eflags", 32, "i386_eflags", "gpr", "rflags"))
    segs = [Reg(n, 32, "int32", "seg", n) for n in SEGMENTS]
    st = [Reg(f"st{i}", 80, "i387_ext", "st", str(i)) for i in range(8)]
    ctrl = [Reg(n, 32, "int", "x87", n) for n in _X87_CTRL]
    xmm = [Reg(f"xmm{i}", 128, "vec128", "xmm", str(i), "sse") for i in range(16 if mode == "long64" else 8)]
    mxcsr = [Reg("mxcsr", 32, "int", "mxcsr", "", "sse")]
    bases = [Reg(f"{n}_base", 64, "int", "base", n, "segments") for n in ("fs", "gs")] \
        if mode == "long64" else []
    return tuple(gprs + segs + st + ctrl + xmm + mxcsr + bases)


_EFLAGS = (("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
           ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
           ("VIP", 20), ("ID", 21))
_EFLAGS_TYPE = ('    <flags id="i386_eflags" size="4">\n' +
                "".join(f'      <field name="{n}" start="{b}" end="{b}"/>\n' for n, b in _EFLAGS) +
                "    </flags>\n")


# the SSE feature's register type, a union of vector views (GDB's manual, "Predefined
# Target Types" and "Target Description Format": vector, union)
_VEC128 = """    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v4_float" type="v4f"/>
      <field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/>
      <field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/>
      <field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
"""


def target_xml(mode: str) -> bytes:
    """The target description gdb reads with qXfer:features:read:target.xml."""
    def feature(name: str, types: str = "") -> str:
        regs = "".join(f'    <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}"/>\n'
                       for r in registers(mode) if r.feature == name)
        return f'  <feature name="org.gnu.gdb.i386.{name}">\n{types}{regs}  </feature>\n'
    return (f'<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
            f'<target version="1.0">\n  <architecture>{_ARCH[mode]}</architecture>\n'
            f'  <osabi>none</osabi>\n' + feature("core", _EFLAGS_TYPE) + feature("sse", _VEC128) +
            (feature("segments") if mode == "long64" else "") + '</target>\n').encode()


def mode_of(sregs: dict) -> str:
    """The CPU mode a vCPU is in: long64 (EFER.LMA), pm32 (CR0.PE) or real."""
    if sregs["efer"] & 0x400:
        return "long64"
    return "pm32" if sregs["cr0"] & 1 else "real"


# --- register values <-> bytes --------------------------------------------
def _x87_ctrl(fpu: bytes) -> dict:
    fcw, fsw, ftwx, fop, last_ip, last_dp = _FPU_CTRL.unpack_from(fpu, _FPU_CTRL_OFF)
    # FXSAVE keeps one "not empty" bit per register; gdb shows the full tag word (3 = empty)
    ftag = sum((0 if ftwx >> i & 1 else 3) << 2 * i for i in range(8))
    return dict(fctrl=fcw, fstat=fsw, ftag=ftag, fiseg=(last_ip >> 32) & 0xFFFF,
                fioff=last_ip & 0xFFFFFFFF, foseg=(last_dp >> 32) & 0xFFFF,
                fooff=last_dp & 0xFFFFFFFF, fop=fop)


def _pc_base(reg: Reg, sregs: dict, mode: str) -> int:
    # Real mode: gdb's eip is the linear address CS.base + IP, the address breakpoints
    # (debug registers) and memory use; a firmware's reset vector is 0xFFFFFFF0.
    return sregs["cs"]["base"] if mode == "real" and reg.src == "rip" else 0


def read_value(reg: Reg, regs: dict, sregs: dict, fpu: bytes, mode: str) -> bytes:
    """Register *reg* as gdb's little-endian bytes."""
    if reg.kind == "gpr":
        value = regs[reg.src] + _pc_base(reg, sregs, mode)
    elif reg.kind == "seg":
        value = sregs[reg.src]["selector"]
    elif reg.kind == "st":
        i = int(reg.src)
        return bytes(fpu[16 * i:16 * i + 10])
    elif reg.kind == "xmm":
        off = _FPU_XMM_OFF + 16 * int(reg.src)
        return bytes(fpu[off:off + 16])
    elif reg.kind == "base":
        value = sregs[reg.src]["base"]
    elif reg.kind == "mxcsr":
        value = int.from_bytes(fpu[_FPU_MXCSR_OFF:_FPU_MXCSR_OFF + 4], "little")
    else:
        value = _x87_ctrl(fpu)[reg.name]
    return (value & ((1 << reg.bits) - 1)).to_bytes(reg.bits // 8, "little")


def write_value(reg: Reg, data: bytes, regs: dict, sregs: dict, fpu: bytearray, mode: str) -> str:
    """Store gdb's bytes for *reg* into the state dicts; returns which state changed
    ("regs", "sregs", "fpu") or raises ValueError for a change this stub refuses."""
    if len(data) != reg.bits // 8:
        raise ValueError(f"{reg.name} takes {reg.bits // 8} bytes")
    value = int.from_bytes(data, "little")
    if reg.kind == "gpr":
        value -= _pc_base(reg, sregs, mode)
        if not 0 <= value < 1 << reg.bits:
            raise ValueError(f"{reg.name} outside the code segment")
        if reg.bits == 32:      # 32-bit view: keep the upper half of the 64-bit register
            value |= regs[reg.src] & ~0xFFFFFFFF
        regs[reg.src] = value
        return "regs"
    if reg.kind == "base":
        if sregs[reg.src]["base"] == value:
            return ""
        sregs[reg.src] = dict(sregs[reg.src], base=value)
        return "sregs"
    if reg.kind == "seg":
        seg = sregs[reg.src]
        if seg["selector"] == value:
            return ""
        if mode != "real":
            raise ValueError("segment selectors are writable in real mode only")
        seg.update(selector=value & 0xFFFF, base=(value & 0xFFFF) << 4)
        return "sregs"
    if reg.kind == "st":
        i = int(reg.src)
        fpu[16 * i:16 * i + 10] = data
        return "fpu"
    if reg.kind in ("xmm", "mxcsr"):
        off = _FPU_XMM_OFF + 16 * int(reg.src) if reg.kind == "xmm" else _FPU_MXCSR_OFF
        fpu[off:off + len(data)] = data
        return "fpu"
    ctrl = _x87_ctrl(fpu)
    ctrl[reg.name] = value
    ftwx = sum((1 if (ctrl["ftag"] >> 2 * i) & 3 != 3 else 0) << i for i in range(8))
    _FPU_CTRL.pack_into(fpu, _FPU_CTRL_OFF, ctrl["fctrl"] & 0xFFFF, ctrl["fstat"] & 0xFFFF, ftwx,
                        ctrl["fop"] & 0xFFFF, ctrl["fiseg"] << 32 | ctrl["fioff"],
                        ctrl["foseg"] << 32 | ctrl["fooff"])
    return "fpu"


# --- hardware breakpoints: DR0-DR3 and DR7 -----------------------------------
HW_SLOTS = 4
# DR7 R/W field per breakpoint kind; gdb's Z1 (exec), Z2 (write), Z3 (read), Z4 (access).
# x86 has no read-only watchpoint: Z3 uses read/write.
_RW = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}
_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_DR7_ONE = 1 << 10      # reserved bit 10 reads as 1


def debugreg(slots) -> list[int]:
    """KVM_SET_GUEST_DEBUG's debugreg[8] for up to four (kind, address, length) slots
    (None for a free one): DR0-DR3 the addresses, DR7 the local-enable, R/W and LEN
    fields (Intel SDM vol. 3, "Debug Registers")."""
    regs = [0] * 8
    dr7 = _DR7_ONE
    for i, slot in enumerate(slots):
        if slot is None:
            continue
        kind, addr, length = slot
        regs[i] = addr
        dr7 |= (1 << 2 * i) | (_RW[kind] << (16 + 4 * i)) | ((0 if kind == 1 else _LEN[length]) << (18 + 4 * i))
    regs[7] = dr7
    return regs


def check_watch(kind: int, addr: int, length: int) -> None:
    """ValueError unless x86 debug registers can watch [addr, addr+length)."""
    if kind == 1:
        return
    if length not in _LEN:
        raise ValueError("watchpoint length must be 1, 2, 4 or 8")
    if addr % length:
        raise ValueError("watchpoint address must be aligned to its length")
