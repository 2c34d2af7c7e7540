# The system object: /dev/kvm itself.
from libc.stdlib cimport calloc, malloc, free
from libc.errno cimport ENXIO, ENODEV, EPERM
import os as _os

cdef enum:
    CPUID_MAX = 512
    MSR_LIST_MAX = 4096

_HINT_MISSING = ("load the kvm module (modprobe kvm_intel or kvm_amd), or, inside a VM, "
                 "enable nested virtualization")


cdef kvm_cpuid2 *cpuid_new() except NULL:
    """A zeroed kvm_cpuid2 with room for CPUID_MAX entries (free() it)."""
    cdef kvm_cpuid2 *c = <kvm_cpuid2 *>calloc(1, sizeof(kvm_cpuid2) + CPUID_MAX * sizeof(kvm_cpuid_entry2))
    if c == NULL:
        raise MemoryError()
    c.nent = CPUID_MAX
    return c


cdef list cpuid_read(kvm_cpuid2 *c):
    """The entries a CPUID-list ioctl filled in, as dicts."""
    cdef kvm_cpuid_entry2 *e = <kvm_cpuid_entry2 *>(<char *>c + sizeof(kvm_cpuid2))
    return [dict(function=e[i].function, index=e[i].index, flags=e[i].flags,
                 eax=e[i].eax, ebx=e[i].ebx, ecx=e[i].ecx, edx=e[i].edx)
            for i in range(min(c.nent, CPUID_MAX))]


cdef list cpuid_query(int fd, unsigned long req, str op):
    """A CPUID-list ioctl on the system fd (KVM_GET_SUPPORTED_CPUID, _EMULATED_CPUID)."""
    cdef kvm_cpuid2 *c = cpuid_new()
    try:
        ioctl_checked(fd, req, c, op)
        return cpuid_read(c)
    finally:
        free(c)


cdef list msr_list_query(int fd, unsigned long req, str op):
    """An MSR-index-list ioctl as a list of indices."""
    cdef size_t sz = sizeof(kvm_msr_list) + MSR_LIST_MAX * sizeof(uint32_t)
    cdef kvm_msr_list *l = <kvm_msr_list *>calloc(1, sz)
    cdef uint32_t *idx
    if l == NULL:
        raise MemoryError()
    try:
        l.nmsrs = MSR_LIST_MAX
        ioctl_checked(fd, req, l, op)
        idx = <uint32_t *>(<char *>l + sizeof(kvm_msr_list))
        return [idx[i] for i in range(min(l.nmsrs, MSR_LIST_MAX))]
    finally:
        free(l)


cdef kvm_msrs *msrs_new(indices) except NULL:
    """A kvm_msrs asking for *indices* (free() it)."""
    cdef list idx = [as_u32(i, "MSR index") for i in as_list(indices, "MSR indices")]
    require(0 < len(idx) <= MSR_LIST_MAX, f"between 1 and {MSR_LIST_MAX} MSR indices")
    cdef size_t n = len(idx)
    cdef kvm_msrs *m = <kvm_msrs *>calloc(1, sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry))
    if m == NULL:
        raise MemoryError()
    cdef kvm_msr_entry *e = <kvm_msr_entry *>(<char *>m + sizeof(kvm_msrs))
    m.nmsrs = n
    for i in range(n):
        e[i].index = idx[i]
    return m


cdef dict msrs_read(kvm_msrs *m, long got):
    """{index: value} of the first *got* entries (KVM_GET_MSRS stops at the first it cannot read)."""
    cdef kvm_msr_entry *e = <kvm_msr_entry *>(<char *>m + sizeof(kvm_msrs))
    return {e[i].index: e[i].data for i in range(got)}


cdef int require_system_cap(KvmCore kvm, long cap, str name, str needed_for) except -1:
    if ioctl_nogil(kvm.fd, KVM_CHECK_EXTENSION, <void *>cap) <= 0:
        from kvmsys.errors import CapabilityError
        raise CapabilityError(name, needed_for)
    return 0


cdef str fd_target(int n):
    """What fd *n* is open on (/proc/self/fd's link: "/dev/kvm", "anon_inode:kvm-vm")."""
    try:
        return _os.readlink(f"/proc/self/fd/{n}")
    except OSError as e:
        raise InvalidArgumentError(f"fd {n} is not open ({e.strerror})") from None


cdef int adopt_fd(object fd, str kind) except -1:
    """A duplicate (close-on-exec, ours to close) of the caller's fd *fd*, which must be
    the KVM object *kind* ("kvm-vm", "kvm-vcpu:3"): anything else is refused before it
    is used (an mmap of another kind of file could fault on access)."""
    cdef int n = as_int(fd, "fd", 0, 0x7fffffff)
    what = fd_target(n)
    if what != f"anon_inode:{kind}":
        raise InvalidArgumentError(f"fd {n} is {what}, not a KVM {kind} fd")
    return _os.dup(n)


