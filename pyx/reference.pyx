# C reference loops for the benchmarks: the least possible work per operation,
# so a benchmark can show how close the real loop comes to the limit.


def reference_run(VcpuCore vcpu, uint64_t exits):
    """KVM_RUN *exits* times with minimal handling (IN/MMIO reads get zeros).

    Returns (exits_done, elapsed_ns, last_exit_reason); stops early on any exit other
    than IO, MMIO or HLT, or on a KVM_RUN error."""
    vcpu.require_open()
    cdef int fd = vcpu.v.fd
    cdef kvm_run *run = vcpu.v.run
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
                if run.io.direction == KVM_EXIT_IO_IN:
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


def reference_lifecycle(VmCore vm, int first_id, int count):
    """*count* times: KVM_CREATE_VCPU + mmap + munmap + close, with ids first_id...

    Returns elapsed ns.  (KVM never frees a vCPU before its VM: ids are used up.)"""
    vm.require_open()
    require(0 <= first_id and count > 0, "bad id range")
    cdef int vmfd = vm.fd, i, fd
    cdef size_t size = vm.mmap_size
    cdef void *p
    cdef uint64_t t0, t1
    cdef int err = 0
    with nogil:
        t0 = kvmsys_now_ns()
        for i in range(first_id, first_id + count):
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


def reference_ioctl_costs(VcpuCore vcpu, int n):
    """Median-free raw costs over *n* calls each: (vcpu_ioctl_ns, vm_ioctl_ns, getppid_ns) totals."""
    vcpu.require_open()
    require(n > 0, "n must be positive")
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
