"""Compare a run with a stored one (`--baseline FILE.json`): a metric that got worse
beyond its noise band is a regression, and the run fails naming it.

A metric is worse beyond its noise band when both hold:
- the 95% bootstrap confidence interval of its median in this run lies entirely above
  (or, for a higher-is-better metric, below) the one in the baseline: the two runs'
  own scatter cannot explain the difference;
- its median moved by more than the tolerance (default 2.0: more than 3x worse).  Even
  ratios to in-run references drift with the host's load: two full runs on our shared
  2-core host an hour apart differed by up to 2.6x in a Python-handler loop's user time
  over the C loop's.  On a quiet machine a smaller --tolerance works.

Compared are the numbers that say what kvmsys itself costs, each relative to a reference
measured in the same run (paired samples), since a shared host's absolute speed drifts
by 2x and more between runs (even the C reference loop's): user-space time per exit over
the C reference loop's (`user_ratio`, computed here from the rows' `user_ns` samples), and
the suites' ratios to their C references or baselines.
"""
from __future__ import annotations

import json
import statistics

from .harness import bootstrap_ci

# suite -> stat keys compared in every row that has them; all lower-is-better
METRICS = {
    "exits": ("user_ratio",),
    "abi": ("ratio",),
    "dispatch": ("ratio",),
    "lifecycle": ("ratio",),
    "kick": ("ratio",),
    "console": ("ratio",),
}


def _stat(suite: dict, rid: str, key: str):
    """A row's stat, or user_ratio: its user_ns over its group's C reference's, paired."""
    row = suite["rows"][rid]
    if key != "user_ratio":
        return row["stats"].get(key)
    ref = suite["rows"].get(rid.rsplit("/", 1)[0] + "/ref")
    if ref is None or rid.endswith("/ref") or "user_ns" not in row["stats"]:
        return None
    samples = [a / b for a, b in zip(row["stats"]["user_ns"]["samples"], ref["stats"]["user_ns"]["samples"])]
    return dict(samples=samples, median=statistics.median(samples), unit="x")
DEFAULT_TOLERANCE = 2.0


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
                new, old = _stat(new_s, rid, key), _stat(old_s, rid, key)
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
