"""The watchdog (run(timeout=...)): one timer per thread armed at the deadline of the
innermost run the thread is inside, the outer run's armed again when it returns;
timer_create failing (EAGAIN on some hosts for ~0.5 s after a process that ran a VM exits)
is retried, then a helper thread stands in for the timer: a run is never aborted for it."""
import subprocess
import sys
import threading
import time

import pytest

from kvmsys import DeadlineExit, KickExit, StopExit, _core
from kvmsys.guests import get, layout

from test_syscall_abi import endless_no_exit, spawn

PIO = _core.SPACES["PIO"]
K = _core.H_KINDS


def endless(machine):
    machine.devices()
    layout.prepare(get("pio_out_loop.real"), machine.vcpu, machine.mem, n=0)
    endless_no_exit(machine.mem)


@pytest.fixture
def inner():
    """A second vCPU (fd ABI, its own VM) that never exits."""
    from conftest import Machine
    m = Machine("fd", layout.RAM_SIZE)
    endless(m)
    yield m
    m.close()


def out_then_spin(machine):
    # real mode: `out %al, $0x10` (an exit for a Python handler), then `jmp .` forever
    machine.devices()
    layout.prepare(get("pio_out_loop.real"), machine.vcpu, machine.mem, n=0)
    machine.mem[layout.LOAD_ADDR:layout.LOAD_ADDR + 4] = b"\xE6\x10\xEB\xFE"


@pytest.mark.parametrize("inner_timeout", [0.1, 30])
def test_a_nested_run_keeps_the_outer_deadline(machine, inner, inner_timeout):
    """A handler of the outer run runs another vCPU with its own timeout: shorter (its
    watchdog fires first, then the outer one must still fire) or longer (the outer
    deadline comes first: the inner run goes on past it; the outer returns at once after)."""
    out_then_spin(machine)
    inner_results = []

    def handler(ex):
        t0 = time.monotonic()
        if inner_timeout > 1:
            threading.Timer(0.5, inner.vcpu.kick).start()   # end the inner run
        inner_results.append((type(inner.run(timeout=inner_timeout)).__name__, time.monotonic() - t0))

    machine.vm.add_handler(PIO, layout.PORT_OUT, layout.PORT_OUT + 1, K["PYTHON"], callback=handler)
    backstop = threading.Timer(15, machine.vcpu.kick)     # old code: the outer watchdog was gone
    backstop.start()
    try:
        t0 = time.monotonic()
        ex = machine.run(timeout=1.0)
        elapsed = time.monotonic() - t0
    finally:
        backstop.cancel()
    expected_inner = "DeadlineExit" if inner_timeout < 1 else "KickExit"
    assert [r[0] for r in inner_results] == [expected_inner]
    assert isinstance(ex, DeadlineExit), ex
    assert elapsed < 5, elapsed


def test_timer_create_eagain_is_retried(abi):
    from conftest import Machine
    results = []

    def in_a_new_thread():          # the timer is made once per thread: a new one makes one
        m = Machine(abi, layout.RAM_SIZE)
        try:
            endless(m)
            _core._fail_timer_create(3)
            ex = m.run(timeout=0.2)
            results.append((type(ex).__name__, _core.watchdog_uses_thread()))
        finally:
            _core._fail_timer_create(0)
            m.close()

    spawn(in_a_new_thread).finish()
    assert results == [("DeadlineExit", False)]


@pytest.mark.parametrize("nested", [False, True])
def test_timer_create_failing_for_good_falls_back_to_a_thread(abi, inner, nested):
    """Every timer_create fails: the watchdog is a helper thread, and it works as the timer
    does (also for nested deadlines)."""
    from conftest import Machine
    results = []

    def in_a_new_thread():
        m = Machine(abi, layout.RAM_SIZE)
        try:
            _core._fail_timer_create(10 ** 6)
            if nested:
                out_then_spin(m)
                m.vm.add_handler(PIO, layout.PORT_OUT, layout.PORT_OUT + 1, K["PYTHON"],
                                 callback=lambda ex: results.append(type(inner.run(timeout=0.1)).__name__))
            else:
                endless(m)
            t0 = time.monotonic()
            ex = m.run(timeout=0.5)
            results.append((type(ex).__name__, _core.watchdog_uses_thread(), time.monotonic() - t0 >= 0.45))
        finally:
            _core._fail_timer_create(0)
            m.close()

    spawn(in_a_new_thread).finish()
    assert results[-1] == ("DeadlineExit", True, True)
    if nested:
        assert results[0] == "DeadlineExit"


VM_RUN = r"""
from kvmsys import Kvm
from kvmsys.guests import get, layout
from kvmsys.runner import setup_devices
vm = Kvm().create_vm()
vm.add_memory(0, 0, layout.RAM_SIZE)
setup_devices(vm)
v = vm.create_vcpu(0)
layout.prepare(get("pio_out_loop.pm32"), v, vm.memory(0), n=0)
vm.memory(0)[layout.LOAD_ADDR:layout.LOAD_ADDR + 2] = b"\xEB\xFE"
print(type(v.run(timeout=0.05)).__name__)
"""


def test_back_to_back_processes_never_lose_the_watchdog():
    """Where timer_create fails for a while after a process that ran a VM exits, each of
    these processes starts right after the last one ran a VM."""
    for i in range(12):
        out = subprocess.run([sys.executable, "-c", VM_RUN], capture_output=True, text=True,
                             timeout=60)
        assert (out.returncode, out.stdout.strip()) == (0, "DeadlineExit"), (i, out.stderr[-2000:])
