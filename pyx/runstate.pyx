# The hot run loop: KVM_RUN repeatedly with the GIL released, common exits
# handled here in C, back to Python only when it must.
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy, memset

cdef enum:
    POLL_NS = 10000000   # main thread: check Python signals at least every 10 ms
    CONSOLE_MAX = 64 * 1024 * 1024

# Set at interpreter exit: no vCPU enters KVM_RUN again (see shutdown() in vcpu.pyx).
cdef int shutting_down = 0


cdef int vm_init(vmstate_t *vm, int fd) except -1:
    memset(vm, 0, sizeof(vmstate_t))
    vm.fd = fd
    vm.default_kind[SPACE_PIO] = H_PYTHON
    vm.default_kind[SPACE_MMIO] = H_PYTHON
    vm.default_kind[SPACE_MSR] = H_PYTHON
    vm.hlt_action = H_PYTHON
    pthread_mutex_init(&vm.lock, NULL)
    pthread_mutex_init(&vm.ring_lock, NULL)
    vm.port_counts = <uint64_t *>calloc(NR_PORTS, sizeof(uint64_t))
    if vm.port_counts == NULL:
        raise MemoryError()
    return 0


cdef void vm_free(vmstate_t *vm) noexcept:
    free(vm.port_counts)
    free(vm.console)
    vm.port_counts = NULL
    vm.console = NULL
    pthread_mutex_destroy(&vm.lock)
    pthread_mutex_destroy(&vm.ring_lock)


cdef inline void console_append_locked(vmstate_t *vm, const uint8_t *data, size_t n) noexcept nogil:
    cdef size_t cap
    cdef uint8_t *grown
    if vm.console_len + n > vm.console_cap and vm.console_len + n <= CONSOLE_MAX:
        cap = vm.console_cap * 2 if vm.console_cap else 4096
        while cap < vm.console_len + n:
            cap *= 2
        grown = <uint8_t *>realloc(vm.console, cap)
        if grown != NULL:
            vm.console = grown
            vm.console_cap = cap
    if vm.console_len + n <= vm.console_cap:
        memcpy(vm.console + vm.console_len, data, n)
        vm.console_len += n
    else:
        vm.console_dropped += n     # over CONSOLE_MAX: counted, never silent


cdef inline void console_append(vmstate_t *vm, const uint8_t *data, size_t n) noexcept nogil:
    pthread_mutex_lock(&vm.lock)
    console_append_locked(vm, data, n)
    pthread_mutex_unlock(&vm.lock)


cdef inline int find_handler(vmstate_t *vm, int space, uint64_t addr) noexcept nogil:
    # The latest handler wins, so a device installed later overrides a range;
    # a removed entry has space -1 and matches nothing.
    cdef int i
    cdef int n = kvmsys_load_int(&vm.nhandlers)
    for i in range(n - 1, -1, -1):
        if kvmsys_load_int(&vm.handlers[i].space) == space and vm.handlers[i].start <= addr < vm.handlers[i].end:
            return i
    return -1


cdef inline uint64_t le_value(const uint8_t *p, size_t n) noexcept nogil:
    cdef uint64_t v = 0
    cdef size_t i
    for i in range(n):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


# The low *n* bytes of *value*, little-endian (x86), at p (n 1..8): one store of the
# access's width where there is one.  Through a generic byte loop, answering a read
# cost 18-40 ns more per exit on our host (PIO in and MMIO read, both guest modes;
# cause not pinned down): the whole gap to a bare C loop's reads.
cdef inline void store_le(uint8_t *p, size_t n, uint64_t value) noexcept nogil:
    cdef uint32_t v4
    cdef uint16_t v2
    cdef size_t j
    if n == 4:
        v4 = <uint32_t>value
        memcpy(p, &v4, 4)       # (constant sizes: one mov, never a libc call)
    elif n == 8:
        memcpy(p, &value, 8)
    elif n == 1:
        p[0] = <uint8_t>value
    elif n == 2:
        v2 = <uint16_t>value
        memcpy(p, &v2, 2)
    else:
        for j in range(n):
            p[j] = <uint8_t>(value >> (8 * j))


