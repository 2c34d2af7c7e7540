"""Compare a run with a stored one (`--baseline FILE.json`): the regression gate.

Compared are the headline figures (`headlines()`): what kvmsys costs per exit over the bare C
loop on the same vCPU (CPU time, and as a ratio), its user window, the signal mask's cost
inside KVM_RUN, the Python path (no-op and naive-equivalent handler over the C loop, and over
the naive loop), the entry points, kick latency, vCPU add/remove, console and boot; each in
ns or as a ratio, each from paired samples of one run.  Exit-suite figures are the median over
the exit kinds of one guest mode and ABI: a regression of the run loop moves every kind alike,
while the noise of the kinds is partly independent.

A figure is worse when its value moved up by more than its threshold, measured from spread:

    threshold = K × s × sqrt(1/n_new + 1/n_base),  at least tolerance × |baseline value|

where s is the run-to-run standard deviation of that figure, pooled over the runs of both
documents (each `--runs N` run holds one value per separate process), n_new and n_base their
runs, K = 4.  Without run-to-run spread on either side (single runs) the threshold is a
relative one, max(tolerance, 0.5) × |baseline|, and the comparison says so.  Only kvmsys's own
figures fail the gate; references (the C loops, the naive loop, QEMU) are compared and shown.
`python -m kvmsys_bench.selftest` measures what this gate detects (injected delays).
"""
from __future__ import annotations

import json
import math
import statistics

K = 4.0
DEFAULT_TOLERANCE = 0.0
SINGLE_RUN_TOLERANCE = 0.5

# suites other than exits: per row, stat -> unit; rows whose id names a reference are references
ROW_FIGURES = {
    "abi": ("d_user", "ratio"),
    "dispatch": ("time", "ratio"),
    "lifecycle": ("time", "ratio"),
    "kick": ("time", "ratio"),
    "console": ("time", "ratio"),
    "boot": ("time", "ratio"),
}
REFERENCES = ("c", "qemu", "floor")      # row-id parts naming a reference, not kvmsys

# exits: (loop, stat, name, label, kvmsys's own: None = while kvmsys sets the mask).  Wall-time
# windows are shown, not gated: a thread that waits for a core inflates them, thread CPU not.
EXIT_FIGURES = [
    ("c", "own_over_ref", "c/user_own", "kvmsys C loop's user window − bare C loop's, own clocks", True),
    ("py", "py_own", "py/path_own", "no-op Python handler − C loop, user windows by own clocks", True),
    ("pyw", "py_own", "pyw/path_own", "naive-work Python handler − C loop, user windows by own clocks", True),
    ("pyo", "py_own", "pyo/path_own", "naive-work read/write callbacks − C loop, user windows by own clocks", True),
    ("c", "cpu_over_ref", "c/cost", "kvmsys C loop − bare C loop, CPU per exit", True),
    ("c", "cpu_ratio", "c/ratio", "kvmsys C loop ÷ bare C loop, CPU per exit", True),
    ("c", "user_cpu", "c/user", "kvmsys C loop: user window, CPU per exit", True),
    ("c", "user_ns", "c/user_wall", "kvmsys C loop: user window, wall per exit", False),
    ("c", "cpu", "c/round_trip", "kvmsys C loop: round trip, CPU per exit", True),
    ("ref_mask", "mask_cpu", "mask/cost", "the signal mask inside KVM_RUN, CPU per exit", None),
    ("ref_mask", "mask_ns", "mask/ioctl", "the signal mask inside KVM_RUN, clocked per exit", False),
    ("py", "py_path", "py/path", "no-op Python handler − C loop, CPU per exit", True),
    ("pyw", "py_path", "pyw/path", "naive-work Python handler − C loop, CPU per exit", True),
    ("pyw", "vs_naive", "pyw/vs_naive", "naive-work Python handler ÷ naive loop, CPU per exit", True),
    ("pyw", "user_vs_naive", "pyw/user_vs_naive", "naive-work Python handler ÷ naive loop, user windows (CPU)",
     True),
    ("pyo", "py_path", "pyo/path", "naive-work read/write callbacks − C loop, CPU per exit", True),
    ("pyo", "vs_naive", "pyo/vs_naive", "naive-work read/write callbacks ÷ naive loop, CPU per exit", True),
    ("pyo", "user_vs_naive", "pyo/user_vs_naive",
     "naive-work read/write callbacks ÷ naive loop, user windows (CPU)", True),
    ("c", "vs_naive", "c/vs_naive", "kvmsys C loop ÷ naive loop, CPU per exit", True),
    ("naive", "cpu_over_ref", "naive/cost", "naive loop − bare C loop, CPU per exit", False),
    ("ref", "cpu", "ref/round_trip", "bare C loop: round trip, CPU per exit", False),
]


