# Exits decoded into typed values that read the comm area in place (no copy):
# an exit is valid until the vCPU runs again.

from cpython.ref cimport Py_REFCNT
import inspect as _inspect

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
    KVM_EXIT_X86_BUS_LOCK: "X86_BUS_LOCK", KVM_EXIT_MEMORY_FAULT: "MEMORY_FAULT",
    KVMSYS_EXIT_STOP: "STOP", KVMSYS_EXIT_KICK: "KICK", KVMSYS_EXIT_DEADLINE: "DEADLINE",
    KVMSYS_EXIT_BUDGET: "BUDGET",
}


cdef object _enums = None


cdef object as_enum(str name, value):
    """*value* as the kvmsys IntEnum *name* (kvmsys.enums), or the plain int if unknown."""
    global _enums
    if _enums is None:
        import kvmsys.enums
        _enums = kvmsys.enums
    try:
        return getattr(_enums, name)(value)
    except ValueError:
        return value


cdef str name_of_exit(int reason):
    return _EXIT_NAMES.get(reason, f"EXIT_{reason}")


def exit_name(reason):
    """Name of a KVM exit reason (or of a kvmsys stop reason): a 32-bit int."""
    return name_of_exit(as_int(reason, "exit reason", -0x80000000, 0x7fffffff))


cdef class Exit:
    """Why run() returned.  Subclasses decode each exit kind; fields read the comm area.

    ``vcpu``: the vCPU that exited; ``reason``: KVM_EXIT_* (>= 0) or one of kvmsys's
    own stop reasons (< 0), a kvmsys.ExitReason value."""
    cdef readonly VcpuCore vcpu
    cdef readonly int reason
    cdef Mapping page           # keeps the comm area mapped while the exit is alive
    cdef kvm_run *_run
    cdef uint64_t seq           # the vCPU's run_seq when it was made

    @staticmethod
    cdef Exit _new_of(type cls, VcpuCore vcpu, int reason):
        cdef Exit e = cls.__new__(cls)
        e.stamp(vcpu, reason)
        return e

    cdef inline void stamp(self, VcpuCore vcpu, int reason):
        # this vCPU's exit of its current run (a reused exit is stamped again: the same
        # vCPU and mapping, whose reference counts it leaves alone, so a run that
        # returns after a long KVM_RUN, with cold caches, misses no line for them)
        if self.vcpu is not vcpu:
            self.vcpu = vcpu
        self.reason = reason
        if self.page is not vcpu.page:
            self.page = vcpu.page
        self._run = vcpu.v.run
        self.seq = vcpu.v.run_seq

    cdef int check(self) except -1:
        # Refused once the vCPU ran again or went to another owner (or process), so an
        # old exit never shows a newer one.  A closed fd vCPU's last exit stays readable.
        cdef VcpuCore v = self.vcpu
        if v is None:
            raise StateError(f"this {type(self).__name__} was not produced by run()")
        if v.gone is not None or v.forkgen != kvmsys_fork_generation or v.v == NULL:
            v.require_open()
        if self.seq != v.v.run_seq:
            raise StaleVcpuError(f"this {type(self).__name__} is stale: vCPU {v.id} ran again since; "
                                 "read an exit before the next run()")
        return 0

    cdef inline kvm_run *cur(self) except NULL:
        self.check()
        return self._run

    @classmethod
    def _new(cls, vcpu, reason):
        return Exit._new_of(cls, of_type(vcpu, VcpuCore, "vcpu"),
                            as_int(reason, "exit reason", -0x80000000, 0x7fffffff))

    def __init__(self, *args, **kwargs):
        raise ArgumentTypeError(f"{type(self).__name__} objects come from run(); they cannot be constructed")

    @property
    def name(self):
        """The exit reason's name ("IO", "HLT", ...; kvmsys's own: "STOP", "KICK", ...)."""
        return name_of_exit(self.reason)

    def __repr__(self):
        # the fields (properties) its class decodes, read now: an exit of an earlier run
        # is stale, and says so instead of raising
        fields = []
        for k, d in type(self).__dict__.items():
            if k.startswith("_") or k == "name" or not _inspect.isgetsetdescriptor(d):
                continue
            try:
                v = getattr(self, k)
            except Exception:
                return f"<{type(self).__name__} {self.name} (stale)>"
            fields.append(f" {k}={v:#x}" if type(v) is int else f" {k}={v!r}")
        return f"<{type(self).__name__} {self.name}{''.join(fields)}>"


