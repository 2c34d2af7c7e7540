"""Can this host stop a guest at its int3 (KVM_GUESTDBG_USE_SW_BP) in a given mode?

Measured, not assumed: some KVM flavours execute int3 in their instruction emulator
and deliver #BP to the guest, or fail to emulate it (KVM_EXIT_INTERNAL_ERROR),
instead of exiting with KVM_EXIT_DEBUG.  The probe runs a one-instruction guest in a
scratch VM; the gdb server then implements software breakpoints with the debug
registers where the answer is no.
"""
from __future__ import annotations

import functools


@functools.cache
def sw_breakpoints_work(mode: str) -> bool:
    """True if an int3 in a guest in *mode* ends in a DEBUG exit with exception 3."""
    from .. import _core
    from ..fd import Kvm
    from ..guests import get, layout
    guest = get(f"debug_exit.{mode}")
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0, layout.RAM_SIZE)
        vcpu = vm.create_vcpu(0)
        layout.prepare(guest, vcpu, mem)
        mem[guest.entry] = 0xCC
        vcpu.set_guest_debug(True, sw_breakpoints=True)
        ex = vcpu.run(budget=4, timeout=1.0)
        ok = isinstance(ex, _core.DebugExit) and ex.exception == 3
        vcpu.close()
        del mem
        return ok
