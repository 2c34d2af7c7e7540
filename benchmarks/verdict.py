"""The report's opening verdict, and README's benchmark section, from a run's own numbers.

Every figure is a headline figure of `baseline.headlines()`: the median over the run's
separate processes with ‹the lowest – the highest› of them (one process: no spread, said so).
"""
from __future__ import annotations

import statistics

from .baseline import run_values
from .guestvm import EXIT_KINDS


def _fig(doc: dict, name: str):
    vals = [r[name]["value"] for r in run_values(doc) if name in r]
    if not vals:
        return None
    unit = next(r[name]["unit"] for r in run_values(doc) if name in r)
    return dict(median=statistics.median(vals), lo=min(vals), hi=max(vals), n=len(vals), unit=unit)


def _text(f) -> str:
    from .report import _fmt
    if f is None:
        return "not measured"
    around = " ‹{} – {}›" if f["n"] > 1 else None
    return _fmt(f["unit"], f["median"], f["lo"], f["hi"], around)


def _apart(a, b) -> bool:
    """a's and b's ranges over the runs do not overlap (one run each: never apart)."""
    return a["n"] > 1 and b["n"] > 1 and (a["hi"] < b["lo"] or b["hi"] < a["lo"])


def verdict(doc: dict) -> str:
    runs = len(run_values(doc))
    spread = (f"median of {runs} separate processes ‹lowest – highest›" if runs > 1 else
              "one process: no run-to-run spread (use --runs 3 or more)")
    ex = doc["suites"].get("exits")
    parts = [f"**Verdict** ({spread}; thread CPU per exit, on one vCPU per VM)."]
    if ex:
        modes = ex.get("config", {}).get("modes") or [doc["profile"]["mode"]]
        mode = modes[0]

        def f(abi, name, md=mode):
            return _fig(doc, f"exits/{md}/{abi}/{name}")
        c_sys, c_fd = f("sys", "c/cost"), f("fd", "c/cost")
        if c_sys and c_fd:
            if _apart(c_sys, c_fd):
                cheaper = "syscall" if c_sys["median"] < c_fd["median"] else "fd"
                parts.append(f"**Which ABI:** the {cheaper} ABI costs less per exit ({_text(c_sys)} syscall, "
                             f"{_text(c_fd)} fd, over a bare C loop, {mode} guests).")
            else:
                parts.append(f"**Which ABI:** both cost the same per exit within the spread ({_text(c_sys)} "
                             f"syscall, {_text(c_fd)} fd, over a bare C loop, {mode} guests): choose by API; "
                             "the syscall ABI keeps each vCPU on its thread.")
        mask = f("sys", "mask/cost")
        uses = ex.get("config", {}).get("kvmsys_signal_mask") == "kvm"
        other = [md for md in modes if md != mode]
        extra = ""
        if other:
            extra = (f"; {other[0]} guests: {_text(f('sys', 'c/cost', other[0]))} syscall, "
                     f"{_text(f('fd', 'c/cost', other[0]))} fd")
        parts.append(f"**Over a bare C loop** (the same vCPU, no signal mask), an exit handled in kvmsys's C "
                     f"loop costs {_text(c_sys)} more with the syscall ABI, {_text(c_fd)} with the fd ABI "
                     f"({mode} guests{extra}); "
                     + (f"of that, the KVM signal mask kvmsys sets costs {_text(mask)} inside KVM_RUN, "
                        if uses else f"kvmsys sets no KVM signal mask (one would cost {_text(mask)}), ")
                     + f"and its user window is {_text(f('sys', 'c/user'))} (by the loops' own clocks around "
                     f"KVM_RUN, which a loaded host disturbs least: {_text(f('sys', 'c/user_own'))} more than the "
                     f"bare C loop's, fd ABI {_text(f('fd', 'c/user_own'))}).")
        parts.append(f"**Over a naive Python loop** (`fcntl.ioctl` + `mmap`): kvmsys's C-handled loop takes "
                     f"{_text(f('sys', 'c/vs_naive'))} of its CPU per exit; a Python handler doing the naive "
                     f"loop's work takes {_text(f('sys', 'pyw/vs_naive'))}"
                     + (f", and outside KVM_RUN {_text(f('sys', 'pyw/user_vs_naive'))} of the naive loop's user "
                        "time (each loop's round trip less the C reference's KVM_RUN window)"
                        if f('sys', 'pyw/user_vs_naive') else "")
                     + (f"; through read/write callbacks (`AccessOps`, the access decoded by kvmsys) "
                        f"{_text(f('sys', 'pyo/vs_naive'))}, outside KVM_RUN "
                        f"{_text(f('sys', 'pyo/user_vs_naive'))}" if f('sys', 'pyo/user_vs_naive') else "")
                     + f" (a no-op handler adds "
                     f"{_text(f('sys', 'py/path'))} over the C loop; own clocks: {_text(f('sys', 'py/path_own'))}).")
    boot = doc["suites"].get("boot")
    if boot:
        from .report import fmt_stat
        texts = [f"{rid.split('/')[0]} {rid.split('-')[-1]} ABI {fmt_stat(row['stats']['ratio'])}"
                 for rid, row in boot["rows"].items() if "ratio" in row["stats"]]
        parts.append("**Against QEMU** (the same firmware to the same text, fresh processes, paired rounds "
                     "[95% CI]): kvmsys takes " + (", ".join(texts) if texts else "— (QEMU not installed)")
                     + " of QEMU's time" + (f" (boot suite from {doc['boot_from']})" if doc.get("boot_from")
                                             else "") + ".")
    else:
        parts.append("**Against QEMU:** not measured in this run (`--suite boot`, minutes long).")
    if doc["suites"].get("windows"):
        parts.append(_windows_text(doc))
    return " ".join(parts)


