"""The syscall-style ABI: vCPUs bound to threads, one implicit VM per process,
handles that other threads hold (kick, interrupt, call_soon), recycling of
kernel vCPUs, thread exit and fork.  Where a behaviour also exists in the fd
ABI (handles of fd vCPUs) the test runs over both through the `machine` fixture.
"""
import gc
from collections import Counter
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

import kvmsys
from kvmsys import (BudgetExit, ConfigurationError, DeadlineExit, HltExit, IntrExit, IoExit,
                    KickExit, StaleVcpuError, StateError, StopExit, VcpuBindingError, _core, syscall)
from kvmsys.enums import Kind, Space
from kvmsys.guests import exit_status, get, layout
from kvmsys.machine import Machine
from kvmsys.runner import setup_devices

from conftest import fork_child, fork_result

PIO = Space.PIO
KICK_SIGNAL = _core.kick_signal()
HELLO = b"Hello, world!\n"

# kvm_run layout (linux/kvm.h): immediate_exit at 1, exit_reason (u32) at 8,
# the io member of the exit union at 32: direction u8, size u8, port u16, count u32, data_offset u64.
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IO = 32
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5


# --- helpers ---------------------------------------------------------------------------------

class Worker(threading.Thread):
    """A thread whose exception (or assertion failure) is re-raised by finish()."""

    def __init__(self, fn, *args, name=None):
        super().__init__(daemon=True, name=name)
        self.fn, self.args = fn, args
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:      # handed to the test thread
            self.error = e

    def finish(self, timeout=30.0):
        self.join(timeout)
        assert not self.is_alive(), f"thread {self.name} hung"
        if self.error is not None:
            raise self.error
        return self.result


def spawn(fn, *args, **kw):
    w = Worker(fn, *args, **kw)
    w.start()
    return w


def wait_gone(thread):
    """Wait until the OS thread is really gone (join() returns a little before), so glibc has
    taken back its stack and malloc arena and the next thread reuses them."""
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/self/task/{thread.native_id}"):
        assert time.monotonic() < deadline, "thread did not exit"
        time.sleep(0.0001)


