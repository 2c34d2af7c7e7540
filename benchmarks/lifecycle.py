"""Suite `lifecycle`: creating and dropping vCPUs.

KVM never frees a vCPU before its VM is destroyed, and vCPU ids are limited
(KVM_CAP_MAX_VCPU_ID), so the fd and C variants use a fresh VM for every
sample (VM creation is not timed).  The syscall ABI recycles kernel vCPUs:
remove_vcpu() resets one to its initial state and add_vcpu() reuses it."""
from __future__ import annotations

import time

import kvmsys

from kvmsys import syscall
from kvmsys.guests import layout

from . import _reference
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "lifecycle"
TITLE = "vCPU create + destroy"


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
            # one state change (what any use does), so remove_vcpu() must reset the vCPU
            t0 = time.perf_counter_ns()
            for _ in range(b):
                kvmsys.add_vcpu()
                kvmsys.current().set_mp_state(0)        # KVM_MP_STATE_RUNNABLE
                kvmsys.remove_vcpu()
            return (time.perf_counter_ns() - t0) / b

        def sys_new():
            # a fresh process VM: add_vcpu() creates a kernel vCPU and snapshots its state
            kvmsys.destroy_vm()
            kvmsys.vm()
            t0 = time.perf_counter_ns()
            kvmsys.add_vcpu()
            kvmsys.remove_vcpu()
            return time.perf_counter_ns() - t0

        with syscall.fresh_vm(memory_size=layout.RAM_SIZE, pc_ports=False):
            variants = {"c": c_ref, "fd": fd, "sys_recycled": sys_recycled, "sys_ran": sys_ran,
                        "sys_new": sys_new}
            progress(f"{NAME}: {b} vCPUs per sample, {profile.reps} reps")
            samples = interleave(variants, profile.reps, profile.warmup)
            max_id = kvmsys.vm().check_extension("MAX_VCPU_ID")
    labels = {
        "c": f"C reference: KVM_CREATE_VCPU + mmap + munmap + close (`reference_lifecycle`, fresh VM per {b})",
        "fd": f"fd ABI: `vm.create_vcpu(i)` + `close()` (fresh VM per {b})",
        "sys_recycled": "syscall ABI: `add_vcpu()` + `remove_vcpu()`, kernel vCPU recycled",
        "sys_ran": "syscall ABI: `add_vcpu()` + one state change + `remove_vcpu()` (its state is reset on release)",
        "sys_new": "syscall ABI: first `add_vcpu()` + `remove_vcpu()` in a fresh process VM (new kernel vCPU + state snapshot)",
    }
    for key, label in labels.items():
        res.add_row(key, {"what": label}, {"time": Stat(samples[key], "ns")})
        if key != "c":
            res.rows[key]["stats"]["ratio"] = derive(res.rows, "time", key, "c", "ratio")
    res.config = dict(batch=b, reps=profile.reps, max_vcpu_id=max_id)
    res.notes += [
        f"KVM keeps every vCPU until its VM is destroyed and limits ids (KVM_CAP_MAX_VCPU_ID = {max_id} here): "
        f"the C and fd variants therefore create {b} vCPUs (ids 0..{b - 1}) in a fresh VM per sample; "
        "creating and closing the VM is not timed.",
        "The syscall ABI never destroys a kernel vCPU: remove_vcpu() resets it to its initial state "
        "(several vCPU ioctls) and the next add_vcpu() reuses it; its first add_vcpu() in a VM creates "
        "the kernel vCPU and reads that initial state (one sample = one pair, 1 vCPU).",
        f"{profile.reps} interleaved repetitions; ratios per repetition, median (min–max).",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
