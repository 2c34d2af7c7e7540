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