def wait_until(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


@pytest.fixture
def fresh(fresh_process_vm):
    """No process VM and no binding: the next add_vcpu()/vm() creates the VM (2 MiB, no PC ports)."""
    yield


def devices_vm():
    """The process VM with the runner's devices (PIO default ignore, HLT re-enters)."""
    vm = kvmsys.vm()
    setup_devices(vm)
    return vm


def prepare(vcpu, mem, name, **inputs):
    layout.prepare(get(name), vcpu, mem, **inputs)


def endless_no_exit(mem):
    # `jmp .` at the entry of a prepared pm32/real guest: KVM_RUN never returns by itself
    mem[layout.LOAD_ADDR:layout.LOAD_ADDR + 2] = b"\xEB\xFE"


def irq_guest(mem, vcpu):
    """Real mode: `sti; 1: out %al,$0x10; jmp 1b` with IVT handlers for vectors 0x40 and 0x41
    that write their vector to port 0x12 (then iret).  NMI goes to the shared exception stub
    (isa-debug-exit with 0x82)."""
    layout.prepare(get("pio_out_loop.real"), vcpu, mem, n=0)
    main = bytes([0xFB, 0xE6, 0x10, 0xEB, 0xFC])
    mem[layout.LOAD_ADDR:layout.LOAD_ADDR + len(main)] = main
    for vector, at in ((0x40, 0xC100), (0x41, 0xC110)):
        handler = bytes([0xB0, vector, 0xE6, 0x12, 0xCF])     # mov al,vector; out 0x12,al; iret
        mem[at:at + len(handler)] = handler
        mem[4 * vector:4 * vector + 4] = struct.pack("<HH", at, 0)


def state_of(vcpu):
    return dict(regs=vcpu.get_regs(), sregs=vcpu.get_sregs(), fpu=vcpu.get_fpu(),
                debugregs=vcpu.get_debugregs(), mp_state=vcpu.get_mp_state(),
                events=vcpu.get_vcpu_events(), xcrs=vcpu.get_xcrs(), xsave=vcpu.get_xsave())




def end_generation(machine):
    """End the vCPU's life the ABI's way: close (fd) or remove_vcpu (sys)."""
    if machine.abi == "fd":
        machine.vcpu.close()
    else:
        kvmsys.remove_vcpu()


def assert_stale(h):
    assert not h.alive
    with pytest.raises(StaleVcpuError):
        h.kick()
    with pytest.raises(StaleVcpuError):
        h.interrupt(0x40)
    with pytest.raises(StaleVcpuError):
        h.nmi()
    with pytest.raises(StaleVcpuError):
        h.call_soon(lambda: None)
    with pytest.raises(StaleVcpuError):
        h.stats()


# --- binding rules ---------------------------------------------------------------------------

def test_second_add_vcpu_in_the_same_thread_is_refused(fresh):
    kvmsys.add_vcpu()
    first = kvmsys.current()
    kernel_ids = set(kvmsys.vm().vcpu_ids)
    with pytest.raises(VcpuBindingError) as e:
        kvmsys.add_vcpu()
    assert "remove_vcpu()" in str(e.value) and "one vCPU per thread" in str(e.value)
    # nothing changed: same vCPU bound, no kernel vCPU created
    assert kvmsys.current() is first
    assert kvmsys.vm().vcpu_ids == kernel_ids
    assert kvmsys.vcpus() == {first.id: first}
    kvmsys.remove_vcpu()
    kvmsys.add_vcpu()           # allowed again once the thread has none
    assert kvmsys.current() is not None


@pytest.mark.parametrize("op", ["run", "remove_vcpu", "handle"])
def test_calls_that_need_the_threads_vcpu_are_refused_without_one(fresh, op):
    kvmsys.add_vcpu()           # the test thread has one; a new thread has none
    mine = kvmsys.current()

    def elsewhere():
        assert kvmsys.current() is None
        with pytest.raises(VcpuBindingError, match=r"add_vcpu\(\)"):
            getattr(kvmsys, op)()

    spawn(elsewhere).finish()
    assert kvmsys.current() is mine and kvmsys.vcpus() == {mine.id: mine}
    kvmsys.remove_vcpu()
    with pytest.raises(VcpuBindingError, match=r"add_vcpu\(\)"):
        getattr(kvmsys, op)()


def test_threads_share_one_implicit_vm(fresh):
    n = 4
    bound = threading.Barrier(n + 1)
    release = threading.Event()
    seen = {}

    def worker(i):
        kvmsys.add_vcpu()
        v = kvmsys.current()
        seen[i] = (kvmsys.vm(), v, v.vm)
        bound.wait(10)
        release.wait(10)
        if i % 2:
            kvmsys.remove_vcpu()    # the others are released by thread exit

    threads = [spawn(worker, i) for i in range(n)]
    try:
        bound.wait(10)
        check_while_bound(n, seen)
    finally:
        release.set()
        for t in threads:
            t.join(10)
    for t in threads:
        t.finish()
    vm = kvmsys.vm()
    assert kvmsys.vcpus() == {}
    kvmsys.destroy_vm()
    assert vm.closed
    kvmsys.configure(memory_size=4 << 20)           # allowed again without a VM
    kvmsys.add_vcpu()
    assert kvmsys.vm() is not vm and len(kvmsys.vm().memory(0)) == 4 << 20
    assert kvmsys.current().id == 0


def check_while_bound(n, seen):
    vm = kvmsys.vm()
    assert len(vm.memory(0)) == layout.RAM_SIZE     # created with the configuration
    assert all(pvm is vm and v.vm is vm for pvm, v, _ in seen.values())
    vcpus = [v for _, v, _ in seen.values()]
    assert sorted(v.id for v in vcpus) == list(range(n))
    assert kvmsys.vcpus() == {v.id: v for v in vcpus}
    assert kvmsys.current() is None                 # the test thread has none
    with pytest.raises(ConfigurationError, match=r"destroy_vm\(\)"):
        kvmsys.configure(memory_size=4 << 20)
    assert syscall.config()["memory_size"] == layout.RAM_SIZE
    with pytest.raises(VcpuBindingError):
        kvmsys.destroy_vm()
    assert not vm.closed and kvmsys.vm() is vm


def test_current_and_the_comm_area(fresh):
    assert kvmsys.current() is None
    comm = kvmsys.add_vcpu()
    v = kvmsys.current()
    assert isinstance(v, syscall.ThreadVcpu) and v.vm is kvmsys.vm()
    assert spawn(kvmsys.current).finish() is None   # bound to this thread only
    assert isinstance(comm, memoryview) and not comm.readonly
    assert len(comm) == kvmsys.vm().mmap_size
    # zero-copy: the same bytes the vCPU object sees
    comm[RUN_IMMEDIATE_EXIT] = 1
    assert v.immediate_exit == 1
    v.immediate_exit = 0
    assert comm[RUN_IMMEDIATE_EXIT] == 0

    mem = kvmsys.vm().memory(0)
    prepare(v, mem, "pio_out_loop.pm32", n=3)       # no devices: the out returns to Python
    ex = kvmsys.run(timeout=10)
    assert isinstance(ex, IoExit) and ex.reason == KVM_EXIT_IO
    assert struct.unpack_from("<I", comm, RUN_EXIT_REASON)[0] == ex.reason
    direction, size, port, count, offset = struct.unpack_from("<BBHIQ", comm, RUN_IO)
    assert (direction, size, port, count) == (1, 1, layout.PORT_OUT, 1)
    assert comm[offset] == ex.data[0] == 1          # low byte of the guest's counter

    prepare(v, mem, "hlt_loop.pm32", n=3)
    ex = kvmsys.run(timeout=10)
    assert isinstance(ex, HltExit)
    assert struct.unpack_from("<I", comm, RUN_EXIT_REASON)[0] == ex.reason == KVM_EXIT_HLT
    kvmsys.remove_vcpu()
    assert kvmsys.current() is None


# --- release at thread exit, recycling ---------------------------------------------------------

def test_thread_exit_releases_everything(fresh, monkeypatch):
    proc = psutil.Process()
    vm = devices_vm()
    kvmsys.add_vcpu()                   # a guest to run, set up once; threads copy its registers
    prepare(kvmsys.current(), vm.memory(0), "pio_out_loop.pm32", n=0)
    regs, sregs = kvmsys.current().get_regs(), kvmsys.current().get_sregs()
    kvmsys.remove_vcpu()
    raised = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_type))
    ids = []

    class Boom(Exception):
        pass

    def worker(fail):
        kvmsys.add_vcpu()
        v = kvmsys.current()
        ids.append(v.id)
        v.set_sregs(sregs)
        v.set_regs(regs)
        # a run arms this thread's watchdog timer and makes it the vCPU's thread
        assert isinstance(kvmsys.run(budget=1, timeout=5), BudgetExit)
        if fail:
            raise Boom()

    def one(fail):
        t = threading.Thread(target=worker, args=(fail,))
        t.start()
        t.join(10)
        assert not t.is_alive()
        wait_gone(t)

    def resources():
        with open("/proc/self/timers") as f:
            timers = f.read().count("ID:")
        paths = sorted(m.path for m in proc.memory_maps(grouped=False))
        return proc.num_fds(), timers, paths

    one(False)                  # warm-up: the pooled kernel vCPU, a cached stack, an arena
    one(True)
    gc.collect()                # earlier tests' garbage may hold old comm areas (one map each)
    baseline = resources()
    ids.clear()
    raised.clear()
    for i in range(1000):
        one(i % 2 == 1)
    assert raised == [Boom] * 500
    assert ids == [0] * 1000    # one after another: each got the recycled id 0
    assert kvmsys.vcpus() == {}
    assert kvmsys.vm().vcpu_ids == {0}      # one kernel vCPU in all
    gc.collect()                # as before the baseline: a failed worker's traceback cycle
                                # keeps its stale vCPU object, and that its revoked comm area
    fds, timers, paths = resources()
    assert fds == baseline[0]
    assert timers == baseline[1]
    assert paths == baseline[2], (Counter(paths) - Counter(baseline[2]), Counter(baseline[2]) - Counter(paths))


