# Registers in the comm area (KVM_CAP_SYNC_REGS): zero-copy views of kvm_run.s.regs,
# the general registers (SyncRegs: vcpu.regs), the special registers (SyncSregs, with
# SyncSegment and SyncDtable: vcpu.sync_sregs) and the pending events (SyncEvents:
# vcpu.sync_events).  Every access goes through VcpuCore.sync_ptr(), which fetches the
# set by ioctl when the comm area's copy is not current (the set is not in
# kvm_valid_regs, or something changed the vCPU since the last KVM_RUN), and every write
# through VcpuCore.sync_dirty(), which marks the set in kvm_dirty_regs: the kernel loads
# it at the next KVM_RUN, or kvmsys sends it before the vCPU's next ioctl (flush_sync in
# runstate.pyx), so the last write wins whichever way it was made.

SYNC_REGS = dict(REGS=KVM_SYNC_X86_REGS, SREGS=KVM_SYNC_X86_SREGS, EVENTS=KVM_SYNC_X86_EVENTS)

_SYNC_SET_IOCTL = {KVM_SYNC_X86_REGS: "KVM_SET_REGS", KVM_SYNC_X86_SREGS: "KVM_SET_SREGS",
                   KVM_SYNC_X86_EVENTS: "KVM_SET_VCPU_EVENTS"}


cdef str sync_set_names(uint64_t bits):
    return "|".join(n for n, b in SYNC_REGS.items() if bits & b) or "none"


cdef size_t _off(void *field, void *whole) noexcept:
    return <size_t>(<char *>field - <char *>whole)


cdef kvm_sync_regs _s_sync
# offsets of the sets in kvm_run.s.regs, and of one field (tests plant values there)
SYNC_LAYOUT = dict(regs=_off(&_s_sync.regs, &_s_sync), sregs=_off(&_s_sync.sregs, &_s_sync),
                   events=_off(&_s_sync.events, &_s_sync), sregs_cr2=_off(&_s_sync.sregs.cr2, &_s_sync.sregs))

cdef kvm_segment _s_seg
cdef kvm_dtable _s_dt
cdef kvm_sregs _s_sr
cdef kvm_vcpu_events _s_ev
cdef uint64_t U64 = 0xffffffffffffffff

# name -> (offset in the struct, size in bytes, largest value, bits allowed or 0 for any).
# Ranges are the C field's, narrower where KVM takes the field as a flag (0/1) or a
# short code (a descriptor type, a DPL): KVM would silently cut such a value down.
_SEGMENT_FIELDS = {
    "base": (_off(&_s_seg.base, &_s_seg), sizeof(_s_seg.base), U64, 0),
    "limit": (_off(&_s_seg.limit, &_s_seg), sizeof(_s_seg.limit), 0xffffffff, 0),
    "selector": (_off(&_s_seg.selector, &_s_seg), sizeof(_s_seg.selector), 0xffff, 0),
    "type": (_off(&_s_seg.type, &_s_seg), sizeof(_s_seg.type), 15, 0),
    "present": (_off(&_s_seg.present, &_s_seg), sizeof(_s_seg.present), 1, 0),
    "dpl": (_off(&_s_seg.dpl, &_s_seg), sizeof(_s_seg.dpl), 3, 0),
    "db": (_off(&_s_seg.db, &_s_seg), sizeof(_s_seg.db), 1, 0),
    "s": (_off(&_s_seg.s, &_s_seg), sizeof(_s_seg.s), 1, 0),
    "l": (_off(&_s_seg.l, &_s_seg), sizeof(_s_seg.l), 1, 0),
    "g": (_off(&_s_seg.g, &_s_seg), sizeof(_s_seg.g), 1, 0),
    "avl": (_off(&_s_seg.avl, &_s_seg), sizeof(_s_seg.avl), 1, 0),
    "unusable": (_off(&_s_seg.unusable, &_s_seg), sizeof(_s_seg.unusable), 1, 0),
}
_DTABLE_FIELDS = {
    "base": (_off(&_s_dt.base, &_s_dt), sizeof(_s_dt.base), U64, 0),
    "limit": (_off(&_s_dt.limit, &_s_dt), sizeof(_s_dt.limit), 0xffff, 0),
}
_SREGS_FIELDS = {
    "cr0": (_off(&_s_sr.cr0, &_s_sr), sizeof(_s_sr.cr0), U64, 0),
    "cr2": (_off(&_s_sr.cr2, &_s_sr), sizeof(_s_sr.cr2), U64, 0),
    "cr3": (_off(&_s_sr.cr3, &_s_sr), sizeof(_s_sr.cr3), U64, 0),
    "cr4": (_off(&_s_sr.cr4, &_s_sr), sizeof(_s_sr.cr4), U64, 0),
    "cr8": (_off(&_s_sr.cr8, &_s_sr), sizeof(_s_sr.cr8), U64, 0),
    "efer": (_off(&_s_sr.efer, &_s_sr), sizeof(_s_sr.efer), U64, 0),
    "apic_base": (_off(&_s_sr.apic_base, &_s_sr), sizeof(_s_sr.apic_base), U64, 0),
}
_SREGS_SEGMENTS = {
    "cs": _off(&_s_sr.cs, &_s_sr), "ds": _off(&_s_sr.ds, &_s_sr), "es": _off(&_s_sr.es, &_s_sr),
    "fs": _off(&_s_sr.fs, &_s_sr), "gs": _off(&_s_sr.gs, &_s_sr), "ss": _off(&_s_sr.ss, &_s_sr),
    "tr": _off(&_s_sr.tr, &_s_sr), "ldt": _off(&_s_sr.ldt, &_s_sr),
}
_SREGS_DTABLES = {"gdt": _off(&_s_sr.gdt, &_s_sr), "idt": _off(&_s_sr.idt, &_s_sr)}
_EVENT_FLAGS = (KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR |
                KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_SMM | KVM_VCPUEVENT_VALID_PAYLOAD |
                KVM_VCPUEVENT_VALID_TRIPLE_FAULT)
