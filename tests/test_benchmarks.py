"""The benchmark harness: every suite in a tiny configuration, through the same
functions `python -m benchmarks` uses; the JSON is well formed, its numbers
positive, its ratios and differences consistent with its raw samples, and the
loops agree with the guest on how many exits it made.  No timing assertions."""
import json
import math
import statistics
import sys

import pytest

from kvmsys_bench import __main__ as bench
from kvmsys import _core
from kvmsys_bench import harness, report
from kvmsys_bench.exits import LOOPS as EXIT_LOOPS

TINY = harness.PROFILES["tiny"]
MACHINE_KEYS = {"host_kvm_flavour", "cpu_model", "cores", "kernel", "python", "kvmsys", "date"}
POSITIVE_UNITS = {"ns", "1/s", "x"}     # bytes and counts may be 0 (e.g. a reused thread stack)
SIGNED = {"user_ns", "user_cpu"}        # windows: a difference of two loops' clocks, noise may turn it < 0


@pytest.fixture(scope="module")
def docs():
    """Every suite once, tiny, as the JSON document __main__ writes (round-tripped)."""
    harness.set_quiet(True)
    try:
        results = bench.run_suites(bench.SUITES, TINY)
        doc = report.document(harness.machine_record(), TINY, results, ["--profile", "tiny"])
    finally:
        harness.set_quiet(False)
    return json.loads(json.dumps(doc))


def _check_stat(stat):
    s = stat["samples"]
    assert s and all(isinstance(x, (int, float)) and math.isfinite(x) for x in s)
    assert stat["median"] == pytest.approx(statistics.median(s))
    assert stat["min"] == min(s) and stat["max"] == max(s)


@pytest.mark.parametrize("name", bench.SUITES)
def test_suite_json_is_consistent(docs, name):
    suite = docs["suites"][name]
    assert suite["name"] == name and suite["title"] and suite["rows"]
    keys = {k for k, _h in suite["columns"]}
    used = set()
    for rid, row in suite["rows"].items():
        used |= set(row["cells"]) | set(row["stats"])
        for key, stat in row["stats"].items():
            _check_stat(stat)
            d = stat.get("derived")
            if d is None:
                if key in SIGNED:
                    continue
                if stat["unit"] in POSITIVE_UNITS:
                    assert min(stat["samples"]) > 0, (rid, key)
                else:
                    assert min(stat["samples"]) >= 0, (rid, key)
                continue
            # recompute the ratio/difference from the raw samples it names
            a = suite["rows"][d["a"]]["stats"][d["field"]]["samples"]
            b = suite["rows"][d["b"]]["stats"][d["field"]]["samples"]
            assert len(a) == len(b) == len(stat["samples"])
            want = [x / y for x, y in zip(a, b)] if d["op"] == "ratio" else [x - y for x, y in zip(a, b)]
            assert stat["samples"] == pytest.approx(want, rel=1e-12)
            if d["op"] == "ratio" and not d["field"].startswith("user"):
                assert min(stat["samples"]) > 0     # (a window is a difference: noise can make it < 0)
    assert keys <= used, f"columns nobody fills: {keys - used}"
    assert all(c["ok"] for c in suite["checks"]), suite["checks"]
    md = report.markdown_suite(suite)
    assert f"## {name}:" in md and md.count("\n|") >= len(suite["rows"]) + 2


def test_memory_per_vcpu_is_positive(docs):
    rows = docs["suites"]["memory"]["rows"]
    for rid in ("fd", "sys"):      # each vCPU maps at least its comm area
        assert rows[rid]["stats"]["rss"]["min"] > 0, rid


def test_machine_record(docs):
    assert MACHINE_KEYS <= set(docs["machine"])
    assert docs["machine"]["cores"] >= 1
    assert docs["ok"] is True


def test_exit_loops_share_one_vcpu_and_agree_with_its_counter(docs):
    rows = docs["suites"]["exits"]["rows"]
    assert {rid.split("/")[0] for rid in rows} == {"pm32", "long64"}      # both guest modes
    assert {rid.split("/")[2] for rid in rows} == {"fd", "sys"}
    assert {rid.split("/")[3] for rid in rows} == set(EXIT_LOOPS)
    for rid, row in rows.items():
        counter, counted = row["extra"]["counter"], row["extra"]["counted"]
        slack = 1 if rid.startswith("long64/hlt/") else 0    # PVM native mode skips the first hlt
        assert 0 <= counter - counted <= slack, rid
        # every loop of the group ran n exits per sample on the group's one vCPU
        assert counted >= len(EXIT_LOOPS) * len(row["stats"]["time"]["samples"]) * row["extra"]["n"]


