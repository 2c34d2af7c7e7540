"""KVM_SET_GUEST_DEBUG (single-step, hardware and software breakpoints) and KVM_TRANSLATE,
over both ABIs, in every guest mode."""
import pytest

from kvmsys import DebugExit
from kvmsys.errors import InvalidArgumentError
from kvmsys.gdb import probe, target
from kvmsys.guests import get, layout as L

MODES = ("real", "pm32", "long64")
# nop; nop; mov $0x2a, %al; jmp . (the same bytes in every mode)
CODE = b"\x90\x90\xb0\x2a\xeb\xfe"
MOV_AT = L.LOAD_ADDR + 2
JMP_AT = L.LOAD_ADDR + 4


def load(machine, mode):
    # long64 stays under the emulator: on PVM native mode ignores guest debugging
    L.prepare(get(f"compute.{mode}"), machine.vcpu, machine.mem)
    machine.mem[L.LOAD_ADDR:L.LOAD_ADDR + len(CODE)] = CODE


@pytest.mark.parametrize("mode", MODES)
def test_hw_breakpoint_stops_before_the_instruction(machine, mode):
    load(machine, mode)
    v = machine.vcpu
    v.set_guest_debug(True, hw_breakpoints=True, debugreg=target.debugreg([None, (1, JMP_AT, 1), None, None]))
    ex = machine.run(timeout=5)
    assert isinstance(ex, DebugExit) and ex.exception == 1      # #DB
    assert ex.pc == JMP_AT and v.get_regs()["rip"] == JMP_AT
    assert ex.dr6 & 0xF == 0b0010                                # DR1 hit
    assert v.get_regs()["rax"] & 0xFF == 0x2A                    # the mov before it ran
    v.set_guest_debug(False)
    assert machine.run(timeout=0.1).name == "DEADLINE"


@pytest.mark.parametrize("mode", MODES)
def test_write_watchpoint(machine, mode):
    # mov %al, 0x1004 (moffs8 form, address size of the mode) then jmp .
    if not probe.watchpoints_work(mode):
        pytest.skip(f"host: data breakpoints in debug registers do not stop the guest in {mode} "
                    "(its emulator does not check them; the gdb server single-steps write watchpoints)")
    addr = {"real": b"\x04\x10", "pm32": b"\x04\x10\x00\x00", "long64": b"\x04\x10\x00\x00\x00\x00\x00\x00"}[mode]
    load(machine, mode)
    code = b"\xb0\x2a\xa2" + addr + b"\xeb\xfe"
    machine.mem[L.LOAD_ADDR:L.LOAD_ADDR + len(code)] = code
    v = machine.vcpu
    v.set_guest_debug(True, hw_breakpoints=True, debugreg=target.debugreg([(2, L.RESULT_ADDR, 1), None, None, None]))
    ex = machine.run(timeout=5)
    assert isinstance(ex, DebugExit) and ex.exception == 1 and ex.dr6 & 0xF == 1
    assert machine.mem[L.RESULT_ADDR] == 0x2A                       # after the store (a trap)
    assert ex.pc == L.LOAD_ADDR + len(code) - 2


@pytest.mark.parametrize("mode", MODES)
def test_sw_breakpoint(machine, mode):
    if not probe.sw_breakpoints_work(mode):
        pytest.skip(f"host: int3 under KVM_GUESTDBG_USE_SW_BP does not end in a DEBUG exit in {mode} "
                    "(the gdb server uses debug registers instead)")
    load(machine, mode)
    machine.mem[MOV_AT] = 0xCC
    machine.vcpu.set_guest_debug(True, sw_breakpoints=True)
    ex = machine.run(timeout=5)
    assert isinstance(ex, DebugExit) and ex.exception == 3       # #BP
    assert ex.pc == MOV_AT


def test_probes_are_cached_and_boolean():
    for fn in (probe.sw_breakpoints_work, probe.watchpoints_work):
        for mode in MODES:
            assert fn(mode) in (True, False)
            assert fn(mode) is fn(mode)


@pytest.mark.parametrize("mode", MODES)
def test_translate(machine, mode):
    load(machine, mode)
    t = machine.vcpu.translate(L.LOAD_ADDR + 5)
    assert t["valid"] and t["physical_address"] == L.LOAD_ADDR + 5      # identity-mapped
    if mode == "long64":
        # the page tables map 0..1 GiB and the GiB of MMIO_BASE only
        assert machine.vcpu.translate(0x4000_0000)["valid"] is False
        t = machine.vcpu.translate(L.MMIO_BASE + 0x123)
        assert t["valid"] and t["physical_address"] == L.MMIO_BASE + 0x123 and t["writeable"]


def test_guest_debug_validation(machine):
    v = machine.vcpu
    with pytest.raises(InvalidArgumentError):
        v.set_guest_debug(True, hw_breakpoints=True, debugreg=[0] * 7)
    with pytest.raises(InvalidArgumentError):
        v.set_guest_debug(True, debugreg=[0] * 8)                  # without hw_breakpoints
    with pytest.raises(InvalidArgumentError):
        v.set_guest_debug(True, hw_breakpoints=True, debugreg=[-1] + [0] * 7)
    with pytest.raises(InvalidArgumentError):
        v.translate(-1)
    with pytest.raises(InvalidArgumentError):
        v.translate("0x1000")


@pytest.mark.nokvm
def test_dr7_encoding():
    # Intel SDM vol. 3, 17.2.4: L0 bit 0, R/W0 bits 16-17, LEN0 bits 18-19; bit 10 reads 1
    regs = target.debugreg([(1, 0x1000, 1), None, (2, 0x2000, 4), (4, 0x3000, 8)])
    assert regs[:4] == [0x1000, 0, 0x2000, 0x3000]
    dr7 = regs[7]
    assert dr7 & 0xFF == 0b01010001
    assert dr7 >> 16 & 0xF == 0b0000                  # exec, len 1
    assert dr7 >> 24 & 0xF == 0b1101                  # write, len 4
    assert dr7 >> 28 & 0xF == 0b1011                  # access, len 8
    assert dr7 & (1 << 10)
    with pytest.raises(ValueError):
        target.check_watch(2, 0x1001, 4)
    with pytest.raises(ValueError):
        target.check_watch(2, 0x1000, 3)


def test_closed_vcpu_refuses_debug_calls(fdvm):
    from kvmsys.errors import StateError
    v = fdvm.create_vcpu(0)
    v.close()
    with pytest.raises(StateError):
        v.set_guest_debug(True, single_step=True)
    with pytest.raises(StateError):
        v.translate(0x1000)
