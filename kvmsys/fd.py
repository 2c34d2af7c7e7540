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

import os
from typing import Any, Callable, Iterable

from . import _core, kvmstats, routing, state
from .errors import ArgumentTypeError, CapabilityError, InvalidArgumentError

__all__ = ["Kvm", "Vm", "Vcpu", "CAPABILITIES"]

CAPABILITIES = _core.CAPABILITIES
MSR_IA32_APICBASE = 0x1B
APICBASE_X2APIC = 1 << 10       # IA32_APIC_BASE.EXTD: the local APIC is in x2APIC mode


def cap_number(cap: int | str) -> int:
    """Capability number from an int or a name ("SYNC_REGS" or "KVM_CAP_SYNC_REGS")."""
    if isinstance(cap, int):
        return cap
    name = str(cap).upper().removeprefix("KVM_CAP_")
    try:
        return CAPABILITIES[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown capability {cap!r}") from None


class _Limits:
    """The VM limits KVM reports, with the fallbacks the kernel's API documentation gives
    for a KVM that lacks the capability (kvm-ioctls' get_nr_vcpus and friends).  On a VM
    they are that VM's (KVM_CHECK_EXTENSION on the VM fd), on Kvm the host's."""

    check_extension: Callable[[Any], int]       # Kvm's or Vm's

    def get_nr_vcpus(self) -> int:
        """The recommended most vCPUs (KVM_CAP_NR_VCPUS; 4 where absent)."""
        return self.check_extension("NR_VCPUS") or 4

    def get_max_vcpus(self) -> int:
        """The most vCPUs a VM may have (KVM_CAP_MAX_VCPUS; where absent, get_nr_vcpus())."""
        return self.check_extension("MAX_VCPUS") or self.get_nr_vcpus()

    def get_max_vcpu_id(self) -> int:
        """One more than the largest vCPU id (KVM_CAP_MAX_VCPU_ID; where absent, get_max_vcpus())."""
        return self.check_extension("MAX_VCPU_ID") or self.get_max_vcpus()

    def get_nr_memslots(self) -> int:
        """The most memory slots (KVM_CAP_NR_MEMSLOTS; 32, x86's old KVM_MEMORY_SLOTS, where absent)."""
        return self.check_extension("NR_MEMSLOTS") or 32


class Kvm(_Limits, _core.KvmCore):
    """/dev/kvm."""

    @classmethod
    def from_raw_fd(cls, fd: int) -> "Kvm":
        """A Kvm over a duplicate of *fd*, a /dev/kvm fd opened elsewhere (the caller
        keeps and closes its own)."""
        return cls(fd=fd)

    def check_extension(self, cap: int | str) -> int:
        """KVM_CHECK_EXTENSION by number or name."""
        return super().check_extension(cap_number(cap))

    def capabilities(self) -> dict[str, int]:
        """Every capability this header knows, with the value the host reports."""
        return {name: super(Kvm, self).check_extension(num) for name, num in sorted(CAPABILITIES.items())}

    def create_vm(self, vm_type: int = 0) -> "Vm":
        """KVM_CREATE_VM: a new, bare VM (no memory, no irqchip, no handlers).  *vm_type*:
        the machine type (x86: KVM_X86_DEFAULT_VM = 0; KVM_CAP_VM_TYPES lists the others)."""
        return Vm(self, vm_type)


class Vm(_Limits, _core.VmCore):
    """A VM: memory slots, interrupt plumbing, fast handlers and vCPUs."""

    @classmethod
    def from_raw_fd(cls, kvm: Kvm, fd: int) -> "Vm":
        """A Vm over a duplicate of *fd*, a VM fd made elsewhere (the caller keeps and
        closes its own).  Memory slots and vCPUs it already has are the kernel's, not
        this object's: add new slots (other slot numbers) and vCPUs (other ids)."""
        return cls(kvm, fd=fd)

    def check_extension(self, cap: int | str) -> int:
        """KVM_CHECK_EXTENSION on the VM (by number or name): what this VM supports."""
        return super().check_extension(cap_number(cap))

    def require(self, cap: int | str, needed_for: str) -> int:
        """The capability's value, or CapabilityError naming what needs it."""
        value = self.check_extension(cap)
        if not value:
            raise CapabilityError(str(cap).upper().removeprefix("KVM_CAP_"), needed_for)
        return value

    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        """KVM_CREATE_VCPU: vCPU *vcpu_id* and its comm area."""
        return Vcpu(self, vcpu_id)

    def create_interrupt_controllers(self, irqchip: bool | str, pit: bool, needed_for: str) -> None:
        """*irqchip* "split": the split irqchip (local APICs in the kernel); true: the
        whole in-kernel irqchip, with the PIT if *pit* (CapabilityError naming
        *needed_for* where the host has none); false: none.  Both ABIs' VMs are made so."""
        if irqchip == "split":
            self.create_split_irqchip()
        elif irqchip:
            self.require("IRQCHIP", needed_for)
            self.create_irqchip()
            if pit:
                self.create_pit2()

    x2apic_format = False     # KVM_X2APIC_API_USE_32BIT_IDS enabled: 32-bit APIC ids in MSIs and LAPIC state

    def enable_cap(self, cap: int | str, flags: int = 0, args: Iterable[int] = ()) -> None:
        """KVM_ENABLE_CAP on the VM (by number or name)."""
        num = cap_number(cap)
        if isinstance(args, Iterable) and not isinstance(args, (str, bytes)):
            args = tuple(args)          # (an iterator is read once, here)
        super().enable_cap(num, flags, args)
        if num == CAPABILITIES["X2APIC_API"] and args:
            self.x2apic_format = bool(tuple(args)[0] & _core.X2APIC_API["USE_32BIT_IDS"])

    def msi_to_apic(self, apic_id: int, vector: int) -> int:
        """KVM_SIGNAL_MSI of *vector* to local APIC *apic_id* (physical destination, fixed
        delivery, edge).  Ids above 255 need KVM_X2APIC_API_USE_32BIT_IDS (enable_cap
        X2APIC_API).  Returns 1 if delivered, 0 if the guest blocked it."""
        lo, hi, data = routing.msi_message(apic_id, vector, x2apic_format=self.x2apic_format)
        return self.signal_msi(lo, data, hi)

    def kvm_stats(self, detail: bool = False) -> dict[str, Any]:
        """What KVM counts for this VM (KVM_GET_STATS_FD), by name; see kvmsys.kvmstats."""
        return kvmstats.read(self, detail)

    def trap_msrs(self, indices: Iterable[int], *, read: bool = True, write: bool = True) -> None:
        """Make guest accesses to these MSRs exit to user space as MsrExit (answer them in
        Python, or with vm.add_handler(Space.MSR, ...) in C); every other MSR stays
        KVM's.  Enables KVM_CAP_X86_USER_SPACE_MSR for filter exits and installs an MSR
        filter (KVM_X86_SET_MSR_FILTER) that replaces any earlier one; at most 16 MSRs."""
        if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
            raise ArgumentTypeError(f"trap_msrs takes a list of MSR indices, not {type(indices).__name__}")
        indices = list(indices)
        if not all(isinstance(i, int) and 0 <= i <= 0xFFFFFFFF for i in indices):
            raise InvalidArgumentError(f"MSR indices are ints 0..0xffffffff, not {indices!r}")
        idx = sorted(set(indices))
        if not idx or len(idx) > 16:
            raise InvalidArgumentError(f"trap_msrs takes 1..16 MSR indices, got {len(idx)}")
        if not (read or write):
            raise InvalidArgumentError("trap_msrs: trap reads, writes or both")
        self.require("X86_USER_SPACE_MSR", "trapping MSR accesses to user space")
        self.require("X86_MSR_FILTER", "trapping MSR accesses to user space")
        from .enums import MsrExitReason
        self.enable_cap(CAPABILITIES["X86_USER_SPACE_MSR"], 0, (int(MsrExitReason.FILTER),))   # a bit mask
        flags = (_core.MSR_FILTER["READ"] if read else 0) | (_core.MSR_FILTER["WRITE"] if write else 0)
        self.set_msr_filter([(flags, i, 1, b"\0") for i in idx])     # bit 0 clear: denied


class Vcpu(_core.VcpuCore):
    """A vCPU, run by whichever thread calls run() (one at a time)."""
    vm: Vm

    @classmethod
    def from_raw_fd(cls, vm: Vm, fd: int) -> "Vcpu":
        """A Vcpu of *vm* over a duplicate of *fd*, a vCPU fd of that VM made elsewhere
        (its id is read from the fd; the caller keeps and closes its own)."""
        try:
            what = os.readlink(f"/proc/self/fd/{int(fd)}")
        except (OSError, ValueError, TypeError):
            what = ""
        kind, _, vcpu_id = what.rpartition(":")
        if kind != "anon_inode:kvm-vcpu" or not vcpu_id.isdigit():
            raise InvalidArgumentError(f"fd {fd!r} is not a KVM vCPU fd ({what or 'not open'})")
        return cls(vm, int(vcpu_id), fd=fd)

    def handle(self) -> "_core.VcpuHandle":
        """A handle other threads may use to kick or interrupt this vCPU."""
        return _core.handle_of(self)

    # Typed state (kvmsys.state): the kernel's bytes, with fields by name; the set_*
    # methods take these objects or any bytes of the right size.
    # (the core returns bytes; these return the typed views, bytearrays: hence the ignores)
    def get_fpu(self) -> state.Fpu:  # type: ignore[override]
        """KVM_GET_FPU: x87/SSE state as a kvmsys.state.Fpu (fields by name)."""
        return state.Fpu(super().get_fpu())

    def get_lapic(self) -> state.Lapic:  # type: ignore[override]
        """KVM_GET_LAPIC: the local APIC's registers as a kvmsys.state.Lapic."""
        return state.Lapic(super().get_lapic())

    def get_vcpu_events(self) -> state.VcpuEvents:  # type: ignore[override]
        """KVM_GET_VCPU_EVENTS: pending exceptions, interrupts, NMIs as a kvmsys.state.VcpuEvents."""
        return state.VcpuEvents(super().get_vcpu_events())

    def get_xsave(self) -> state.Xsave:  # type: ignore[override]
        """KVM_GET_XSAVE(2): the extended state as a kvmsys.state.Xsave."""
        return state.Xsave(super().get_xsave())

    def get_xcrs(self) -> state.Xcrs:  # type: ignore[override]
        """KVM_GET_XCRS: the extended control registers (XCR0) as a kvmsys.state.Xcrs."""
        return state.Xcrs(super().get_xcrs())

    # --- interrupts --------------------------------------------------------
    def x2apic_mode(self) -> bool:
        """True if the local APIC is in x2APIC mode (IA32_APIC_BASE.EXTD)."""
        return bool(self.get_msrs([MSR_IA32_APICBASE]).get(MSR_IA32_APICBASE, 0) & APICBASE_X2APIC)

    def apic_id(self) -> int:
        """The APIC id this vCPU has now, from its LAPIC state (in-kernel irqchip): not
        necessarily its vCPU id (a guest may change it in xAPIC mode).  Call it from the
        thread that runs the vCPU, or while it is not running (KVM_GET_LAPIC waits)."""
        return self.get_lapic().apic_id(self.x2apic_mode(), self.vm.x2apic_format)

    def interrupt(self, vector: int) -> None:
        """Queue external interrupt *vector*: with the in-kernel irqchip an MSI to this
        vCPU's current APIC id, without it KVM_INTERRUPT."""
        if not self.vm.has_irqchip:
            return super().interrupt(vector)
        self.vm.msi_to_apic(self.apic_id(), vector)

    def kvm_stats(self, detail: bool = False) -> dict[str, Any]:
        """What KVM counts for this vCPU (KVM_GET_STATS_FD): exits, io_exits, halt_exits,
        insn_emulation, ... by name; see kvmsys.kvmstats."""
        return kvmstats.read(self, detail)
