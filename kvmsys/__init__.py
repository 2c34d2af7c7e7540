"""kvmsys: real vCPUs on Linux KVM, with two ABIs over one Cython core.

Syscall-style ABI (vCPUs bound to threads, an implicit VM per process)::

    import kvmsys
    comm = kvmsys.add_vcpu()      # attach a vCPU to this thread
    exit = kvmsys.run()           # run this thread's vCPU
    kvmsys.remove_vcpu()

fd-based ABI (the /dev/kvm model)::

    from kvmsys import Kvm
    vm = Kvm().create_vm()
    vcpu = vm.create_vcpu(0)
    exit = vcpu.run()
"""
from . import _core
from ._core import (Exit, IoExit, MmioExit, HltExit, ShutdownExit, IntrExit, FailEntryExit,
                    InternalErrorExit, SystemEventExit, DebugExit, UnknownExit, StopExit,
                    KickExit, DeadlineExit, BudgetExit, CoalescedExit, CoalescedWrite, VcpuHandle,
                    exit_name, kick_signal, set_kick_signal, MsrExit,
                    HypercallExit, IrqWindowOpenExit, IoapicEoiExit, NotifyExit, BusLockExit,
                    MemoryFaultExit, DirtyRingFullExit, AccessOps)
from .enums import Kind, Space, ExitReason, SystemEvent, MpState, MsrExitReason, SyncReg
from .errors import (KvmsysError, KvmOSError, KvmUnavailableError, KvmPermissionError,
                     CapabilityError, InvalidArgumentError, ArgumentTypeError, StateError,
                     StaleVcpuError, VcpuBindingError, ConfigurationError, OperationTimeoutError)
from .fd import Kvm, Vm, Vcpu
from .syscall import (configure, add_vcpu, run, remove_vcpu, current, handle, vm, vcpus,
                      destroy_vm)

__version__ = "0.1.0"

__all__ = ["Kvm", "Vm", "Vcpu", "configure", "add_vcpu", "run", "remove_vcpu", "current",
           "handle", "vm", "vcpus", "destroy_vm", "Exit", "IoExit", "MmioExit", "HltExit",
           "ShutdownExit", "IntrExit", "FailEntryExit", "InternalErrorExit", "SystemEventExit",
           "DebugExit", "UnknownExit", "StopExit", "KickExit", "DeadlineExit", "BudgetExit",
           "CoalescedExit", "CoalescedWrite", "VcpuHandle", "exit_name", "kick_signal",
           "set_kick_signal", "MsrExit", "HypercallExit", "IrqWindowOpenExit",
           "IoapicEoiExit", "NotifyExit", "BusLockExit", "MemoryFaultExit", "DirtyRingFullExit",
           "AccessOps", "Kind", "Space", "ExitReason", "SystemEvent", "MpState", "MsrExitReason", "SyncReg",
           "__version__",
           # kvmsys.errors.__all__ (a test checks that the two agree)
           "KvmsysError", "KvmOSError", "KvmUnavailableError", "KvmPermissionError",
           "CapabilityError", "InvalidArgumentError", "ArgumentTypeError", "StateError",
           "StaleVcpuError", "VcpuBindingError", "ConfigurationError", "OperationTimeoutError"]
