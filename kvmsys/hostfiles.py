"""Opening the files a user names (firmware, kernels, disk images): never blocking, only
what kvmsys can use, sizes checked before anything is read, disk images locked.

A FIFO or a terminal would block open() or read() for ever, a directory or /dev/zero
would fail or never end later, in the middle of a run: each is refused here in one
line.  Disk images take an open file description lock (F_OFD_SETLK, as QEMU locks
its images): read-write exclusive, read-only shared, so two runs cannot both write one
image, nor one write what another reads."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from .errors import InvalidArgumentError

_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_checked(path: str, *, write: bool = False, block_device: bool = False) -> tuple[int, int]:
    """(fd, size in bytes) of a regular file (or, with *block_device*, a block device)
    opened without blocking; InvalidArgumentError in one line for anything else."""
    try:
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | _OPEN_FLAGS)
    except OSError as e:
        raise InvalidArgumentError(f"cannot open {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            size = os.fstat(fd).st_size
        elif block_device and stat.S_ISBLK(mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise InvalidArgumentError(f"{path} is not a regular file"
                                       + (" or a block device" if block_device else ""))
        os.set_blocking(fd, True)       # the type is known now: plain reads and writes from here
        return fd, size
    except OSError as e:
        os.close(fd)
        raise InvalidArgumentError(f"cannot use {path}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise


# struct flock (<fcntl.h>, Linux): short l_type, l_whence; off_t l_start, l_len; pid_t l_pid
_FLOCK = "hhqqi4x"


def lock(fd: int, path: str, *, exclusive: bool) -> None:
    """An OFD lock on the whole of *fd* (held until it is closed), or InvalidArgumentError
    naming the conflict."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):     # held by another description
            raise InvalidArgumentError(f"cannot lock {path}: {e.strerror}") from None
        raise InvalidArgumentError(
            f"{path} is in use by another process (locked); "
            + ("a read-write disk needs it alone" if exclusive else "readonly shares it with readonly users only")
        ) from None


SECTOR = 512


def open_disk(path: str, *, readonly: bool) -> tuple[int, int]:
    """(fd, size) of a disk image: a regular file or block device of at least one sector,
    locked (read-write exclusive, readonly shared)."""
    fd, size = open_checked(path, write=not readonly, block_device=True)
    try:
        if size < SECTOR:
            raise InvalidArgumentError(f"disk image {path}: {size} bytes, at least one 512-byte sector needed")
        lock(fd, path, exclusive=not readonly)
        return fd, size
    except BaseException:
        os.close(fd)
        raise
