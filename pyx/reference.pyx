# C reference loops for the benchmarks: the least possible work per operation,
# so a benchmark can show how close the real loop comes to the limit.


cdef VcpuCore _claim(object vcpu_):
    # Claim the vCPU as run() does: close() or run() from another thread is refused
    # while a reference loop uses its fd and comm area without the GIL.
    cdef VcpuCore vcpu = of_type(vcpu_, VcpuCore, "vcpu")
    vcpu.require_open()
    if kvmsys_xchg_int(&vcpu.v.active, 1):
        vcpu.require_open()
        raise StateError(f"vCPU {vcpu.id} is running")
    return vcpu


def reference_run(vcpu, exits):
    """KVM_RUN *exits* times with minimal handling (IN/MMIO reads get zeros).

    Returns (exits_done, elapsed_ns, last_exit_reason); stops early on any exit other
    than IO, MMIO or HLT, or on a KVM_RUN error."""
    cdef uint64_t exits_ = as_u64(exits, "exits")
    cdef VcpuCore vcpu_ = _claim(vcpu)
    try:
        return _reference_run(vcpu_, exits_)
    finally:
        kvmsys_store_int(&vcpu_.v.active, 0)


cdef _reference_run(VcpuCore vcpu, uint64_t exits):
    cdef int fd = vcpu.v.fd
    cdef kvm_run *run = vcpu.v.run
    cdef uint64_t size = vcpu.v.run_size
    cdef uint64_t i = 0, t0, t1
    cdef int r = 0
    cdef uint32_t reason = 0
    with nogil:
        t0 = kvmsys_now_ns()
        while i < exits:
            r = ioctl(fd, KVM_RUN, 0)
            if r < 0:
                break
            i += 1
            reason = run.exit_reason
            if reason == KVM_EXIT_IO:
                if run.io.direction == KVM_EXIT_IO_IN and run.io.data_offset >= sizeof(kvm_run) and \
                        run.io.data_offset + <uint64_t>run.io.size * run.io.count <= size:
                    memset(<char *>run + run.io.data_offset, 0, run.io.size * run.io.count)
            elif reason == KVM_EXIT_MMIO:
                if not run.mmio.is_write:
                    memset(run.mmio.data, 0, 8)
            elif reason != KVM_EXIT_HLT:
                break
        t1 = kvmsys_now_ns()
    if r < 0:
        raise_os(errno, "KVM_RUN")
    return i, t1 - t0, reason


def reference_lifecycle(vm, first_id, count):
    """*count* times: KVM_CREATE_VCPU + mmap + munmap + close, with ids first_id...

    Returns elapsed ns.  (KVM never frees a vCPU before its VM: ids are used up.)"""
    cdef VmCore vm_ = of_type(vm, VmCore, "vm")
    cdef int first_id_ = as_int(first_id, "first vCPU id", 0, 0xffff)
    cdef int count_ = as_int(count, "count", 1, 0xffff)
    vm_.require_open()
    cdef int vmfd = vm_.fd, i, fd
    cdef size_t size = vm_.mmap_size
    cdef void *p
    cdef uint64_t t0, t1
    cdef int err = 0
    with nogil:
        t0 = kvmsys_now_ns()
        for i in range(first_id_, first_id_ + count_):
            fd = ioctl(vmfd, KVM_CREATE_VCPU, <unsigned long>i)
            if fd < 0:
                err = errno
                break
            p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if p != MAP_FAILED:
                munmap(p, size)
            close(fd)
        t1 = kvmsys_now_ns()
    if err:
        raise_os(err, "KVM_CREATE_VCPU")
    return t1 - t0


def reference_ioctl_costs(vcpu, n):
    """Median-free raw costs over *n* calls each: (vcpu_ioctl_ns, vm_ioctl_ns, getppid_ns) totals."""
    cdef int n_ = as_int(n, "n", 1, 0x7fffffff)
    cdef VcpuCore vcpu_ = _claim(vcpu)
    try:
        return _reference_ioctl_costs(vcpu_, n_)
    finally:
        kvmsys_store_int(&vcpu_.v.active, 0)


cdef _reference_ioctl_costs(VcpuCore vcpu, int n):
    cdef int fd = vcpu.v.fd, vmfd = vcpu.vm.fd, i
    cdef kvm_mp_state s
    cdef uint64_t t0, t1, t2, t3
    with nogil:
        t0 = kvmsys_now_ns()
        for i in range(n):
            ioctl(fd, KVM_GET_MP_STATE, &s)
        t1 = kvmsys_now_ns()
        for i in range(n):
            ioctl(vmfd, KVM_CHECK_EXTENSION, <unsigned long>KVM_CAP_USER_MEMORY)
        t2 = kvmsys_now_ns()
        for i in range(n):
            getppid()
        t3 = kvmsys_now_ns()
    return t1 - t0, t2 - t1, t3 - t2
