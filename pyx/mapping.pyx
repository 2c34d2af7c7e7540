# Owned mmap'd regions exposed as writable zero-copy buffers.
from cpython.buffer cimport PyBuffer_FillInfo


cdef class Mapping:
    """An mmap'd region: guest RAM or a vCPU's comm area (kvm_run page).

    memoryview(mapping) is zero-copy.  The region is unmapped once: when its
    owner releases it and no memoryview of it is left (a view keeps it alive).
    A fork child never shares it (see kvmsys_native.h), and revoke() cuts it
    off from what it mapped (the comm area of a vCPU its owner removed).
    """
    cdef uint8_t *addr
    cdef size_t size
    cdef int exports
    cdef readonly str what
    cdef kvmsys_region_t *region
    cdef unsigned long forkgen     # the process that mapped it (kvmsys_fork_generation)
    cdef str revoked               # why it no longer shows what it mapped, or None
    cdef object owner              # borrowed memory: the buffer export that keeps it alive
    cdef bint handed_on            # hand_over() gave the region to another Mapping: not unmapped here

    @staticmethod
    cdef Mapping borrow(void *addr, size_t size, str what, object owner):
        """[addr, +size) of a caller's buffer, kept alive (and unresizable) by *owner*, a
        buffer export of it: never unmapped here, never hidden from a fork child."""
        cdef Mapping m = Mapping.__new__(Mapping)
        m.addr = <uint8_t *>addr
        m.size = size
        m.what = what
        m.forkgen = kvmsys_fork_generation
        m.owner = owner
        return m

    @staticmethod
    cdef Mapping wrap(void *addr, size_t size, str what):
        """Take ownership of [addr, +size); on failure it is unmapped and the error raised."""
        cdef Mapping m = Mapping.__new__(Mapping)
        m.region = kvmsys_region_add(addr, size)
        if m.region == NULL:
            err = errno
            munmap(addr, size)
            raise_os(err, "madvise(MADV_DONTFORK)")
        m.addr = <uint8_t *>addr
        m.size = size
        m.what = what
        m.forkgen = kvmsys_fork_generation
        return m

    cdef inline bint usable(self) noexcept:
        return self.addr != NULL and self.forkgen == kvmsys_fork_generation and self.revoked is None

    cdef inline bint covers(self, uint64_t offset, uint64_t length) noexcept:
        # usable, and [offset, offset + length) inside it: check_range()'s test without a
        # call (the run loop's callbacks run it per port access, with cold caches)
        return self.usable() and offset <= self.size and length <= self.size - offset

    cdef int check_usable(self) except -1:
        if self.usable():
            return 0
        if self.addr == NULL:
            raise StateError(f"{self.what} is closed")
        if self.forkgen != kvmsys_fork_generation:
            raise StateError(f"{self.what} belongs to the parent process (this is a fork child)")
        if self.revoked is not None:
            raise StaleVcpuError(f"{self.what} {self.revoked}")
        return 0

    cdef int revoke(self, str why) except -1:
        """Replace the region by private zero memory: views of it (and of its slices) no
        longer see or change what it mapped.  It stays reserved until unmapped."""
        if self.addr != NULL and self.revoked is None:
            if kvmsys_detach_region(self.addr, self.size) != 0:
                raise_os(errno, "mmap(MAP_FIXED)")
            self.revoked = why
        return 0

    cdef Mapping hand_over(self, str what, str why):
        """The region under a new Mapping named *what*, with no system call, where nothing
        can reach its memory through this one: no view of it is alive (a view, or a slice
        of one, holds an export).  This one is then revoked (*why*) and unmaps nothing.
        None where a view is alive: revoke() that one instead."""
        if self.exports or not self.usable() or self.owner is not None:
            return None
        cdef Mapping m = Mapping.__new__(Mapping)
        m.addr, m.size, m.what, m.forkgen, m.region = self.addr, self.size, what, self.forkgen, self.region
        self.region = NULL
        self.handed_on = 1
        self.revoked = why
        return m

    cdef void take_back(self, Mapping m) noexcept:
        # undo hand_over() that returned *m* (its new owner's set-up failed)
        self.region, m.region = m.region, NULL
        m.addr = NULL
        self.handed_on = 0
        self.revoked = None

    def __getbuffer__(self, Py_buffer *buf, int flags):
        self.check_usable()
        PyBuffer_FillInfo(buf, self, self.addr, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1

    def __repr__(self):
        state = f" revoked: {self.revoked}" if self.revoked is not None else ""
        return f"<Mapping {self.what} {self.size:#x} bytes at {<size_t>self.addr:#x}{state}>"

    def __len__(self):
        return self.size

    @property
    def address(self):
        """Host virtual address of the region (for diagnostics)."""
        return <size_t>self.addr

    cdef int check_range(self, uint64_t offset, uint64_t length) except -1:
        if self.covers(offset, length):
            return 0
        self.check_usable()
        if offset > self.size or length > self.size - offset:
            raise InvalidArgumentError(
                f"range [{offset:#x}, {offset + length:#x}) is outside {self.what} of {self.size:#x} bytes")
        return 0

    def __dealloc__(self):
        if self.addr != NULL and self.owner is None and not self.handed_on:
            kvmsys_region_remove(self.region)
            munmap(self.addr, self.size)
            self.addr = NULL


def _fork_records(size_t address):
    """How many records of kvmsys's mappings cover host *address* (each is replaced by
    zeros in a fork child): 1 while a mapping lives there, 0 after (for tests)."""
    return kvmsys_region_records(<void *>address)