MSR_SYSENTER_CS, MSR_SYSENTER_EIP = 0x174, 0x176      # architectural MSRs every KVM saves


def test_recycled_vcpu_looks_fresh(fresh):
    vm = devices_vm()
    mem = vm.memory(0)
    kvm = kvmsys.Kvm()
    ref_vm = kvm.create_vm()
    ref = ref_vm.create_vcpu(0)         # a fresh vCPU of a fresh fd-ABI VM
    called = []

    def first_owner():
        kvmsys.add_vcpu()
        v = kvmsys.current()
        initial = state_of(v)
        prepare(v, mem, "pio_out_loop.pm32", n=50)
        assert isinstance(kvmsys.run(timeout=10), StopExit)
        v.regs.rax = 0x1234_5678        # unsent comm-area write
        fpu = v.get_fpu()
        fpu["fcw"] = 0x027F
        v.set_fpu(fpu)
        v.set_debugregs(dict(v.get_debugregs(), db=[0x1000, 0, 0, 0], dr7=0x401))
        assert v.set_msrs({MSR_SYSENTER_CS: 0x10, MSR_SYSENTER_EIP: 0xC0DE}) == 2
        initial["msrs"] = v.get_msrs([MSR_SYSENTER_CS, MSR_SYSENTER_EIP])
        h = kvmsys.handle()
        h.kick()                        # must not leak into the next owner
        h.call_soon(called.append, "stale call")
        h.interrupt(0x40)
        assert v.stats()["total_exits"] > 50
        return v.id, initial

    vid, initial = spawn(first_owner).finish()
    assert initial["regs"] == ref.get_regs() and initial["sregs"] == ref.get_sregs()

    kvmsys.add_vcpu()
    v = kvmsys.current()
    assert v.id == vid
    now = state_of(v)
    assert now["regs"] == ref.get_regs() == initial["regs"]
    assert now["sregs"] == ref.get_sregs() == initial["sregs"]
    for key in ("fpu", "debugregs", "mp_state", "events", "xcrs", "xsave"):
        assert now[key] == initial[key], key
    assert v.regs.rax == 0 and v.regs.rip == initial["regs"]["rip"]
    # MSRs are state too: back to a fresh vCPU's values, not the last owner's
    fresh_msrs = ref.get_msrs([MSR_SYSENTER_CS, MSR_SYSENTER_EIP])
    assert v.get_msrs([MSR_SYSENTER_CS, MSR_SYSENTER_EIP]) == fresh_msrs != initial["msrs"]
    stats = v.stats()
    assert stats["exits"] == {} and stats["total_exits"] == 0 and stats["runs"] == 0
    assert stats["default_hits"] == 0 and stats["handler_hits"] == {}
    assert v.pending == [] and v.immediate_exit == 0
    prepare(v, mem, "pio_out_loop.pm32", n=5)
    ex = kvmsys.run(timeout=10)
    assert isinstance(ex, StopExit) and ex.status == exit_status(0)     # no leftover kick
    assert called == []
    assert v.stats()["exits"] == {"IO": 6}
    ref_vm.close()
    kvm.close()


