# Exits decoded into typed values that read the comm area in place (no copy):
# an exit is valid until the vCPU runs again.

cdef enum:
    # kvmsys's own stop reasons, beside KVM's exit reasons (which are >= 0)
    KVMSYS_EXIT_STOP = -1
    KVMSYS_EXIT_KICK = -2
    KVMSYS_EXIT_DEADLINE = -3
    KVMSYS_EXIT_BUDGET = -4


_EXIT_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL", KVM_EXIT_DEBUG: "DEBUG", KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO", KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN", KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY", KVM_EXIT_INTR: "INTR",
    KVM_EXIT_SET_TPR: "SET_TPR", KVM_EXIT_TPR_ACCESS: "TPR_ACCESS",
    KVM_EXIT_NMI: "NMI", KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT", KVM_EXIT_IOAPIC_EOI: "IOAPIC_EOI",
    KVM_EXIT_X86_RDMSR: "X86_RDMSR", KVM_EXIT_X86_WRMSR: "X86_WRMSR",
    KVM_EXIT_DIRTY_RING_FULL: "DIRTY_RING_FULL", KVM_EXIT_NOTIFY: "NOTIFY",
    KVMSYS_EXIT_STOP: "STOP", KVMSYS_EXIT_KICK: "KICK", KVMSYS_EXIT_DEADLINE: "DEADLINE",
    KVMSYS_EXIT_BUDGET: "BUDGET",
}


cpdef str exit_name(int reason):
    """Name of a KVM exit reason (or of a kvmsys stop reason)."""
    return _EXIT_NAMES.get(reason, f"EXIT_{reason}")


cdef class Exit:
    """Why run() returned.  Subclasses decode each exit kind; fields read the comm area."""
    cdef readonly VcpuCore vcpu
    cdef readonly int reason
    cdef Mapping page           # keeps the comm area mapped while the exit is alive
    cdef kvm_run *run

    @staticmethod
    cdef Exit _new_of(type cls, VcpuCore vcpu, int reason):
        cdef Exit e = cls.__new__(cls)
        e.vcpu = vcpu
        e.reason = reason
        e.page = vcpu.page
        e.run = vcpu.v.run
        return e

    def __init__(self, *args, **kwargs):
        raise ArgumentTypeError(f"{type(self).__name__} objects come from run(); they cannot be constructed")

    cdef inline kvm_run *live(self) except NULL:
        # Built without a comm area (Exit.__new__ from Python), or the vCPU was closed.
        if self.run == NULL:
            raise StateError(f"this {type(self).__name__} has no comm area behind it (not made by run())")
        return self.run

    @property
    def name(self):
        return exit_name(self.reason)

    def __repr__(self):
        if self.run == NULL:
            return f"<{type(self).__name__} {self.name} (no comm area)>"
        return f"<{type(self).__name__} {self.name}>"


cdef class IoExit(Exit):
    """KVM_EXIT_IO: a port access (count > 1 for string instructions)."""

    @property
    def port(self):
        return self.live().io.port

    @property
    def size(self):
        return self.live().io.size

    @property
    def count(self):
        return self.live().io.count

    @property
    def is_in(self):
        return self.live().io.direction == KVM_EXIT_IO_IN

    @property
    def direction(self):
        return "in" if self.live().io.direction == KVM_EXIT_IO_IN else "out"

    @property
    def data(self):
        """Writable zero-copy view of the data (size * count bytes): fill it for IN."""
        cdef uint64_t off = self.live().io.data_offset
        cdef uint64_t n = <uint64_t>self.live().io.size * self.live().io.count
        self.page.check_range(off, n)
        return memoryview(self.page)[off:off + n]

    @property
    def value(self):
        """The first element as an unsigned little-endian int."""
        return int.from_bytes(self.data[:self.live().io.size], "little")

    @value.setter
    def value(self, v):
        cdef int size = self.live().io.size
        cdef uint64_t x = as_u64(v, "value")
        if not (1 <= size <= 8 and (size == 8 or x >> (8 * size) == 0)) or self.live().io.count < 1:
            raise InvalidArgumentError(f"{x:#x} does not fit in {size} bytes (count {self.run.io.count})")
        self.data[:size] = (<object>x).to_bytes(size, "little")

    def __repr__(self):
        if self.run == NULL:
            return Exit.__repr__(self)
        return f"<IoExit {self.direction} port={self.port:#x} size={self.size} count={self.count}>"


