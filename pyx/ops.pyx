# Access ops: a Python device model's read/write callbacks, called with the access
# already decoded (address, size, value as ints), so the handler reads no exit object.
# On a host where each exit leaves the interpreter's caches cold (PVM here), the first
# attribute read in a handler costs more than the whole call: ops skip all of them.
from cpython.long cimport PyLong_AsUnsignedLongLong


cdef class AccessOps:
    """A device model's callbacks for PIO or MMIO accesses, called with the access decoded:
    ``read(address, size) -> int`` answers a read, ``write(address, size, value)`` takes
    a write (the order of kvmsys.devices.Device's methods); a write that returns a true
    value makes run() return the exit, as an exit callback's does.  ``address`` is the port or guest-physical
    address (absolute, not an offset in the range); a string I/O instruction calls them
    once per element, a batched (coalesced) write once per entry.  Give one as a PYTHON
    handler's callback (or ``read=``/``write=`` to vm.add_handler), or as
    ``vm.default_handler``.  An access whose direction has no callback, and an MSR exit
    reaching a default AccessOps, are returned from run()."""
    cdef readonly object read
    cdef readonly object write
    cdef uint64_t last_address      # the int passed last time, reused for the same address:
    cdef object last_address_obj    # a register hammered needs no new int per access

    cdef inline object address_obj(self, uint64_t address):
        if self.last_address_obj is None or self.last_address != address:
            self.last_address_obj = address
            self.last_address = address
        return self.last_address_obj

    def __init__(self, read=None, write=None):
        require(read is not None or write is not None, "AccessOps needs read, write or both")
        require(read is None or callable(read), "read must be callable")
        require(write is None or callable(write), "write must be callable")
        self.read = read
        self.write = write

    def __repr__(self):
        return f"<AccessOps read={self.read!r} write={self.write!r}>"


cdef inline uint64_t op_result(object x, uint32_t size, uint64_t address) except? 0xffffffffffffffff:
    # what read() returned, checked like ex.value = x: an int that fits the access
    cdef uint64_t r
    if type(x) is not int:
        r = as_u64(x, "the value read() returned")      # typed error (a bool is an int)
    else:
        try:
            r = PyLong_AsUnsignedLongLong(x)
        except OverflowError:
            raise InvalidArgumentError(f"read({address:#x}, {size}) returned {x}, not a value of {size} bytes") from None
    if size < 8 and r >> (8 * size):
        raise InvalidArgumentError(f"read({address:#x}, {size}) returned {r:#x}, which does not fit in {size} bytes")
    return r


# Dispatch the exit run_loop returned for *ops*' range: decode it from the comm area
# (or the ring entry taken), call read or write, answer a read in place.  Returns
# OPS_DONE, OPS_STOP (a write returned a true value: run() returns the exit), OPS_NONE
# (no callback for it: run() returns the exit), or raises what a callback raised.
# Sizes are checked again here: the comm area is writable from Python between the run
# loop's checks and this call.
cdef enum:
    OPS_NONE = 0
    OPS_DONE = 1
    OPS_STOP = 2


cdef int call_ops(VcpuCore vcpu, AccessOps ops) except -1:
    cdef vcpustate_t *v = vcpu.v
    cdef kvm_run *r = v.run
    cdef kvm_coalesced_mmio *e
    cdef uint8_t *p
    cdef uint32_t size, count, i
    cdef uint64_t addr
    cdef bint stop = 0, is_in
    cdef uint16_t port
    cdef uint64_t off
    cdef Mapping page = vcpu.page     # (held: the comm area stays mapped through the callbacks)
    if v.from_ring:                 # a batched write (the ring holds writes only)
        e = &v.ring_entry
        if ops.write is None:
            return OPS_NONE
        size = e.len
        if not (1 <= size <= 8):     # (the message is built only when raised)
            raise InvalidArgumentError(f"coalesced entry of {size} bytes")
        stop = bool(ops.write(ops.address_obj(e.phys_addr), size, le_value(e.data, size)))
    elif r.exit_reason == KVM_EXIT_IO:
        size = r.io.size
        count = r.io.count
        is_in = r.io.direction == KVM_EXIT_IO_IN       # read once: a callback may write the comm area
        fn = ops.read if is_in else ops.write
        if fn is None:
            return OPS_NONE
        if not (size in (1, 2, 4) and count >= 1):     # (the message is built only when raised)
            raise InvalidArgumentError(f"invalid port access: size {size}, count {count}")
        # count elements, bounded by the comm area (never by the guest's number alone);
        # each element checked again, after the callbacks before it ran
        off = r.io.data_offset
        if page is None:
            vcpu.require_open()     # closed: says so (never while inside run())
        # page.covers() inline, check_range() only to raise: a port access runs these tests
        # once per element with the interpreter's caches cold, where a call into another
        # function costs more than the tests
        if count > 1 and not page.covers(off, <uint64_t>size * count):
            page.check_range(off, <uint64_t>size * count)
        port = r.io.port
        a = ops.address_obj(port)
        for i in range(count):
            if not page.covers(off + i * size, size):
                page.check_range(off + i * size, size)
            p = page.addr + off
            if is_in:
                fill(p + i * size, size, op_result(fn(a, size), size, port), size)
            elif fn(a, size, le_value(p + i * size, size)):
                stop = 1            # every element still goes to the device, as Device.io does
    elif r.exit_reason == KVM_EXIT_MMIO:
        size = r.mmio.len
        addr = r.mmio.phys_addr
        if not (1 <= size <= 8):     # (the message is built only when raised)
            raise InvalidArgumentError(f"invalid MMIO length {size}")
        if r.mmio.is_write:
            if ops.write is None:
                return OPS_NONE
            stop = bool(ops.write(ops.address_obj(addr), size, le_value(r.mmio.data, size)))
        else:
            if ops.read is None:
                return OPS_NONE
            fill(r.mmio.data, size, op_result(ops.read(ops.address_obj(addr), size), size, addr), size)
    else:
        return OPS_NONE
    return OPS_STOP if stop else OPS_DONE