# *value* little-endian in every *unit* bytes of [p, p+n) (unit 1..8).  No division,
# and no library call: after a world switch the first call into libc's memset costs
# more than the whole store.
cdef inline void fill(uint8_t *p, size_t n, uint64_t value, size_t unit) noexcept nogil:
    cdef size_t i = 0
    while i < n:
        store_le(p + i, min(unit, n - i), value)
        i += unit


# The handler kind for an access and, in *h*, its handler index (-1: the space's default).
cdef inline int handler_kind(vmstate_t *vm, int space, uint64_t addr, int *h) noexcept nogil:
    h[0] = find_handler(vm, space, addr)
    if h[0] >= 0:
        return vm.handlers[h[0]].kind
    return vm.default_kind[space]


# Accesses to ports the PIO default ignores are counted per vCPU while they go to one
# port, and added to the VM's shared count when the port changes and when the run
# loop returns: a locked add to a 512 KiB table on every such exit cost ~30 ns of a
# 64-bit guest's OUT here.
cdef inline bint ignored_port_access(int space, int h, int kind) noexcept nogil:
    return h < 0 and kind == H_IGNORE and space == SPACE_PIO


cdef inline void add_port_count(vmstate_t *vm, uint64_t port, uint64_t n) noexcept nogil:
    kvmsys_add_u64(&vm.port_counts[port & 0xffff], n)


cdef inline void flush_port_count(vcpustate_t *v) noexcept nogil:
    if v.ignored_pending:
        add_port_count(v.vm, v.ignored_port, v.ignored_pending)
        v.ignored_pending = 0


cdef inline void count_ignored_port(vcpustate_t *v, uint32_t port) noexcept nogil:
    if v.ignored_port != port:
        flush_port_count(v)
        v.ignored_port = port
    v.ignored_pending += 1


# Handle one access (PIO or MMIO) with a fast handler.  Returns -1 if it was
# handled and the loop goes on, else an R_* result.
cdef inline int access(vcpustate_t *v, int space, uint64_t addr, int is_write,
                       uint8_t *data, size_t unit, size_t total) noexcept nogil:
    cdef vmstate_t *vm = v.vm
    cdef int h
    cdef int kind = handler_kind(vm, space, addr, &h)
    cdef uint64_t value = 0
    if h >= 0:
        value = vm.handlers[h].value
        v.handler_hits[h] += 1
    else:
        v.default_hits += 1
        if ignored_port_access(space, h, kind):
            count_ignored_port(v, <uint32_t>addr)
    v.last_handler = h
    if kind == H_PYTHON:
        return R_EXIT
    if is_write:
        if kind == H_SINK:
            console_append(vm, data, total)
        elif kind == H_EXIT:
            v.stop_status = (le_value(data, unit) << 1) | 1     # 64-bit: 0xffffffff is no -1
            return R_STOP
        return -1
    # CONST answers its value, and so does SINK (a console that reads back, debugcon's
    # 0xe9); anything else reads all-ones
    fill(data, total, value if kind == H_CONST or kind == H_SINK else ~(<uint64_t>0), unit)
    return -1


# Take the next entry of the VM's coalesced ring (ring_lock held), copied to *e
# (once `first` moves on, the kernel may reuse its slot), if `first` is not *stop*.
# Returns 1, 0 once the ring is empty (or at stop), or -EFAULT: ring indices out of
# range (the ring is writable from Python through the comm area) are never trusted,
# or a drain would never end.
cdef inline int ring_pop_locked(vmstate_t *vm, kvm_coalesced_mmio *e, uint32_t stop) noexcept nogil:
    cdef kvm_coalesced_mmio_ring *ring = vm.ring
    cdef kvm_coalesced_mmio *entries = <kvm_coalesced_mmio *>(<char *>ring + sizeof(kvm_coalesced_mmio_ring))
    cdef uint32_t first = ring.first
    cdef uint32_t last = kvmsys_load_u32(&ring.last)
    if first >= vm.ring_max or last >= vm.ring_max:
        return -EFAULT
    if first == last or first == stop:
        return 0
    e[0] = entries[first]
    kvmsys_store_u32(&ring.first, (first + 1) % vm.ring_max)
    return 1


