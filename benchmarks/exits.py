"""Suite `exits`: round trip per exit, by exit kind and by loop.

Loops compared on the same guest program (each on its own vCPU, interleaved):
the C reference loop, a naive pure-Python loop, and kvmsys's run() over both
ABIs with the exit handled in the C loop or by a Python callback.
"""
from __future__ import annotations

import time

import kvmsys
from kvmsys import _core
from kvmsys.guests import get as get_guest

from . import naive
from .guestvm import EXIT_KINDS, guest_name, mode_label, noop_handler, one_vcpu, set_handling
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "exits"
TITLE = "Exit round trip by kind"

LOOPS = {
    "ref": "C reference loop (`_core.reference_run`)",
    "naive": "naive Python (`fcntl.ioctl` + `mmap` + `struct`)",
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
    """Exits per sample so that one sample of the C-handled loop lasts about sample_ms."""
    probe = max(10, min_exits // 2)
    _budget_run(run, probe)                       # first entry pays one-off costs
    t0 = time.perf_counter_ns()
    _budget_run(run, probe)
    per_exit = (time.perf_counter_ns() - t0) / probe
    n = int(sample_ms * 1e6 / per_exit)
    return max(min_exits, min(max_exits, n)), per_exit


def _measure_kind(kind: str, profile, kvm, request) -> dict:
    base, label, _space = EXIT_KINDS[kind]
    name = guest_name(base, profile.mode)
    machines = {}
    counted = {}               # exits the benchmark loops counted, by machine
    naive_vcpu = None
    try:
        for key in ("ref", "fd_c", "fd_py") + (("naive",) if request is not None else ()):
            machines[key] = one_vcpu("fd", name, kvm=kvm, n=0)
        set_handling(machines["fd_c"].vm, kind, "c")
        set_handling(machines["fd_py"].vm, kind, "python")
        set_handling(machines["ref"].vm, kind, "c")        # unused by reference_run; for symmetry
        counted = {key: 0 for key in machines}
        counted["sys"] = 0
        sysg = one_vcpu("sys", name, n=0)
        try:
            fd_c = machines["fd_c"]
            n, probe_ns = calibrate(fd_c.run, profile.min_exits, profile.max_exits, profile.sample_ms)
            counted["fd_c"] += 2 * max(10, profile.min_exits // 2)

            if request is not None:
                m = machines["naive"]
                naive_vcpu = naive.NaiveVcpu(m.vcpu, m.vm.mmap_size, request)
                _validate_naive(naive_vcpu, name)
                counted["naive"] += 1

            def per_exit(key, fn):
                def sample():
                    t0 = time.perf_counter_ns()
                    fn()
                    dt = time.perf_counter_ns() - t0
                    counted[key] += n
                    return dt / n
                return sample

            def ref():
                done, _ns, reason = _core.reference_run(machines["ref"].vcpu, n)
                if done != n:
                    raise RuntimeError(f"reference_run stopped after {done} of {n} exits "
                                       f"(exit reason {reason})")

            def sys_loop(how):
                def go():
                    set_handling(sysg.vm, kind, how)
                    if how == "python" and kind == "hlt":
                        _python_hlt_run(sysg.run, n)
                    else:
                        _budget_run(sysg.run, n)
                return go

            def fd_loop(machine, how):
                if how == "python" and kind == "hlt":
                    return lambda: _python_hlt_run(machine.run, n)
                return lambda: _budget_run(machine.run, n)

            variants = {"ref": per_exit("ref", ref)}
            if naive_vcpu is not None:
                variants["naive"] = per_exit("naive", lambda: naive_vcpu.run(n))
            variants["fd_c"] = per_exit("fd_c", fd_loop(fd_c, "c"))
            variants["fd_py"] = per_exit("fd_py", fd_loop(machines["fd_py"], "python"))
            variants["sys_c"] = per_exit("sys", sys_loop("c"))
            variants["sys_py"] = per_exit("sys", sys_loop("python"))
            progress(f"{NAME}: {label} ({name}): {n} exits per sample, "
                     f"{len(variants)} loops × {profile.reps} reps")
            samples = interleave(variants, profile.reps, profile.warmup)
            sys_counter = sysg.counter()
            native = sysg.native
        finally:
            sysg.close()
        counts = {k: (m.counter(), counted[k]) for k, m in machines.items()}
        counts["sys_c"] = counts["sys_py"] = (sys_counter, counted["sys"])
        return dict(name=name, n=n, probe_ns=probe_ns, samples=samples, counts=counts, native=native)
    finally:
        if naive_vcpu is not None:
            naive_vcpu.close()
        for m in machines.values():
            m.close()


def _validate_naive(nv, name: str) -> None:
    """One naive exit, decoded, checked against what the guest is known to do."""
    import fcntl
    fcntl.ioctl(nv.fd, nv.request, 0)
    got = nv.decode()
    want = get_guest(name).expect["exit"]
    kind = want["kind"]
    ok = {"pio_out": lambda: got["reason"] == naive.EXIT_IO and not got["is_in"] and got["port"] == want["port"],
          "pio_in": lambda: got["reason"] == naive.EXIT_IO and got["is_in"] and got["port"] == want["port"],
          "mmio_write": lambda: got["reason"] == naive.EXIT_MMIO and got["is_write"] and got["addr"] == want["addr"],
          "mmio_read": lambda: got["reason"] == naive.EXIT_MMIO and not got["is_write"] and got["addr"] == want["addr"],
          "hlt": lambda: got["reason"] == naive.EXIT_HLT}[kind]()
    if not ok:
        raise RuntimeError(f"naive loop decodes kvm_run wrongly: got {got}, the guest does {dict(want)}")


def run(profile, kinds=None) -> SuiteResult:
    t_start = time.perf_counter()
    request = naive.kvm_run_request()
    res = SuiteResult(NAME, TITLE, columns=[
        ("exit", "exit"), ("loop", "loop"), ("time", "per exit"),
        ("ratio", "vs C reference"), ("count", "guest counter = exits counted")])
    if request is None:
        res.skipped.append(naive.UNAVAILABLE)
    kinds = list(kinds or EXIT_KINDS)
    with kvmsys.Kvm() as kvm:
        measured = {k: _measure_kind(k, profile, kvm, request) for k in kinds}
    native = any(m["native"] for m in measured.values())
    for kind, m in measured.items():
        label = EXIT_KINDS[kind][1]
        for key, samples in m["samples"].items():
            counter, counted = m["counts"][key]
            # In PVM's native 64-bit mode the first hlt is skipped without an exit, but counted.
            slack = 1 if (kind == "hlt" and m["native"]) else 0
            good = 0 <= (counter - counted) % (1 << 32) <= slack
            shared = " (shared VM)" if key.startswith("sys") else ""
            res.add_row(f"{kind}/{key}", dict(exit=label, loop=LOOPS[key],
                                              count=f"{counter} {'✓' if good else '✗ counted ' + str(counted)}{shared}"),
                        dict(time=Stat(samples, "ns")), dict(counter=counter, counted=counted, n=m["n"]))
            if key != "sys_py":         # the sys loops share one VM: check it once
                res.check(f"{kind}/{key} counter", good,
                          f"{label}, {LOOPS[key]}: guest counter {counter}, loop counted {counted}")
        for key in m["samples"]:
            if key != "ref":
                res.rows[f"{kind}/{key}"]["stats"]["ratio"] = derive(res.rows, "time", f"{kind}/{key}",
                                                                       f"{kind}/ref", "ratio")
    res.config = dict(mode=profile.mode, exits_per_sample={k: m["n"] for k, m in measured.items()},
                      guests={k: m["name"] for k, m in measured.items()}, reps=profile.reps,
                      warmup=profile.warmup, naive=request is not None)
    res.notes += [
        f"Guest mode: {mode_label(profile.mode, native)}; guests {', '.join(m['name'] for m in measured.values())} "
        f"with n=0 (endless), {profile.reps} interleaved repetitions per loop after {profile.warmup} warm-up.",
        "Exits per sample (calibrated to ~{:g} ms of the fd C-handled loop): {}.".format(
            profile.sample_ms, ", ".join(f"{EXIT_KINDS[k][1]} {m['n']}" for k, m in measured.items())),
        "C handler = the VM's default action for unhandled accesses set to IGNORE (answered in the C run loop); "
        "Python handler = default PYTHON with `vm.default_handler` a no-op callback, called from run(budget=N). "
        "HLT has no callback: its Python variant calls run() once per HLT.",
        "Every loop drives its own vCPU (the two syscall-ABI loops share the thread's one vCPU); all vCPUs "
        "are created by kvmsys, so the kernel's work per exit is the same and only the user-space loop differs.",
        "Ratios are per repetition (paired samples), shown as median (min–max).",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