def test_exit_windows_add_up(docs):
    """Reference rows: user window + KVM_RUN window = round trip; every loop's user window is
    its round trip less the KVM_RUN window of the reference entering KVM_RUN as it does, paired."""
    rows = docs["suites"]["exits"]["rows"]
    for rid, row in rows.items():
        grp, loop = rid.rsplit("/", 1)
        st = row["stats"]
        uses_mask = rows[f"{grp}/c"]["extra"]["uses_mask"]
        ref = loop if loop.startswith("ref") else "ref_mask" if loop in ("c", "py", "pyw") and uses_mask else "ref"
        ioctl = rows[f"{grp}/{ref}"]["stats"]["ioctl_ns"]["samples"]
        assert st["user_ns"]["samples"] == pytest.approx([t - i for t, i in zip(st["time"]["samples"], ioctl)])
        assert min(ioctl) > 0
        if loop != "ref":
            assert st["over_ref"]["derived"] == dict(op="difference", field="time", a=rid, b=f"{grp}/ref")
            lo, hi = st["cpu_ratio"]["ci95"]
            assert lo <= st["cpu_ratio"]["median"] <= hi
    assert all(rows[rid]["stats"]["mask_ns"]["derived"]["field"] == "ioctl_ns"
               for rid in rows if rid.endswith("/ref_mask"))


def test_naive_work_handler_does_the_naive_loops_work(machine):
    """`pyw`'s handler gives reads zeros, as the naive loop does (and IGNORE, all-ones, does not)."""
    from kvmsys_bench import exits
    from kvmsys_bench.guestvm import set_handling
    machine.load("pio_in_loop.pm32", n=0)
    exits._set_handling(machine.vm, "pio_in", "pyw")
    assert machine.vm.default_handler is exits.naive_work
    assert isinstance(machine.run(budget=20), _core.BudgetExit)
    from kvmsys.guests import layout
    result = lambda: int.from_bytes(machine.mem[layout.RESULT_ADDR:layout.RESULT_ADDR + 4], "little")
    assert machine.counter() >= 20 and result() == 0            # the guest sums what it read
    set_handling(machine.vm, "pio_in", "c")
    machine.run(budget=5)
    assert result() != 0


def test_main_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--profile", "tiny", "--suite", "lifecycle", "--suite", "memory",
                     "--json", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert list(doc["suites"]) == ["lifecycle", "memory"]
    assert MACHINE_KEYS <= set(doc["machine"])
    stdout = capsys.readouterr().out
    assert "## lifecycle:" in stdout and "## memory:" in stdout and doc["machine"]["kernel"] in stdout


def test_cli_bench_passes_options_through(capsys):
    from kvmsys import cli
    try:
        rc = cli.main(["bench", "--profile", "tiny", "--suite", "lifecycle", "--quiet"])
    except SystemExit as e:
        rc = e.code
    assert rc == 0


def test_cli_bench_after_separator(capsys):
    from kvmsys import cli
    assert cli.main(["bench", "--", "--profile", "tiny", "--suite", "lifecycle", "--quiet"]) == 0
    assert "## lifecycle:" in capsys.readouterr().out


# --- no KVM needed ---------------------------------------------------------------
@pytest.mark.nokvm
def test_paired_ratio_and_difference():
    rows = {"a": {"stats": {"t": harness.Stat([2.0, 6.0, 9.0], "ns")}},
            "b": {"stats": {"t": harness.Stat([1.0, 2.0, 3.0], "ns")}}}
    r = harness.derive(rows, "t", "a", "b", "ratio")
    assert r.samples == [2.0, 3.0, 3.0] and r.median == 3.0 and r.unit == "x"
    d = harness.derive(rows, "t", "a", "b", "difference")
    assert d.samples == [1.0, 4.0, 6.0] and (d.min, d.max) == (1.0, 6.0) and d.unit == "ns"
    with pytest.raises(ValueError):
        harness.paired([1.0], [1.0, 2.0], "ratio")


@pytest.mark.nokvm
def test_interleave_order_and_warmup():
    order = []
    variants = {"A": lambda: order.append("A") or 1.0, "B": lambda: order.append("B") or {"B1": 2.0}}
    out = harness.interleave(variants, reps=2, warmup=1)
    assert order == ["A", "B"] * 3
    assert out == {"A": [1.0, 1.0], "B1": [2.0, 2.0]}


