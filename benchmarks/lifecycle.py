"""Suite `lifecycle`: creating and dropping vCPUs.

KVM never frees a vCPU before its VM is destroyed, and vCPU ids are limited
(KVM_CAP_MAX_VCPU_ID), so the fd and C variants use a fresh VM for every
sample (VM creation is not timed).  The syscall ABI recycles kernel vCPUs:
remove_vcpu() releases one and the next add_vcpu() resets it to its initial state and reuses it."""
from __future__ import annotations

import time

import kvmsys

from kvmsys import _core, pvm, syscall
from kvmsys.enums import Kind, Space
from kvmsys.guests import get as get_guest, layout

from . import _reference
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "lifecycle"
TITLE = "vCPU create + destroy"


GUEST_EXITS = 50


def _runs_guest(vm, vcpu, run, mode: str) -> tuple:
    """Run pio_out_loop (PIO handled in C) for GUEST_EXITS exits on *vcpu*: (the exit, counter)."""
    from .guestvm import guest_counter, guest_name, set_handling
    mem = vm.memory(0)
    if mode == "long64":
        pvm.enable_native(vcpu, layout.PVM_PAGE)        # as Machine.load (no-op off PVM)
    layout.prepare(get_guest(guest_name("pio_out_loop", mode)), vcpu, mem, n=0)
    set_handling(vm, "pio_out", "c")
    ex = run(budget=GUEST_EXITS)
    return ex, guest_counter(mem)


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    b = profile.lifecycle_batch
    res = SuiteResult(NAME, TITLE, columns=[("what", "operation (one create + one destroy)"),
                                            ("time", "per vCPU"), ("ratio", "vs C reference")])
    with kvmsys.Kvm() as kvm:
        def c_ref():
            vm = kvm.create_vm()
            try:
                return _reference.reference_lifecycle(vm.fileno(), vm.mmap_size, 0, b) / b
            finally:
                vm.close()

        def fd():
            vm = kvm.create_vm()
            try:
                t0 = time.perf_counter_ns()
                for i in range(b):
                    vm.create_vcpu(i).close()
                return (time.perf_counter_ns() - t0) / b
            finally:
                vm.close()

        def sys_recycled():
            # the process VM and its pool of released vCPUs persist across samples
            t0 = time.perf_counter_ns()
            for _ in range(b):
                kvmsys.add_vcpu()
                kvmsys.remove_vcpu()
            return (time.perf_counter_ns() - t0) / b

        def sys_ran():
            # one state change (what any use does), so the vCPU must be reset before its reuse
            t0 = time.perf_counter_ns()
            for _ in range(b):
                kvmsys.add_vcpu()
                kvmsys.current().set_mp_state(0)        # KVM_MP_STATE_RUNNABLE
                kvmsys.remove_vcpu()
            return (time.perf_counter_ns() - t0) / b

        def sys_regs():
            # registers set (the commonest change): only they are restored
            t0 = time.perf_counter_ns()
            for _ in range(b):
                kvmsys.add_vcpu()
                kvmsys.current().set_regs(regs)
                kvmsys.remove_vcpu()
            return (time.perf_counter_ns() - t0) / b

        def sys_after_run():
            # the reset of a vCPU that ran (restored whole): its run and its owner are not timed
            total = 0
            for _ in range(b):
                kvmsys.add_vcpu()
                layout.prepare(guest, kvmsys.current(), kvmsys.vm().memory(0), n=0)
                kvmsys.run(budget=1)
                kvmsys.remove_vcpu()
                t0 = time.perf_counter_ns()
                kvmsys.add_vcpu()
                kvmsys.remove_vcpu()
                total += time.perf_counter_ns() - t0
            return total / b

        def sys_new():
            # a fresh process VM: add_vcpu() creates a kernel vCPU and snapshots its state
            kvmsys.destroy_vm()
            kvmsys.vm()
            t0 = time.perf_counter_ns()
            kvmsys.add_vcpu()
            kvmsys.remove_vcpu()
            return time.perf_counter_ns() - t0

        guest = get_guest("pio_out_loop.pm32")
        with syscall.fresh_vm(memory_size=layout.RAM_SIZE, pc_ports=False):
            kvmsys.vm().set_default(Space.PIO, Kind.IGNORE)     # its out exits handled in C
            kvmsys.add_vcpu()
            regs = dict(kvmsys.current().get_regs(), rax=1)     # a new vCPU's, one changed
            kvmsys.remove_vcpu()
            variants = {"c": c_ref, "fd": fd, "sys_recycled": sys_recycled, "sys_ran": sys_ran,
                        "sys_regs": sys_regs, "sys_after_run": sys_after_run, "sys_new": sys_new}
            progress(f"{NAME}: {b} vCPUs per sample, {profile.reps} reps")
            samples = interleave(variants, profile.reps, profile.warmup)
            max_id = kvmsys.vm().check_extension("MAX_VCPU_ID")
            # what the measured paths made must run: a recycled vCPU (after a state change
            # and its reset) and a created one each run a guest and agree with its counter
            kvmsys.add_vcpu()
            try:
                ran = {"sys": _runs_guest(kvmsys.vm(), kvmsys.current(), kvmsys.run, profile.mode)}
            finally:
                kvmsys.remove_vcpu()
        vm = kvm.create_vm()
        try:
            vm.add_memory(0, 0, layout.RAM_SIZE)
            vcpu = vm.create_vcpu(0)
            ran["fd"] = _runs_guest(vm, vcpu, vcpu.run, profile.mode)
        finally:
            vm.close()
    labels = {
        "c": f"C reference: KVM_CREATE_VCPU + mmap + munmap + close (`reference_lifecycle`, fresh VM per {b})",
        "fd": f"fd ABI: `vm.create_vcpu(i)` + `close()` (fresh VM per {b})",
        "sys_recycled": "syscall ABI: `add_vcpu()` + `remove_vcpu()`, kernel vCPU recycled",
        "sys_ran": "syscall ABI: `add_vcpu()` + one state change + `remove_vcpu()` (its state is reset before its reuse)",
        "sys_regs": "syscall ABI: `add_vcpu()` + `set_regs()` + `remove_vcpu()` (only the registers are restored)",
        "sys_after_run": "syscall ABI: `add_vcpu()` + `remove_vcpu()` of a vCPU that ran under its last owner "
                         "(restored whole; that run not timed)",
        "sys_new": "syscall ABI: first `add_vcpu()` + `remove_vcpu()` in a fresh process VM (new kernel vCPU + state snapshot)",
    }
    for key, label in labels.items():
        res.add_row(key, {"what": label}, {"time": Stat(samples[key], "ns")})
        if key != "c":
            res.rows[key]["stats"]["ratio"] = derive(res.rows, "time", key, "c", "ratio")
    for abi, (ex, counter) in ran.items():
        res.check(f"{abi} run() result", isinstance(ex, _core.BudgetExit),
                  f"{abi}: a vCPU made after the measurements, run(budget={GUEST_EXITS}) returned {ex!r}")
        res.check(f"{abi} guest counter", counter == GUEST_EXITS,
                  f"{abi}: that vCPU's guest counted {counter} exits of {GUEST_EXITS}")
    res.config = dict(batch=b, reps=profile.reps, max_vcpu_id=max_id)
    res.notes += [
        f"KVM keeps every vCPU until its VM is destroyed and limits ids (KVM_CAP_MAX_VCPU_ID = {max_id} here): "
        f"the C and fd variants therefore create {b} vCPUs (ids 0..{b - 1}) in a fresh VM per sample; "
        "creating and closing the VM is not timed.",
        "The syscall ABI never destroys a kernel vCPU: remove_vcpu() releases it and the next add_vcpu() "
        "resets it to its initial state (several vCPU ioctls) and reuses it; "
        "its first add_vcpu() in a VM creates "
        "the kernel vCPU and reads that initial state (one sample = one pair, 1 vCPU).",
        f"{profile.reps} interleaved repetitions; ratios per repetition, median (min–max).",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
