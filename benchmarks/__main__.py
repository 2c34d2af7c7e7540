"""python -m benchmarks [--quick] [--suite NAME ...] [--json FILE] [--plot FILE.png] [--mode MODE]
                      [--runs N] [--baseline FILE.json [--tolerance F]] [--report FILE.json]
                      [--readme FILE.json]

Also `kvmsys bench ...`, which calls main(argv) and uses its return value:
0 = all checks passed, 1 = a check failed, 2 = usage error, 3 = KVM unavailable,
4 = a metric regressed against --baseline (named on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

SUITES = ["exits", "abi", "console", "dispatch", "threads", "lifecycle", "kick", "scaling", "memory"]
OPTIONAL_SUITES = ["boot", "windows"]      # only with --suite: minutes long (boot), root (windows)
EXIT_MODES = ("real", "pm32", "long64")


def suite_module(name: str):
    return importlib.import_module(f".{name}", __package__)


def run_suites(names, profile) -> dict:
    """Run the named suites in order; {name: SuiteResult}.  (The tests call this too.)"""
    from .harness import progress
    results = {}
    for name in names:
        progress(f"suite {name} ...")
        results[name] = suite_module(name).run(profile)
        progress(f"suite {name} done in {results[name].elapsed_s:.1f} s")
    return results


def _parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure kvmsys on its built-in guests: exit round trips, kernel entry, thread "
                    "switches, vCPU lifecycle, kick latency, scaling and memory, over both ABIs.  "
                    "A Markdown report goes to stdout, progress to stderr.")
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    p.add_argument("--suite", action="append", choices=SUITES + OPTIONAL_SUITES, metavar="NAME",
                   help=f"run only this suite (repeatable): {', '.join(SUITES)}; "
                        f"only when named: {', '.join(OPTIONAL_SUITES)} (boot: real firmware vs QEMU, minutes; "
                        "windows: every loop's user window by the kernel's clock, root)")
    p.add_argument("--json", metavar="FILE", help="also write raw samples and the machine record as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a plot (needs matplotlib: kvmsys[plot])")
    p.add_argument("--mode", choices=EXIT_MODES, default="pm32",
                   help="guest mode of the exit-based suites (default pm32: on a PVM host the cheap "
                        "emulated mode; long64 runs natively there, with costlier exits)")
    p.add_argument("--reps", type=int, help="override the number of interleaved repetitions")
    p.add_argument("--baseline", metavar="FILE.json",
                   help="compare every headline figure with a stored run (its --json); exit 4 naming each "
                        "of kvmsys's that is worse beyond a threshold from the measured run-to-run spread")
    p.add_argument("--tolerance", type=float, default=None,
                   help="with --baseline: a figure must also be this fraction worse (default 0)")
    p.add_argument("--report", metavar="FILE.json",
                   help="measure nothing: print the Markdown report of a stored run (and --plot it; with --baseline, gate it)")
    p.add_argument("--trace", action="store_true",
                   help="also break one exit round trip into segments from the kernel's tracepoints "
                        "(root; mounts tracefs if needed; says why and skips otherwise)")
    p.add_argument("--runs", type=int, default=1,
                   help="repeat the whole measurement in N separate processes (fresh VMs each) and "
                        "report the spread over them (default 1)")
    p.add_argument("--readme", metavar="FILE.json", action="append",
                   help="measure nothing: print README's benchmark section generated from a stored run "
                        "(more --readme: stored runs whose boot or windows suite the verdict adds)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--profile", choices=["tiny", "quick", "full"], help=argparse.SUPPRESS)
    # the self-test's knobs: a known delay per exit (C loop) or per Python handler call, in ns
    p.add_argument("--inject", metavar="c=NS,py=NS,kick=NS", help=argparse.SUPPRESS)
    p.add_argument("--kinds", metavar="KIND,...", help=argparse.SUPPRESS)
    p.add_argument("--mode-only", action="store_true", help=argparse.SUPPRESS)
    return p


def _injections(text: str | None) -> dict:
    """--inject c=100,py=200,kick=1000 -> {"c": 100, "py": 200, "kick": 1000} (ns); ValueError
    on bad input."""
    out = {}
    for part in (text or "").split(","):
        if not part:
            continue
        where, _, ns = part.partition("=")
        if where not in ("c", "py", "kick") or not ns.isdigit() or int(ns) > 10_000_000:
            raise ValueError(f"--inject: {part!r} is not c=NS, py=NS or kick=NS")
        out[where] = int(ns)
    return out


def _child_argv(args, names) -> list:
    """The options a child process of --runs measures with (its JSON goes to a file of ours)."""
    argv = ["--quiet", "--mode", args.mode]
    if args.profile or args.quick:
        argv += ["--profile", args.profile or "quick"]
    if args.reps:
        argv += ["--reps", str(args.reps)]
    for n in names:
        argv += ["--suite", n]
    for flag, value in (("--inject", args.inject), ("--kinds", args.kinds)):
        if value:
            argv += [flag, value]
    if args.mode_only:
        argv.append("--mode-only")
    if args.trace:
        argv.append("--trace")
    return argv


def _run_processes(args, names, n: int) -> list:
    """The measurement in n separate processes, one after another: their documents."""
    import json
    import subprocess
    import tempfile
    from .harness import progress
    docs = []
    with tempfile.TemporaryDirectory(prefix="kvmsys-bench-") as tmp:
        for i in range(n):
            out = os.path.join(tmp, f"run{i}.json")     # a fresh name: never an earlier run's
            progress(f"run {i + 1} of {n} in a separate process ...")
            r = subprocess.run([sys.executable, "-m", __package__, *_child_argv(args, names), "--json", out],
                               stdout=subprocess.DEVNULL)
            if r.returncode not in (0, 1) or not os.path.exists(out):
                raise OSError(f"run {i + 1} of {n} failed (exit code {r.returncode})")
            with open(out) as f:
                docs.append(json.load(f))
    return docs


def _unwritable(path: str) -> str | None:
    """Why *path* cannot be written as an output file, or None (nothing is created)."""
    if os.path.isdir(path):
        return "it is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "permission denied"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"no directory {parent}"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"directory {parent} is not writable"


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    """The harness's command line; *prog* is the name its help and errors give it
    (`kvmsys bench` passes its own)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:              # `kvmsys bench -- --quick`: the separator is not ours
        argv = argv[1:]
    try:
        args = _parser(prog).parse_args(argv)
    except SystemExit as e:             # --help, or a usage error: an exit code, not an exception
        return e.code if isinstance(e.code, int) else 2
    from . import baseline, harness, report
    if args.plot and not report.have_matplotlib():
        print(f"benchmarks: {report.PLOT_HINT}", file=sys.stderr)
        return 2
    if args.reps is not None and args.reps < 1:
        print("benchmarks: --reps must be at least 1", file=sys.stderr)
        return 2
    for out in (args.json, args.plot):
        problem = out and _unwritable(out)
        if problem:             # before the run, not after minutes of it
            print(f"benchmarks: cannot write {out}: {problem}", file=sys.stderr)
            return 2
    if args.runs < 1:
        print("benchmarks: --runs must be at least 1", file=sys.stderr)
        return 2
    try:
        inject = _injections(args.inject)
    except ValueError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    tolerance = baseline.DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if tolerance < 0:
        print("benchmarks: --tolerance must not be negative", file=sys.stderr)
        return 2
    try:
        base = baseline.load(args.baseline) if args.baseline else None
        stored = baseline.load(args.report) if args.report else None
        readme = [(baseline.load(path), path) for path in args.readme or []]
    except (OSError, ValueError) as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    if readme:
        if base is not None:
            print("benchmarks: --baseline compares a run (measured, or stored with --report), "
                  "not README's section", file=sys.stderr)
            return 2
        print(report.readme_section(*readme[0], *readme[1:]), end="")
        return 0
    if stored is not None:          # the Markdown (and plot) regenerated from the JSON alone
        print(report.markdown(stored))
        if args.plot:
            report.plot(stored, args.plot)
        return _gate(stored, base, args.baseline, tolerance) if base is not None else 0
    if not os.path.exists("/dev/kvm"):
        print("benchmarks: /dev/kvm is missing: KVM is not available on this machine", file=sys.stderr)
        return 3
    harness.set_quiet(args.quiet)
    profile = harness.PROFILES[args.profile or ("quick" if args.quick else "full")].with_(mode=args.mode)
    if args.reps:
        profile = profile.with_(reps=args.reps)
    if args.kinds:
        from .guestvm import EXIT_KINDS
        kinds = tuple(args.kinds.split(","))
        if not set(kinds) <= set(EXIT_KINDS):
            print(f"benchmarks: --kinds: choose from {', '.join(EXIT_KINDS)}", file=sys.stderr)
            return 2
        profile = profile.with_(exit_kinds=kinds)
    if args.mode_only:
        profile = profile.with_(mode_only=True)
    names = [s for s in SUITES + OPTIONAL_SUITES if s in (args.suite or SUITES)]
    t0 = time.perf_counter()
    try:
        if args.runs > 1:
            doc = report.merge(_run_processes(args, names, args.runs), argv)
        else:
            machine = harness.machine_record()
            if inject:
                from kvmsys import _core
                _core._bench_delay(0, inject.get("c", 0) / 1e9)
                _core._bench_delay(1, inject.get("py", 0) / 1e9)
                _core._bench_delay(2, inject.get("kick", 0) / 1e9)
                machine["injected"] = inject
            harness.progress(f"profile {profile.name}, suites {', '.join(names)}, guest mode {profile.mode}")
            results = run_suites(names + (["trace"] if args.trace else []), profile)
            doc = report.document(machine, profile, results, argv)
            doc["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
            doc["headline_runs"] = [baseline.headlines(doc)]
    except OSError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    doc["elapsed_s"] = time.perf_counter() - t0
    print(report.markdown(doc))
    if args.json:
        report.write_json(doc, args.json)
        harness.progress(f"JSON written to {args.json}")
    if args.plot:
        report.plot(doc, args.plot)
        harness.progress(f"plot written to {args.plot}")
    if not doc["ok"]:
        print("benchmarks: some checks FAILED (see above)", file=sys.stderr)
        return 1
    return _gate(doc, base, args.baseline, tolerance) if base is not None else 0


def _gate(doc: dict, base: dict, base_path: str, tolerance: float) -> int:
    """--baseline: the comparison's Markdown, its warnings; 4 if a kvmsys figure got worse."""
    from . import baseline
    compared = baseline.compare(doc, base, tolerance)
    warnings = baseline.differences(doc, base)
    print(baseline.markdown(compared, base_path, tolerance, warnings))
    for w in warnings:
        print(f"benchmarks: warning: {w}", file=sys.stderr)
    worse = [r for r in compared if r["worse"]]
    for r in worse:
        print(f"benchmarks: REGRESSION {r['metric']}: {r['old']:.4g} -> {r['new']:.4g} {r['unit']} "
              f"(+{r['delta']:.4g}, threshold {r['threshold']:.4g}; {r['change']:.3f}x)", file=sys.stderr)
    return 4 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
