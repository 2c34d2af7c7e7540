"""Suite `windows` (root, tracefs; only when named): every exits-suite loop's user window
by the kernel's clock, the naive loop's included.

The exits suite gets the naive loop's user window (KVM_RUN's return to the next entry) as
its round trip less the C reference's KVM_RUN window from another sample: where KVM_RUN
takes 10-40 µs and moves by hundreds of ns between samples (our PVM host), that
difference cannot resolve a window of 0.5-2 µs.  Here the kernel stamps each KVM_RUN
ioctl's entry and return (the `raw_syscalls` tracepoints, filtered to ioctl, in a tracefs
instance of our own with the `x86-tsc` clock: cycle resolution), so every loop's window
is read off directly, from the same instrument, the naive loop's too:

  traced window = the return of one KVM_RUN ioctl → the entry of the next (tracepoints)

It holds, besides the loop's own work, a fixed share of the system call's own way out
and in (and of the tracing).  The loops that clock their KVM_RUN themselves (the C
reference, kvmsys's, the Python floor) measure that share in the same sample:
traced − own-clock window.  The C reference's share is taken off every loop of its
round (`corrected`): for the naive loop it is the only way to it; for the others the
agreement of their own share with the reference's shows the two clocks agree.

Proof that it sees: after each group's rounds, kvmsys's callback loop (`pyo`) runs three
more pairs of samples, one of each pair with a known busy-wait before each callback
(`_core._bench_delay`); its traced window must grow by that much (median of the pairs),
or the check fails: on our PVM host it does for 64-bit guests, whose system call's share
moves by microseconds between samples while traced.
"""
from __future__ import annotations

import re
import statistics
import time

import kvmsys
from kvmsys import _core

from . import trace
from .exits import ABIS, LOOPS, SAMPLE_ORDER, Group, modes
from .guestvm import EXIT_KINDS, mode_label
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "windows"
TITLE = "User window of every loop by the kernel's clock (tracepoints), the naive loop's included"
EVENTS = ("raw_syscalls/sys_enter", "raw_syscalls/sys_exit")
FILTER = "id == 16"                 # ioctl: the only system call the loops make per exit
INJECT_NS = 1000                    # the proof's busy-wait before each callback
_LINE = re.compile(r"^\s*\S+-\d+\s+\[\d+\]\s+\S+\s+(\d+):\s+(sys_enter|sys_exit):\s*NR 16 (.*)$")
_MARK = re.compile(r"^\s*\S+-\d+\s+\[\d+\]\s+\S+\s+(\d+):\s+tracing_mark_write:\s*kvmsys-(\w+)")


def windows(text: str) -> tuple:
    """(KVM_RUN's return → the next KVM_RUN's entry, each in TSC cycles; the cycles between
    the 'kvmsys-begin' and 'kvmsys-end' markers, or None) from one thread's trace of its
    ioctls in the x86-tsc clock.  Another ioctl in between breaks the window (not counted)."""
    out, marks, t_ret, in_run = [], {}, None, False
    for line in text.splitlines():
        m = _MARK.match(line)
        if m:
            marks[m.group(2)] = int(m.group(1))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        t, event, args = int(m.group(1)), m.group(2), m.group(3)
        if event == "sys_enter":
            in_run = args.split(", ")[1:2] == [trace._KVM_RUN_ARG]
            if in_run and t_ret is not None:
                out.append(t - t_ret)
            t_ret = None
        else:
            t_ret = t if in_run else None
            in_run = False
    span = marks["end"] - marks["begin"] if {"begin", "end"} <= marks.keys() else None
    return out, span


class _Tracer:
    """Turns tracing on around one sample and reads its windows off in ns."""

    def __init__(self, inst, n: int):
        self.inst, self.n = inst, n

    def __call__(self, body):
        inst, now = self.inst, time.perf_counter_ns
        inst.write("trace", "")                    # empty the buffer
        inst.write("tracing_on", "1")
        ta = now()
        inst.write("trace_marker", "kvmsys-begin")
        tb = now()
        inside = body()
        tc = now()
        inst.write("trace_marker", "kvmsys-end")
        td = now()
        inst.write("tracing_on", "0")
        cycles, span = windows(inst.read())
        if span is None or len(cycles) < self.n - 1:
            raise RuntimeError(f"{NAME}: the trace holds {len(cycles)} windows of {self.n - 1} "
                               f"(markers {'found' if span is not None else 'missing'}): events were lost")
        # the markers' cycles against the clock read around each: cycles per ns, per sample
        per_ns = span / ((tc + td) / 2 - (ta + tb) / 2)
        return (statistics.fmean(cycles) / per_ns, tc - tb), inside


