# The vCPU object: state ioctls, the comm area and run().
from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject, PyTypeObject
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.string cimport memcpy
import threading as _threading
from _signal import getsignal as _getsignal, SIGINT as _SIGINT   # (signal.getsignal adds an enum lookup)
import weakref as _weakref
from cpython.pythread cimport PyThread_get_thread_ident

cdef unsigned long _main_ident = _threading.main_thread().ident
cdef unsigned long _main_forkgen = kvmsys_fork_generation


cdef inline bint on_main_thread():
    # The thread CPython runs signal handlers in.  In a fork child it is the thread that
    # forked (CPython makes it so), whichever that was: look again in a new process
    # (known by the fork generation, which costs no getpid() per run()).
    global _main_ident, _main_forkgen
    if kvmsys_fork_generation != _main_forkgen:
        _main_ident = _threading.main_thread().ident
        _main_forkgen = kvmsys_fork_generation
    return PyThread_get_thread_ident() == _main_ident

import os as _os

# Every live vCPU of this process (both ABIs), for shutdown().
cdef _WeakRefs _all_vcpus = _WeakRefs()
cdef long _all_vcpus_pid = _os.getpid()


def shutdown():
    """At interpreter exit: no vCPU enters KVM_RUN again, and those inside it are kicked
    out, so threads (daemon ones too) stop and the vCPUs can be released."""
    global shutting_down
    kvmsys_store_int(&shutting_down, 1)
    if _os.getpid() != _all_vcpus_pid:
        return          # a fork child: these vCPUs are the parent's
    cdef vcpustate_t *v
    for vcpu in _all_vcpus.alive():
        v = (<VcpuCore>vcpu).v
        if v != NULL:
            with nogil:
                kick_vcpu(v, 0, KICK_USER)


def is_shutting_down():
    """True once shutdown() ran (the interpreter is exiting)."""
    return bool(kvmsys_load_int(&shutting_down))

_REG_NAMES = frozenset(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                        "r11", "r12", "r13", "r14", "r15", "rip", "rflags"))
_CPUID_KEYS = frozenset(("function", "index", "flags", "eax", "ebx", "ecx", "edx"))


cdef object _sigint_seen = None     # Python's SIGINT handler at the relay's last check
cdef uint64_t _relay_checked = 0     # when that was (run loop clock)


# Main thread, before an entry of its run loop: Python's own signals.  A Ctrl-C
# before this point raises here; one after it is counted by the SIGINT relay, which
# the loop sees (kvmsys_native.h).  With *relay* (each run() call, every POLL_NS of
# exits), first put the relay back in front of SIGINT's handler if signal.signal()
# replaced it: one sigaction query, made only when Python's SIGINT handler is another
# object than at the last query, and every POLL_NS (a system call per run() is most of
# a short run()'s cost; see README's known limits).  Main thread only: no lock.
cdef int look_at_signals(vcpustate_t *v, bint relay) except -1:
    global _sigint_seen, _relay_checked
    if relay:
        h = _getsignal(_SIGINT)
        if h is not _sigint_seen or v.t_left - _relay_checked >= POLL_NS:
            kvmsys_sigint_relay_ensure()
            _sigint_seen = h
            _relay_checked = v.t_left
    v.sigint_snap = kvmsys_sigint_count()
    PyErr_CheckSignals()
    return 0


cdef int watchdog_ready(const char **op) except? -2:
    # This thread's watchdog made (kvmsys_watchdog_try), retrying timer_create on
    # EAGAIN for up to ~1 s: Python's signals are looked at every 10 ms meanwhile, so
    # a Ctrl-C ends run() here at once.  Returns 0 or an errno.
    cdef int tries = 0, err
    cdef uint64_t wait_ns = 0, slept
    while True:
        with nogil:
            err = kvmsys_watchdog_try(tries, &wait_ns, op)
        if err >= 0:
            return err
        slept = 0
        while slept < wait_ns:
            with nogil:
                kvmsys_sleep_ns(min(wait_ns - slept, <uint64_t>10000000))
            slept += 10000000
            PyErr_CheckSignals()
        tries += 1


cdef int create_kernel_vcpu(VmCore vm, int vcpu_id) except -1:
    # KVM_CREATE_VCPU after the checks every new kernel vCPU gets; returns its fd.
    vm.require_open()
    max_id = vm.cap(KVM_CAP_MAX_VCPU_ID) or vm.cap(KVM_CAP_MAX_VCPUS) or 1
    require(0 <= vcpu_id < max_id, f"vCPU id {vcpu_id} is out of range 0..{max_id - 1}")
    require(vcpu_id not in vm.vcpu_ids, f"vCPU id {vcpu_id} already exists in this VM")
    cdef int vmfd = vm.fd
    cdef int fd
    with nogil:
        fd = ioctl(vmfd, KVM_CREATE_VCPU, <unsigned long>vcpu_id)
    return check(fd, "KVM_CREATE_VCPU")


# The Python handler of the exit run_loop returned (R_EXIT), borrowed, or NULL: none.
# No reference is taken and None is only compared with: after KVM_RUN each object line
# the run path touches is a cache miss (None's refcount was one, per exit).
cdef inline PyObject *python_handler(VmCore vm, vcpustate_t *v) noexcept:
    cdef PyObject *h = NULL
    cdef uint32_t reason
    if v.last_handler >= 0 and v.last_handler < PyList_GET_SIZE(vm.py_handlers):
        h = PyList_GET_ITEM(vm.py_handlers, v.last_handler)
    if h == NULL or h == <PyObject *>None:
        reason = v.run.exit_reason
        if v.from_ring or reason == KVM_EXIT_IO or reason == KVM_EXIT_MMIO or \
                reason == KVM_EXIT_X86_RDMSR or reason == KVM_EXIT_X86_WRMSR:
            h = <PyObject *>vm._default_handler
        elif reason == KVM_EXIT_HLT:
            h = <PyObject *>vm._hlt_handler
        else:
            h = NULL
    return NULL if h == <PyObject *>None else h


