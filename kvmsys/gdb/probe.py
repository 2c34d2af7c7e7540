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

from .. import _core
from . import target

_RESULT = 0x1004        # a data word of the built-in layout (layout.RESULT_ADDR)


def _run(mode: str, code: bytes, **debug):
    from ..fd import Kvm
    from ..guests import get, layout
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0, layout.RAM_SIZE)
        vcpu = vm.create_vcpu(0)
        try:
            layout.prepare(get(f"debug_exit.{mode}"), vcpu, mem)
            mem[layout.LOAD_ADDR:layout.LOAD_ADDR + len(code)] = code
            vcpu.set_guest_debug(True, **debug)
            ex = vcpu.run(budget=4, timeout=1.0)
            return (ex.exception, ex.dr6) if isinstance(ex, _core.DebugExit) else None
        finally:
            vcpu.close()
            del mem


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