cdef class MmioExit(Exit):
    """KVM_EXIT_MMIO: an access to guest-physical memory with no memory slot."""

    @property
    def address(self):
        return self.live().mmio.phys_addr

    @property
    def length(self):
        return self.live().mmio.len

    @property
    def is_write(self):
        return bool(self.live().mmio.is_write)

    @property
    def data(self):
        """Writable zero-copy view of the 1..8 data bytes: fill it for a read."""
        cdef uint32_t n = self.live().mmio.len
        require(0 < n <= 8, f"invalid MMIO length {n}")
        cdef uint64_t off = <uint64_t>(<char *>self.live().mmio.data - <char *>self.run)
        return memoryview(self.page)[off:off + n]

    @property
    def value(self):
        return int.from_bytes(self.data, "little")

    @value.setter
    def value(self, v):
        cdef int n = self.live().mmio.len
        cdef uint64_t x = as_u64(v, "value")
        if not (1 <= n <= 8 and (n == 8 or x >> (8 * n) == 0)):
            raise InvalidArgumentError(f"{x:#x} does not fit in {n} bytes")
        self.data[:] = (<object>x).to_bytes(n, "little")

    def __repr__(self):
        if self.run == NULL:
            return Exit.__repr__(self)
        return f"<MmioExit {'write' if self.is_write else 'read'} address={self.address:#x} length={self.length}>"


cdef class HltExit(Exit):
    """KVM_EXIT_HLT: the guest halted (no in-kernel irqchip)."""


cdef class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: a triple fault; running again gives SHUTDOWN again."""


cdef class IntrExit(Exit):
    """KVM_EXIT_INTR: a signal interrupted KVM_RUN."""


cdef class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    @property
    def hardware_entry_failure_reason(self):
        return self.live().fail_entry.hardware_entry_failure_reason

    @property
    def cpu(self):
        return self.live().fail_entry.cpu


cdef class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: e.g. an instruction the emulator cannot handle (suberror 1)."""

    @property
    def suberror(self):
        return self.live().internal.suberror

    @property
    def data(self):
        return tuple(self.live().internal.data[i] for i in range(min(self.live().internal.ndata, 16)))


