"""Suite `kick`: latency from handle.kick() in one thread until the target
thread's run() has returned.

The target thread runs an endless guest; the kicking thread waits a random
moment (so the kick lands anywhere in the guest's rhythm), notes
time.perf_counter_ns() and kicks; the target notes the time right after run()
returns.  Only one target runs at a time."""
from __future__ import annotations

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

    def __init__(self, abi: str, kvm, mode: str):
        self.abi, self.kvm, self.mode = abi, kvm, mode
        self.requests: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.in_run = threading.Event()
        self.otherwise: list = []       # how runs ended that a kick did not end
        self.runs = 0                   # runs of the exiting guest, checked against its counter
        self.mismatches: list = []      # where the guest's counter and the run loop disagreed
        self.loaded = None
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
            set_handling(self.g.vm, "pio_out", "c")
            self.results.put((True, self.g.vcpu.handle()))
        except BaseException as e:
            self.results.put((False, e))
            return
        try:
            while True:
                which = self.requests.get()
                if which is None:
                    return
                try:
                    self.results.put((True, self._one(which)))
                except BaseException as e:
                    self.results.put((False, e))
        finally:
            self.g.close()

    def _one(self, which):
        if which == "drain":
            # absorb a kick sent after run() had already returned (it is never lost)
            return time.perf_counter_ns(), self.g.run(timeout=1.0).name
        if self.loaded != which:
            base, inputs, _label = GUESTS[which]
            self.native = self.g.load(guest_name(base, self.mode), **inputs)
            self.loaded = which
        c0, io0 = self.g.counter(), self._io_exits()
        self.in_run.set()
        ex = self.g.run()
        t1 = time.perf_counter_ns()
        self.in_run.clear()
        if which == "exits":
            # the guest counts each out it starts: one more than the exits if the kick
            # came between its count and its out
            counted, exits = (self.g.counter() - c0) % (1 << 32), self._io_exits() - io0
            self.runs += 1
            if not 0 <= counted - exits <= 1 or exits <= 0:
                self.mismatches.append(f"guest counted {counted}, the run loop {exits} exits")
        if not isinstance(ex, _core.KickExit):
            self.loaded = None          # e.g. the guest finished: reload it next time
        return t1, ex.name

    def _io_exits(self) -> int:
        return self.g.vcpu.stats()["exits"].get("IO", 0)

    def sample(self, which: str, delay_s: float) -> int | None:
        """One kick; returns the latency in ns, or None if run() ended otherwise."""
        self.requests.put(which)
        if not self.in_run.wait(10):
            raise RuntimeError(f"kick target ({self.abi}) did not start running")
        time.sleep(delay_s)              # let it get into KVM_RUN
        t0 = time.perf_counter_ns()
        self.handle.kick()
        ok, value = self.results.get()
        if not ok:
            raise value
        t1, name = value
        if name == "KICK":
            return t1 - t0
        # run() ended before the kick: the kick is still pending; take it now
        self.requests.put("drain")
        ok, value = self.results.get()
        if not ok:
            raise value
        self.otherwise.append(f"{name} (then {value[1]})")
        return None

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join()


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    rng = random.Random(0x6B69636B)
    lo, hi = profile.kick_delay_ms
    res = SuiteResult(NAME, TITLE, columns=[("abi", "ABI"), ("guest", "target guest"),
                                            ("time", "latency"), ("p90", "90th percentile"),
                                            ("ratio", "vs the C floor [95% CI]")])
    lost = {}
    with kvmsys.Kvm() as kvm:
        targets = {abi: _Target(abi, kvm, profile.mode) for abi in ("fd", "sys")}
        floor = {}
        try:
            # the C floor: pthread_kill + immediate_exit from C, same guests, own vCPUs
            for which, (base, inputs, _label) in GUESTS.items():
                g = one_vcpu("fd", guest_name(base, profile.mode), kvm=kvm, **inputs)
                set_handling(g.vm, "pio_out", "c")
                floor[which] = (g, _reference.RefVcpu(g.vcpu.fileno(), g.vm.mmap_size))
            seeds = iter(range(1, 1 << 30))

            def c_floor(which):
                return lambda: floor[which][1].kick(1, lo / 1e3, hi / 1e3, _core.kick_signal(), next(seeds))[0]

            def variant(abi, which):
                key = f"{abi}/{which}"

                def go():
                    for _ in range(5):
                        lat = targets[abi].sample(which, rng.uniform(lo, hi) / 1e3)
                        if lat is not None:
                            return lat
                        lost.setdefault(key, []).append(targets[abi].otherwise[-1])
                    raise RuntimeError(f"kick {key}: run() kept ending without a KickExit")
                return key, go

            variants = dict(variant(abi, w) for abi in targets for w in GUESTS)
            variants.update({f"c/{w}": c_floor(w) for w in GUESTS})
            progress(f"{NAME}: {profile.kick_samples} kicks per variant, "
                     f"{len(variants)} variants, {lo:g}-{hi:g} ms before each kick")
            samples = interleave(variants, profile.kick_samples, profile.warmup)
            native = any(t.native for t in targets.values())
            guest_checks = {abi: (t.runs, list(t.mismatches)) for abi, t in targets.items()}
        finally:
            for t in targets.values():
                t.close()
            for g, ref in floor.values():
                ref.close()
                g.close()
    abi_label = {"fd": "fd (`vcpu.handle().kick()`)", "sys": "syscall (`kvmsys.handle().kick()`)",
                 "c": "C floor: `pthread_kill` + `immediate_exit` (`RefVcpu.kick`)"}
    for key, s in samples.items():
        abi, which = key.split("/")
        ordered = sorted(s)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        res.add_row(key, {"abi": abi_label[abi],
                          "guest": f"{guest_name(GUESTS[which][0], profile.mode)}: {GUESTS[which][2]}"},
                    {"time": Stat(s, "ns"), "p90": Stat([p90], "ns")}, {"ended_otherwise": lost.get(key, [])})
        if abi != "c":          # both guests run endlessly: only the kick may end run()
            res.check(f"{key} kicks", not lost.get(key),
                      f"{key}: every run() ended by the kick aimed at it" if not lost.get(key) else
                      f"{key}: {len(lost[key])} run() calls ended before their kick: {lost[key][:3]}")
    for abi, (runs, bad) in guest_checks.items():
        res.check(f"{abi} guest counter", runs > 0 and not bad,
                  f"{abi}: in {runs} kicked runs of the exiting guest its counter matched the run loop's "
                  f"IO exits" + (f"; not in {len(bad)}: {bad[:3]}" if bad else ""))
    for key in samples:
        abi, which = key.split("/")
        if abi != "c":
            res.rows[key]["stats"]["ratio"] = derive(res.rows, "time", key, f"c/{which}", "ratio")
    res.config = dict(mode=profile.mode, samples=profile.kick_samples, delay_ms=[lo, hi])
    res.notes += [
        f"Guest mode: {mode_label(profile.mode, native)}. {profile.kick_samples} kicks per variant, "
        f"interleaved; each after a random {lo:g}–{hi:g} ms wait once the target is inside run(); "
        "target threads are not the main thread.",
        "Latency = perf_counter_ns() after run() returned in the target − perf_counter_ns() just before "
        "kick() in the kicking thread (one monotonic clock); median (min–max) over all kicks.",
        "C floor: the same guest on its own vCPU, run by one pthread of its own "
        "looping on KVM_RUN with minimal exit handling; the kicking thread reads the clock, sets "
        "kvm_run.immediate_exit and sends kvmsys's kick signal with pthread_kill; latency = clock after "
        "KVM_RUN returned EINTR − clock before the kick.  Ratios pair the i-th kick of each variant "
        "(interleaved) with the i-th kick of the floor.",
    ]
    if lost:
        res.notes.append("run() calls that returned before the kick (retried, not counted): "
                         + "; ".join(f"{k}: {len(v)}× {', '.join(sorted(set(v)))}" for k, v in lost.items()))
    res.elapsed_s = time.perf_counter() - t_start
    return res
