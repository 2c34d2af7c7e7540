"""One path sets up a kernel vCPU (issue 17, item 1): creation, recycling and the move
onto a new kernel vCPU (set_cpuid2 of a recycled vCPU, replace_kernel_vcpu) give the
same vCPU, property by property, and the moved one runs, stops at its deadline, is
kicked and takes Ctrl-C like a brand-new one.

The checks run in a fresh interpreter: on a build where the move loses the run
loop's signal set-up, run() of a guest that never exits never returns."""
import json
import subprocess
import sys
import tempfile
import textwrap

import pytest

SCRIPT = r"""
import faulthandler, json, os, signal, struct, sys, threading, time
faulthandler.dump_traceback_later(60, exit=True)        # a hang fails, never stalls the suite
import kvmsys
from kvmsys import syscall
from kvmsys.guests import get, layout as L

ABI = sys.argv[1]
PAGE, SLOT, BASE = 4096, 1, 0x400000
JMP_SELF = b"\xeb\xfe"
kvm = kvmsys.Kvm()
cpuid = kvm.supported_cpuid()


def writer(count):
    # pm32: one byte to each of *count* pages of slot 1, then out 0xf4 (debug exit)
    return (b"\xBF" + struct.pack("<I", BASE) + b"\xB9" + struct.pack("<I", count)
            + b"\xC6\x07\x5A\x81\xC7" + struct.pack("<I", PAGE) + b"\xE2\xF5"
            + bytes([0xB0, 0, 0xE6, L.PORT_DEBUG_EXIT]))


def load(vcpu, mem, code):
    L.prepare(get("compute.pm32"), vcpu, mem)
    mem[L.LOAD_ADDR:L.LOAD_ADDR + len(code)] = code


def props(v, vm):
    # everything a kernel vCPU gets, as its owner sees it
    s = v.stats()
    return dict(
        signal_mask=v.signal_mask, guest_debug=v.guest_debug, has_run=v.has_run,
        run_before=v.run_before, irreversible=v.irreversible, running=v.running, active=v.active,
        stale=v.stale, closed=v.closed, registered=v.id in vm.vcpu_ids,
        stats={k: s[k] for k in ("exits", "total_exits", "handler_hits", "default_hits", "runs",
                                 "coalesced")},
        pending=v.pending_interrupts, immediate_exit=v.immediate_exit,
        window=v.request_interrupt_window, comm_area=len(v.comm_area), regs=v.get_regs(),
        sync_regs=v.regs.rip, sync_sets=(int(v.sync_valid_regs), int(v.sync_dirty_regs)),
        sync_sregs=v.sync_sregs.as_dict(), sregs=v.get_sregs(), cpuid=v.get_cpuid2(), mp=int(v.get_mp_state()),
        events=bytes(v.get_vcpu_events()).hex(), fpu=bytes(v.get_fpu()).hex(),
        xcrs=bytes(v.get_xcrs()).hex(), xsave_size=v.xsave_size,
        dirty=v.harvest_dirty_ring() if vm.dirty_ring_size else None,
        kvm_stats=sorted(v.kvm_stats()) if vm.check_extension("BINARY_STATS_FD") else None)


if ABI == "fd":
    vm = kvm.create_vm()
    mem = vm.add_memory(0, 0, L.RAM_SIZE)
else:
    syscall.configure(memory_size=L.RAM_SIZE, pc_ports=False)
    vm = kvmsys.vm()
    mem = vm.memory(0)
if vm.check_extension("DIRTY_LOG_RING"):
    vm.enable_dirty_ring(16 * PAGE)
vm.add_memory(SLOT, BASE, 64 * PAGE, log_dirty=True)
vm.add_handler(kvmsys.Space.PIO, L.PORT_DEBUG_EXIT, L.PORT_DEBUG_EXIT + 1, kvmsys.Kind.EXIT)

if ABI == "fd":
    v = vm.create_vcpu(0)
    load(v, mem, JMP_SELF)
    assert v.run(timeout=0.05).name == "DEADLINE"
    v.set_sync_valid_reg(kvmsys.SyncReg.SREGS | kvmsys.SyncReg.EVENTS)     # the owner's choices
    v.sync_sregs.cr2 = 0x1000                                               # and an unsent write
    v.replace_kernel_vcpu(1)
    v.set_cpuid2(cpuid)
    fresh = vm.create_vcpu(2)
    fresh.set_cpuid2(cpuid)
    new = props(fresh, vm)
    run = v.run
else:
    kvmsys.add_vcpu()
    load(kvmsys.current(), mem, JMP_SELF)
    assert kvmsys.run(timeout=0.05).name == "DEADLINE"
    kvmsys.current().set_sync_valid_reg(kvmsys.SyncReg.SREGS | kvmsys.SyncReg.EVENTS)
    kvmsys.current().sync_sregs.cr2 = 0x1000
    kvmsys.remove_vcpu()
    kvmsys.add_vcpu()
    v = kvmsys.current()
    assert v.run_before and v.id == 0
    v.set_cpuid2(cpuid)                     # KVM refuses it on a vCPU that ran: moved
    assert v.id != 0 and kvmsys.vcpus() == {v.id: v}, (v.id, kvmsys.vcpus())
    got = {}
    def brand_new():
        kvmsys.add_vcpu()
        kvmsys.current().set_cpuid2(cpuid)
        got["new"] = props(kvmsys.current(), vm)
        kvmsys.remove_vcpu()
    t = threading.Thread(target=brand_new)
    t.start()
    t.join()
    new = got["new"]
    run = kvmsys.run
moved = props(v, vm)
diff = {k: (moved[k], new[k]) for k in new if moved[k] != new[k]}
assert not diff, diff

# it runs: to its deadline, and a kick, and a Ctrl-C, end a guest that never exits
load(v, mem, JMP_SELF)
t0 = time.monotonic()
ex = run(timeout=0.3)
assert ex.name == "DEADLINE" and time.monotonic() - t0 < 5, (ex, time.monotonic() - t0)
h = v.handle()
threading.Timer(0.2, h.kick).start()
assert run(timeout=20).name == "KICK"
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    run(timeout=20)
    raise AssertionError("Ctrl-C did not stop run()")
except KeyboardInterrupt:
    assert time.monotonic() - t0 < 5
# its dirty ring is its own: a guest writing 50 pages logs 50 pages in it
if vm.dirty_ring_size:
    load(v, mem, writer(50))
    ex = run(timeout=10)
    assert ex.name == "STOP", ex
    pages = {p for s, p in v.harvest_dirty_ring() if s == SLOT}
    assert pages == set(range(50)), sorted(pages)
print(json.dumps(dict(ok=True, id=v.id, dirty_ring=bool(vm.dirty_ring_size))))
"""


@pytest.mark.timeout(180)
def test_a_moved_vcpu_is_a_brand_new_one(abi):
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), abi], capture_output=True,
                       timeout=120, cwd=tempfile.gettempdir())
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    out = json.loads(p.stdout.decode().splitlines()[-1])
    assert out["ok"] and out["id"] != 0


def test_replace_kernel_vcpu_moves_the_binding(fresh_process_vm):
    # called directly on a bound vCPU: the binding table follows the new id
    import kvmsys
    kvmsys.add_vcpu()
    v = kvmsys.current()
    v.replace_kernel_vcpu(5)
    assert v.id == 5 and kvmsys.vcpus() == {5: v}
    kvmsys.remove_vcpu()
    assert kvmsys.vcpus() == {}