cdef inline uint8_t *comm_bytes(Exit e, uint64_t off, uint64_t n) except NULL:
    # [off, +n) of a current exit's comm area, checked (the offset is the comm area's)
    e.page.check_range(off, n)
    return e.page.addr + off


cdef object comm_slice(Exit e, uint64_t off, uint64_t n):
    # [off, +n) of a current exit's comm area, zero-copy: a slice of the one view
    # its vCPU object keeps (a fresh memoryview per exit costs a Python handler
    # more than the slice)
    cdef VcpuCore v = e.vcpu
    e.page.check_range(off, n)
    if v.page is not e.page:        # the last exit of a closed vCPU: its own mapping
        return memoryview(e.page)[off:off + n]
    if v.page_view is None:
        v.page_view = memoryview(v.page)
    return v.page_view[off:off + n]


cdef class IoExit(Exit):
    """KVM_EXIT_IO: a port access (count > 1 for string instructions)."""

    @property
    def port(self):
        """The I/O port."""
        return self.cur().io.port

    @property
    def size(self):
        """Bytes per element: 1, 2 or 4."""
        return self.cur().io.size

    @property
    def count(self):
        """Elements transferred (> 1 for rep ins/outs)."""
        return self.cur().io.count

    @property
    def is_in(self):
        """True for a read of the port (IN): fill data before the next run."""
        return self.cur().io.direction == KVM_EXIT_IO_IN

    @property
    def direction(self):
        """"in" or "out"."""
        return "in" if self.cur().io.direction == KVM_EXIT_IO_IN else "out"

    @property
    def data(self):
        """Writable zero-copy view of the data (size * count bytes): fill it for IN."""
        cdef kvm_run *r = self.cur()
        return comm_slice(self, r.io.data_offset, <uint64_t>r.io.size * r.io.count)

    @property
    def value(self):
        """The first element as an unsigned little-endian int."""
        cdef kvm_run *r = self.cur()
        cdef uint32_t size = r.io.size
        if not (1 <= size <= 8):     # (the message is built only when raised)
            raise InvalidArgumentError(f"invalid port access size {size}")
        return le_value(comm_bytes(self, r.io.data_offset, size), size)

    @value.setter
    def value(self, v):
        # straight into the comm area: answering a read is the common case of a handler
        cdef kvm_run *r = self.cur()
        cdef int size = r.io.size
        cdef uint64_t x = as_u64(v, "value")
        if not (1 <= size <= 8 and (size == 8 or x >> (8 * size) == 0)) or r.io.count < 1:
            raise InvalidArgumentError(f"{x:#x} does not fit in {size} bytes (count {r.io.count})")
        fill(comm_bytes(self, r.io.data_offset, size), size, x, size)

    def __repr__(self):
        try:
            return f"<IoExit {self.direction} port={self.port:#x} size={self.size} count={self.count}>"
        except StateError:
            return "<IoExit (stale)>"


