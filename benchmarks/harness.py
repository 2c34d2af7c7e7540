"""Shared measurement rules.

- Variants that are compared run interleaved (A B C, A B C, ...), so a slow
  phase of the host hits all of them alike.
- A result is the median of its repetitions with the min–max spread.
- A ratio or difference is computed per repetition from *paired* samples
  (the i-th sample of A against the i-th of B, taken moments apart) and then
  summarised the same way; it is never a ratio of two medians from different runs.
  It carries a 95% bootstrap confidence interval of its median (resampling the
  paired samples; seeded, so a report is reproducible from its JSON).
- Every report carries the machine record: absolute numbers only mean
  something next to it, and are never compared across runs.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable


# --- profiles ------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """How much to measure.  `tiny` is for the tests, `quick` stays under a minute."""
    name: str
    reps: int                  # interleaved repetitions per variant
    warmup: int                # rounds run and discarded before the repetitions
    sample_ms: float           # target length of one sample (exit loops, ioctl loops)
    min_exits: int             # bounds on the calibrated exits per sample
    max_exits: int
    thread_exits: int          # exits per sample in the thread-switch suite
    thread_pool: int           # threads in the rotating pool
    thread_batches: int        # most batches of 3 × reps samples until a switch cost settles
    lifecycle_batch: int       # vCPUs created per sample (one fresh VM per sample)
    kick_samples: int          # kicks per variant
    kick_delay_ms: tuple       # (min, max) wait before kicking a running guest
    scaling_seconds: float     # length of one scaling measurement
    scaling_max: int | None    # most threads (None: 2 × cores)
    scaling_reps: int          # repetitions of the whole scaling sweep
    memory_k: int              # vCPUs added per memory sample
    mode: str = "pm32"         # guest mode of the exit-based suites
    exit_kinds: tuple = ()     # exits suite: only these exit kinds (empty: all)
    mode_only: bool = False    # exits suite: only `mode`, not long64 beside it
    thread_tight_ns: float = 10_000.0   # a switch cost whose CI is within ± this is settled

    def with_(self, **kw) -> "Profile":
        return replace(self, **kw)

    def to_json(self) -> dict:
        return asdict(self)


def _cores() -> int:
    return os.cpu_count() or 1


PROFILES = {
    "tiny": Profile("tiny", reps=3, warmup=1, sample_ms=1.0, min_exits=20, max_exits=200,
                    thread_exits=5, thread_pool=2, thread_batches=1, lifecycle_batch=2, kick_samples=8,
                    kick_delay_ms=(0.5, 1.5), scaling_seconds=0.05, scaling_max=2, scaling_reps=2, memory_k=4),
    "quick": Profile("quick", reps=7, warmup=1, sample_ms=5.0, min_exits=50, max_exits=20_000,
                     thread_exits=20, thread_pool=4, thread_batches=4, lifecycle_batch=4, kick_samples=60,
                     kick_delay_ms=(1.0, 3.0), scaling_seconds=0.25, scaling_max=_cores(), scaling_reps=3,
                     memory_k=8),
    "full": Profile("full", reps=21, warmup=2, sample_ms=15.0, min_exits=100, max_exits=200_000,
                    thread_exits=20, thread_pool=4, thread_batches=10, lifecycle_batch=8, kick_samples=300,
                    kick_delay_ms=(1.0, 4.0), scaling_seconds=1.0, scaling_max=None, scaling_reps=3,
                    memory_k=32),
}


# --- statistics ----------------------------------------------------------------
@dataclass
class Stat:
    """Samples of one quantity, summarised as median with min–max spread.

    `derived`, when set, says how the samples were computed from two other rows'
    samples: {"op": "ratio"|"difference", "field": stat key, "a": row id, "b": row id},
    sample i = a[i] / b[i] (or a[i] - b[i])."""
    samples: list
    unit: str                      # "ns", "x", "bytes", "1/s", "count"
    derived: dict | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def ci95(self) -> tuple:
        return bootstrap_ci(self.samples)

    def to_json(self) -> dict:
        d = dict(unit=self.unit, samples=list(self.samples), median=self.median,
                 min=self.min, max=self.max)
        if self.derived:
            d["derived"] = dict(self.derived)
            d["ci95"] = list(self.ci95)
        return d


def bootstrap_ci(samples: list, level: float = 0.95, rounds: int = 2000, seed: int = 0x6B766D) -> tuple:
    """Percentile bootstrap confidence interval of the median of *samples*."""
    if len(samples) < 2:
        return (samples[0], samples[0]) if samples else (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(samples)
    meds = sorted(statistics.median(rng.choices(samples, k=n)) for _ in range(rounds))
    lo = meds[int((1 - level) / 2 * rounds)]
    hi = meds[min(rounds - 1, int((1 + level) / 2 * rounds))]
    return lo, hi


def paired(a: list, b: list, op: str) -> list:
    """Per-repetition ratio (a/b) or difference (a-b) of two equally long sample lists."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need equal, non-empty lengths ({len(a)} vs {len(b)})")
    if op == "ratio":
        return [x / y for x, y in zip(a, b)]
    if op == "difference":
        return [x - y for x, y in zip(a, b)]
    raise ValueError(f"unknown paired op {op!r}")


