"""The regression gate's power: what `--baseline` detects, measured with known delays.

    python -m kvmsys_bench.selftest [--trials 20] [--base-runs 5] [--c 50,100,200]
                                    [--py 100,200,400] [--kinds KIND,...] [--json FILE]

First a baseline of --base-runs separate processes (the exits suite, guest mode pm32 only).
Then --trials rounds; each round runs, each in a fresh process and in turn: identical code
(no delay), and kvmsys with a known delay injected through its compiled-in benchmark hook
(`kvmsys._core._bench_delay`: a busy-wait of N ns on every exit its C loop dispatches, `c`,
or before every Python handler call, `py`).  Each process is gated against the baseline
exactly as `--baseline` does it.  Reported: the false-alarm rate (identical code flagged on
any of kvmsys's figures), and per delay the detection rate of the figure it moves (C loop:
`c/user_own`, kvmsys's C loop's user window over the bare C loop's; Python: `py/path_own`, the
no-op handler's over the C loop's; both ABIs, so 2 × trials tries per delay; the user windows
by the loops' own clocks), and the smallest delay detected in at least
95% of tries while false alarms stay at most 5%.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from . import baseline

FIGURE = {"c": "c/user_own", "py": "py/path_own"}


def _bench(args: list, out: str) -> dict:
    if os.path.exists(out):
        os.unlink(out)          # never read an earlier process's document
    r = subprocess.run([sys.executable, "-m", __package__, "--quiet", "--suite", "exits", "--mode", "pm32",
                        "--mode-only", *args, "--json", out], stdout=subprocess.DEVNULL)
    if r.returncode not in (0, 1) or not os.path.exists(out):
        raise RuntimeError(f"benchmark process failed (exit code {r.returncode}): {args}")
    with open(out) as f:
        return json.load(f)


def _delays(text: str) -> list:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmsys_bench.selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--base-runs", type=int, default=5)
    p.add_argument("--c", default="50,100,200", help="delays per exit in the C loop, ns")
    p.add_argument("--py", default="100,200,400", help="delays per Python handler call, ns")
    p.add_argument("--kinds", default="", help="exit kinds (default: all)")
    p.add_argument("--profile", default="quick", choices=["tiny", "quick", "full"])
    p.add_argument("--json", metavar="FILE", help="also write every trial's outcome as JSON")
    a = p.parse_args(argv)
    if a.trials < 1 or a.base_runs < 2:
        p.error("--trials must be at least 1 and --base-runs at least 2")
    common = ["--profile", a.profile] + (["--kinds", a.kinds] if a.kinds else [])
    conditions = [("none", 0)] + [("c", d) for d in _delays(a.c)] + [("py", d) for d in _delays(a.py)]
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    outcome: dict = {f"{w}={d}": [] for w, d in conditions}
    values: dict = {}               # the gated figures' values, by condition (for the noise)
    with tempfile.TemporaryDirectory(prefix="kvmsys-selftest-") as tmp:
        print(f"[selftest] baseline: {a.base_runs} processes", file=sys.stderr, flush=True)
        base = _bench(common + ["--runs", str(a.base_runs)], os.path.join(tmp, "base.json"))
        for t in range(a.trials):
            print(f"[selftest] trial {t + 1} of {a.trials}", file=sys.stderr, flush=True)
            for where, d in conditions:
                inject = [] if where == "none" else ["--inject", f"{where}={d}"]
                doc = _bench(common + inject, os.path.join(tmp, "trial.json"))
                compared = baseline.compare(doc, base)
                flagged = sorted(r["metric"] for r in compared if r["worse"])
                outcome[f"{where}={d}"].append(flagged)
                for r in compared:
                    if r["metric"].endswith(tuple(FIGURE.values())):
                        values.setdefault(f"{where}={d}", {}).setdefault(r["metric"], []).append(r["new"])
    elapsed = time.perf_counter() - t0
    load1 = os.getloadavg()
    null = outcome["none=0"]
    false_alarm = sum(bool(f) for f in null) / len(null)
    abis = sorted({m.split("/")[2] for m in baseline.headlines(base) if m.startswith("exits/")})
    lines = ["| injected | figure | detected | of tries |", "|---|---|---:|---:|",
             f"| nothing (identical code) | any of kvmsys's figures (false alarm) | {false_alarm:.0%} | {len(null)} |"]
    smallest = {}
    rates = {}
    for where, d in conditions[1:]:
        tries = [f"exits/pm32/{abi}/{FIGURE[where]}" in flagged
                 for flagged in outcome[f"{where}={d}"] for abi in abis]
        rate = sum(tries) / len(tries)
        rates[f"{where}={d}"] = rate
        lines.append(f"| +{d} ns {'per exit, C loop' if where == 'c' else 'per Python handler call'} "
                     f"| {FIGURE[where]} | {rate:.0%} | {len(tries)} |")
        if rate >= 0.95 and false_alarm <= 0.05 and where not in smallest:
            smallest[where] = d
    print(f"# Regression gate self-test ({a.trials} trials, baseline of {a.base_runs} processes, "
          f"profile {a.profile}, pm32, kinds {a.kinds or 'all'})\n")
    print(f"- {elapsed:.0f} s; 1-min load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end.")
    for where, label in (("c", "C loop, per exit"), ("py", "Python path, per handler call")):
        got = smallest.get(where)
        print(f"- smallest regression detected in ≥ 95% of tries with ≤ 5% false alarms, {label}: "
              + (f"+{got} ns" if got is not None else "none of those tried"))
    alarms: dict = {}
    for flagged in null:
        for m in flagged:
            alarms[m] = alarms.get(m, 0) + 1
    if alarms:
        print("- false alarms by figure: " + ", ".join(f"{m} {n}×" for m, n in
                                                       sorted(alarms.items(), key=lambda x: -x[1])))
    print()
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(trials=a.trials, base_runs=a.base_runs, profile=a.profile, kinds=a.kinds,
                           elapsed_s=elapsed, load_avg=[list(load0), list(load1)], false_alarm=false_alarm,
                           rates=rates, smallest=smallest, outcome=outcome, values=values,
                           base={m: [r[m]["value"] for r in baseline.run_values(base)]
                                 for m in baseline.headlines(base)}), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
