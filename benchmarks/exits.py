"""Suite `exits`: round trip per exit, by exit kind and by loop, split into the
loop's own user-space time and the kernel's (+ guest's) time.

Loops compared on the same guest program (each on its own vCPU, interleaved):
the C reference loop, a fair naive pure-Python loop, and kvmsys's run() over both
ABIs with the exit handled in the C loop or by a Python callback.

Every loop clocks each KVM_RUN where it makes the call (in C for the C reference
and kvmsys's run loop, whose `ns_in_run` counter does it; in Python for the naive
loop).  Per sample: kernel_ns = the time inside KVM_RUN, user_ns = the rest of the
sample's wall time, i.e. the sum of the gaps from each KVM_RUN's return to the next
KVM_RUN call (decoding, handling, and for run() its entry and return), per exit.
"""
from __future__ import annotations

import time

import kvmsys
from kvmsys import _core
from kvmsys.guests import get as get_guest

from . import _reference, naive
from .guestvm import EXIT_KINDS, guest_name, mode_label, noop_handler, one_vcpu, set_handling
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "exits"
TITLE = "Exit round trip by kind: user-space time per exit, and the kernel's"

LOOPS = {
    "ref": "C reference loop (`reference_run`)",
    "naive": "naive Python (`fcntl.ioctl(fd, KVM_RUN)` + `mmap` + `struct`)",
    "fd_c": "kvmsys fd ABI, C handler",
    "fd_py": "kvmsys fd ABI, Python handler",
    "sys_c": "kvmsys syscall ABI, C handler",
    "sys_py": "kvmsys syscall ABI, Python handler",
}


def _budget_run(run, n: int) -> None:
    ex = run(budget=n)
    if not isinstance(ex, _core.BudgetExit):
        raise RuntimeError(f"expected the budget to end the run, got {ex!r}")


def _python_hlt_run(run, n: int) -> None:
    # No callback exists for HLT: with hlt_action PYTHON, run() returns each one.
    for _ in range(n):
        ex = run()
        if not isinstance(ex, _core.HltExit):
            raise RuntimeError(f"expected a HLT exit, got {ex!r}")
        noop_handler(ex)