# Drain the VM's coalesced MMIO/PIO ring: writes the kernel batched for us, each
# through the handler of its range, in order.  Returns -1 once the ring is empty,
# or the R_* of an entry that goes to Python or stops the run (in v.ring_entry).
# Bad ring indices are R_ERROR with v.error = -EFAULT (negative: a check of ours).
cdef int drain_ring(vcpustate_t *v) noexcept nogil:
    cdef kvm_coalesced_mmio *e = &v.ring_entry
    cdef int r, res = -1
    pthread_mutex_lock(&v.vm.ring_lock)
    while True:
        r = ring_pop_locked(v.vm, e, v.vm.ring_max)
        if r < 0:
            v.error = r
            res = R_ERROR
            break
        if r == 0:
            break
        v.coalesced += 1
        if e.len == 0 or e.len > 8:
            kvmsys_add_u64(&v.vm.coalesced_unhandled, 1)
            continue
        res = access(v, SPACE_PIO if e.pio else SPACE_MMIO, e.phys_addr, 1, e.data, e.len, e.len)
        if res >= 0:
            break
        if v.last_handler < 0:
            kvmsys_add_u64(&v.vm.coalesced_unhandled, 1)    # default IGNORE: counted, never silent
    pthread_mutex_unlock(&v.vm.ring_lock)
    v.from_ring = res == R_EXIT or res == R_STOP
    return res


cdef inline bint ring_pending(vmstate_t *vm) noexcept nogil:
    return (vm.ring != NULL and kvmsys_load_int(&vm.ring_used) and
            kvmsys_load_u32(&vm.ring.first) != kvmsys_load_u32(&vm.ring.last))


# Outside any run (a zone was just unregistered): drain the ring, in order, up to
# where it ended on entry (later entries belong to zones still registered, and a
# guest writing them could keep this going for ever).  C-handled writes are applied
# here; those for a PYTHON or EXIT range, which only a run() can deliver, go to
# out[] in order, their number to *nout (at most cap: a ring has fewer entries).
# Returns 0 or -EFAULT (bad ring indices).
cdef int flush_ring(vmstate_t *vm, kvm_coalesced_mmio *out, uint32_t cap, uint32_t *nout) noexcept nogil:
    cdef kvm_coalesced_mmio e
    cdef int r = 0
    cdef int h, kind, space
    cdef uint32_t stop
    nout[0] = 0
    pthread_mutex_lock(&vm.ring_lock)
    if vm.ring != NULL:         # NULL: no vCPU yet (nothing was written) or the VM is closed
        stop = kvmsys_load_u32(&vm.ring.last)
        while nout[0] < cap:
            r = ring_pop_locked(vm, &e, stop)
            if r <= 0:
                break
            kvmsys_add_u64(&vm.coalesced_flushed, 1)
            if e.len == 0 or e.len > 8:
                kvmsys_add_u64(&vm.coalesced_unhandled, 1)
                continue
            space = SPACE_PIO if e.pio else SPACE_MMIO
            kind = handler_kind(vm, space, e.phys_addr, &h)
            if ignored_port_access(space, h, kind):
                add_port_count(vm, e.phys_addr, 1)
            if kind == H_PYTHON or kind == H_EXIT:
                out[nout[0]] = e
                nout[0] += 1
                continue
            if kind == H_SINK:
                console_append(vm, e.data, e.len)
            if h < 0:
                kvmsys_add_u64(&vm.coalesced_unhandled, 1)
    pthread_mutex_unlock(&vm.ring_lock)
    return r if r < 0 else 0


