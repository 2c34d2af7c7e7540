"""Suite `kick`: latency from handle.kick() in one thread until the target
thread's run() has returned, against the C floor on the same vCPU.

The target thread runs an endless guest; the kicking thread waits a random
moment (so the kick lands anywhere in the guest's rhythm), notes
time.perf_counter_ns(), kicks and blocks on a lock at once (as the C floor's
kicker blocks on a semaphore: on a host where both threads share a core, what
the kicker does before it sleeps delays the target); the target notes the time
right after run() returns.  Only one target runs at a time.  The C floor runs
the same vCPU (its own pthread, kvmsys's target thread parked meanwhile), so
both see one VM's exit and signal costs; both targets run on one CPU and the kicker
on another (a kick whose target shares the kicker's CPU needs no cross-CPU signal,
and costs half as much on our host).  Each kick is also cut where kvmsys's
own clocks see it: kick() called → signal sent (the kicker's clock just before
pthread_kill) → KVM_RUN returned EINTR (the run loop's clock) → run() returned.
Between the two, the Python floor: the same threads and Python code calling bare C
(RefVcpu.bare_kick / bare_run) instead of kvmsys, so the interpreter's share (calling in
after a sleep, retaking the GIL, returning) and kvmsys's own are told apart."""
from __future__ import annotations

import os
import queue
import random
import threading
import time

import kvmsys
from kvmsys import _core

from . import _reference
from .guestvm import guest_name, mode_label, one_vcpu, set_handling
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "kick"
TITLE = "Kick latency (handle.kick() → run() returned)"

# What the target runs: an exit every few µs (handled in C), or no exits at all.
GUESTS = {
    "exits": ("pio_out_loop", dict(n=0), "guest exiting continuously (PIO handled in C)"),
    "compute": ("compute", dict(n=0xFFFFFFFF), "guest computing, no exits"),
}


