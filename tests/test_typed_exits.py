"""Typed exits for the exit kinds KVM leaves to user space beyond IO/MMIO/HLT, and the
IntEnums of kvmsys: against the real /dev/kvm, over both ABIs.

MSR exits are exercised end to end (KVM_CAP_X86_USER_SPACE_MSR + an MSR filter): a
guest's rdmsr of a filtered MSR is answered from Python and from a C constant handler.
"""
import struct

import pytest

import kvmsys
from kvmsys import (_core, pvm, ExitReason, HypercallExit, IoExit, IrqWindowOpenExit, Kind, MpState,
                    MsrExit, MsrExitReason, Space, StopExit, SystemEvent)
from kvmsys.guests import layout as L
from test_wrappers import debug_exit_port, irq_machine, load_code, out, status

MSR_TSC = 0x10               # IA32_TIME_STAMP_COUNTER: KVM handles it in the kernel unless filtered
MSR_TRAPPED = 0x12345678     # no such MSR: filtered too, so the trap is by the filter
VALUE = 0x1122334455667788


def rdmsr_report(index):
    """mov ecx, index; rdmsr; out PORT_RESULT, eax; mov eax, edx; out PORT_RESULT, eax"""
    return (b"\xB9" + struct.pack("<I", index) + b"\x0F\x32" + bytes([0xE7, L.PORT_RESULT])
            + b"\x89\xD0" + bytes([0xE7, L.PORT_RESULT]))


def wrmsr(index, value):
    """mov ecx, index; mov eax, lo; mov edx, hi; wrmsr"""
    return (b"\xB9" + struct.pack("<I", index) + b"\xB8" + struct.pack("<I", value & 0xFFFFFFFF)
            + b"\xBA" + struct.pack("<I", value >> 32) + b"\x0F\x30")


def result_pair(machine):
    """The two 4-byte outs of rdmsr_report: (eax, edx) as the guest read them."""
    lo = machine.run(timeout=5)
    assert isinstance(lo, IoExit) and lo.port == L.PORT_RESULT, lo
    lo = lo.value
    hi = machine.run(timeout=5)
    assert isinstance(hi, IoExit) and hi.port == L.PORT_RESULT, hi
    return lo | hi.value << 32


@pytest.fixture
def msr_machine(machine):
    vm = machine.vm
    vm.require("X86_USER_SPACE_MSR", "user-space MSR exits")
    vm.require("X86_MSR_FILTER", "an MSR filter")
    debug_exit_port(vm)
    vm.trap_msrs([MSR_TSC, MSR_TRAPPED])
    return machine


# === MSR exits ===========================================================================

def test_rdmsr_of_a_filtered_msr_answered_from_python(msr_machine):
    m = msr_machine
    load_code(m.vcpu, m.mem, rdmsr_report(MSR_TSC) + out(L.PORT_DEBUG_EXIT, 0))
    ex = m.run(timeout=5)
    assert isinstance(ex, MsrExit) and not ex.is_write
    assert ex.reason == ExitReason.X86_RDMSR and ex.name == "X86_RDMSR"
    assert ex.index == MSR_TSC and ex.msr_reason is MsrExitReason.FILTER and not ex.error
    ex.data = VALUE
    assert result_pair(m) == VALUE
    assert isinstance(m.run(timeout=5), StopExit)


def test_rdmsr_answered_by_a_c_constant_handler(msr_machine):
    m = msr_machine
    idx = m.vm.add_handler(Space.MSR, MSR_TSC, MSR_TSC + 1, Kind.CONST, VALUE)
    load_code(m.vcpu, m.mem, rdmsr_report(MSR_TSC) + rdmsr_report(MSR_TSC) + out(L.PORT_DEBUG_EXIT, 0))
    assert result_pair(m) == VALUE and result_pair(m) == VALUE
    assert isinstance(m.run(timeout=5), StopExit)
    stats = m.vcpu.stats()
    assert stats["handler_hits"][idx] == 2 and stats["exits"]["X86_RDMSR"] == 2