@pytest.mark.nokvm
def test_interleave_shuffled_runs_each_variant_once_a_round_in_drawn_orders():
    """With shuffle, every round runs each variant once, in an order drawn from the seeded
    Random (the same seed, the same orders); the samples come back in the variants' order."""
    import random

    def rounds(seed):
        order = []
        variants = {n: (lambda n=n: order.append(n) or ({f"{n}1": 1.0, f"{n}0": 0.0} if n == "D" else 1.0))
                    for n in "ABCD"}
        out = harness.interleave(variants, reps=7, warmup=1, shuffle=random.Random(seed))
        assert list(out) == ["A", "B", "C", "D1", "D0"] and all(len(v) == 7 for v in out.values())
        return [tuple(order[i:i + 4]) for i in range(0, len(order), 4)]

    orders = rounds(5)
    assert len(orders) == 8 and all(sorted(o) == list("ABCD") for o in orders)
    # no variant always follows the same one
    before = {n: {o[o.index(n) - 1] if o.index(n) else None for o in orders} for n in "ABCD"}
    assert all(len(b) > 1 for b in before.values()), before
    assert rounds(5) == orders and rounds(6) != orders


@pytest.mark.nokvm
def test_bootstrap_ci_brackets_the_median():
    lo, hi = harness.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 100.0])
    assert 1.0 <= lo <= 3.0 <= hi <= 100.0
    assert harness.bootstrap_ci([5.0] * 9) == (5.0, 5.0)
    narrow = harness.bootstrap_ci([10.0 + i % 3 for i in range(300)])
    assert narrow[1] - narrow[0] <= 1.0


@pytest.mark.nokvm
def test_formatting():
    assert report.fmt_stat(dict(unit="ns", median=12_345, min=12_000, max=13_000)) == "12.3 µs (12.0 – 13.0)"
    assert report.fmt_stat(dict(unit="x", median=1.5, min=1.5, max=1.5)) == "1.50×"
    assert report.fmt_stat(dict(unit="bytes", median=4096, min=4096, max=4096)) == "4.00 KiB"
    assert report.fmt_stat(dict(unit="x", median=1.5, min=1.0, max=2.0, ci95=[1.4, 1.6])) == "1.50× [1.40, 1.60]"


@pytest.mark.nokvm
def test_plot_without_matplotlib_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    rc = bench.main(["--suite", "dispatch", "--plot", str(tmp_path / "x.png")])
    assert rc == 2
    assert "pip install 'kvmsys[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.nokvm
def test_usage_errors_are_exit_codes(capsys):
    assert bench.main(["--suite", "no-such-suite"]) == 2
    assert bench.main(["--help"]) == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.nokvm
def test_scaling_thread_counts():
    from kvmsys_bench.scaling import thread_counts
    assert thread_counts(1) == [1]
    assert thread_counts(4)[:4] == [1, 2, 3, 4] and thread_counts(4)[-1] == 4
    big = thread_counts(64)
    assert big[0] == 1 and big[-1] == 64 and big == sorted(set(big)) and len(big) < 20


# --- found while measuring kick latency --------------------------------------------
def test_no_spurious_exit_after_a_kick(machine):
    """Each run() of a continuously exiting guest ends only by the kick aimed at it."""
    import threading
    import time
    from kvmsys_bench.guestvm import set_handling
    machine.load("pio_out_loop.pm32", n=0)
    set_handling(machine.vm, "pio_out", "c")
    handle = machine.vcpu.handle()
    running, done = threading.Event(), threading.Event()

    def kicker():
        while not done.is_set():
            if running.wait(0.1):
                running.clear()
                time.sleep(0.0001)
                handle.kick()

    t = threading.Thread(target=kicker)
    t.start()
    names = []
    try:
        deadline = time.monotonic() + 4      # the race hit once in a few thousand kicks
        while time.monotonic() < deadline and len(names) < 40000:
            running.set()
            names.append(machine.run(timeout=None).name)
            if names[-1] != "KICK":
                break
    finally:
        done.set()
        t.join()
        machine.run(budget=1)       # a kick that landed after the last run() is taken here
    assert set(names) == {"KICK"}, f"after {len(names) - 1} kicks run() returned {names[-1]}"


def test_kick_suite_pins_both_harnesses_alike_and_gives_the_cpus_back():
    """kvmsys's target threads and the C floor's run on one CPU, the kicking thread on
    another (left to the scheduler, the floor's target often shared the kicker's CPU and
    took no cross-CPU signal); the main thread's CPU set is as it was afterwards."""
    import os
    before = os.sched_getaffinity(0)
    harness.set_quiet(True)
    try:
        res = bench.run_suites(["kick"], TINY)["kick"].to_json()
    finally:
        harness.set_quiet(False)
    assert os.sched_getaffinity(0) == before
    # (the exiting guest's count check passes only because every sample loads its guest
    # afresh: in a drawn order a run may follow another on the same guest)
    assert all(c["ok"] for c in res["checks"]), res["checks"]
    assert res["config"]["order"] == "drawn per round"
    # every kvmsys row has its Python floor (the same threads calling bare C) beside its C floor
    for key, row in res["rows"].items():
        if key.split("/")[0] not in ("c", "py"):
            assert f"py/{key}" in res["rows"] and f"c/{key}" in res["rows"]
            assert row["stats"]["over_py"]["samples"] and row["stats"]["ratio"]["samples"]
    if len(before) >= 2:
        cpus = res["config"]["cpus"]
        assert cpus["targets"] != cpus["kicker"] and {cpus["targets"], cpus["kicker"]} <= before
    else:
        assert res["config"]["cpus"] is None


