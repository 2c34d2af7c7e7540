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


cdef inline void fill(uint8_t *p, size_t n, uint64_t value, size_t unit) noexcept nogil:
    cdef size_t i
    for i in range(n):
        p[i] = <uint8_t>(value >> (8 * (i % unit)))


# Handle one access (PIO or MMIO) with a fast handler.  Returns -1 if it was
# handled and the loop goes on, else an R_* result.
cdef inline int access(vcpustate_t *v, int space, uint64_t addr, int is_write,
                       uint8_t *data, size_t unit, size_t total) noexcept nogil:
    cdef vmstate_t *vm = v.vm
    cdef int h = find_handler(vm, space, addr)
    cdef int kind
    cdef uint64_t value = 0
    if h >= 0:
        kind = vm.handlers[h].kind
        value = vm.handlers[h].value
        v.handler_hits[h] += 1
    else:
        kind = vm.default_kind[space]
        v.default_hits += 1
        if kind == H_IGNORE and space == SPACE_PIO:
            kvmsys_add_u64(&vm.port_counts[addr & 0xffff], 1)
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
    if kind == H_CONST:
        fill(data, total, value, unit)
    elif kind == H_SINK:
        fill(data, total, value, unit)      # a console that reads back (debugcon's 0xe9)
    else:
        memset(data, 0xff, total)
    return -1


# Drain the VM's coalesced MMIO/PIO ring: writes the kernel batched for us.
# Returns -1 if the ring's indices are out of range (the ring is writable from
# Python through the comm area): never trust them, or the loop would never end.
cdef int drain_ring(vcpustate_t *v) noexcept nogil:
    cdef kvm_coalesced_mmio_ring *ring = v.ring
    cdef kvm_coalesced_mmio *ent
    cdef kvm_coalesced_mmio *entries
    cdef uint32_t first, last
    cdef int h
    if ring == NULL:
        return 0
    entries = <kvm_coalesced_mmio *>(<char *>ring + sizeof(kvm_coalesced_mmio_ring))
    pthread_mutex_lock(&v.vm.lock)
    first = ring.first
    last = kvmsys_load_u32(&ring.last)
    if first >= v.ring_max or last >= v.ring_max:
        pthread_mutex_unlock(&v.vm.lock)
        return -1
    while first != last:
        ent = &entries[first]
        h = find_handler(v.vm, SPACE_PIO if ent.pio else SPACE_MMIO, ent.phys_addr)
        if h >= 0 and ent.len <= 8:
            v.handler_hits[h] += 1
            if v.vm.handlers[h].kind == H_SINK:
                console_append_locked(v.vm, ent.data, ent.len)
            elif v.vm.handlers[h].kind == H_PYTHON:
                v.vm.coalesced_unhandled += 1
        else:
            v.vm.coalesced_unhandled += 1
        v.coalesced += 1
        first = (first + 1) % v.ring_max
        kvmsys_store_u32(&ring.first, first)
    pthread_mutex_unlock(&v.vm.lock)
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


cdef int run_loop(vcpustate_t *v) noexcept nogil:
    cdef kvm_run *run = v.run
    cdef uint64_t t_in, t_out, t_poll
    cdef int r, res, err
    cdef unsigned sigs, now_sigs
    t_out = kvmsys_now_ns()
    t_poll = t_out
    kvmsys_set_running(run)
    if v.bound:
        kvmsys_store_int(&v.running, 1)     # only this thread runs it: no lock
    else:
        pthread_mutex_lock(&v.lock)
        v.thread = pthread_self()
        kvmsys_store_int(&v.running, 1)
        pthread_mutex_unlock(&v.lock)
    # immediate_exit may be stale (set by a kick signal that landed after its kick
    # was taken) or missing (a kick that came while we were outside the loop):
    # derive it from kick_pending.  Kickers set kick_pending before immediate_exit
    # and signal only a running vCPU, so reading it after `running` loses nothing.
    # Count our signals *before* clearing immediate_exit: one that lands in between
    # sets it again and is counted after `sigs`, so its EINTR is known as ours.
    sigs = kvmsys_own_signal_count()
    kvmsys_store_u8(&run.immediate_exit, 0)
    if kvmsys_load_int(&v.kick_pending):
        kvmsys_store_u8(&run.immediate_exit, 1)
    while True:
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
        r = ioctl(v.fd, KVM_RUN, 0)
        err = errno
        t_out = kvmsys_now_ns()
        v.ns_in_run += t_out - t_in
        v.runs += 1
        if v.ring != NULL and v.vm.coalesced_zones and drain_ring(v) < 0:
            v.error = -EFAULT       # negative: a check of ours, not the kernel's errno
            res = R_ERROR
            break
        if r < 0:
            if err == EINTR or err == EAGAIN:
                now_sigs = kvmsys_own_signal_count()     # before clearing, as above
                kvmsys_store_u8(&run.immediate_exit, 0)
                v.exits[KVM_EXIT_INTR] += 1
                v.kick_bits = kvmsys_xchg_int(&v.kick_pending, 0)
                if v.kick_bits:
                    res = R_KICK
                elif v.deadline_ns and t_out >= v.deadline_ns:
                    res = R_DEADLINE
                elif now_sigs != sigs:
                    # one of our signals since the last look, for a kick taken
                    # earlier: go on, unless a new kick came meanwhile
                    sigs = now_sigs
                    if kvmsys_load_int(&v.kick_pending):
                        kvmsys_store_u8(&run.immediate_exit, 1)
                    continue
                else:
                    res = R_SIGNAL
                break
            v.error = err
            res = R_ERROR
            break
        v.exits[run.exit_reason if run.exit_reason < NR_REASONS else NR_REASONS - 1] += 1
        res = dispatch(v, run)
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
    if v.bound:
        kvmsys_store_int(&v.running, 0)
    else:
        # under the lock, so a kicker never signals a thread that has moved on
        pthread_mutex_lock(&v.lock)
        kvmsys_store_int(&v.running, 0)
        pthread_mutex_unlock(&v.lock)
    kvmsys_set_running(NULL)
    v.ns_in_handlers += kvmsys_now_ns() - t_out
    return res


# Force the vCPU out of KVM_RUN, or make its next KVM_RUN return at once.
# Returns 0, or ESRCH if the generation no longer matches (a stale handle).
cdef int kick_vcpu(vcpustate_t *v, uint64_t generation, int bits) noexcept nogil:
    cdef int rc = 0
    pthread_mutex_lock(&v.lock)
    if generation != 0 and v.generation != generation:
        rc = ESRCH
    elif v.run == NULL:
        rc = ESRCH
    else:
        kvmsys_or_int(&v.kick_pending, bits)
        kvmsys_store_u8(&v.run.immediate_exit, 1)
        if kvmsys_load_int(&v.running):
            pthread_kill(v.thread, kvmsys_kick_signal())
    pthread_mutex_unlock(&v.lock)
    return rc