def _stat_fig(st: dict) -> dict:
    """A row's stat as a figure: the median over the processes ‹lowest – highest› (one
    process: its median)."""
    per = st.get("runs") or [st["median"]]
    return dict(median=statistics.median(per), lo=min(per), hi=max(per), n=len(per), unit=st["unit"])


def _windows_text(doc: dict) -> str:
    """The windows suite's figures: what read/write callbacks and the Python floor take of
    the naive loop's user window by the kernel's clock, per guest mode whose every proof
    passed (a known delay showed); the others said unresolved."""
    win = doc["suites"]["windows"]
    cfg, rows = win.get("config", {}), win["rows"]
    texts = []
    for mode in cfg.get("modes", []):
        checks = [c for c in win["checks"] if c["name"].split(": ")[-1].startswith(f"{mode}/")]
        failed = [c for c in checks if not c["ok"]]
        if failed or not checks:
            texts.append(f"{mode} guests not resolved ({len(failed)} of {len(checks)} proofs failed: a "
                         f"{cfg.get('inject_ns')} ns busy-wait per callback did not show as that)")
            continue

        def ratios(loop):
            return ", ".join(
                f"{EXIT_KINDS[k][1]} " + " / ".join(_text(_stat_fig(rows[f'{mode}/{k}/{abi}/{loop}']['stats']['vs_naive']))
                                                   for abi in ("fd", "sys"))
                for k in cfg.get("kinds", []))
        over = [_stat_fig(rows[f"{mode}/{k}/{abi}/pyo"]["stats"]["over_pyf"])["median"]
                for k in cfg.get("kinds", []) for abi in ("fd", "sys")]
        texts.append(f"in {mode} guests (all {len(checks)} proofs passed) read/write callbacks take {ratios('pyo')} "
                     f"(fd / syscall ABI) of the naive loop's user window, the Python floor {ratios('pyf')}; "
                     f"kvmsys {min(over):.0f} to {max(over):.0f} ns per exit over that floor")
    src = f" from {doc['windows_from']}" if doc.get("windows_from") else ""
    return (f"**Outside KVM_RUN, by the kernel's clock** (suite windows{src}: each `KVM_RUN` ioctl's return "
            "and next entry stamped by tracepoints, the system call's own share taken off): "
            + "; ".join(texts) + ".")


def _row_text(doc: dict, suite: str, rid: str, stat: str) -> str:
    return _text(_fig(doc, f"{suite}/{rid}/{stat}"))