# Owner thread, before KVM_RUN, no in-kernel irqchip: inject what the guest can
# take now, as x86 does.  An external interrupt only if the last exit said the
# guest is ready (IF=1, no interrupt shadow, none injected and not yet taken),
# else ask for an IRQ_WINDOW_OPEN exit; one per KVM_RUN, so none overwrites
# another.  An NMI only when KVM holds none pending (it merges pending NMIs).
# Returns 0 or an errno.
# Whether the guest can take an external interrupt in the state it will resume
# with, when the host changed that state after the last exit (registers, sync regs,
# sregs, events, a restore, the gdb server): IF from the registers it will run
# with, no interrupt shadow, none injected and not yet taken.  1, 0, or -errno.
cdef int ready_now(vcpustate_t *v) noexcept nogil:
    cdef kvm_regs regs
    cdef kvm_vcpu_events ev
    if ioctl(v.fd, KVM_GET_REGS, &regs) < 0:
        return -errno
    if not regs.rflags & 0x200:                 # IF
        return 0
    if ioctl(v.fd, KVM_GET_VCPU_EVENTS, &ev) < 0:
        return -errno
    return not (ev.interrupt.injected or ev.interrupt.shadow)


cdef int inject_pending(vcpustate_t *v, kvm_run *run) noexcept nogil:
    cdef kvm_vcpu_events ev
    cdef kvm_interrupt irq
    cdef int window = 0, ready, unsent
    if run.kvm_dirty_regs and (v.nirq or v.nmi_queued):
        # comm-area writes go first, as before any vCPU ioctl (flush_sync): KVM_RUN would
        # load their events after KVM_INTERRUPT / KVM_NMI and drop what those queued.  A
        # set refused stays marked (run_once reports it and drops it).
        unsent = flush_sync(v)
        v.state_set = 1
        if unsent:
            run.kvm_dirty_regs |= <uint64_t>unsent
            return errno
    if kvmsys_load_int(&v.nmi_queued) > 0:
        if ioctl(v.fd, KVM_GET_VCPU_EVENTS, &ev) < 0:
            return errno
        if not ev.nmi.pending and not ev.nmi.injected:
            if ioctl(v.fd, KVM_NMI, NULL) < 0:
                return errno
            pthread_mutex_lock(&v.lock)
            kvmsys_store_int(&v.nmi_queued, v.nmi_queued - 1)
            pthread_mutex_unlock(&v.lock)
            v.nmis_injected += 1
    if kvmsys_load_int(&v.nirq) > 0:
        ready = run.ready_for_interrupt_injection and run.if_flag
        if ready and v.state_set:
            ready = ready_now(v)            # the last exit's word is stale
            if ready < 0:
                return -ready
        if ready:
            irq.irq = v.irq_queue[v.irq_head]
            if ioctl(v.fd, KVM_INTERRUPT, &irq) < 0:
                return errno
            pthread_mutex_lock(&v.lock)
            v.irq_head = (v.irq_head + 1) % IRQ_QUEUE_MAX
            kvmsys_store_int(&v.nirq, v.nirq - 1)
            pthread_mutex_unlock(&v.lock)
            v.irqs_injected += 1
            run.ready_for_interrupt_injection = 0       # until the next exit says so again
        window = kvmsys_load_int(&v.nirq) > 0
    if window != v.irq_window:
        run.request_interrupt_window = window
        v.irq_window = window
    return 0


cdef inline int dispatch(vcpustate_t *v, kvm_run *run) noexcept nogil:
    cdef uint32_t reason = run.exit_reason
    cdef uint64_t total
    cdef int vm_action
    if reason == KVM_EXIT_IO:
        total = <uint64_t>run.io.size * run.io.count
        if run.io.size == 0 or run.io.data_offset + total > v.run_size or run.io.data_offset < sizeof(kvm_run):
            v.error = -EFAULT
            return R_ERROR
        return access(v, SPACE_PIO, run.io.port, run.io.direction == KVM_EXIT_IO_OUT,
                      <uint8_t *>run + run.io.data_offset, run.io.size, total)
    if reason == KVM_EXIT_MMIO:
        if run.mmio.len == 0 or run.mmio.len > 8:
            v.error = -EFAULT
            return R_ERROR
        return access(v, SPACE_MMIO, run.mmio.phys_addr, run.mmio.is_write,
                      run.mmio.data, run.mmio.len, run.mmio.len)
    if reason == KVM_EXIT_IRQ_WINDOW_OPEN and v.irq_window:
        v.last_handler = -1
        return -1                   # ours: the loop injects the next queued interrupt
    if reason == KVM_EXIT_X86_RDMSR or reason == KVM_EXIT_X86_WRMSR:
        # an MSR is one 8-byte unit: CONST answers rdmsr, IGNORE reads all-ones
        run.msr.error = 0
        return access(v, SPACE_MSR, run.msr.index, reason == KVM_EXIT_X86_WRMSR,
                      <uint8_t *>&run.msr.data, 8, 8)
    if reason == KVM_EXIT_HLT:
        vm_action = v.vm.hlt_action
        v.last_handler = -1
        if vm_action == H_IGNORE:
            return -1
        if vm_action == H_EXIT:
            v.stop_status = 0
            return R_STOP
        return R_EXIT
    v.last_handler = -1
    return R_EXIT


