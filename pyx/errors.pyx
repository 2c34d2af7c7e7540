# Raising kvmsys's typed errors from the core.  The classes live in
# kvmsys/errors.py (policy and documentation in the Python layer).
from kvmsys.errors import (KvmOSError, KvmUnavailableError, KvmPermissionError,
                           InvalidArgumentError, StateError, StaleVcpuError,
                           VcpuBindingError)


cdef int raise_os(int err, str op, str hint=None) except -1:
    raise KvmOSError(err, op, hint)


cdef inline int check(long r, str op) except -1:
    if r < 0:
        raise_os(errno, op)
    return <int>r


cdef inline int require(bint ok, str message) except -1:
    if not ok:
        raise InvalidArgumentError(message)
    return 0


cdef uint64_t as_u64(object v, str what) except? 0xffffffffffffffff:
    """*v* as an unsigned 64-bit value, or InvalidArgumentError (never OverflowError)."""
    if not isinstance(v, int):
        raise InvalidArgumentError(f"{what} must be an int, not {type(v).__name__}")
    if not 0 <= v < (<object>1 << 64):
        raise InvalidArgumentError(f"{what} {v} is out of range 0..2**64-1")
    return <uint64_t>v


cdef int as_int(object v, str what, long lo, long hi) except? -1:
    """*v* as an int in [lo, hi], or InvalidArgumentError."""
    if not isinstance(v, int):
        raise InvalidArgumentError(f"{what} must be an int, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise InvalidArgumentError(f"{what} {v} is out of range {lo}..{hi}")
    return <int>v


cdef bytes as_blob(object data, str what):
    """Bytes of a bytes-like *data* (an int would make bytearray(n) zeros: refused)."""
    if isinstance(data, int) or isinstance(data, str):
        raise InvalidArgumentError(f"{what} takes a bytes-like object, not {type(data).__name__}")
    return bytes(data)


cdef uint32_t as_u32(object v, str what) except? 0xffffffff:
    """*v* as an unsigned 32-bit value, or InvalidArgumentError."""
    cdef uint64_t u = as_u64(v, what)
    if u > 0xffffffff:
        raise InvalidArgumentError(f"{what} {v:#x} is out of range 0..0xffffffff")
    return <uint32_t>u
