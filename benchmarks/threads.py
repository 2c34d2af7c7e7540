"""Suite `threads`: what it costs to run a vCPU from a different thread each time.

KVM binds a vCPU's state to the host thread that last ran it; moving it costs
the next KVM_RUN extra.  The syscall ABI keeps every vCPU on one thread by
construction; the fd ABI lets any thread run a vCPU.  Each sample is one
run(budget=N) call, timed inside the thread that makes it."""
from __future__ import annotations

import queue
import threading
import time

import kvmsys

from .guestvm import guest_name, mode_label, one_vcpu, set_handling
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "threads"
TITLE = "vCPU moved between threads vs thread-bound"


class _Pool:
    """Threads that each run a job when told to, one at a time, in rotation."""

    def __init__(self, size: int):
        self.inboxes = [queue.Queue() for _ in range(size)]
        self.results: queue.Queue = queue.Queue()
        self.threads = [threading.Thread(target=self._worker, args=(q,), name=f"bench-pool-{i}", daemon=True)
                        for i, q in enumerate(self.inboxes)]
        self.next = 0
        for t in self.threads:
            t.start()

    def _worker(self, inbox) -> None:
        while True:
            job = inbox.get()
            if job is None:
                return
            try:
                self.results.put((True, job()))
            except BaseException as e:      # handed to the caller
                self.results.put((False, e))

    def call_next(self, job):
        """Run job on the next thread of the rotation; return its result."""
        self.inboxes[self.next].put(job)
        self.next = (self.next + 1) % len(self.inboxes)
        ok, value = self.results.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)
        for t in self.threads:
            t.join()


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    n = profile.thread_exits
    name = guest_name("pio_out_loop", profile.mode)
    res = SuiteResult(NAME, TITLE, columns=[
        ("how", "vCPU driven by"), ("time", f"per run(budget={n})"),
        ("per_exit", "per exit"), ("d_bound", "extra vs thread-bound (per switch)"),
        ("d_fd", "extra vs fd one worker thread (per switch)")])
    with kvmsys.Kvm() as kvm:
        fd_same = one_vcpu("fd", name, kvm=kvm, n=0)
        fd_worker = one_vcpu("fd", name, kvm=kvm, n=0)
        fd_rot = one_vcpu("fd", name, kvm=kvm, n=0)
        sysg = one_vcpu("sys", name, n=0)
        pool = _Pool(profile.thread_pool)
        single = _Pool(1)
        try:
            for g in (fd_same, fd_worker, fd_rot, sysg):
                set_handling(g.vm, "pio_out", "c")

            def timed(run):
                def job():
                    t0 = time.perf_counter_ns()
                    run(budget=n)
                    return time.perf_counter_ns() - t0
                return job

            variants = {
                "bound": timed(sysg.run),
                "fd_same": timed(fd_same.run),
                "fd_worker": lambda: single.call_next(timed(fd_worker.run)),
                "fd_rot": lambda: pool.call_next(timed(fd_rot.run)),
            }
            progress(f"{NAME}: {n} exits per sample, pool of {profile.thread_pool} threads, "
                     f"{profile.reps * 3} reps")
            # More repetitions than elsewhere: one sample is short and the effect is one event.
            samples = interleave(variants, profile.reps * 3, profile.warmup)
            native = sysg.native
        finally:
            pool.close()
            single.close()
            sysg.close()
            fd_same.close()
            fd_worker.close()
            fd_rot.close()
    labels = {
        "bound": "syscall ABI: thread-bound vCPU (always the same thread)",
        "fd_same": "fd ABI: always the same thread (the main thread, like the bound one)",
        "fd_worker": "fd ABI: always the same worker thread (handed work like the pool)",
        "fd_rot": f"fd ABI: rotating pool of {profile.thread_pool} threads (a new thread every run)",
    }
    for key, label in labels.items():
        res.add_row(key, {"how": label}, {"time": Stat(samples[key], "ns"),
                                          "per_exit": Stat([s / n for s in samples[key]], "ns")})
    rot = res.rows["fd_rot"]["stats"]
    rot["d_bound"] = derive(res.rows, "time", "fd_rot", "bound", "difference")
    rot["d_fd"] = derive(res.rows, "time", "fd_rot", "fd_worker", "difference")
    res.config = dict(mode=profile.mode, guest=name, exits_per_sample=n, pool=profile.thread_pool,
                      reps=profile.reps * 3)
    res.notes += [
        f"Guest {name}, mode {mode_label(profile.mode, native)}; PIO handled in C; each sample is one "
        f"run(budget={n}) call timed inside the thread that makes it ({profile.reps * 3} interleaved reps).",
        "Every rotating sample is one move of the vCPU to another thread, so "
        "(rotating − same thread) per sample is the cost of one switch; shown per repetition, "
        "median (min–max).  The fixed worker thread separates the switch from any difference "
        "between the main thread and a worker thread.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