def test_msr_python_handler_callback(msr_machine):
    m = msr_machine
    seen = []

    def on_msr(ex):
        seen.append((ex.is_write, ex.index, ex.data))
        if not ex.is_write:
            ex.data = 0xABCD

    m.vm.add_handler(Space.MSR, MSR_TRAPPED, MSR_TRAPPED + 1, Kind.PYTHON, callback=on_msr)
    load_code(m.vcpu, m.mem, wrmsr(MSR_TRAPPED, VALUE) + rdmsr_report(MSR_TRAPPED)
              + out(L.PORT_DEBUG_EXIT, 0))
    assert result_pair(m) == 0xABCD
    assert seen == [(True, MSR_TRAPPED, VALUE), (False, MSR_TRAPPED, 0)]


def test_wrmsr_exit_and_error_flag_injects_gp(msr_machine):
    m = msr_machine
    load_code(m.vcpu, m.mem, wrmsr(MSR_TRAPPED, VALUE) + out(L.PORT_DEBUG_EXIT, 0))
    ex = m.run(timeout=5)
    assert isinstance(ex, MsrExit) and ex.is_write and ex.reason == ExitReason.X86_WRMSR
    assert (ex.index, ex.data) == (MSR_TRAPPED, VALUE)
    with pytest.raises(kvmsys.InvalidArgumentError):
        ex.data = 1                  # only a read is answered with data
    ex.error = True                  # the guest takes #GP: the built-in stub reports vector 13
    assert ex.error
    ex = m.run(timeout=5)
    assert isinstance(ex, StopExit) and ex.status == status(L.EXC_EXIT_BASE | 13)


def test_unfiltered_msr_stays_in_the_kernel(msr_machine):
    m = msr_machine
    m.vm.trap_msrs([MSR_TRAPPED])         # a new filter replaces the old: TSC is the kernel's again
    load_code(m.vcpu, m.mem, rdmsr_report(MSR_TSC) + out(L.PORT_DEBUG_EXIT, 0))
    tsc = result_pair(m)
    assert tsc > 0 and "X86_RDMSR" not in m.vcpu.stats()["exits"]


def test_msr_filter_validation(machine):
    vm = machine.vm
    vm.require("X86_MSR_FILTER", "an MSR filter")
    with pytest.raises(kvmsys.InvalidArgumentError):
        vm.set_msr_filter([(3, 0, 8, b"")])                 # bitmap too short for 8 MSRs
    with pytest.raises(kvmsys.InvalidArgumentError):
        vm.set_msr_filter([(3, 0, 1, b"\0")] * 17)          # more ranges than KVM takes
    with pytest.raises(kvmsys.InvalidArgumentError):
        vm.set_msr_filter([(4, 0, 1, b"\0")])               # unknown range flag
    with pytest.raises(kvmsys.InvalidArgumentError):
        vm.trap_msrs([])
    with pytest.raises(kvmsys.InvalidArgumentError):
        vm.add_handler(Space.MSR, 0, (1 << 32) + 1, Kind.CONST)
    vm.set_msr_filter([])            # no ranges, default allow: filtering off again


# === hypercalls, the interrupt window ====================================================

def test_hypercall_exit_and_return_value(machine):
    vm = machine.vm
    nr = _core.HYPERCALLS["MAP_GPA_RANGE"]
    if not vm.check_extension("EXIT_HYPERCALL") & (1 << nr):
        pytest.skip("host: KVM_CAP_EXIT_HYPERCALL lacks KVM_HC_MAP_GPA_RANGE")
    if pvm.is_pvm(machine.vcpu):
        # measured here: an emulated vmcall never completes, a native vmmcall returns
        # -KVM_EPERM in RAX; the decoding is covered by test_decoding_of_exits_not_produced_here
        pytest.skip("host: PVM does not forward guest hypercalls as KVM_EXIT_HYPERCALL")
    vm.enable_cap(kvmsys.fd.CAPABILITIES["EXIT_HYPERCALL"], 0, (1 << nr,))
    debug_exit_port(vm)
    # mov eax, nr; mov ebx, 0x200000; mov ecx, 3; xor edx, edx; vmcall; out PORT_RESULT, eax
    code = (b"\xB8" + struct.pack("<I", nr) + b"\xBB" + struct.pack("<I", 0x200000)
            + b"\xB9\x03\x00\x00\x00\x31\xD2" + b"\x0F\x01\xC1" + bytes([0xE7, L.PORT_RESULT]))
    load_code(machine.vcpu, machine.mem, code)
    ex = machine.run(timeout=5)
    assert isinstance(ex, HypercallExit) and ex.reason == ExitReason.HYPERCALL
    assert ex.nr == nr and ex.args[:3] == (0x200000, 3, 0) and not ex.longmode
    ex.ret = 0x5A5A
    assert ex.ret == 0x5A5A
    ex = machine.run(timeout=5)
    assert isinstance(ex, IoExit) and ex.value == 0x5A5A      # the guest's RAX