# The names of kvmsys.state.VcpuEvents (what get_vcpu_events() returns).
_EVENT_FIELDS = {
    "exception_injected": (_off(&_s_ev.exception.injected, &_s_ev), sizeof(_s_ev.exception.injected), 1, 0),
    "exception_nr": (_off(&_s_ev.exception.nr, &_s_ev), sizeof(_s_ev.exception.nr), 0xff, 0),
    "exception_has_error_code": (_off(&_s_ev.exception.has_error_code, &_s_ev),
                                 sizeof(_s_ev.exception.has_error_code), 1, 0),
    "exception_pending": (_off(&_s_ev.exception.pending, &_s_ev), sizeof(_s_ev.exception.pending), 1, 0),
    "exception_error_code": (_off(&_s_ev.exception.error_code, &_s_ev), sizeof(_s_ev.exception.error_code),
                             0xffffffff, 0),
    "interrupt_injected": (_off(&_s_ev.interrupt.injected, &_s_ev), sizeof(_s_ev.interrupt.injected), 1, 0),
    "interrupt_nr": (_off(&_s_ev.interrupt.nr, &_s_ev), sizeof(_s_ev.interrupt.nr), 0xff, 0),
    "interrupt_soft": (_off(&_s_ev.interrupt.soft, &_s_ev), sizeof(_s_ev.interrupt.soft), 1, 0),
    "interrupt_shadow": (_off(&_s_ev.interrupt.shadow, &_s_ev), sizeof(_s_ev.interrupt.shadow), 0xff,
                         KVM_X86_SHADOW_INT_MOV_SS | KVM_X86_SHADOW_INT_STI),
    "nmi_injected": (_off(&_s_ev.nmi.injected, &_s_ev), sizeof(_s_ev.nmi.injected), 1, 0),
    "nmi_pending": (_off(&_s_ev.nmi.pending, &_s_ev), sizeof(_s_ev.nmi.pending), 0xff, 0),
    "nmi_masked": (_off(&_s_ev.nmi.masked, &_s_ev), sizeof(_s_ev.nmi.masked), 1, 0),
    "sipi_vector": (_off(&_s_ev.sipi_vector, &_s_ev), sizeof(_s_ev.sipi_vector), 0xffffffff, 0),
    "flags": (_off(&_s_ev.flags, &_s_ev), sizeof(_s_ev.flags), 0xffffffff, _EVENT_FLAGS),
    "smi_smm": (_off(&_s_ev.smi.smm, &_s_ev), sizeof(_s_ev.smi.smm), 1, 0),
    "smi_pending": (_off(&_s_ev.smi.pending, &_s_ev), sizeof(_s_ev.smi.pending), 1, 0),
    "smi_inside_nmi": (_off(&_s_ev.smi.smm_inside_nmi, &_s_ev), sizeof(_s_ev.smi.smm_inside_nmi), 1, 0),
    "smi_latched_init": (_off(&_s_ev.smi.latched_init, &_s_ev), sizeof(_s_ev.smi.latched_init), 1, 0),
    "triple_fault_pending": (_off(&_s_ev.triple_fault.pending, &_s_ev), sizeof(_s_ev.triple_fault.pending),
                             1, 0),
    "exception_has_payload": (_off(&_s_ev.exception_has_payload, &_s_ev), sizeof(_s_ev.exception_has_payload),
                              1, 0),
    "exception_payload": (_off(&_s_ev.exception_payload, &_s_ev), sizeof(_s_ev.exception_payload), U64, 0),
}