cdef class MmioExit(Exit):
    """KVM_EXIT_MMIO: an access to guest-physical memory with no memory slot."""

    @property
    def address(self):
        """The guest-physical address accessed."""
        return self.cur().mmio.phys_addr

    @property
    def length(self):
        """Bytes accessed: 1 to 8."""
        return self.cur().mmio.len

    @property
    def is_write(self):
        """True for a write; a read takes data back at the next run."""
        return bool(self.cur().mmio.is_write)

    @property
    def data(self):
        """Writable zero-copy view of the 1..8 data bytes: fill it for a read."""
        cdef kvm_run *r = self.cur()
        cdef uint32_t n = r.mmio.len
        if not (0 < n <= 8):     # (the message is built only when raised)
            raise InvalidArgumentError(f"invalid MMIO length {n}")
        return comm_slice(self, <uint64_t>(<char *>r.mmio.data - <char *>r), n)

    @property
    def value(self):
        """The data as an unsigned little-endian int (settable for a read)."""
        cdef kvm_run *r = self.cur()
        cdef uint32_t n = r.mmio.len
        if not (0 < n <= 8):     # (the message is built only when raised)
            raise InvalidArgumentError(f"invalid MMIO length {n}")
        return le_value(r.mmio.data, n)

    @value.setter
    def value(self, v):
        cdef kvm_run *r = self.cur()
        cdef int n = r.mmio.len
        cdef uint64_t x = as_u64(v, "value")
        if not (1 <= n <= 8 and (n == 8 or x >> (8 * n) == 0)):
            raise InvalidArgumentError(f"{x:#x} does not fit in {n} bytes")
        fill(r.mmio.data, n, x, n)

    def __repr__(self):
        try:
            return f"<MmioExit {'write' if self.is_write else 'read'} address={self.address:#x} length={self.length}>"
        except StateError:
            return "<MmioExit (stale)>"


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
        """The hardware's reason code (VMX/SVM specific)."""
        return self.cur().fail_entry.hardware_entry_failure_reason

    @property
    def cpu(self):
        """The host CPU the entry failed on."""
        return self.cur().fail_entry.cpu


cdef class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: e.g. an instruction the emulator cannot handle (suberror 1)."""

    @property
    def suberror(self):
        return self.cur().internal.suberror

    @property
    def data(self):
        """The suberror's extra data words (KVM says how many)."""
        return tuple(self.cur().internal.data[i] for i in range(min(self.cur().internal.ndata, 16)))


cdef class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or crash requested by the guest."""

    @property
    def type(self):
        """A kvmsys.SystemEvent (a plain int if this build does not know the value)."""
        return as_enum("SystemEvent", self.cur().system_event.type)

    @property
    def data(self):
        """The event's data words (e.g. a PSCI reset type)."""
        return tuple(self.cur().system_event.data[i] for i in range(min(self.cur().system_event.ndata, 16)))


cdef class DebugExit(Exit):
    """KVM_EXIT_DEBUG: single step or breakpoint."""

    @property
    def exception(self):
        """The debug exception: 1 (#DB: a step or debug register) or 3 (#BP: int3)."""
        return self.cur().debug.arch.exception

    @property
    def pc(self):
        """The guest's PC (linear address) at the exit."""
        return self.cur().debug.arch.pc

    @property
    def dr6(self):
        """DR6: which debug register hit (bits 0-3), single step (bit 14)."""
        return self.cur().debug.arch.dr6

    @property
    def dr7(self):
        """DR7: the debug registers' enables and conditions."""
        return self.cur().debug.arch.dr7


cdef class MsrExit(Exit):
    """KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR: an MSR access KVM left to user space
    (KVM_CAP_X86_USER_SPACE_MSR; an MSR filter chooses which).  Set ``error`` to make
    the guest take a #GP; for a read, set ``data`` to what rdmsr returns."""

    @property
    def index(self):
        """The MSR's index (ECX)."""
        return self.cur().msr.index

    @property
    def msr_reason(self):
        """Why it exited: a kvmsys.MsrExitReason (INVAL, UNKNOWN or FILTER)."""
        return as_enum("MsrExitReason", self.cur().msr.reason)

    @property
    def is_write(self):
        """True for WRMSR (data is the value written), False for RDMSR."""
        return self.reason == KVM_EXIT_X86_WRMSR

    @property
    def data(self):
        """The value written (WRMSR), or the one rdmsr will return (RDMSR: settable)."""
        return self.cur().msr.data

    @data.setter
    def data(self, v):
        require(self.reason == KVM_EXIT_X86_RDMSR, "only a RDMSR exit takes data")
        self.cur().msr.data = as_u64(v, "MSR value")

    @property
    def error(self):
        return bool(self.cur().msr.error)

    @error.setter
    def error(self, bint v):
        self.cur().msr.error = 1 if v else 0

    def __repr__(self):
        try:
            return (f"<MsrExit {'wrmsr' if self.is_write else 'rdmsr'} index={self.index:#x} "
                    f"data={self.data:#x}{' error' if self.error else ''}>")
        except StateError:
            return f"<{type(self).__name__} (stale)>"