def test_process_exit_with_a_bound_vcpu_is_silent():
    code = "import kvmsys\nkvmsys.configure(memory_size=1 << 20)\nkvmsys.add_vcpu()\nkvmsys.run(budget=1, timeout=5)\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                       cwd=tempfile.gettempdir())     # not the source tree: import the installed package
    assert p.returncode == 0
    assert p.stderr == b""


# --- fork -----------------------------------------------------------------------------------

def test_fork_child_starts_without_vcpu_and_gets_a_fresh_vm(fresh):
    parent_vm = devices_vm()
    mem = parent_vm.memory(0)
    kvmsys.add_vcpu()                   # the forking thread is bound: the child must not be
    mine = kvmsys.current()
    running = threading.Event()
    child_done = threading.Event()

    def parent_guest():
        kvmsys.add_vcpu()
        v = kvmsys.current()
        prepare(v, mem, "pio_out_loop.pm32", n=0)
        runs = 0
        while True:
            ex = kvmsys.run(budget=100, timeout=20)
            assert isinstance(ex, BudgetExit), ex
            runs += 1
            running.set()
            if child_done.is_set() and runs >= 5:
                break
        assert v.stats()["exits"] == {"IO": 100 * runs}
        kvmsys.remove_vcpu()
        return runs

    t = spawn(parent_guest)
    running.wait(10)

    def child():
        out = dict(current=kvmsys.current() is None, vcpus=kvmsys.vcpus() == {})
        kvmsys.add_vcpu()
        cvm = kvmsys.vm()
        out["fresh_vm"] = cvm is not parent_vm and not cvm.closed
        out["id"] = kvmsys.current().id
        setup_devices(cvm)
        prepare(kvmsys.current(), cvm.memory(0), "hello.pm32")
        ex = kvmsys.run(budget=100_000)     # the timeout in a fork child has its own test below
        out["exit"] = [type(ex).__name__, getattr(ex, "status", None)]
        out["console"] = cvm.console().decode()
        kvmsys.remove_vcpu()
        kvmsys.destroy_vm()
        return out

    try:
        res = fork_result(*fork_child(child))
    finally:
        child_done.set()
    runs = t.finish()
    assert res == dict(current=True, vcpus=True, fresh_vm=True, id=0,
                       exit=["StopExit", exit_status(0)], console=HELLO.decode())
    assert runs >= 5
    # the parent's VM and vCPU are untouched: its own guest runs, its console is its own
    assert kvmsys.current() is mine and kvmsys.vm() is parent_vm
    prepare(mine, mem, "hello.pm32")
    ex = kvmsys.run(timeout=10)
    assert isinstance(ex, StopExit) and ex.status == exit_status(0)
    assert parent_vm.console() == HELLO


def test_fork_child_can_run_with_a_timeout_after_the_parent_did(fresh):
    vm = devices_vm()
    kvmsys.add_vcpu()
    prepare(kvmsys.current(), vm.memory(0), "pio_out_loop.pm32", n=0)
    assert isinstance(kvmsys.run(timeout=0.01), DeadlineExit)   # arms this thread's watchdog

    def child():
        kvmsys.add_vcpu()
        cvm = kvmsys.vm()
        setup_devices(cvm)
        prepare(kvmsys.current(), cvm.memory(0), "hello.pm32")
        ex = kvmsys.run(timeout=10)
        return dict(exit=type(ex).__name__, console=cvm.console().decode())

    assert fork_result(*fork_child(child)) == dict(exit="StopExit", console=HELLO.decode())


# --- handles ---------------------------------------------------------------------------------

def test_handle_is_stale_after_remove_or_close(machine):
    h = machine.vcpu.handle()
    h2 = machine.vcpu.handle()
    assert h.alive and h2.alive and h.id == machine.vcpu.id and h.vm is machine.vm
    assert h.generation == h2.generation
    assert h.stats()["total_exits"] == 0
    end_generation(machine)
    assert_stale(h)
    assert_stale(h2)


def test_fd_handle_is_stale_after_vm_close():
    kvm = kvmsys.Kvm()
    vm = kvm.create_vm()
    h = vm.create_vcpu(0).handle()
    assert h.alive
    vm.close()
    assert_stale(h)
    kvm.close()


def test_handle_is_stale_after_thread_exit_even_when_the_id_is_reused(fresh):
    def owner():
        kvmsys.add_vcpu()
        return kvmsys.handle(), kvmsys.current()

    old, old_vcpu = spawn(owner).finish()
    assert_stale(old)
    kvmsys.add_vcpu()
    new = kvmsys.handle()
    # the same kernel vCPU, recycled, in a new object: the old one is dead
    assert new.id == old.id and kvmsys.current() is not old_vcpu and old_vcpu.stale
    assert new.alive and new.generation != old.generation
    assert_stale(old)
    assert new.stats()["total_exits"] == 0
    mem = devices_vm().memory(0)
    prepare(kvmsys.current(), mem, "pio_out_loop.pm32", n=0)
    new.kick()
    assert isinstance(kvmsys.run(timeout=10), KickExit)
    kvmsys.remove_vcpu()
    assert_stale(new)
    assert_stale(old)