def test_irq_window_open_exit(machine):
    debug_exit_port(machine.vm)
    # cli; out PORT_OUT; sti; nop; jmp $
    load_code(machine.vcpu, machine.mem, b"\xFA" + out(L.PORT_OUT, 1) + b"\xFB\x90\xEB\xFE")
    ex = machine.run(timeout=5)
    assert isinstance(ex, IoExit) and ex.port == L.PORT_OUT
    machine.vcpu.request_interrupt_window = True
    assert machine.vcpu.request_interrupt_window
    ex = machine.run(timeout=5)
    assert isinstance(ex, IrqWindowOpenExit) and ex.reason == ExitReason.IRQ_WINDOW_OPEN
    assert ex.if_flag and ex.ready_for_interrupt_injection
    machine.vcpu.request_interrupt_window = False
    assert isinstance(machine.run(timeout=0.2), kvmsys.DeadlineExit)


# === exits this host cannot produce: decoded from a comm area written by hand ============

@pytest.mark.parametrize("reason, fields, expect", [
    ("SYSTEM_EVENT", {"system_event": struct.pack("<II", 2, 0)},
     lambda ex: ex.type is SystemEvent.RESET and ex.data == ()),
    ("NOTIFY", {"notify": struct.pack("<I", 1)}, lambda ex: ex.flags == 1 and ex.context_invalid),
    ("MEMORY_FAULT", {"memory_fault": struct.pack("<QQQ", 1 << 3, 0x7000, 0x1000)},
     lambda ex: (ex.private, ex.gpa, ex.size) == (True, 0x7000, 0x1000)),
    ("IOAPIC_EOI", {"eoi": bytes([0x41])}, lambda ex: ex.vector == 0x41),
    ("HYPERCALL", {"hypercall": struct.pack("<7QQI", 12, 0x200000, 3, 0, 0, 0, 0, 0, 1)},
     lambda ex: (ex.nr, ex.args[:2], ex.longmode, ex.ret) == (12, (0x200000, 3), True, 0)),
    ("X86_BUS_LOCK", {}, lambda ex: type(ex).__name__ == "BusLockExit"),
    ("DIRTY_RING_FULL", {}, lambda ex: type(ex).__name__ == "DirtyRingFullExit"),
])
def test_decoding_of_exits_not_produced_here(machine, reason, fields, expect):
    # KVM_RUN_LAYOUT: offsets from the C header; the exit union is one offset for every member
    lay = _core.KVM_RUN_LAYOUT
    comm = machine.vcpu.comm_area
    struct.pack_into("<I", comm, lay["exit_reason"], ExitReason[reason])
    for _name, raw in fields.items():
        comm[lay["exit_union"]:lay["exit_union"] + len(raw)] = raw
    ex = machine.vcpu.last_exit()
    assert ex.reason == ExitReason[reason] and ex.name == reason
    assert expect(ex), ex
    if reason == "HYPERCALL":          # the answer lands in the comm area, where KVM reads it
        ex.ret = 0xFEED
        assert machine.vcpu.last_exit().ret == 0xFEED
    del comm, ex


# === enums ===============================================================================

@pytest.mark.nokvm
def test_enums_are_the_core_values_and_plain_ints():
    assert dict(Kind.__members__) == {k: Kind(v) for k, v in _core.H_KINDS.items()}
    assert Space.PIO == Space.PIO and Space.MSR == 2
    assert Kind["SINK"] == Kind.SINK           # the old dict spelling still works
    assert ExitReason.IO == 2 and ExitReason.STOP < 0
    assert MpState.RUNNABLE == 0 and MpState.HALTED == 3
    assert SystemEvent.SHUTDOWN == 1 and MsrExitReason.FILTER == 4
    assert all(kvmsys.exit_name(r) == r.name for r in ExitReason)


def test_mp_state_is_typed(abi):
    m = irq_machine(abi)            # states other than RUNNABLE need the in-kernel LAPIC
    try:
        assert m.vcpu.get_mp_state() is MpState.RUNNABLE
        m.vcpu.set_mp_state(MpState.HALTED)
        assert m.vcpu.get_mp_state() is MpState.HALTED
    finally:
        m.close()

