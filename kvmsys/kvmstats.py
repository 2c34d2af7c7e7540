"""KVM's binary statistics (KVM_GET_STATS_FD, Linux 5.14+): what the kernel itself
counts for a VM or a vCPU, by name, decoded from the descriptors it serves.

The stats fd holds a header (flags, name_size, num_desc, id_offset, desc_offset,
data_offset), an id string, `num_desc` descriptors (flags, exponent, size, offset,
bucket_size, then a name of `name_size` bytes) and the values: `size` u64s per
statistic at data_offset + offset (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD").
The counters and their names differ between kernels and architectures.
"""
from __future__ import annotations

import os
import struct
from typing import Any

from . import _core
from ._core import VcpuCore, VmCore
from .errors import CapabilityError, KvmOSError

_L = _core.STATS_LAYOUT
_HEADER = struct.Struct("<6I")          # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("<IhHII")         # flags, exponent, size, offset, bucket_size
_TYPES = {_L["type_cumulative"]: "cumulative", _L["type_instant"]: "instant", _L["type_peak"]: "peak",
          _L["type_linear_hist"]: "linear_hist", _L["type_log_hist"]: "log_hist"}
_UNITS = {_L["unit_none"]: "", _L["unit_bytes"]: "bytes", _L["unit_seconds"]: "seconds",
          _L["unit_cycles"]: "cycles", _L["unit_boolean"]: "boolean"}
_MAX_SIZE = 16 << 20                    # sanity bound on what a stats fd may claim to hold


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise KvmOSError(5, "read of KVM statistics", f"short read: {len(data)} of {size} bytes")
    return data


def read(owner: VmCore | VcpuCore, detail: bool = False) -> dict[str, Any]:
    """*owner*'s statistics: {name: value} (an int, or a list of ints for a histogram).
    With *detail*: {name: {"value", "type", "unit", "exponent", "base", "bucket_size"}}."""
    if _HEADER.size != _L["header_size"] or _DESC.size != _L["desc_size"]:
        raise CapabilityError("BINARY_STATS_FD", "decoding statistics with this header's layout")
    fd = _core.stats_fd(owner)
    try:
        _flags, name_size, num_desc, _id_off, desc_off, data_off = _HEADER.unpack(_pread(fd, _HEADER.size, 0))
        stride = _DESC.size + name_size
        if not 0 < name_size <= 4096 or stride * num_desc > _MAX_SIZE:
            raise KvmOSError(22, "KVM statistics header", f"implausible sizes ({name_size}, {num_desc})")
        descs = _pread(fd, stride * num_desc, desc_off)
        parsed = []
        end = 0
        for i in range(num_desc):
            flags, exponent, size, offset, bucket = _DESC.unpack_from(descs, i * stride)
            raw = descs[i * stride + _DESC.size:(i + 1) * stride]
            parsed.append((raw.split(b"\0", 1)[0].decode("ascii", "replace"), flags, exponent, size,
                           offset, bucket))
            end = max(end, offset + 8 * size)
        if end > _MAX_SIZE:
            raise KvmOSError(22, "KVM statistics descriptors", f"values end at {end} bytes")
        data = _pread(fd, end, data_off) if end else b""
    finally:
        os.close(fd)
    out: dict[str, Any] = {}
    for name, flags, exponent, size, offset, bucket in parsed:
        values = list(struct.unpack_from(f"<{size}Q", data, offset))
        value = values[0] if size == 1 else values
        if detail:
            out[name] = dict(value=value, type=_TYPES.get(flags & _L["type_mask"], "unknown"),
                             unit=_UNITS.get(flags & _L["unit_mask"], "unknown"), exponent=exponent,
                             base=2 if flags & _L["base_mask"] == _L["base_pow2"] else 10,
                             bucket_size=bucket)
        else:
            out[name] = value
    return out
