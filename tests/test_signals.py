"""Signals: kvmsys blocks no signal.  Kicks and the watchdog reach KVM_RUN through their
handler setting kvm_run.immediate_exit of the thread's vCPU (no KVM signal mask, as
Firecracker), Ctrl-C through a relay chained in front of SIGINT's handler that does the same,
so neither a kick nor a Ctrl-C that lands between two KVM_RUNs is lost; a thread that blocks
the kick signal itself gets a KVM signal mask that lets it in.  Handlers, fork children and
spawned programs see the thread's own signal mask.  Importing kvmsys installs nothing; the
kick handler and the at-fork/atexit hooks come with the first VM."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kvmsys import BudgetExit, DeadlineExit, KickExit, _core
from kvmsys.enums import Kind, Space
from kvmsys.guests import get, layout

from test_syscall_abi import endless_no_exit, spawn


def endless(machine):
    machine.devices()
    layout.prepare(get("pio_out_loop.pm32"), machine.vcpu, machine.mem, n=0)
    endless_no_exit(machine.mem)


def require_signal_mask(vcpu):
    if vcpu.signal_mask != "kvm":
        pytest.skip(f"host: KVM_SET_SIGNAL_MASK refused here (signal_mask={vcpu.signal_mask!r}); "
                    "kicks fall back to the handler setting immediate_exit")


def test_no_kvm_signal_mask_unless_the_thread_blocks_the_kick_signal(machine):
    endless(machine)
    assert machine.vcpu.signal_mask is None         # not before the first run
    assert isinstance(machine.run(timeout=0.05), DeadlineExit)
    assert machine.vcpu.signal_mask == "handler"    # no KVM_SET_SIGNAL_MASK: no cost per exit
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {_core.kick_signal()})
    try:
        assert isinstance(machine.run(timeout=0.05), DeadlineExit)     # the watchdog still ends it
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    require_signal_mask(machine.vcpu)
    assert isinstance(machine.run(timeout=0.05), DeadlineExit)
    assert machine.vcpu.signal_mask == "handler"    # and taken off again


def test_signal_masks_are_restored_after_run(machine):
    endless(machine)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    machine.run(timeout=0.05)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_kick_reaches_a_thread_that_blocks_the_kick_signal():
    """fd ABI: the running thread blocks the kick signal (as applications that block signals
    in worker threads do); KVM_RUN still lets it in, so the kick and the watchdog work.
    The syscall ABI's variant is the next test."""
    from conftest import Machine
    machine = Machine("fd", layout.RAM_SIZE)
    try:
        endless(machine)
        h = machine.vcpu.handle()
        results = []

        def owner_blocks_and_runs():
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {_core.kick_signal()})
            try:
                t0 = time.monotonic()
                ex = machine.run(timeout=8)
                results.append((type(ex).__name__, time.monotonic() - t0))
                t0 = time.monotonic()
                ex = machine.run(timeout=0.2)           # the watchdog's signal too
                results.append((type(ex).__name__, time.monotonic() - t0))
                assert _core.kick_signal() in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

        t = spawn(owner_blocks_and_runs)
        time.sleep(0.3)
        h.kick()
        t.finish(timeout=30)
        require_signal_mask(machine.vcpu)
        (kind, secs), (kind2, secs2) = results
        assert kind == "KickExit" and secs < 4, results
        assert kind2 == "DeadlineExit" and secs2 < 4, results
    finally:
        machine.close()


def test_sys_abi_kick_with_blocked_signal(fresh_process_vm):
    import kvmsys
    from kvmsys.runner import setup_devices
    results = []
    ready = threading.Event()
    handles = []

    def owner():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {_core.kick_signal()})
        try:
            kvmsys.add_vcpu()
            setup_devices(kvmsys.vm())
            layout.prepare(get("pio_out_loop.pm32"), kvmsys.current(), kvmsys.vm().memory(0), n=0)
            endless_no_exit(kvmsys.vm().memory(0))
            handles.append(kvmsys.handle())
            ready.set()
            t0 = time.monotonic()
            ex = kvmsys.run(timeout=8)
            results.append((type(ex).__name__, time.monotonic() - t0, kvmsys.current().signal_mask))
            kvmsys.remove_vcpu()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    t = spawn(owner)
    assert ready.wait(10)
    time.sleep(0.3)
    handles[0].kick()
    t.finish(timeout=30)
    kind, secs, mask = results[0]
    if mask != "kvm":
        pytest.skip(f"host: KVM_SET_SIGNAL_MASK refused here ({mask})")
    assert kind == "KickExit" and secs < 4, results


class Interrupted(Exception):
    pass


