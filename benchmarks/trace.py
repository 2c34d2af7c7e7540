"""`--trace`: where one exit round trip spends its time, from the kernel's tracepoints.

Per ABI (C handler, the profile's guest mode and long64), a few thousand exits run
with these tracepoints on, in a tracefs instance of our own (its own buffer, only this
thread's events): raw_syscalls sys_enter/sys_exit (the KVM_RUN ioctl), kvm_entry and
kvm_exit (guest entry and exit; absent where KVM emulates the guest instead of
entering it, as PVM does for 16/32-bit guests), kvm_userspace_exit.  Each round trip
is cut into segments:

  ioctl entry → first kvm_entry         syscall entry, fd lookup, vCPU mutex, vcpu_load
                                        (with no guest entry: up to kvm_userspace_exit,
                                        including the emulation of the guest)
  first kvm_entry → last kvm_exit       the guest, and exits KVM handles in the kernel
  last kvm_exit → kvm_userspace_exit    KVM's handling of the exit it passes up
  kvm_userspace_exit → ioctl return     vcpu_put, signal checks, return to user space
  ioctl return → next ioctl entry       user space (the loop itself)

Needs root and tracefs (mounted at /sys/kernel/tracing if it is not: said so in the
report).  Trace timestamps have 1 µs resolution, so segments are given as means over
all round trips (unbiased where the quantisation phase is random) with the median.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import threading
import time

from . import _reference
from .guestvm import guest_name, mode_label, one_vcpu, set_handling
from .harness import SuiteResult, Stat, progress

NAME = "trace"
TITLE = "One exit round trip, from the kernel's tracepoints"
TRACEFS = "/sys/kernel/tracing"
EVENTS = ("raw_syscalls/sys_enter", "raw_syscalls/sys_exit", "kvm/kvm_entry", "kvm/kvm_exit",
          "kvm/kvm_userspace_exit")
SEGMENTS = [("enter", "ioctl entry → guest entry (or → user-space exit, emulated)"),
            ("guest", "guest entry → last guest exit"),
            ("exit", "last guest exit → user-space exit"),
            ("ret", "user-space exit → ioctl return"),
            ("user", "ioctl return → next KVM_RUN (user space)")]
_LINE = re.compile(r"^\s*\S+-(\d+)\s+\[\d+\]\s+\S+\s+(\d+)\.(\d+):\s+(\w+):\s*(.*)$")
_KVM_RUN_ARG = f"{_reference.IOCTLS['KVM_RUN']:x}"


def unavailable(who: str = "--trace", events=EVENTS) -> str | None:
    """Why *who* cannot trace *events* here, or None; mounts tracefs if it must."""
    if os.geteuid() != 0:
        return f"{who} needs root (tracefs)"
    if not os.path.isdir(f"{TRACEFS}/events"):
        r = subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isdir(f"{TRACEFS}/events"):
            return f"{who}: tracefs is not available at {TRACEFS} ({r.stderr.strip() or 'mount failed'})"
        progress(f"{NAME}: mounted tracefs at {TRACEFS}")
    missing = [e for e in events if not os.path.isdir(f"{TRACEFS}/events/{e}")]
    if missing:
        return f"{who}: tracepoints missing on this kernel: {', '.join(missing)}"
    return None


def _remove_stale() -> None:
    """Remove the instances of runs that were killed before they could (their syscall
    tracepoints would slow every system call on the host until then)."""
    base = f"{TRACEFS}/instances"
    for name in os.listdir(base):
        m = re.fullmatch(r"kvmsys-bench-(\d+)", name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                        # its run is still going (or the pid is reused)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.rmdir(f"{base}/{name}")
        except OSError:
            pass                            # another run removed it first


class _Instance:
    """A tracefs instance of our own: its own buffer, this thread's events only (*events*,
    each with *filter_* if given), in trace clock *clock* (None: the default)."""

    def __init__(self, events=EVENTS, clock: str | None = None, filter_: str | None = None):
        self.events, self.clock, self.filter = events, clock, filter_
        _remove_stale()
        self.path = f"{TRACEFS}/instances/kvmsys-bench-{os.getpid()}"
        os.mkdir(self.path)

    def write(self, rel: str, value: str) -> None:
        with open(f"{self.path}/{rel}", "w") as f:
            f.write(value)

    def __enter__(self):
        try:
            self.write("buffer_size_kb", "8192")
            self.write("set_event_pid", str(threading.get_native_id()))
            if self.clock:
                self.write("trace_clock", self.clock)
            for e in self.events:
                if self.filter:
                    self.write(f"events/{e}/filter", self.filter)
                self.write(f"events/{e}/enable", "1")
        except BaseException:
            self.__exit__()
            raise
        return self

    def read(self) -> str:
        with open(f"{self.path}/trace") as f:
            return f.read()

    def __exit__(self, *exc):
        try:
            self.write("tracing_on", "0")
            for e in self.events:
                self.write(f"events/{e}/enable", "0")
        finally:
            os.rmdir(self.path)


def segments(text: str) -> dict:
    """{segment: [ns per round trip]} from the trace of one thread's KVM_RUN loop."""
    out = {k: [] for k, _l in SEGMENTS}
    t_enter = t_first = t_last = t_user = t_ret = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        t = int(m.group(2)) * 1_000_000_000 + int(m.group(3).ljust(9, "0")[:9])
        event, args = m.group(4), m.group(5)
        if event == "sys_enter":
            if not args.startswith("NR 16 ") or args.split(", ")[1] != _KVM_RUN_ARG:
                continue
            if t_ret is not None:
                out["user"].append(t - t_ret)
            t_enter, t_first, t_last, t_user, t_ret = t, None, None, None, None
        elif t_enter is None:
            continue
        elif event == "kvm_entry":
            t_first = t if t_first is None else t_first
        elif event == "kvm_exit":
            t_last = t
        elif event == "kvm_userspace_exit":
            t_user = t
        elif event == "sys_exit" and args.startswith("NR 16 ") and t_user is not None:
            out["enter"].append((t_first if t_first is not None else t_user) - t_enter)
            if t_first is not None and t_last is not None:
                out["guest"].append(t_last - t_first)
                out["exit"].append(t_user - t_last)
            out["ret"].append(t - t_user)
            t_ret, t_enter = t, None
    return out


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    res = SuiteResult(NAME, TITLE, columns=[("mode", "mode"), ("abi", "ABI"), ("segment", "segment"),
                                            ("mean", "mean"), ("time", "median (min–max)"),
                                            ("count", "round trips")])
    why = unavailable()
    if why:
        res.skipped.append(why)
        res.elapsed_s = time.perf_counter() - t_start
        return res
    n = max(50, min(3000, profile.max_exits // 10))
    modes = list(dict.fromkeys([profile.mode, "long64"]))
    for mode in modes:
        for abi in ("fd", "sys"):
            g = one_vcpu(abi, guest_name("pio_out_loop", mode), n=0)
            try:
                set_handling(g.vm, "pio_out", "c")
                g.run(budget=20)                          # not traced: first entry
                with _Instance() as inst:
                    inst.write("tracing_on", "1")
                    g.run(budget=n)
                    inst.write("tracing_on", "0")
                    seg = segments(inst.read())
                native = g.native
            finally:
                g.close()
            progress(f"{NAME}: {mode} {abi}: {len(seg['ret'])} round trips traced")
            for key, label in SEGMENTS:
                if seg[key]:
                    res.add_row(f"{mode}/{abi}/{key}",
                                dict(mode=mode_label(mode, native), abi=abi, segment=label,
                                     mean=f"{statistics.fmean(seg[key]) / 1e3:.2f} µs",
                                     count=len(seg[key])),
                                dict(time=Stat(seg[key], "ns")))
    res.config = dict(exits=n, modes=modes, events=list(EVENTS))
    res.notes += [
        f"{n} exits per ABI and mode (guest pio_out_loop, PIO handled in the C run loop), traced in a "
        "tracefs instance of our own; segments as in `benchmarks/trace.py`.  Trace timestamps have 1 µs "
        "resolution: compare the means.",
        "A segment that is missing had no events: on a PVM host, 16/32-bit guests are run by KVM's "
        "instruction emulator inside KVM_RUN, with no guest entry or exit to trace.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