cdef class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or crash requested by the guest."""

    @property
    def type(self):
        return self.live().system_event.type

    @property
    def data(self):
        return tuple(self.live().system_event.data[i] for i in range(min(self.live().system_event.ndata, 16)))


cdef class DebugExit(Exit):
    """KVM_EXIT_DEBUG: single step or breakpoint."""

    @property
    def exception(self):
        return self.live().debug.arch.exception

    @property
    def pc(self):
        return self.live().debug.arch.pc

    @property
    def dr6(self):
        return self.live().debug.arch.dr6

    @property
    def dr7(self):
        return self.live().debug.arch.dr7


cdef class UnknownExit(Exit):
    """Any exit reason kvmsys does not decode; ``reason`` carries its number."""


cdef class StopExit(Exit):
    """The guest asked to stop (isa-debug-exit, or HLT when asked); ``status`` says how."""
    cdef readonly uint64_t status

    def __repr__(self):
        return f"<StopExit status={self.status}>"


cdef class KickExit(Exit):
    """run() returned because of kick()."""


cdef class DeadlineExit(Exit):
    """run() returned because its timeout passed (the watchdog)."""


cdef class BudgetExit(Exit):
    """run() returned because its exit budget is spent."""


_EXIT_TYPES = {
    KVM_EXIT_IO: IoExit, KVM_EXIT_MMIO: MmioExit, KVM_EXIT_HLT: HltExit,
    KVM_EXIT_SHUTDOWN: ShutdownExit, KVM_EXIT_INTR: IntrExit, KVM_EXIT_FAIL_ENTRY: FailEntryExit,
    KVM_EXIT_INTERNAL_ERROR: InternalErrorExit, KVM_EXIT_SYSTEM_EVENT: SystemEventExit,
    KVM_EXIT_DEBUG: DebugExit,
}


cdef Exit make_exit(VcpuCore vcpu):
    cdef int reason = vcpu.v.run.exit_reason
    cdef Exit e
    # IO and MMIO are the exits that reach Python handlers most: allocate them directly
    if reason == KVM_EXIT_IO:
        e = IoExit.__new__(IoExit)
    elif reason == KVM_EXIT_MMIO:
        e = MmioExit.__new__(MmioExit)
    else:
        return Exit._new_of(_EXIT_TYPES.get(reason, UnknownExit), vcpu, reason)
    e.vcpu = vcpu
    e.reason = reason
    e.page = vcpu.page
    e.run = vcpu.v.run
    return e


cdef class SyncRegs:
    """General registers in the comm area (KVM_CAP_SYNC_REGS).  Reads cost no ioctl;
    a write marks them dirty so the kernel loads them on the next KVM_RUN."""
    cdef VcpuCore vcpu
    cdef Mapping page
    cdef kvm_regs *r
    cdef kvm_run *run

    @staticmethod
    cdef SyncRegs _new(VcpuCore vcpu):
        cdef SyncRegs s = SyncRegs.__new__(SyncRegs)
        s.vcpu = vcpu
        s.page = vcpu.page
        s.run = vcpu.v.run
        s.r = &vcpu.v.run.s.regs.regs
        return s

    def __init__(self, *args, **kwargs):
        raise ArgumentTypeError("SyncRegs objects come from vcpu.regs; they cannot be constructed")

    cdef inline kvm_regs *live(self) except NULL:
        if self.r == NULL:
            raise StateError("these registers have no comm area behind them (not made by vcpu.regs)")
        return self.r

    cdef inline void dirty(self):
        self.run.kvm_dirty_regs |= KVM_SYNC_X86_REGS

    def as_dict(self):
        return self.live()[0]

    property rax:
        def __get__(self): return self.live().rax
        def __set__(self, v): self.live().rax = as_u64(v, "rax"); self.dirty()
    property rbx:
        def __get__(self): return self.live().rbx
        def __set__(self, v): self.live().rbx = as_u64(v, "rbx"); self.dirty()
    property rcx:
        def __get__(self): return self.live().rcx
        def __set__(self, v): self.live().rcx = as_u64(v, "rcx"); self.dirty()
    property rdx:
        def __get__(self): return self.live().rdx
        def __set__(self, v): self.live().rdx = as_u64(v, "rdx"); self.dirty()
    property rsi:
        def __get__(self): return self.live().rsi
        def __set__(self, v): self.live().rsi = as_u64(v, "rsi"); self.dirty()
    property rdi:
        def __get__(self): return self.live().rdi
        def __set__(self, v): self.live().rdi = as_u64(v, "rdi"); self.dirty()
    property rsp:
        def __get__(self): return self.live().rsp
        def __set__(self, v): self.live().rsp = as_u64(v, "rsp"); self.dirty()
    property rbp:
        def __get__(self): return self.live().rbp
        def __set__(self, v): self.live().rbp = as_u64(v, "rbp"); self.dirty()
    property r8:
        def __get__(self): return self.live().r8
        def __set__(self, v): self.live().r8 = as_u64(v, "r8"); self.dirty()
    property r9:
        def __get__(self): return self.live().r9
        def __set__(self, v): self.live().r9 = as_u64(v, "r9"); self.dirty()
    property r10:
        def __get__(self): return self.live().r10
        def __set__(self, v): self.live().r10 = as_u64(v, "r10"); self.dirty()
    property r11:
        def __get__(self): return self.live().r11
        def __set__(self, v): self.live().r11 = as_u64(v, "r11"); self.dirty()
    property r12:
        def __get__(self): return self.live().r12
        def __set__(self, v): self.live().r12 = as_u64(v, "r12"); self.dirty()
    property r13:
        def __get__(self): return self.live().r13
        def __set__(self, v): self.live().r13 = as_u64(v, "r13"); self.dirty()
    property r14:
        def __get__(self): return self.live().r14
        def __set__(self, v): self.live().r14 = as_u64(v, "r14"); self.dirty()
    property r15:
        def __get__(self): return self.live().r15
        def __set__(self, v): self.live().r15 = as_u64(v, "r15"); self.dirty()
    property rip:
        def __get__(self): return self.live().rip
        def __set__(self, v): self.live().rip = as_u64(v, "rip"); self.dirty()
    property rflags:
        def __get__(self): return self.live().rflags
        def __set__(self, v): self.live().rflags = as_u64(v, "rflags"); self.dirty()