EXIT_TABLE = [   # (label, abi, loop, stat)
    ("bare C loop: round trip", "sys", "ref", "cpu"),
    ("the signal mask kvmsys sets, inside KVM_RUN", "sys", "ref_mask", "mask_cpu"),
    ("syscall ABI, C handler − bare C loop", "sys", "c", "cpu_over_ref"),
    ("fd ABI, C handler − bare C loop", "fd", "c", "cpu_over_ref"),
    ("syscall ABI, C handler: user window", "sys", "c", "user_cpu"),
    ("fd ABI, C handler: user window", "fd", "c", "user_cpu"),
    ("bare C loop: user window, its own clock (wall)", "sys", "ref", "user_own"),
    ("syscall ABI, C handler: user window, own clocks (wall) − bare C loop's", "sys", "c", "own_over_ref"),
    ("fd ABI, C handler: user window, own clocks (wall) − bare C loop's", "fd", "c", "own_over_ref"),
    ("syscall ABI, no-op Python handler − C handler, own clocks (wall)", "sys", "py", "py_own"),
    ("syscall ABI, no-op Python handler − C handler", "sys", "py", "py_path"),
    ("syscall ABI, naive-work Python handler − C handler", "sys", "pyw", "py_path"),
    ("syscall ABI, naive-work Python handler ÷ naive loop", "sys", "pyw", "vs_naive"),
    ("syscall ABI, naive-work read/write callbacks − C handler", "sys", "pyo", "py_path"),
    ("syscall ABI, naive-work read/write callbacks ÷ naive loop", "sys", "pyo", "vs_naive"),
    ("syscall ABI, read/write callbacks ÷ naive loop, outside KVM_RUN", "sys", "pyo", "user_vs_naive"),
    ("Python floor (bare C calling the same callbacks) ÷ naive loop, outside KVM_RUN", "sys", "pyf",
     "user_vs_naive"),
    ("syscall ABI, read/write callbacks − Python floor, own clocks (wall)", "sys", "pyo", "over_pyf"),
    ("naive loop − bare C loop (syscall VM)", "sys", "naive", "cpu_over_ref"),
]


def readme_section(doc: dict, path: str, *others: tuple) -> str:
    """README's benchmark figures, generated from a stored run (`--readme FILE.json`), and
    the boot and windows suites of others ((doc, path) each) where that run has none."""
    from .report import fmt_stat
    for other, other_path in others:
        for suite in ("boot", "windows"):
            if suite in other["suites"] and suite not in doc["suites"]:
                om = other["machine"]
                doc = dict(doc, suites=dict(doc["suites"], **{suite: other["suites"][suite]}),
                           **{f"{suite}_from": f"`{other_path}`, {om.get('cpu_model')}, {om.get('date')}"})
    m, p = doc["machine"], doc["profile"]
    runs = len(run_values(doc))
    loads = ", ".join(str(x[0]) for x in m.get("load_avg_runs") or [m.get("load_avg")] if x)
    out = [f"<!-- generated by `python -m benchmarks --readme {path}"
           + "".join(f" --readme {op}" for _o, op in others) + "` -->",
           f"From [`{path}`]({path}): {m.get('host_kvm_flavour')} host, {m.get('cpu_model')}, "
           f"{m.get('cores')} cores, kernel {m.get('kernel')}, {m.get('python')}, {m.get('date')}; profile "
           f"{p['name']}, {runs} separate process{'es' if runs > 1 else ''} (1-min load average at their "
           f"starts: {loads}).  Figures: the median over the processes ‹lowest – highest›; each process's "
           "own figure is a median over its paired, interleaved rounds.  Full report: "
           f"[`{path[:-5]}.md`]({path[:-5]}.md).", "", verdict(doc), ""]
    ex = doc["suites"].get("exits")
    if ex:
        modes = ex.get("config", {}).get("modes") or [p["mode"]]
        kinds = ex.get("config", {}).get("kinds") or list(EXIT_KINDS)
        for mode in modes:
            out += [f"Per exit, thread CPU time, {mode} guests (one VM per ABI, all loops on its one vCPU):", "",
                    "| | " + " | ".join(EXIT_KINDS[k][1] for k in kinds) + " |",
                    "|---|" + "---:|" * len(kinds)]
            for label, abi, loop, stat in EXIT_TABLE:
                cells = []
                for k in kinds:
                    st = ex["rows"].get(f"{mode}/{k}/{abi}/{loop}", {}).get("stats", {}).get(stat)
                    cells.append(fmt_stat(st) if st else "—")
                if any(c != "—" for c in cells):      # (a stored run from before the row existed)
                    out.append(f"| {label} | " + " | ".join(cells) + " |")
            out.append("")
    other = []
    for suite, stat_keys in (("abi", ("d_user", "ratio")), ("lifecycle", ("time", "ratio")),
                             ("kick", ("time", "ratio")), ("console", ("time", "ratio")),
                             ("boot", ("time", "ratio"))):
        s = doc["suites"].get(suite)
        if not s:
            continue
        for rid, row in s["rows"].items():
            if not any(k in row["stats"] for k in stat_keys):
                continue
            label = " · ".join(str(v) for k, v in row["cells"].items() if k not in ("count",))
            cells = [fmt_stat(row["stats"][k]) if k in row["stats"] else "—" for k in stat_keys]
            other.append(f"| {suite} | {label} | " + " | ".join(cells) + " |")
    if other:
        out += ["| suite | what | time (abi: user-space difference) | ratio to its reference |",
                "|---|---|---:|---:|"] + [o.replace("\n", " ") for o in other] + [""]
    return "\n".join(out) + "\n"
