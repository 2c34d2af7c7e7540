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
from kvmsys import _core

from . import _reference
from .guestvm import PairedFd, guest_name, mode_label, one_vcpu, set_handling
from .harness import SuiteResult, Stat, bootstrap_ci, derive, interleave, progress

NAME = "threads"
FD_KEYS = ("fd_same", "fd_worker", "fd_rot", "fd_new")
TITLE = "vCPU moved between threads vs thread-bound"


def _in_new_thread(job):
    """Run job in a thread made for it; return its result (its creation is not in it)."""
    out: list = []

    def main():
        try:
            out.append((True, job()))
        except BaseException as e:      # handed to the caller
            out.append((False, e))
    t = threading.Thread(target=main, name="bench-new")
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


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


def _settled(diff: list, tight_ns: float) -> tuple:
    """(done, verdict) for the median of a per-switch cost: its 95% CI excludes zero, or
    bounds it within ±tight_ns."""
    lo, hi = bootstrap_ci(diff)
    if lo > 0 or hi < 0:
        return True, f"95% CI [{lo / 1e3:.1f}, {hi / 1e3:.1f}] µs excludes zero"
    if hi - lo <= 2 * tight_ns:
        return True, f"95% CI [{lo / 1e3:.1f}, {hi / 1e3:.1f}] µs includes zero, bounded within ±{tight_ns / 1e3:g} µs"
    return False, f"95% CI [{lo / 1e3:.1f}, {hi / 1e3:.1f}] µs includes zero (not settled)"


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    n = profile.thread_exits
    name = guest_name("pio_out_loop", profile.mode)
    res = SuiteResult(NAME, TITLE, columns=[
        ("how", "vCPU driven by"), ("time", f"per run of {n} exits"),
        ("d_bound", "extra per switch vs thread-bound [95% CI]"),
        ("d_fd", "extra per switch vs one fixed worker thread [95% CI]")])
    batch = profile.reps * 3
    with kvmsys.Kvm() as kvm:
        # every variant on a vCPU of one VM, the process VM (two VMs differ in the kernel's
        # time per exit): the thread-bound one is its vCPU 0, the fd variants and the C
        # reference vCPUs 1.. of it through the fd ABI (PairedFd); they run one at a time
        # and share the guest's counter
        sysg = one_vcpu("sys", name, n=0)
        paired: list = []
        try:
            for i, key in enumerate(FD_KEYS + ("c",)):
                paired.append(PairedFd(sysg, kvm, name, vcpu_id=i + 1, n=0))
        except BaseException:
            for p in paired:
                p.close()
            sysg.close()
            raise
        vcpus = {key: p.vcpu for key, p in zip(FD_KEYS + ("c",), paired)}
        ref = _reference.RefVcpu(vcpus["c"].fileno(), sysg.vm.mmap_size)
        pool = _Pool(profile.thread_pool)
        single = _Pool(1)
        try:
            for g in [sysg] + paired:
                set_handling(g.vm, "pio_out", "c")

            ran = {}                    # exits each machine's runs made, by machine
            odd = []                    # runs that ended otherwise than by their budget

            def timed(run, key):
                ran[key] = 0

                def job():
                    t0 = time.perf_counter_ns()
                    ex = run(budget=n)
                    t1 = time.perf_counter_ns()
                    if isinstance(ex, _core.BudgetExit):
                        ran[key] += n
                    else:
                        odd.append(f"{key}: {ex!r}")
                    return t1 - t0
                return job

            variants = {
                "bound": timed(sysg.run, "bound"),
                "fd_same": timed(vcpus["fd_same"].run, "fd_same"),
                "fd_worker": (lambda job: lambda: single.call_next(job))(timed(vcpus["fd_worker"].run, "fd_worker")),
                "fd_rot": (lambda job: lambda: pool.call_next(job))(timed(vcpus["fd_rot"].run, "fd_rot")),
                "fd_new": (lambda job: lambda: _in_new_thread(job))(timed(vcpus["fd_new"].run, "fd_new")),
            }
            c_runs = 0
            progress(f"{NAME}: {n} exits per sample, pool of {profile.thread_pool} threads, "
                     f"batches of {batch} reps until the switch costs are settled (at most "
                     f"{profile.thread_batches} batches)")
            # One sample is short and the effect is one event: batches of repetitions until
            # the confidence intervals of both switch costs settle.
            samples: dict = {}
            c_samples: dict = {}
            verdicts = {}
            for b in range(profile.thread_batches):
                for k, v in interleave(variants, batch, profile.warmup if b == 0 else 0).items():
                    samples.setdefault(k, []).extend(v)
                c_reps = batch + (profile.warmup if b == 0 else 0)
                for k, v in ref.thread_switch(n, profile.thread_pool, c_reps).items():
                    c_samples.setdefault(k, []).extend(v[profile.warmup:] if b == 0 else v)
                c_runs += 4 * c_reps
                py_diff = [x - y for x, y in zip(samples["fd_rot"], samples["fd_worker"])]
                c_diff = [x - y for x, y in zip(c_samples["rotating"], c_samples["worker"])]
                verdicts = {"py": _settled(py_diff, profile.thread_tight_ns),
                            "c": _settled(c_diff, profile.thread_tight_ns)}
                if all(done for done, _v in verdicts.values()):
                    break
            native = sysg.native
            counters = {"the VM's": (sysg.counter(), ran["bound"] + sum(ran[k] for k in FD_KEYS) + c_runs * n)}
        finally:
            pool.close()
            single.close()
            ref.close()
            for p in paired:
                p.close()
            sysg.close()
    labels = {
        "bound": "syscall ABI: thread-bound vCPU (always the same thread)",
        "fd_same": "fd ABI: always the same thread (the main thread, like the bound one)",
        "fd_worker": "fd ABI: always the same worker thread (handed work like the pool)",
        "fd_rot": f"fd ABI: rotating pool of {profile.thread_pool} threads (another thread every run)",
        "fd_new": "fd ABI: a thread created for each run (creation not timed)",
        "c/caller": "C reference: the calling thread",
        "c/worker": "C reference: one fixed worker pthread",
        "c/rotating": f"C reference: rotating pool of {profile.thread_pool} pthreads",
        "c/new": "C reference: a pthread created for each run (creation not timed)",
    }
    for key, label in labels.items():
        src = c_samples[key[2:]] if key.startswith("c/") else samples[key]
        res.add_row(key, {"how": label}, {"time": Stat(src, "ns")})
    rot = res.rows["fd_rot"]["stats"]
    rot["d_bound"] = derive(res.rows, "time", "fd_rot", "bound", "difference")
    rot["d_fd"] = derive(res.rows, "time", "fd_rot", "fd_worker", "difference")
    new = res.rows["fd_new"]["stats"]
    new["d_bound"] = derive(res.rows, "time", "fd_new", "bound", "difference")
    new["d_fd"] = derive(res.rows, "time", "fd_new", "fd_worker", "difference")
    for key in ("c/rotating", "c/new"):
        st = res.rows[key]["stats"]
        st["d_bound"] = derive(res.rows, "time", key, "c/caller", "difference")
        st["d_fd"] = derive(res.rows, "time", key, "c/worker", "difference")
    reps = len(samples["fd_rot"])
    res.check("runs ended by their budget", not odd,
              "every run(budget) returned its BudgetExit" if not odd else f"runs ended otherwise: {odd[:5]}")
    for key, (counter, counted) in counters.items():
        res.check(f"{key} guest counter", counter == counted % (1 << 32),
                  f"{key}: guest counter {counter}, the runs made {counted} exits")
    res.config = dict(mode=profile.mode, guest=name, exits_per_sample=n, pool=profile.thread_pool,
                      reps=reps, c_reps=len(c_samples["rotating"]),
                      verdicts={k: v[1] for k, v in verdicts.items()})
    res.notes += [
        f"Guest {name}, mode {mode_label(profile.mode, native)}; PIO handled in C; each sample is one "
        f"run(budget={n}) call timed inside the thread that makes it; {reps} interleaved repetitions "
        f"(batches of {batch} until both switch costs settled, at most {profile.thread_batches} batches).",
        "Every rotating (or new-thread) sample is one move of the vCPU to another thread, so (rotating − "
        "fixed worker) per repetition is the cost of one switch (paired samples); the fixed worker separates "
        "the switch from any difference between the main thread and a worker thread.",
        f"C reference: the same rotation done from C (`RefVcpu.thread_switch`: pthreads handed the vCPU "
        f"through semaphores, {n} exits per sample with minimal handling), on its own vCPU.  Every variant has a vCPU of "
        "one VM, the process VM: the thread-bound one its vCPU 0, the fd variants and the C reference "
        "vCPUs 1.. of the same kernel VM through the fd ABI (a `Vm` over a duplicate of its fd); the "
        "guest's counter, shared by them all, is checked against the exits all their runs made.",
        f"Per switch, fd ABI in kvmsys: {verdicts['py'][1]}; C reference: {verdicts['c'][1]}.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