class _Target:
    """A thread that owns one vCPU and runs it once per request."""

    def __init__(self, abi: str, kvm, mode: str, cpu: int | None = None):
        self.abi, self.kvm, self.mode, self.cpu = abi, kvm, mode, cpu
        self.requests: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.in_run = threading.Event()
        self.done = threading.Lock()    # released by the target when a kicked run() returned
        self.done.acquire()
        self.last = None                # (ok, value) of that run
        self.otherwise: list = []       # how runs ended that a kick did not end
        self.runs = 0                   # runs of the exiting guest, checked against its counter
        self.mismatches: list = []      # where the guest's counter and the run loop disagreed
        self.native = False
        self.thread = threading.Thread(target=self._main, name=f"bench-kick-{abi}", daemon=True)
        self.thread.start()
        ok, value = self.results.get()
        if not ok:
            raise value
        self.handle = value

    def _main(self) -> None:
        try:
            self.g = one_vcpu(self.abi, kvm=self.kvm)
            if self.cpu is not None:    # after add_vcpu(), whose placement policy sets it too
                os.sched_setaffinity(0, {self.cpu})
            self.cpus = sorted(os.sched_getaffinity(0))     # checked by run()
            set_handling(self.g.vm, "pio_out", "c")
            self.fd = self.g.vcpu.fileno()
            self.results.put((True, self.g.vcpu.handle()))
        except BaseException as e:
            self.results.put((False, e))
            return
        try:
            while True:
                which = self.requests.get()
                if which is None:
                    return
                if isinstance(which, tuple) and which[0] == "load":    # for the C floor on this vCPU
                    try:
                        self._load(which[1])
                        self.results.put((True, None))
                    except BaseException as e:
                        self.results.put((False, e))
                    continue
                try:
                    self.last = (True, self._one(which))
                except BaseException as e:
                    self.last = (False, e)
                finally:
                    self.done.release()
        finally:
            self.g.close()

    def _one(self, which):
        if isinstance(which, tuple):        # ("bare", guest, RefVcpu): the Python floor
            _bare, guest, ref = which
            self._load(guest)
            ref.bare_arm(_core.kick_signal())
            self.in_run.set()
            run, now = ref.bare_run, time.perf_counter_ns
            intr = run()
            t1 = now()
            self.in_run.clear()
            return t1, "KICK", (ref.bare_sent_ns, intr, None)
        if which == "drain":
            # absorb a kick sent after run() had already returned (it is never lost)
            return time.perf_counter_ns(), self.g.run(timeout=1.0).name, None
        self._load(which)
        c0, io0 = self.g.counter(), self._io_exits()
        self.in_run.set()
        run, now = self.g.run, time.perf_counter_ns
        ex = run()
        t1 = now()
        clocks = self.g.vcpu._kick_clock()
        self.in_run.clear()
        if which == "exits":
            # the guest counts each out it starts: one more than the exits if the kick
            # came between its count and its out
            counted, exits = (self.g.counter() - c0) % (1 << 32), self._io_exits() - io0
            self.runs += 1
            if not 0 <= counted - exits <= 1 or exits <= 0:
                self.mismatches.append(f"guest counted {counted}, the run loop {exits} exits")
        return t1, ex.name, clocks

    def _load(self, which: str) -> None:
        # Before every sample of every loop, whichever ran last: all start alike (the
        # rounds' order is drawn), and the exiting guest's count check needs a run that
        # starts where its loop does (one that starts between a count and its out
        # counts one less)
        base, inputs, _label = GUESTS[which]
        self.native = self.g.load(guest_name(base, self.mode), **inputs)

    def load(self, which: str) -> None:
        """Have the target load *which* (it stays parked): for the C floor on its vCPU."""
        self.requests.put(("load", which))
        ok, value = self.results.get()
        if not ok:
            raise value

    def _io_exits(self) -> int:
        return self.g.vcpu.stats()["exits"].get("IO", 0)

    def _wait(self):
        self.done.acquire()
        ok, value = self.last
        if not ok:
            raise value
        return value

    def sample(self, which: str, delay_s: float, bare=None) -> dict | None:
        """One kick: {"time": latency, "signal"/"kvm"/"back": its segments} in ns (a
        segment None where kvmsys's clocks did not see it: no signal was needed), or
        None if run() ended otherwise.  With *bare* (a RefVcpu on this vCPU): the Python
        floor, its bare_kick() and bare_run() in place of kvmsys's kick() and run()."""
        self.requests.put(which if bare is None else ("bare", which, bare))
        if not self.in_run.wait(10):
            raise RuntimeError(f"kick target ({self.abi}) did not start running")
        time.sleep(delay_s)              # let it get into KVM_RUN
        kick, block, now = self.handle.kick if bare is None else bare.bare_kick, self.done.acquire, time.perf_counter_ns
        t0 = now()
        kick()
        if not block(True, 10):         # at once, as the C floor's kicker does (it too has a timeout)
            raise RuntimeError(f"kick target ({self.abi}): run() did not return within 10 s of the kick")
        self.done.release()
        t1, name, clocks = self._wait()
        if bare is not None and clocks[1] < t0:
            # KVM_RUN returned EINTR before the kick (someone else's signal): not a sample;
            # the kick's immediate_exit is cleared by the next bare_arm()
            self.otherwise.append("EINTR before the kick (Python floor)")
            return None
        if name == "KICK":
            sent, intr, _left = clocks
            seen = t0 <= sent <= intr <= t1
            return {"time": t1 - t0, "signal": sent - t0 if seen else None,
                    "kvm": intr - sent if seen else None, "back": t1 - intr if seen else None}
        # run() ended before the kick: the kick is still pending; take it now
        self.requests.put("drain")
        _t, then, _c = self._wait()
        self.otherwise.append(f"{name} (then {then})")
        return None

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join()


