"""Suite `abi`: the two ABIs' run entry points, one exit per call.

`kvmsys.run()` (the thread's implied vCPU, found by one thread-local load) vs
`vcpu.run()` (an explicit handle) when every exit comes back to Python: the
case where the entry point itself is paid once per exit.  Both go through the
same C loop, so the ratio isolates the dispatch of the call."""
from __future__ import annotations

import time

import kvmsys
from kvmsys import _core
from kvmsys.enums import Kind
from kvmsys.guests import get as get_guest

from .guestvm import PIO, PairedFd, guest_name, mode_label, one_vcpu
from .harness import SuiteResult, Stat, calibrate_count, derive, interleave, progress

NAME = "abi"
TITLE = "run() per exit: syscall ABI vs fd ABI"


class _Tally:
    """What the run() calls of one loop returned: IoExits at the guest's port, and others."""

    def __init__(self, port: int):
        self.port, self.good, self.odd = port, 0, []

    def loop(self, run, n: int) -> float:
        io, odd = _core.IoExit, 0
        t0 = time.perf_counter_ns()
        for _ in range(n):
            ex = run()
            if ex.__class__ is not io or ex.port != self.port:      # the same check in both loops
                odd += 1
                self.odd.append(repr(ex))
        t = (time.perf_counter_ns() - t0) / n
        self.good += n - odd
        return t


def _sample(key: str, g, n: int, tally):
    """{key: per exit, key/user: user space per exit, key/kernel: inside KVM_RUN per exit}; the
    run loop's own clock of KVM_RUN (ns_in_run) read before and after, untimed."""
    core_stats, vcpu, run = _core.VcpuCore.stats, g.vcpu, g.run

    def go():
        k0 = core_stats(vcpu)["ns_in_run"]
        total = tally.loop(run, n)
        kernel = (core_stats(vcpu)["ns_in_run"] - k0) / n
        return {key: total, f"{key}/user": total - kernel, f"{key}/kernel": kernel}
    return go


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    name = guest_name("pio_out_loop", profile.mode)
    res = SuiteResult(NAME, TITLE, columns=[("entry", "entry point"), ("time", "per exit"),
                                            ("user_ns", "user space per exit"),
                                            ("kernel_ns", "kernel + guest per exit"),
                                            ("d_user", "user space − fd's [95% CI]"),
                                            ("ratio", "vs fd `vcpu.run()` [95% CI]")])
    with kvmsys.Kvm() as kvm:
        sysg = one_vcpu("sys", name, n=0)
        fd = None
        try:
            fd = PairedFd(sysg, kvm, name, n=0)     # a vCPU of the same (process) VM
        except BaseException:
            sysg.close()
            raise
        for g in (fd, sysg):
            g.vm.set_default(PIO, Kind.PYTHON)      # no handler: every exit returns to the caller
        try:
            port = get_guest(name).expect["exit"]["port"]
            tallies = {"fd": _Tally(port), "sys": _Tally(port)}
            n = calibrate_count(lambda k: tallies["fd"].loop(fd.run, k), profile.sample_ms,
                                profile.min_exits, profile.max_exits)
            progress(f"{NAME}: {n} exits per sample (calibrated), {profile.reps} reps")
            samples = interleave({"fd": _sample("fd", fd, n, tallies["fd"]),
                                  "sys": _sample("sys", sysg, n, tallies["sys"])},
                                 profile.reps, profile.warmup)
            counter = sysg.counter()            # one counter in the shared memory
            native = sysg.native
        finally:
            fd.close()
            sysg.close()
    for key, entry in (("fd", "fd ABI: `vcpu.run()` (explicit vCPU)"),
                       ("sys", "syscall ABI: `kvmsys.run()` (the thread's vCPU)")):
        res.add_row(key, {"entry": entry}, {"time": Stat(samples[key], "ns"),
                                            "user_ns": Stat(samples[f"{key}/user"], "ns"),
                                            "kernel_ns": Stat(samples[f"{key}/kernel"], "ns")})
    res.rows["sys"]["stats"]["d_user"] = derive(res.rows, "user_ns", "sys", "fd", "difference")
    res.rows["sys"]["stats"]["ratio"] = derive(res.rows, "time", "sys", "fd", "ratio")
    for key, t in tallies.items():
        res.check(f"{key} run() results", not t.odd,
                  f"{key}: {t.good} run() calls returned an IoExit" + (f"; others: {t.odd[:3]}" if t.odd else ""))
    good = sum(t.good for t in tallies.values())
    res.check("guest counter", counter == good % (1 << 32),
              f"guest counter {counter} (both vCPUs), IoExits returned {good} "
              f"({tallies['fd'].good} fd + {tallies['sys'].good} syscall)")
    res.config = dict(mode=profile.mode, exits_per_sample=n, reps=profile.reps)
    res.notes += [
        "Paired on one VM: the syscall ABI's vCPU 0 of the process VM and the fd ABI's vCPU 1 of the same "
        "kernel VM (a `Vm` over a duplicate of its fd, `Vm.from_raw_fd`), the same guest in the same memory, "
        "interleaved; the guest's counter is shared and checked against both loops' IoExits.",
        f"Guest {name}, mode {mode_label(profile.mode, native)}, n=0 (endless); the port has no handler "
        f"and the default is PYTHON, so each run() returns one IoExit; {n} calls per sample, calibrated at run "
        f"time to ~{profile.sample_ms:g} ms.",
        "User space per exit = (wall time − time inside KVM_RUN, clocked by the run loop) / calls: "
        "the entry point, the Python-level return of each exit and the loop around it.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
