# Raising kvmsys's typed errors from the core.  The classes live in
# kvmsys/errors.py (policy and documentation in the Python layer).
from kvmsys.errors import (KvmOSError, KvmUnavailableError, KvmPermissionError,
                           InvalidArgumentError, ArgumentTypeError, StateError, StaleVcpuError,
                           VcpuBindingError, access_hint)


cdef int raise_os(int err, str op, str hint=None) except -1:
    raise KvmOSError(err, op, hint)


cdef inline int check(long r, str op) except -1:
    if r < 0:
        raise_os(errno, op)
    return <int>r


# Every ioctl of kvmsys's goes through one of these two (tests/test_nogil.py checks the
# source): the GIL is released for it, since a kernel call may wait (SRCU, the slots
# lock, a vCPU's mutex) and nothing else in the process should wait with it.  errno is
# the ioctl's afterwards.
cdef long ioctl_nogil(int fd, unsigned long req, void *arg) noexcept:
    cdef long r
    cdef int err
    with nogil:
        r = ioctl(fd, req, arg)
        err = errno
    kvmsys_set_errno(err)
    return r


cdef inline long ioctl_checked(int fd, unsigned long req, void *arg, str op) except -1:
    return check(ioctl_nogil(fd, req, arg), op)


# Timeouts at or past this many seconds (about 136 years) mean "no deadline".
cdef double MAX_TIMEOUT_S = 4294967296.0


cdef inline int require(bint ok, str message) except -1:
    if not ok:
        raise InvalidArgumentError(message)
    return 0


cdef uint64_t as_uint(object v, str what, uint64_t hi) except? 0xffffffffffffffff:
    """*v* as an unsigned value in 0..hi, or InvalidArgumentError (never OverflowError,
    never a float truncated to an int)."""
    if not isinstance(v, int):
        raise ArgumentTypeError(f"{what} must be an int, not {type(v).__name__}")
    if not 0 <= v <= hi:
        raise InvalidArgumentError(f"{what} {v} is out of range 0..{hi:#x}")
    return <uint64_t>v


cdef inline uint64_t as_u64(object v, str what) except? 0xffffffffffffffff:
    return as_uint(v, what, 0xffffffffffffffff)


cdef inline uint32_t as_u32(object v, str what) except? 0xffffffff:
    return <uint32_t>as_uint(v, what, 0xffffffff)


cdef int as_int(object v, str what, long lo, long hi) except? -1:
    """*v* as an int in [lo, hi], or InvalidArgumentError."""
    if not isinstance(v, int):
        raise ArgumentTypeError(f"{what} must be an int, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise InvalidArgumentError(f"{what} {v} is out of range {lo}..{hi}")
    return <int>v


cdef object of_type(object v, type cls, str what):
    """*v* if it is a *cls* (what Cython's typed arguments would check, as a typed error)."""
    if not isinstance(v, cls):
        raise ArgumentTypeError(f"{what} must be a {cls.__name__}, not {type(v).__name__}")
    return v


cdef object int_leaves(object v, str what):
    """*v* (a dict/list/tuple tree of ints, as a kernel struct converts from) with every
    leaf checked to be an int: Cython's struct conversion would truncate floats."""
    if isinstance(v, dict):
        for k, x in (<dict>v).items():
            int_leaves(x, f"{what}[{k!r}]")
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            int_leaves(x, f"{what}[{i}]")
    elif not isinstance(v, int):
        raise ArgumentTypeError(f"{what} must be an int, not {type(v).__name__}")
    return v


cdef double as_timeout(object t) except? -2.0:
    """run()'s timeout in seconds, -1.0 for none.  None or inf: no deadline; values past
    MAX_TIMEOUT_S saturate to none (no clock reaches them); negative or NaN: refused."""
    if t is None:
        return -1.0
    if not isinstance(t, (int, float)):
        raise ArgumentTypeError(f"timeout must be a number of seconds or None, not {type(t).__name__}")
    if t != t or t < 0:
        raise InvalidArgumentError(f"timeout must be non-negative seconds, not {t!r}")
    if t >= MAX_TIMEOUT_S:
        return -1.0
    return <double>t


cdef int64_t as_budget(object b) except? -2:
    """run()'s exit budget, -1 for none: a non-negative int (0: return before KVM_RUN)."""
    if b is None:
        return -1
    if not isinstance(b, int):
        raise ArgumentTypeError(f"budget must be an int number of exits or None, not {type(b).__name__}")
    if not 0 <= b <= 0x7fffffffffffffff:
        raise InvalidArgumentError(f"budget must be 0..2**63-1 exits, not {b}")
    return <int64_t>b


cdef list as_list(object v, str what):
    """The items of an iterable *v* (a str is refused: it would iterate characters)."""
    if isinstance(v, (str, bytes)):
        raise ArgumentTypeError(f"{what} must be a list, not {type(v).__name__}")
    try:
        return list(v)
    except TypeError:
        raise ArgumentTypeError(f"{what} must be a list, not {type(v).__name__}") from None


cdef bytes as_blob(object data, str what):
    """Bytes of a bytes-like *data* (an int would make bytearray(n) zeros: refused)."""
    if isinstance(data, int) or isinstance(data, str):
        raise ArgumentTypeError(f"{what} takes a bytes-like object, not {type(data).__name__}")
    try:
        return bytes(data)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"{what} takes a bytes-like object, not {type(data).__name__}") from None