@pytest.mark.parametrize("abi", ["fd", "sys"])
def test_kick_targets_guest_count_holds_run_after_run(abi):
    """Kicked runs of the exiting guest one after another on one target (as a drawn order
    has them): its counter and the run loop's IO exits agree in every run.  A run that went
    on from where the last one left the guest (between a count and its out) counted one
    less: this failed in 14% of such runs before every sample loaded its guest afresh."""
    import random

    import kvmsys
    from kvmsys_bench import kick
    rng = random.Random(7)
    with kvmsys.Kvm() as kvm:
        t = kick._Target(abi, kvm, "pm32")
        try:
            for _ in range(30):
                assert t.sample("exits", rng.uniform(0.2, 1.0) / 1e3) is not None, t.otherwise
        finally:
            t.close()
    assert t.runs == 30 and not t.mismatches, t.mismatches


@pytest.mark.skipif(not __import__("os").path.exists("/usr/share/seabios/bios.bin"),
                    reason="env: Debian package seabios is not installed")
def test_boot_suite_tiny():
    """`--suite boot` (not in the default run): SeaBIOS to "No bootable device." in fresh
    processes, kvmsys over both ABIs and QEMU where installed; ratios paired per round."""
    harness.set_quiet(True)
    try:
        res = json.loads(json.dumps(bench.run_suites(["boot"], TINY)["boot"].to_json()))
    finally:
        harness.set_quiet(False)
    assert "boot" in bench.OPTIONAL_SUITES and "boot" not in bench.SUITES
    assert {"seabios/kvmsys-fd", "seabios/kvmsys-sys"} <= set(res["rows"])
    assert all(c["ok"] for c in res["checks"]), res["checks"]
    for row in res["rows"].values():
        _check_stat(row["stats"]["time"])
        assert row["stats"]["time"]["min"] > 0
    if "seabios/qemu" in res["rows"]:
        d = res["rows"]["seabios/kvmsys-fd"]["stats"]["ratio"]
        a = res["rows"]["seabios/kvmsys-fd"]["stats"]["time"]["samples"]
        b = res["rows"]["seabios/qemu"]["stats"]["time"]["samples"]
        assert d["samples"] == pytest.approx([x / y for x, y in zip(a, b)])
    else:
        assert any("qemu" in s.lower() for s in res["skipped"])
    assert "## boot:" in report.markdown_suite(res)


# --- regressions against a stored run -----------------------------------------------
def _gate_args(*extra):
    return ["--profile", "tiny", "--suite", "exits", "--kinds", "pio_out", "--mode-only", "--quiet", *extra]


def test_baseline_catches_an_injected_delay(tmp_path, capsys):
    """The benchmark hook's delay before every Python handler call is a regression of the
    Python path on both ABIs, named on stderr with exit code 4; a run is not worse than itself."""
    from kvmsys_bench import baseline
    base = tmp_path / "base.json"
    assert bench.main(_gate_args("--runs", "2", "--json", str(base))) == 0
    doc = baseline.load(str(base))
    assert len(doc["headline_runs"]) == 2
    assert not any(r["worse"] for r in baseline.compare(doc, doc))
    slow = tmp_path / "slow.json"
    capsys.readouterr()
    rc = bench.main(_gate_args("--inject", "py=300000", "--json", str(slow), "--baseline", str(base)))
    captured = capsys.readouterr()
    assert rc == 4
    worse = {r["metric"] for r in baseline.compare(baseline.load(str(slow)), doc) if r["worse"]}
    assert {"exits/pm32/fd/py/path", "exits/pm32/sys/py/path"} <= worse
    assert "REGRESSION exits/pm32/sys/py/path" in captured.err
    assert "injected delays (self-test) differs" in captured.err      # the warning says why
    assert "Delays injected by the self-test" in captured.out
    from kvmsys import _core
    _core._bench_delay(1, 0)


