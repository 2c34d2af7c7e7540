"""The loop a competent Python programmer would write without kvmsys:
`fcntl.ioctl(fd, KVM_RUN)` and a mmap of struct kvm_run, decoded with struct per exit.

`fcntl.ioctl(fd, KVM_RUN)` passes no argument (KVM_RUN takes none): with an explicit
`0` CPython first tries to parse it as a buffer, twice, which costs microseconds per
call and is not what anyone needs to write.  Only the per-exit loop is naive; the VM
and vCPU come from kvmsys (setup is not measured), so the kernel does the same work
per exit as for kvmsys's loops.  The ioctl number comes from <linux/kvm.h> through the
benchmark's own extension, never hand-typed.
"""
from __future__ import annotations

import fcntl
import mmap
import struct

from kvmsys import _core

from . import _reference

# struct kvm_run as a user would transcribe it from <linux/kvm.h> (stable kernel ABI).
OFF_EXIT_REASON = 8          # __u32 exit_reason
OFF_EXIT_UNION = 32          # the per-exit union
IO_FMT = "<BBHIQ"            # io: direction, size, port, count, data_offset
MMIO_FMT = "<Q8sIB"          # mmio: phys_addr, data[8], len, is_write
OFF_MMIO_DATA = OFF_EXIT_UNION + 8
KVM_EXIT_IO_IN = 0

EXIT_IO = _core.EXIT_REASONS["IO"]
EXIT_MMIO = _core.EXIT_REASONS["MMIO"]
EXIT_HLT = _core.EXIT_REASONS["HLT"]
KVM_RUN = _reference.IOCTLS["KVM_RUN"]


class NaiveVcpu:
    """A kvmsys vCPU driven by the naive loop through its own mapping of kvm_run."""

    def __init__(self, vcpu, mmap_size: int):
        self.fd = vcpu.fileno()
        self.page = mmap.mmap(self.fd, mmap_size)

    def decode(self) -> dict:
        """The current exit, decoded the naive way (used once to validate the offsets)."""
        reason, = struct.unpack_from("<I", self.page, OFF_EXIT_REASON)
        if reason == EXIT_IO:
            direction, size, port, count, off = struct.unpack_from(IO_FMT, self.page, OFF_EXIT_UNION)
            return dict(reason=reason, is_in=direction == KVM_EXIT_IO_IN, size=size, port=port, count=count)
        if reason == EXIT_MMIO:
            addr, _data, length, is_write = struct.unpack_from(MMIO_FMT, self.page, OFF_EXIT_UNION)
            return dict(reason=reason, addr=addr, size=length, is_write=bool(is_write))
        return dict(reason=reason)

    def step(self) -> dict:
        fcntl.ioctl(self.fd, KVM_RUN)
        return self.decode()

    def run(self, n: int) -> None:
        """n exits, each handled in Python (raises on an exit it does not handle).  No clock
        inside the loop: the benchmark times the whole call."""
        page, fd, req, ioctl, unpack = self.page, self.fd, KVM_RUN, fcntl.ioctl, struct.unpack_from
        for _ in range(n):
            ioctl(fd, req)
            reason, = unpack("<I", page, OFF_EXIT_REASON)
            if reason == EXIT_IO:
                direction, size, port, count, off = unpack(IO_FMT, page, OFF_EXIT_UNION)
                if direction == KVM_EXIT_IO_IN:
                    page[off:off + size * count] = bytes(size * count)
            elif reason == EXIT_MMIO:
                addr, data, length, is_write = unpack(MMIO_FMT, page, OFF_EXIT_UNION)
                if not is_write:
                    page[OFF_MMIO_DATA:OFF_MMIO_DATA + length] = bytes(length)
            elif reason != EXIT_HLT:
                raise RuntimeError(f"naive loop: unexpected exit reason {reason}")

    def close(self) -> None:
        self.page.close()