cdef object read_uint(char *p, size_t size):
    cdef uint8_t b
    cdef uint16_t h
    cdef uint32_t w
    cdef uint64_t q
    if size == 1:
        memcpy(&b, p, 1); return b
    if size == 2:
        memcpy(&h, p, 2); return h
    if size == 4:
        memcpy(&w, p, 4); return w
    memcpy(&q, p, 8); return q


cdef void write_uint(char *p, size_t size, uint64_t v) noexcept:
    cdef uint8_t b = <uint8_t>v
    cdef uint16_t h = <uint16_t>v
    cdef uint32_t w = <uint32_t>v
    if size == 1:
        memcpy(p, &b, 1)
    elif size == 2:
        memcpy(p, &h, 2)
    elif size == 4:
        memcpy(p, &w, 4)
    else:
        memcpy(p, &v, 8)


cdef class SyncStruct:
    """A struct (or part of one) of a register set in the comm area, fields by name."""
    cdef VcpuCore vcpu
    cdef int kind               # its KVM_SYNC_X86_* set
    cdef size_t base            # where it starts in the set's struct
    cdef dict fields
    cdef str what               # for messages: "sregs.cs", "events"

    @staticmethod
    cdef SyncStruct _new(type cls, VcpuCore vcpu, int kind, size_t base, dict fields, str what):
        cdef SyncStruct s = cls.__new__(cls)
        s.vcpu, s.kind, s.base, s.fields, s.what = vcpu, kind, base, fields, what
        return s

    def __init__(self, *args, **kwargs):
        raise ArgumentTypeError(f"{type(self).__name__} objects come from a vCPU (vcpu.sync_sregs, "
                                "vcpu.sync_events); they cannot be constructed")

    cdef char *at(self) except NULL:
        if self.vcpu is None:
            raise StateError(f"this {type(self).__name__} was not obtained from a vCPU")
        return self.vcpu.sync_ptr(self.kind) + self.base

    cdef object rd(self, str name):
        off, size, hi, allowed = self.fields[name]
        return read_uint(self.at() + <size_t>off, size)

    cdef int wr(self, str name, v) except -1:
        off, size, hi, allowed = self.fields[name]
        cdef uint64_t value = as_uint(v, f"{self.what}.{name}", hi)
        if allowed and value & ~<uint64_t>allowed:
            raise InvalidArgumentError(f"{self.what}.{name} {value:#x} has bits other than {allowed:#x}")
        write_uint(self.at() + <size_t>off, size, value)
        self.vcpu.sync_dirty(self.kind)
        return 0

    def as_dict(self):
        """Every field by name."""
        return {name: self.rd(name) for name in self.fields}

    def __repr__(self):
        try:
            d = self.as_dict()
        except Exception as e:          # stale or closed: say so, never raise from repr
            return f"<{type(self).__name__} ({e})>"
        return f"<{type(self).__name__} {self.what} " + " ".join(f"{k}={v:#x}" for k, v in d.items()) + ">"


cdef class SyncSegment(SyncStruct):
    """A segment register of the special registers in the comm area (vcpu.sync_sregs.cs, ...)."""
    property base:
        def __get__(self): return self.rd('base')
        def __set__(self, v): self.wr('base', v)
    property limit:
        def __get__(self): return self.rd('limit')
        def __set__(self, v): self.wr('limit', v)
    property selector:
        def __get__(self): return self.rd('selector')
        def __set__(self, v): self.wr('selector', v)
    property type:
        def __get__(self): return self.rd('type')
        def __set__(self, v): self.wr('type', v)
    property present:
        def __get__(self): return self.rd('present')
        def __set__(self, v): self.wr('present', v)
    property dpl:
        def __get__(self): return self.rd('dpl')
        def __set__(self, v): self.wr('dpl', v)
    property db:
        def __get__(self): return self.rd('db')
        def __set__(self, v): self.wr('db', v)
    property s:
        def __get__(self): return self.rd('s')
        def __set__(self, v): self.wr('s', v)
    property l:
        def __get__(self): return self.rd('l')
        def __set__(self, v): self.wr('l', v)
    property g:
        def __get__(self): return self.rd('g')
        def __set__(self, v): self.wr('g', v)
    property avl:
        def __get__(self): return self.rd('avl')
        def __set__(self, v): self.wr('avl', v)
    property unusable:
        def __get__(self): return self.rd('unusable')
        def __set__(self, v): self.wr('unusable', v)


