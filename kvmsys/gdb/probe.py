"""What guest debugging this host can do, per guest mode: measured, not assumed.

Some KVM flavours run guests (or some modes) in KVM's instruction emulator, which
delivers int3 to the guest or fails to emulate it instead of exiting with
KVM_EXIT_DEBUG (KVM_GUESTDBG_USE_SW_BP), and does not check data breakpoints of the
instructions it emulates.  Each probe runs a few instructions in a scratch VM; the
gdb server then implements software breakpoints with the debug registers, and
leaves watchpoints to gdb (which single-steps) where the answer is no.
"""
from __future__ import annotations

import functools
from typing import Any

from .. import _core
from . import target

_RESULT = 0x1004        # a data word of the built-in layout (layout.RESULT_ADDR)


def _run(mode: str, code: bytes, **debug: Any) -> tuple[int, int] | None:
    """(exception, dr6) of the DEBUG exit that *code* ends in under *debug*, else None."""
    from ..guests import layout
    from ..machine import Machine
    with Machine("fd") as m:
        vcpu = m.attach()
        m.load(f"debug_exit.{mode}", vcpu, native=False)
        assert m.mem is not None            # (a machine without firmware has RAM in slot 0)
        m.mem[layout.LOAD_ADDR:layout.LOAD_ADDR + len(code)] = code
        vcpu.set_guest_debug(True, **debug)
        ex = vcpu.run(budget=4, timeout=1.0)
        return (ex.exception, ex.dr6) if isinstance(ex, _core.DebugExit) else None


@functools.cache
def sw_breakpoints_work(mode: str) -> bool:
    """True if an int3 in a guest in *mode* ends in a DEBUG exit with exception 3 (#BP)."""
    got = _run(mode, b"\xcc", sw_breakpoints=True)
    return got is not None and got[0] == 3


@functools.cache
def watchpoints_work(mode: str) -> bool:
    """True if a write watchpoint in DR0 stops a guest's store in *mode* (#DB, DR6.B0)."""
    addr = _RESULT.to_bytes({"real": 2, "pm32": 4, "long64": 8}[mode], "little")
    code = b"\xa2" + addr + b"\xeb\xfe"        # mov %al, RESULT (moffs form); jmp .
    got = _run(mode, code, hw_breakpoints=True,
               debugreg=target.debugreg([(2, _RESULT, 1), None, None, None]))
    return got is not None and got[0] == 1 and got[1] & 1 == 1
