"""Suite `exits`: one exit's round trip by exit kind and by loop, split into exact windows.

Every loop that is compared runs the *same vCPU in turn* (interleaved, one sample each per
round): two VMs differ in the kernel's time per exit by hundreds of ns, one vCPU does not.
The syscall ABI's loops need the process VM, the fd ABI's their own, so each ABI is one
group with its own C reference and naive loop on its vCPU:

- `ref`       the C reference loop, no signal mask on the vCPU (a bare C loop);
- `ref_mask`  the same loop with KVM_SET_SIGNAL_MASK set as kvmsys sets it;
- `naive`     the naive pure-Python loop, with no clock inside its loop;
- `c`         kvmsys's run(budget=n), the exit handled in its C loop;
- `py`        kvmsys with a no-op Python handler;
- `pyw`       kvmsys with a Python handler doing exactly the naive loop's work per exit;
- `pyo`       the same work through read/write callbacks (AccessOps), called with the access
              decoded; for HLT, an HLT callback;
- `pyf`       the Python floor: the same callbacks called from a bare C loop that releases
              the GIL around each KVM_RUN (`RefVcpu.run_callbacks`): what any binding that
              calls Python per exit pays at least, so `pyo` − `pyf` is kvmsys's own share.

Windows per exit: the C reference clocks each KVM_RUN in C (`ioctl_ns`: from the clock read
before the ioctl to the one after it), with and without the mask; their paired difference is
what the mask adds inside the ioctl.  Every other loop's user window (KVM_RUN's return to the
next entry: decoding, handling, run()'s entry and return, fcntl.ioctl's own Python) = its
round trip − the ioctl window of the reference that enters KVM_RUN as it does (with kvmsys's
mask for kvmsys's loops while kvmsys uses one, without for the naive loop), from the same
round on the same vCPU.  Round trips are wall time (perf_counter_ns) and thread CPU time
(CLOCK_THREAD_CPUTIME_ID) around each sample: windows come from clocks, never from
getrusage's user/system split, which books a natively running 64-bit guest as user time.
"""
from __future__ import annotations

import time

import kvmsys
from kvmsys import _core
from kvmsys import AccessOps
from kvmsys.enums import Kind
from kvmsys.guests import get as get_guest

from . import _reference, naive
from .guestvm import EXIT_KINDS, guest_name, mode_label, one_vcpu, set_handling
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "exits"
TITLE = "Exit round trip by kind and loop: user window, ioctl window, the signal mask, on one vCPU"

LOOPS = {
    "ref": "C reference loop, no signal mask",
    "ref_mask": "C reference loop + kvmsys's KVM_SET_SIGNAL_MASK",
    "naive": "naive Python (`fcntl.ioctl` + `mmap` + `struct`)",
    "c": "kvmsys, C handler",
    "py": "kvmsys, no-op Python handler",
    "pyw": "kvmsys, Python handler doing the naive loop's work",
    "pyo": "kvmsys, read/write callbacks doing the naive loop's work",
    "pyf": "Python floor: bare C calling the same callbacks",
}
ABIS = {"fd": "fd ABI (`vcpu.run`)", "sys": "syscall ABI (`kvmsys.run`)"}
KVMSYS_LOOPS = ("c", "py", "pyw", "pyo")
# a round's samples, in this order (the exits and windows suites): references and the naive loop first
SAMPLE_ORDER = ("ref", "ref_mask", "naive", "pyf", *KVMSYS_LOOPS)


def naive_work(ex) -> None:
    """A Python handler doing what the naive loop does per exit: decode the exit's fields
    and give a read zeros (the naive loop's struct.unpack_from and slice assignment), each
    the way kvmsys's API says: a read is answered by setting `ex.value` (string I/O, count
    > 1, through `ex.data`)."""
    if isinstance(ex, _core.IoExit):
        is_in, size, _port, count = ex.is_in, ex.size, ex.port, ex.count
        if is_in:
            if count == 1:
                ex.value = 0
            else:
                ex.data[:] = bytes(size * count)
    elif isinstance(ex, _core.MmioExit):
        _addr, length, is_write = ex.address, ex.length, ex.is_write
        if not is_write:
            ex.value = 0
    elif not isinstance(ex, _core.HltExit):
        raise RuntimeError(f"unexpected exit {ex!r}")