def _cpus_apart(cpus: set[int]) -> tuple[int, int] | None:
    """(the target threads' CPU, the kicking thread's) from this process's CPU set: the
    same placement for kvmsys's threads and the floor's; None where it has one CPU."""
    ordered = sorted(cpus)
    return (ordered[0], ordered[1]) if len(ordered) >= 2 else None


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    rng = random.Random(0x6B69636B)
    lo, hi = profile.kick_delay_ms
    res = SuiteResult(NAME, TITLE, columns=[("abi", "ABI"), ("guest", "target guest"),
                                            ("time", "latency"), ("p90", "90th percentile"),
                                            ("ratio", "vs the C floor, same vCPU [95% CI]"),
                                            ("over_py", "vs the Python floor [95% CI]"),
                                            ("signal", "kick() → signal sent"),
                                            ("kvm", "signal → KVM_RUN returned"),
                                            ("back", "KVM_RUN → run() returned")])
    lost = {}
    segments: dict = {}
    own_cpus = os.sched_getaffinity(0)
    apart = _cpus_apart(own_cpus)
    targets: dict = {}
    floor: dict = {}
    placed: dict = {}           # thread -> the CPUs it may run on, as read back
    with kvmsys.Kvm() as kvm:
        try:
            targets.update((abi, _Target(abi, kvm, profile.mode, apart and apart[0])) for abi in ("fd", "sys"))
            # the C floor: pthread_kill + immediate_exit from C, on each target's own vCPU
            for abi, t in targets.items():
                floor[abi] = _reference.RefVcpu(t.fd, kvm.vcpu_mmap_size())
            seeds = iter(range(1, 1 << 30))
            if apart:
                # the floor's pthread, made by its first kick, inherits this thread's CPU set
                os.sched_setaffinity(0, {apart[0]})
                before = set(os.listdir("/proc/self/task"))
                for abi, t in targets.items():
                    t.load("compute")
                    floor[abi].kick(1, lo / 1e3, hi / 1e3, _core.kick_signal(), next(seeds))
                placed.update((f"floor thread {tid}", sorted(os.sched_getaffinity(int(tid))))
                              for tid in set(os.listdir("/proc/self/task")) - before)
                os.sched_setaffinity(0, {apart[1]})     # the kicking thread

            def c_floor(abi, which):
                def go():
                    targets[abi].load(which)
                    lat = floor[abi].kick(1, lo / 1e3, hi / 1e3, _core.kick_signal(), next(seeds))[0]
                    return {f"c/{abi}/{which}": lat}
                return go

            def variant(abi, which, bare=None):
                key = f"{abi}/{which}" if bare is None else f"py/{abi}/{which}"

                def go():
                    for _ in range(5):
                        got = targets[abi].sample(which, rng.uniform(lo, hi) / 1e3, bare)
                        if got is not None:
                            for seg in ("signal", "kvm", "back"):
                                if got[seg] is not None:
                                    segments.setdefault(key, {}).setdefault(seg, []).append(got[seg])
                            return got["time"]
                        lost.setdefault(key, []).append(targets[abi].otherwise[-1])
                    raise RuntimeError(f"kick {key}: run() kept ending without a KickExit")
                return key, go

            variants: dict = {}
            for abi in targets:
                for w in GUESTS:
                    key, go = variant(abi, w)
                    variants[key] = go
                    key, go = variant(abi, w, floor[abi])
                    variants[key] = go
                    variants[f"c/{abi}/{w}"] = c_floor(abi, w)
            progress(f"{NAME}: {profile.kick_samples} kicks per variant, "
                     f"{len(variants)} variants, {lo:g}-{hi:g} ms before each kick")
            samples = interleave(variants, profile.kick_samples, profile.warmup, shuffle=rng)
            native = any(t.native for t in targets.values())
            placed.update((f"{abi} target", t.cpus) for abi, t in targets.items())
            guest_checks = {abi: (t.runs, list(t.mismatches)) for abi, t in targets.items()}
        finally:
            for ref in floor.values():
                ref.close()
            for t in targets.values():
                t.close()
            os.sched_setaffinity(0, own_cpus)
    abi_label = {"fd": "fd (`vcpu.handle().kick()`)", "sys": "syscall (`kvmsys.handle().kick()`)"}
    floor_label = "C floor on the {} target's vCPU: `pthread_kill` + `immediate_exit` (`RefVcpu.kick`)"
    py_label = ("Python floor on the {} target's vCPU: the same threads calling bare C "
                "(`RefVcpu.bare_kick()` / `bare_run()`)")
    for key, s in samples.items():
        parts = key.split("/")
        abi, which = parts[-2], parts[-1]
        ordered = sorted(s)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        stats = {"time": Stat(s, "ns"), "p90": Stat([p90], "ns")}
        if parts[0] == "c":
            stats["kvm"] = Stat(s, "ns")        # its clock is read right before its signal
        for seg, xs in segments.get(key, {}).items():
            stats[seg] = Stat(xs, "ns")
        label = {"c": floor_label, "py": py_label}.get(parts[0])
        res.add_row(key, {"abi": label.format(abi) if label else abi_label[abi],
                          "guest": f"{guest_name(GUESTS[which][0], profile.mode)}: {GUESTS[which][2]}"},
                    stats, {"ended_otherwise": lost.get(key, [])})
        if parts[0] != "c":     # both guests run endlessly: only the kick may end run()
            res.check(f"{key} kicks", not lost.get(key),
                      f"{key}: every run() ended by the kick aimed at it" if not lost.get(key) else
                      f"{key}: {len(lost[key])} run() calls ended before their kick: {lost[key][:3]}")
    if apart:
        res.check("placement", len(placed) >= 4 and all(cpus == [apart[0]] for cpus in placed.values()),
                  f"kvmsys's and the floor's target threads ran on CPU {apart[0]} only: {placed}")
    for abi, (runs, bad) in guest_checks.items():
        res.check(f"{abi} guest counter", runs > 0 and not bad,
                  f"{abi}: in {runs} kicked runs of the exiting guest its counter matched the run loop's "
                  f"IO exits" + (f"; not in {len(bad)}: {bad[:3]}" if bad else ""))
    for key in samples:
        if key.startswith("py/"):
            res.rows[key]["stats"]["ratio"] = derive(res.rows, "time", key, f"c/{key[3:]}", "ratio")
        elif not key.startswith("c/"):
            res.rows[key]["stats"]["ratio"] = derive(res.rows, "time", key, f"c/{key}", "ratio")
            res.rows[key]["stats"]["over_py"] = derive(res.rows, "time", key, f"py/{key}", "ratio")
    res.config = dict(mode=profile.mode, samples=profile.kick_samples, delay_ms=[lo, hi], floor="same vCPU",
                      order="drawn per round", loads="before every sample",
                      cpus=dict(targets=apart[0], kicker=apart[1]) if apart else None)
    res.notes += [
        f"Guest mode: {mode_label(profile.mode, native)}. {profile.kick_samples} kicks per variant, "
        f"interleaved, each round in an order drawn at random (seeded), every sample from its guest "
        f"freshly loaded; each kick after a random {lo:g}–{hi:g} ms wait once the target is inside run(); "
        "target threads are not the main thread.  (In a fixed order kvmsys's sample always came first, "
        "right after another guest's, and its Python floor right after it: kvmsys came out 1.07–1.22× "
        "its Python floor then, against 1.03–1.13× in a drawn order, on our AMD EPYC PVM host.)",
        (f"The target threads (kvmsys's and the floor's) run pinned to CPU {apart[0]}, the kicking thread "
         f"to CPU {apart[1]}, so every kick crosses CPUs: left to the scheduler, the floor's target often "
         "ran on the kicker's CPU, where a kick needs no cross-CPU signal (on our PVM host the floor alone "
         "took 14 µs so and 32–33 µs pinned apart), and kvmsys's rarely did." if apart else
         "The process may use one CPU only: kicker and targets share it."),
        "Latency = perf_counter_ns() after run() returned in the target − perf_counter_ns() just before "
        "kick() in the kicking thread (one monotonic clock), which then blocks on a lock at once; "
        "median (min–max) over all kicks.",
        "C floor: the same vCPU as the kvmsys row above it (kvmsys's target thread parked), run by a "
        "pthread of its own looping on KVM_RUN with minimal exit handling; the kicking thread reads "
        "the clock, sets kvm_run.immediate_exit, sends kvmsys's kick signal with pthread_kill and "
        "blocks on a semaphore; latency = clock after KVM_RUN returned EINTR − clock before the kick.  "
        "Ratios pair the i-th kick of each variant (interleaved) with the i-th kick of its floor.",
        "Python floor: what any binding called from Python pays at least.  The same kicking and "
        "target threads as kvmsys's rows, in the same Python code, call bare C instead of kvmsys: "
        "the target `RefVcpu.bare_run()` (KVM_RUN with minimal exit handling, the GIL released, "
        "until EINTR), the kicker `RefVcpu.bare_kick()` (immediate_exit and pthread_kill, the GIL "
        "held, as kvmsys's kick()).  Its ratio to the C floor is the interpreter's share (calling "
        "into C after a sleep, retaking the GIL, returning to Python); kvmsys's ratio to it, "
        "kvmsys's own.",
        "Segments (kvmsys rows; the Python floor's alike, bare_kick() for kick()): kick() called → "
        "the kicker's clock just before pthread_kill; → the run "
        "loop's clock after KVM_RUN returned EINTR; → run() returned in Python.  The C floor's whole "
        "latency is its signal → KVM_RUN segment.",
    ]
    if lost:
        res.notes.append("run() calls that returned before the kick (retried, not counted): "
                         + "; ".join(f"{k}: {len(v)}× {', '.join(sorted(set(v)))}" for k, v in lost.items()))
    res.elapsed_s = time.perf_counter() - t_start
    return res