def test_bench_hook_delays_and_refuses_bad_input(machine):
    """The compiled-in hook is off by default; on, it busy-waits per exit (C loop, at 0)."""
    import time
    from kvmsys import _core
    from kvmsys_bench.guestvm import set_handling
    machine.load("pio_out_loop.pm32", n=0)
    set_handling(machine.vm, "pio_out", "c")
    for bad in ((3, 0.0), (-1, 0.0), (0, -1.0), (0, 1.0), (0, float("nan")), (2.5, 0.0), ("2", 0.0),
                (0, "x"), (2**40, 0.0)):
        with pytest.raises(_core.InvalidArgumentError if hasattr(_core, "InvalidArgumentError") else ValueError):
            _core._bench_delay(*bad)
    assert _core._bench_delay(0, 0.002) == 0.0                  # it returns the delay it replaces
    try:
        t0 = time.perf_counter()
        assert isinstance(machine.run(budget=20), _core.BudgetExit)
        assert time.perf_counter() - t0 >= 20 * 0.002            # a busy-wait lasts at least that long
    finally:
        assert _core._bench_delay(0, 0) == 0.002
    assert machine.counter() >= 20


def test_bench_hook_delays_a_kick_of_a_running_vcpu_only(machine):
    """At 2 the hook busy-waits in every kick of a vCPU inside KVM_RUN, before its signal
    (the kick suite's self-check); a kick of a vCPU that is not running does not wait."""
    import threading
    import time
    from kvmsys import _core
    machine.load("compute.pm32", n=0xFFFFFFFF)
    handle = machine.vcpu.handle()
    _core._bench_delay(2, 0.002)
    try:
        t0 = time.perf_counter()
        handle.kick()                       # not running: taken by the next run()
        idle = time.perf_counter() - t0
        assert type(machine.run(timeout=10)).__name__ == "KickExit"
        took = []

        def kicker():
            while not machine.vcpu.running:
                time.sleep(0.001)
            t = time.perf_counter()
            handle.kick()
            took.append(time.perf_counter() - t)

        k = threading.Thread(target=kicker)
        k.start()
        try:
            ex = machine.run(timeout=10)
        finally:
            k.join()
    finally:
        _core._bench_delay(2, 0)
    assert type(ex).__name__ == "KickExit"
    assert took[0] >= 0.002 > idle


def _counter_off(monkeypatch):
    """Every read of a guest counter gets 2 more than the last one did: the loops and the guest disagree."""
    import itertools
    from kvmsys.machine import Machine
    from kvmsys_bench import guestvm
    calls = itertools.count(1)
    real, real_mem = Machine.counter, guestvm.guest_counter
    monkeypatch.setattr(Machine, "counter", lambda self: real(self) + 2 * next(calls))
    monkeypatch.setattr(guestvm, "guest_counter", lambda mem: real_mem(mem) + 2 * next(calls))


@pytest.mark.parametrize("name", ["exits", "threads", "abi", "scaling", "kick", "lifecycle"])
def test_guest_counter_checks_can_fail(monkeypatch, name):
    _counter_off(monkeypatch)
    profile = TINY.with_(exit_kinds=("pio_out",), mode_only=True)
    harness.set_quiet(True)
    try:
        res = bench.run_suites([name], profile)[name].to_json()
    finally:
        harness.set_quiet(False)
    failed = [c for c in res["checks"] if not c["ok"]]
    assert failed and all("counter" in c["name"] for c in failed), res["checks"]


@pytest.mark.parametrize("name,cls", [("threads", "BudgetExit"), ("scaling", "BudgetExit"),
                                      ("lifecycle", "BudgetExit"), ("abi", "IoExit")])
def test_run_result_checks_can_fail(monkeypatch, name, cls):
    """A suite that expects run() to return a given exit class fails its check when it does not."""
    monkeypatch.setattr(_core, cls, type("NotIt", (), {}))
    harness.set_quiet(True)
    try:
        res = bench.run_suites([name], TINY)[name].to_json()
    finally:
        harness.set_quiet(False)
    assert any(not c["ok"] and ("run" in c["name"] or "runs" in c["name"]) for c in res["checks"]), res["checks"]


