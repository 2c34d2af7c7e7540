"""The x86 target as gdb sees it: register sets per CPU mode, their target
description XML, and the debug-register (DR7) encoding of hardware breakpoints.

Register names, order and feature names follow GDB's manual ("Target Descriptions",
"i386 Features": org.gnu.gdb.i386.core, .sse and, for 64-bit guests, .segments); the values come from KVM_GET_REGS,
KVM_GET_SREGS and KVM_GET_XSAVE (kvmsys.state.Xsave: its legacy region holds the x87 and
SSE registers).  Not KVM_GET_FPU: it has no MXCSR, and SSE registers written through
KVM_SET_FPU were not seen by KVM_GET_XSAVE on our host (measured 2026-11-30).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..state import Xsave

if TYPE_CHECKING:
    from ..fd import Vcpu

MODES = ("real", "pm32", "long64")
_ARCH = {"real": "i8086", "pm32": "i386", "long64": "i386:x86-64"}

_GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_X87_CTRL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")



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


def mode_of(sregs: dict[str, Any]) -> str:
    """The CPU mode a vCPU is in: long64 (EFER.LMA), pm32 (CR0.PE) or real."""
    if sregs["efer"] & 0x400:
        return "long64"
    return "pm32" if sregs["cr0"] & 1 else "real"


# --- register values <-> bytes --------------------------------------------
@dataclass
class VcpuState:
    """The vCPU state gdb's registers are read from and written to."""
    regs: dict[str, int]
    sregs: dict[str, Any]
    xsave: Xsave

    @classmethod
    def of(cls, vcpu: Vcpu) -> "VcpuState":
        return cls(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_xsave())

    def apply(self, vcpu: Vcpu, changed: set[str]) -> None:
        """Write the parts named in *changed* back to *vcpu*."""
        if "sregs" in changed:
            vcpu.set_sregs(self.sregs)
        if "regs" in changed:
            vcpu.set_regs(self.regs)
        if "xsave" in changed:
            self.xsave["xstate_bv"] |= 0b11     # x87 and SSE present, else KVM loads init state
            vcpu.set_xsave(self.xsave)


def _x87_ctrl(fpu: Xsave) -> dict[str, int]:
    # fpu: the XSAVE legacy region (FXSAVE layout, 64-bit FIP/FDP)
    ftwx, last_ip, last_dp = fpu["ftw"], fpu["fip"], fpu["fdp"]
    # FXSAVE keeps one "not empty" bit per register; gdb shows the full tag word (3 = empty)
    ftag = sum((0 if ftwx >> i & 1 else 3) << 2 * i for i in range(8))
    return dict(fctrl=fpu["fcw"], fstat=fpu["fsw"], ftag=ftag, fiseg=(last_ip >> 32) & 0xFFFF,
                fioff=last_ip & 0xFFFFFFFF, foseg=(last_dp >> 32) & 0xFFFF,
                fooff=last_dp & 0xFFFFFFFF, fop=fpu["fop"])


def _pc_base(reg: Reg, sregs: dict[str, Any], mode: str) -> int:
    # Real mode: gdb's eip is the linear address CS.base + IP, the address breakpoints
    # (debug registers) and memory use; a firmware's reset vector is 0xFFFFFFF0.
    return sregs["cs"]["base"] if mode == "real" and reg.src == "rip" else 0


def read_value(reg: Reg, st: VcpuState, mode: str) -> bytes:
    """Register *reg* as gdb's little-endian bytes."""
    regs, sregs, fpu = st.regs, st.sregs, st.xsave
    if reg.kind == "gpr":
        value = regs[reg.src] + _pc_base(reg, sregs, mode)
    elif reg.kind == "seg":
        value = sregs[reg.src]["selector"]
    elif reg.kind == "st":
        return bytes(fpu[reg.name][:10])    # 80-bit registers in 16-byte slots
    elif reg.kind == "xmm":
        return bytes(fpu[reg.name])
    elif reg.kind == "base":
        value = sregs[reg.src]["base"]
    elif reg.kind == "mxcsr":
        value = fpu["mxcsr"]
    else:
        value = _x87_ctrl(fpu)[reg.name]
    return (value & ((1 << reg.bits) - 1)).to_bytes(reg.bits // 8, "little")


def write_value(reg: Reg, data: bytes, st: VcpuState, mode: str) -> str:
    """Store gdb's bytes for *reg* into *st*; returns which part changed ("regs",
    "sregs", "xsave") or raises ValueError for a change this stub refuses."""
    regs, sregs, fpu = st.regs, st.sregs, st.xsave
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
        fpu[reg.name] = bytes(data) + fpu[reg.name][10:]
    elif reg.kind == "xmm":
        fpu[reg.name] = bytes(data)
    elif reg.kind == "mxcsr":
        fpu["mxcsr"] = value
    else:
        _write_x87_ctrl(fpu, reg.name, value)
    return "xsave"


def _write_x87_ctrl(fpu: Xsave, name: str, value: int) -> None:
    ctrl = _x87_ctrl(fpu)
    ctrl[name] = value
    fpu["fcw"], fpu["fsw"], fpu["fop"] = ctrl["fctrl"] & 0xFFFF, ctrl["fstat"] & 0xFFFF, ctrl["fop"] & 0xFFFF
    fpu["ftw"] = sum((1 if (ctrl["ftag"] >> 2 * i) & 3 != 3 else 0) << i for i in range(8))
    fpu["fip"] = ctrl["fiseg"] << 32 | ctrl["fioff"]
    fpu["fdp"] = ctrl["foseg"] << 32 | ctrl["fooff"]


# --- hardware breakpoints: DR0-DR3 and DR7 -----------------------------------
HW_SLOTS = 4
# DR7 R/W field per breakpoint kind; gdb's Z1 (exec), Z2 (write), Z3 (read), Z4 (access).
# x86 has no read-only watchpoint: Z3 uses read/write.
_RW = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}
_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_DR7_ONE = 1 << 10      # reserved bit 10 reads as 1


def debugreg(slots: Sequence[tuple[int, int, int] | None]) -> list[int]:
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


_CANONICAL = 1 << 47     # DR0-DR3 hold canonical linear addresses (a 32-bit one is)


def check_watch(kind: int, addr: int, length: int) -> None:
    """ValueError unless x86 debug registers can watch [addr, addr+length) (kind 1: an
    instruction breakpoint at addr)."""
    if not (0 <= addr < _CANONICAL or (1 << 64) - _CANONICAL <= addr < 1 << 64):
        raise ValueError("breakpoint address must be a canonical 64-bit address")
    if kind == 1:
        return
    if length not in _LEN:
        raise ValueError("watchpoint length must be 1, 2, 4 or 8")
    if addr % length:
        raise ValueError("watchpoint address must be aligned to its length")