cdef class VcpuCore:
    """A KVM vCPU fd and its comm area (struct kvm_run, mapped zero-copy).

    ``vm``: its VM; ``id``: its vCPU id (the kernel's; a recycled vCPU may move to a
    new one, see README); ``pending``: the calls that handles queued with call_soon()
    and interrupt(), run by the owning thread at its next exit."""
    # A vCPU fd, its comm area (the mmap'd kvm_run page) and its run state.  The
    # kernel vCPU (v) outlives this object when renew() hands it to a new one:
    # this one is then stale, and keeps its successor (the owner of v) alive.
    cdef vcpustate_t *v
    cdef readonly VmCore vm
    cdef readonly int id
    cdef Mapping page
    cdef object page_view        # one memoryview of page, sliced for exits' data (see comm_slice)
    cdef int synced            # KVM_SYNC_X86_* sets whose comm-area copy is current
    cdef int debug_enabled
    cdef int _touched            # ran: any state may have changed, a recycled vCPU is reset whole
    cdef set _changes            # the setters called (ops, "KVM_SET_REGS", ...): what a reset restores
    cdef int ran                 # entered KVM_RUN at least once (an I/O may await completion)
    cdef int ran_here            # ... since this object got it (renew() clears it)
    cdef int irreversible_done   # KVM_SET_CPUID2 or a vCPU KVM_ENABLE_CAP happened: no undo
    cdef readonly list pending   # (fn, args, future) calls queued by handles' call_soon()
    cdef bint owner              # this object frees v
    cdef str gone                # why this object no longer reaches its vCPU, or None
    cdef object successor
    cdef unsigned long forkgen   # the process that created it
    cdef list views              # weak references to the comm-area views it handed out
    cdef Mapping dirty_ring      # its dirty-page ring (vm.enable_dirty_ring), or None
    cdef uint32_t dirty_fetch    # next ring entry to harvest
    cdef unsigned long _runner   # Python thread ident of the run() in progress (for messages)
    cdef Exit spare_exit         # the last exit a Python handler took and let go (make_exit reuses it)
    cdef Exit spare_own          # the last own exit run() returned (own_exit reuses it)
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self.forkgen = kvmsys_fork_generation
        self._changes = set()

    def __init__(self, vm_, vcpu_id_, *, fd=None):
        if self.v != NULL:
            raise StateError(f"vCPU {self.id} is already initialized")
        cdef VmCore vm = of_type(vm_, VmCore, "vm")
        vm.require_open()
        cdef int vcpu_id = as_int(vcpu_id_, "vCPU id", 0, 0x7fffffff)
        if not vm.check_extension(KVM_CAP_IMMEDIATE_EXIT):
            # kicks and the watchdog rely on kvm_run.immediate_exit (Linux >= 4.11)
            from kvmsys.errors import CapabilityError
            raise CapabilityError("IMMEDIATE_EXIT", "kvmsys's run loop (kicks, the watchdog)")
        self.vm = vm
        self.id = vcpu_id
        self.v = <vcpustate_t *>calloc(1, sizeof(vcpustate_t))
        if self.v == NULL:
            raise MemoryError()
        self.owner = 1
        self.v.fd = -1
        self.v.budget_left = -1
        pthread_mutex_init(&self.v.lock, NULL)
        self.v.vm = vm.state
        self.v.generation = 1
        self.pending = []
        self.views = []
        if fd is None:
            kernel_vcpu = create_kernel_vcpu(vm, vcpu_id)
        else:       # a vCPU made elsewhere (a duplicate of its fd), of this VM by the caller's word
            require(vcpu_id not in vm.vcpu_ids, f"vCPU id {vcpu_id} already exists in this VM")
            kernel_vcpu = adopt_fd(fd, f"kvm-vcpu:{vcpu_id}")
        self.set_up_kernel_vcpu(kernel_vcpu, NULL, True)
        _all_vcpus.add(self)

    cdef int set_up_kernel_vcpu(self, int fd, void *at, bint new_kernel_vcpu, Mapping page=None) except -1:
        # The one place a kernel vCPU is set up for this object, whichever way it came:
        # creation (__init__), recycling (renew(): the same kernel vCPU, a new object) and
        # the move onto a new kernel vCPU (replace_kernel_vcpu) all come here, so none of
        # them misses a piece.  *fd*: the kernel vCPU (this object owns it from here on,
        # even on failure); *at*: where its comm area goes (MAP_FIXED over the old one:
        # views stay valid), NULL anywhere; *page*: fd's comm area mapped already (renew()
        # hands an unseen one on), no mmap.  On failure the object is closed.
        cdef VmCore vm = self.vm
        cdef void *addr
        if page is not None:
            self.page = page        # handed on as it is: mapped and registered already
            addr = page.addr
        else:
            addr = self.map_comm_area(fd, at)
        # the kernel vCPU, its comm area and the run loop's per-vCPU state, under the
        # lock (kicks read fd and run)
        pthread_mutex_lock(&self.v.lock)
        if self.v.fd >= 0 and self.v.fd != fd:
            close(self.v.fd)        # the retired kernel vCPU: KVM keeps it until the VM goes
        self.v.fd = fd
        self.v.run = <kvm_run *>addr
        self.v.run_size = vm.mmap_size
        kernel_vcpu_attached(self.v, new_kernel_vcpu)    # signal mask, stats, queued window
        pthread_mutex_unlock(&self.v.lock)
        vm.map_ring(fd)             # the VM's coalesced ring, once (it shows in every comm area)
        if new_kernel_vcpu:
            self.ran = self.ran_here = self.irreversible_done = self.debug_enabled = self._touched = 0
            self._changes.clear()
            self.dirty_ring = None
            self.dirty_fetch = 0
        if vm.dirty_ring_size and self.dirty_ring is None:
            self.map_dirty_ring()
        self.reset_sync()
        vm.vcpu_ids.add(self.id)
        vm.vcpus.add(self)
        return 0

    cdef void *map_comm_area(self, int fd, void *at) except NULL:
        # set_up_kernel_vcpu()'s mapping of fd's comm area (see there for *at*); on
        # failure fd is closed unless it is this object's, and with *at* the object too
        cdef VmCore vm = self.vm
        cdef int err
        cdef void *addr = mmap(at, vm.mmap_size, PROT_READ | PROT_WRITE,
                               MAP_SHARED | (MAP_FIXED if at != NULL else 0), fd, 0)
        if addr == MAP_FAILED:
            err = errno
            if fd != self.v.fd:
                close(fd)
            if at != NULL:
                # the old vCPU's page is gone from this address: this object is done for
                kvmsys_detach_region(at, vm.mmap_size)
                self.close_claimed()
            raise_os(err, "mmap(kvm_run)")
        if at != NULL:
            if madvise(addr, vm.mmap_size, MADV_DONTFORK) != 0:     # the region is registered
                err = errno
                close(fd)
                kvmsys_detach_region(at, vm.mmap_size)
                self.close_claimed()
                raise_os(err, "madvise(kvm_run, MADV_DONTFORK)")
        else:
            try:
                self.page = Mapping.wrap(addr, vm.mmap_size, f"vCPU {self.id} comm area")
            except BaseException:
                if fd != self.v.fd:
                    close(fd)
                raise
        return addr

    cdef int map_dirty_ring(self) except -1:
        cdef long page = sysconf(_SC_PAGESIZE)
        cdef void *addr = mmap(NULL, self.vm.dirty_ring_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                               self.v.fd, KVM_DIRTY_LOG_PAGE_OFFSET * page)
        if addr == MAP_FAILED:
            raise_os(errno, "mmap(dirty ring)")
        self.dirty_ring = Mapping.wrap(addr, self.vm.dirty_ring_size, f"vCPU {self.id} dirty ring")
        return 0

    def harvest_dirty_ring(self):
        """The pages this vCPU dirtied since the last harvest, as (slot, page index in the
        slot), in the order KVM logged them; each entry is handed back to KVM (call
        vm.reset_dirty_rings() afterwards to re-arm the logging of those pages)."""
        self.require_open()
        require(self.dirty_ring is not None, f"vCPU {self.id} has no dirty ring "
                "(vm.enable_dirty_ring() before the vCPU is created)")
        self.dirty_ring.check_usable()
        cdef kvm_dirty_gfn *g = <kvm_dirty_gfn *>self.dirty_ring.addr
        cdef uint32_t n = self.vm.dirty_ring_size // sizeof(kvm_dirty_gfn)
        cdef kvm_dirty_gfn *e
        cdef list out = []
        while True:
            e = &g[self.dirty_fetch % n]
            if not kvmsys_load_u32(&e.flags) & KVM_DIRTY_GFN_F_DIRTY:
                break
            out.append((e.slot, e.offset))
            kvmsys_store_u32(&e.flags, KVM_DIRTY_GFN_F_RESET)    # ours -> KVM's, on reset
            self.dirty_fetch += 1
        return out

    def renew(self):
        """Hand this kernel vCPU to a new object, which is returned; this one goes stale.

        Afterwards every use of this object, of its exits and of its regs raises
        StaleVcpuError, and its comm-area views are released (slices of them read
        private zeros): nothing done through them reaches the vCPU or its next owner."""
        self.require_open()
        if self.v.bound:
            raise StateError(f"vCPU {self.id} is bound to a thread: remove_vcpu() hands it on")
        self.claim("hand it on")
        return self.renew_claimed()

    cdef VcpuCore renew_claimed(self):
        # renew() for a caller that claimed the vCPU (v.active): runs no Python code, so
        # no asynchronous exception cuts it short between its parts.
        cdef VcpuCore n
        cdef Mapping old = self.page, kept = None
        cdef str why = "belongs to a vCPU that was removed (or whose thread ended)"
        try:
            n = type(self).__new__(type(self))
            n.v, n.vm, n.id, n.forkgen = self.v, self.vm, self.id, self.forkgen
            n.debug_enabled, n._touched = self.debug_enabled, self._touched
            n._changes = set(self._changes)
            n.ran, n.irreversible_done = self.ran, self.irreversible_done
            n.pending, n.views = [], []
            n.dirty_ring, n.dirty_fetch = self.dirty_ring, self.dirty_fetch
            # The comm area: where no view of it is left (our own one dropped first; a
            # user's, or a slice of one, keeps it exported), the new object takes the
            # mapping as it is, which saves four memory-map system calls (tens of µs on
            # our PVM host); else a new mapping, and the old one's views read zeros.
            self.page_view = None
            kept = old.hand_over(f"vCPU {self.id} comm area", why)
            try:
                n.set_up_kernel_vcpu(self.v.fd, NULL, False, kept)
            except BaseException:
                if kept is not None:
                    n.page = None
                    old.take_back(kept)
                raise
            if kept is None:
                old.revoke(why)
        except BaseException:
            kvmsys_store_int(&self.v.active, 0)
            raise
        for ref in self.views:
            view = ref()
            if view is not None:
                try:
                    view.release()
                except BufferError:
                    pass            # something exported from it: it reads the zeros now
        self.views = []
        self.cancel_pending()
        self.owner, n.owner = 0, 1
        self.gone = "was removed (or its thread ended)"
        self.successor = n
        _all_vcpus.add(n)
        self.page = self.page_view = self.spare_exit = self.spare_own = None   # (the spares refer back to it)
        self.vm.vcpus.discard(self)
        self.vm.vcpus.add(n)
        kvmsys_store_int(&self.v.active, 0)    # last: a run() claiming it now sees this object gone
        return n

    cdef int require_open(self) except -1:
        if self.gone is not None:
            raise StaleVcpuError(f"this vCPU {self.id} object {self.gone}: use the new owner's current()")
        if self.forkgen != kvmsys_fork_generation:
            raise StateError(f"vCPU {self.id} belongs to the parent process (this is a fork child)")
        if self.v == NULL or self.v.fd < 0:
            raise StateError(f"vCPU {self.id} is closed")
        return 0

    cdef long vcpu_ioctl(self, unsigned long req, void *arg, str op) except -1:
        # Every vCPU ioctl outside the run loop: with the GIL released, and refused
        # (StateError) while another thread has the vCPU in KVM_RUN, where KVM would
        # make it wait for the guest's next exit (see vcpu_ioctl_outside).
        self.require_open()
        if req == KVM_SET_CPUID2 or req == KVM_ENABLE_CAP:
            self.irreversible_done = 1      # whatever the outcome: a vCPU KVM may have changed
        cdef vcpustate_t *v = self.v
        cdef long r
        cdef int refused, err, unsent
        cdef int dirty = <int>(v.run.kvm_dirty_regs & KVM_SYNC_X86_VALID_FIELDS)
        with nogil:
            r = vcpu_ioctl_outside(v, req, arg, &refused, &unsent)
            err = errno
        if dirty and not refused:
            self.note_sync_sets(dirty)  # sent first (flush_sync), even raw comm-area writes
        if refused:
            raise StateError(f"vCPU {self.id} is inside KVM_RUN in another thread: {op} would wait for "
                             "its next exit; kick it (or queue the call with handle().call_soon) first")
        if unsent:
            self.synced &= ~unsent
            raise_os(err, f"{_SYNC_SET_IOCTL[unsent]} (before {op})",
                     f"KVM refused the {sync_set_names(unsent)} written through the comm area; "
                     "that write was dropped")
        if not op.startswith("KVM_GET"):
            self._changes.add(op)       # even if refused: KVM may have changed part of it
            v.state_set = 1             # what the guest resumes with changed (see ready_now)
            self.synced = 0             # and any register set of it may have (KVM_SET_MSRS: EFER, ...)
        if r < 0:
            raise_os(err, op)
        return r

    # --- registers in the comm area (KVM_CAP_SYNC_REGS): see syncregs.pyx ----
    cdef int reset_sync(self) except -1:
        # kvmsys's defaults, on every kernel vCPU this object gets (created, recycled,
        # replaced) and at clear_comm_area(): REGS synced by the kernel, nothing written
        # and not sent (a last owner's unsent writes never reach the next one).
        self.synced = 0
        self.v.run.kvm_dirty_regs = 0
        self.v.run.kvm_valid_regs = KVM_SYNC_X86_REGS if self.vm.has_sync_regs else 0
        return 0

    cdef char *sync_ptr(self, int kind) except NULL:
        # The set's struct in the comm area, fetched by ioctl first if the copy there is
        # not current (written and not sent counts as current: it is what KVM will get).
        self.require_open()
        if not self.vm.has_sync_regs:
            from kvmsys.errors import CapabilityError
            raise CapabilityError("SYNC_REGS", "register access through the comm area")
        cdef kvm_run *run = self.v.run
        cdef kvm_regs regs
        cdef kvm_sregs sregs
        cdef kvm_vcpu_events events
        if not ((<uint64_t>self.synced | run.kvm_dirty_regs) & kind):
            if kind == KVM_SYNC_X86_REGS:
                self.vcpu_ioctl(KVM_GET_REGS, &regs, "KVM_GET_REGS")
                run.s.regs.regs = regs
            elif kind == KVM_SYNC_X86_SREGS:
                self.vcpu_ioctl(KVM_GET_SREGS, &sregs, "KVM_GET_SREGS")
                run.s.regs.sregs = sregs
            else:
                self.vcpu_ioctl(KVM_GET_VCPU_EVENTS, &events, "KVM_GET_VCPU_EVENTS")
                run.s.regs.events = events
            self.synced |= kind
        if kind == KVM_SYNC_X86_REGS:
            return <char *>&run.s.regs.regs
        if kind == KVM_SYNC_X86_SREGS:
            return <char *>&run.s.regs.sregs
        return <char *>&run.s.regs.events

    cdef int sync_dirty(self, int kind) except -1:
        # after a write through a view: KVM loads the set at the next KVM_RUN
        self.v.run.kvm_dirty_regs |= kind
        self.synced |= kind
        return self.note_sync_sets(kind)

    cdef int note_sync_sets(self, int kind) except -1:
        # a register set written through the comm area changes the vCPU as its setter
        # would (at the next KVM_RUN, or before the next vCPU ioctl): what a reset restores
        if kind & KVM_SYNC_X86_REGS:
            self._changes.add("KVM_SET_REGS")
        if kind & KVM_SYNC_X86_SREGS:
            self._changes.add("KVM_SET_SREGS")
        if kind & KVM_SYNC_X86_EVENTS:
            self._changes.add("KVM_SET_VCPU_EVENTS")
        return 0

    cdef int sync_bits(self, reg) except -1:
        if not self.vm.has_sync_regs:
            from kvmsys.errors import CapabilityError
            raise CapabilityError("SYNC_REGS", "choosing the register sets synced through the comm area")
        cdef uint64_t bits = as_u64(reg, "register sets (kvmsys.SyncReg)")
        if bits == 0 or bits & ~(<uint64_t>KVM_SYNC_X86_VALID_FIELDS):
            raise InvalidArgumentError(f"register sets {bits:#x}: a non-empty combination of kvmsys.SyncReg "
                                       f"(REGS, SREGS, EVENTS: {KVM_SYNC_X86_VALID_FIELDS:#x})")
        return <int>bits

    @property
    def sync_valid_regs(self):
        """The register sets KVM stores in the comm area at the end of every KVM_RUN
        (kvm_run.kvm_valid_regs), a kvmsys.SyncReg: REGS by default."""
        self.require_open()
        return as_enum("SyncReg", self.v.run.kvm_valid_regs)

    @property
    def sync_dirty_regs(self):
        """The register sets written through the comm area and not sent to KVM yet
        (kvm_run.kvm_dirty_regs), a kvmsys.SyncReg."""
        self.require_open()
        return as_enum("SyncReg", self.v.run.kvm_dirty_regs)

    def set_sync_valid_reg(self, reg):
        """Have KVM store these register sets (kvmsys.SyncReg flags) in the comm area at the
        end of every KVM_RUN, so reading them through regs / sync_sregs / sync_events costs
        no ioctl.  The rest are fetched by ioctl when read (once per run)."""
        self.require_open()
        self.v.run.kvm_valid_regs |= self.sync_bits(reg)

    def clear_sync_valid_reg(self, reg):
        """Stop KVM storing these register sets in the comm area (each KVM_RUN then costs
        less; reading them fetches them by ioctl)."""
        self.require_open()
        cdef int bits = self.sync_bits(reg)
        self.v.run.kvm_valid_regs &= ~(<uint64_t>bits)
        self.synced &= ~(bits & ~<int>self.v.run.kvm_dirty_regs)

    def set_sync_dirty_reg(self, reg):
        """Mark these register sets as written: what the comm area holds for them goes to
        KVM at the next KVM_RUN (or before the vCPU's next ioctl).  Writes through the views
        do this themselves."""
        self.require_open()
        cdef int bits = self.sync_bits(reg)
        cdef int k
        for k in (KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS, KVM_SYNC_X86_EVENTS):
            if bits & k:
                self.sync_ptr(k)        # current first: never send what the comm area held stale
                self.sync_dirty(k)

    def clear_sync_dirty_reg(self, reg):
        """Drop what was written through the comm area for these register sets and not sent
        yet: KVM keeps what it has (the next read fetches it)."""
        self.require_open()
        cdef int bits = self.sync_bits(reg)
        self.v.run.kvm_dirty_regs &= ~(<uint64_t>bits)
        self.synced &= ~bits

    @property
    def touched(self):
        """True once the vCPU ran or had state set since creation (or since mark_pristine())."""
        return bool(self._touched or self._changes)

    @property
    def changes(self):
        """What changed the vCPU since creation (or since mark_pristine()): a frozenset of
        the ioctls that set state ("KVM_SET_REGS" also for writes through ``regs``), with
        "KVM_RUN" once it ran."""
        return frozenset(self._changes) | {"KVM_RUN"} if self._touched else frozenset(self._changes)

    def mark_pristine(self):
        """Record that the vCPU's state is its initial state again (after a reset)."""
        self._touched = 0
        self._changes.clear()

    @property
    def has_run(self):
        """True once the vCPU entered KVM_RUN.  KVM then accepts no CPUID table but the
        one it has (none, on a new vCPU), for good: nothing resets that."""
        return bool(self.ran)

    @property
    def run_before(self):
        """True if the kernel vCPU ran before this object got it (recycled), not since."""
        return bool(self.ran and not self.ran_here)

    def replace_kernel_vcpu(self, new_id):
        """Move this object onto a new kernel vCPU *new_id* of its VM, mapped where the
        comm area is (views of it stay valid); the old kernel vCPU is retired (KVM keeps
        it, and its id, until the VM goes).  State is the new vCPU's initial state."""
        self.require_open()
        cdef VmCore vm = self.vm
        cdef int vid = as_int(new_id, "vCPU id", 0, 0x7fffffff)
        self.claim("replace it")
        cdef int fd
        try:
            fd = create_kernel_vcpu(vm, vid)
            self.id = vid
            self.set_up_kernel_vcpu(fd, <void *>self.v.run, True)
        finally:
            kvmsys_store_int(&self.v.active, 0)

    @property
    def irreversible(self):
        """True once something KVM cannot undo was done to this vCPU: a CPUID table set
        (a new vCPU has none) or a capability enabled on it (KVM_ENABLE_CAP on the vCPU)."""
        return bool(self.irreversible_done)

    @property
    def guest_debug(self):
        """True while KVM_SET_GUEST_DEBUG is enabled on this vCPU."""
        return bool(self.debug_enabled)

    def complete_pending_io(self):
        """KVM_RUN with immediate_exit set: KVM completes an I/O or MMIO access the last
        exit left for user space and returns at once, without running guest code (the
        way KVM documents to settle a vCPU before its state is saved or reset)."""
        self.require_open()
        if not self.ran:
            return
        self.claim("complete its I/O")
        cdef int r, err
        try:
            kvmsys_store_u8(&self.v.run.immediate_exit, 1)
            r = ioctl_nogil(self.v.fd, KVM_RUN, NULL)
            err = errno
            kvmsys_store_u8(&self.v.run.immediate_exit, 0)
            # the I/O's completion may change registers (an `in` loads RAX, RIP moves on):
            # only the sets KVM stored are current now
            self.synced = <int>(self.v.run.kvm_valid_regs & KVM_SYNC_X86_VALID_FIELDS)
            if r < 0 and err != EINTR and err != EAGAIN:
                raise_os(err, "KVM_RUN(immediate_exit)")
        finally:
            kvmsys_store_int(&self.v.active, 0)

    def clear_comm_area(self):
        """Zero the kvm_run page and the PIO data page as a new vCPU has them (the
        coalesced ring, which KVM indexes, stays); registers come from KVM again."""
        self.require_open()
        cdef long page = sysconf(_SC_PAGESIZE)
        cdef size_t n = min(<size_t>self.v.run_size, <size_t>(KVM_COALESCED_MMIO_PAGE_OFFSET * page))
        memset(<void *>self.v.run, 0, n)
        self.reset_sync()

    def get_nested_state(self):
        """KVM_GET_NESTED_STATE as raw bytes (KVM_CAP_NESTED_STATE gives the size)."""
        cdef long size = self.require_cap(KVM_CAP_NESTED_STATE, "NESTED_STATE", "KVM_GET_NESTED_STATE")
        require(<size_t>size >= sizeof(kvm_nested_state), "KVM reported a nested-state size below its header")
        cdef bytearray buf = bytearray(size)
        (<kvm_nested_state *><char *>buf).size = size
        self.vcpu_ioctl(KVM_GET_NESTED_STATE, <char *>buf, "KVM_GET_NESTED_STATE")
        return bytes(buf[:(<kvm_nested_state *><char *>buf).size])

    def set_nested_state(self, data):
        """KVM_SET_NESTED_STATE: bytes from get_nested_state() (a nested hypervisor's state)."""
        cdef long size = self.require_cap(KVM_CAP_NESTED_STATE, "NESTED_STATE", "KVM_SET_NESTED_STATE")
        cdef bytearray buf = bytearray(as_blob(data, "set_nested_state"))
        require(sizeof(kvm_nested_state) <= <size_t>len(buf) <= <size_t>size and
                (<kvm_nested_state *><char *>buf).size == <uint32_t>len(buf),
                f"nested state must be a kvm_nested_state blob whose size field matches ({len(buf)} bytes given)")
        self.vcpu_ioctl(KVM_SET_NESTED_STATE, <char *>buf, "KVM_SET_NESTED_STATE")

    cdef long require_cap(self, int cap, str name, str op) except -1:
        self.require_open()
        return self.vm.require_cap(cap, name, op)

    def fileno(self):
        """The vCPU fd."""
        self.require_open()
        return self.v.fd

    cdef inline bint is_closed(self) noexcept:
        return self.v == NULL or self.v.fd < 0 or self.gone is not None or self.forkgen != kvmsys_fork_generation

    @property
    def closed(self):
        """True once closed (or removed from its thread, or inherited by a fork child)."""
        return self.is_closed()

    def __repr__(self):
        name = type(self).__name__
        if self.gone is not None:
            return f"<{name} {self.id} stale>"
        if self.closed:
            return f"<{name} {self.id} closed>"
        state = "running" if self.running else "in run()" if self.active else "idle"
        cdef int i
        exits = sum(self.v.exits[i] for i in range(NR_REASONS))
        return f"<{name} {self.id} fd={self.v.fd} {state} runs={self.v.runs} exits={exits}>"

    @property
    def stale(self):
        """True once this object was handed on (remove_vcpu(), thread end): StaleVcpuError on use."""
        return self.gone is not None

    @property
    def active(self):
        """True while some thread is inside this vCPU's run()."""
        return self.v != NULL and self.v.fd >= 0 and kvmsys_load_int(&self.v.active) != 0

    @property
    def running(self):
        """True while a thread is inside this vCPU's C run loop (KVM_RUN): vCPU ioctls from
        other threads are refused meanwhile (StateError)."""
        return self.v != NULL and self.v.fd >= 0 and kvmsys_load_int(&self.v.running) != 0

    @property
    def comm_area(self):
        """Writable zero-copy memoryview of the whole vCPU mapping (kvm_run first)."""
        self.require_open()
        view = memoryview(self.page)
        self.views = [r for r in self.views if r() is not None]
        self.views.append(_weakref.ref(view))
        return view

    # --- running -----------------------------------------------------------
    cdef Exit run_once(self, int64_t budget, double timeout):
        """The Python side of the loop: Python handlers, signals, kicks, stops."""
        self.require_open()
        cdef vcpustate_t *v = self.v
        cdef VmCore vm = self.vm
        cdef int res
        cdef Exit ex
        cdef object handler
        cdef PyObject *h
        cdef AccessOps ops
        cdef uint64_t outer_deadline = 0
        cdef bint watching = 0
        cdef const char *op = "timer_create(watchdog)"
        cdef int err, refused
        cdef uint64_t runs
        if v.bound and not pthread_equal(v.thread, pthread_self()):
            raise VcpuBindingError(f"vCPU {self.id} is bound to another thread: only its owner runs it "
                                   "(use its handle to kick, interrupt or call_soon)")
        if kvmsys_xchg_int(&v.active, 1):
            self.require_open()          # closed meanwhile: say so
            if self._runner == PyThread_get_thread_ident():
                raise StateError(f"run() of vCPU {self.id} from inside its own run() (an exit handler or "
                                 "a call_soon callback): return from the handler to let the run go on")
            raise StateError(f"vCPU {self.id} is already running in another thread")
        if self.gone is not None:
            kvmsys_store_int(&v.active, 0)      # handed on while this call claimed it
            self.require_open()
        self._runner = PyThread_get_thread_ident()
        if kvmsys_load_int(&shutting_down):
            kvmsys_store_int(&v.active, 0)
            raise StateError("the interpreter is exiting: vCPUs no longer run")
        if budget == 0:             # checked like any run, but no KVM_RUN: nothing changes
            kvmsys_store_int(&v.active, 0)
            return own_exit(self, BudgetExit, KVMSYS_EXIT_BUDGET)
        self._touched = 1
        self.ran = self.ran_here = 1
        try:
            if not v.bound:
                # the thread a kick signals while this run() is in KVM_RUN (run_loop
                # marks `running` without the lock: see there)
                pthread_mutex_lock(&v.lock)
                v.thread = pthread_self()
                pthread_mutex_unlock(&v.lock)
            v.budget_left = budget
            v.deadline_ns = 0
            if timeout >= 0:
                err = watchdog_ready(&op)       # before the clock starts (it may wait)
                if err:
                    raise_os(err, op.decode())
                v.deadline_ns = kvmsys_now_ns() + <uint64_t>(timeout * 1e9)
                err = kvmsys_watchdog_push(v.deadline_ns, &outer_deadline, &op)
                if err:
                    v.deadline_ns = 0
                    raise_os(err, op.decode())
            v.poll_signals = on_main_thread()     # only it runs Python's signal handlers
            if v.poll_signals:
                kvmsys_sigint_watch_enter()
                watching = 1
            v.t_left = kvmsys_now_ns()      # run_loop books time outside KVM_RUN from here
            res = R_POLL
            while True:
                if self.forkgen != kvmsys_fork_generation:
                    # a handler, callback or signal handler forked and this is the child
                    # going on: the vCPU, its locks and its loop are the parent's
                    raise StateError(f"vCPU {self.id} belongs to the parent process: this fork child "
                                     "was forked inside its run() and cannot go on with it")
                # signal mask and SIGINT relay: not after each exit a Python handler took
                # (that path pays no system call, and no clock read for this), at most
                # every POLL_NS there
                v.sample_signals = res != R_EXIT or v.t_left - v.t_sampled >= POLL_NS
                if v.sample_signals:
                    v.t_sampled = v.t_left
                # After a Python handler, Python's signal handlers ran at its first
                # bytecode (CPython looks at pending signals on every function entry):
                # look again only for a Ctrl-C since (the relay counts it) or at the
                # sampling period (a handler that is a builtin runs no bytecode)
                if v.poll_signals and (res != R_EXIT or v.sample_signals or
                                       kvmsys_sigint_count() != v.sigint_snap):
                    look_at_signals(v, v.sample_signals)
                v.run_seq += 1              # exits of the previous KVM_RUN go stale
                runs = v.runs
                with nogil:
                    res = run_loop(v)
                if v.runs != runs:          # KVM_RUN stored the valid sets in the comm area
                    self.synced = <int>(v.run.kvm_valid_regs & KVM_SYNC_X86_VALID_FIELDS)
                if kvmsys_load_int(&shutting_down):
                    raise StateError("the interpreter is exiting: vCPUs no longer run")
                if res == R_EXIT:
                    # the handler first, the exit object only for a handler that takes one
                    h = python_handler(vm, v)
                    if h != NULL and h.ob_type == <PyTypeObject *>AccessOps:
                        kvmsys_bench_pause(1)   # benchmark hook, off: see kvmsys_native.h
                        ops = <AccessOps>h      # a reference: a callback may replace the handler
                        if call_ops(self, ops) == OPS_DONE:   # (its time is booked by run_loop's clocks)
                            if v.budget_left == 0:
                                return own_exit(self, BudgetExit, KVMSYS_EXIT_BUDGET)
                            continue
                        h = NULL            # a write asked to stop, or no callback for it: run() returns the exit
                    handler = <object>h if h != NULL else None
                    ex = CoalescedExit.of_ring(self) if v.from_ring else make_exit(self)
                    if handler is None:
                        return ex
                    kvmsys_bench_pause(1)   # benchmark hook, off: see kvmsys_native.h
                    stop = handler(ex)      # (its time is booked by run_loop's clocks)
                    if stop:
                        return ex
                    if v.budget_left == 0:
                        return own_exit(self, BudgetExit, KVMSYS_EXIT_BUDGET)
                    # reusable if the handler kept no reference (see make_exit)
                    self.spare_exit = ex
                    ex = None
                    continue
                if res == R_POLL:
                    continue                    # look_at_signals(v, True): Ctrl-C raises there
                if res == R_SIGNAL:
                    if v.poll_signals:
                        look_at_signals(v, False)   # run Python signal handlers (Ctrl-C raises here)
                    return own_exit(self, IntrExit, KVM_EXIT_INTR)
                if res == R_STOP:
                    ex = own_exit(self, StopExit, KVMSYS_EXIT_STOP)
                    (<StopExit>ex).status = v.stop_status
                    return ex
                if res == R_KICK:
                    if v.kick_bits & KICK_CALLS:
                        try:
                            self._run_pending()
                        except BaseException:
                            # a call (or a Ctrl-C inside one) ends this run: a user kick
                            # taken with the calls is the next run's, never lost
                            if v.kick_bits & KICK_USER:
                                kvmsys_or_int(&v.kick_pending, KICK_USER)
                            raise
                    if v.kick_bits & KICK_USER:
                        return own_exit(self, KickExit, KVMSYS_EXIT_KICK)
                    continue
                if res == R_DEADLINE:
                    return own_exit(self, DeadlineExit, KVMSYS_EXIT_DEADLINE)
                if res == R_BUDGET:
                    return own_exit(self, BudgetExit, KVMSYS_EXIT_BUDGET)
                if v.error < 0:
                    raise_os(-v.error, "KVM_RUN", "the comm area holds a size, offset or ring index out of range")
                refused = <int>(v.run.kvm_dirty_regs & KVM_SYNC_X86_VALID_FIELDS)
                if refused:
                    # KVM leaves a set it refused marked dirty: drop it (else every run fails)
                    v.run.kvm_dirty_regs &= ~(<uint64_t>refused)
                    self.synced &= ~refused
                    raise_os(v.error, "KVM_RUN", f"KVM refused the {sync_set_names(refused)} written through "
                             "the comm area; that write was dropped")
                raise_os(v.error, "KVM_RUN (or injecting a queued interrupt before it)")
        finally:
            if not v.bound and self.forkgen == kvmsys_fork_generation:
                # A kicker holds v.lock from reading `running` to its pthread_kill: wait
                # for one that saw this thread inside run() before it may end (fd ABI; a
                # bound thread's way out is unbinding, under the same lock).  Never in a
                # fork child: a parent's kicker may have held the lock at fork().
                pthread_mutex_lock(&v.lock)
                pthread_mutex_unlock(&v.lock)
            if watching:
                kvmsys_sigint_watch_leave()     # (a fork child's depth is 0 already)
            if v.deadline_ns and self.forkgen == kvmsys_fork_generation:
                # back to the enclosing run's deadline, if any; a late watchdog
                # signal is harmless: run_loop rederives immediate_exit.  (A fork
                # child has no watchdog of the parent's to go back to.)
                kvmsys_watchdog_pop(outer_deadline, &op)
                v.deadline_ns = 0
            kvmsys_store_int(&v.active, 0)

    cdef _run_pending(self):
        # On the owning thread: calls queued by handles' call_soon(), in order.  A call
        # that raises sets its future's exception and the rest still run; a
        # KeyboardInterrupt or SystemExit goes on up after the queue is put back, as
        # does an error of a call with no future (an MSI handle.interrupt() left to us).
        work, self.pending = self.pending, []
        for i, (fn, args, future) in enumerate(work):
            if future is not None and not future.set_running_or_notify_cancel():
                continue                # cancelled before it ran
            try:
                result = fn(*args)
            except BaseException as e:
                if future is not None:
                    future.set_exception(e)
                    if isinstance(e, Exception):
                        continue
                self.pending[:0] = work[i + 1:]
                if self.pending:
                    kvmsys_or_int(&self.v.kick_pending, KICK_CALLS)     # run at the next run()
                raise
            if future is not None:
                future.set_result(result)

    @property
    def signal_mask(self):
        """How kicks reached KVM_RUN in the last run: 'handler' (the usual case: no KVM signal
        mask, the kick handler sets immediate_exit), 'kvm' (the running thread blocks the kick
        signal: KVM_SET_SIGNAL_MASK lets it in inside KVM_RUN), or None before the first run."""
        self.require_open()
        return {SIGMASK_NONE: "handler", SIGMASK_REFUSED: "handler", SIGMASK_KVM: "kvm"}.get(self.v.sigmask_state)

    @property
    def pending_interrupts(self):
        """Interrupts queued by handles and not injected yet: (vectors in order, NMI count)."""
        self.require_open()
        cdef vcpustate_t *v = self.v
        pthread_mutex_lock(&v.lock)
        vectors = [v.irq_queue[(v.irq_head + i) % IRQ_QUEUE_MAX] for i in range(v.nirq)]
        nmis = v.nmi_queued
        pthread_mutex_unlock(&v.lock)
        return vectors, nmis

    def run(self, budget=None, timeout=None):
        """Run until an exit the fast handlers do not take, a stop, a kick, the budget or the deadline.

        budget: at most this many exits, an int >= 0 (None: unlimited; 0 returns a BudgetExit
        at once, after the checks every run makes, without entering KVM_RUN).  timeout: seconds,
        an int or float >= 0 (a watchdog stops even a guest that never exits); None or inf:
        no deadline, and so are values of 2**32 s or more.  Returns the decoded Exit."""
        cdef int64_t b = as_budget(budget)
        cdef double t = as_timeout(timeout)
        return self.run_once(b, t)

    def _kick_clock(self):
        """(when the last kick signal was sent, when KVM_RUN last returned EINTR, when the run
        loop last returned): CLOCK_MONOTONIC ns, for the kick benchmark's breakdown."""
        self.require_open()
        return self.v.kick_sent_ns, self.v.intr_ns, self.v.t_left

    def kick(self):
        """Make the vCPU leave KVM_RUN now, or its next run() return at once (never lost)."""
        self.require_open()
        kick_vcpu(self.v, 0, KICK_USER)     # the GIL held: see VcpuHandle._kick

    @property
    def immediate_exit(self):
        """kvm_run.immediate_exit: non-zero makes the next KVM_RUN return at once (EINTR)."""
        self.require_open()
        return self.v.run.immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value):
        """Setting it is a kick (the next or current run() returns KickExit); clearing it
        withdraws a user kick not yet taken (queued calls and interrupts stay queued)."""
        self.require_open()
        cdef vcpustate_t *v = self.v
        if value:
            with nogil:
                kick_vcpu(v, 0, KICK_USER)
        else:
            pthread_mutex_lock(&v.lock)
            if not kvmsys_and_int(&v.kick_pending, ~KICK_USER):
                kvmsys_store_u8(&v.run.immediate_exit, 0)
            pthread_mutex_unlock(&v.lock)

    def last_exit(self):
        """The exit the comm area holds now, decoded (valid until the vCPU runs again)."""
        self.require_open()
        return make_exit(self)

    @property
    def request_interrupt_window(self):
        """kvm_run.request_interrupt_window: while set (no in-kernel irqchip), KVM_RUN
        exits with IRQ_WINDOW_OPEN as soon as the guest can take an interrupt."""
        self.require_open()
        return bool(self.v.run.request_interrupt_window)

    @request_interrupt_window.setter
    def request_interrupt_window(self, bint value):
        self.require_open()
        self.v.run.request_interrupt_window = 1 if value else 0

    # --- registers ---------------------------------------------------------
    @property
    def regs(self):
        """The general registers in the comm area (KVM_CAP_SYNC_REGS): no ioctl per access;
        writes are sent back to the kernel on the next run, only if changed."""
        self.sync_ptr(KVM_SYNC_X86_REGS)
        return SyncRegs._new(self)

    @property
    def sync_sregs(self):
        """The special registers in the comm area (KVM_SYNC_X86_SREGS), a SyncSregs view:
        no ioctl per access while SREGS is a valid set (set_sync_valid_reg), else one
        KVM_GET_SREGS per run when first read; writes go to KVM at the next run, or before
        the vCPU's next ioctl."""
        self.sync_ptr(KVM_SYNC_X86_SREGS)
        return SyncStruct._new(SyncSregs, self, KVM_SYNC_X86_SREGS, 0, _SREGS_FIELDS, "sregs")

    @property
    def sync_events(self):
        """Pending and injected events in the comm area (KVM_SYNC_X86_EVENTS), a SyncEvents
        view; like sync_sregs."""
        self.sync_ptr(KVM_SYNC_X86_EVENTS)
        return SyncStruct._new(SyncEvents, self, KVM_SYNC_X86_EVENTS, 0, _EVENT_FIELDS, "events")

    cdef kvm_regs _get_regs_ioctl(self) except *:
        cdef kvm_regs r
        self.vcpu_ioctl(KVM_GET_REGS, &r, "KVM_GET_REGS")
        return r

    def get_regs(self):
        """KVM_GET_REGS as a dict (the comm-area copy, if it holds unsent writes)."""
        self.require_open()
        if self.v.run.kvm_dirty_regs & KVM_SYNC_X86_REGS:
            return self.v.run.s.regs.regs
        return self._get_regs_ioctl()

    def set_regs(self, regs):
        """KVM_SET_REGS from a dict with every register (get_regs(), modified)."""
        of_type(regs, dict, "regs")
        if regs.keys() != _REG_NAMES:
            raise InvalidArgumentError(
                f"set_regs needs exactly the keys {sorted(_REG_NAMES)}; missing "
                f"{sorted(_REG_NAMES - set(regs))}, unknown {sorted(set(regs) - _REG_NAMES, key=repr)}")
        for k, x in (<dict>regs).items():
            as_u64(x, k)
        cdef kvm_regs r = regs
        self.vcpu_ioctl(KVM_SET_REGS, &r, "KVM_SET_REGS")
        self.v.run.s.regs.regs = r      # (any comm-area write before it was sent first)
        self.synced |= KVM_SYNC_X86_REGS

    def get_sregs(self):
        """KVM_GET_SREGS as a dict (segments as nested dicts)."""
        cdef kvm_sregs s
        self.vcpu_ioctl(KVM_GET_SREGS, &s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, sregs):
        """KVM_SET_SREGS from a full dict (get_sregs(), modified)."""
        cdef kvm_sregs s
        try:
            s = int_leaves(of_type(sregs, dict, "sregs"), "sregs")
        except (TypeError, ValueError, OverflowError, IndexError) as e:
            raise InvalidArgumentError(f"sregs: {e}") from None
        self.vcpu_ioctl(KVM_SET_SREGS, &s, "KVM_SET_SREGS")

    def get_debugregs(self):
        """KVM_GET_DEBUGREGS: db (DR0-DR3), dr6, dr7 and flags, as a dict."""
        cdef kvm_debugregs d
        self.vcpu_ioctl(KVM_GET_DEBUGREGS, &d, "KVM_GET_DEBUGREGS")
        return d

    def set_debugregs(self, debugregs):
        """KVM_SET_DEBUGREGS from a dict as get_debugregs() returns it."""
        cdef kvm_debugregs d
        try:
            d = int_leaves(of_type(debugregs, dict, "debugregs"), "debugregs")
        except (TypeError, ValueError, OverflowError, IndexError) as e:
            raise InvalidArgumentError(f"debugregs: {e}") from None
        self.vcpu_ioctl(KVM_SET_DEBUGREGS, &d, "KVM_SET_DEBUGREGS")

    def get_msrs(self, indices):
        """KVM_GET_MSRS: {index: value} for the MSRs the kernel returned (it stops at the first it cannot read)."""
        cdef kvm_msrs *m = msrs_new(indices)
        try:
            return msrs_read(m, self.vcpu_ioctl(KVM_GET_MSRS, m, "KVM_GET_MSRS"))
        finally:
            free(m)

    def set_msrs(self, msrs):
        """KVM_SET_MSRS from {index: value}; returns how many the kernel accepted (in order)."""
        cdef list items = [(as_u32(k, "MSR index"), as_u64(v, "MSR value"))
                           for k, v in of_type(msrs, dict, "msrs").items()]
        require(0 < len(items) <= 4096, "between 1 and 4096 MSRs")
        cdef size_t n = len(items)
        cdef kvm_msrs *m = <kvm_msrs *>calloc(1, sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry))
        if m == NULL:
            raise MemoryError()
        cdef kvm_msr_entry *e = <kvm_msr_entry *>(<char *>m + sizeof(kvm_msrs))
        try:
            m.nmsrs = n
            for i in range(n):
                e[i].index = items[i][0]
                e[i].data = items[i][1]
            return self.vcpu_ioctl(KVM_SET_MSRS, m, "KVM_SET_MSRS")
        finally:
            free(m)

    def set_cpuid2(self, entries):
        """KVM_SET_CPUID2 from a list of dicts like KvmCore.supported_cpuid() returns."""
        cdef list ents = as_list(entries, "CPUID entries")
        require(0 < len(ents) <= 512, "between 1 and 512 CPUID entries")
        cdef size_t n = len(ents)
        cdef kvm_cpuid2 *c = <kvm_cpuid2 *>calloc(1, sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2))
        if c == NULL:
            raise MemoryError()
        cdef kvm_cpuid_entry2 *e = <kvm_cpuid_entry2 *>(<char *>c + sizeof(kvm_cpuid2))
        try:
            c.nent = n
            for i in range(n):
                d = ents[i]
                if not (isinstance(d, dict) and "function" in d and d.keys() <= _CPUID_KEYS):
                    raise InvalidArgumentError(f"CPUID entry {i} must be a dict with 'function' and "
                                               f"only {sorted(_CPUID_KEYS)}")
                e[i].function = as_u32(d["function"], "CPUID function")
                e[i].index = as_u32(d.get("index", 0), "CPUID index")
                e[i].flags = as_u32(d.get("flags", 0), "CPUID flags")
                e[i].eax = as_u32(d.get("eax", 0), "CPUID eax")
                e[i].ebx = as_u32(d.get("ebx", 0), "CPUID ebx")
                e[i].ecx = as_u32(d.get("ecx", 0), "CPUID ecx")
                e[i].edx = as_u32(d.get("edx", 0), "CPUID edx")
            self.vcpu_ioctl(KVM_SET_CPUID2, c, "KVM_SET_CPUID2")
        finally:
            free(c)

    def get_mp_state(self):
        """KVM_GET_MP_STATE: a kvmsys.MpState value (RUNNABLE, HALTED, ...)."""
        cdef kvm_mp_state s
        self.vcpu_ioctl(KVM_GET_MP_STATE, &s, "KVM_GET_MP_STATE")
        return as_enum("MpState", s.mp_state)

    def set_mp_state(self, state):
        """KVM_SET_MP_STATE: a kvmsys.MpState value."""
        cdef kvm_mp_state s
        s.mp_state = as_u32(state, "MP state")
        self.vcpu_ioctl(KVM_SET_MP_STATE, &s, "KVM_SET_MP_STATE")

    # Opaque state blobs (the raw kernel structs), for save and restore.
    cdef bytes get_blob(self, unsigned long req, size_t size, str op):
        cdef bytearray buf = bytearray(size)
        self.vcpu_ioctl(req, <char *>buf, op)
        return bytes(buf)

    cdef int set_blob(self, unsigned long req, object data, size_t size, str op) except -1:
        cdef bytearray buf = bytearray(as_blob(data, op))
        require(<size_t>len(buf) == size, f"{op} takes exactly {size} bytes, got {len(buf)}")
        self.vcpu_ioctl(req, <char *>buf, op)
        return 0

    def get_fpu(self):
        return self.get_blob(KVM_GET_FPU, sizeof(kvm_fpu), "KVM_GET_FPU")

    def set_fpu(self, data):
        """KVM_SET_FPU: the bytes (or kvmsys.state.Fpu) of a struct kvm_fpu."""
        self.set_blob(KVM_SET_FPU, data, sizeof(kvm_fpu), "KVM_SET_FPU")

    def get_lapic(self):
        require(self.vm.has_irqchip, "the local APIC exists only with the in-kernel irqchip")
        return self.get_blob(KVM_GET_LAPIC, sizeof(kvm_lapic_state), "KVM_GET_LAPIC")

    def set_lapic(self, data):
        """KVM_SET_LAPIC: the bytes (or kvmsys.state.Lapic) of a struct kvm_lapic_state."""
        require(self.vm.has_irqchip, "the local APIC exists only with the in-kernel irqchip")
        self.set_blob(KVM_SET_LAPIC, data, sizeof(kvm_lapic_state), "KVM_SET_LAPIC")

    def get_vcpu_events(self):
        return self.get_blob(KVM_GET_VCPU_EVENTS, sizeof(kvm_vcpu_events), "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, data):
        """KVM_SET_VCPU_EVENTS: the bytes (or kvmsys.state.VcpuEvents) of a struct kvm_vcpu_events."""
        self.set_blob(KVM_SET_VCPU_EVENTS, data, sizeof(kvm_vcpu_events), "KVM_SET_VCPU_EVENTS")

    @property
    def xsave_size(self):
        """Bytes of this vCPU's XSAVE state: KVM_CAP_XSAVE2's value on the VM (AMX-capable
        hosts report more than 4 KiB), else sizeof(struct kvm_xsave)."""
        cdef long n = self.vm.check_extension(KVM_CAP_XSAVE2)
        return n if n > <long>sizeof(kvm_xsave) else sizeof(kvm_xsave)

    def get_xsave(self):
        """KVM_GET_XSAVE2 (xsave_size bytes) where KVM_CAP_XSAVE2 exists, else KVM_GET_XSAVE."""
        if self.vm.check_extension(KVM_CAP_XSAVE2) > 0:
            return self.get_blob(KVM_GET_XSAVE2, self.xsave_size, "KVM_GET_XSAVE2")
        return self.get_blob(KVM_GET_XSAVE, sizeof(kvm_xsave), "KVM_GET_XSAVE")

    def set_xsave(self, data):
        """KVM_SET_XSAVE from get_xsave()'s bytes (the kernel reads xsave_size of them)."""
        self.set_blob(KVM_SET_XSAVE, data, self.xsave_size, "KVM_SET_XSAVE")

    def get_xcrs(self):
        return self.get_blob(KVM_GET_XCRS, sizeof(kvm_xcrs), "KVM_GET_XCRS")

    def set_xcrs(self, data):
        """KVM_SET_XCRS: the bytes (or kvmsys.state.Xcrs) of a struct kvm_xcrs."""
        self.set_blob(KVM_SET_XCRS, data, sizeof(kvm_xcrs), "KVM_SET_XCRS")

    # --- more state and controls (each needs a capability; CapabilityError without) ---
    def get_sregs2(self):
        """KVM_GET_SREGS2: the special registers plus the PAE PDPTRs (flags says if valid)."""
        self.require_cap(KVM_CAP_SREGS2, "SREGS2", "KVM_GET_SREGS2")
        cdef kvm_sregs2 s
        memset(&s, 0, sizeof(s))
        self.vcpu_ioctl(KVM_GET_SREGS2, &s, "KVM_GET_SREGS2")
        return s

    def set_sregs2(self, sregs2):
        """KVM_SET_SREGS2 from a full dict (get_sregs2(), modified)."""
        self.require_cap(KVM_CAP_SREGS2, "SREGS2", "KVM_SET_SREGS2")
        cdef kvm_sregs2 s
        try:
            s = int_leaves(of_type(sregs2, dict, "sregs2"), "sregs2")
        except (TypeError, ValueError, OverflowError, IndexError) as e:
            raise InvalidArgumentError(f"sregs2: {e}") from None
        self.vcpu_ioctl(KVM_SET_SREGS2, &s, "KVM_SET_SREGS2")

    def get_cpuid2(self):
        """KVM_GET_CPUID2: the CPUID entries set on this vCPU (set_cpuid2's form)."""
        cdef kvm_cpuid2 *c = cpuid_new()
        try:
            self.vcpu_ioctl(KVM_GET_CPUID2, c, "KVM_GET_CPUID2")
            return cpuid_read(c)
        finally:
            free(c)

    def get_tsc_khz(self):
        """KVM_GET_TSC_KHZ: the guest's TSC frequency in kHz."""
        self.require_cap(KVM_CAP_GET_TSC_KHZ, "GET_TSC_KHZ", "KVM_GET_TSC_KHZ")
        self.require_open()
        return self.vcpu_ioctl(KVM_GET_TSC_KHZ, NULL, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz):
        """KVM_SET_TSC_KHZ: scale the guest's TSC to *khz* (needs KVM_CAP_TSC_CONTROL)."""
        cdef uint32_t k = as_u32(khz, "TSC frequency (kHz)")
        require(k > 0, "the TSC frequency must be positive")
        self.require_cap(KVM_CAP_TSC_CONTROL, "TSC_CONTROL", "KVM_SET_TSC_KHZ")
        self.vcpu_ioctl(KVM_SET_TSC_KHZ, <void *><size_t>k, "KVM_SET_TSC_KHZ")   # the value is the argument

    def kvmclock_ctrl(self):
        """KVM_KVMCLOCK_CTRL: tell the guest's kvmclock the vCPU was paused by the host
        (no soft-lockup warnings); EINVAL unless the guest set up kvmclock."""
        self.require_cap(KVM_CAP_KVMCLOCK_CTRL, "KVMCLOCK_CTRL", "KVM_KVMCLOCK_CTRL")
        self.vcpu_ioctl(KVM_KVMCLOCK_CTRL, NULL, "KVM_KVMCLOCK_CTRL")

    def smi(self):
        """KVM_SMI: queue a system-management interrupt (needs KVM_CAP_X86_SMM)."""
        self.require_cap(KVM_CAP_X86_SMM, "X86_SMM", "KVM_SMI")
        self.vcpu_ioctl(KVM_SMI, NULL, "KVM_SMI")

    def enable_cap(self, cap, flags=0, args=()):
        """KVM_ENABLE_CAP on the vCPU (e.g. KVM_CAP_ENFORCE_PV_FEATURE_CPUID)."""
        cdef kvm_enable_cap c
        fill_enable_cap(&c, cap, flags, args)
        self.vcpu_ioctl(KVM_ENABLE_CAP, &c, "KVM_ENABLE_CAP(vCPU)")

    def set_guest_debug(self, bint enable=True, bint single_step=False, bint sw_breakpoints=False,
                        bint hw_breakpoints=False, debugreg=None, bint block_irq=False):
        """KVM_SET_GUEST_DEBUG.  single_step: every instruction ends in a DEBUG exit (#DB);
        sw_breakpoints: the guest's int3 ends in a DEBUG exit (#BP) instead of reaching the
        guest; hw_breakpoints: the debug registers in *debugreg* (DR0-DR3 addresses, index 7
        DR7; 8 values) are the host's, hits end in a DEBUG exit (#DB); block_irq: no
        interrupts are injected while stepping.  enable=False turns all of it off."""
        cdef kvm_guest_debug d
        cdef int i
        memset(&d, 0, sizeof(d))
        if debugreg is not None:
            regs = [as_u64(x, "debug register") for x in as_list(debugreg, "debugreg")]
            require(len(regs) == 8, f"debugreg takes 8 values (DR0-DR7), got {len(regs)}")
            require(hw_breakpoints, "debugreg is used only with hw_breakpoints=True")
            for i in range(8):
                d.arch.debugreg[i] = regs[i]
        if enable:
            d.control = KVM_GUESTDBG_ENABLE
            if single_step:
                d.control |= KVM_GUESTDBG_SINGLESTEP
            if sw_breakpoints:
                d.control |= KVM_GUESTDBG_USE_SW_BP
            if hw_breakpoints:
                d.control |= KVM_GUESTDBG_USE_HW_BP
            if block_irq:
                d.control |= KVM_GUESTDBG_BLOCKIRQ
        self.vcpu_ioctl(KVM_SET_GUEST_DEBUG, &d, "KVM_SET_GUEST_DEBUG")
        self.debug_enabled = enable

    def translate(self, linear_address):
        """KVM_TRANSLATE: the guest-physical address of a linear (guest-virtual) address under
        the vCPU's current paging mode, as a dict: physical_address, valid, writeable, usermode."""
        cdef kvm_translation t
        memset(&t, 0, sizeof(t))
        t.linear_address = as_u64(linear_address, "linear address")
        self.vcpu_ioctl(KVM_TRANSLATE, &t, "KVM_TRANSLATE")
        return dict(physical_address=t.physical_address, valid=bool(t.valid),
                    writeable=bool(t.writeable), usermode=bool(t.usermode))

    def interrupt(self, vector):
        """KVM_INTERRUPT: queue an external interrupt (only without the in-kernel irqchip;
        kvmsys.Vcpu.interrupt sends an MSI to the vCPU's APIC where there is one)."""
        cdef uint32_t vector_ = <uint32_t>as_uint(vector, "interrupt vector", 255)
        require(not self.vm.has_irqchip, "with the in-kernel irqchip use irq_line or signal_msi")
        cdef kvm_interrupt i
        i.irq = vector_
        self.vcpu_ioctl(KVM_INTERRUPT, &i, "KVM_INTERRUPT")

    def nmi(self):
        """KVM_NMI: queue an NMI."""
        self.vcpu_ioctl(KVM_NMI, NULL, "KVM_NMI")

    # --- statistics --------------------------------------------------------
    def stats(self):
        """Counters kept by the run loop in C."""
        self.require_open()
        cdef vcpustate_t *v = self.v
        cdef int i
        exits = {name_of_exit(i): v.exits[i] for i in range(NR_REASONS) if v.exits[i]}
        hits = {i: v.handler_hits[i] for i in range(self.vm.state.nhandlers) if v.handler_hits[i]}
        return dict(exits=exits, total_exits=sum(exits.values()), handler_hits=hits,
                    default_hits=v.default_hits, runs=v.runs, ns_in_run=v.ns_in_run,
                    ns_in_handlers=v.ns_in_handlers, coalesced=v.coalesced)

    def reset_stats(self):
        """Zero the run-loop counters that stats() reports."""
        self.require_open()
        cdef vcpustate_t *v = self.v
        memset(v.exits, 0, sizeof(v.exits))
        memset(v.handler_hits, 0, sizeof(v.handler_hits))
        v.default_hits = v.runs = v.ns_in_run = v.ns_in_handlers = v.coalesced = 0

    # --- lifetime ----------------------------------------------------------
    def close(self):
        """Close the vCPU fd (the comm area is unmapped once no view of it is left).

        KVM keeps a vCPU until its VM is destroyed, so its id stays taken in this VM.
        Refused (StateError) while the vCPU is inside run(), from any thread."""
        if self.gone is not None:
            self.require_open()                 # StaleVcpuError: it is somebody else's now
        if self.v == NULL or self.v.fd < 0:
            return
        if self.forkgen != kvmsys_fork_generation:
            # A fork child's copy of the parent's vCPU: its locks and flags are a snapshot
            # of other threads; closing our fd touches nothing of the parent's.
            close(self.v.fd)
            self.v.fd = -1
            self.page = self.page_view = self.spare_exit = self.spare_own = None   # (the spares refer back to it)
            return
        # Claim the vCPU as run() does, so a run() starting in another thread now
        # fails cleanly instead of entering KVM_RUN on a closing vCPU; keep the claim.
        self.claim("close it")
        self.close_claimed()

    cdef int claim(self, str what) except -1:
        """Mark the vCPU busy as run() does: StateError if it is inside run() (any thread)."""
        if kvmsys_xchg_int(&self.v.active, 1):
            raise StateError(f"vCPU {self.id} is running (inside run(), from its own handler or another thread): "
                             f"cannot {what} now; let run() return first")
        return 0

    cdef int cancel_pending(self) except -1:
        # Calls queued by call_soon() that will never run here (the vCPU closes or
        # changes hands): their futures complete, cancelled.
        work, self.pending = self.pending, []
        for _fn, _args, future in work:
            if future is not None:
                future.cancel()
        return 0

    cdef void close_claimed(self):
        try:
            self.cancel_pending()
        except BaseException:
            pass        # (a future's done-callback raised: the close goes on)
        pthread_mutex_lock(&self.v.lock)
        close(self.v.fd)
        self.v.fd = -1
        self.v.run = NULL
        self.v.generation += 1
        pthread_mutex_unlock(&self.v.lock)
        self.page = self.page_view = self.spare_exit = self.spare_own = None   # (the spares refer back to it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self.v != NULL and self.owner:
            if self.v.fd >= 0:
                close(self.v.fd)
            pthread_mutex_destroy(&self.v.lock)
            free(self.v)
        self.v = NULL
