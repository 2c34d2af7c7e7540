"""Compare a run with a stored one (`--baseline FILE.json`): a metric that got worse
beyond its noise band is a regression, and the run fails naming it.

A metric is worse beyond its noise band when both hold:
- the 95% bootstrap confidence interval of its median in this run lies entirely above
  (or, for a higher-is-better metric, below) the one in the baseline: the two runs'
  own scatter cannot explain the difference;
- its median moved by more than the tolerance (default 50%): absolute numbers of one
  machine drift with its load, and a shared host is never quiet.

Compared are the numbers that say what kvmsys itself costs: user-space time per exit
(not the kernel's), the run() entry point, and ratios to C references or baselines
taken in the same run (paired samples).
"""
from __future__ import annotations

import json

from .harness import bootstrap_ci

# suite -> stat keys compared in every row that has them; all lower-is-better
METRICS = {
    "exits": ("user_ns",),
    "abi": ("user_ns",),
    "dispatch": ("ratio",),
    "lifecycle": ("ratio",),
    "kick": ("ratio",),
    "console": ("ratio",),
    "memory": ("rss",),
}
DEFAULT_TOLERANCE = 0.5


def load(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "suites" not in doc:
        raise ValueError(f"{path}: not a benchmark JSON document (no 'suites')")
    return doc


def compare(doc: dict, base: dict, tolerance: float = DEFAULT_TOLERANCE) -> list:
    """Every metric present in both documents: [{metric, unit, old, new, change, worse}]."""
    out = []
    for suite, keys in METRICS.items():
        new_s, old_s = doc["suites"].get(suite), base["suites"].get(suite)
        if not new_s or not old_s:
            continue
        for rid, row in new_s["rows"].items():
            old_row = old_s["rows"].get(rid)
            if old_row is None:
                continue
            for key in keys:
                new, old = row["stats"].get(key), old_row["stats"].get(key)
                if not new or not old or old["median"] <= 0:
                    continue
                new_lo, _ = bootstrap_ci(new["samples"])
                _, old_hi = bootstrap_ci(old["samples"])
                change = new["median"] / old["median"]
                out.append(dict(metric=f"{suite}/{rid}/{key}", unit=new["unit"], old=old["median"],
                                new=new["median"], change=change,
                                worse=new_lo > old_hi and change > 1 + tolerance))
    return out


def markdown(results: list, path: str, tolerance: float) -> str:
    from .report import fmt_value
    worse = [r for r in results if r["worse"]]
    lines = [f"## Regressions against {path}", "",
             f"- {len(results)} metrics compared; worse beyond the noise band (95% CIs of the medians "
             f"apart, and more than {tolerance:.0%} worse): {len(worse)}.", ""]
    if worse:
        lines += ["| metric | baseline | this run | change |", "|---|---:|---:|---:|"]
        lines += [f"| {r['metric']} | {fmt_value(r['old'], r['unit'])} | {fmt_value(r['new'], r['unit'])} "
                  f"| {r['change']:.2f}× |" for r in worse]
        lines.append("")
    return "\n".join(lines)
