"""Named constants of kvmsys and of <linux/kvm.h>, as IntEnums.

Every value comes from the compiled core, which takes it from the kernel header
at build time; the members are ints, so code that passes plain numbers (or the
older `_core.H_KINDS["SINK"]` lookups) keeps working.

    vm.add_handler(Space.PIO, 0x3f8, 0x3f9, Kind.SINK)
    ex.reason == ExitReason.X86_RDMSR
"""
from __future__ import annotations

from enum import IntEnum, IntFlag

from . import _core

__all__ = ["Kind", "Space", "ExitReason", "SystemEvent", "MpState", "MsrExitReason", "SyncReg"]

Kind = IntEnum("Kind", _core.H_KINDS, module=__name__)
Kind.__doc__ = """What a fast handler does with an access in its range: PYTHON (return it to
Python, or call its callback), SINK (writes go to the console buffer, reads give the handler's value, 0 by default),
CONST (reads give the handler's value), IGNORE (reads give all-ones, counted), EXIT
(isa-debug-exit: a write stops the run with status (value << 1) | 1)."""

Space = IntEnum("Space", _core.SPACES, module=__name__)
Space.__doc__ = "Address spaces of fast handlers: PIO ports, MMIO addresses, MSR indices."

ExitReason = IntEnum("ExitReason", _core.EXIT_REASONS, module=__name__)
ExitReason.__doc__ = "KVM_EXIT_* (>= 0) and kvmsys's own stop reasons (< 0): Exit.reason."

SystemEvent = IntEnum("SystemEvent", _core.SYSTEM_EVENTS, module=__name__)
SystemEvent.__doc__ = "KVM_SYSTEM_EVENT_*: SystemEventExit.type."

MpState = IntEnum("MpState", _core.MP_STATES, module=__name__)
MpState.__doc__ = "KVM_MP_STATE_*: vcpu.get_mp_state() / set_mp_state()."

MsrExitReason = IntEnum("MsrExitReason", _core.MSR_EXIT_REASONS, module=__name__)
MsrExitReason.__doc__ = "KVM_MSR_EXIT_REASON_*: why an MSR access exited (MsrExit.msr_reason)."

SyncReg = IntFlag("SyncReg", _core.SYNC_REGS, module=__name__)
SyncReg.__doc__ = """KVM_SYNC_X86_*: the register sets of the comm area (KVM_CAP_SYNC_REGS), combinable:
vcpu.set_sync_valid_reg(SyncReg.SREGS | SyncReg.EVENTS), vcpu.sync_valid_regs."""
