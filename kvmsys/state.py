"""Typed vCPU state: the kernel's structs with their fields by name.

Each class is a bytearray holding exactly the bytes of the kernel struct, so it
round-trips through the set_*/get_* ioctls unchanged and stays usable as bytes;
a string index reads or writes one field by its name::

    lapic = vcpu.get_lapic()
    lapic["svr"] |= 0x100          # software-enable the local APIC
    vcpu.set_lapic(lapic)
    fpu = vcpu.get_fpu(); fpu["fcw"], fpu["mxcsr"]

Layouts are those of <asm/kvm.h> (x86) and of the hardware formats they carry
(the xAPIC register page, the XSAVE area); the sizes are checked against the
compiled core's sizeof() in the tests.
"""
from __future__ import annotations

import struct
from typing import Any, KeysView

__all__ = ["KernelStruct", "Fpu", "Lapic", "VcpuEvents", "Xsave", "Xcrs"]


class KernelStruct(bytearray):
    """The bytes of one kernel struct, with named fields (see FIELDS)."""
    SIZE = 0                      # exact size in bytes (0: variable, at least MIN_SIZE)
    MIN_SIZE = 0
    FIELDS: dict[str, tuple[int, str]] = {}     # name -> (offset, struct format)

    def __init__(self, data: bytes | bytearray | memoryview | None = None) -> None:
        from .errors import InvalidArgumentError
        if data is None:
            data = bytes(self.SIZE or self.MIN_SIZE)
        elif isinstance(data, (int, str)):
            raise InvalidArgumentError(f"{type(self).__name__} takes bytes, not {type(data).__name__}")
        super().__init__(data)
        n = len(self)
        if (self.SIZE and n != self.SIZE) or n < self.MIN_SIZE:
            want = self.SIZE or f"at least {self.MIN_SIZE}"
            raise InvalidArgumentError(f"{type(self).__name__} takes {want} bytes, got {n}")

    def _field(self, name: str) -> tuple[int, str]:
        try:
            return self.FIELDS[name]
        except KeyError:
            raise KeyError(f"{type(self).__name__} has no field {name!r}; "
                           f"fields: {', '.join(self.FIELDS)}") from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            off, fmt = self._field(key)
            value = struct.unpack_from("<" + fmt, self, off)
            return value[0] if len(value) == 1 else value
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, str):
            off, fmt = self._field(key)
            from .errors import InvalidArgumentError
            try:
                struct.pack_into("<" + fmt, self, off, *(value if isinstance(value, tuple) else (value,)))
            except struct.error as e:
                raise InvalidArgumentError(f"{type(self).__name__}[{key!r}] = {value!r}: {e}") from None
            return
        super().__setitem__(key, value)

    def keys(self) -> KeysView[str]:
        return self.FIELDS.keys()

    def as_dict(self) -> dict[str, Any]:
        """Every named field."""
        return {name: self[name] for name in self.FIELDS}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:#x}" for k, v in self.as_dict().items()
                          if isinstance(v, int) and v)
        return f"<{type(self).__name__} {len(self)} bytes: {shown}>"

    def __reduce__(self) -> tuple[type[KernelStruct], tuple[bytes]]:
        return (type(self), (bytes(self),))


def _array(prefix: str, base: int, count: int, stride: int, fmt: str) -> dict[str, tuple[int, str]]:
    return {f"{prefix}{i}": (base + i * stride, fmt) for i in range(count)}


class Fpu(KernelStruct):
    """struct kvm_fpu (KVM_GET_FPU): x87 and SSE state."""
    SIZE = 416
    FIELDS = {**_array("st", 0, 8, 16, "16s"),
              "fcw": (128, "H"), "fsw": (130, "H"), "ftwx": (132, "B"), "last_opcode": (134, "H"),
              "last_ip": (136, "Q"), "last_dp": (144, "Q"),
              **_array("xmm", 152, 16, 16, "16s"),
              "mxcsr": (408, "I")}


# The xAPIC register page (Intel SDM vol. 3, "Local APIC Register Address Map"): each
# register is 32 bits at a 16-byte aligned offset.
_LAPIC_REGS = {
    "id": 0x20, "version": 0x30, "tpr": 0x80, "apr": 0x90, "ppr": 0xA0, "eoi": 0xB0,
    "rrd": 0xC0, "ldr": 0xD0, "dfr": 0xE0, "svr": 0xF0, "esr": 0x280, "lvt_cmci": 0x2F0,
    "icr": 0x300, "icr2": 0x310, "lvt_timer": 0x320, "lvt_thermal": 0x330, "lvt_pmc": 0x340,
    "lvt_lint0": 0x350, "lvt_lint1": 0x360, "lvt_error": 0x370, "timer_initial": 0x380,
    "timer_current": 0x390, "timer_divide": 0x3E0,
}


