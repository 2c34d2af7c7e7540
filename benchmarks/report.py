"""Results as Markdown (stdout), JSON (raw samples + machine record) and an optional plot."""
from __future__ import annotations

import json
import math

SCHEMA = 1

_SCALES = {
    "ns": [(1e9, "s"), (1e6, "ms"), (1e3, "µs"), (1, "ns")],
    "bytes": [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B")],
    "1/s": [(1e6, "M/s"), (1e3, "k/s"), (1, "/s")],
}


def _num(x: float) -> str:
    """Three significant digits, no exponent for ordinary magnitudes."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    x = float(f"{x:.3g}")                   # round first, so 0.9999 shows as 1.00
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{digits}f}".replace(",", " ")


def fmt_value(x: float, unit: str) -> str:
    return fmt_stat(dict(median=x, min=x, max=x, unit=unit), spread=False)


def fmt_stat(s: dict, spread: bool = True) -> str:
    """'median unit (min–max)' with min and max in the median's scale; for a ratio or
    difference with a confidence interval, 'median unit [CI low, CI high]'; from several
    separate processes (--runs), 'median unit ‹lowest – highest run median›'."""
    unit, med, lo, hi = s["unit"], s["median"], s["min"], s["max"]
    ci = s.get("ci95")
    runs = s.get("runs")
    if spread and runs and len(runs) > 1:
        return _fmt(unit, med, min(runs), max(runs), " ‹{} – {}›")
    if spread and ci:
        return _fmt(unit, med, *ci, "[{}, {}]")
    return _fmt(unit, med, lo, hi, " ({} – {})" if spread else None)


def _fmt(unit: str, med: float, lo: float, hi: float, around: str | None) -> str:
    if unit == "x":
        text, lo_t, hi_t = f"{_num(med)}×", _num(lo), _num(hi)
    elif unit in _SCALES:
        def scale(x):
            return next(((d, u) for d, u in _SCALES[unit] if abs(x) >= d), _SCALES[unit][-1])
        div, suffix = scale(med or max(abs(lo), abs(hi)))
        text, lo_t, hi_t = f"{_num(med / div)} {suffix}", _num(lo / div), _num(hi / div)
        if max(abs(lo), abs(hi)) >= 1000 * div:     # a spread far outside the median's scale: own units
            lo_t, hi_t = (f"{_num(x / scale(x)[0])} {scale(x)[1]}" for x in (lo, hi))
    else:
        text, lo_t, hi_t = _num(med), _num(lo), _num(hi)
    if around and (lo != hi):
        text += (" " if around.startswith("[") else "") + around.format(lo_t, hi_t)
    return text


def _to_json_dict(res) -> dict:
    return res if isinstance(res, dict) else res.to_json()


def markdown_suite(res) -> str:
    d = _to_json_dict(res)
    out = [f"## {d['name']}: {d['title']}", ""]
    for note in d["notes"]:
        out.append(f"- {note}")
    for why in d["skipped"]:
        out.append(f"- **Skipped:** {why}")
    if d["notes"] or d["skipped"]:
        out.append("")
    cols = d["columns"]
    out.append("| " + " | ".join(h for _k, h in cols) + " |")
    numeric = {k for k, _h in cols if any(k in r["stats"] for r in d["rows"].values())}
    out.append("|" + "|".join("---:" if k in numeric else "---" for k, _h in cols) + "|")
    previous_first = None
    for row in d["rows"].values():
        cells = []
        for i, (key, _h) in enumerate(cols):
            if key in row["stats"]:
                cells.append(fmt_stat(row["stats"][key]))
            elif key in row["cells"]:
                text = str(row["cells"][key])
                if i == 0:
                    # repeated group labels are left blank, so groups stand out
                    text, previous_first = ("" if text == previous_first else text), text
                cells.append(text)
            else:
                cells.append("—")
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out.append("")
    failed = [c for c in d["checks"] if not c["ok"]]
    if d["checks"]:
        if failed:
            out.append(f"**Checks: {len(failed)} of {len(d['checks'])} FAILED**")
            out += [f"- ✗ {c['detail']}" for c in failed]
        else:
            out.append(f"Checks: all {len(d['checks'])} passed.")
        out.append("")
    out.append(f"_({d['elapsed_s']:.1f} s)_")
    out.append("")
    return "\n".join(out)


MACHINE_LABELS = [
    ("host_kvm_flavour", "host KVM flavour"), ("cpu_model", "CPU"), ("cores", "cores"),
    ("cores_usable", "cores usable by this process"), ("kernel", "kernel"), ("python", "Python"),
    ("kvmsys", "kvmsys"), ("kvm_api_version", "KVM API version"), ("vcpu_mmap_size", "vCPU mmap size"),
    ("date", "date (UTC)"), ("load_avg", "load average (1, 5, 15 min) at the start"),
    ("load_avg_end", "load average at the end"), ("kvm_error", "KVM error"),
]


def markdown(doc: dict) -> str:
    """The whole report: machine record, profile, then one section per suite."""
    out = ["# kvmsys benchmarks", ""]
    m = doc["machine"]
    if doc.get("runs", 1) > 1:
        out.append(f"- runs: {doc['runs']} separate processes (load averages at their starts: "
                   f"{', '.join(str(x[0]) for x in m.get('load_avg_runs') or [] if x)})")
    for key, label in MACHINE_LABELS:
        if m.get(key) is not None:
            out.append(f"- {label}: {m[key]}")
    p = doc["profile"]
    out.append(f"- profile: {p['name']} ({p['reps']} interleaved repetitions, {p['warmup']} warm-up; "
               f"guest mode {p['mode']})")
    if m.get("injected"):
        out.append(f"- **Delays injected by the self-test: {m['injected']} (ns): not kvmsys's real speed.**")
    out.append("- Absolute times describe this machine and this run only; compare the ratios and "
               "differences, which come from paired samples on one vCPU within each run.")
    out.append("")
    from .verdict import verdict
    out.append(verdict(doc))
    out.append("")
    for res in doc["suites"].values():
        out.append(markdown_suite(res))
    if doc.get("elapsed_s") is not None:
        out.append(f"_Total: {doc['elapsed_s']:.1f} s._")
    return "\n".join(out)


def readme_section(doc: dict, path: str, *others: tuple) -> str:
    from .verdict import readme_section as section
    return section(doc, path, *others)


def merge(docs: list, argv: list) -> dict:
    """One document from the documents of separate processes (--runs): every stat's samples
    concatenated run by run (so paired samples stay paired), with `runs` = each process's
    median; checks of every run; the headline figures of each run for the gate."""
    import statistics
    from .baseline import run_values
    from .harness import bootstrap_ci
    first = docs[0]
    out = dict(schema=SCHEMA, machine=dict(first["machine"]), profile=first["profile"], argv=list(argv),
               runs=len(docs), suites={})
    out["machine"]["load_avg_end"] = docs[-1]["machine"].get("load_avg_end")
    out["machine"]["load_avg_runs"] = [d["machine"].get("load_avg") for d in docs]
    for name, suite in first["suites"].items():
        merged = dict(suite, rows={}, checks=[], elapsed_s=sum(d["suites"][name]["elapsed_s"] for d in docs))
        merged["notes"] = list(suite["notes"]) + [
            f"Spread ‹…›: the lowest and highest median of {len(docs)} separate processes, each with fresh VMs."]
        for rid, row in suite["rows"].items():
            stats = {}
            for key, st in row["stats"].items():
                per = [d["suites"][name]["rows"][rid]["stats"][key]["samples"] for d in docs]
                samples = [x for run in per for x in run]
                stats[key] = dict(st, samples=samples, median=statistics.median(samples), min=min(samples),
                                  max=max(samples), runs=[statistics.median(run) for run in per])
                if "ci95" in st:
                    stats[key]["ci95"] = list(bootstrap_ci(samples))
            merged["rows"][rid] = dict(row, stats=stats)
        for i, d in enumerate(docs):
            merged["checks"] += [dict(c, name=f"run {i + 1}: {c['name']}", detail=f"run {i + 1}: {c['detail']}")
                                 for c in d["suites"][name]["checks"]]
        out["suites"][name] = merged
    out["ok"] = all(d["ok"] for d in docs)
    out["headline_runs"] = [h for d in docs for h in run_values(d)]
    return out


def document(machine: dict, profile, suites: dict, argv: list) -> dict:
    return dict(schema=SCHEMA, machine=machine, profile=profile.to_json(), argv=list(argv),
                suites={name: _to_json_dict(r) for name, r in suites.items()},
                ok=all(c["ok"] for r in suites.values() for c in _to_json_dict(r)["checks"]))


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


PLOT_HINT = "--plot needs matplotlib, which is not installed: pip install 'kvmsys[plot]'"


# --- the plot ------------------------------------------------------------------------
# One figure: a header with the machine record; the `exits` suite as the headline
# (time per exit over the C reference loop's, grouped by exit kind, one colour per
# loop); then one compact panel per other suite, two to a row.  Any subset of suites
# works.  Drawn on matplotlib's Agg canvas directly: no pyplot, no global backend.

PLOT_SKIP = {"count"}     # cell columns that are checks, not labels

# The same colour means the same thing in every panel.
C_REF = "#8c8c8c"         # the C reference (and other baselines)
C_FD = "#1f77b4"          # fd ABI (C handler)
C_FD_PY = "#9ecae1"       # fd ABI, Python handler
C_SYS = "#e6550d"         # syscall ABI (C handler)
C_SYS_PY = "#fdae6b"      # syscall ABI, Python handler
C_NAIVE = "#756bb1"       # naive Python
C_OTHER = "#31a354"       # anything else (plain Python, a coalesced zone, ...)
C_EXTRA = ["#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]   # loops/placements not known here

EXIT_LOOPS = [            # (row id suffix, legend label, colour), in bar order
    ("ref_mask", "C reference + kvmsys's signal mask", C_EXTRA[0]),
    ("naive", "naive Python", C_NAIVE),
    ("c", "kvmsys, C handler", C_FD),
    ("py", "kvmsys, no-op Python handler", C_FD_PY),
    ("pyw", "kvmsys, Python handler with the naive loop's work", C_SYS_PY),
    ("pyo", "kvmsys, read/write callbacks with the naive loop's work", C_OTHER),
    ("pyf", "Python floor: bare C calling the same callbacks", C_EXTRA[1]),
]

# Short row labels, by row id or by the parts of a "group/part" id; rows not listed
# get labels cut from their cells (_fallback_labels).
SHORT_LABELS = {
    "abi": {"fd": "fd ABI: vcpu.run()", "sys": "syscall ABI: kvmsys.run()"},
    "console": {"per_exit": "one exit per byte", "coalesced": "coalesced PIO zone", "floor": "ioeventfd floor"},
    "dispatch": {"vcpu": "vCPU ioctl", "vm": "VM ioctl", "sys": "getppid()", "c": "C",
                 "py_fd": "fd ABI", "py_sys": "syscall ABI", "naive": "naive fcntl.ioctl",
                 "py": "os.getppid()"},
    "threads": {"bound": "syscall ABI: thread-bound", "fd_same": "fd ABI: same thread",
                "fd_worker": "fd ABI: one worker thread", "fd_rot": "fd ABI: rotating pool",
                "fd_new": "fd ABI: new thread per run", "c/caller": "C: calling thread",
                "c/worker": "C: one worker pthread", "c/rotating": "C: rotating pthreads",
                "c/new": "C: new pthread per run"},
    "lifecycle": {"c": "C reference", "fd": "fd ABI: create_vcpu + close",
                  "sys_recycled": "syscall ABI: add + remove, recycled",
                  "sys_new": "syscall ABI: first add + remove in a VM"},
    "kick": {"fd": "fd ABI", "sys": "syscall ABI", "c": "C floor", "py": "Python floor", "exits": "guest exiting",
             "compute": "guest computing"},
    "memory": {"fd": "fd ABI: create_vcpu", "sys": "syscall ABI: thread + add_vcpu",
               "threads": "idle thread, no vCPU"},
}
ROW_COLOURS = {"console": {"per_exit": C_REF, "coalesced": C_OTHER, "floor": C_REF}, "memory": {"threads": C_REF}}
PANEL_TITLES = {"scaling": "aggregate exits/s by number of vCPU threads"}
RATIO_HINTS = {"abi": "vs fd", "console": "vs exit per byte", "dispatch": "vs C", "lifecycle": "vs C"}
# other stats shown next to a row's value: (stat key, text around the formatted median)
EXTRA_STATS = {"kick": [("p90", "p90 {}")], "threads": [("d_bound", "{} vs thread-bound")],
               "memory": [("net", "{} net of a thread")]}


def _plain(text) -> str:
    return str(text).replace("`", "").strip()


def _short(text: str, n: int = 40) -> str:
    text = _plain(text)
    return text if len(text) <= n else text[:n - 1] + "…"


def _cut(text: str, level: int) -> str:
    """Shorter forms of a long label: 0 = before the first ':' or '(', 1 = before '(', 2 = all."""
    text = _plain(text)
    seps = [":", " ("] if level == 0 else [" ("] if level == 1 else []
    for sep in seps:
        head = text.split(sep, 1)[0].strip()
        if len(head) >= 3:
            text = head
    return _short(text)


def _fallback_labels(rows: list, cell_keys: list) -> list:
    """Labels cut from the cells: the shortest form that still tells the rows apart."""
    for level in (0, 1, 2):
        labels = [" · ".join(_cut(r["cells"][k], level) for k in cell_keys if k in r["cells"]) for _rid, r in rows]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _row_labels(s: dict, rows: list) -> list:
    known = SHORT_LABELS.get(s["name"], {})
    cell_keys = [k for k, _h in s["columns"] if k not in PLOT_SKIP and any(k in r["cells"] for _i, r in rows)]
    fallback = _fallback_labels(rows, cell_keys)
    out = []
    for (rid, _r), fb in zip(rows, fallback):
        parts = rid.split("/")
        if rid in known:
            out.append(known[rid])
        elif len(parts) > 1 and parts[-1] in known:
            out.append(" · ".join(known.get(p, p) for p in parts))
        else:
            out.append(fb)
    return out


def _row_colour(suite: str, rid: str, label: str) -> str:
    last = rid.split("/")[-1]
    special = ROW_COLOURS.get(suite, {})
    if rid in special or last in special:
        return special.get(rid, special.get(last))
    low = label.lower()
    if last in ("c", "ref") or low.startswith("c reference") or low.startswith("c:"):
        return C_REF
    if "naive" in low:
        return C_NAIVE
    if "syscall" in low:
        return C_SYS
    if "fd" in low.split(":")[0].split(" "):
        return C_FD
    return C_OTHER


def _scale(unit: str, x: float):
    """(divisor, suffix) that shows x in its natural unit."""
    if unit in _SCALES:
        return next(((d, u) for d, u in _SCALES[unit] if abs(x) >= d), _SCALES[unit][-1])
    return 1, ("×" if unit == "x" else unit)


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8.5)
    ax.set_axisbelow(True)


def _title(ax, s: dict, text: str, width: int) -> None:
    import textwrap
    failed = sum(not c["ok"] for c in s["checks"])
    title = textwrap.fill(f"{s['name']}: {_plain(text)}", width)
    ax.set_title(title, fontsize=10.5, loc="left", fontweight="bold")
    if failed:
        ax.text(1.0, 1.0, f"⚠ {failed} check{'s' if failed > 1 else ''} FAILED", transform=ax.transAxes,
                ha="right", va="bottom", color="#c00000", fontsize=9, fontweight="bold")


def _stat_key(s: dict):
    return next((k for k, _h in s["columns"] if any(k in r["stats"] for r in s["rows"].values())), None)


def _exits_panel(ax, s: dict) -> None:
    """Grouped bars on a log axis: per guest mode and exit kind, each loop's user-space time
    per exit (KVM_RUN's return to the next KVM_RUN call), with its min–max spread."""
    rows = s["rows"]
    groups = list(dict.fromkeys(rid.rsplit("/", 1)[0] for rid in rows))
    present = {rid.rsplit("/", 1)[1] for rid, r in rows.items() if "user_cpu" in r["stats"]}
    loops = [("ref", "C reference loop", C_REF)] + [loop for loop in EXIT_LOOPS if loop[0] in present]
    loops = [loop for loop in loops if loop[0] in present]
    n = max(1, len(loops))
    width = 0.84 / n
    for j, (key, label, colour) in enumerate(loops):
        pts = [(i + (j - (n - 1) / 2) * width, rows[f"{g}/{key}"]["stats"]["user_cpu"])
               for i, g in enumerate(groups) if "user_cpu" in rows.get(f"{g}/{key}", {}).get("stats", {})]
        xs = [x for x, _st in pts]
        med = [max(1.0, st["median"]) for _x, st in pts]      # a log axis: noise can make a window < 0
        ax.bar(xs, med, width * 0.9, color=colour, label=label, zorder=2, edgecolor="white", linewidth=0.4)
        ax.errorbar(xs, med, yerr=[[max(0.0, m - max(1.0, st["min"])) for m, (_x, st) in zip(med, pts)],
                                   [max(0.0, st["max"] - m) for m, (_x, st) in zip(med, pts)]],
                    fmt="none", ecolor="#333333", elinewidth=0.9, capsize=2.2, zorder=3)
        for x, m in zip(xs, med):
            ax.text(x, m * 1.08, _num(m), rotation=90, ha="center", va="bottom", fontsize=6.5,
                    color="#111111", zorder=5)
    ax.set_yscale("log")
    ticks = []
    for g in groups:
        first = next(r for rid, r in rows.items() if rid.startswith(g + "/"))
        ref = rows.get(f"{g}/ref", {}).get("stats", {}).get("ioctl_ns")
        name = (f"{_plain(first['cells'].get('mode', ''))} {g.rsplit('/', 1)[-1]}\n"
                f"{_plain(first['cells'].get('exit', g))}")
        ticks.append(f"{name}\nkernel {fmt_value(ref['median'], ref['unit'])}" if ref else name)
    ax.set_xticks(range(len(groups)), ticks, fontsize=8)
    ax.tick_params(axis="x", length=0)
    ax.set_xlim(-0.55, len(groups) - 0.45)
    ax.set_ylabel("user window, CPU ns per exit (log)", fontsize=9.5)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9.5, frameon=False,
              title="loop (median, min–max)", title_fontsize=9.5)
    _title(ax, s, "User window per exit (thread CPU), KVM_RUN's return → the next entry, on one vCPU "
                  "(below each group: the bare C loop's KVM_RUN window)", 120)


def _bars_panel(ax, s: dict, title_width: int, height: float) -> None:
    """One bar (or, on a log axis, one dot) per row: the median of the suite's first stat,
    with min–max whiskers; its value, ratio and other notable stats written on the right."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    key = _stat_key(s)
    header = dict((k, h) for k, h in s["columns"]).get(key, key)
    rows = [(rid, r) for rid, r in s["rows"].items() if key in r["stats"]]
    labels = _row_labels(s, rows)
    colours = [_row_colour(s["name"], rid, lab) for (rid, _r), lab in zip(rows, labels)]
    ys, y, prev = [], 0.0, None
    for rid, _r in rows:                         # a gap between groups of "group/part" ids
        group = rid.split("/")[0] if "/" in rid else None
        if ys and group != prev:
            y += 0.45
        ys.append(y)
        y += 1
        prev = group
    st = [r["stats"][key] for _rid, r in rows]
    unit = st[0]["unit"]
    med = [x["median"] for x in st]
    lo_all, hi_all = min(x["min"] for x in st), max(x["max"] for x in st)
    log = lo_all > 0 and hi_all / lo_all > 20
    div, suffix = _scale(unit, sorted(med)[len(med) // 2] if log else max(med))
    m = [v / div for v in med]
    err = [[(x["median"] - x["min"]) / div for x in st], [(x["max"] - x["median"]) / div for x in st]]
    if log:
        left = lo_all / div / 1.6
        ax.set_xscale("log")
        ax.hlines(ys, left, m, colors=colours, lw=2.5, zorder=2)
        ax.errorbar(m, ys, xerr=err, fmt="none", ecolor="#333333", elinewidth=0.9, capsize=2.5, zorder=3)
        ax.scatter(m, ys, s=38, c=colours, zorder=4, edgecolors="white", linewidths=0.6)
        ax.set_xlim(left, hi_all / div * 1.6)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.barh(ys, m, height=0.72, color=colours, zorder=2)
        ax.errorbar(m, ys, xerr=err, fmt="none", ecolor="#333333", elinewidth=0.9, capsize=2.5, zorder=3)
        ax.set_xlim(min(0, lo_all / div * 1.05), hi_all / div * 1.04)
    ax.set_yticks(ys, labels, fontsize=9)
    ax.tick_params(axis="y", length=0)
    pad = max(0.0, (height - _panel_height(s)) / 0.3 / 4)    # a taller row than needed: thicker bars, not fat ones
    ax.set_ylim(ys[-1] + 0.6 + pad, -0.6 - pad)
    ax.grid(axis="x", alpha=0.3, which="major")
    ax.set_xlabel(f"{_plain(header)} ({suffix}{', log scale' if log else ''})", fontsize=9)
    right = []
    for (rid, r), x in zip(rows, st):
        parts = [fmt_value(x["median"], unit)]
        for k, v in r["stats"].items():
            if k != key and v.get("unit") == "x" and (v.get("derived") or {}).get("op") == "ratio":
                hint = RATIO_HINTS.get(s["name"]) or _short(dict(s["columns"]).get(k, k), 20)
                parts.append(f"{_num(v['median'])}× {hint}")
        for k, template in EXTRA_STATS.get(s["name"], []):
            if k in r["stats"]:
                v = r["stats"][k]
                text = fmt_value(v["median"], v["unit"])
                if (v.get("derived") or {}).get("op") == "difference" and v["median"] > 0:
                    text = "+" + text
                parts.append(template.format(text))
        right.append("  ".join(parts))
    sec = ax.secondary_yaxis("right")
    sec.set_yticks(ys, right, fontsize=8.5, color="#333333")
    sec.tick_params(length=0)
    sec.spines["right"].set_visible(False)
    _title(ax, s, PANEL_TITLES.get(s["name"], s["title"]), title_width)


def _scaling_panel(ax, s: dict, machine: dict, title_width: int) -> None:
    """Aggregate exits/s against the number of vCPU threads, one line per placement."""
    from matplotlib.ticker import NullLocator
    key = "rate" if any("rate" in r["stats"] for r in s["rows"].values()) else _stat_key(s)
    series: dict = {}
    for rid, r in s["rows"].items():
        if key in r["stats"]:
            placement = str(r["cells"].get("placement", rid.split("/")[0]))
            threads = r["cells"].get("threads", rid.split("/")[-1])
            series.setdefault(placement, []).append((int(threads), r["stats"][key]))
    unit = next(iter(series.values()))[0][1]["unit"]
    div, suffix = _scale(unit, max(st["median"] for pts in series.values() for _k, st in pts))
    counts = sorted({k for pts in series.values() for k, _st in pts})
    log2 = counts[0] > 0 and counts[-1] / counts[0] >= 16       # many thread counts on a big machine
    gaps = [b - a for a, b in zip(counts, counts[1:])] or [1]
    step = 0.03 if log2 else min(0.08 * min(gaps), 0.015 * (counts[-1] - counts[0]) + 0.004)

    def shifted(k, j):                       # placements side by side, so whiskers don't overlap
        off = (j - (len(series) - 1) / 2) * step
        return k * 2 ** off if log2 else k + off
    colours = ["#6a51a3", "#d94801", "#238b45"] + C_EXTRA
    markers = ["o", "s", "^", "D", "v", "P"]
    for j, (placement, pts) in enumerate(series.items()):
        pts.sort(key=lambda p: p[0])
        med = [st["median"] / div for _k, st in pts]
        ax.errorbar([shifted(k, j) for k, _st in pts], med,
                    yerr=[[(st["median"] - st["min"]) / div for _k, st in pts],
                          [(st["max"] - st["median"]) / div for _k, st in pts]],
                    color=colours[j % len(colours)], marker=markers[j % len(markers)], ms=5, lw=1.6,
                    capsize=2.5, label=placement, zorder=3)
    cores = machine.get("cores_usable") or machine.get("cores")
    ones = [st["median"] for pts in series.values() for k, st in pts if k == 1]
    if cores and ones:
        base = sorted(ones)[len(ones) // 2] / div
        ax.plot(counts, [base * min(k, cores) for k in counts], ls=":", color="#555555", lw=1.3,
                label=f"1 thread × min(threads, {cores} cores)", zorder=2)
    if log2:
        ax.set_xscale("log", base=2)
        ax.set_xlim(counts[0] / 1.25, counts[-1] * 1.25)
    else:
        span = counts[-1] - counts[0]
        ax.set_xlim(counts[0] - 0.05 * span - 0.15, counts[-1] + 0.05 * span + 0.15)
    ax.set_xticks(counts, [str(k) for k in counts])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_xlabel("vCPU threads (one vCPU each)", fontsize=9)
    header = dict((k, h) for k, h in s["columns"]).get(key, key)
    ax.set_ylabel(f"{_plain(header)} ({suffix})", fontsize=9)
    ax.legend(fontsize=8.5, frameon=False, loc="lower right", title="placement", title_fontsize=8.5)
    _title(ax, s, PANEL_TITLES.get(s["name"], s["title"]), title_width)


def _panel_height(s: dict) -> float:
    if s["name"] == "exits":
        return 5.2
    if s["name"] == "scaling":
        return 3.6
    groups = len({rid.split("/")[0] for rid in s["rows"]}) if all("/" in rid for rid in s["rows"]) else 1
    return 1.35 + 0.3 * len(s["rows"]) + 0.14 * (groups - 1)


def _header_lines(doc: dict) -> tuple:
    import datetime
    m, p = doc.get("machine", {}), doc.get("profile") or {}
    date = m.get("date")
    try:
        date = datetime.datetime.fromisoformat(date).astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (TypeError, ValueError):
        pass
    cores = m.get("cores")
    if cores is not None:
        cores = f"{cores} cores" + (f" ({m['cores_usable']} usable)"
                                    if m.get("cores_usable") not in (None, cores) else "")
    flavour = m.get("host_kvm_flavour")
    record = [f"{flavour} host KVM" if flavour else None, m.get("cpu_model"), cores,
              f"kernel {m['kernel']}" if m.get("kernel") else None, m.get("python"),
              f"kvmsys {m['kvmsys']}" if m.get("kvmsys") else None, date]
    run = (f"profile {p['name']}, {p['reps']} interleaved repetitions, guest mode {p['mode']}"
           if {"name", "reps", "mode"} <= set(p) else "")
    return [str(x) for x in record if x], run


def plot(doc: dict, path: str) -> None:
    """Draw the suites of a report document (as document() builds it, or as read back
    from its JSON) into one PNG at *path*."""
    import textwrap
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(PLOT_HINT) from e
    suites = [s for s in doc["suites"].values() if s["rows"]]
    head = [s for s in suites if s["name"] == "exits"]
    rest = [s for s in suites if s["name"] != "exits"]
    ncols = 2 if len(rest) >= 2 else 1
    width = 15.0 if ncols == 2 or head else 10.0
    layout = []                                  # (height, [(suite, spans both columns)])
    layout += [(_panel_height(s), [(s, True)]) for s in head]
    for i in range(0, len(rest), ncols):
        pair = rest[i:i + ncols]
        layout.append((max(_panel_height(s) for s in pair), [(s, len(pair) < 2) for s in pair]))
    record, run = _header_lines(doc)
    note = ("Ratios are per repetition, from paired samples taken moments apart within this one run.  "
            "Bars and dots: median; whiskers: min–max.  Absolute times describe this machine and run only.")
    wrapped = [""]                               # the record, wrapped between its items
    for item in record:
        joined = f"{wrapped[-1]}  ·  {item}" if wrapped[-1] else item
        if len(joined) > width * 11 and wrapped[-1]:
            wrapped.append(item)
        else:
            wrapped[-1] = joined
    italic = ([run] if run else []) + textwrap.wrap(note, int(width * 13))
    lines = [("kvmsys benchmarks", dict(fontsize=16, fontweight="bold"), 0.44)]      # (text, style, inches)
    lines += [(t, dict(fontsize=10), 0.22 + 0.08 * (i == len(wrapped) - 1)) for i, t in enumerate(wrapped)]
    lines += [(t, dict(fontsize=9, style="italic", color="#444444"), 0.2) for t in italic]
    header_h = 0.12 + sum(h for _t, _s, h in lines) + 0.12
    body_h = sum(h for h, _p in layout) or 1.0
    fig = Figure(figsize=(width, header_h + body_h), layout="constrained")
    FigureCanvasAgg(fig)
    top, body = fig.subfigures(2, 1, height_ratios=[header_h, body_h])
    y = 0.12
    for text, style, h in lines:
        top.text(0.01, 1 - y / header_h, text, va="top", **style)
        y += h
    if not doc.get("ok", True):
        top.text(0.99, 1 - 0.12 / header_h, "⚠ some checks FAILED: see the report", fontsize=11, va="top",
                 ha="right", color="#c00000", fontweight="bold")
    if not layout:
        ax = body.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no suite produced results", ha="center", va="center", fontsize=12)
    else:
        gs = body.add_gridspec(len(layout), ncols, height_ratios=[h for h, _p in layout])
        for r, (h, pair) in enumerate(layout):
            for c, (s, wide) in enumerate(pair):
                ax = body.add_subplot(gs[r, :] if wide else gs[r, c])
                _style(ax)
                title_width = int(width * (7.5 if wide else 4.6))      # characters of a panel title
                if s["name"] == "exits":
                    _exits_panel(ax, s)
                elif s["name"] == "scaling":
                    _scaling_panel(ax, s, doc.get("machine", {}), title_width)
                else:
                    _bars_panel(ax, s, title_width, h)
    fig.savefig(path, dpi=110)
