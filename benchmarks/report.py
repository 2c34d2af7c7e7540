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
    """'median unit (min–max)' with min and max in the median's scale."""
    unit, med, lo, hi = s["unit"], s["median"], s["min"], s["max"]
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
    if spread and (lo != hi):
        text += f" ({lo_t} – {hi_t})"
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
    out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
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
    ("date", "date (UTC)"), ("kvm_error", "KVM error"),
]


def markdown(doc: dict) -> str:
    """The whole report: machine record, profile, then one section per suite."""
    out = ["# kvmsys benchmarks", ""]
    m = doc["machine"]
    for key, label in MACHINE_LABELS:
        if m.get(key) is not None:
            out.append(f"- {label}: {m[key]}")
    p = doc["profile"]
    out.append(f"- profile: {p['name']} ({p['reps']} interleaved repetitions, {p['warmup']} warm-up; "
               f"guest mode {p['mode']})")
    out.append("- Absolute times describe this machine and this run only; compare the ratios, "
               "which come from paired samples within the run.")
    out.append("")
    for res in doc["suites"].values():
        out.append(markdown_suite(res))
    return "\n".join(out)


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


PLOT_SKIP = {"count"}     # cell columns that are checks, not labels


def _short(text: str, n: int = 48) -> str:
    text = text.replace("`", "")
    return text if len(text) <= n else text[:n - 1] + "…"


def plot(doc: dict, path: str) -> None:
    """One panel per suite: the first stat of each row, median with min–max bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    suites = [s for s in doc["suites"].values() if s["rows"]]
    fig, axes = plt.subplots(len(suites), 1, figsize=(11, 2.2 + 0.35 * sum(len(s["rows"]) for s in suites)),
                             squeeze=False,
                             gridspec_kw=dict(height_ratios=[max(2, len(s["rows"])) for s in suites]))
    for ax, s in zip(axes[:, 0], suites):
        key = next(k for k, _h in s["columns"] if any(k in r["stats"] for r in s["rows"].values()))
        header = dict((k, h) for k, h in s["columns"])[key]
        rows = [r for r in s["rows"].values() if key in r["stats"]]
        cell_keys = [k for k, _h in s["columns"] if k not in PLOT_SKIP and any(k in r["cells"] for r in rows)]
        labels = [" / ".join(_short(str(r["cells"][k])) for k in cell_keys if k in r["cells"]) for r in rows]
        st = [r["stats"][key] for r in rows]
        unit = st[0]["unit"]
        scale = {"ns": 1e3, "bytes": 1024}.get(unit, 1)
        shown = {"ns": "µs", "bytes": "KiB"}.get(unit, unit)
        med = [x["median"] / scale for x in st]
        err = [[(x["median"] - x["min"]) / scale for x in st], [(x["max"] - x["median"]) / scale for x in st]]
        ax.barh(range(len(rows)), med, xerr=err, capsize=3, color="tab:blue", alpha=0.75)
        lows = [x["min"] for x in st]
        if min(lows) > 0 and max(x["max"] for x in st) / min(lows) > 50:
            ax.set_xscale("log")        # spreads over decades: keep the medians readable
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{header} ({shown}), median with min–max", fontsize=8)
        ax.set_title(f"{s['name']}: {s['title']}", fontsize=9)
    m = doc["machine"]
    fig.suptitle(f"kvmsys benchmarks, {m.get('host_kvm_flavour')} host, {m.get('cpu_model')}, "
                 f"{m.get('date')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