def naive_read(address: int, size: int) -> int:
    """The naive loop's work for a read, as a read callback: it is given the access decoded
    and answers zeros."""
    return 0


def naive_write(address: int, size: int, value: int) -> None:
    """The naive loop's work for a write, as a write callback: it is given the access decoded."""


def naive_hlt(ex) -> None:
    """The naive loop's work for HLT, as the HLT callback: knowing it was a HLT."""


NAIVE_OPS = AccessOps(naive_read, naive_write)


def _budget_run(run, n: int) -> None:
    ex = run(budget=n)
    if not isinstance(ex, _core.BudgetExit):
        raise RuntimeError(f"expected the budget to end the run, got {ex!r}")


def _set_handling(vm, kind: str, how: str) -> None:
    """c / py (no-op handler) / pyw (the naive loop's work) / pyo (the same through
    read/write callbacks) for this exit kind."""
    set_handling(vm, kind, "c" if how == "c" else "python")
    if how in ("pyw", "pyo"):
        if EXIT_KINDS[kind][2] is None:
            vm.set_hlt_action(Kind.PYTHON, naive_work if how == "pyw" else naive_hlt)
        else:
            vm.default_handler = naive_work if how == "pyw" else NAIVE_OPS


def calibrate(run, min_exits: int, max_exits: int, sample_ms: float) -> tuple[int, float]:
    """Exits per sample so that one sample of the C-handled loop lasts about sample_ms
    on this host now (measured, never assumed)."""
    probe = max(10, min_exits // 2)
    _budget_run(run, probe)                       # first entry pays one-off costs
    t0 = time.perf_counter_ns()
    _budget_run(run, probe)
    per_exit = (time.perf_counter_ns() - t0) / probe
    n = int(sample_ms * 1e6 / per_exit)
    return max(min_exits, min(max_exits, n)), per_exit, 2 * probe


def _kvm_counters(vcpu) -> dict:
    try:
        stats = vcpu.kvm_stats()
    except (kvmsys.KvmsysError, OSError):
        return {}
    return {k: v for k, v in stats.items() if isinstance(v, int) and not k.endswith("_ns")}


class Group:
    """One exit kind on one vCPU of one VM (*abi*'s), with every loop of LOOPS ready to run
    on it in turn, n exits a sample (calibrated at set-up).  Used by this suite (its clocks)
    and by the windows suite (the kernel's).  A context manager: closes the VM."""

    def __init__(self, kind: str, mode: str, abi: str, profile, kvm):
        base, self.label, _space = EXIT_KINDS[kind]
        self.kind, self.name = kind, guest_name(base, mode)
        self.g = self.ref = self.nv = None
        try:
            self.g = g = one_vcpu(abi, self.name, kvm=kvm if abi == "fd" else None, n=0)
            self.vm, self.vcpu, self.run = g.vm, g.vcpu, g.run
            _set_handling(self.vm, kind, "c")
            self.n, self.probe_ns, self.counted = calibrate(self.run, profile.min_exits, profile.max_exits,
                                                            profile.sample_ms)
            self.kick_sig = _core.kick_signal()
            self.uses_mask = self.vcpu.signal_mask == "kvm"   # what kvmsys set in its first run()
            self.ref = _reference.RefVcpu(self.vcpu.fileno(), self.vm.mmap_size)
            self.nv = naive.NaiveVcpu(self.vcpu, self.vm.mmap_size)
            self.ref.signal_mask(-1)
            _validate_naive(self.nv, self.name)
            self.counted += 1
            self._restore_mask()
            self.before = _kvm_counters(self.vcpu)
        except BaseException:
            self.close()
            raise

    def _restore_mask(self) -> None:
        # kvmsys's own mask back (the reference computes the same one: the thread's mask
        # less the kick signal), or none while kvmsys sets none
        self.ref.signal_mask(self.kick_sig if self.uses_mask else -1)

    def _ref_loop(self):
        done, _ns, inside, stop = self.ref.run_exits(self.n)
        if done != self.n:
            raise RuntimeError(f"reference_run stopped after {done} of {self.n} exits (exit reason {stop})")
        return inside

    def _naive_loop(self):
        self.nv.run(self.n)

    def _floor_loop(self):
        done, _ns, inside = self.ref.run_callbacks(self.n, naive_read, naive_write, naive_hlt)
        return inside

    def sample(self, key: str, timed):
        """One sample of loop *key*: *timed*(body) runs body() (the n exits) inside its clocks
        and returns (its measures, body's result).  Set-up and read-out are outside it.
        Returns (measures, KVM_RUN ns by the loop's own clock, or None: the naive loop)."""
        if key in KVMSYS_LOOPS:
            _set_handling(self.vm, self.kind, key)        # switched between samples
            k0 = _core.VcpuCore.stats(self.vcpu)["ns_in_run"]
            out, _ = timed(lambda: _budget_run(self.run, self.n))
            own = _core.VcpuCore.stats(self.vcpu)["ns_in_run"] - k0
        else:
            body = {"ref": self._ref_loop, "ref_mask": self._ref_loop, "naive": self._naive_loop,
                    "pyf": self._floor_loop}[key]
            self.ref.signal_mask(self.kick_sig if key == "ref_mask" else -1)
            try:
                out, own = timed(body)
            finally:
                self._restore_mask()
        self.counted += self.n
        return out, own

    def kvm_per_exit(self) -> dict:
        after = _kvm_counters(self.vcpu)
        return {c: (after[c] - self.before[c]) / self.counted for c in after
                if c in self.before and after[c] != self.before[c]} if self.before else {}

    def close(self) -> None:
        for obj in (self.nv, self.ref, self.g):
            if obj is not None:
                obj.close()
        self.nv = self.ref = self.g = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _clocked(body):
    """Wall time and thread CPU time around body()."""
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    inside = body()
    wall = time.perf_counter_ns() - t0
    return (wall, time.thread_time_ns() - c0), inside


def _measure_group(kind: str, mode: str, abi: str, profile, kvm) -> dict:
    """All loops on one vCPU of one VM (*abi*'s), interleaved."""
    with Group(kind, mode, abi, profile, kvm) as grp:
        n = grp.n

        def sample(key):
            """{key: wall, key/cpu: thread CPU, key/ioctl (the C reference's) or key/own
            (kvmsys's loops and the Python floor: their loop's own clock)} per exit."""
            def go():
                (wall, cpu), own = grp.sample(key, _clocked)
                out = {key: wall / n, f"{key}/cpu": cpu / n}
                if own is not None:
                    out[f"{key}/ioctl" if key.startswith("ref") else f"{key}/own"] = own / n
                return out
            return go

        variants = {key: sample(key) for key in SAMPLE_ORDER}
        progress(f"{NAME}: {grp.label} ({grp.name}, {abi} ABI): {n} exits per sample, "
                 f"{len(variants)} loops on one vCPU × {profile.reps} reps")
        samples = interleave(variants, profile.reps, profile.warmup)
        return dict(name=grp.name, n=n, probe_ns=grp.probe_ns, samples=samples, counter=grp.g.counter(),
                    counted=grp.counted, native=grp.g.native, uses_mask=grp.uses_mask,
                    kvm_per_exit=grp.kvm_per_exit(), signal_mask=grp.vcpu.signal_mask)


def _validate_naive(nv, name: str) -> None:
    """One naive exit, decoded, checked against what the guest is known to do."""
    got = nv.step()
    want = get_guest(name).expect["exit"]
    kind = want["kind"]
    ok = {"pio_out": lambda: got["reason"] == naive.EXIT_IO and not got["is_in"] and got["port"] == want["port"],
          "pio_in": lambda: got["reason"] == naive.EXIT_IO and got["is_in"] and got["port"] == want["port"],
          "mmio_write": lambda: got["reason"] == naive.EXIT_MMIO and got["is_write"] and got["addr"] == want["addr"],
          "mmio_read": lambda: got["reason"] == naive.EXIT_MMIO and not got["is_write"] and got["addr"] == want["addr"],
          "hlt": lambda: got["reason"] == naive.EXIT_HLT}[kind]()
    if not ok:
        raise RuntimeError(f"naive loop decodes kvm_run wrongly: got {got}, the guest does {dict(want)}")


def modes(profile) -> list:
    """The profile's guest mode, and 64-bit too: on a PVM host the emulated modes and
    the native one cost very differently per exit."""
    return [profile.mode] if profile.mode_only else list(dict.fromkeys([profile.mode, "long64"]))


def counter_ok(counter: int, counted: int, slack: int) -> bool:
    """The guest's u32 counter of exit-causing instructions against the exits the loops
    counted (PVM's native mode skips the first hlt without an exit: slack 1 there)."""
    return 0 <= (counter - counted) % (1 << 32) <= slack


def run(profile, kinds=None) -> SuiteResult:
    t_start = time.perf_counter()
    res = SuiteResult(NAME, TITLE, columns=[
        ("mode", "mode"), ("exit", "exit"), ("abi", "VM (one vCPU)"), ("loop", "loop"),
        ("time", "round trip (wall)"), ("cpu", "round trip (thread CPU)"),
        ("ioctl_ns", "KVM_RUN window (wall)"), ("user_ns", "user window (wall)"),
        ("user_cpu", "user window (CPU)"), ("user_own", "user window (own clocks)"),
        ("cpu_over_ref", "CPU − bare C loop's [95% CI]"),
        ("cpu_ratio", "CPU vs bare C loop [95% CI]"),
        ("user_vs_naive", "user window (CPU) vs the naive loop's [95% CI]"),
        ("over_pyf", "user window (own clocks) − the Python floor's [95% CI]"),
        ("count", "guest counter = exits counted")])
    kinds = list(kinds or profile.exit_kinds or EXIT_KINDS)
    measured = {}
    with kvmsys.Kvm() as kvm:
        for mode in modes(profile):
            for k in kinds:
                for abi in ABIS:
                    measured[(mode, k, abi)] = _measure_group(k, mode, abi, profile, kvm)
    native = {mode: any(m["native"] for (md, _k, _a), m in measured.items() if md == mode)
              for mode in modes(profile)}
    for (mode, kind, abi), m in measured.items():
        label = EXIT_KINDS[kind][1]
        grp = f"{mode}/{kind}/{abi}"
        s = m["samples"]
        slack = 1 if (kind == "hlt" and m["native"]) else 0
        good = counter_ok(m["counter"], m["counted"], slack)
        res.check(f"{grp} counter", good,
                  f"{mode} {label}, {abi} VM: guest counter {m['counter']}, the loops counted {m['counted']}")
        mask_ref = "ref_mask" if m["uses_mask"] else "ref"
        for key in LOOPS:
            # the reference that enters KVM_RUN as this loop does; its KVM_RUN window in CPU
            # time = its CPU round trip less its (clocked, sub-µs) user window
            r = key if key.startswith("ref") else mask_ref if key in KVMSYS_LOOPS else "ref"
            ioctl = s[f"{r}/ioctl"]
            ioctl_cpu = [c - (t - i) for c, t, i in zip(s[f"{r}/cpu"], s[r], ioctl)]
            stats = dict(time=Stat(s[key], "ns"), cpu=Stat(s[f"{key}/cpu"], "ns"),
                         user_ns=Stat([t - i for t, i in zip(s[key], ioctl)], "ns"),
                         user_cpu=Stat([c - i for c, i in zip(s[f"{key}/cpu"], ioctl_cpu)], "ns"))
            if key.startswith("ref"):
                stats["ioctl_ns"] = Stat(s[f"{key}/ioctl"], "ns")
                stats["user_own"] = Stat([t - i for t, i in zip(s[key], s[f"{key}/ioctl"])], "ns")
            elif key in KVMSYS_LOOPS or key == "pyf":
                stats["user_own"] = Stat([t - i for t, i in zip(s[key], s[f"{key}/own"])], "ns")
            res.add_row(f"{grp}/{key}", dict(mode=mode, exit=label, abi=ABIS[abi], loop=LOOPS[key],
                                             count=f"{m['counter']} {'✓' if good else '✗ counted ' + str(m['counted'])}"
                                             if key == "ref" else ""),
                        stats, dict(n=m["n"], counter=m["counter"], counted=m["counted"],
                                    kvm_per_exit=m["kvm_per_exit"] if key == "ref" else {}))
        rows = res.rows
        for key in LOOPS:
            if key != "ref":
                st = rows[f"{grp}/{key}"]["stats"]
                st["over_ref"] = derive(rows, "time", f"{grp}/{key}", f"{grp}/ref", "difference")
                st["ratio"] = derive(rows, "time", f"{grp}/{key}", f"{grp}/ref", "ratio")
                st["cpu_over_ref"] = derive(rows, "cpu", f"{grp}/{key}", f"{grp}/ref", "difference")
                st["cpu_ratio"] = derive(rows, "cpu", f"{grp}/{key}", f"{grp}/ref", "ratio")
        mask = rows[f"{grp}/ref_mask"]["stats"]
        mask["mask_ns"] = derive(rows, "ioctl_ns", f"{grp}/ref_mask", f"{grp}/ref", "difference")
        mask["mask_cpu"] = derive(rows, "cpu", f"{grp}/ref_mask", f"{grp}/ref", "difference")
        for key in KVMSYS_LOOPS:
            rows[f"{grp}/{key}"]["stats"]["own_over_ref"] = derive(rows, "user_own", f"{grp}/{key}",
                                                                   f"{grp}/ref", "difference")
        for key in ("py", "pyw", "pyo"):
            rows[f"{grp}/{key}"]["stats"]["py_own"] = derive(rows, "user_own", f"{grp}/{key}", f"{grp}/c",
                                                             "difference")
        rows[f"{grp}/py"]["stats"]["py_path"] = derive(rows, "cpu", f"{grp}/py", f"{grp}/c", "difference")
        for key in ("pyw", "pyo"):
            st = rows[f"{grp}/{key}"]["stats"]
            st["py_path"] = derive(rows, "cpu", f"{grp}/{key}", f"{grp}/c", "difference")
            st["vs_naive"] = derive(rows, "cpu", f"{grp}/{key}", f"{grp}/naive", "ratio")
            # what issue-level goals compare: the time outside KVM_RUN only (the kernel's and
            # the guest's share is the same for both and would hide the difference)
            st["user_vs_naive"] = derive(rows, "user_cpu", f"{grp}/{key}", f"{grp}/naive", "ratio")
        rows[f"{grp}/c"]["stats"]["vs_naive"] = derive(rows, "cpu", f"{grp}/c", f"{grp}/naive", "ratio")
        # the Python floor: what the interpreter alone gives, and kvmsys's own share over it
        pyf = rows[f"{grp}/pyf"]["stats"]
        pyf["user_vs_naive"] = derive(rows, "user_cpu", f"{grp}/pyf", f"{grp}/naive", "ratio")
        rows[f"{grp}/pyo"]["stats"]["over_pyf"] = derive(rows, "user_own", f"{grp}/pyo", f"{grp}/pyf",
                                                         "difference")
        rows[f"{grp}/c"]["extra"]["uses_mask"] = m["uses_mask"]
    first = next(iter(measured.values()))
    res.config = dict(mode=profile.mode, modes=modes(profile), kinds=kinds,
                      exits_per_sample={"/".join(k): m["n"] for k, m in measured.items()},
                      guests={"/".join(k): m["name"] for k, m in measured.items()}, reps=profile.reps,
                      warmup=profile.warmup, naive="fcntl.ioctl(fd, KVM_RUN), no clock in its loop",
                      kvmsys_signal_mask=first["signal_mask"])
    res.notes += [f"Guest mode {mode_label(md, native[md])}." for md in modes(profile)]
    res.notes += [
        f"Guests *_loop with n=0 (endless).  Per exit kind and ABI: one VM, one vCPU, every loop run on it "
        f"in turn, {profile.reps} interleaved rounds after {profile.warmup} warm-up; the exits per sample "
        f"are calibrated at run time to ~{profile.sample_ms:g} ms of kvmsys's C-handled loop.",
        "**KVM_RUN window** (C reference only): from the clock read before the ioctl to the one after "
        "it, clocked per exit in C, with no signal mask and with the mask kvmsys sets "
        f"(KVM_SET_SIGNAL_MASK; kvmsys on this host: signal_mask = {first['signal_mask']!r}).  "
        "**User window** = round trip − the KVM_RUN window of the reference that enters KVM_RUN the same "
        "way (kvmsys's loops: with kvmsys's mask while it sets one; the naive loop: without), paired per "
        "round: KVM_RUN's return to the next entry, everything the loop does outside the ioctl.",
        "**Round trip** = the sample's wall time (perf_counter_ns) / exits; **thread CPU** = "
        "CLOCK_THREAD_CPUTIME_ID over the sample / exits (below the wall time only when the thread "
        "waited).  No window uses getrusage's user/system split: a 64-bit guest running natively on a "
        "PVM host is booked as the thread's *user* time.",
        "**User window, own clocks**: the C reference's and kvmsys's run loop's own clock reads around each "
        "KVM_RUN (kvmsys's `ns_in_run`, read between samples): precise under load, since a thread that waits "
        "for a core mostly waits inside KVM_RUN, but kvmsys's clock starts before its pre-entry checks and "
        "interrupt injection, which it books inside; the user window above (round trip − the reference's "
        "KVM_RUN window) does not miss them.",
        "**− bare C loop** and **vs bare C loop**: the round trip minus / over the C reference's "
        "without a mask, paired per round on the same vCPU; for kvmsys it is everything kvmsys adds, "
        "its mask included (row `ref_mask` − `ref` = the mask's own cost inside KVM_RUN).",
        "The naive loop is what a competent Python programmer writes: `fcntl.ioctl(fd, KVM_RUN)` with no "
        "argument, `mmap` of kvm_run, `struct.unpack_from` per exit, zeros for reads; no clock inside its "
        "loop.  `pyw` is kvmsys with a Python handler doing the same work on the exit object (decode the "
        "fields, zeros for reads); `pyo` does it through read/write callbacks (`AccessOps`), which kvmsys "
        "calls with the access decoded (address, size, value) and whose return value answers a read; `py` "
        "is a no-op handler.  HLT's Python variants are the callback of `vm.set_hlt_action(Kind.PYTHON, "
        "callback)` (`pyo`: one that does nothing, as HLT needs no decoding).",
        "`pyf`, the Python floor: the same callbacks called by a bare C loop (`RefVcpu.run_callbacks`: "
        "the GIL released around each KVM_RUN, the access decoded from kvm_run, a read answered with the "
        "value returned; HLT calls the HLT callback with None): no exit object, no checks, no signals, "
        "kicks or budget.  Its user window over the naive loop's is what the interpreter alone allows; "
        "`pyo` − `pyf` (own clocks) is kvmsys's own share of a callback's exit.",
        "Ratios and differences are per round (paired samples), median with a 95% bootstrap interval of "
        "the median within this run; with `--runs N` the spread is the range over N separate processes.",
    ]
    kvm_note = []
    for (mode, kind, abi), m in measured.items():
        if abi == "fd" and m["kvm_per_exit"]:
            kvm_note.append(f"{mode} {EXIT_KINDS[kind][1]}: "
                            + ", ".join(f"{c} {v:.2f}" for c, v in sorted(m["kvm_per_exit"].items())))
    if kvm_note:
        res.notes.append("What KVM itself counted per user-space exit (its binary statistics, "
                         "`vcpu.kvm_stats()`, fd VM, all loops): " + "; ".join(kvm_note) + ".")
    else:
        res.skipped.append("KVM's binary statistics (KVM_GET_STATS_FD) are not available on this host")
    res.elapsed_s = time.perf_counter() - t_start
    return res
