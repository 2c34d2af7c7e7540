"""The kvmsys exception hierarchy.

Every failure raised by kvmsys is a KvmsysError.  Kernel failures are KvmOSError
(also an OSError) carrying the errno and the name of the operation; validation
failures are InvalidArgumentError (also a ValueError); misuse of an object's
state (closed, wrong thread, stale handle) is a StateError.
"""
import errno as _errno
import os as _os

__all__ = [
    "KvmsysError", "KvmOSError", "KvmUnavailableError", "KvmPermissionError",
    "CapabilityError", "InvalidArgumentError", "ArgumentTypeError", "StateError", "StaleVcpuError",
    "VcpuBindingError", "ConfigurationError", "OperationTimeoutError",
]


class KvmsysError(Exception):
    """Base class of every kvmsys error."""


class KvmOSError(KvmsysError, OSError):
    """A system call failed.  ``errno`` and ``op`` (e.g. "KVM_CREATE_VCPU") say which."""

    def __init__(self, err, op, hint=None):
        msg = f"{op} failed: {_os.strerror(err)} [{_errno.errorcode.get(err, err)}]"
        if hint:
            msg += f"; {hint}"
        OSError.__init__(self, err, msg)
        self.op = op
        self.hint = hint

    def __str__(self):
        return self.strerror

    def __reduce__(self):
        return (type(self), (self.errno, self.op, self.hint))


class KvmUnavailableError(KvmOSError):
    """/dev/kvm does not exist or cannot be used on this machine."""


class KvmPermissionError(KvmOSError, PermissionError):
    """/dev/kvm exists but this user may not open it."""


class CapabilityError(KvmsysError):
    """The host KVM lacks a capability that an operation needs."""

    def __init__(self, cap, needed_for):
        super().__init__(f"the host KVM lacks KVM_CAP_{cap}, which {needed_for} needs")
        self.cap = cap
        self.needed_for = needed_for


class InvalidArgumentError(KvmsysError, ValueError):
    """An argument failed validation before it reached the kernel."""


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type (a float where an int is meant, a str for bytes...)."""


class StateError(KvmsysError, RuntimeError):
    """The object is not in a state that allows the operation (closed, running, ...)."""


class StaleVcpuError(StateError):
    """The vCPU behind a handle was removed (or its thread ended): the ESRCH of the syscall ABI."""


class VcpuBindingError(StateError):
    """Misuse of the thread binding: a second vCPU in one thread, or none where one is needed."""


class ConfigurationError(StateError):
    """configure() was called after the process VM already exists."""


class OperationTimeoutError(KvmsysError, TimeoutError):
    """An operation that waits for other threads (smp.pause, a snapshot) ran out of time."""