def _measure(kind: str, mode: str, abi: str, profile, kvm, inst) -> dict:
    with Group(kind, mode, abi, profile, kvm) as grp:
        n = grp.n
        # room for a sample's events (two of ~100 bytes per exit) with a margin: a ring that
        # wrapped would have lost its first ones (the sample then fails, never averages less)
        inst.write("buffer_size_kb", str(max(8192, n * 2 * 256 // 1024)))
        tracer = _Tracer(inst, n)

        def sample(key):
            def go():
                (traced, wall), own = grp.sample(key, tracer)
                out = {f"{key}/traced": traced}
                if own is not None:
                    out[f"{key}/own"] = (wall - own) / n
                return out
            return go

        def proof():
            """How far a known busy-wait before each callback moves pyo's traced window:
            the median over three pairs of samples, each with and without it."""
            moved = []
            for _ in range(3):
                (plain, _wall), _own = grp.sample("pyo", tracer)
                before = _core._bench_delay(1, 0)      # an --inject py= delay stays, plus ours
                _core._bench_delay(1, before + INJECT_NS / 1e9)
                try:
                    (delayed, _wall), _own = grp.sample("pyo", tracer)
                finally:
                    _core._bench_delay(1, before)
                moved.append(delayed - plain)
            return statistics.median(moved)

        variants = {key: sample(key) for key in SAMPLE_ORDER}
        progress(f"{NAME}: {grp.label} ({grp.name}, {abi} ABI): {n} exits per sample, "
                 f"{len(variants)} loops traced × {profile.reps} reps")
        samples = interleave(variants, profile.reps, profile.warmup)
        return dict(name=grp.name, n=n, samples=samples, native=grp.g.native, proof=proof())


def run(profile, kinds=None) -> SuiteResult:
    t_start = time.perf_counter()
    res = SuiteResult(NAME, TITLE, columns=[
        ("mode", "mode"), ("exit", "exit"), ("abi", "VM (one vCPU)"), ("loop", "loop"),
        ("traced", "traced window"), ("own", "own-clock window"),
        ("share", "traced − own clock (the system call's share)"),
        ("user", "user window (traced − the C reference's share)"),
        ("vs_naive", "user window vs the naive loop's [95% CI]"),
        ("over_pyf", "user window − the Python floor's [95% CI]")])
    why = trace.unavailable(f"suite {NAME}", EVENTS)
    if why:
        res.skipped.append(why)
        res.elapsed_s = time.perf_counter() - t_start
        return res
    kinds = list(kinds or profile.exit_kinds or EXIT_KINDS)
    measured = {}
    try:
        inst = trace._Instance(EVENTS, clock="x86-tsc", filter_=FILTER).__enter__()
    except OSError as e:        # e.g. a kernel without the x86-tsc trace clock
        res.skipped.append(f"suite {NAME}: the tracefs instance could not be set up ({e})")
        res.elapsed_s = time.perf_counter() - t_start
        return res
    try:
        with kvmsys.Kvm() as kvm:
            for mode in modes(profile):
                for k in kinds:
                    for abi in ABIS:
                        measured[(mode, k, abi)] = _measure(k, mode, abi, profile, kvm, inst)
    finally:
        inst.__exit__(None, None, None)
    for (mode, kind, abi), m in measured.items():
        grp, s = f"{mode}/{kind}/{abi}", m["samples"]
        share = [t - o for t, o in zip(s["ref/traced"], s["ref/own"])]
        for key in SAMPLE_ORDER:
            stats = dict(traced=Stat(s[f"{key}/traced"], "ns"),
                         user=Stat([t - c for t, c in zip(s[f"{key}/traced"], share)], "ns"))
            if f"{key}/own" in s:
                stats["own"] = Stat(s[f"{key}/own"], "ns")
                stats["share"] = Stat([t - o for t, o in zip(s[f"{key}/traced"], s[f"{key}/own"])], "ns")
            res.add_row(f"{grp}/{key}", dict(mode=mode_label(mode, m["native"]), exit=EXIT_KINDS[kind][1],
                                             abi=ABIS[abi], loop=LOOPS[key]), stats, dict(n=m["n"]))
        rows = res.rows
        for key in ("pyw", "pyo", "pyf"):
            rows[f"{grp}/{key}"]["stats"]["vs_naive"] = derive(rows, "user", f"{grp}/{key}", f"{grp}/naive", "ratio")
        for key in ("pyw", "pyo"):
            rows[f"{grp}/{key}"]["stats"]["over_pyf"] = derive(rows, "user", f"{grp}/{key}", f"{grp}/pyf",
                                                               "difference")
        rows[f"{grp}/pyo"]["extra"]["proof_ns"] = m["proof"]
        res.check(f"{grp} sees", 0.8 * INJECT_NS <= m["proof"] <= 1.5 * INJECT_NS,
                  f"{mode} {EXIT_KINDS[kind][1]}, {abi} VM: a {INJECT_NS} ns busy-wait before each callback "
                  f"moved pyo's traced window by {m['proof']:.0f} ns")
    res.config = dict(modes=modes(profile), kinds=kinds, reps=profile.reps, warmup=profile.warmup,
                      exits_per_sample={"/".join(k): m["n"] for k, m in measured.items()},
                      events=list(EVENTS), filter=FILTER, clock="x86-tsc", inject_ns=INJECT_NS)
    res.notes += [
        "Loops as in the exits suite, every one on the same vCPU in turn, interleaved rounds.  **Traced "
        "window**: the mean, over one sample's exits, of the time from a KVM_RUN ioctl's return "
        "(`raw_syscalls:sys_exit`) to the next one's entry (`sys_enter`), in the trace's `x86-tsc` clock, "
        "converted to ns by markers written around the sample against `perf_counter_ns`.",
        "**Own-clock window**: the loop's round trip less its KVM_RUN time by its own clock reads around the "
        "ioctl (the C reference, kvmsys's `ns_in_run`, the Python floor); the naive loop has none.  "
        "**Traced − own clock** is the part of the system call's way out and in (and the tracing's) that falls "
        "outside the kernel's stamps: the same for every loop.  **User window** = traced window − the C "
        "reference's share in the same round.",
        f"Proof: in each group, after its rounds, kvmsys's callback loop runs three pairs of samples, one of each "
        f"with a {INJECT_NS} ns busy-wait before each callback; a check gives how far that moved its traced "
        "window (median of the pairs) and fails outside 0.8-1.5×: where it fails, this suite cannot resolve "
        "that group's windows.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