def _exit_groups(suite: dict) -> dict:
    """{(mode, abi): [kind, ...]} of an exits suite's rows (ids mode/kind/abi/loop)."""
    groups: dict = {}
    for rid in suite["rows"]:
        parts = rid.split("/")
        if len(parts) == 4:
            groups.setdefault((parts[0], parts[2]), [])
            if parts[1] not in groups[(parts[0], parts[2])]:
                groups[(parts[0], parts[2])].append(parts[1])
    return groups


def headlines(doc: dict) -> dict:
    """{name: {value, unit, label, kvmsys}} of one run's document."""
    out = {}
    ex = doc["suites"].get("exits")
    if ex:
        rows = ex["rows"]
        for (mode, abi), kinds in _exit_groups(ex).items():
            uses_mask = rows.get(f"{mode}/{kinds[0]}/{abi}/c", {}).get("extra", {}).get("uses_mask", True)
            for loop, stat, name, label, own in EXIT_FIGURES:
                vals = [rows[f"{mode}/{k}/{abi}/{loop}"]["stats"][stat]["median"] for k in kinds
                        if stat in rows.get(f"{mode}/{k}/{abi}/{loop}", {}).get("stats", {})]
                if not vals:
                    continue
                unit = rows[f"{mode}/{kinds[0]}/{abi}/{loop}"]["stats"][stat]["unit"]
                out[f"exits/{mode}/{abi}/{name}"] = dict(
                    value=statistics.median(vals), unit=unit, kvmsys=uses_mask if own is None else own,
                    label=f"{label} ({mode}, {abi} ABI, median of {len(vals)} exit kinds)")
    for suite, stats in ROW_FIGURES.items():
        s = doc["suites"].get(suite)
        if not s:
            continue
        for rid, row in s["rows"].items():
            for stat in stats:
                st = row["stats"].get(stat)
                if st is None or len(st["samples"]) < 1:
                    continue
                ref = any(p in REFERENCES for p in rid.split("/"))
                out[f"{suite}/{rid}/{stat}"] = dict(value=st["median"], unit=st["unit"], kvmsys=not ref,
                                                    label=f"{suite}: {rid} {stat}")
    return out


def run_values(doc: dict) -> list:
    """One headline dict per separate process of the document (one for a single run)."""
    return doc.get("headline_runs") or [headlines(doc)]


