"""The fd-based ABI: the /dev/kvm model with explicit handles.

    kvm = Kvm()                      # /dev/kvm
    vm = kvm.create_vm()             # a VM fd
    mem = vm.add_memory(0, 0, 2 << 20)
    vcpu = vm.create_vcpu(0)         # a vCPU fd + its comm area
    exit = vcpu.run()                # run *this* vCPU

These classes are thin: the kernel objects, validation and the run loop are
in the compiled core (kvmsys._core), shared with the syscall-style ABI.
"""
from __future__ import annotations

from . import _core, kvmstats
from .errors import CapabilityError, InvalidArgumentError

__all__ = ["Kvm", "Vm", "Vcpu", "CAPABILITIES"]

CAPABILITIES = _core.CAPABILITIES


def cap_number(cap) -> int:
    """Capability number from an int or a name ("SYNC_REGS" or "KVM_CAP_SYNC_REGS")."""
    if isinstance(cap, int):
        return cap
    name = str(cap).upper().removeprefix("KVM_CAP_")
    try:
        return CAPABILITIES[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown capability {cap!r}") from None


class Kvm(_core.KvmCore):
    """/dev/kvm."""

    def check_extension(self, cap) -> int:
        """KVM_CHECK_EXTENSION by number or name."""
        return super().check_extension(cap_number(cap))

    def capabilities(self) -> dict[str, int]:
        """Every capability this header knows, with the value the host reports."""
        return {name: super(Kvm, self).check_extension(num) for name, num in sorted(CAPABILITIES.items())}

    def create_vm(self) -> "Vm":
        return Vm(self)


class Vm(_core.VmCore):
    """A VM: memory slots, interrupt plumbing, fast handlers and vCPUs."""

    def check_extension(self, cap) -> int:
        return super().check_extension(cap_number(cap))

    def require(self, cap, needed_for: str) -> int:
        """The capability's value, or CapabilityError naming what needs it."""
        value = self.check_extension(cap)
        if not value:
            raise CapabilityError(str(cap).upper().removeprefix("KVM_CAP_"), needed_for)
        return value

    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        return Vcpu(self, vcpu_id)

    def kvm_stats(self, detail: bool = False) -> dict:
        """What KVM counts for this VM (KVM_GET_STATS_FD), by name; see kvmsys.kvmstats."""
        return kvmstats.read(self, detail)


class Vcpu(_core.VcpuCore):
    """A vCPU, run by whichever thread calls run() (one at a time)."""

    def handle(self) -> "_core.VcpuHandle":
        """A handle other threads may use to kick or interrupt this vCPU."""
        return _core.handle_of(self)

    def kvm_stats(self, detail: bool = False) -> dict:
        """What KVM counts for this vCPU (KVM_GET_STATS_FD): exits, io_exits, halt_exits,
        insn_emulation, ... by name; see kvmsys.kvmstats."""
        return kvmstats.read(self, detail)
