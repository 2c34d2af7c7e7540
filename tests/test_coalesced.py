"""Coalesced MMIO/PIO zones: the run loop drains the ring at every exit, each write through
the handler of its range in order, before the exit that found them: a SINK appends, an EXIT
(isa-debug-exit) stops the run, a PYTHON range gets a CoalescedExit per write.  Entries still
in the ring when a zone is unregistered are delivered all the same; unregistering a zone that
is not registered is an error."""
import pytest

from kvmsys import CoalescedExit, DeadlineExit, InvalidArgumentError, StopExit, _core
from kvmsys.guests import exit_status, layout

from test_runloop import DEBUGCON, JMP_SELF, MODES, STOP, T, load_code, out_imm

PIO = _core.SPACES["PIO"]
K = _core.H_KINDS
PORT = layout.PORT_OUT


@pytest.mark.parametrize("mode", MODES)
def test_isa_debug_exit_through_a_zone_stops_the_run(machine, mode):
    code = (out_imm(DEBUGCON, ord("a")) + out_imm(DEBUGCON, ord("b"))
            + out_imm(layout.PORT_DEBUG_EXIT, 0x10) + out_imm(DEBUGCON, ord("c"))
            + out_imm(PORT, 0)          # an exit (ignored in C): the ring is drained here
            + JMP_SELF)
    load_code(machine, mode, code)
    machine.devices()
    machine.vm.register_coalesced(DEBUGCON, 1, pio=True)
    machine.vm.register_coalesced(layout.PORT_DEBUG_EXIT, 1, pio=True)
    ex = machine.run(timeout=T)
    assert isinstance(ex, StopExit) and ex.status == exit_status(0x10), ex
    assert machine.vm.console() == b"ab"        # in order: 'c' came after the stop
    # running on delivers the rest, then the exit that drained them
    assert isinstance(machine.run(timeout=0.2), DeadlineExit)
    assert machine.vm.console() == b"abc"
    assert machine.vm.port_counts() == {PORT: 1}


@pytest.mark.parametrize("mode", MODES)
def test_a_python_range_behind_a_zone_gets_its_writes_in_order(machine, mode):
    code = (out_imm(PORT, 1) + out_imm(PORT, 2) + out_imm(DEBUGCON, ord("x")) + out_imm(PORT, 3)
            + STOP)
    load_code(machine, mode, code)
    machine.devices()
    seen = []

    def on_write(ex):
        assert isinstance(ex, CoalescedExit) and ex.port == ex.address == PORT
        assert ex.is_write and ex.direction == "out" and ex.size == 1 and ex.name == "IO"
        seen.append((ex.value, machine.vm.console()))

    idx = machine.vm.add_handler(PIO, PORT, PORT + 1, K["PYTHON"], callback=on_write)
    machine.vm.register_coalesced(PORT, 1, pio=True)
    machine.vm.register_coalesced(DEBUGCON, 1, pio=True)
    ex = machine.run(timeout=T)
    assert isinstance(ex, StopExit) and ex.status == 1
    assert seen == [(1, b""), (2, b""), (3, b"x")]
    st = machine.vcpu.stats()
    assert st["coalesced"] == 4 and st["handler_hits"][idx] == 3
    assert st["exits"] == {"IO": 1}             # only the stop exited
    assert machine.vm.coalesced_unhandled == 0


def test_writes_in_the_ring_survive_unregistering_the_zone(machine):
    load_code(machine, "real", b"".join(out_imm(PORT, v) for v in (1, 2, 3)) + out_imm(0x80, 0) + STOP)
    machine.devices()
    machine.vm.add_handler(PIO, PORT, PORT + 1, K["PYTHON"])   # no callback: run() returns them
    machine.vm.register_coalesced(PORT, 1, pio=True)
    ex = machine.run(timeout=T)
    assert isinstance(ex, CoalescedExit) and ex.value == 1
    machine.vm.register_coalesced(PORT, 1, pio=True, unregister=True)  # 2 and 3 are in the ring
    got = [machine.run(timeout=T) for _ in range(3)]
    assert [type(e).__name__ for e in got] == ["CoalescedExit", "CoalescedExit", "StopExit"]
    assert [got[0].value, got[1].value] == [2, 3]
    assert machine.vm.port_counts() == {0x80: 1}    # the exit that drained them came after


def test_unregistering_a_zone_that_is_not_registered_is_an_error(machine):
    vm = machine.vm
    with pytest.raises(InvalidArgumentError, match="no coalesced PIO zone"):
        vm.register_coalesced(DEBUGCON, 1, pio=True, unregister=True)
    vm.register_coalesced(DEBUGCON, 1, pio=True)
    with pytest.raises(InvalidArgumentError):
        vm.register_coalesced(DEBUGCON, 2, pio=True, unregister=True)      # not that zone
    with pytest.raises(InvalidArgumentError):
        vm.register_coalesced(DEBUGCON, 1, unregister=True)                # MMIO, not PIO
    vm.register_coalesced(DEBUGCON, 1, pio=True, unregister=True)
    with pytest.raises(InvalidArgumentError):
        vm.register_coalesced(DEBUGCON, 1, pio=True, unregister=True)      # twice
    # the count never went negative: a zone registered now is drained as ever
    load_code(machine, "real", out_imm(DEBUGCON, ord("z")) + STOP)
    machine.devices()
    vm.register_coalesced(DEBUGCON, 1, pio=True)
    assert isinstance(machine.run(timeout=T), StopExit)
    assert vm.console() == b"z" and machine.vcpu.stats()["coalesced"] == 1