# --- kick, call_soon, interrupt ----------------------------------------------------------------

@pytest.mark.parametrize("guest", ["exiting", "no_exits"])
def test_kick_from_another_thread_ends_an_endless_run(machine, guest):
    machine.devices().load("pio_out_loop.pm32", n=0)
    if guest == "no_exits":
        endless_no_exit(machine.mem)
    h = machine.vcpu.handle()

    def kicker():
        if guest == "exiting":
            wait_until(lambda: h.stats()["total_exits"] > 100, what="the guest to run")
        else:
            time.sleep(0.2)             # nothing to observe: it is inside one KVM_RUN
        h.kick()

    t = spawn(kicker)
    t0 = time.monotonic()
    ex = machine.run(timeout=20)
    elapsed = time.monotonic() - t0
    t.finish()
    assert isinstance(ex, KickExit), ex
    assert elapsed < 10                 # by the kick, long before the watchdog
    # the kick is consumed: the next run goes on
    if guest == "no_exits":
        assert elapsed >= 0.15          # it really was running when kicked
        assert machine.vcpu.stats()["exits"] == {"INTR": 1}
        assert isinstance(machine.run(timeout=0.2), DeadlineExit)
    else:
        assert isinstance(machine.run(budget=10, timeout=10), BudgetExit)


def test_a_kick_reaches_the_thread_running_an_fd_vcpu_now():
    """fd ABI only (a bound vCPU has one thread): threads take turns on one vCPU, and a kick
    signals the thread whose run() is in KVM_RUN now, not the one that ran it before (the
    guest never exits: a kick to the wrong thread would leave it running to the deadline)."""
    with Machine("fd") as m:
        m.attach(0)
        m.devices().load("pio_out_loop.pm32", n=0)
        endless_no_exit(m.mem)
        h = m.vcpu.handle()
        assert isinstance(spawn(m.vcpu.run, None, 0.05).finish(), DeadlineExit)    # an earlier thread

        def kicker():
            time.sleep(0.2)             # inside its one KVM_RUN by then
            h.kick()
        t = spawn(kicker)
        ex = spawn(m.vcpu.run, None, 20).finish()
        t.finish()
        assert isinstance(ex, KickExit), ex


def test_kick_before_run_is_not_lost(machine):
    machine.devices().load("pio_out_loop.pm32", n=0)
    h = machine.vcpu.handle()
    spawn(h.kick).finish()
    spawn(h.kick).finish()              # kicks coalesce until the owner takes them
    ex = machine.run(timeout=10)
    assert isinstance(ex, KickExit)
    assert machine.vcpu.stats()["exits"].get("IO", 0) == 0
    ex = machine.run(budget=10, timeout=10)
    assert isinstance(ex, BudgetExit)
    assert machine.vcpu.stats()["exits"]["IO"] == 10


def test_call_soon_runs_on_the_owning_thread_and_the_run_goes_on(machine):
    machine.devices().load("pio_out_loop.pm32", n=0)
    h = machine.vcpu.handle()
    calls = []

    def note(tag):
        calls.append((tag, threading.get_ident(), machine.vcpu.stats()["total_exits"]))

    def caller():
        wait_until(lambda: h.stats()["total_exits"] > 50, what="the guest to run")
        h.call_soon(note, "hello")
        wait_until(lambda: calls, what="the call")

    t = spawn(caller)
    ex = machine.run(timeout=1.0)
    t.finish()
    assert isinstance(ex, DeadlineExit)         # the call did not end the run
    assert len(calls) == 1
    tag, ident, exits_then = calls[0]
    assert tag == "hello" and ident == threading.get_ident()
    assert machine.vcpu.stats()["exits"]["IO"] > exits_then     # went on after the call
    assert machine.vcpu.pending == []


@pytest.mark.parametrize("vector", [0x40, 0x41])
def test_interrupt_without_irqchip_is_injected_by_the_owner(machine, vector):
    machine.devices()
    machine.vm.add_handler(PIO, 0x12, 0x13, Kind.PYTHON)    # the ISRs' report returns to Python
    irq_guest(machine.mem, machine.vcpu)
    h = machine.vcpu.handle()
    assert isinstance(machine.run(budget=20, timeout=10), BudgetExit)  # IF=1, looping

    def sender():
        wait_until(lambda: h.stats()["total_exits"] > 100, what="the guest to run")
        h.interrupt(vector)

    t = spawn(sender)
    ex = machine.run(timeout=10)
    t.finish()
    assert isinstance(ex, IoExit) and ex.port == 0x12 and ex.value == vector
    assert machine.vcpu.pending == []
    # iret: back in the loop
    assert isinstance(machine.run(budget=20, timeout=10), BudgetExit)


def test_interrupt_queued_before_run_is_injected(machine):
    machine.devices()
    machine.vm.add_handler(PIO, 0x12, 0x13, Kind.PYTHON)
    irq_guest(machine.mem, machine.vcpu)
    assert isinstance(machine.run(budget=5, timeout=10), BudgetExit)
    h = machine.vcpu.handle()
    h.interrupt(0x41)
    assert machine.vcpu.pending_interrupts == ([0x41], 0)
    ex = machine.run(timeout=10)
    assert isinstance(ex, IoExit) and ex.port == 0x12 and ex.value == 0x41
    assert machine.vcpu.pending_interrupts == ([], 0)


