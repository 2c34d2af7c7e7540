"""Suite `scaling`: aggregate exit throughput with 1..N threads, each with its
own syscall-ABI vCPU, and how the host scheduler treats those threads.

Every thread runs pio_out_loop (PIO handled in C) for a fixed time.  Per vCPU
we read the thread's migrations between host CPUs (se.nr_migrations in
/proc/self/task/<tid>/sched) and its voluntary/involuntary context switches
(/proc/self/task/<tid>/status).  Every placement policy kvmsys offers
(kvmsys.placement.POLICIES) is measured, interleaved with the others."""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from kvmsys import _core
from kvmsys.machine import Machine

from .guestvm import guest_name, mode_label, set_handling
from .harness import SuiteResult, Stat, derive, progress

NAME = "scaling"
TITLE = "Threads × vCPUs: aggregate exits/s, migrations, context switches"


@dataclass(frozen=True)
class Placement:
    name: str
    description: str
    apply: Callable[[], None]           # in the main thread, before a measurement


_DESCRIPTIONS = {
    "float": "the kernel scheduler places the threads (the process's CPU set)",
    "pin": "vCPU i pinned to host CPU i mod n",
    "balance": "the VM's vCPUs spread over different host CPUs",
}


def placements() -> list[Placement]:
    """The placement policies this kvmsys has, each applied to all bound vCPUs."""
    try:
        from kvmsys import placement as _pl
    except ImportError:                 # a kvmsys without placement policies: the scheduler decides
        return [Placement("float", _DESCRIPTIONS["float"], lambda: None)]
    from kvmsys import syscall
    return [Placement(p, _DESCRIPTIONS.get(p, p), (lambda p=p: syscall.set_placement(p)))
            for p in _pl.POLICIES]


def thread_counts(maximum: int) -> list[int]:
    """1, 2, 3, 4, then roughly ×1.5 steps, always ending at maximum (and the core count)."""
    counts = {k for k in range(1, min(4, maximum) + 1)}
    k = 4
    while k < maximum:
        k = int(k * 1.5)
        counts.add(min(k, maximum))
    cores = os.cpu_count() or 1
    if cores <= maximum:
        counts.add(cores)
    counts.add(maximum)
    return sorted(counts)