@pytest.mark.nokvm
def test_gate_thresholds_come_from_run_to_run_spread():
    from kvmsys_bench import baseline
    def doc(values, **machine):
        runs = [{"exits/pm32/sys/c/cost": dict(value=v, unit="ns", kvmsys=True, label="c"),
                 "exits/pm32/sys/naive/cost": dict(value=v, unit="ns", kvmsys=False, label="n")} for v in values]
        return dict(suites={}, headline_runs=runs, profile=dict(name="quick"),
                    machine=dict(dict(cores=2, load_avg=[0.1]), **machine))
    base = doc([100, 104, 96, 102, 98])              # SD 3.16 ns
    same = baseline.compare(doc([101]), base)
    worse = baseline.compare(doc([120]), base)
    c_same = next(r for r in same if r["metric"] == "exits/pm32/sys/c/cost")
    c_worse = next(r for r in worse if r["metric"] == "exits/pm32/sys/c/cost")
    assert c_same["threshold"] == pytest.approx(4 * 3.1623 * (1 + 1 / 5) ** 0.5, rel=1e-3)
    assert not c_same["worse"] and c_worse["worse"]
    assert not next(r for r in worse if r["metric"] == "exits/pm32/sys/naive/cost")["worse"]   # a reference
    warn = baseline.differences(doc([1], kernel="6.1", load_avg=[3.0]), doc([1], kernel="6.2"))
    assert any("kernel differs" in w for w in warn) and any("loaded host" in w for w in warn)
    # a kick suite measured in the old fixed order is not the same measure
    old, new = doc([1]), doc([1])
    old["suites"]["kick"] = dict(config=dict(mode="pm32"))
    new["suites"]["kick"] = dict(config=dict(mode="pm32", order="drawn per round", loads="before every sample"))
    warn = baseline.differences(new, old)
    assert any("sample order differs: baseline 'fixed', this run 'drawn per round'" in w for w in warn), warn
    assert not any("kick" in w for w in baseline.differences(new, new))


@pytest.mark.nokvm
def test_gate_compares_a_stored_run_and_refuses_with_readme(tmp_path, capsys):
    """`--report FILE --baseline BASE` gates the stored run as it would a measured one (it
    used to print the report and ignore --baseline); `--readme` with --baseline is refused."""
    import pathlib
    stored = str(pathlib.Path(__file__).parent.parent / "benchmarks" / "results" / "2026-12-07m-pvm-epyc-2core-quick.json")
    assert bench.main(["--report", stored, "--baseline", stored]) == 0
    assert "| figure | baseline | this run |" in capsys.readouterr().out
    doc = json.load(open(stored))
    for run in doc["headline_runs"]:
        run["exits/pm32/fd/c/user_own"]["value"] += 1000      # 1 us worse in every process
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(doc))
    assert bench.main(["--report", str(worse), "--baseline", stored]) == 4
    assert "REGRESSION exits/pm32/fd/c/user_own" in capsys.readouterr().err
    assert bench.main(["--readme", stored, "--baseline", stored]) == 2
    assert "not README's section" in capsys.readouterr().err


@pytest.mark.nokvm
def test_merge_keeps_pairs_and_per_run_medians():
    st = lambda xs: dict(unit="ns", samples=xs, median=statistics.median(xs), min=min(xs), max=max(xs))
    def run(a, b):
        rows = {"a": dict(cells={}, extra={}, stats={"t": st(a)}),
                "b": dict(cells={}, extra={}, stats={"t": st(b)})}
        suite = dict(name="s", title="t", columns=[], notes=[], skipped=[], config={}, elapsed_s=1.0,
                     checks=[dict(name="c", ok=True, detail="d")], rows=rows)
        return dict(machine=dict(load_avg=[0.1]), profile=dict(name="tiny", mode="pm32", reps=2, warmup=0),
                    ok=True, suites={"s": suite})
    m = report.merge([run([1, 3], [2, 2]), run([5, 7], [4, 4])], [])
    a = m["suites"]["s"]["rows"]["a"]["stats"]["t"]
    assert a["samples"] == [1, 3, 5, 7] and a["runs"] == [2, 6] and m["runs"] == 2
    assert len(m["suites"]["s"]["checks"]) == 2 and m["ok"]
    assert report.fmt_stat(a) == "4.00 ns ‹2.00 – 6.00›"


