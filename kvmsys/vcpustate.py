"""A vCPU's whole architectural state, captured and applied in one place.

Used to reset a recycled vCPU of the syscall ABI to its initial state, and by
kvmsys.smp for snapshots.  States are plain dicts (picklable).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _core, pvm
from .errors import ArgumentTypeError, InvalidArgumentError, StateError

if TYPE_CHECKING:
    from ._core import VcpuCore
    from .fd import Vcpu

State = dict[str, Any]      # what capture() returns

# What capture() always records (plus "lapic" with the in-kernel irqchip).
KEYS = frozenset(("id", "regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "msrs", "mp_state",
                  "vcpu_events"))


def check(state: object) -> None:
    """InvalidArgumentError unless *state* looks like what capture() returns."""
    if not isinstance(state, dict):
        raise ArgumentTypeError(f"a vCPU state is a dict from capture(), not {type(state).__name__}")
    missing = KEYS - state.keys()
    if missing:
        raise InvalidArgumentError(f"the vCPU state lacks {sorted(missing)} (not made by capture()?)")
    if not isinstance(state["msrs"], dict):
        raise ArgumentTypeError(f"the vCPU state's msrs must be a dict, not {type(state['msrs']).__name__}")


def read_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS stops at the first MSR it cannot read: skip that one and go on."""
    out: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        out.update(got)
        rest = rest[len(got) + 1:]
    return out


def write_msrs(vcpu: Vcpu, msrs: dict[int, int]) -> list[int]:
    """Same for KVM_SET_MSRS; returns the indices KVM refused."""
    refused: list[int] = []
    rest = list(msrs.items())
    while rest:
        n = vcpu.set_msrs(dict(rest))
        if n < len(rest):
            refused.append(rest[n][0])
        rest = rest[n + 1:]
    return refused


def msr_indices(vcpu: Vcpu) -> list[int]:
    """The MSRs KVM saves and restores, plus the host flavour's own (kvmsys.pvm)."""
    return list(vcpu.vm.kvm.msr_index_list()) + pvm.extra_msrs(vcpu)


def capture(vcpu: Vcpu, msrs: list[int] | None = None) -> State:
    """Everything KVM keeps about *vcpu* that kvmsys can read (call it on a stopped vCPU).

    Besides what every KVM has: SREGS2 (with the PDPTRs), the TSC frequency and the
    nested-virtualization state where the host has them.  The access the last exit left
    pending is completed first (settle()): KVM's record of it is in no state read here."""
    settle(vcpu, "capture a vCPU state", loading=False)
    state = dict(id=vcpu.id, regs=vcpu.get_regs(), sregs=vcpu.get_sregs(), fpu=vcpu.get_fpu(),
                 xsave=vcpu.get_xsave(), xcrs=vcpu.get_xcrs(), debugregs=vcpu.get_debugregs(),
                 msrs=read_msrs(vcpu, msr_indices(vcpu) if msrs is None else msrs),
                 mp_state=vcpu.get_mp_state(), vcpu_events=vcpu.get_vcpu_events())
    if vcpu.vm.has_irqchip:
        state["lapic"] = vcpu.get_lapic()
    for key, cap, get in (("sregs2", "SREGS2", vcpu.get_sregs2),
                          ("tsc_khz", "GET_TSC_KHZ", vcpu.get_tsc_khz),
                          ("nested_state", "NESTED_STATE", vcpu.get_nested_state)):
        if vcpu.vm.check_extension(cap) > 0:
            state[key] = get()
    return state


# What each setter can change (KVM couples some state: FPU and XSAVE overlap, XCR0 says
# which XSAVE components are live, an INIT/SIPI mp_state is LAPIC and event state); a run
# can change anything but the TSC frequency, which only KVM_SET_TSC_KHZ sets.  A reset after
# only these restores only what they reach; any other setter (sregs and MSRs reach EFER,
# the APIC base and more) can change anything: a whole reset.
STATE = (KEYS - {"id"}) | {"lapic", "tsc_khz", "nested_state"}     # every component apply() sets
AFFECTS: dict[str, frozenset[str]] = {
    "KVM_RUN": STATE - {"tsc_khz"},
    "KVM_SET_REGS": frozenset({"regs"}),
    "KVM_SET_FPU": frozenset({"fpu", "xsave"}),
    "KVM_SET_XSAVE": frozenset({"fpu", "xsave"}),
    "KVM_SET_XCRS": frozenset({"xcrs", "xsave", "fpu"}),
    "KVM_SET_DEBUGREGS": frozenset({"debugregs"}),
    "KVM_SET_MP_STATE": frozenset({"mp_state", "vcpu_events", "lapic"}),
}


def affected(changes: set[str] | frozenset[str]) -> frozenset[str] | None:
    """The state components *changes* (vcpu.changes) may have changed; None for all."""
    if not changes <= AFFECTS.keys():
        return None
    return frozenset().union(*(AFFECTS[op] for op in changes))


# Exits whose access KVM finishes only at the next KVM_RUN; of these, _writes_back():
# the ones whose completion writes registers.
_AWAITING = (_core.IoExit, _core.MmioExit, _core.MsrExit, _core.HypercallExit)


