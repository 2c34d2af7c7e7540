"""The thread-bound contract, tried as a hostile user would: fork (the child never
touches the parent's VM, vCPUs, mappings or locks), ownership by generation (what a
thread had for its vCPU is dead once it removed it), exits stamped with their run,
and no release under a running loop.  Both ABIs where the behaviour exists in both.
"""
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import kvmsys
from kvmsys import (BudgetExit, IoExit, KickExit, StaleVcpuError, StateError,
                    StopExit, _core)
from kvmsys.guests import exit_status, get, layout
from kvmsys.runner import setup_devices

from conftest import forked
from test_syscall_abi import wait_until

PIO = _core.SPACES["PIO"]
K = _core.H_KINDS
RUN_IMMEDIATE_EXIT = 1          # struct kvm_run: immediate_exit (u8) at offset 1


def in_thread(fn, *args, timeout=60.0):
    """fn(*args) in a new thread; its result, or its exception re-raised here."""
    box = {}

    def body():
        try:
            box["result"] = fn(*args)
        except BaseException as e:          # handed to the test thread
            box["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "thread hung"
    if "error" in box:
        raise box["error"]
    return box["result"]


def load(vcpu, mem, name, **inputs):
    layout.prepare(get(name), vcpu, mem, **inputs)


# --- fork ----------------------------------------------------------------------------------

PARENT_AND_CHILD = r"""
import json, os, sys, threading
import kvmsys
from kvmsys.guests import get, layout
from kvmsys.runner import setup_devices

kvmsys.configure(memory_size=layout.RAM_SIZE)
comm_main = kvmsys.add_vcpu()                  # the forking thread is bound
setup_devices(kvmsys.vm())
layout.prepare(get("pio_out_loop.pm32"), kvmsys.current(), kvmsys.vm().memory(0), n=0)
kvmsys.vm().add_handler(0, layout.PORT_OUT, layout.PORT_OUT + 1, 0)     # PIO, PYTHON: return it
ready, stop, box = threading.Event(), threading.Event(), {}

def owner():                                   # a second thread, bound, with a kick waiting
    box["comm"] = kvmsys.add_vcpu()
    v = kvmsys.current()
    v.set_regs(v.get_regs())                   # used: its release would reset it
    kvmsys.handle().kick()                     # immediate_exit = 1 until its next run
    ready.set()
    stop.wait()
    kvmsys.remove_vcpu()

t = threading.Thread(target=owner)
t.start()
ready.wait()
kvm = kvmsys.Kvm()                             # and an fd-ABI VM beside it
fvm = kvm.create_vm()
fmem = fvm.add_memory(0, 0, layout.RAM_SIZE)
fvcpu = fvm.create_vcpu(0)
fvcpu.immediate_exit = 1
fmem[0:6] = b"parent"
smem = kvmsys.vm().memory(0)
smem[0:6] = b"parent"                          # (guest code lives far above)
areas = [comm_main, box["comm"], fvcpu.comm_area]
before = [bytes(a) for a in areas]
assert before[1][1] == 1                       # the pending kick is visible

pid = os.fork()
if pid == 0:
    # The child's whole life: it sees no VM, uses both ABIs, scribbles over every view it
    # inherited, then ends normally (atexit hooks, thread-state teardown and all).
    out = dict(current=kvmsys.current() is None, vcpus=kvmsys.vcpus() == {})
    out["inherited_reads_zero"] = [bytes(a[:16]) == bytes(16) for a in areas]
    for a in areas:
        a[:] = b"\xee" * len(a)
    fmem[0:6] = b"child!"
    smem[0:6] = b"child!"
    for what, use in (("fd vcpu", lambda: fvcpu.get_regs()), ("fd vm", lambda: fvm.memory(0)),
                      ("comm area", lambda: fvcpu.comm_area)):
        try:
            use()
            out[what] = "allowed"
        except kvmsys.StateError as e:
            out[what] = type(e).__name__
    kvmsys.add_vcpu()                          # syscall ABI: a VM of its own
    setup_devices(kvmsys.vm())
    layout.prepare(get("hello.pm32"), kvmsys.current(), kvmsys.vm().memory(0))
    out["sys"] = [type(kvmsys.run(timeout=10)).__name__, kvmsys.vm().console().decode()]
    with kvmsys.Kvm() as k2, k2.create_vm() as vm2:   # fd ABI at the same time
        setup_devices(vm2)
        mem2 = vm2.add_memory(0, 0, layout.RAM_SIZE)
        v2 = vm2.create_vcpu(0)
        layout.prepare(get("hello.pm32"), v2, mem2)
        out["fd"] = [type(v2.run(timeout=10)).__name__, vm2.console().decode()]
    print(json.dumps(out))
    sys.exit(0)                                # still bound: the atexit hook releases it

_, status = os.waitpid(pid, 0)
after = [bytes(a) for a in areas]
res = dict(status=os.waitstatus_to_exitcode(status),
           unchanged=[b == a for b, a in zip(before, after)],
           ram=[bytes(fmem[0:6]).decode(), bytes(smem[0:6]).decode()])
stop.set()
t.join()
ex = kvmsys.run(budget=1, timeout=5)           # the parent's vCPUs still work
res["parent_run"] = type(ex).__name__
print(json.dumps(res))
"""


def test_fork_child_never_touches_the_parents_comm_areas_or_memory():
    p = subprocess.run([sys.executable, "-c", PARENT_AND_CHILD], capture_output=True, timeout=120,
                       cwd=tempfile.gettempdir())   # not the source tree: the installed package
    assert p.returncode == 0, p.stderr.decode()
    assert p.stderr == b""
    child, parent = [json.loads(line) for line in p.stdout.decode().splitlines()]
    hello = "Hello, world!\n"
    assert child == {"current": True, "vcpus": True, "inherited_reads_zero": [True] * 3,
                     "fd vcpu": "StateError", "fd vm": "StateError", "comm area": "StateError",
                     "sys": ["StopExit", hello], "fd": ["StopExit", hello]}
    # byte for byte, across the child's whole life: the kick still pending, no field changed
    assert parent == {"status": 0, "unchanged": [True] * 3, "ram": ["parent", "parent"],
                      "parent_run": "IoExit"}


def test_loading_a_built_in_guest_imports_nothing():
    """CPython resets no module's import lock at fork: a child whose parent forked while
    another thread was inside a module's first import waits for that lock for ever if it
    imports the module too.  Threads load built-in guests while others fork (the test
    below hung so, 1 run in 10, when the image came through importlib.resources, whose
    first read imports five modules): loading one imports nothing."""
    code = ("import sys\n"
            "from kvmsys.machine import Machine\n"
            "from kvmsys.guests import get, layout\n"
            "m = Machine('fd'); v = m.attach(0)\n"
            "before = set(sys.modules)\n"
            "for name in ('hello.pm32', 'pio_out_loop.pm32', 'pio_out_loop.long64'):\n"
            "    layout.prepare(get(name), v, m.mem)\n"
            "print(sorted(set(sys.modules) - before))\n"
            "m.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_hundreds_of_forks_while_threads_add_remove_and_run_vcpus(fresh_process_vm):
    setup_devices(kvmsys.vm())
    mem = kvmsys.vm().memory(0)
    load_lock = threading.Lock()
    stop = threading.Event()
    counts = [0, 0]

    def churn(i):
        while not stop.is_set():
            kvmsys.add_vcpu()
            v = kvmsys.current()
            with load_lock:
                load(v, mem, "pio_out_loop.pm32", n=0)
            assert isinstance(kvmsys.run(budget=20, timeout=10), BudgetExit)
            kvmsys.remove_vcpu()
            counts[i] += 1

    threads = [threading.Thread(target=churn, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()

    def child_plain():
        return dict(ok=kvmsys.current() is None and kvmsys.vcpus() == {})

    def child_uses_a_vm():
        kvmsys.add_vcpu()
        cvm = kvmsys.vm()
        setup_devices(cvm)
        load(kvmsys.current(), cvm.memory(0), "hello.pm32")
        ex = kvmsys.run(timeout=10)
        kvmsys.remove_vcpu()
        return dict(ok=isinstance(ex, StopExit) and cvm.console() == b"Hello, world!\n")

    try:
        for n in range(300):
            assert forked(child_uses_a_vm if n % 25 == 0 else child_plain, timeout=30) == {"ok": True}, n
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert min(counts) > 0


def test_fork_from_a_worker_thread_gives_the_child_working_ctrl_c(fresh_process_vm):
    def child():
        # This thread is the child's main thread now.  SIGINT goes to a helper thread while
        # the guest exits often (every exit handled in C): only the run loop's main-thread
        # signal polling can notice it before the deadline.
        assert threading.current_thread() is threading.main_thread()
        kvmsys.add_vcpu()
        setup_devices(kvmsys.vm())
        load(kvmsys.current(), kvmsys.vm().memory(0), "pio_out_loop.pm32", n=0)

        def poke():
            time.sleep(0.3)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        t0 = time.monotonic()
        try:
            threading.Thread(target=poke).start()
            ex = kvmsys.run(timeout=20)
            return dict(result=type(ex).__name__)
        except KeyboardInterrupt:
            return dict(result="KeyboardInterrupt", fast=time.monotonic() - t0 < 10)

    got = in_thread(lambda: forked(child, timeout=60))
    assert got == dict(result="KeyboardInterrupt", fast=True)


def test_a_fork_child_refuses_the_parents_bare_vm():
    with kvmsys.Kvm() as kvm, kvm.create_vm() as vm:      # no memory, no vCPU: no mapping at all
        def child():
            try:
                vm.check_extension("SYNC_REGS")
                return dict(got="allowed")
            except StateError as e:
                return dict(got=type(e).__name__, parent="parent process" in str(e))
        assert forked(child) == dict(got="StateError", parent=True)
        assert vm.check_extension("SYNC_REGS")            # still the parent's own


# --- ownership by generation -----------------------------------------------------------------

def test_everything_a_thread_had_is_dead_after_remove_vcpu(fresh_process_vm):
    setup_devices(kvmsys.vm())
    mem = kvmsys.vm().memory(0)

    def first_owner():
        comm = kvmsys.add_vcpu()
        v = kvmsys.current()
        load(v, mem, "pio_out_loop.pm32", n=0)
        kvmsys.vm().add_handler(PIO, layout.PORT_OUT, layout.PORT_OUT + 1, K["PYTHON"], callback=lambda ex: True)
        ex = kvmsys.run(timeout=10)
        assert isinstance(ex, IoExit) and ex.port == layout.PORT_OUT
        regs, part = v.regs, comm[0:64]
        kvmsys.remove_vcpu()
        return v, comm, part, ex, regs

    v, comm, part, ex, regs = in_thread(first_owner)
    # the next owner gets the same kernel vCPU in a new object
    kvmsys.add_vcpu()
    new = kvmsys.current()
    assert new is not v and new.id == v.id and v.stale and not new.stale
    load(new, mem, "pio_out_loop.pm32", n=0)
    before = bytes(new.comm_area)
    regs_before = new.get_regs()
    for use in (lambda: v.get_regs(), lambda: v.set_regs(regs_before), lambda: v.run(timeout=1),
                lambda: v.close(), lambda: v.comm_area, lambda: v.regs, lambda: v.kick(),
                lambda: v.stats(), lambda: v.handle(), lambda: v.set_mp_state(0),
                lambda: setattr(v, "immediate_exit", 1),
                lambda: ex.port, lambda: ex.value, lambda: ex.data, lambda: setattr(ex, "value", 7),
                lambda: regs.rip, lambda: setattr(regs, "rip", 0), lambda: regs.as_dict(),
                lambda: v.renew()):
        with pytest.raises(StaleVcpuError):
            use()
    with pytest.raises(ValueError, match="released"):
        comm[1] = 1                         # the view it was given is released
    part[:] = b"\xff" * 64                  # a slice made earlier: cut off, writes go nowhere
    assert bytes(part) == b"\xff" * 64
    assert bytes(new.comm_area) == before and new.get_regs() == regs_before
    assert new.immediate_exit == 0
    assert isinstance(kvmsys.run(budget=3, timeout=10), IoExit)     # the new owner runs normally


def test_thread_end_kills_its_vcpu_object_too(fresh_process_vm):
    def owner():
        kvmsys.add_vcpu()
        return kvmsys.current()

    v = in_thread(owner)
    kvmsys.add_vcpu()
    assert kvmsys.current() is not v and kvmsys.current().id == v.id
    with pytest.raises(StaleVcpuError):
        v.set_regs(kvmsys.current().get_regs())
    with pytest.raises(StaleVcpuError):
        v.run(timeout=1)


def test_a_kept_current_cannot_run_or_dirty_a_pooled_vcpu(fresh_process_vm):
    kvmsys.add_vcpu()
    v = kvmsys.current()
    with pytest.raises(StateError, match="bound"):
        v.renew()                           # only remove_vcpu() hands a bound vCPU on
    kvmsys.remove_vcpu()                    # the kernel vCPU is in the pool now
    with pytest.raises(StaleVcpuError):
        v.run(timeout=1)
    with pytest.raises(StaleVcpuError):
        v.set_guest_debug(True, single_step=True)
    kvmsys.add_vcpu()
    assert not kvmsys.current().touched     # nobody dirtied it


def test_an_exit_is_dead_once_its_vcpu_ran_again(machine):
    machine.devices().load("pio_out_loop.pm32", n=0)
    seen = []

    def handler(ex):                        # returns every exit, or every second one
        seen.append(ex)
        return not keep_going[0] or len(seen) % 2 == 0
    keep_going = [False]
    machine.vm.add_handler(PIO, layout.PORT_OUT, layout.PORT_OUT + 1, K["PYTHON"], callback=handler)
    first = machine.run(timeout=10)
    assert isinstance(first, IoExit) and first.port == layout.PORT_OUT
    value = first.value
    second = machine.run(timeout=10)
    assert isinstance(second, IoExit) and second.value == (value + 1) & 0xFF
    for use in (lambda: first.port, lambda: first.value, lambda: first.data,
                lambda: setattr(first, "value", 5)):
        with pytest.raises(StaleVcpuError, match="ran again"):
            use()
    assert "stale" in repr(first)
    assert second.port == layout.PORT_OUT   # the latest one is fine
    keep_going[0] = True                    # an exit kept from inside a handler goes stale too
    last = machine.run(timeout=10)
    assert last is seen[-1]
    with pytest.raises(StaleVcpuError):
        seen[-2].value
    assert last.value == (value + 3) & 0xFF


# --- reentrancy: nothing is released under a running loop ------------------------------------

def _call_inside_run(machine, op):
    """Run op() from the vCPU's own exit handler; returns what it raised (or None)."""
    caught = []

    def handler(ex):
        try:
            op()
        except BaseException as e:
            caught.append(e)
        return True
    machine.devices().load("pio_out_loop.pm32", n=0)
    machine.vm.add_handler(PIO, layout.PORT_OUT, layout.PORT_OUT + 1, K["PYTHON"], callback=handler)
    ex = machine.run(timeout=10)
    assert isinstance(ex, IoExit) and ex.port == layout.PORT_OUT, ex
    return caught[0] if caught else None


@pytest.mark.parametrize("op", ["close vcpu", "close vm", "remove_vcpu", "destroy_vm"])
def test_release_from_the_vcpus_own_handler_is_refused(machine, op):
    ops = {"close vcpu": machine.vcpu.close, "close vm": machine.vm.close,
           # the syscall ABI's own calls; over the fd ABI their counterparts are the closes
           "remove_vcpu": kvmsys.remove_vcpu if machine.abi == "sys" else machine.vcpu.close,
           "destroy_vm": kvmsys.destroy_vm if machine.abi == "sys" else machine.vm.close}
    err = _call_inside_run(machine, ops[op])
    assert isinstance(err, StateError) and "running" in str(err), err
    # nothing was released: the same vCPU runs on, its VM is open
    assert not machine.vcpu.closed and not machine.vm.closed
    if machine.abi == "sys":
        assert kvmsys.current() is machine.vcpu
    assert machine.run(budget=2, timeout=10).port == layout.PORT_OUT


def test_remove_vcpu_from_a_call_soon_callback_is_refused(fresh_process_vm):
    kvmsys.add_vcpu()
    setup_devices(kvmsys.vm())
    load(kvmsys.current(), kvmsys.vm().memory(0), "pio_out_loop.pm32", n=0)
    h = kvmsys.handle()
    caught = []

    def callback():
        try:
            kvmsys.remove_vcpu()
        except StateError as e:
            caught.append(e)
        h.kick()
    h.call_soon(callback)
    ex = kvmsys.run(timeout=10)
    assert isinstance(ex, KickExit), ex
    assert len(caught) == 1 and "running" in str(caught[0])
    assert kvmsys.current() is not None and h.alive


def run_while(machine, h, act):
    """The owner (this thread) runs the machine's vCPU while another thread does act() and
    then kicks it through handle *h*, even if act() failed: run() ends with that KickExit."""
    def other():
        try:
            act()
        finally:
            h.kick()
    t = threading.Thread(target=other)
    t.start()
    ex = machine.run(timeout=20)
    t.join(10)
    assert isinstance(ex, KickExit), ex


def test_close_from_another_thread_while_running_is_refused(machine):
    machine.devices().load("pio_out_loop.pm32", n=0)
    h = machine.vcpu.handle()
    refused = []

    def other():                            # while the owner (this test's thread) runs it
        wait_until(lambda: machine.vcpu.active, what="the owner's run()")
        ops = [machine.vcpu.close, machine.vm.close]
        if machine.abi == "sys":
            ops.append(kvmsys.destroy_vm)
        for op in ops:
            try:
                op()
            except StateError as e:
                refused.append("running" in str(e))
        refused.append(not machine.vcpu.closed and not machine.vm.closed)
    run_while(machine, h, other)
    assert refused == [True] * (4 if machine.abi == "sys" else 3)


# --- recycling: a recycled vCPU is indistinguishable from a new one ------------------------

MSR_TSC, MSR_SYSENTER_CS, MSR_SYSENTER_EIP = 0x10, 0x174, 0x176
RUN_REQUEST_IRQ_WINDOW, RUN_EXIT_REASON, RUN_DIRTY_REGS, RUN_SYNC_REGS = 0, 8, 296, 304   # struct kvm_run (x86)


def everything(vcpu):
    """All per-vCPU state kvmsys can read, plus the comm area and guest debugging."""
    from kvmsys import vcpustate
    state = vcpustate.capture(vcpu)
    state.pop("id")
    state["msrs"].pop(MSR_TSC, None)        # the time stamp counter moves on by itself
    page = vcpu.comm_area
    state["comm area"] = bytes(page[:2 * 4096])     # kvm_run and the PIO data page
    page.release()
    state["guest debug"] = vcpu.guest_debug
    state["cpuid"] = vcpu.get_cpuid2()
    return state


def _ran_with_an_in_pending(v, mem):
    load(v, mem, "pio_in_loop.pm32", n=5)
    kvmsys.vm().add_handler(PIO, layout.PORT_IN, layout.PORT_IN + 1, K["PYTHON"], callback=lambda ex: True)
    ex = kvmsys.run(timeout=10)
    assert isinstance(ex, IoExit) and ex.is_in
    ex.value = 0x5A                         # KVM would complete it at the next KVM_RUN


def _set_fpu(v, mem):
    fpu = bytearray(v.get_fpu())
    fpu[0:2] = (0x027F).to_bytes(2, "little")           # fcw
    v.set_fpu(bytes(fpu))


def _set_xsave(v, mem):
    xsave = bytearray(v.get_xsave())
    xsave[24:28] = (0x1FA0).to_bytes(4, "little")       # mxcsr
    v.set_xsave(bytes(xsave))


def _set_xcrs(v, mem):
    xcrs = bytearray(v.get_xcrs())
    xcrs[0:4] = (1).to_bytes(4, "little")               # nr_xcrs
    xcrs[16:24] = (3).to_bytes(8, "little")             # XCR0 = x87 | SSE
    try:
        v.set_xcrs(bytes(xcrs))
    except kvmsys.KvmOSError:
        pytest.skip("host: KVM refuses XCR0 = x87|SSE for a vCPU without CPUID")


def _raw_comm_area_write(v, mem):
    comm = v.comm_area
    comm[RUN_REQUEST_IRQ_WINDOW] = 1
    comm[RUN_SYNC_REGS:RUN_SYNC_REGS + 8] = (0xDEAD).to_bytes(8, "little")     # rax
    comm[RUN_DIRTY_REGS] = 1                # KVM_SYNC_X86_REGS: load them at the next run


def _set_tsc_khz(v, mem):
    try:
        v.set_tsc_khz(v.get_tsc_khz() // 2)
    except (kvmsys.CapabilityError, kvmsys.KvmOSError):    # no TSC_CONTROL, or a rate KVM refuses
        pytest.skip("host: KVM cannot scale the TSC here (no KVM_CAP_TSC_CONTROL)")


def _enable_a_vcpu_capability(v, mem):
    if not kvmsys.vm().check_extension("ENFORCE_PV_FEATURE_CPUID"):
        pytest.skip("host: no vCPU capability to enable (KVM_CAP_ENFORCE_PV_FEATURE_CPUID)")
    v.enable_cap(kvmsys.fd.cap_number("ENFORCE_PV_FEATURE_CPUID"), 0, [1])


def _set_nested_state(v, mem):
    if not kvmsys.vm().check_extension("NESTED_STATE"):
        pytest.skip("host: no KVM_CAP_NESTED_STATE")
    v.set_nested_state(v.get_nested_state())


CHANGES = {
    "ran, an IN pending": _ran_with_an_in_pending,
    "regs": lambda v, mem: v.set_regs(dict(v.get_regs(), rax=0x1234, rip=0x2000)),
    "regs through the comm area": lambda v, mem: setattr(v.regs, "rbx", 0x55),
    "raw comm-area write": _raw_comm_area_write,
    # sent to the kernel before that ioctl (flush_sync): the reset must restore it
    "raw comm-area write, then an ioctl": lambda v, mem: (_raw_comm_area_write(v, mem), v.get_sregs()),
    "sregs": lambda v, mem: v.set_sregs(dict(v.get_sregs(), cr2=0x1234_5000)),
    "fpu": _set_fpu,
    "xsave": _set_xsave,
    "xcrs": _set_xcrs,
    "msrs": lambda v, mem: v.set_msrs({MSR_SYSENTER_CS: 0x10, MSR_SYSENTER_EIP: 0xC0DE}),
    "debugregs": lambda v, mem: v.set_debugregs(dict(v.get_debugregs(), db=[0x1000, 0, 0, 0], dr7=0x401)),
    "guest debug": lambda v, mem: v.set_guest_debug(True, single_step=True),
    "events": lambda v, mem: v.nmi(),
    "tsc frequency": _set_tsc_khz,
    "nested state": _set_nested_state,
    "cpuid": lambda v, mem: v.set_cpuid2(kvmsys.Kvm().supported_cpuid()),
    "vcpu capability": _enable_a_vcpu_capability,
}
RETIRED = ("cpuid", "vcpu capability")          # KVM cannot undo these: a new kernel vCPU


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_recycled_vcpu_is_indistinguishable_from_a_new_one(fresh_process_vm, change):
    setup_devices(kvmsys.vm())
    mem = kvmsys.vm().memory(0)

    def first_owner():
        kvmsys.add_vcpu()
        v = kvmsys.current()
        CHANGES[change](v, mem)
        return v.id

    first_id = in_thread(first_owner)
    comm = kvmsys.add_vcpu()
    v = kvmsys.current()
    if change in RETIRED:
        # KVM cannot undo a CPUID table or a vCPU capability: that kernel vCPU is retired
        assert v.id != first_id and not v.has_run
    else:
        assert v.id == first_id and not v.touched
    with kvmsys.Kvm() as kvm, kvm.create_vm() as ref_vm:       # a brand-new vCPU to compare with
        ref_vm.add_memory(0, 0, layout.RAM_SIZE)
        ref = ref_vm.create_vcpu(v.id)
        assert everything(v) == everything(ref)
    # and it behaves like one: any CPUID table accepted (a vCPU that ran under its last
    # owner, whose CPUID KVM froze, moves onto a new kernel vCPU for it), no single step,
    # no stale registers
    cpuid = kvmsys.Kvm().supported_cpuid()
    v.set_cpuid2(cpuid[:len(cpuid) // 2])
    assert (v.id != first_id) == (change in RETIRED + ("ran, an IN pending",))
    assert kvmsys.vcpus() == {v.id: v} and kvmsys.handle().id == v.id
    load(v, mem, "pio_out_loop.pm32", n=3)
    ex = kvmsys.run(timeout=10)
    assert isinstance(ex, StopExit) and ex.status == exit_status(0), ex
    assert v.stats()["exits"] == {"IO": 4}
    assert comm[RUN_EXIT_REASON] == 2           # the comm area from add_vcpu() shows this vCPU's exits


def test_lapic_and_mp_state_of_a_recycled_vcpu_are_reset():
    from kvmsys import syscall
    with syscall.fresh_vm(memory_size=layout.RAM_SIZE, pc_ports=False, irqchip=True):
        def first_owner():
            kvmsys.add_vcpu()
            v = kvmsys.current()
            lapic = bytearray(v.get_lapic())
            lapic[0xF0:0xF4] = (0x1FF).to_bytes(4, "little")    # SVR: APIC on, spurious 0xFF
            v.set_lapic(bytes(lapic))
            v.set_mp_state(3)                                   # HALTED (needs the irqchip)
            return bytes(lapic)
        changed = in_thread(first_owner)
        kvmsys.add_vcpu()
        try:
            v = kvmsys.current()
            with kvmsys.Kvm() as kvm, kvm.create_vm() as ref_vm:
                ref_vm.create_irqchip()
                ref = ref_vm.create_vcpu(v.id)
                assert v.get_lapic() == ref.get_lapic() != changed
                assert v.get_mp_state() == ref.get_mp_state() != 3
                assert everything(v) == everything(ref)
        finally:
            kvmsys.remove_vcpu()


SETTERS = ("set_regs", "set_fpu", "set_xsave", "set_xcrs", "set_sregs", "set_sregs2", "set_tsc_khz",
           "set_msrs", "set_nested_state", "set_lapic", "set_mp_state", "set_vcpu_events", "set_debugregs")


def _setters_of_the_reset(monkeypatch, first_owner):
    """The setters the next add_vcpu() calls to reset the vCPU *first_owner* (run in a
    thread of its own) used, and the recycled vCPU (bound to this thread)."""
    from kvmsys import syscall
    called = []
    for name in SETTERS:
        real = getattr(syscall.ThreadVcpu, name)
        monkeypatch.setattr(syscall.ThreadVcpu, name,
                            lambda self, *a, _n=name, _r=real, **k: (called.append(_n), _r(self, *a, **k))[1])
    in_thread(first_owner)
    called.clear()
    kvmsys.add_vcpu()
    return called, kvmsys.current()


@pytest.mark.parametrize("change,reset", [
    ("regs", {"set_regs"}),
    ("regs through the comm area", {"set_regs"}),
    ("fpu", {"set_fpu", "set_xsave"}),      # (XSAVE's image does not restore all of the FPU's)
    ("debugregs", {"set_debugregs"}),
])
def test_a_reset_restores_only_what_the_owner_changed(fresh_process_vm, monkeypatch, change, reset):
    """Each piece of state costs a vCPU ioctl to restore: after setters whose reach is known,
    only that is restored (vcpu.changes), and the vCPU is still a new one's twin."""
    mem = kvmsys.vm().memory(0)

    def first_owner():
        kvmsys.add_vcpu()
        v = kvmsys.current()
        CHANGES[change](v, mem)
        assert v.changes == {"KVM_SET_REGS" if change.startswith("regs") else
                             {"fpu": "KVM_SET_FPU", "debugregs": "KVM_SET_DEBUGREGS"}[change]}
    called, v = _setters_of_the_reset(monkeypatch, first_owner)
    try:
        assert set(called) == reset and not v.touched and v.changes == frozenset()
        with kvmsys.Kvm() as kvm, kvm.create_vm() as ref_vm:
            ref_vm.add_memory(0, 0, layout.RAM_SIZE)
            assert everything(v) == everything(ref_vm.create_vcpu(v.id))
    finally:
        kvmsys.remove_vcpu()


def test_a_vcpu_that_ran_or_had_its_msrs_set_is_reset_whole(fresh_process_vm, monkeypatch):
    mem = kvmsys.vm().memory(0)
    setup_devices(kvmsys.vm())
    for change in ("ran, an IN pending", "msrs"):
        def first_owner():
            kvmsys.add_vcpu()
            v = kvmsys.current()
            CHANGES[change](v, mem)
            assert ("KVM_RUN" in v.changes) if change.startswith("ran") else v.changes == {"KVM_SET_MSRS"}
        called, v = _setters_of_the_reset(monkeypatch, first_owner)
        kvmsys.remove_vcpu()
        assert {"set_regs", "set_fpu", "set_xsave", "set_msrs", "set_mp_state", "set_vcpu_events",
                "set_debugregs"} <= set(called), (change, called)


@pytest.mark.parametrize("mp_state", [3, 2])         # HALTED, INIT_RECEIVED (need the irqchip)
def test_mp_state_alone_is_reset_with_the_lapic_and_events(monkeypatch, mp_state):
    from kvmsys import syscall
    with syscall.fresh_vm(memory_size=layout.RAM_SIZE, pc_ports=False, irqchip=True):
        def first_owner():
            kvmsys.add_vcpu()
            kvmsys.current().set_mp_state(mp_state)
        called, v = _setters_of_the_reset(monkeypatch, first_owner)
        try:
            assert set(called) == {"set_lapic", "set_mp_state", "set_vcpu_events"}
            with kvmsys.Kvm() as kvm, kvm.create_vm() as ref_vm:
                ref_vm.create_irqchip()
                ref = ref_vm.create_vcpu(v.id)
                assert v.get_mp_state() == ref.get_mp_state() != mp_state
                assert everything(v) == everything(ref)
        finally:
            kvmsys.remove_vcpu()


def test_a_fork_child_cannot_kick_the_parents_running_vcpu(machine):
    """A handle inherited by a fork child names the parent's vCPU: every request on it
    raises StaleVcpuError there and signals no one (the vCPU's thread and lock are the
    parent's), while the parent's vCPU, running in another thread of the parent, goes on
    until the parent's own kick ends its run."""
    from conftest import fork_child, fork_result
    machine.devices().load("pio_out_loop.pm32", n=0)
    h = machine.vcpu.handle()
    got = {}

    def child():
        out = {"alive": h.alive}
        for name, call in (("kick", h.kick), ("interrupt", lambda: h.interrupt(0x40)),
                           ("call_soon", lambda: h.call_soon(print))):
            try:
                call()
                out[name] = "no error"
            except StaleVcpuError:
                out[name] = "stale"
        return out

    def forker():
        wait_until(lambda: machine.vcpu.running, what="the owner's KVM_RUN")
        got.update(fork_result(*fork_child(child)))
        # the owner's run() leaves KVM_RUN for a moment every 10 ms (the main thread's look
        # at Python's signals): wait for it to be back inside, or for its run to have ended
        wait_until(lambda: machine.vcpu.running or not machine.vcpu.active,
                   what="the owner back in KVM_RUN, or its run() ended")
        got["running after"] = machine.vcpu.running
    run_while(machine, h, forker)
    assert got == {"alive": False, "kick": "stale", "interrupt": "stale", "call_soon": "stale",
                   "running after": True}
