"""Typed vCPU state (kvmsys.state): named fields over the kernel's exact bytes, checked
against the C header's layout and against what the real /dev/kvm reports, both ABIs."""
import pickle
import struct

import pytest

import kvmsys
from kvmsys import _core, state
from kvmsys.errors import InvalidArgumentError
from kvmsys.guests import layout as L
from test_wrappers import debug_exit_port, irq_machine, load_code, out

FCW_RESET, MXCSR_RESET = 0x037F, 0x1F80      # x87/SSE state after reset (Intel SDM)


@pytest.mark.nokvm
def test_layouts_match_the_c_header():
    lay = _core.STATE_LAYOUT
    assert (state.Fpu.SIZE, state.Lapic.SIZE, state.VcpuEvents.SIZE, state.Xcrs.SIZE) == \
        (lay["fpu"], lay["lapic"], lay["vcpu_events"], lay["xcrs"])
    assert state.Xsave.MIN_SIZE == lay["xsave"]
    f = state.Fpu.FIELDS
    assert (f["fcw"][0], f["last_dp"][0], f["xmm0"][0], f["mxcsr"][0]) == \
        (lay["fpu_fcw"], lay["fpu_last_dp"], lay["fpu_xmm"], lay["fpu_mxcsr"])
    e = state.VcpuEvents.FIELDS
    assert (e["sipi_vector"][0], e["smi_smm"][0], e["exception_payload"][0]) == \
        (lay["vcpu_events_sipi_vector"], lay["vcpu_events_smi"], lay["vcpu_events_exception_payload"])
    assert lay["xcrs_xcrs"] == 8


@pytest.mark.nokvm
def test_named_access_and_errors():
    fpu = state.Fpu()
    fpu["fcw"] = 0x27F
    assert fpu["fcw"] == 0x27F and bytes(fpu[128:130]) == b"\x7f\x02"
    with pytest.raises(KeyError, match="no field 'nope'"):
        fpu["nope"]
    with pytest.raises(InvalidArgumentError):
        fpu["fcw"] = 1 << 16
    with pytest.raises(InvalidArgumentError):
        state.Lapic(b"short")
    with pytest.raises(InvalidArgumentError):
        state.Lapic(1024)              # an int would be 1024 zero bytes: refused
    lapic = state.Lapic()
    lapic["irr2"] = 1                  # vector 64
    assert lapic.irr == {64} and pickle.loads(pickle.dumps(lapic)) == lapic
    assert type(pickle.loads(pickle.dumps(lapic))) is state.Lapic


def test_fpu_names_round_trip(machine):
    v = machine.vcpu
    fpu = v.get_fpu()
    assert isinstance(fpu, state.Fpu) and fpu["fcw"] == FCW_RESET
    fpu["fcw"] = 0x027F                          # double precision instead of extended
    fpu["xmm3"] = bytes(range(16))
    v.set_fpu(fpu)
    got = v.get_fpu()
    assert got == fpu and got["xmm3"] == bytes(range(16)) and got["fcw"] == 0x027F


def test_xsave_names_reach_the_guest(machine):
    # Through KVM_SET_XSAVE with the x87 bit in XSTATE_BV.  (KVM_SET_FPU alone leaves
    # XSTATE_BV as it was: measured here, a guest then still reads the reset FCW.)
    v = machine.vcpu
    debug_exit_port(machine.vm)
    # fnstcw [RESULT_ADDR]; mov eax, [RESULT_ADDR]; out PORT_RESULT, eax
    code = b"\xD9\x3D" + struct.pack("<I", L.RESULT_ADDR) + b"\xA1" + struct.pack("<I", L.RESULT_ADDR) \
        + bytes([0xE7, L.PORT_RESULT])
    load_code(v, machine.mem, code)
    xs = v.get_xsave()
    xs["fcw"] = 0x027F
    xs["xstate_bv"] |= 1
    v.set_xsave(xs)
    ex = machine.run(timeout=5)
    assert ex.value & 0xFFFF == 0x027F


def test_xsave_is_sized_by_xsave2_and_agrees_with_fpu(machine):
    v = machine.vcpu
    xs = v.get_xsave()
    cap = v.vm.check_extension("XSAVE2")
    assert isinstance(xs, state.Xsave) and len(xs) == v.xsave_size == max(cap, 4096)
    assert (xs["fcw"], xs["mxcsr"]) == (FCW_RESET, MXCSR_RESET)
    assert xs["xstate_bv"] & 1 or xs["xstate_bv"] == 0   # x87 in its init state may be elided
    xs["xmm5"] = b"\xA5" * 16
    xs["xstate_bv"] |= 0x2                     # SSE state present
    v.set_xsave(xs)
    assert v.get_fpu()["xmm5"] == b"\xA5" * 16  # the same register, seen through KVM_GET_FPU
    assert v.get_xsave()["xmm5"] == b"\xA5" * 16
    with pytest.raises(InvalidArgumentError):
        v.set_xsave(bytes(len(xs) - 1))


def test_xcrs_by_name(machine):
    v = machine.vcpu
    with kvmsys.Kvm() as kvm:
        v.set_cpuid2(kvm.supported_cpuid())    # the XCR0 bits a guest may set follow its CPUID
    x = v.get_xcrs()
    assert isinstance(x, state.Xcrs) and x["nr_xcrs"] >= 1
    assert x["xcr0"] & 1                       # x87 is always enabled in XCR0
    supported = x["xcr0"] | 0x2                # + SSE, which every x86-64 CPU has
    x["xcr0"] = supported
    v.set_xcrs(x)
    assert v.get_xcrs()["xcr0"] == supported and v.get_xcrs().entries()[0] == supported
    with pytest.raises(KeyError):
        x["xcr7"]


def test_vcpu_events_by_name(machine):
    v = machine.vcpu
    ev = v.get_vcpu_events()
    assert isinstance(ev, state.VcpuEvents) and ev["nmi_pending"] == 0
    v.nmi()
    assert v.get_vcpu_events()["nmi_pending"] == 1
    ev = v.get_vcpu_events()
    v.set_vcpu_events(ev)
    assert v.get_vcpu_events() == ev


def test_lapic_registers_by_name(abi):
    m = irq_machine(abi)
    try:
        v = m.vcpu
        lapic = v.get_lapic()
        assert isinstance(lapic, state.Lapic)
        assert lapic["version"] & 0xFF == 0x14     # KVM's local APIC version
        assert lapic["svr"] & 0xFF == 0xFF and not lapic["svr"] & 0x100   # reset: disabled
        assert lapic.apic_id() == v.id
        lapic["tpr"] = 0x10
        lapic["svr"] |= 0x100
        v.set_lapic(lapic)
        got = v.get_lapic()
        assert got["tpr"] == 0x10 and got["ppr"] == 0x10          # the PPR KVM derives from the TPR
        assert got["svr"] & 0x100
        assert got.as_dict()["tpr"] == 0x10
    finally:
        m.close()


def test_lapic_irr_shows_an_interrupt(abi):
    m = irq_machine(abi)
    try:
        v = m.vcpu
        lapic = v.get_lapic()
        lapic["svr"] |= 0x100
        v.set_lapic(lapic)
        debug_exit_port(m.vm)
        load_code(v, m.mem, b"\xFA" + out(L.PORT_OUT, 0) + b"\xEB\xFE")   # cli; report; spin
        assert m.run(timeout=5).port == L.PORT_OUT
        m.vm.signal_msi(0xFEE00000 | (lapic.apic_id() << 12), 0x41)
        assert v.get_lapic().irr == {0x41}        # requested, not taken (IF=0)
    finally:
        m.close()