def load(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "suites" not in doc:
        raise ValueError(f"{path}: not a benchmark JSON document (no 'suites')")
    return doc


def _sd(values: list) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def compare(doc: dict, base: dict, tolerance: float = DEFAULT_TOLERANCE, k: float = K) -> list:
    """Every headline figure present in both: [{metric, label, unit, old, new, delta, change,
    threshold, spread, kvmsys, worse}]."""
    new_runs, old_runs = run_values(doc), run_values(base)
    out = []
    for name, info in new_runs[0].items():
        nv = [r[name]["value"] for r in new_runs if name in r]
        ov = [r[name]["value"] for r in old_runs if name in r]
        if not nv or not ov:
            continue
        new, old = statistics.fmean(nv), statistics.fmean(ov)
        # pooled run-to-run standard deviation of the figure
        parts = [(len(v) - 1, _sd(v)) for v in (nv, ov) if len(v) >= 2]
        if parts:
            s = math.sqrt(sum(d * sd * sd for d, sd in parts) / sum(d for d, _sd_ in parts))
            thr = max(k * s * math.sqrt(1 / len(nv) + 1 / len(ov)), tolerance * abs(old))
        else:
            s = None
            thr = max(tolerance, SINGLE_RUN_TOLERANCE) * abs(old)
        delta = new - old
        out.append(dict(metric=name, label=info["label"], unit=info["unit"], old=old, new=new, delta=delta,
                        change=new / old if old else math.inf, threshold=thr, spread=s,
                        runs=(len(nv), len(ov)), kvmsys=info["kvmsys"],
                        worse=bool(info["kvmsys"] and delta > thr)))
    return out


MACHINE_KEYS = [("host_kvm_flavour", "host KVM flavour"), ("cpu_model", "CPU"), ("cores", "cores"),
                ("kernel", "kernel"), ("python", "Python"), ("kvmsys", "kvmsys version"),
                ("injected", "injected delays (self-test)")]


def differences(doc: dict, base: dict) -> list:
    """Why the two runs may not be comparable: [warning text]."""
    warn = []
    m, b = doc["machine"], base["machine"]
    for key, label in MACHINE_KEYS:
        if m.get(key) != b.get(key):
            warn.append(f"{label} differs: baseline {b.get(key)!r}, this run {m.get(key)!r}")
    p, q = doc["profile"], base["profile"]
    for key in ("name", "mode", "reps", "sample_ms"):
        if p.get(key) != q.get(key):
            warn.append(f"profile {key} differs: baseline {q.get(key)!r}, this run {p.get(key)!r}")
    cores = m.get("cores") or 1
    for who, rec in (("baseline", b), ("this run", m)):
        loads = [x for x in (rec.get("load_avg") or [None])[:1] + (rec.get("load_avg_end") or [None])[:1]
                 if x is not None]
        if loads and max(loads) > 0.5 * cores:
            warn.append(f"{who} ran on a loaded host (1-min load average up to {max(loads):g} on {cores} cores): "
                        "other processes shared its cores")
    cfg = [d["suites"].get("exits", {}).get("config", {}) for d in (base, doc)]
    for key, label in (("kvmsys_signal_mask", "kvmsys's signal-mask design"), ("kinds", "exit kinds"),
                       ("modes", "guest modes")):
        if cfg[0].get(key) != cfg[1].get(key):
            warn.append(f"{label} differs: baseline {cfg[0].get(key)!r}, this run {cfg[1].get(key)!r}")
    kick = [d["suites"].get("kick", {}).get("config") for d in (base, doc)]
    if kick[0] and kick[1]:
        # a kick suite that records no order ran in one fixed order, which held kvmsys back
        # (see kick.py's note): its kick figures are not the same measure
        for key, label in (("order", "the kick suite's sample order"), ("loads", "the kick suite's guest loads")):
            if kick[0].get(key) != kick[1].get(key):
                warn.append(f"{label} differs: baseline {kick[0].get(key) or 'fixed'!r}, "
                            f"this run {kick[1].get(key) or 'fixed'!r}")
    if len(run_values(base)) < 2 and len(run_values(doc)) < 2:
        warn.append("neither document has run-to-run spread (one process each): thresholds are "
                    f"{max(SINGLE_RUN_TOLERANCE, 0):.0%} of each figure; store a baseline with --runs 3 or more")
    return warn


def markdown(results: list, path: str, tolerance: float, warnings: list = ()) -> str:
    from .report import fmt_value
    worse = [r for r in results if r["worse"]]
    lines = [f"## Regressions against {path}", ""]
    for w in warnings:
        lines.append(f"- **Warning:** {w}")
    lines += [f"- {len(results)} headline figures compared ({sum(r['kvmsys'] for r in results)} of them "
              f"kvmsys's own, which can fail the gate); worse beyond the threshold: {len(worse)}.  "
              f"Threshold = {K:g} × run-to-run SD × √(1/n + 1/n₀)"
              + (f", at least {tolerance:.0%}" if tolerance else "") + ".", ""]
    lines += ["| figure | baseline | this run | change | threshold | runs (this, baseline) | |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        unit = r["unit"]
        delta = (f"{'+' if r['delta'] >= 0 else '−'}{fmt_value(abs(r['delta']), unit)}"
                 f" ({r['change']:.3f}×)")
        mark = "**WORSE**" if r["worse"] else ("" if r["kvmsys"] else "reference")
        lines.append(f"| {r['label']} | {fmt_value(r['old'], unit)} | {fmt_value(r['new'], unit)} | {delta} "
                     f"| {fmt_value(r['threshold'], unit)} | {r['runs'][0]}, {r['runs'][1]} | {mark} |")
    lines.append("")
    return "\n".join(lines)