cdef class HypercallExit(Exit):
    """KVM_EXIT_HYPERCALL: a hypercall KVM forwards to user space (KVM_CAP_EXIT_HYPERCALL);
    ``ret`` (settable) is what the guest finds in RAX."""

    @property
    def nr(self):
        """The hypercall number."""
        return self.cur().hypercall.nr

    @property
    def args(self):
        """Its six arguments."""
        return tuple(self.cur().hypercall.args[i] for i in range(6))

    @property
    def longmode(self):
        """True if the guest made it in 64-bit mode."""
        return bool(self.cur().hypercall.longmode & 1)

    @property
    def ret(self):
        return self.cur().hypercall.ret

    @ret.setter
    def ret(self, v):
        self.cur().hypercall.ret = as_u64(v, "hypercall return value")

    def __repr__(self):
        try:
            return f"<HypercallExit nr={self.nr} args={self.args[:3]}>"
        except StateError:
            return f"<{type(self).__name__} (stale)>"


cdef class IrqWindowOpenExit(Exit):
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt now (asked for with
    vcpu.request_interrupt_window; no in-kernel irqchip)."""

    @property
    def ready_for_interrupt_injection(self):
        """True once KVM_INTERRUPT can inject an interrupt."""
        return bool(self.cur().ready_for_interrupt_injection)

    @property
    def if_flag(self):
        """The guest's RFLAGS.IF."""
        return bool(self.cur().if_flag)


cdef class IoapicEoiExit(Exit):
    """KVM_EXIT_IOAPIC_EOI: with a split irqchip, the guest ended a level-triggered
    interrupt that the user-space IOAPIC routes."""

    @property
    def vector(self):
        """The vector the guest acknowledged (EOI)."""
        return self.cur().eoi.vector

    def __repr__(self):
        try:
            return f"<IoapicEoiExit vector={self.vector:#x}>"
        except StateError:
            return f"<{type(self).__name__} (stale)>"


cdef class NotifyExit(Exit):
    """KVM_EXIT_NOTIFY: the CPU spent too long in the guest without an event window
    (KVM_CAP_X86_NOTIFY_VMEXIT)."""

    @property
    def flags(self):
        """KVM_NOTIFY_CONTEXT_* flags."""
        return self.cur().notify.flags

    @property
    def context_invalid(self):
        """True if the guest's context is corrupt: it cannot go on."""
        return bool(self.cur().notify.flags & KVM_NOTIFY_CONTEXT_INVALID)


cdef class BusLockExit(Exit):
    """KVM_EXIT_X86_BUS_LOCK: the guest took a bus lock (KVM_CAP_X86_BUS_LOCK_EXIT)."""


cdef class MemoryFaultExit(Exit):
    """KVM_EXIT_MEMORY_FAULT: KVM could not resolve a guest access (e.g. private vs
    shared memory); ``gpa`` and ``size`` say where."""

    @property
    def flags(self):
        """KVM_MEMORY_EXIT_FLAG_* flags (PRIVATE: a private access)."""
        return kvmsys_run_memory_fault(self.cur()).flags

    @property
    def gpa(self):
        return kvmsys_run_memory_fault(self.cur()).gpa

    @property
    def size(self):
        return kvmsys_run_memory_fault(self.cur()).size

    @property
    def private(self):
        return bool(kvmsys_run_memory_fault(self.cur()).flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)

    def __repr__(self):
        try:
            return f"<MemoryFaultExit gpa={self.gpa:#x} size={self.size:#x}>"
        except StateError:
            return f"<{type(self).__name__} (stale)>"


cdef class DirtyRingFullExit(Exit):
    """KVM_EXIT_DIRTY_RING_FULL: this vCPU's dirty ring is full; harvest it
    (vm.harvest_dirty_ring()) and run again."""


# kvmsys's own exits (stop, kick, budget, deadline, Ctrl-C) carry no more than a
# status: the last one run() returned is reused when nothing but the vCPU refers to
# it any more (the caller let it go, so no one can tell).  A kick's return path runs
# cold, and an allocation there cost ~0.4 µs on our host.
cdef Exit own_exit(VcpuCore vcpu, type cls, int reason):
    cdef Exit e = vcpu.spare_own
    if e is not None and type(e) is cls and Py_REFCNT(e) == 2:      # 2: vcpu.spare_own and e
        e.stamp(vcpu, reason)
        return e
    e = Exit._new_of(cls, vcpu, reason)
    vcpu.spare_own = e
    return e


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


