"""A fork child never goes on with the parent's run (issue 17, item 8): a child forked in
an exit handler (or a call_soon callback, or a signal handler) that then returns gets
StateError from run(), over both ABIs, also when another thread's kick held the
vCPU's lock at the fork (the child would wait for that lock for ever)."""
import os
import threading
import time

import pytest

from kvmsys import _core
from kvmsys.guests import get, layout as L

PORT = 0x10
LOOP = b"\xB0\x01\xE6" + bytes([PORT]) + b"\xEB\xFA"      # 1: mov al, 1; out PORT, al; jmp 1b


def run_forking(machine, fork_in, kick_held=False):
    """Run the guest; fork in *fork_in*('handler' or 'call_soon'); the child's outcome."""
    v = machine.vcpu
    L.prepare(get("compute.pm32"), v, machine.mem)
    machine.mem[L.LOAD_ADDR:L.LOAD_ADDR + len(LOOP)] = LOOP
    parent = os.getpid()
    r, w = os.pipe()
    state = dict(child=None)
    handle = v.handle()
    kicker = None

    def fork_now():
        nonlocal kicker
        if kick_held:
            # another thread inside a kick, holding the vCPU's lock, at the fork: one that
            # lets the GIL go while it kicks (handle.kick() keeps it, so the fork would wait)
            _core._delay_kick(0.6)
            kicker = threading.Thread(target=setattr, args=(v, "immediate_exit", 1))
            kicker.start()
            time.sleep(0.2)
        pid = os.fork()
        if pid == 0:
            return False            # the child: the run goes on (it must not)
        state["child"] = pid
        handle.kick()               # the parent's run ends here (a call_soon result does not stop it)
        return True

    if fork_in == "handler":
        machine.vm.add_handler(0, PORT, PORT + 1, _core.H_KINDS["PYTHON"],
                               callback=lambda ex: fork_now())
    else:
        machine.vm.add_handler(0, PORT, PORT + 1, _core.H_KINDS["IGNORE"])
        threading.Timer(0.05, handle.call_soon, (fork_now,)).start()
    try:
        try:
            ex = machine.run(timeout=5)
            outcome = f"returned {ex.name}"
        except BaseException as e:
            outcome = f"{type(e).__name__}: {e}"
        if os.getpid() != parent:
            os.write(w, outcome.encode())
            os._exit(0)
    finally:
        if os.getpid() != parent:
            os._exit(1)
        _core._delay_kick(0)
    os.close(w)
    if kicker is not None:
        kicker.join()
    assert state["child"], outcome
    deadline = time.monotonic() + 15
    while True:
        done, status = os.waitpid(state["child"], os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(state["child"], 9)
            os.waitpid(state["child"], 0)
            os.close(r)
            return "hung"
        time.sleep(0.01)
    got = os.read(r, 4096).decode()
    os.close(r)
    return got


@pytest.mark.parametrize("kick_held", [False, True], ids=["plain", "kick-held-the-lock"])
def test_a_child_forked_in_a_handler_gets_state_error(machine, kick_held):
    got = run_forking(machine, "handler", kick_held)
    assert got.startswith("StateError") and "fork child" in got, got


def test_a_child_forked_in_a_call_soon_callback_gets_state_error(machine):
    got = run_forking(machine, "call_soon")
    assert got.startswith("StateError") and "fork child" in got, got