def _read_task(tid: int) -> dict:
    """Scheduler counters of one thread of this process (None where the kernel lacks them)."""
    out = dict(migrations=None, voluntary=None, involuntary=None)
    try:
        with open(f"/proc/self/task/{tid}/sched") as f:
            for line in f:
                if line.startswith("se.nr_migrations"):
                    out["migrations"] = int(line.split(":")[1])
    except OSError:
        pass
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    out["voluntary"] = int(line.split(":")[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    out["involuntary"] = int(line.split(":")[1])
    except OSError:
        pass
    return out


class _Worker:
    """A thread with its own syscall-ABI vCPU, running the guest when told to."""

    def __init__(self, index: int, machine, name: str, setup_lock: threading.Lock):
        self.index, self.machine, self.name, self.setup_lock = index, machine, name, setup_lock
        self.exits = 0
        self.odd: list = []             # run() results other than the BudgetExit asked for
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._main, name=f"bench-scale-{index}", daemon=True)
        self.thread.start()
        ok, value = self.results.get()
        if not ok:
            raise value
        self.native = value

    def _main(self) -> None:
        try:
            with self.setup_lock:           # the guest image is shared: load it before anyone runs
                self.vcpu = self.machine.attach()
                self.run = self.machine.runner(self.vcpu)
                native = self.machine.load(self.name, self.vcpu, n=0)
            self.tid = threading.get_native_id()
            self.results.put((True, native))
        except BaseException as e:
            self.results.put((False, e))
            return
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                try:
                    self.results.put((True, job(self)))
                except BaseException as e:
                    self.results.put((False, e))
        finally:
            self.machine.detach(self.vcpu)

    def call(self, job):
        self.jobs.put(job)

    def result(self):
        ok, value = self.results.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def _step_job(barrier: threading.Barrier, seconds: float, budget: int):
    def job(w: _Worker) -> dict:
        before = _read_task(w.tid)
        barrier.wait()
        t0 = time.perf_counter_ns()
        end = t0 + int(seconds * 1e9)
        exits = 0
        run, budget_exit = w.run, _core.BudgetExit
        while time.perf_counter_ns() < end:
            ex = run(budget=budget)
            if ex.__class__ is budget_exit:
                exits += budget
            else:
                w.odd.append(repr(ex))
        t1 = time.perf_counter_ns()
        after = _read_task(w.tid)
        w.exits += exits
        delta = {k: (after[k] - before[k]) if after[k] is not None and before[k] is not None else None
                 for k in before}
        return dict(exits=exits, t0=t0, t1=t1, **delta)
    return job


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    maximum = profile.scaling_max or 2 * (os.cpu_count() or 1)
    counts = thread_counts(maximum)
    seconds = profile.scaling_seconds
    reps = profile.scaling_reps
    PLACEMENTS = placements()
    name = guest_name("pio_out_loop", profile.mode)
    res = SuiteResult(NAME, TITLE, columns=[
        ("placement", "placement"), ("threads", "vCPU threads"), ("rate", "exits/s, all vCPUs"),
        ("speedup", "vs 1 thread"), ("per_vcpu", "exits/s per vCPU"),
        ("migrations", "migrations/s per vCPU"), ("voluntary", "voluntary cs/s per vCPU"),
        ("involuntary", "involuntary cs/s per vCPU")])
    raw: dict = {}
    with Machine("sys") as machine:
        set_handling(machine.vm, "pio_out", "c")
        lock = threading.Lock()
        workers = []
        try:
            for i in range(maximum):
                workers.append(_Worker(i, machine, name, lock))
            # exits per run() call: a few ms, so the time check costs nothing
            w0 = workers[0]

            def probe(w):
                w.run(budget=20)
                t0 = time.perf_counter_ns()
                w.run(budget=50)
                w.exits += 70
                return (time.perf_counter_ns() - t0) / 50
            w0.call(probe)
            per_exit = w0.result()
            budget = max(10, int(2e6 / per_exit))
            progress(f"{NAME}: threads {counts}, {seconds:g} s each, {reps} reps, "
                     f"placements {[p.name for p in PLACEMENTS]}")
            for rep in range(reps):
                for placement in PLACEMENTS:
                    placement.apply()
                    for k in counts:
                        barrier = threading.Barrier(k)
                        job = _step_job(barrier, seconds, budget)
                        for w in workers[:k]:
                            w.call(job)
                        per_thread = [w.result() for w in workers[:k]]
                        raw.setdefault((placement.name, k), []).append(per_thread)
            counter = machine.counter()
            counted = sum(w.exits for w in workers)
            odd = [x for w in workers for x in w.odd]
            native = workers[0].native
        finally:
            for w in workers:
                w.close()

    def mean_rate(per_thread, key):
        vals = [t[key] / ((t["t1"] - t["t0"]) / 1e9) for t in per_thread if t[key] is not None]
        return sum(vals) / len(vals) if vals else None

    for placement in PLACEMENTS:
        for k in counts:
            runs = raw[(placement.name, k)]
            rate = [sum(t["exits"] for t in r) / ((max(t["t1"] for t in r) - min(t["t0"] for t in r)) / 1e9)
                    for r in runs]
            stats = {"rate": Stat(rate, "1/s"), "per_vcpu": Stat([x / k for x in rate], "1/s")}
            for key in ("migrations", "voluntary", "involuntary"):
                vals = [mean_rate(r, key) for r in runs]
                if all(v is not None for v in vals):
                    stats[key] = Stat(vals, "count")
            res.add_row(f"{placement.name}/{k}", {"placement": placement.name, "threads": k}, stats,
                        {"per_thread": [[dict(t) for t in r] for r in runs]})
        base = f"{placement.name}/1"
        for k in counts:
            if k != 1 and min(res.rows[base]["stats"]["rate"].samples) > 0:    # else a check failed
                res.rows[f"{placement.name}/{k}"]["stats"]["speedup"] = derive(
                    res.rows, "rate", f"{placement.name}/{k}", base, "ratio")
    res.check("run() results", not odd, "every run(budget) returned its BudgetExit" if not odd
              else f"{len(odd)} runs ended otherwise: {odd[:3]}")
    res.check("guest counter", counter == counted % (1 << 32),
              f"all vCPUs share one guest counter: {counter}, the threads counted {counted}")
    res.config = dict(mode=profile.mode, guest=name, thread_counts=counts, seconds=seconds,
                      budget=budget, reps=reps, placements=[p.name for p in PLACEMENTS])
    res.notes += [
        f"Guest {name}, mode {mode_label(profile.mode, native)}; one syscall-ABI vCPU per thread in the "
        f"process VM, PIO handled in C, run(budget={budget}) in a loop for {seconds:g} s per measurement; "
        f"{os.cpu_count()} cores; {reps} repetitions, the placements and thread counts interleaved within each.",
        "Placements: " + "; ".join(f"`{p.name}` = {p.description}" for p in PLACEMENTS) + ".",
        "exits/s, all vCPUs = exits of all threads / wall time from the first start to the last end; "
        "vs 1 thread = that rate over the 1-thread rate of the same repetition.  Migrations and context "
        "switches: per second of each thread's run, mean over its vCPUs; median (min–max) over repetitions.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
