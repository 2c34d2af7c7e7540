"""Suite `memory`: resident memory per vCPU.

RSS of this process (psutil) before and after adding K vCPUs, divided by K.
The syscall ABI needs a thread per vCPU, so K threads without a vCPU are
measured too: the difference is what the vCPU itself adds.  Kernel memory of a
vCPU is not in RSS; the comm area is, once touched."""
from __future__ import annotations

import gc
import threading
import time

import kvmsys
import psutil

from kvmsys import syscall
from kvmsys.guests import layout

from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "memory"
TITLE = "Resident memory per vCPU"


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _with_threads(k: int, body, measure) -> int:
    """Start k threads that each run body() and wait; measure() once all are ready."""
    ready = threading.Barrier(k + 1)
    release = threading.Event()
    errors = []

    def worker():
        try:
            body()
        except BaseException as e:
            errors.append(e)
        finally:
            try:
                ready.wait()
            except threading.BrokenBarrierError:
                pass
            release.wait()
            if kvmsys.current() is not None:
                kvmsys.remove_vcpu()

    threads = [threading.Thread(target=worker, name=f"bench-mem-{i}", daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    try:
        ready.wait(60)
        if errors:
            raise errors[0]
        return measure()
    finally:
        release.set()
        for t in threads:
            t.join()


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    k = profile.memory_k
    res = SuiteResult(NAME, TITLE, columns=[("what", f"added (K = {k})"), ("rss", "RSS per item"),
                                            ("net", "minus one idle thread")])

    with kvmsys.Kvm() as kvm:
        def fd():
            vm = kvm.create_vm()
            vcpus = []
            try:
                before = _rss()
                vcpus = [vm.create_vcpu(i) for i in range(k)]
                return (_rss() - before) / k
            finally:
                del vcpus
                vm.close()

        def sys_threads():
            with syscall.fresh_vm(memory_size=layout.RAM_SIZE, pc_ports=False):
                kvmsys.vm()
                before = _rss()
                return (_with_threads(k, kvmsys.add_vcpu, _rss) - before) / k

        def idle_threads():
            before = _rss()
            return (_with_threads(k, lambda: None, _rss) - before) / k

        variants = {"fd": fd, "sys": sys_threads, "threads": idle_threads}
        progress(f"{NAME}: K={k}, {profile.reps} reps")
        samples = interleave(variants, profile.reps, profile.warmup)
    labels = {
        "fd": "fd ABI: `vm.create_vcpu()` × K (one VM)",
        "sys": "syscall ABI: K threads, each `add_vcpu()` (fresh process VM)",
        "threads": "K idle threads, no vCPU (for comparison)",
    }
    for key, label in labels.items():
        res.add_row(key, {"what": label}, {"rss": Stat(samples[key], "bytes")})
    res.rows["sys"]["stats"]["net"] = derive(res.rows, "rss", "sys", "threads", "difference")
    res.config = dict(k=k, reps=profile.reps, page_size=psutil.PAGESIZE if hasattr(psutil, "PAGESIZE") else None)
    res.notes += [
        f"RSS (psutil, after gc) before and after adding K = {k} vCPUs, divided by K; "
        f"{profile.reps} interleaved repetitions, each in a fresh VM; median (min–max).",
        "RSS counts user-space pages only: the kernel's own per-vCPU memory is not included.  "
        "The syscall ABI's state snapshot for recycling (registers, FPU, XSAVE, ...) is included.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