def test_nmi_is_injected_by_the_owner(machine):
    machine.devices()
    irq_guest(machine.mem, machine.vcpu)
    h = machine.vcpu.handle()

    def sender():
        wait_until(lambda: h.stats()["total_exits"] > 100, what="the guest to run")
        h.nmi()

    t = spawn(sender)
    ex = machine.run(timeout=10)
    t.finish()
    # vector 2 goes to the exception stub: isa-debug-exit with EXC_EXIT_BASE | 2
    assert isinstance(ex, StopExit) and ex.status == exit_status(layout.EXC_EXIT_BASE | 2)
    assert machine.vcpu.pending == []


def test_running_a_bound_vcpu_from_another_thread_is_refused_or_kickable(fresh):
    vm = devices_vm()
    kvmsys.add_vcpu()
    v = kvmsys.current()
    prepare(v, vm.memory(0), "pio_out_loop.pm32", n=0)
    endless_no_exit(vm.memory(0))
    h = kvmsys.handle()

    def other():
        t0 = time.monotonic()
        try:
            ex = v.run(timeout=3)
        except StateError:              # refused: VcpuBindingError or similar
            return "refused", time.monotonic() - t0
        return type(ex).__name__, time.monotonic() - t0

    t = spawn(other)
    time.sleep(0.3)
    h.kick()
    outcome, elapsed = t.finish()
    assert outcome == "refused" or (outcome == "KickExit" and elapsed < 1.5)


def test_a_late_kick_signal_does_not_end_the_run(fresh, abi):
    """A kick signal with no kick pending (what a kick's signal is when it lands after the owner took
    that kick through immediate_exit) must not end the run: IntrExit is for signals not kvmsys's.
    The late signals are sent directly here, so they land anywhere in the run loop, many times."""
    stop = threading.Event()
    ident = []

    def owner():
        with Machine(abi, devices=True) as m:
            m.attach()
            m.load("pio_out_loop.pm32", n=0)
            ident.append(threading.get_ident())
            seen = {}
            try:
                while not stop.is_set():
                    name = type(m.run(budget=1000)).__name__
                    seen[name] = seen.get(name, 0) + 1
                    if name != "BudgetExit":
                        break
            finally:
                stop.set()
        return seen

    o = spawn(owner, name="owner")
    wait_until(lambda: ident or not o.is_alive(), what="the owner")
    sent = 0
    try:
        while sent < 20_000 and not stop.is_set():
            signal.pthread_kill(ident[0], KICK_SIGNAL)
            sent += 1
            if sent % 4 == 0:
                time.sleep(0)
    finally:
        stop.set()
    seen = o.finish()
    assert set(seen) == {"BudgetExit"}, (sent, seen)


def test_a_late_immediate_exit_store_does_not_end_the_run(fresh, abi):
    """A kick sets kick_pending, then immediate_exit.  The run loop takes kicks from
    kick_pending, so a kicker preempted between the two stores (a bound vCPU's kicker takes
    no lock against the loop) sets immediate_exit after its kick was taken, even during the
    next run(): that KVM_RUN returns EINTR with no kick pending and no signal, which must not
    end the run either.  The late stores are made directly here, many times."""
    published = []
    done_storing, owner_ended = threading.Event(), threading.Event()

    def owner():
        with Machine(abi, devices=True) as m:
            comm = m.attach().comm_area
            m.load("pio_out_loop.pm32", n=0)
            seen = Counter()
            try:
                seen[type(m.run(budget=1000)).__name__] += 1     # running before the first store
                published.append(comm)
                while not done_storing.is_set() and set(seen) == {"BudgetExit"}:
                    seen[type(m.run(budget=1000)).__name__] += 1
            finally:
                owner_ended.set()
                done_storing.wait(30)           # the comm area stays ours until the stores end
        return seen

    o = spawn(owner, name="owner")
    stores = 0
    try:
        wait_until(lambda: published or owner_ended.is_set(), what="the owner's first run")
        while published and stores < 20_000 and not owner_ended.is_set():
            published[0][RUN_IMMEDIATE_EXIT] = 1        # what a kick's late store does
            stores += 1
            if stores % 4 == 0:
                time.sleep(0)
    finally:
        done_storing.set()
    seen = o.finish()
    assert set(seen) == {"BudgetExit"} and stores > 0, (stores, dict(seen))