class Lapic(KernelStruct):
    """struct kvm_lapic_state (KVM_GET_LAPIC): the local APIC's register page.

    Registers by name (lapic["svr"]); isr0..7, tmr0..7, irr0..7 are the 32-bit words
    of the 256-bit vector sets, also as sets of vectors: lapic.irr, lapic.isr, lapic.tmr."""
    SIZE = 1024
    FIELDS = {**{k: (v, "I") for k, v in _LAPIC_REGS.items()},
              **_array("isr", 0x100, 8, 0x10, "I"), **_array("tmr", 0x180, 8, 0x10, "I"),
              **_array("irr", 0x200, 8, 0x10, "I")}

    def _vectors(self, prefix: str) -> set[int]:
        return {32 * i + b for i in range(8) for b in range(32) if self[f"{prefix}{i}"] >> b & 1}

    @property
    def irr(self) -> set[int]:
        """Vectors requested (the Interrupt Request Register)."""
        return self._vectors("irr")

    @property
    def isr(self) -> set[int]:
        """Vectors in service."""
        return self._vectors("isr")

    @property
    def tmr(self) -> set[int]:
        """Vectors accepted as level-triggered."""
        return self._vectors("tmr")

    def apic_id(self, x2apic: bool = False, x2apic_format: bool = False) -> int:
        """The APIC id.  In xAPIC mode, and in x2APIC mode unless the VM enabled
        KVM_X2APIC_API_USE_32BIT_IDS (*x2apic_format*), KVM keeps it in bits 31:24 of the
        ID register; with that API in x2APIC mode the register holds the full 32-bit id."""
        return int(self["id"]) if (x2apic and x2apic_format) else int(self["id"]) >> 24


class VcpuEvents(KernelStruct):
    """struct kvm_vcpu_events (KVM_GET_VCPU_EVENTS): pending/injected exceptions,
    interrupts, NMIs and SMIs; ``flags`` (KVM_VCPUEVENT_VALID_*) says which fields to set."""
    SIZE = 64
    FIELDS = {
        "exception_injected": (0, "B"), "exception_nr": (1, "B"), "exception_has_error_code": (2, "B"),
        "exception_pending": (3, "B"), "exception_error_code": (4, "I"),
        "interrupt_injected": (8, "B"), "interrupt_nr": (9, "B"), "interrupt_soft": (10, "B"),
        "interrupt_shadow": (11, "B"),
        "nmi_injected": (12, "B"), "nmi_pending": (13, "B"), "nmi_masked": (14, "B"),
        "sipi_vector": (16, "I"), "flags": (20, "I"),
        "smi_smm": (24, "B"), "smi_pending": (25, "B"), "smi_inside_nmi": (26, "B"),
        "smi_latched_init": (27, "B"), "triple_fault_pending": (28, "B"),
        "exception_has_payload": (55, "B"), "exception_payload": (56, "Q"),
    }


class Xsave(KernelStruct):
    """struct kvm_xsave (KVM_GET_XSAVE / KVM_GET_XSAVE2): the XSAVE area, 4 KiB or the
    size KVM_CAP_XSAVE2 reports.  Fields of the legacy region and the XSAVE header
    (Intel SDM vol. 1, "XSAVE-Managed State")."""
    MIN_SIZE = 4096
    FIELDS = {"fcw": (0, "H"), "fsw": (2, "H"), "ftw": (4, "B"), "fop": (6, "H"),
              "fip": (8, "Q"), "fdp": (16, "Q"), "mxcsr": (24, "I"), "mxcsr_mask": (28, "I"),
              **_array("st", 32, 8, 16, "16s"), **_array("xmm", 160, 16, 16, "16s"),
              "xstate_bv": (512, "Q"), "xcomp_bv": (520, "Q")}


class Xcrs(KernelStruct):
    """struct kvm_xcrs (KVM_GET_XCRS): extended control registers.  xcrs["xcr0"] reads or
    writes the value of the entry for XCR0 (entries are (index, value) pairs)."""
    SIZE = 392
    MAX = 16
    FIELDS = {"nr_xcrs": (0, "I"), "flags": (4, "I")}

    def entries(self) -> dict[int, int]:
        """{XCR index: value} for the nr_xcrs entries."""
        n = min(self["nr_xcrs"], self.MAX)
        return {struct.unpack_from("<I", self, 8 + 16 * i)[0]: struct.unpack_from("<Q", self, 16 + 16 * i)[0]
                for i in range(n)}

    def _slot(self, name: str) -> int:
        if name.startswith("xcr") and name[3:].isdigit():
            index = int(name[3:])
            for i in range(min(self["nr_xcrs"], self.MAX)):
                if struct.unpack_from("<I", self, 8 + 16 * i)[0] == index:
                    return i
        raise KeyError(f"no {name!r} in these XCRs (have {sorted(self.entries())})")

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str) and key not in self.FIELDS:
            return struct.unpack_from("<Q", self, 16 + 16 * self._slot(key))[0]
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, str) and key not in self.FIELDS:
            struct.pack_into("<Q", self, 16 + 16 * self._slot(key), value)
            return
        super().__setitem__(key, value)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), **{f"xcr{i}": v for i, v in self.entries().items()}}