def test_sigint_between_two_kvm_runs_is_not_lost(machine):
    """The Ctrl-C window: a SIGINT that lands after the loop's last look at signals and
    before KVM_RUN, in a guest that never exits again, used to be seen only at the
    timeout.  The relay in front of the SIGINT handler (put back there after
    signal.signal() replaced it) sets immediate_exit, so KVM_RUN returns at once."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("env: needs the main thread")
    endless(machine)
    machine.run(timeout=0.01)

    def on_sigint(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        _core._signal_between_runs(signal.SIGINT)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            machine.run(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        _core._signal_between_runs(0)
        signal.signal(signal.SIGINT, old)
    assert isinstance(machine.run(timeout=0.05), DeadlineExit)      # intact


def test_kick_signal_between_two_kvm_runs_is_not_lost(machine):
    endless(machine)
    machine.run(timeout=0.01)
    h = machine.vcpu.handle()
    h.kick()
    _core._signal_between_runs(_core.kick_signal())     # a late signal of that kick, too
    try:
        assert isinstance(machine.run(timeout=10), KickExit)
        t0 = time.monotonic()
        assert isinstance(machine.run(timeout=0.2), DeadlineExit)  # nothing left over
        assert time.monotonic() - t0 >= 0.15
    finally:
        _core._signal_between_runs(0)


IMPORT_CHECK = r"""
import atexit, ctypes, signal, sys
libc = ctypes.CDLL(None, use_errno=True)

def handler_is_default():      # sigaction(2) itself: signal.getsignal() knows only Python's
    act = ctypes.create_string_buffer(256)
    assert libc.sigaction(signal.SIGRTMIN + 5, None, act) == 0
    return ctypes.c_void_p.from_buffer(act).value is None

n0 = atexit._ncallbacks()
import kvmsys, kvmsys.smp, kvmsys.runner
from kvmsys import _core
print("import", handler_is_default(), _core.kick_handler_installed(), atexit._ncallbacks() - n0)
if sys.argv[1] == "vm":
    kvmsys.Kvm().create_vm()
    print("vm", handler_is_default(), _core.kick_handler_installed(), atexit._ncallbacks() - n0)
"""


@pytest.mark.nokvm
def test_import_installs_no_handler_and_no_hook():
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK, "import"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["import", "True", "False", "0"]


def test_the_first_vm_installs_the_handler_and_hooks():
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK, "vm"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["import True False 0", "vm False True 1"]


OWNED = r"""
import signal, sys
import kvmsys
from kvmsys import _core
from kvmsys.guests import get, layout
from kvmsys.runner import setup_devices
signal.signal(signal.SIGRTMIN + 5, lambda *a: None)       # the application's own use
try:
    kvmsys.Kvm().create_vm()
except kvmsys.ConfigurationError as e:
    print("refused:", e)
kvmsys.set_kick_signal(signal.SIGRTMIN + 7)
vm = kvmsys.Kvm().create_vm()
vm.add_memory(0, 0, layout.RAM_SIZE)
setup_devices(vm)
v = vm.create_vcpu(0)
layout.prepare(get("pio_out_loop.pm32"), v, vm.memory(0), n=0)
vm.memory(0)[layout.LOAD_ADDR:layout.LOAD_ADDR + 2] = b"\xEB\xFE"
print("kick signal", _core.kick_signal() - signal.SIGRTMIN, type(v.run(timeout=0.2)).__name__)
v.kick()
print(type(v.run(timeout=5)).__name__)
try:
    kvmsys.set_kick_signal(signal.SIGRTMIN + 8)
except kvmsys.ConfigurationError as e:
    print("late:", e)