def test_the_owner_leaves_its_vcpu_only_after_a_kick_aimed_at_it_is_sent(machine):
    """A kicker that saw the vCPU in KVM_RUN signals its owning thread: the owner must not
    get away (fd ABI: run() returned; syscall ABI: remove_vcpu() returned) before that
    signal is sent, or it could go to a thread that has ended.  A kicker held between
    seeing the vCPU running and its signal (the benchmark hook; preemption does the same)
    shows it: the way out waits for the signal.  The kick is `immediate_exit = 1`, which
    (like interrupt() and the kicks at interpreter exit) lets the GIL go while it kicks."""
    machine.vm.add_handler(PIO, layout.PORT_OUT, layout.PORT_OUT + 1, Kind.IGNORE)   # exits stay in C
    machine.load("pio_out_loop.pm32", n=0)
    vcpu, hold = machine.vcpu, 0.01

    def kick_while_running():
        wait_until(lambda: vcpu.running, what="the vCPU in KVM_RUN")
        t0 = time.monotonic_ns()
        vcpu.immediate_exit = 1
        return t0, time.monotonic_ns()

    _core._bench_delay(2, hold)         # between seeing `running` and the signal
    try:
        kicker = spawn(kick_while_running)
        ex = machine.run(timeout=10)
        machine.detach(vcpu)
        left = time.monotonic_ns()
        t0, t1 = kicker.finish()
    finally:
        _core._bench_delay(2, 0)
    assert isinstance(ex, KickExit), ex
    assert t1 - t0 >= hold * 1e9, "the kicker did not find the vCPU in KVM_RUN"
    assert left >= t0 + hold * 1e9, f"the owner got away {(t0 + hold * 1e9 - left) / 1e6:.2f} ms before the kick's signal"


def test_a_kick_whose_immediate_exit_store_comes_late_ends_one_run(machine):
    """The test above through the real kick path: a kicker held after each of its two stores
    (a test hook; the scheduler does it under load) while the owner, on the main thread, takes
    the kick from kick_pending at its next signal poll.  The kick ends that run() only; its
    immediate_exit store, and then its signal, land in the next run(), which goes on to its
    deadline.  The kick is `immediate_exit = 1`, which lets the GIL go while it kicks
    (handle.kick() keeps it: the owner could not leave its first run() before the kick ended)."""
    machine.devices()
    machine.load("pio_out_loop.pm32", n=0)
    vcpu = machine.vcpu
    _core._delay_kick(0.3)
    kicker = spawn(setattr, vcpu, "immediate_exit", 1)
    try:
        first = machine.run(timeout=10)
        second = machine.run(timeout=1.0)       # the late store lands in this one
    finally:
        _core._delay_kick(0)
        kicker.finish()
    assert isinstance(first, KickExit), first
    assert isinstance(second, DeadlineExit), second


# --- races and many threads ---------------------------------------------------------------------