cdef class SyncDtable(SyncStruct):
    """The GDT or IDT register of the special registers in the comm area."""
    property base:
        def __get__(self): return self.rd('base')
        def __set__(self, v): self.wr('base', v)
    property limit:
        def __get__(self): return self.rd('limit')
        def __set__(self, v): self.wr('limit', v)


cdef class SyncSregs(SyncStruct):
    """The special registers in the comm area (KVM_SYNC_X86_SREGS): vcpu.sync_sregs.
    Fields as get_sregs() has them; segments and descriptor tables are views too
    (sregs.cs.selector = 0x10).  as_dict() is what get_sregs() returns."""

    def as_dict(self):
        """The special registers as a dict (what get_sregs() returns)."""
        return (<kvm_sregs *>self.at())[0]

    def __repr__(self):
        try:
            d = self.as_dict()
        except Exception as e:
            return f"<SyncSregs ({e})>"
        segs = " ".join(f"{n}={d[n]['selector']:#x}@{d[n]['base']:#x}" for n in _SREGS_SEGMENTS)
        return (f"<SyncSregs cr0={d['cr0']:#x} cr3={d['cr3']:#x} cr4={d['cr4']:#x} efer={d['efer']:#x} "
                f"{segs} gdt={d['gdt']['base']:#x}/{d['gdt']['limit']:#x} "
                f"idt={d['idt']['base']:#x}/{d['idt']['limit']:#x}>")

    cdef SyncStruct part(self, str name):
        if name in _SREGS_SEGMENTS:
            return SyncStruct._new(SyncSegment, self.vcpu, self.kind, _SREGS_SEGMENTS[name], _SEGMENT_FIELDS,
                                   "sregs." + name)
        return SyncStruct._new(SyncDtable, self.vcpu, self.kind, _SREGS_DTABLES[name], _DTABLE_FIELDS,
                               "sregs." + name)

    property cr0:
        def __get__(self): return self.rd('cr0')
        def __set__(self, v): self.wr('cr0', v)
    property cr2:
        def __get__(self): return self.rd('cr2')
        def __set__(self, v): self.wr('cr2', v)
    property cr3:
        def __get__(self): return self.rd('cr3')
        def __set__(self, v): self.wr('cr3', v)
    property cr4:
        def __get__(self): return self.rd('cr4')
        def __set__(self, v): self.wr('cr4', v)
    property cr8:
        def __get__(self): return self.rd('cr8')
        def __set__(self, v): self.wr('cr8', v)
    property efer:
        def __get__(self): return self.rd('efer')
        def __set__(self, v): self.wr('efer', v)
    property apic_base:
        def __get__(self): return self.rd('apic_base')
        def __set__(self, v): self.wr('apic_base', v)
    @property
    def cs(self): return self.part('cs')
    @property
    def ds(self): return self.part('ds')
    @property
    def es(self): return self.part('es')
    @property
    def fs(self): return self.part('fs')
    @property
    def gs(self): return self.part('gs')
    @property
    def ss(self): return self.part('ss')
    @property
    def tr(self): return self.part('tr')
    @property
    def ldt(self): return self.part('ldt')
    @property
    def gdt(self): return self.part('gdt')
    @property
    def idt(self): return self.part('idt')

    property interrupt_bitmap:
        """The 4 64-bit words of the pending-interrupt bitmap (a tuple); set all 4 at once."""
        def __get__(self):
            cdef kvm_sregs *s = <kvm_sregs *>self.at()
            return tuple(s.interrupt_bitmap[i] for i in range(4))
        def __set__(self, v):
            if not isinstance(v, (tuple, list)) or len(v) != 4:
                raise InvalidArgumentError("sregs.interrupt_bitmap is a tuple or list of 4 ints")
            words = [as_u64(x, "sregs.interrupt_bitmap word") for x in v]
            if sum(bin(w).count("1") for w in words) > 1:
                # KVM queues the lowest vector set and drops the rest: say so instead
                raise InvalidArgumentError("sregs.interrupt_bitmap: KVM takes at most one pending vector")
            cdef kvm_sregs *s = <kvm_sregs *>self.at()
            for i in range(4):
                s.interrupt_bitmap[i] = words[i]
            self.vcpu.sync_dirty(self.kind)