# KVM_SET_SIGNAL_MASK with the kernel's 64-bit sigset; NULL: none.
cdef int set_vcpu_sigmask(int fd, uint64_t *mask) noexcept nogil:
    cdef uint8_t buf[16]          # kvm_signal_mask (4 bytes) + the 8-byte set
    cdef kvm_signal_mask *m = <kvm_signal_mask *>buf
    if mask == NULL:
        return ioctl(fd, KVM_SET_SIGNAL_MASK, NULL)
    m.len = 8
    memcpy(m.sigset, mask, 8)
    return ioctl(fd, KVM_SET_SIGNAL_MASK, m)


# No KVM signal mask, unless this thread blocks the kick signal itself (see
# kvmsys_thread_blocks_kick): then its own mask with the kick signal let in, so
# kicks and the watchdog still end KVM_RUN.  Looked at (one pthread_sigmask query)
# when run_once asks (v.sample_signals: each run() call, every POLL_NS of exits,
# after call_soon callbacks; not after each exit a Python handler took, which would
# pay the system call per exit); an ioctl only when it changes.  Returns 0 or an errno.
cdef int sync_vcpu_sigmask(vcpustate_t *v) noexcept nogil:
    cdef uint64_t want = 0
    if kvmsys_thread_blocks_kick(&want):
        if v.sigmask_state == SIGMASK_REFUSED or (v.sigmask_state == SIGMASK_KVM and want == v.sigmask):
            return 0
        if set_vcpu_sigmask(v.fd, &want) == 0:
            v.sigmask = want
            v.sigmask_state = SIGMASK_KVM
        else:
            v.sigmask_state = SIGMASK_REFUSED   # kicks then rely on immediate_exit alone
        return 0
    if v.sigmask_state == SIGMASK_KVM:
        if set_vcpu_sigmask(v.fd, NULL) != 0:
            return errno
    if v.sigmask_state != SIGMASK_REFUSED:
        v.sigmask_state = SIGMASK_NONE
    return 0