def test_report_regenerates_the_markdown_from_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert bench.main(["--profile", "tiny", "--suite", "lifecycle", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert bench.main(["--report", str(out)]) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.nokvm
def test_baseline_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert bench.main(["--baseline", str(tmp_path / "missing.json")]) == 2
    assert bench.main(["--report", str(bad)]) == 2
    assert bench.main(["--tolerance", "-1"]) == 2


# --- --trace ----------------------------------------------------------------------------
@pytest.mark.nokvm
def test_trace_segments_from_a_trace():
    from kvmsys_bench import trace
    run = trace._KVM_RUN_ARG
    text = "\n".join([
        "# tracer: nop",
        f" python-7 [000] ..... 100.000010: sys_enter: NR 16 (5, {run}, 0, 0, 0, 0)",
        " python-7 [000] ..... 100.000013: kvm_entry: vcpu 0, rip 0x1000",
        " python-7 [000] ..... 100.000020: kvm_exit: vcpu 0 reason IO_INSTRUCTION",
        " python-7 [000] ..... 100.000024: kvm_userspace_exit: reason KVM_EXIT_IO (2)",
        " python-7 [000] ..... 100.000025: sys_exit: NR 16 = 0",
        " python-7 [000] ..... 100.000026: sys_enter: NR 16 (5, 5401, 0, 0, 0, 0)",     # not KVM_RUN
        " python-7 [000] ..... 100.000026: sys_exit: NR 16 = -25",
        f" python-7 [000] ..... 100.000027: sys_enter: NR 16 (5, {run}, 0, 0, 0, 0)",
        " python-7 [000] ..... 100.000036: kvm_userspace_exit: reason KVM_EXIT_IO (2)",  # emulated
        " python-7 [000] ..... 100.000038: sys_exit: NR 16 = 0",
    ])
    seg = trace.segments(text)
    assert seg == {"enter": [3000, 9000], "guest": [7000], "exit": [4000], "ret": [1000, 2000],
                   "user": [2000]}


def test_trace_breaks_down_round_trips():
    from kvmsys_bench import trace
    why = trace.unavailable()
    if why:
        pytest.skip(f"host: {why}")
    res = trace.run(TINY)
    assert not res.skipped
    for rid, row in res.rows.items():
        if rid.endswith(("/enter", "/ret")):
            assert row["cells"]["count"] >= 50, rid       # every traced round trip was seen
    assert {rid.split("/")[1] for rid in res.rows} == {"fd", "sys"}


# --- suite windows (tracepoints, x86-tsc) ----------------------------------------------
def _tsc_trace(run_arg, lines):
    return "\n".join(["# tracer: nop"] + [f" python-7 [001] ..... {t}: {what}" for t, what in lines])


@pytest.mark.nokvm
def test_windows_from_a_trace():
    from kvmsys_bench import trace, windows
    run = trace._KVM_RUN_ARG
    text = _tsc_trace(run, [
        (1000, "tracing_mark_write: kvmsys-begin"),
        (1100, f"sys_enter: NR 16 ({5}, {run}, 0, 0, 0, 0)"),
        (9100, "sys_exit: NR 16 = 0"),
        (9400, f"sys_enter: NR 16 (5, {run}, 0, 0, 0, 0)"),       # window 300
        (19400, "sys_exit: NR 16 = 0"),
        (19500, "sys_enter: NR 16 (5, 5401, 0, 0, 0, 0)"),        # another ioctl: no window
        (19600, "sys_exit: NR 16 = -25"),
        (19700, f"sys_enter: NR 16 (5, {run}, 0, 0, 0, 0)"),
        (29700, "sys_exit: NR 16 = 0"),
        (29950, f"sys_enter: NR 16 (5, {run}, 0, 0, 0, 0)"),      # window 250
        (39950, "sys_exit: NR 16 = 0"),
        (40000, "tracing_mark_write: kvmsys-end"),
    ])
    assert windows.windows(text) == ([300, 250], 39000)
    assert windows.windows(text.replace("kvmsys-end", "other"))[1] is None


@pytest.mark.nokvm
def test_windows_refuses_a_trace_that_lost_events():
    """A sample whose trace holds fewer windows than its exits (a full buffer) fails
    loudly instead of averaging what is left."""
    from kvmsys_bench import trace, windows
    run = trace._KVM_RUN_ARG

    class Inst:
        def write(self, rel, value):
            pass

        def read(self):
            return _tsc_trace(run, [(0, "tracing_mark_write: kvmsys-begin"),
                                    (10, f"sys_enter: NR 16 (5, {run}, 0)"), (20, "sys_exit: NR 16 = 0"),
                                    (30, f"sys_enter: NR 16 (5, {run}, 0)"), (40, "sys_exit: NR 16 = 0"),
                                    (50, "tracing_mark_write: kvmsys-end")])
    with pytest.raises(RuntimeError, match="events were lost"):
        windows._Tracer(Inst(), 10)(lambda: None)
    assert windows._Tracer(Inst(), 2)(lambda: 7)[1] == 7


@pytest.mark.nokvm
def test_windows_suite_says_why_when_tracing_cannot_be_set_up(monkeypatch):
    from kvmsys_bench import trace, windows

    class NoClock:
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            raise OSError(22, "Invalid argument", "trace_clock")
    monkeypatch.setattr(trace, "unavailable", lambda *who_events: None)
    monkeypatch.setattr(trace, "_Instance", NoClock)
    res = windows.run(TINY)
    assert not res.rows and len(res.skipped) == 1
    assert "could not be set up" in res.skipped[0] and "trace_clock" in res.skipped[0]


def test_trace_instances_of_killed_runs_are_removed():
    """A run killed before it could remove its tracefs instance leaves its syscall
    tracepoints on; the next run removes it (and leaves a live run's alone)."""
    import os
    import subprocess
    from kvmsys_bench import trace
    if trace.unavailable():
        pytest.skip(f"host: {trace.unavailable()}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{trace.TRACEFS}/instances/kvmsys-bench-{dead.pid}"
    live = f"{trace.TRACEFS}/instances/kvmsys-bench-{os.getppid()}"
    os.mkdir(stale)
    os.mkdir(live)
    try:
        with open(f"{stale}/events/raw_syscalls/sys_enter/enable", "w") as f:
            f.write("1")
        with trace._Instance(trace.EVENTS[:2]):
            assert not os.path.exists(stale)
            assert os.path.isdir(live)
    finally:
        for path in (stale, live):
            if os.path.isdir(path):
                os.rmdir(path)


def test_windows_suite_tiny():
    """`--suite windows` (root, not in the default run): every loop's traced window on
    one vCPU, the naive loop's included, and the proof that a known delay shows."""
    from kvmsys_bench import trace, windows
    if trace.unavailable():
        pytest.skip(f"host: {trace.unavailable()}")
    assert "windows" in bench.OPTIONAL_SUITES and "windows" not in bench.SUITES
    res = windows.run(TINY.with_(mode="pm32", mode_only=True), kinds=["pio_out"])
    assert not res.skipped
    for abi in ("fd", "sys"):
        for key in EXIT_LOOPS:
            st = res.rows[f"pm32/pio_out/{abi}/{key}"]["stats"]
            assert st["traced"].median > 0
            assert ("own" in st) == (key != "naive")
        assert res.rows[f"pm32/pio_out/{abi}/pyo"]["stats"]["vs_naive"].samples
    assert [c["name"] for c in res.checks] == ["pm32/pio_out/fd sees", "pm32/pio_out/sys sees"]
    for abi in ("fd", "sys"):       # a 1 µs busy-wait per callback shows (0.95-1.35 µs seen here)
        assert 500 <= res.rows[f"pm32/pio_out/{abi}/pyo"]["extra"]["proof_ns"] <= 2000
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["rows"] and "## windows:" in report.markdown_suite(res)
    # the verdict gives the ratios only where every proof passed, and says which did not
    from kvmsys_bench import verdict
    full = json.loads(json.dumps(report.document(harness.machine_record(), TINY, {"windows": res}, [])))
    text = verdict.verdict(full)
    assert "**Outside KVM_RUN, by the kernel's clock**" in text
    if all(c["ok"] for c in full["suites"]["windows"]["checks"]):
        assert "in pm32 guests (all 2 proofs passed) read/write callbacks take PIO out " in text
    full["suites"]["windows"]["checks"][1]["ok"] = False
    assert "pm32 guests not resolved (1 of 2 proofs failed" in verdict.verdict(full)


# --- packaging and layering -----------------------------------------------------------
@pytest.mark.nokvm
def test_library_does_not_import_the_benchmark_layer():
    import ast
    from pathlib import Path
    import kvmsys
    for path in Path(kvmsys.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("benchmarks", "kvmsys_bench") for n in names), path


@pytest.mark.nokvm
def test_core_exports_no_reference_loops_or_ioctl_table():
    from kvmsys import _core
    assert not hasattr(_core, "IOCTLS")
    assert not [n for n in dir(_core) if "reference" in n.lower()]


@pytest.mark.nokvm
def test_no_top_level_benchmarks_package_is_installed():
    from pathlib import Path
    tomllib = pytest.importorskip("tomllib", reason="env: Python < 3.11 has no tomllib")
    conf = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "benchmarks" not in conf["packages"]
    assert conf["package-dir"]["kvmsys_bench"] == "benchmarks"


def test_report_opens_with_a_verdict_from_its_numbers(docs):
    from kvmsys_bench import baseline, verdict
    text = report.markdown(docs)
    first = text.split("\n## ")[0]
    assert "**Verdict**" in first and "**Which ABI:**" in first and "**Against QEMU:**" in first
    heads = baseline.headlines(docs)
    c_sys = heads["exits/pm32/sys/c/cost"]["value"]
    assert report.fmt_value(c_sys, "ns") in verdict.verdict(docs)      # this run's own figure


@pytest.mark.nokvm
def test_readme_figures_are_generated_from_a_stored_run():
    """README's benchmark figures are exactly `--readme` of the stored runs it names."""
    import re
    from pathlib import Path
    from kvmsys_bench import baseline
    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- bench:begin -->\n", 1)[1].split("<!-- bench:end -->", 1)[0]
    paths = re.match(r"<!-- generated by `python -m benchmarks((?: --readme \S+)+)` -->", block).group(1).split()[1::2]
    docs = [(baseline.load(str(root / p)), p) for p in paths]
    assert block == report.readme_section(*docs[0], *docs[1:])
    assert len(baseline.run_values(docs[0][0])) >= 3          # its spread comes from separate processes