def calibrate(run, min_exits: int, max_exits: int, sample_ms: float) -> tuple[int, float]:
    """Exits per sample so that one sample of the C-handled loop lasts about sample_ms
    on this host now (measured, never assumed)."""
    probe = max(10, min_exits // 2)
    _budget_run(run, probe)                       # first entry pays one-off costs
    t0 = time.perf_counter_ns()
    _budget_run(run, probe)
    per_exit = (time.perf_counter_ns() - t0) / probe
    n = int(sample_ms * 1e6 / per_exit)
    return max(min_exits, min(max_exits, n)), per_exit


def _kvm_counters(vcpu) -> dict:
    try:
        stats = vcpu.kvm_stats()
    except (kvmsys.KvmsysError, OSError):
        return {}
    # KVM's own per-vCPU counters; those that moved are reported per user-space exit
    return {k: v for k, v in stats.items() if isinstance(v, int) and not k.endswith("_ns")}


def _measure_kind(kind: str, mode: str, profile, kvm) -> dict:
    base, label, _space = EXIT_KINDS[kind]
    name = guest_name(base, mode)
    machines = {}
    counted = {}               # exits the benchmark loops counted, by machine
    naive_vcpu = ref_vcpu = None
    try:
        for key in ("ref", "fd_c", "fd_py", "naive"):
            machines[key] = one_vcpu("fd", name, kvm=kvm, n=0)
        set_handling(machines["fd_c"].vm, kind, "c")
        set_handling(machines["fd_py"].vm, kind, "python")
        set_handling(machines["ref"].vm, kind, "c")        # unused by reference_run; for symmetry
        machines["sys"] = one_vcpu("sys", name, n=0)
        counted = {key: 0 for key in machines}
        fd_c, sysg = machines["fd_c"], machines["sys"]
        n, probe_ns = calibrate(fd_c.run, profile.min_exits, profile.max_exits, profile.sample_ms)
        counted["fd_c"] += 2 * max(10, profile.min_exits // 2)
        m = machines["naive"]
        naive_vcpu = naive.NaiveVcpu(m.vcpu, m.vm.mmap_size)
        _validate_naive(naive_vcpu, name)
        counted["naive"] += 1
        before = {k: _kvm_counters(g.vcpu) for k, g in machines.items()}
        counted_before = dict(counted)

        def sample(key, out, fn, setup=None, kernel_clock=None):
            """One sample of n exits: {out: total, out/user: user, out/kernel: kernel} ns per exit.
            fn() runs the exits and returns the ns spent inside KVM_RUN, unless *kernel_clock*
            (the loop's own running total of them) is read before and after, untimed."""
            def go():
                if setup is not None:
                    setup()
                k0 = kernel_clock() if kernel_clock else 0
                t0 = time.perf_counter_ns()
                kernel = fn()
                wall = time.perf_counter_ns() - t0
                if kernel_clock:
                    kernel = kernel_clock() - k0
                counted[key] += n
                return {out: wall / n, f"{out}/user": (wall - kernel) / n, f"{out}/kernel": kernel / n}
            return go

        ref_vcpu = _reference.RefVcpu(machines["ref"].vcpu.fileno(), machines["ref"].vm.mmap_size)

        def ref():
            done, _ns, kernel, stop = ref_vcpu.run_exits(n)
            if done != n:
                raise RuntimeError(f"reference_run stopped after {done} of {n} exits (exit reason {stop})")
            return kernel

        def kvmsys_loop(g, key, out, how):
            run = g.run
            # the run loop's own clock of KVM_RUN (the core's counters: no /proc reads)
            core_stats = _core.VcpuCore.stats
            vcpu = g.vcpu

            def go():
                if how == "python" and kind == "hlt":
                    _python_hlt_run(run, n)
                else:
                    _budget_run(run, n)
                return 0
            setup = (lambda: set_handling(sysg.vm, kind, how)) if g is sysg else None
            return sample(key, out, go, setup, lambda: core_stats(vcpu)["ns_in_run"])

        variants = {
            "ref": sample("ref", "ref", ref),
            "naive": sample("naive", "naive", lambda: naive_vcpu.run(n)),
            "fd_c": kvmsys_loop(fd_c, "fd_c", "fd_c", "c"),
            "fd_py": kvmsys_loop(machines["fd_py"], "fd_py", "fd_py", "python"),
            "sys_c": kvmsys_loop(sysg, "sys", "sys_c", "c"),
            "sys_py": kvmsys_loop(sysg, "sys", "sys_py", "python"),
        }
        progress(f"{NAME}: {label} ({name}): {n} exits per sample, "
                 f"{len(variants)} loops × {profile.reps} reps")
        samples = interleave(variants, profile.reps, profile.warmup)
        after = {k: _kvm_counters(g.vcpu) for k, g in machines.items()}
        kvm_per_exit = {}
        for k in machines:
            exits = counted[k] - counted_before[k]
            if before[k] and exits:
                kvm_per_exit[k] = {c: (after[k][c] - before[k][c]) / exits for c in after[k]
                                   if c in before[k] and after[k][c] != before[k][c]}
        counts = {k: (g.counter(), counted[k]) for k, g in machines.items()}
        counts["sys_c"] = counts["sys_py"] = counts.pop("sys")
        kvm_per_exit["sys_c"] = kvm_per_exit["sys_py"] = kvm_per_exit.pop("sys", {})
        return dict(name=name, n=n, probe_ns=probe_ns, samples=samples, counts=counts,
                    native=sysg.native, kvm_per_exit=kvm_per_exit)
    finally:
        if naive_vcpu is not None:
            naive_vcpu.close()
        if ref_vcpu is not None:
            ref_vcpu.close()
        for g in machines.values():
            g.close()


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
    return list(dict.fromkeys([profile.mode, "long64"]))


def run(profile, kinds=None) -> SuiteResult:
    t_start = time.perf_counter()
    res = SuiteResult(NAME, TITLE, columns=[
        ("mode", "mode"), ("exit", "exit"), ("loop", "loop"),
        ("user_ns", "user space per exit"), ("kernel_ns", "kernel + guest per exit"),
        ("d_user", "user space − C reference's [95% CI]"), ("ratio", "round trip vs C reference [95% CI]"),
        ("count", "guest counter = exits counted")])
    kinds = list(kinds or EXIT_KINDS)
    measured = {}
    with kvmsys.Kvm() as kvm:
        for mode in modes(profile):
            for k in kinds:
                measured[(mode, k)] = _measure_kind(k, mode, profile, kvm)
    native = {mode: any(m["native"] for (md, _k), m in measured.items() if md == mode) for mode in modes(profile)}
    for (mode, kind), m in measured.items():
        label = EXIT_KINDS[kind][1]
        grp = f"{mode}/{kind}"
        for key in LOOPS:
            counter, counted = m["counts"][key]
            # In PVM's native 64-bit mode the first hlt is skipped without an exit, but counted.
            slack = 1 if (kind == "hlt" and m["native"]) else 0
            good = 0 <= (counter - counted) % (1 << 32) <= slack
            shared = " (shared VM)" if key.startswith("sys") else ""
            res.add_row(f"{grp}/{key}", dict(mode=mode, exit=label, loop=LOOPS[key],
                                             count=f"{counter} {'✓' if good else '✗ counted ' + str(counted)}{shared}"),
                        dict(user_ns=Stat(m["samples"][f"{key}/user"], "ns"),
                             kernel_ns=Stat(m["samples"][f"{key}/kernel"], "ns"),
                             time=Stat(m["samples"][key], "ns")),
                        dict(counter=counter, counted=counted, n=m["n"],
                             kvm_per_exit=m["kvm_per_exit"].get(key, {})))
            if key != "sys_py":         # the sys loops share one VM: check it once
                res.check(f"{grp}/{key} counter", good,
                          f"{mode} {label}, {LOOPS[key]}: guest counter {counter}, loop counted {counted}")
        for key in LOOPS:
            if key != "ref":
                stats = res.rows[f"{grp}/{key}"]["stats"]
                stats["d_user"] = derive(res.rows, "user_ns", f"{grp}/{key}", f"{grp}/ref", "difference")
                stats["ratio"] = derive(res.rows, "time", f"{grp}/{key}", f"{grp}/ref", "ratio")
    res.config = dict(mode=profile.mode, modes=modes(profile),
                      exits_per_sample={f"{md}/{k}": m["n"] for (md, k), m in measured.items()},
                      guests={f"{md}/{k}": m["name"] for (md, k), m in measured.items()}, reps=profile.reps,
                      warmup=profile.warmup, naive="fcntl.ioctl(fd, KVM_RUN)")
    res.notes += [f"Guest mode {mode_label(md, native[md])}." for md in modes(profile)]
    res.notes += [
        f"Guests *_loop with n=0 (endless), {profile.reps} interleaved repetitions per loop after "
        f"{profile.warmup} warm-up.",
        "Exits per sample, calibrated at run time to ~{:g} ms of the fd C-handled loop: {}.".format(
            profile.sample_ms, ", ".join(f"{md} {EXIT_KINDS[k][1]} {m['n']}" for (md, k), m in measured.items())),
        "**User space per exit** = (wall time of the sample − time inside KVM_RUN) / exits: the gaps from "
        "each KVM_RUN's return to the next KVM_RUN call, i.e. the loop's own work (for run(): also its entry "
        "and return once per sample).  KVM_RUN is clocked where the loop makes the call: in C by the C "
        "reference and by kvmsys's run loop (its `ns_in_run` counter), in Python for the naive loop "
        "(`time.perf_counter_ns()` around `fcntl.ioctl`); every loop reads one clock on each side of every "
        "KVM_RUN.  **Kernel + guest per exit** = time inside KVM_RUN / exits.",
        "The naive loop is what a competent Python programmer writes: `fcntl.ioctl(fd, KVM_RUN)` with no "
        "argument (an explicit `0` makes CPython try to parse it as a buffer first, microseconds per call), "
        "`mmap` of kvm_run, `struct.unpack_from` per exit.",
        "C handler = the VM's default action for unhandled accesses set to IGNORE (answered in the C run loop); "
        "Python handler = default PYTHON with `vm.default_handler` a no-op callback, called from run(budget=N). "
        "HLT has no callback: its Python variant calls run() once per HLT.",
        "Every loop drives its own vCPU (the two syscall-ABI loops share the thread's one vCPU); all vCPUs "
        "are created by kvmsys, so the kernel's work per exit is the same and only the user-space loop differs.",
        "Differences and ratios are per repetition (paired samples), median with a 95% bootstrap confidence "
        "interval of the median in brackets.",
    ]
    kvm_note = []
    for (mode, kind), m in measured.items():
        per = m["kvm_per_exit"].get("fd_c")
        if per:
            kvm_note.append(f"{mode} {EXIT_KINDS[kind][1]}: "
                            + ", ".join(f"{c} {v:.2f}" for c, v in sorted(per.items())))
    if kvm_note:
        res.notes.append("What KVM itself counted per user-space exit (its binary statistics, "
                         "`vcpu.kvm_stats()`, fd ABI C-handler loop): " + "; ".join(kvm_note) + ".")
    else:
        res.skipped.append("KVM's binary statistics (KVM_GET_STATS_FD) are not available on this host")
    res.elapsed_s = time.perf_counter() - t_start
    return res