"""


def test_an_application_that_owns_the_kick_signal_gets_a_clear_error():
    out = subprocess.run([sys.executable, "-c", OWNED], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused:") and "SIGRTMIN+5" in lines[0] and "set_kick_signal" in lines[0]
    assert lines[1:3] == ["kick signal 7 DeadlineExit", "KickExit"]
    assert lines[3].startswith("late:") and "SIGRTMIN+7" in lines[3]


@pytest.mark.nokvm
def test_set_kick_signal_checks_its_argument():
    from kvmsys import InvalidArgumentError
    with pytest.raises(InvalidArgumentError):
        _core.set_kick_signal(signal.SIGINT)
    with pytest.raises(InvalidArgumentError):
        _core.set_kick_signal("34")


# --- the signal mask a program sees is its own ---------------------------------------------------
# run() changes no thread's signal mask: an exit handler sees the mask the thread had, its own
# changes stay after run() returns, and a child it forks or a program it starts gets that mask
# (before, run() held SIGINT and the kick signal blocked for its whole call).

def mask_now():
    return signal.pthread_sigmask(signal.SIG_BLOCK, [])


def with_handler(machine, callback):
    """pio_out_loop (pm32) with a Python handler on its port: exits reach *callback*
    inside run()."""
    machine.devices().load("pio_out_loop.pm32", n=0)
    machine.vm.add_handler(Space.PIO, layout.PORT_OUT, layout.PORT_OUT + 1, Kind.PYTHON, callback=callback)


def test_a_handler_sees_the_threads_own_mask(machine):
    seen = []
    with_handler(machine, lambda ex: seen.append(mask_now()))
    before = mask_now()
    assert isinstance(machine.run(budget=3, timeout=10), BudgetExit)
    assert seen and all(m == before for m in seen), (before, seen)


@pytest.mark.parametrize("change", ["block", "unblock"])
def test_a_handlers_own_mask_change_is_kept(machine, change):
    sig = signal.SIGUSR2
    how = signal.SIG_BLOCK if change == "block" else signal.SIG_UNBLOCK
    old = signal.pthread_sigmask(signal.SIG_UNBLOCK if change == "block" else signal.SIG_BLOCK, {sig})
    try:
        with_handler(machine, lambda ex: signal.pthread_sigmask(how, {sig}) and None)
        assert isinstance(machine.run(budget=3, timeout=10), BudgetExit)
        assert (sig in mask_now()) == (change == "block")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_a_child_forked_in_a_handler_has_the_parents_mask_and_takes_ctrl_c(machine):
    """The child reports its mask, then sends itself SIGINT: Python's handler must raise
    KeyboardInterrupt there (exit 7); a blocked SIGINT stays pending (exit 3)."""
    r, w = os.pipe()
    children = []

    def fork_once(ex):
        if children:
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.write(w, repr(sorted(mask_now())).encode())
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)
                    code = 3
                except KeyboardInterrupt:
                    code = 7
            finally:
                os._exit(code)
        children.append(pid)

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("env: SIGINT is not Python's default KeyboardInterrupt handler here")
    with_handler(machine, fork_once)
    before = mask_now()
    try:
        assert isinstance(machine.run(budget=3, timeout=10), BudgetExit)
        os.close(w)
        w = -1
        reported = os.read(r, 4096).decode()
        _, status = os.waitpid(children[0], 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert reported == repr(sorted(before))
    assert os.waitstatus_to_exitcode(status) == 7


def test_a_program_started_from_a_handler_gets_the_threads_mask(machine):
    seen = []

    def spawn_once(ex):
        if not seen:
            out = subprocess.run(["grep", "^SigBlk", "/proc/self/status"], capture_output=True,
                                 text=True, timeout=30)
            seen.append(int(out.stdout.split()[1], 16))

    with_handler(machine, spawn_once)
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        before = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk"))
    assert isinstance(machine.run(budget=3, timeout=10), BudgetExit)
    assert seen == [before], (hex(before), [hex(x) for x in seen])


CTRL_C_WHILE_A_HANDLER_WAITS = textwrap.dedent(r"""
    import signal, subprocess, sys
    # as a terminal's foreground program has it (a shell's background job starts with SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from kvmsys.enums import Kind, Space
    from kvmsys.guests import layout
    from kvmsys.machine import Machine
    m = Machine(sys.argv[1])
    m.attach()
    m.devices().load("pio_out_loop.pm32", n=0)
    children = []

    def handler(ex):
        p = subprocess.Popen(["sleep", "60"])
        children.append(p)
        print("waiting", flush=True)
        p.wait()

    m.vm.add_handler(Space.PIO, layout.PORT_OUT, layout.PORT_OUT + 1, Kind.PYTHON, callback=handler)
    try:
        m.run(budget=2, timeout=120)
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        children[0].wait(timeout=30)        # a sleep that did not get the SIGINT: TimeoutExpired
        print("interrupted", flush=True)
""")


def test_ctrl_c_ends_a_program_started_from_a_handler_and_the_run(abi):
    """As a terminal's Ctrl-C: SIGINT to the process group while a handler waits for the
    program it started.  Both must end (the program by SIGINT, the run by KeyboardInterrupt),
    long before the program's 60 s.  (Not its exit status: when the KeyboardInterrupt comes
    just after waitpid() reaped it, CPython's Popen loses the status and reports 0.)"""
    p = subprocess.Popen([sys.executable, "-c", CTRL_C_WHILE_A_HANDLER_WAITS, abi], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "waiting"
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=40)
        seconds = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert out.strip() == "interrupted", (out, err)
    assert seconds < 20, seconds


def test_a_sigint_a_vcpu_thread_takes_ends_the_main_threads_run_not_its_own(machine):
    """A SIGINT that lands on another vCPU thread in KVM_RUN: its relay raises Python's flag
    and kicks the main thread, whose run raises KeyboardInterrupt at once (a guest that never
    exits); the other thread's run goes on to its own deadline (before, vCPU threads held
    SIGINT blocked, and the main thread's run went on to its deadline)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("env: needs the main thread")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("env: SIGINT is not Python's default KeyboardInterrupt handler here")
    endless(machine)
    ready, out = threading.Event(), []

    def worker():
        v = machine.attach(1)
        try:
            layout.prepare(get("pio_out_loop.pm32"), v, machine.mem, n=0)
            endless_no_exit(machine.mem)
            ready.set()
            t0 = time.monotonic()
            out.append((type(machine.runner(v)(timeout=3)).__name__, time.monotonic() - t0))
        finally:
            machine.detach(v)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert ready.wait(20)
        fire = threading.Timer(0.5, lambda: signal.pthread_kill(t.ident, signal.SIGINT))
        t0 = time.monotonic()
        fire.start()
        with pytest.raises(KeyboardInterrupt):
            machine.run(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        t.join(30)
    assert elapsed < 5, elapsed
    assert out and out[0][0] == "DeadlineExit", out