def derive(rows: dict, field_: str, a: str, b: str, op: str, unit: str | None = None) -> Stat:
    """A Stat computed from the paired samples of rows[a] and rows[b] (by row id)."""
    sa, sb = rows[a]["stats"][field_], rows[b]["stats"][field_]
    return Stat(paired(sa.samples, sb.samples, op),
                unit or ("x" if op == "ratio" else sa.unit),
                dict(op=op, field=field_, a=a, b=b))


def interleave(variants: dict, reps: int, warmup: int = 0,
               on_round: Callable[[int], None] | None = None,
               shuffle: random.Random | None = None) -> dict:
    """Run each variant once per round, in order, `warmup` + `reps` rounds; with
    *shuffle* (a seeded Random: repeatable), each round in an order drawn from it.

    Shuffle where a sample is one short event (a kick): it starts from the caches the
    sample before it left, so in a fixed order a variant always starts where the same
    other one ended (the kick suite's note says what that did there).

    A variant is a callable returning one sample (a number) or several named
    samples (a dict).  Returns {name: [samples of the measured rounds]}, in the
    variants' order whatever order they ran in."""
    out: dict = {}
    names = list(variants)
    for r in range(warmup + reps):
        if shuffle is not None:
            shuffle.shuffle(names)
        got = {name: variants[name]() for name in names}
        if r < warmup:
            continue
        for name in variants:           # filed in the variants' order
            value = got[name]
            for k, v in (value.items() if isinstance(value, dict) else ((name, value),)):
                out.setdefault(k, []).append(v)
        if on_round is not None:
            on_round(r - warmup + 1)
    return out


def calibrate_count(fn: Callable[[int], object], sample_ms: float, lo: int, hi: int, probe: int = 20) -> int:
    """How many units (exits, calls) fn(n) must do so that one sample lasts about sample_ms
    on this host now: fn(probe) once to warm up, once timed.  Never tuned to a host."""
    fn(probe)
    t0 = time.perf_counter_ns()
    fn(probe)
    per = max(1, time.perf_counter_ns() - t0) / probe
    return max(lo, min(hi, int(sample_ms * 1e6 / per)))


def timed_ns(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


# --- suite results -------------------------------------------------------------
@dataclass
class SuiteResult:
    """What one suite measured: rows of labelled stats, plus notes and checks."""
    name: str
    title: str
    columns: list                      # [(key, header)]: a cell key or a stat key per column
    rows: dict = field(default_factory=dict)        # id -> {"cells": {}, "stats": {key: Stat}, "extra": {}}
    notes: list = field(default_factory=list)
    checks: list = field(default_factory=list)      # {"name", "ok", "detail"}
    skipped: list = field(default_factory=list)     # what could not be measured, and why
    config: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    def add_row(self, row_id: str, cells: dict, stats: dict | None = None, extra: dict | None = None) -> dict:
        if row_id in self.rows:
            raise ValueError(f"duplicate row id {row_id!r}")
        row = dict(cells=dict(cells), stats=dict(stats or {}), extra=dict(extra or {}))
        self.rows[row_id] = row
        return row

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(dict(name=name, ok=bool(ok), detail=detail))
        return ok

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def to_json(self) -> dict:
        return dict(name=self.name, title=self.title, columns=[list(c) for c in self.columns],
                    rows={rid: dict(cells=r["cells"], extra=r["extra"],
                                    stats={k: s.to_json() for k, s in r["stats"].items()})
                          for rid, r in self.rows.items()},
                    notes=list(self.notes), checks=list(self.checks), skipped=list(self.skipped),
                    config=dict(self.config), elapsed_s=self.elapsed_s)


# --- the machine record --------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_record() -> dict:
    """Where the numbers come from; printed with every report."""
    import kvmsys
    from kvmsys import pvm
    rec = dict(
        host_kvm_flavour=pvm.host_flavour(),
        cpu_model=_cpu_model(),
        cores=os.cpu_count(),
        cores_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        kernel=platform.release(),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        kvmsys=kvmsys.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        # how busy the host was: other processes share its cores with the measurement
        load_avg=[round(x, 2) for x in os.getloadavg()],
    )
    try:
        with kvmsys.Kvm() as kvm:
            rec["kvm_api_version"] = kvm.api_version()
            rec["vcpu_mmap_size"] = kvm.vcpu_mmap_size()
    except OSError as e:
        rec["kvm_error"] = str(e)
    return rec


# --- progress --------------------------------------------------------------------
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def progress(msg: str) -> None:
    """One line of progress on stderr (stdout is for the report)."""
    if not _quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)