cdef class CoalescedExit(Exit):
    """A write the kernel batched in the coalesced MMIO/PIO ring, for a Python-handled
    range (or no fast handler), in order before the exit that drained it.  It reads
    like the IoExit (``reason`` IO) or MmioExit (``reason`` MMIO) it stands for, always
    a write; the entry is copied, since its ring slot is reused once it is taken.
    ``address``: the port or guest-physical address, ``data``: the bytes written,
    ``pio``: True for a port."""
    cdef readonly uint64_t address
    cdef readonly bytes data
    cdef readonly bint pio

    @staticmethod
    cdef CoalescedExit of_ring(VcpuCore vcpu):
        cdef kvm_coalesced_mmio *e = &vcpu.v.ring_entry
        cdef CoalescedExit x = <CoalescedExit>Exit._new_of(
            CoalescedExit, vcpu, KVM_EXIT_IO if e.pio else KVM_EXIT_MMIO)
        x.address = e.phys_addr
        x.pio = e.pio != 0
        x.data = (<char *>e.data)[:e.len]
        return x

    @property
    def port(self):
        """The port (for PIO) or address (MMIO) written."""
        return self.address

    @property
    def size(self):
        """Bytes written."""
        return len(self.data)

    @property
    def length(self):
        """Bytes written."""
        return len(self.data)

    @property
    def count(self):
        """Always 1."""
        return 1

    @property
    def value(self):
        """The data as an unsigned little-endian int."""
        return int.from_bytes(self.data, "little")

    @property
    def is_write(self):
        """Always True: the ring holds writes only."""
        return True

    @property
    def is_in(self):
        """Always False."""
        return False

    @property
    def direction(self):
        """Always "out"."""
        return "out"

    def __repr__(self):
        return f"<CoalescedExit {'pio' if self.pio else 'mmio'} {self.address:#x} data={self.data.hex()}>"


_EXIT_TYPES = {
    KVM_EXIT_IO: IoExit, KVM_EXIT_MMIO: MmioExit, KVM_EXIT_HLT: HltExit,
    KVM_EXIT_SHUTDOWN: ShutdownExit, KVM_EXIT_INTR: IntrExit, KVM_EXIT_FAIL_ENTRY: FailEntryExit,
    KVM_EXIT_INTERNAL_ERROR: InternalErrorExit, KVM_EXIT_SYSTEM_EVENT: SystemEventExit,
    KVM_EXIT_DEBUG: DebugExit, KVM_EXIT_X86_RDMSR: MsrExit, KVM_EXIT_X86_WRMSR: MsrExit,
    KVM_EXIT_HYPERCALL: HypercallExit, KVM_EXIT_IRQ_WINDOW_OPEN: IrqWindowOpenExit,
    KVM_EXIT_IOAPIC_EOI: IoapicEoiExit, KVM_EXIT_NOTIFY: NotifyExit, KVM_EXIT_X86_BUS_LOCK: BusLockExit,
    KVM_EXIT_MEMORY_FAULT: MemoryFaultExit, KVM_EXIT_DIRTY_RING_FULL: DirtyRingFullExit,
}


cdef Exit make_exit(VcpuCore vcpu):
    cdef int reason = vcpu.v.run.exit_reason
    cdef Exit e = vcpu.spare_exit
    cdef type cls
    vcpu.spare_exit = None
    # IO, MMIO and HLT are the exits that reach Python handlers most: the previous exit of
    # the same kind is reused when nothing but the vCPU refers to it (the handler kept
    # no reference, so no one can tell), else allocated
    if reason == KVM_EXIT_IO:
        cls = IoExit
    elif reason == KVM_EXIT_MMIO:
        cls = MmioExit
    elif reason == KVM_EXIT_HLT:
        cls = HltExit
    else:
        return Exit._new_of(_EXIT_TYPES.get(reason, UnknownExit), vcpu, reason)
    if e is None or type(e) is not cls or Py_REFCNT(e) != 1:     # 1: only this local
        return Exit._new_of(cls, vcpu, reason)
    e.stamp(vcpu, reason)
    return e
