"""Every deadline and every Ctrl-C, at every point of run() (issue 17, item 7): a nested
run returns at its own deadline also when the outer run's deadline passes during it
(then the outer returns at once after), and a Ctrl-C while run() is still setting up
(the watchdog's timer_create retried on EAGAIN) ends it promptly, for a guest that
never exits."""
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from kvmsys import DeadlineExit, _core
from kvmsys.guests import layout

from test_watchdog import PIO, K, endless, inner, out_then_spin  # noqa: F401 (fixture)


def test_a_nested_run_returns_at_its_own_deadline_past_the_outer_one(machine, inner):
    out_then_spin(machine)
    got = []

    def handler(ex):
        t0 = time.monotonic()
        got.append((type(inner.run(timeout=1.0)).__name__, time.monotonic() - t0))

    machine.vm.add_handler(PIO, layout.PORT_OUT, layout.PORT_OUT + 1, K["PYTHON"], callback=handler)
    backstop = threading.Timer(20, inner.vcpu.kick)     # old code: the inner run never ended
    backstop2 = threading.Timer(21, machine.vcpu.kick)
    backstop.start()
    backstop2.start()
    try:
        t0 = time.monotonic()
        ex = machine.run(timeout=0.5)               # its deadline passes inside the inner run
        elapsed = time.monotonic() - t0
    finally:
        backstop.cancel()
        backstop2.cancel()
    assert got and got[0][0] == "DeadlineExit" and 0.9 <= got[0][1] < 5, got
    assert isinstance(ex, DeadlineExit), ex
    assert elapsed < 5, elapsed


CTRL_C_IN_SETUP = r"""
import os, signal, sys, threading, time
from kvmsys import _core
from kvmsys.machine import Machine
from kvmsys.guests import get, layout
m = Machine(sys.argv[1], memory_size=layout.RAM_SIZE)
m.attach(0)
layout.prepare(get("compute.real"), m.vcpu, m.mem)
m.mem[layout.LOAD_ADDR:layout.LOAD_ADDR + 2] = b"\xeb\xfe"    # never exits
_core._fail_timer_create(10)       # run() retries timer_create for ~1 s before the loop
threading.Timer(0.15, os.kill, (os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    m.run(timeout=20)
    print("returned", time.monotonic() - t0)
except KeyboardInterrupt:
    print("KeyboardInterrupt", time.monotonic() - t0)
_core._fail_timer_create(0)
m.close()
"""


@pytest.mark.timeout(120)
def test_ctrl_c_while_run_sets_up_its_watchdog_ends_it_promptly(abi):
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(CTRL_C_IN_SETUP), abi], capture_output=True,
                       timeout=60, cwd=tempfile.gettempdir())
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    what, took = p.stdout.decode().split()
    assert what == "KeyboardInterrupt" and float(took) < 0.6, (what, took)