def _writes_back(ex: Any) -> bool:
    return (isinstance(ex, _core.IoExit) and ex.is_in) or (isinstance(ex, _core.MmioExit) and not ex.is_write) \
        or isinstance(ex, (_core.MsrExit, _core.HypercallExit))


def settle(vcpu: VcpuCore, what: str, *, loading: bool = True) -> None:
    """Before a whole state is loaded or read (*what*, for the message): complete the
    access the vCPU's last exit left for user space.  KVM finishes an I/O, MMIO, MSR or
    hypercall exit only at the next KVM_RUN, keeps what is left of it where no state
    read can see it, and when it finishes a read writes registers (the value, RIP past the
    instruction, through its emulator all it decoded then) over any set in between;
    KVM_RUN with immediate_exit settles it first.  From inside the vCPU's own run() (its
    exit handler) the run loop completes the exit being handled when the handler returns:
    for a write, whose completion writes no register, a load or a capture goes ahead (on
    VT-x a captured RIP may still point at that OUT, which KVM skips when the vCPU runs on
    from there); for a read, StateError (*loading*: a load rather than a capture).
    Nothing is done where the comm area holds no such exit (a new or recycled vCPU, a HLT,
    a kick), so reading a state leaves the comm area as it was."""
    ex = vcpu.last_exit()
    if not isinstance(ex, _AWAITING):
        return
    if not vcpu.active:
        vcpu.complete_pending_io()
        return
    if _writes_back(ex):
        raise StateError(f"cannot {what} while the vCPU is inside run() with its {ex.name} exit unfinished: "
                         "KVM finishes that exit only when the run goes on"
                         + (", over the registers loaded" if loading else "")
                         + f"; from the exit's handler, return the exit from run() (a true return value) "
                         f"and {what} then")


def apply(vcpu: Vcpu, state: State, only: frozenset[str] | None = None) -> list[int]:
    """Load *state* into *vcpu* (not running): all of it, or the components named in *only*
    (keys of *state*; "sregs" includes SREGS2).  Returns the MSRs KVM refused (usually none).
    An access the vCPU's last exit left pending is completed first: KVM would finish it at
    the next KVM_RUN, over the registers loaded here."""
    check(state)
    settle(vcpu, "load a vCPU state")

    def want(key: str) -> bool:
        return only is None or key in only

    # The order KVM needs: sregs (modes, EFER) before MSRs, LAPIC before pending events.
    if want("regs"):
        vcpu.set_regs(state["regs"])
    if want("fpu"):
        vcpu.set_fpu(state["fpu"])
    if want("xsave"):
        vcpu.set_xsave(state["xsave"])
    if want("xcrs"):
        vcpu.set_xcrs(state["xcrs"])
    if want("sregs"):
        if "sregs2" in state and vcpu.vm.check_extension("SREGS2") > 0:
            vcpu.set_sregs2(state["sregs2"])        # the same, plus the PDPTRs
        else:
            vcpu.set_sregs(state["sregs"])
    if want("tsc_khz") and "tsc_khz" in state and vcpu.vm.check_extension("GET_TSC_KHZ") > 0 \
            and vcpu.get_tsc_khz() != state["tsc_khz"]:
        vcpu.set_tsc_khz(state["tsc_khz"])
    refused: list[int] = []
    if want("msrs"):
        # Only MSRs that differ: KVM refuses some writes it would not need (e.g. paravirtual
        # MSRs the guest's CPUID does not announce, written with the value they hold).
        saved = state["msrs"]
        now = read_msrs(vcpu, list(saved)) if saved else {}
        refused = write_msrs(vcpu, {k: v for k, v in saved.items() if now.get(k) != v})
    if want("nested_state") and "nested_state" in state and vcpu.vm.check_extension("NESTED_STATE") > 0:
        vcpu.set_nested_state(state["nested_state"])
    if want("lapic") and "lapic" in state and vcpu.vm.has_irqchip:
        vcpu.set_lapic(state["lapic"])
    if want("mp_state"):
        vcpu.set_mp_state(state["mp_state"])
    if want("vcpu_events"):
        vcpu.set_vcpu_events(state["vcpu_events"])
    if want("debugregs"):
        vcpu.set_debugregs(state["debugregs"])
    return refused


def reset(vcpu: Vcpu, initial: State) -> None:
    """Make a vCPU that its owner used indistinguishable from a new one, given the state
    *initial* captured when it was created: an I/O its last exit left pending is completed
    first (else KVM would finish it at the next owner's first run), guest debugging is
    turned off (KVM has no way to read it back), every piece of state is applied, and the
    comm area is cleared.  What KVM cannot undo (a CPUID table, and the freeze of the
    CPUID after the first KVM_RUN: vcpu.irreversible, vcpu.has_run) is the caller's to avoid.
    Only what its owner's setters can have changed is restored (vcpu.changes, AFFECTS):
    each piece costs a vCPU ioctl; a vCPU that ran is restored whole."""
    if vcpu.touched:
        only = affected(vcpu.changes)
        if vcpu.guest_debug:
            vcpu.set_guest_debug(False)
        apply(vcpu, initial, only)
        vcpu.mark_pristine()
    vcpu.clear_comm_area()