cdef class KvmCore:
    """The KVM system fd (/dev/kvm, or the device at ``path``)."""
    # The /dev/kvm system fd.
    cdef int fd
    cdef readonly str path

    def __cinit__(self, path="/dev/kvm", *, fd=None):
        self.fd = -1
        cdef int err
        if fd is not None:          # adopt a duplicate of a /dev/kvm fd opened elsewhere
            # (its device node may have any path: the API version says what it is)
            n = as_int(fd, "fd", 0, 0x7fffffff)
            self.path = fd_target(n)
            self.fd = _os.dup(n)
            self.check_api_version()
            return
        try:
            p = _os.fsencode(path)
        except TypeError:
            raise ArgumentTypeError(f"path must be a str, bytes or path-like, not {type(path).__name__}") from None
        if b"\0" in p or not p:
            raise InvalidArgumentError(f"path {path!r} is empty or contains a NUL byte")
        self.path = _os.fsdecode(p)
        cdef const char *cpath = p
        cdef int opened
        with nogil:         # a hung device would block in open()
            opened = open(cpath, O_RDWR | O_CLOEXEC)
        if opened < 0:
            err = errno
            if err in (ENOENT, ENXIO, ENODEV):
                raise KvmUnavailableError(err, f"open({self.path})", _HINT_MISSING)
            if err in (EACCES, EPERM):
                raise KvmPermissionError(err, f"open({self.path})", access_hint(self.path))
            raise_os(err, f"open({self.path})")
        self.fd = opened
        self.check_api_version()

    cdef int check_api_version(self) except -1:
        # Refuse what is not KVM (e.g. /dev/null) at once, not at first use.
        cdef int err
        version = ioctl_nogil(self.fd, KVM_GET_API_VERSION, NULL)
        if version != KVM_API_VERSION:
            err = errno if version < 0 else EINVAL
            close(self.fd)
            self.fd = -1
            raise KvmUnavailableError(err, f"KVM_GET_API_VERSION on {self.path}",
                                      f"{self.path} is not a KVM device" if version < 0 else
                                      f"API version {version}, kvmsys needs {KVM_API_VERSION}")
        return 0

    cdef int require_open(self) except -1:
        if self.fd < 0:
            raise StateError("the KVM system fd is closed")
        return 0

    cdef long ioctl_int(self, unsigned long req, unsigned long arg, str op) except -1:
        self.require_open()
        return ioctl_checked(self.fd, req, <void *>arg, op)

    def fileno(self):
        """The /dev/kvm fd."""
        self.require_open()
        return self.fd

    @property
    def closed(self):
        """True once closed."""
        return self.fd < 0

    def __repr__(self):
        return f"<{type(self).__name__} {self.path} {'closed' if self.fd < 0 else f'fd={self.fd}'}>"

    def api_version(self):
        """KVM_GET_API_VERSION (12 on every Linux since 2.6.22)."""
        return self.ioctl_int(KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on the system fd: 0 if absent, else a capability-defined value."""
        cdef long cap_ = as_int(cap, "capability number", 0, 0x7fffffff)
        return self.ioctl_int(KVM_CHECK_EXTENSION, cap_, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self):
        """Size of a vCPU's mapping (kvm_run page, PIO data and coalesced-MMIO ring)."""
        return self.ioctl_int(KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a list of dicts (function, index, flags, eax..edx)."""
        self.require_open()
        return cpuid_query(self.fd, KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def emulated_cpuid(self):
        """KVM_GET_EMULATED_CPUID: CPUID bits KVM can emulate (e.g. MOVBE) though the host
        CPU may lack them; same form as supported_cpuid()."""
        self.require_open()
        require_system_cap(self, KVM_CAP_EXT_EMUL_CPUID, "EXT_EMUL_CPUID", "KVM_GET_EMULATED_CPUID")
        return cpuid_query(self.fd, KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID")

    def msr_index_list(self):
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""
        self.require_open()
        return msr_list_query(self.fd, KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self):
        """KVM_GET_MSR_FEATURE_INDEX_LIST: the feature MSRs (e.g. IA32_ARCH_CAPABILITIES)
        whose host values get_msrs() on this system fd reads."""
        self.require_open()
        require_system_cap(self, KVM_CAP_GET_MSR_FEATURES, "GET_MSR_FEATURES", "the MSR feature list")
        return msr_list_query(self.fd, KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def get_msrs(self, indices):
        """KVM_GET_MSRS on the system fd: the values KVM supports for feature MSRs
        (msr_feature_index_list()), {index: value}, stopping at the first it cannot read."""
        self.require_open()
        require_system_cap(self, KVM_CAP_GET_MSR_FEATURES, "GET_MSR_FEATURES", "reading feature MSRs")
        cdef kvm_msrs *m = msrs_new(indices)
        try:
            return msrs_read(m, ioctl_checked(self.fd, KVM_GET_MSRS, m, "KVM_GET_MSRS(system)"))
        finally:
            free(m)

    def close(self):
        """Close the fd.  Idempotent; VMs created from it stay valid."""
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