cdef int run_loop(vcpustate_t *v) noexcept nogil:
    cdef kvm_run *run = v.run
    cdef uint64_t t_in, t_out, t_poll
    cdef int r, res, err
    cdef unsigned sigs, now_sigs, taken, sints, now_sints
    cdef uint8_t late
    cdef int kicks
    if v.budget_left == 0:
        return R_BUDGET     # 0 is no exit at all, never "unlimited" (< 0)
    # Time outside KVM_RUN is booked from the last KVM_RUN's return (or run()'s start,
    # see run_once), Python handler included: two clock reads per exit, both around
    # the ioctl
    t_out = v.t_left
    t_poll = t_out
    if v.sample_signals:
        err = sync_vcpu_sigmask(v)
        if err:
            v.error = err
            return R_ERROR
    kvmsys_set_running(run)
    # immediate_exit may be stale (set by a kick signal that landed after its kick
    # was taken) or missing (a kick that came while we were outside the loop):
    # cleared here, then derived from kick_pending below.  Count our signals *before*
    # clearing it: one that lands in between sets it again and is counted after
    # `sigs`, so its EINTR is known as ours.  (A relaxed store: the barrier of the
    # `running` store orders it before kick_pending is read.)
    sigs = kvmsys_own_signal_count()
    sints = kvmsys_sigint_count()
    kvmsys_store_u8_relaxed(&run.immediate_exit, 0)
    # No lock: v.thread is this thread's for the whole run() (bound, or set by
    # run_once under the lock), and a thread leaves run() only through a lock/unlock of
    # v.lock (run_once's finally, or unbinding), so a kicker that saw `running` signals
    # a thread still inside run().  This store is the entry's one full barrier
    # (seq_cst: an xchg): every load below comes after it.
    kvmsys_store_int(&v.running, 1)
    # An ioctl another thread issued on this vCPU before it saw `running`: let it
    # finish, so it never waits on the vCPU's mutex for a KVM_RUN (see
    # vcpu_ioctl_outside; a later one sees `running` and is refused).
    while kvmsys_load_int(&v.ioctls):
        sched_yield()
    # Kickers set kick_pending before immediate_exit and signal only a running vCPU:
    # one that read `running` before our store set kick_pending before it, so this
    # load sees it.  Queued interrupts need no immediate exit (they are injected before
    # KVM_RUN): their bit is dropped, with a locked RMW only when it is set.
    kicks = kvmsys_load_int(&v.kick_pending)
    if kicks & KICK_IRQ:
        kicks = kvmsys_and_int(&v.kick_pending, ~KICK_IRQ)
    if kicks & ~KICK_IRQ:
        kvmsys_store_u8(&run.immediate_exit, 1)
    # Main thread: a SIGINT since run_once's last look at Python's signals (its
    # relay's immediate_exit store may have been cleared just above)
    if v.poll_signals and kvmsys_sigint_count() != v.sigint_snap:
        kvmsys_store_u8(&run.immediate_exit, 1)
    kvmsys_raise_window_signal()
    while True:
        if not v.need_dispatch:
            t_in = kvmsys_now_ns()
            v.ns_in_handlers += t_in - t_out
            if kvmsys_load_int(&shutting_down):
                t_out = t_in
                res = R_KICK        # run_once() sees shutting_down and raises
                break
            if v.deadline_ns and t_in >= v.deadline_ns:
                # passed outside KVM_RUN (e.g. in a Python handler): the watchdog's
                # signal found no KVM_RUN to interrupt
                t_out = t_in
                res = R_DEADLINE
                break
            if v.nirq or v.nmi_queued or v.irq_window:
                err = inject_pending(v, run)
                if err:
                    v.error = err
                    res = R_ERROR
                    break
            r = ioctl(v.fd, KVM_RUN, 0)
            err = errno if r < 0 else 0
            v.state_set = 0             # the comm area's IF and readiness are current again
            t_out = kvmsys_now_ns()
            v.ns_in_run += t_out - t_in
            v.runs += 1
            if r < 0 and err != EINTR and err != EAGAIN:
                v.error = err
                res = R_ERROR
                break
            v.need_dispatch = r >= 0
        # ring entries come before the exit that found them
        if ring_pending(v.vm):
            res = drain_ring(v)
            if res >= 0:
                break
        if not v.need_dispatch:
            # EINTR: a kick, the watchdog, or somebody else's signal
            v.intr_ns = t_out
            now_sigs = kvmsys_own_signal_count()     # before clearing, as above
            now_sints = kvmsys_sigint_count()
            # Set with no kick pending, immediate_exit is a kick's that was taken
            # already: the loop takes a kick from kick_pending, and a kicker of a bound
            # vCPU (no lock against this loop) that is preempted between its two
            # stores sets immediate_exit only after that, even in a later run().
            late = kvmsys_xchg_u8(&run.immediate_exit, 0)
            v.exits[KVM_EXIT_INTR] += 1
            taken = kvmsys_take_kick_signals() if v.sigmask_state == SIGMASK_KVM else 0
            if v.poll_signals and now_sints != v.sigint_snap:
                res = R_SIGNAL      # Ctrl-C: Python raises; a kick stays pending for the next run
                break
            v.kick_bits = kvmsys_xchg_int(&v.kick_pending, 0) & ~KICK_IRQ
            if v.kick_bits:
                res = R_KICK
            elif v.deadline_ns and t_out >= v.deadline_ns:
                res = R_DEADLINE
            elif late or taken or now_sigs != sigs or now_sints != sints or \
                    kvmsys_load_int(&v.nirq) or kvmsys_load_int(&v.nmi_queued):
                # one of our signals or immediate_exit stores (for a kick taken
                # earlier, or interrupts to inject), or a SIGINT in a thread other
                # than the main one (its relay kicked the main thread): go on,
                # unless a new kick came
                sigs = now_sigs
                sints = now_sints
                if kvmsys_load_int(&v.kick_pending) & ~KICK_IRQ:
                    kvmsys_store_u8(&run.immediate_exit, 1)
                continue
            else:
                res = R_SIGNAL
            break
        v.need_dispatch = 0
        v.from_ring = 0                 # this result is the exit's, not a ring entry's taken before it
        v.exits[run.exit_reason if run.exit_reason < NR_REASONS else NR_REASONS - 1] += 1
        res = dispatch(v, run)
        kvmsys_bench_pause(0)           # benchmark hook, off: see kvmsys_native.h
        if v.budget_left > 0:
            v.budget_left -= 1
        if res >= 0:
            break
        if v.budget_left == 0:
            res = R_BUDGET
            break
        if v.deadline_ns and t_out >= v.deadline_ns:
            res = R_DEADLINE
            break
        if v.poll_signals and t_out - t_poll >= POLL_NS:
            res = R_POLL
            break
    # (release: nothing waits on `running` going to 0 in a Dekker pair; a reader that
    # sees 0 sees the loop's stores before it)
    kvmsys_store_int_release(&v.running, 0)
    kvmsys_set_running(NULL)
    flush_port_count(v)
    v.t_left = t_out
    return res