cdef class SyncEvents(SyncStruct):
    """Pending and injected exceptions, interrupts, NMIs and SMIs in the comm area
    (KVM_SYNC_X86_EVENTS): vcpu.sync_events.  Field names are kvmsys.state.VcpuEvents's
    (get_vcpu_events()); ``flags`` (KVM_VCPUEVENT_VALID_*) says which of them KVM sets."""

    def __getitem__(self, str name):
        if name not in self.fields:
            raise KeyError(f"SyncEvents has no field {name!r}; fields: {', '.join(self.fields)}")
        return self.rd(name)

    def __setitem__(self, str name, value):
        if name not in self.fields:
            raise KeyError(f"SyncEvents has no field {name!r}; fields: {', '.join(self.fields)}")
        self.wr(name, value)

    def keys(self):
        return self.fields.keys()

    def __repr__(self):
        try:
            d = self.as_dict()
        except Exception as e:
            return f"<SyncEvents ({e})>"
        return "<SyncEvents " + (" ".join(f"{k}={v:#x}" for k, v in d.items() if v) or "(all zero)") + ">"

    property exception_injected:
        def __get__(self): return self.rd('exception_injected')
        def __set__(self, v): self.wr('exception_injected', v)
    property exception_nr:
        def __get__(self): return self.rd('exception_nr')
        def __set__(self, v): self.wr('exception_nr', v)
    property exception_has_error_code:
        def __get__(self): return self.rd('exception_has_error_code')
        def __set__(self, v): self.wr('exception_has_error_code', v)
    property exception_pending:
        def __get__(self): return self.rd('exception_pending')
        def __set__(self, v): self.wr('exception_pending', v)
    property exception_error_code:
        def __get__(self): return self.rd('exception_error_code')
        def __set__(self, v): self.wr('exception_error_code', v)
    property interrupt_injected:
        def __get__(self): return self.rd('interrupt_injected')
        def __set__(self, v): self.wr('interrupt_injected', v)
    property interrupt_nr:
        def __get__(self): return self.rd('interrupt_nr')
        def __set__(self, v): self.wr('interrupt_nr', v)
    property interrupt_soft:
        def __get__(self): return self.rd('interrupt_soft')
        def __set__(self, v): self.wr('interrupt_soft', v)
    property interrupt_shadow:
        def __get__(self): return self.rd('interrupt_shadow')
        def __set__(self, v): self.wr('interrupt_shadow', v)
    property nmi_injected:
        def __get__(self): return self.rd('nmi_injected')
        def __set__(self, v): self.wr('nmi_injected', v)
    property nmi_pending:
        def __get__(self): return self.rd('nmi_pending')
        def __set__(self, v): self.wr('nmi_pending', v)
    property nmi_masked:
        def __get__(self): return self.rd('nmi_masked')
        def __set__(self, v): self.wr('nmi_masked', v)
    property sipi_vector:
        def __get__(self): return self.rd('sipi_vector')
        def __set__(self, v): self.wr('sipi_vector', v)
    property flags:
        def __get__(self): return self.rd('flags')
        def __set__(self, v): self.wr('flags', v)
    property smi_smm:
        def __get__(self): return self.rd('smi_smm')
        def __set__(self, v): self.wr('smi_smm', v)
    property smi_pending:
        def __get__(self): return self.rd('smi_pending')
        def __set__(self, v): self.wr('smi_pending', v)
    property smi_inside_nmi:
        def __get__(self): return self.rd('smi_inside_nmi')
        def __set__(self, v): self.wr('smi_inside_nmi', v)
    property smi_latched_init:
        def __get__(self): return self.rd('smi_latched_init')
        def __set__(self, v): self.wr('smi_latched_init', v)
    property triple_fault_pending:
        def __get__(self): return self.rd('triple_fault_pending')
        def __set__(self, v): self.wr('triple_fault_pending', v)
    property exception_has_payload:
        def __get__(self): return self.rd('exception_has_payload')
        def __set__(self, v): self.wr('exception_has_payload', v)
    property exception_payload:
        def __get__(self): return self.rd('exception_payload')
        def __set__(self, v): self.wr('exception_payload', v)


