"""Loading a whole state settles the access the last exit left for user space first.

After an IN, MMIO read or any emulated access exits, KVM finishes the instruction only
at the next KVM_RUN: it stores the value read and moves RIP on, through its instruction
emulator by writing back the registers it decoded then.  Registers set in between are
overwritten.  So a new built-in guest loaded onto such a vCPU (Machine.load,
layout.prepare) and a captured state applied to it (vcpustate.apply: reset, recycling)
must complete that access first (KVM_RUN with immediate_exit), or the vCPU goes on
where the old instruction ended, in the new code.  Both ABIs, every guest mode."""
import pytest

from kvmsys import IoExit, MmioExit, vcpustate
from kvmsys.guests import layout

PENDING = ["pio_in_loop", "mmio_read_loop", "pio_out_loop", "mmio_write_loop"]
KIND = {"pio_in_loop": IoExit, "mmio_read_loop": MmioExit, "pio_out_loop": IoExit, "mmio_write_loop": MmioExit}


def outs_of_pio_out_loop(machine, n):
    """The ports of the exits of a freshly loaded pio_out_loop with N = n, up to its debug exit."""
    ports = []
    for _ in range(n + 1):
        ex = machine.run(timeout=10)
        assert isinstance(ex, IoExit), ex
        ports.append(ex.port)
    return ports


@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
@pytest.mark.parametrize("first", PENDING)
def test_a_guest_loaded_after_an_exit_starts_at_its_entry(machine, mode, first):
    machine.load(f"{first}.{mode}", n=0)
    ex = machine.run(budget=1, timeout=10)
    assert isinstance(ex, KIND[first]), ex          # its access waits for the next KVM_RUN
    machine.load(f"pio_out_loop.{mode}", n=3)
    assert outs_of_pio_out_loop(machine, 3) == [layout.PORT_OUT] * 3 + [layout.PORT_DEBUG_EXIT]
    assert machine.counter() == 3


@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
@pytest.mark.parametrize("first", ["pio_in_loop", "mmio_read_loop"])
def test_a_state_applied_after_an_exit_is_the_state_the_vcpu_runs_from(machine, mode, first):
    machine.load(f"{first}.{mode}", n=0)
    start = vcpustate.capture(machine.vcpu)
    assert isinstance(machine.run(budget=1, timeout=10), KIND[first])
    want = machine.vcpu.get_regs()                  # at the first access, from the start
    assert isinstance(machine.run(budget=1, timeout=10), KIND[first])     # the second: pending
    vcpustate.apply(machine.vcpu, start)
    assert isinstance(machine.run(budget=1, timeout=10), KIND[first])
    got = machine.vcpu.get_regs()
    assert (got["rip"], got["rcx"]) == (want["rip"], want["rcx"])


@pytest.mark.parametrize("load", ["apply", "guest", "capture"])
def test_loading_from_the_handler_of_a_read_exit_is_refused_and_of_a_write_allowed(machine, load):
    """Inside run() the run loop completes the exit being handled when its handler returns,
    after anything loaded there: a write's completion writes no register, a read's does."""
    from kvmsys import StateError, _core
    machine.load("pio_in_loop.pm32", n=0)
    start = vcpustate.capture(machine.vcpu)
    seen = []

    def handler(ex):
        try:
            if load == "apply":
                vcpustate.apply(machine.vcpu, start)
            elif load == "capture":
                vcpustate.capture(machine.vcpu)
            else:
                machine.load("pio_out_loop.pm32", n=3)
            seen.append("loaded")
        except StateError as e:
            seen.append(str(e))
        return True                         # run() returns this exit
    machine.vm.default_handler = handler
    machine.vm.set_default(_core.SPACES["PIO"], _core.H_KINDS["PYTHON"])
    ex = machine.run(timeout=10)
    assert isinstance(ex, IoExit) and ex.is_in
    assert len(seen) == 1 and "IO exit unfinished" in seen[0] and "return the exit from run()" in seen[0], seen
    # once run() returned, the same load is complete and the vCPU runs from it
    if load in ("apply", "capture"):
        vcpustate.apply(machine.vcpu, start if load == "apply" else vcpustate.capture(machine.vcpu))
        assert isinstance(machine.run(budget=1, timeout=10), IoExit)
    else:
        machine.vm.default_handler = None
        machine.load("pio_out_loop.pm32", n=3)
        assert outs_of_pio_out_loop(machine, 3) == [layout.PORT_OUT] * 3 + [layout.PORT_DEBUG_EXIT]
    # from the handler of a write, both are allowed (nothing of that exit is left to write back)
    machine.load("pio_out_loop.pm32", n=0)
    seen.clear()
    machine.vm.default_handler = handler
    assert isinstance(machine.run(timeout=10), IoExit)
    assert seen == ["loaded"]


@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
def test_a_state_captured_after_a_read_exit_holds_the_read_done(machine, mode):
    """KVM keeps an exit's unfinished access where user space cannot read it: a state
    captured before it is finished would, applied anywhere, run the IN again (a second
    read of the device).  capture() completes it first, so the state holds the read done:
    a guest of 5 reads makes 5 exits in all, captured and applied after the first."""
    machine.load(f"pio_in_loop.{mode}", n=5)
    ex = machine.run(budget=1, timeout=10)
    assert isinstance(ex, IoExit) and ex.is_in
    ex.value = 1
    saved = vcpustate.capture(machine.vcpu)
    vcpustate.apply(machine.vcpu, saved)
    reads = 1
    while True:
        ex = machine.run(timeout=10)
        if not (isinstance(ex, IoExit) and ex.is_in):
            break
        ex.value = 1
        reads += 1
    assert isinstance(ex, IoExit) and ex.port == layout.PORT_DEBUG_EXIT, ex
    assert reads == 5