def test_kicks_race_with_remove_vcpu(fresh):
    """10 000 kicks at a vCPU its owner keeps adding, running and removing.

    Phase A (exact): the kicker kicks the published handle under a lock and waits until the
    owner saw the KickExit; the owner unpublishes under the same lock and drains with run(budget=1)
    before remove_vcpu, so every kick must be seen exactly once.
    Phase B (free race): kicks at whatever handle is current, or at removed ones, with no lock:
    each either raises StaleVcpuError or works; removed handles always raise; a new generation's
    first run never sees an older generation's kick.
    A bystander thread (which once had a vCPU) and the kicker block the kick signal: it must never
    be pending for them."""
    vm = devices_vm()
    mem = vm.memory(0)
    kvmsys.add_vcpu()
    prepare(kvmsys.current(), mem, "pio_out_loop.pm32", n=0)
    regs, sregs = kvmsys.current().get_regs(), kvmsys.current().get_sregs()
    kvmsys.remove_vcpu()
    n_exact, n_racy = 5000, 5000
    lock = threading.Lock()
    pub = [None]
    removed = []
    st = dict(phase="A", observed=0, sent=0, leaked=0, racy_kick_exits=0, stray_intr=0, rounds=0,
              stop=False, owner_failed=False)
    bystander_ready = threading.Event()
    bystander_handle = []

    def owner():
        try:
            owner_rounds()
        except BaseException:
            st["owner_failed"] = st["stop"] = True
            raise

    def owner_rounds():
        while not st["stop"]:
            kvmsys.add_vcpu()
            v = kvmsys.current()
            v.set_sregs(sregs)
            v.set_regs(regs)
            phase = st["phase"]
            if phase == "B":
                # no handle of this generation exists yet: an older one's kick must not show
                ex = kvmsys.run(budget=1)
                st["leaked"] += isinstance(ex, KickExit)
                st["stray_intr"] += isinstance(ex, IntrExit)
            h = kvmsys.handle()
            with lock:
                pub[0] = (h, phase)     # a phase-B kicker never kicks a phase-A generation
            for _ in range(5):
                ex = kvmsys.run(budget=20)
                if isinstance(ex, KickExit):
                    st["observed" if phase == "A" else "racy_kick_exits"] += 1
                elif isinstance(ex, IntrExit):
                    st["stray_intr"] += 1       # a late kick signal must not end a run
                else:
                    assert isinstance(ex, BudgetExit), ex
            with lock:
                pub[0] = None
            if phase == "A" or st["rounds"] % 2:
                # drain: takes a kick that came after the last run
                ex = kvmsys.run(budget=1)
                if isinstance(ex, KickExit):
                    st["observed" if phase == "A" else "racy_kick_exits"] += 1
                else:
                    assert isinstance(ex, BudgetExit), ex
            kvmsys.remove_vcpu()
            removed.append(h)
            st["rounds"] += 1

    def bystander():
        signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        kvmsys.add_vcpu()
        bystander_handle.append(kvmsys.handle())
        kvmsys.remove_vcpu()
        bystander_ready.set()
        naps = 0
        while not st["stop"]:
            time.sleep(0.001)
            naps += 1
        return naps, KICK_SIGNAL in signal.sigpending()

    def kicker():
        signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        # phase A: one outstanding kick at a time, each must be seen
        while st["sent"] < n_exact:
            with lock:
                h = pub[0][0] if pub[0] is not None else None
                if h is not None:
                    h.kick()            # published handles are alive: never stale
                    st["sent"] += 1
            if h is None:
                time.sleep(0)
                continue
            deadline = time.monotonic() + 10
            while st["observed"] < st["sent"] and not st["owner_failed"]:
                assert time.monotonic() < deadline, f"kick {st['sent']} was lost"
                time.sleep(0)
            if st["owner_failed"]:
                return None
        st["phase"] = "B"
        # phase B: free race
        live_ok = live_stale = dead = 0
        attempts = 0
        while attempts < n_racy and not st["owner_failed"]:
            if attempts % 4 == 3 and removed:
                h, must_be_stale = (removed[-1] if attempts % 8 == 3 else bystander_handle[0]), True
            else:
                cur = pub[0]
                if cur is None or cur[1] != "B":
                    time.sleep(0)
                    continue
                h, must_be_stale = cur[0], False
            attempts += 1
            try:
                h.kick()
            except StaleVcpuError:
                assert not h.alive
                if must_be_stale:
                    dead += 1
                else:
                    live_stale += 1
            else:
                assert not must_be_stale, "a kick at a removed vCPU succeeded"
                live_ok += 1
            if attempts % 16 == 0:
                time.sleep(0)           # let the owner through the GIL now and then
        st["stop"] = True
        return live_ok, live_stale, dead, KICK_SIGNAL in signal.sigpending()

    b = spawn(bystander, name="bystander")
    bystander_ready.wait(10)
    o = spawn(owner, name="owner")
    k = spawn(kicker, name="kicker")
    try:
        k.join(50)
    finally:
        st["stop"] = True
    o.finish()                          # the owner's failure first: it explains the kicker's
    live_ok, live_stale, dead, kicker_got_signal = k.finish()
    naps, bystander_got_signal = b.finish()
    assert st["sent"] == n_exact and st["observed"] == n_exact      # none lost, none invented
    assert st["stray_intr"] == 0
    assert live_ok + live_stale + dead == n_racy
    assert dead == n_racy // 4 and live_ok > 0
    assert 0 < st["racy_kick_exits"] <= live_ok
    assert st["leaked"] == 0
    assert not kicker_got_signal and not bystander_got_signal
    assert naps > 0 and st["rounds"] > 1
    assert kvmsys.vcpus() == {} and vm.vcpu_ids == {0}   # the bystander's and the owner's: one recycled kernel vCPU
    assert all(not h.alive for h in removed)


def test_64_threads_each_run_their_own_vcpu(fresh):
    n, iterations = 64, 200
    vm = devices_vm()
    mem = vm.memory(0)
    guest = get("pio_in_loop.pm32")
    kvmsys.add_vcpu()                   # load the image once, before any thread runs
    layout.prepare(guest, kvmsys.current(), mem, n=iterations)
    kvmsys.remove_vcpu()
    setup = threading.Lock()

    for round_ in range(3):
        ready = threading.Barrier(n, timeout=30)

        def worker():
            kvmsys.add_vcpu()
            v = kvmsys.current()
            with setup:
                layout.prepare(guest, v, mem, n=iterations)     # same bytes; sets v's registers
            ready.wait()                # every prepare (which zeroes the data page) is done
            ex = kvmsys.run(timeout=30)
            result = (v.id, type(ex).__name__, getattr(ex, "status", None),
                      v.stats()["exits"], v.get_regs()["rbx"], kvmsys.current() is v)
            kvmsys.remove_vcpu()
            return result

        threads = [spawn(worker, name=f"vcpu-thread-{i}") for i in range(n)]
        results = [t.finish(timeout=60) for t in threads]
        assert sorted(r[0] for r in results) == list(range(n)), round_
        for vid, kind, status, exits, rbx, still_mine in results:
            assert (kind, status) == ("StopExit", exit_status(0)), (round_, vid)
            assert exits == {"IO": iterations + 1}, (round_, vid)   # N ins + the debug-exit out
            assert rbx == iterations * 0xFF, (round_, vid)          # its own sum of all-ones reads
            assert still_mine
        assert kvmsys.vcpus() == {}
        assert vm.vcpu_ids == set(range(n))     # later rounds recycle, never create


def test_fresh_vm_scope_restores_the_configuration(fresh):
    before = syscall.config()
    old = kvmsys.vm()
    with syscall.fresh_vm(memory_size=1 << 20, irqchip=True) as vm:
        assert vm is kvmsys.vm() and vm is not old and old.closed
        assert syscall.config()["irqchip"] is True and vm.memory_slots[0].size == 1 << 20
    assert vm.closed and syscall.config() == before