# A vCPU ioctl from outside the run loop.  KVM serialises vCPU ioctls with KVM_RUN
# on the vCPU's mutex, so one issued while the loop is in KVM_RUN would wait for the
# guest's next exit (for ever, for a guest that never exits): refused instead
# (*refused* set, nothing done).  `ioctls` and `running` are a Dekker pair: this
# counts itself in before it looks at `running`, the loop sets `running` before it
# waits for `ioctls` to drain, so one of the two always sees the other.
# Register sets written through the comm area and not sent yet (kvm_dirty_regs) go to
# the kernel before any other vCPU ioctl, in KVM_RUN's own order (regs, sregs, events):
# whatever that ioctl reads or changes comes after them, so the last write wins, made
# either way.  Each bit is cleared before its copy is taken (a write racing with the send
# sets it again and is sent later).  Returns 0, or the set the kernel refused (errno set;
# that write is dropped).
cdef int flush_sync(vcpustate_t *v) noexcept nogil:
    cdef kvm_run *run = v.run
    cdef kvm_regs regs
    cdef kvm_sregs sregs
    cdef kvm_vcpu_events events
    if run.kvm_dirty_regs & KVM_SYNC_X86_REGS:
        run.kvm_dirty_regs &= ~(<uint64_t>KVM_SYNC_X86_REGS)
        regs = run.s.regs.regs
        if ioctl(v.fd, KVM_SET_REGS, &regs) < 0:
            return KVM_SYNC_X86_REGS
    if run.kvm_dirty_regs & KVM_SYNC_X86_SREGS:
        run.kvm_dirty_regs &= ~(<uint64_t>KVM_SYNC_X86_SREGS)
        sregs = run.s.regs.sregs
        if ioctl(v.fd, KVM_SET_SREGS, &sregs) < 0:
            return KVM_SYNC_X86_SREGS
    if run.kvm_dirty_regs & KVM_SYNC_X86_EVENTS:
        run.kvm_dirty_regs &= ~(<uint64_t>KVM_SYNC_X86_EVENTS)
        events = run.s.regs.events
        if ioctl(v.fd, KVM_SET_VCPU_EVENTS, &events) < 0:
            return KVM_SYNC_X86_EVENTS
    return 0


# *unsent*: the register set flush_sync could not send (then the ioctl is not made).
cdef long vcpu_ioctl_outside(vcpustate_t *v, unsigned long req, void *arg, int *refused, int *unsent) noexcept nogil:
    cdef long r = -1
    cdef int err = 0
    kvmsys_add_int(&v.ioctls, 1)
    refused[0] = kvmsys_load_int(&v.running)
    unsent[0] = 0
    if not refused[0]:
        if v.run.kvm_dirty_regs:
            unsent[0] = flush_sync(v)
            err = errno
        if not unsent[0]:
            r = ioctl(v.fd, req, arg)
            err = errno
    kvmsys_add_int(&v.ioctls, -1)
    kvmsys_set_errno(err)
    return r


