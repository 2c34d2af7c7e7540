"""The kvmsys exception hierarchy.

Every failure raised by kvmsys is a KvmsysError.  Kernel failures are KvmOSError
(also an OSError) carrying the errno and the name of the operation; validation
failures are InvalidArgumentError (also a ValueError); misuse of an object's
state (closed, wrong thread, stale handle) is a StateError.
"""
from __future__ import annotations

import errno as _errno
import os as _os
import stat as _stat
from typing import Iterable

__all__ = [
    "KvmsysError", "KvmOSError", "KvmUnavailableError", "KvmPermissionError",
    "CapabilityError", "InvalidArgumentError", "ArgumentTypeError", "StateError", "StaleVcpuError",
    "VcpuBindingError", "ConfigurationError", "OperationTimeoutError",
]


# KVM_RUN's ENOSPC says nothing of its cause; the usual one is a VM with no memory at all.
_HINT_RUN_ENOSPC = ("KVM refuses to run a vCPU of a VM that has no memory slot: add memory first "
                    "(vm.add_memory(), or configure(memory_size=...) for the process VM)")


class KvmsysError(Exception):
    """Base class of every kvmsys error."""


class KvmOSError(KvmsysError, OSError):
    """A system call failed.  ``errno`` and ``op`` (e.g. "KVM_CREATE_VCPU") say which."""

    def __init__(self, err: int, op: str, hint: str | None = None) -> None:
        if hint is None and err == _errno.ENOSPC and op.startswith("KVM_RUN"):
            hint = _HINT_RUN_ENOSPC
        msg = f"{op} failed: {_os.strerror(err)} [{_errno.errorcode.get(err, err)}]"
        if hint:
            msg += f"; {hint}"
        OSError.__init__(self, err, msg)
        self.op = op
        self.hint = hint

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[KvmOSError], tuple[object, ...]]:
        return (type(self), (self.errno, self.op, self.hint))


class KvmUnavailableError(KvmOSError):
    """/dev/kvm does not exist or cannot be used on this machine."""


class KvmPermissionError(KvmOSError, PermissionError):
    """/dev/kvm exists but this user may not open it."""


class CapabilityError(KvmsysError):
    """The host KVM lacks a capability that an operation needs."""

    def __init__(self, cap: str, needed_for: str) -> None:
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


def access_hint(path: str, uid: int | None = None, groups: Iterable[int] | None = None) -> str:
    """What keeps this user (or *uid* with *groups*) from opening *path* read-write, from
    the file's owner, group and mode: the hint of a KvmPermissionError."""
    try:
        st = _os.stat(path)
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    uid = _os.geteuid() if uid is None else uid
    groups = set(_os.getgroups()) | {_os.getegid()} if groups is None else set(groups)
    mode = _stat.filemode(st.st_mode)
    try:
        import grp
        group = grp.getgrgid(st.st_gid).gr_name
    except (ImportError, KeyError):
        group = str(st.st_gid)

    def lacks(read: int, write: int) -> str:
        missing = [w for w, bit in (("read", st.st_mode & read), ("write", st.st_mode & write)) if not bit]
        return " and ".join(missing)

    if uid == 0:
        return f"{path} ({mode}) refuses even root: a device cgroup, a security module or a read-only mount"
    if uid == st.st_uid:
        missing = lacks(_stat.S_IRUSR, _stat.S_IWUSR)
        if missing:
            return f"{path} is {mode}: its owner (this user) lacks {missing} (chmod u+rw {path})"
    elif st.st_gid in groups:
        missing = lacks(_stat.S_IRGRP, _stat.S_IWGRP)
        if missing:
            return (f"{path} is {mode}: its group '{group}', which this user is in, lacks {missing}; "
                    f"make it group read-write (chmod g+rw {path}, or a udev rule with MODE=\"0660\")")
    else:
        missing = lacks(_stat.S_IROTH, _stat.S_IWOTH)
        if missing:
            if lacks(_stat.S_IRGRP, _stat.S_IWGRP):
                return (f"{path} is {mode}: this user is not in its group '{group}', which lacks "
                        f"{lacks(_stat.S_IRGRP, _stat.S_IWGRP)} too; make it group read-write "
                        f"(chmod g+rw {path}) and add the user to '{group}'")
            return (f"{path} is {mode}: this user is not in its group '{group}': add it "
                    f"(sudo usermod -aG {group} $USER) and log in again")
    return f"{path} ({mode}) allows this user: the refusal comes from a device cgroup, a security module or a read-only mount"
