"""The kick queue of a vCPU: user kicks, call_soon() calls and queued interrupts are separate
requests.  Clearing immediate_exit withdraws only a user kick; a call that raises is reported
through its Future and the calls behind it still run; call_soon() returns a
concurrent.futures.Future with the call's result or exception."""
from concurrent.futures import Future

import pytest

import kvmsys
from kvmsys import BudgetExit, KickExit, _core
from kvmsys.guests import get, layout

from test_syscall_abi import spawn

K = _core.H_KINDS


def loop_guest(machine):
    machine.devices()
    layout.prepare(get("pio_out_loop.pm32"), machine.vcpu, machine.mem, n=0)


def test_clearing_immediate_exit_keeps_queued_calls_and_interrupts(machine):
    loop_guest(machine)
    h = machine.vcpu.handle()
    future = h.call_soon(lambda: "ran")
    h.interrupt(0x40)
    machine.vcpu.immediate_exit = 1         # a user kick ...
    machine.vcpu.immediate_exit = 0         # ... withdrawn: only it
    assert machine.vcpu.pending_interrupts == ([0x40], 0)
    assert machine.vcpu.immediate_exit == 1     # the queued call still gets the vCPU out
    ex = machine.run(budget=10, timeout=10)
    assert isinstance(ex, BudgetExit)           # no KickExit: the user kick is gone
    assert future.result(0) == "ran"


def test_clearing_immediate_exit_withdraws_a_user_kick(machine):
    loop_guest(machine)
    machine.vcpu.kick()
    machine.vcpu.immediate_exit = 0
    assert machine.vcpu.immediate_exit == 0
    assert isinstance(machine.run(budget=10, timeout=10), BudgetExit)


def test_call_soon_returns_a_future_with_the_result(machine):
    loop_guest(machine)
    h = machine.vcpu.handle()
    got = []

    def caller():
        f = h.call_soon(lambda a, b: a + b, 2, 3)
        assert isinstance(f, Future)
        got.append(f.result(timeout=10))       # the owner runs it while the guest runs
        h.kick()

    t = spawn(caller)
    ex = machine.run(timeout=20)
    t.finish()
    assert isinstance(ex, KickExit) and got == [5]


def test_a_raising_call_is_reported_and_the_rest_still_run(machine):
    loop_guest(machine)
    h = machine.vcpu.handle()
    order = []

    def boom():
        order.append("boom")
        raise ZeroDivisionError("in a call_soon callback")

    f1 = h.call_soon(order.append, "first")
    f2 = h.call_soon(boom)
    f3 = h.call_soon(order.append, "third")
    ex = machine.run(budget=10, timeout=10)
    assert isinstance(ex, BudgetExit)           # the run went on
    assert order == ["first", "boom", "third"]
    assert f1.result(0) is None and f3.result(0) is None
    with pytest.raises(ZeroDivisionError, match="in a call_soon callback"):
        f2.result(0)
    assert machine.vcpu.pending == []


def test_a_cancelled_call_does_not_run(machine):
    loop_guest(machine)
    h = machine.vcpu.handle()
    ran = []
    f = h.call_soon(ran.append, 1)
    assert f.cancel()
    assert isinstance(machine.run(budget=10, timeout=10), BudgetExit)
    assert ran == [] and f.cancelled()


def test_keyboard_interrupt_in_a_call_keeps_the_rest_queued(machine):
    loop_guest(machine)
    h = machine.vcpu.handle()
    ran = []

    def interrupt():
        raise KeyboardInterrupt

    h.call_soon(interrupt)
    later = h.call_soon(ran.append, "later")
    with pytest.raises(KeyboardInterrupt):
        machine.run(budget=10, timeout=10)
    assert not later.done() and len(machine.vcpu.pending) == 1
    assert isinstance(machine.run(budget=10, timeout=10), BudgetExit)
    assert ran == ["later"] and later.done()


def test_calls_queued_at_removal_are_cancelled(fresh_process_vm):
    kvmsys.add_vcpu()
    f = kvmsys.handle().call_soon(lambda: None)
    kvmsys.remove_vcpu()
    assert f.cancelled()


# --- issue 17, item 5: every Future completes; a kick is consumed only by the run it ends ---

@pytest.mark.parametrize("how", ["close", "vm.close", "renew"])
def test_queued_calls_complete_when_the_vcpu_closes_or_changes_hands(fdvm, how):
    v = fdvm.create_vcpu(0)
    futures = [v.handle().call_soon(lambda: "never") for _ in range(3)]
    if how == "close":
        v.close()
    elif how == "vm.close":
        fdvm.close()
    else:
        v.renew()
    for f in futures:
        assert f.done() and f.cancelled()


def test_a_kick_taken_with_a_call_that_raises_keyboard_interrupt_is_the_next_runs(machine):
    loop_guest(machine)
    h = machine.vcpu.handle()

    def ctrl_c():
        raise KeyboardInterrupt
    h.kick()
    f = h.call_soon(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        machine.run(timeout=10)
    assert f.done()
    assert isinstance(machine.run(timeout=10), KickExit)     # not lost: no deadline
    assert isinstance(machine.run(budget=10, timeout=10), BudgetExit)   # and consumed once
