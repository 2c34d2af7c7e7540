"""Suite `dispatch`: the cost of getting into the kernel at all.

A no-op vCPU ioctl (KVM_GET_MP_STATE), a VM ioctl (KVM_CHECK_EXTENSION) and a
null system call (getppid), each from C (the core's reference loop) and from
Python (kvmsys's methods over both ABIs, os.getppid)."""
from __future__ import annotations

import fcntl
import os
import time

import kvmsys
from kvmsys import _core

from . import _reference
from .guestvm import one_vcpu
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "dispatch"
TITLE = "Kernel entry: vCPU ioctl, VM ioctl, null syscall"

OPS = {
    "vcpu": "vCPU ioctl KVM_GET_MP_STATE",
    "vm": "VM ioctl KVM_CHECK_EXTENSION",
    "sys": "null syscall getppid()",
}
CAP = _core.CAPABILITIES["USER_MEMORY"]


def _per_call(fn, n: int):
    def sample():
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - t0) / n
    return sample


def _calibrate(fn, sample_ms: float, lo: int = 20, hi: int = 1_000_000) -> int:
    for _ in range(3):
        fn()
    t0 = time.perf_counter_ns()
    for _ in range(50):
        fn()
    per = (time.perf_counter_ns() - t0) / 50
    return max(lo, min(hi, int(sample_ms * 1e6 / per)))


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    res = SuiteResult(NAME, TITLE, columns=[("op", "operation"), ("from", "called from"),
                                            ("time", "per call"), ("ratio", "vs C")])
    with kvmsys.Kvm() as kvm:
        fdg = one_vcpu("fd", kvm=kvm)
        sysg = one_vcpu("sys")
        try:
            n_ref = _calibrate(fdg.vcpu.get_mp_state, profile.sample_ms)
            calls = {
                "vcpu/py_fd": ("vcpu", "Python: `vcpu.get_mp_state()` (fd ABI)", fdg.vcpu.get_mp_state),
                "vcpu/py_sys": ("vcpu", "Python: `kvmsys.current().get_mp_state()` (syscall ABI)",
                                lambda: kvmsys.current().get_mp_state()),
                "vm/py_fd": ("vm", "Python: `vm.check_extension(n)` (fd VM)",
                             lambda: fdg.vm.check_extension(CAP)),
                "vm/py_sys": ("vm", "Python: `kvmsys.vm().check_extension(n)` (process VM)",
                              lambda: kvmsys.vm().check_extension(CAP)),
                "sys/py": ("sys", "Python: `os.getppid()`", os.getppid),
            }
            buf = bytearray(4)                      # struct kvm_mp_state
            vcpu_fd, vm_fd = fdg.vcpu.fileno(), fdg.vm.fileno()
            get_mp, check = _reference.IOCTLS["KVM_GET_MP_STATE"], _reference.IOCTLS["KVM_CHECK_EXTENSION"]
            calls["vcpu/naive"] = ("vcpu", "naive Python: `fcntl.ioctl(fd, KVM_GET_MP_STATE, buf)`",
                                   lambda: fcntl.ioctl(vcpu_fd, get_mp, buf))
            calls["vm/naive"] = ("vm", "naive Python: `fcntl.ioctl(vmfd, KVM_CHECK_EXTENSION, n)`",
                                 lambda: fcntl.ioctl(vm_fd, check, CAP))
            counts = {k: _calibrate(fn, profile.sample_ms) for k, (_o, _l, fn) in calls.items()}

            def reference():
                vcpu_ns, vm_ns, sys_ns = _reference.reference_ioctl_costs(vcpu_fd, vm_fd, n_ref)
                return {"vcpu/c": vcpu_ns / n_ref, "vm/c": vm_ns / n_ref, "sys/c": sys_ns / n_ref}

            variants = {"c": reference}
            variants.update({k: _per_call(fn, counts[k]) for k, (_o, _l, fn) in calls.items()})
            progress(f"{NAME}: C reference {n_ref} calls of each per sample; Python "
                     + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {profile.reps} reps")
            samples = interleave(variants, profile.reps, profile.warmup)
        finally:
            sysg.close()
            fdg.close()
    labels = {f"{op}/c": (op, "C: `reference_ioctl_costs`") for op in OPS}
    labels.update({k: (op, label) for k, (op, label, _fn) in calls.items()})
    for op in OPS:
        for key in [k for k in labels if labels[k][0] == op]:
            res.add_row(key, {"op": OPS[op], "from": labels[key][1]}, {"time": Stat(samples[key], "ns")})
        for key in [k for k in labels if labels[k][0] == op and k != f"{op}/c"]:
            res.rows[key]["stats"]["ratio"] = derive(res.rows, "time", key, f"{op}/c", "ratio")
    res.config = dict(reference_calls=n_ref, python_calls=counts, reps=profile.reps)
    res.notes += [
        f"C: {n_ref} calls of each operation per sample in one `reference_ioctl_costs` call "
        f"(GIL released); Python: calls per sample calibrated to ~{profile.sample_ms:g} ms.",
        "KVM_GET_MP_STATE changes nothing: it stands for any vCPU ioctl (register access, ...); "
        "its cost is the floor under every per-exit ioctl a loop adds.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
