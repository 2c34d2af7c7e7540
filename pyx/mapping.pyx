# Owned mmap'd regions exposed as writable zero-copy buffers.
from cpython.buffer cimport PyBuffer_FillInfo


cdef class Mapping:
    """An mmap'd region: guest RAM or a vCPU's comm area (kvm_run page).

    memoryview(mapping) is zero-copy.  The region is unmapped once: when its
    owner releases it and no memoryview of it is left (a view keeps it alive).
    """
    # One mmap'd region (guest RAM or a vCPU's kvm_run page).  It is unmapped
    # exactly once, when the last reference (owner or exported memoryview) goes.
    cdef uint8_t *addr
    cdef size_t size
    cdef int exports
    cdef readonly str what

    @staticmethod
    cdef Mapping wrap(void *addr, size_t size, str what):
        cdef Mapping m = Mapping.__new__(Mapping)
        m.addr = <uint8_t *>addr
        m.size = size
        m.what = what
        return m

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.addr == NULL:
            raise StateError(f"{self.what} is closed")
        PyBuffer_FillInfo(buf, self, self.addr, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1

    def __len__(self):
        return self.size

    @property
    def address(self):
        """Host virtual address of the region (for diagnostics)."""
        return <size_t>self.addr

    cdef int check_range(self, uint64_t offset, uint64_t length) except -1:
        if self.addr == NULL:
            raise StateError(f"{self.what} is closed")
        if offset > self.size or length > self.size - offset:
            raise InvalidArgumentError(
                f"range [{offset:#x}, {offset + length:#x}) is outside {self.what} of {self.size:#x} bytes")
        return 0

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.size)
            self.addr = NULL