cdef inline int vcpu_alive_locked(vcpustate_t *v, uint64_t generation) noexcept nogil:
    if (generation != 0 and v.generation != generation) or v.run == NULL:
        return ESRCH
    return 0


cdef inline void kick_locked(vcpustate_t *v, int bits) noexcept nogil:
    kvmsys_or_int(&v.kick_pending, bits)
    if bits & ~KICK_IRQ:
        kvmsys_kick_pause(1)            # test hook (_delay_kick)
        kvmsys_store_u8(&v.run.immediate_exit, 1)
        kvmsys_kick_pause(2)
    if kvmsys_load_int(&v.running):
        kvmsys_bench_pause(2)           # benchmark hook, off: see kvmsys_native.h
        v.kick_sent_ns = kvmsys_now_ns()
        pthread_kill(v.thread, kvmsys_kick_signal())


# Force the vCPU out of KVM_RUN, or make its next KVM_RUN return at once.
# Returns 0, or ESRCH if the generation no longer matches (a stale handle).
cdef inline int kick_vcpu(vcpustate_t *v, uint64_t generation, int bits) noexcept nogil:
    cdef int rc
    pthread_mutex_lock(&v.lock)
    rc = vcpu_alive_locked(v, generation)
    if rc == 0:
        kick_locked(v, bits)
    pthread_mutex_unlock(&v.lock)
    return rc


# Queue an external interrupt (vector >= 0) or an NMI (vector < 0) for the owner's
# loop to inject, and get it out of KVM_RUN.  Returns 0, ESRCH (stale) or ENOSPC.
cdef int queue_interrupt(vcpustate_t *v, uint64_t generation, int vector) noexcept nogil:
    cdef int rc
    pthread_mutex_lock(&v.lock)
    rc = vcpu_alive_locked(v, generation)
    if rc == 0:
        if vector < 0:
            kvmsys_store_int(&v.nmi_queued, v.nmi_queued + 1)
        elif v.nirq >= IRQ_QUEUE_MAX:
            rc = ENOSPC
        else:
            v.irq_queue[(v.irq_head + v.nirq) % IRQ_QUEUE_MAX] = <uint8_t>vector
            kvmsys_store_int(&v.nirq, v.nirq + 1)
        if rc == 0:
            kick_locked(v, KICK_IRQ)
    pthread_mutex_unlock(&v.lock)
    return rc


# The hook for everything the run loop keeps per kernel vCPU, called (under v.lock)
# whenever a vcpustate gets a kernel vCPU: created, recycled (the same one, a new
# object: all of it stays) or moved onto a new one, which has no KVM signal mask
# (sync_vcpu_sigmask sets one at its next run if the thread needs it), zero
# counters and no interrupt window requested.
cdef void kernel_vcpu_attached(vcpustate_t *v, bint new_kernel_vcpu) noexcept nogil:
    if new_kernel_vcpu:
        v.sigmask_state = SIGMASK_UNUSED
        v.sigmask = 0
        memset(v.exits, 0, sizeof(v.exits))
        memset(v.handler_hits, 0, sizeof(v.handler_hits))
        v.default_hits = v.runs = v.ns_in_run = v.ns_in_handlers = v.coalesced = 0
        v.irqs_injected = v.nmis_injected = 0
        v.irq_window = 0
        v.need_dispatch = 0
        v.from_ring = 0


# Forget queued interrupts and kicks (under v.lock): a vCPU changing owner.
cdef inline void clear_queued_locked(vcpustate_t *v) noexcept nogil:
    v.kick_pending = 0
    v.nirq = 0
    v.irq_head = 0
    v.nmi_queued = 0
    v.need_dispatch = 0
    v.from_ring = 0
    if v.run != NULL:
        kvmsys_store_u8(&v.run.immediate_exit, 0)
        v.run.request_interrupt_window = 0
    v.irq_window = 0