cdef class SyncRegs:
    """General registers in the comm area (KVM_CAP_SYNC_REGS): vcpu.regs.  Reads cost no
    ioctl while REGS is a valid set (the default); a write marks them dirty, so the kernel
    loads them at the next KVM_RUN or before the vCPU's next ioctl."""
    cdef VcpuCore vcpu

    @staticmethod
    cdef SyncRegs _new(VcpuCore vcpu):
        cdef SyncRegs s = SyncRegs.__new__(SyncRegs)
        s.vcpu = vcpu
        return s

    def __init__(self, *args, **kwargs):
        raise ArgumentTypeError("SyncRegs objects come from vcpu.regs; they cannot be constructed")

    cdef inline kvm_regs *p(self) except NULL:
        # Checked on every access: regs of a vCPU handed to another owner are dead.
        if self.vcpu is None:
            raise StateError("these registers were not obtained from a vCPU")
        return <kvm_regs *>self.vcpu.sync_ptr(KVM_SYNC_X86_REGS)

    cdef inline int dirty(self) except -1:
        return self.vcpu.sync_dirty(KVM_SYNC_X86_REGS)

    def as_dict(self):
        """The registers as a dict (what get_regs() returns)."""
        return self.p()[0]

    def __repr__(self):
        try:
            r = self.p()[0]
        except Exception as e:          # stale or closed: say so, never raise from repr
            return f"<SyncRegs ({e})>"
        return "<SyncRegs " + " ".join(f"{k}={v:#x}" for k, v in r.items()) + ">"

    property rax:
        def __get__(self): return self.p().rax
        def __set__(self, v): self.p().rax = as_u64(v, "rax"); self.dirty()
    property rbx:
        def __get__(self): return self.p().rbx
        def __set__(self, v): self.p().rbx = as_u64(v, "rbx"); self.dirty()
    property rcx:
        def __get__(self): return self.p().rcx
        def __set__(self, v): self.p().rcx = as_u64(v, "rcx"); self.dirty()
    property rdx:
        def __get__(self): return self.p().rdx
        def __set__(self, v): self.p().rdx = as_u64(v, "rdx"); self.dirty()
    property rsi:
        def __get__(self): return self.p().rsi
        def __set__(self, v): self.p().rsi = as_u64(v, "rsi"); self.dirty()
    property rdi:
        def __get__(self): return self.p().rdi
        def __set__(self, v): self.p().rdi = as_u64(v, "rdi"); self.dirty()
    property rsp:
        def __get__(self): return self.p().rsp
        def __set__(self, v): self.p().rsp = as_u64(v, "rsp"); self.dirty()
    property rbp:
        def __get__(self): return self.p().rbp
        def __set__(self, v): self.p().rbp = as_u64(v, "rbp"); self.dirty()
    property r8:
        def __get__(self): return self.p().r8
        def __set__(self, v): self.p().r8 = as_u64(v, "r8"); self.dirty()
    property r9:
        def __get__(self): return self.p().r9
        def __set__(self, v): self.p().r9 = as_u64(v, "r9"); self.dirty()
    property r10:
        def __get__(self): return self.p().r10
        def __set__(self, v): self.p().r10 = as_u64(v, "r10"); self.dirty()
    property r11:
        def __get__(self): return self.p().r11
        def __set__(self, v): self.p().r11 = as_u64(v, "r11"); self.dirty()
    property r12:
        def __get__(self): return self.p().r12
        def __set__(self, v): self.p().r12 = as_u64(v, "r12"); self.dirty()
    property r13:
        def __get__(self): return self.p().r13
        def __set__(self, v): self.p().r13 = as_u64(v, "r13"); self.dirty()
    property r14:
        def __get__(self): return self.p().r14
        def __set__(self, v): self.p().r14 = as_u64(v, "r14"); self.dirty()
    property r15:
        def __get__(self): return self.p().r15
        def __set__(self, v): self.p().r15 = as_u64(v, "r15"); self.dirty()
    property rip:
        def __get__(self): return self.p().rip
        def __set__(self, v): self.p().rip = as_u64(v, "rip"); self.dirty()
    property rflags:
        def __get__(self): return self.p().rflags
        def __set__(self, v): self.p().rflags = as_u64(v, "rflags"); self.dirty()
