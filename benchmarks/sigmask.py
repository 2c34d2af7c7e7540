"""What a KVM signal mask costs per exit, A/B on one vCPU (`python -m benchmarks.sigmask`).

kvmsys sets KVM_SET_SIGNAL_MASK only on a vCPU whose running thread blocks the kick
signal; otherwise the kick handler sets immediate_exit (no mask).  So the same run loop
on the same vCPU measures both designs: samples of `run(budget=N)` (exits answered in
the C loop) alternate between the thread's own mask (no KVM mask) and the kick signal
blocked (a KVM mask), A B B A ..., and each pair gives a per-exit difference of the
thread's CPU time (user + system: what the exit costs, robust to other processes taking
the cores), of the time inside KVM_RUN (the loop's own clock, `ns_in_run`) and of the
whole round trip (wall clock).
Reported: medians and the paired difference's median with a 95% bootstrap CI.
"""
from __future__ import annotations

import argparse
import os
import signal
import time

from kvmsys import _core

from .guestvm import guest_name, one_vcpu, set_handling
from .harness import bootstrap_ci


def _sample(m, n: int) -> tuple[float, float, float]:
    st0 = m.vcpu.stats()
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    ex = m.run(budget=n)
    wall = time.perf_counter_ns() - t0
    cpu = time.thread_time_ns() - c0
    if not isinstance(ex, _core.BudgetExit):
        raise RuntimeError(f"expected the budget to end the run, got {ex!r}")
    kernel = m.vcpu.stats()["ns_in_run"] - st0["ns_in_run"]
    return cpu / n, kernel / n, wall / n


def measure(abi: str = "fd", mode: str = "pm32", reps: int = 60, exits: int = 2000) -> dict:
    kick = {_core.kick_signal()}
    m = one_vcpu(abi, guest_name("pio_out_loop", mode), n=0)
    try:
        set_handling(m.vm, "pio_out", "c")
        _sample(m, exits)                                   # first entry's one-off costs
        rows = {"none": [], "kvm": []}
        for i in range(reps):
            order = ("none", "kvm") if i % 2 == 0 else ("kvm", "none")
            for variant in order:
                old = signal.pthread_sigmask(signal.SIG_BLOCK, kick) if variant == "kvm" else None
                try:
                    rows[variant].append(_sample(m, exits))
                    want = "kvm" if variant == "kvm" else "handler"
                    if m.vcpu.signal_mask != want:
                        raise RuntimeError(f"expected signal_mask {want!r}, got {m.vcpu.signal_mask!r}")
                finally:
                    if old is not None:
                        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        m.close()
    out = {"abi": abi, "mode": mode, "reps": reps, "exits_per_sample": exits, "load": os.getloadavg()}
    for k, field in ((0, "cpu"), (1, "kernel"), (2, "round_trip")):
        none = sorted(r[k] for r in rows["none"])
        kvm = sorted(r[k] for r in rows["kvm"])
        diffs = [b[k] - a[k] for a, b in zip(rows["none"], rows["kvm"])]
        out[field] = {"none_median": none[len(none) // 2], "kvm_median": kvm[len(kvm) // 2],
                      "diff_median": sorted(diffs)[len(diffs) // 2], "diff_ci95": bootstrap_ci(diffs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--abi", default="fd", choices=("fd", "sys"))
    ap.add_argument("--mode", default="pm32", choices=("real", "pm32", "long64"))
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--exits", type=int, default=2000)
    a = ap.parse_args()
    r = measure(a.abi, a.mode, a.reps, a.exits)
    print(f"{r['abi']} ABI, {r['mode']}, {r['reps']} pairs x {r['exits_per_sample']} exits, "
          f"load average {r['load'][0]:.2f} {r['load'][1]:.2f} {r['load'][2]:.2f}")
    for field in ("cpu", "kernel", "round_trip"):
        s = r[field]
        lo, hi = s["diff_ci95"]
        print(f"  {field:10s} per exit: no mask {s['none_median']:.0f} ns, KVM mask {s['kvm_median']:.0f} ns, "
              f"paired difference {s['diff_median']:+.0f} ns [{lo:+.0f}, {hi:+.0f}]")


if __name__ == "__main__":
    main()
