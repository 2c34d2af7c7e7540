"""Run kvm-unit-tests' x86 tests under kvmsys (or QEMU, for reference) from the suite's
own ``x86/unittests.cfg``, as its ``x86/run`` script runs them under QEMU.

    python -m kvmsys.kut KUT_DIR [TEST ...] [--abi fd|sys] [--vmm kvmsys|qemu] [--timeout-cap S]

KUT_DIR is a built kvm-unit-tests tree (``./configure && make``).  Each test runs in a
process of its own: ``kvmsys run --kernel x86/FILE.flat --vcpus SMP --append TEST_ARGS
--test-device`` plus what kvmsys can honour of the entry's ``qemu_params`` (``-cpu``
features, ``-m``, ``-smp``, ``-machine pit=off``, ``-M q35,kernel-irqchip=split`` and
``-device edu`` / ``intel-iommu,intremap=on,eim=off`` as ``--machine q35 --device``); an
option it cannot honour makes the test SKIP with that reason, never a silent run without it.
The file is untrusted: of the shell expansions x86/run's eval would do in TEST_ARGS only
``date +%s`` is honoured (computed in Python); any other command makes the test SKIP.
The result is the suite's own: the test writes ``(code << 1) | 1`` to isa-debug-exit
(port 0xf4), the VMM exits with that status, and code 0 is PASS, 77 SKIP, anything else FAIL
(as scripts/arch-run.bash reads QEMU's status).  A test that has not ended by its timeout is a TIMEOUT.
"""
from __future__ import annotations

import argparse
import configparser
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time

from .errors import InvalidArgumentError
from .pc import CPU_FEATURES

# What x86/run passes to QEMU for every test (with -kernel FILE, -smp N, -append ARGS).
QEMU_BASE = ("--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard", "-device", "pc-testdev",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial", "stdio",
             "-device", "pci-testdev", "-machine", "accel=kvm")
DEFAULT_TIMEOUT = 90.0      # scripts/runtime.bash's default


@dataclasses.dataclass
class Test:
    name: str
    file: str
    smp: int = 1
    test_args: str = ""         # as the file has it; expand_args() evaluates it when the test runs
    qemu_params: str = ""
    arch: str = ""
    groups: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    check: tuple[str, ...] = ()


@dataclasses.dataclass
class Result:
    test: str
    verdict: str                # PASS, FAIL, SKIP, TIMEOUT
    status: int | None          # the VMM's exit status
    detail: str
    seconds: float
    output: str = ""
    command: list[str] = dataclasses.field(default_factory=list)     # what ran (none for a SKIP)


def _seconds(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"bad timeout {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_cfg(path: str) -> list[Test]:
    """The entries of a unittests.cfg, in file order."""
    cp = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#",),
                                   inline_comment_prefixes=None)
    with open(path, encoding="utf-8") as f:
        cp.read_file(f)
    tests = []
    for name in cp.sections():
        s = cp[name]
        smp = s.get("smp", "1").strip()
        tests.append(Test(
            name=name, file=s["file"].strip(),
            smp=int(smp) if smp.isdigit() else os.cpu_count() or 1,    # $MAX_SMP and the like
            test_args=_unquote(s.get("test_args", s.get("extra_params", ""))),
            qemu_params=s.get("qemu_params", "").strip(), arch=s.get("arch", "").strip(),
            groups=tuple(s.get("groups", "").split()),
            timeout=_seconds(s["timeout"]) if "timeout" in s else DEFAULT_TIMEOUT,
            check=tuple(s.get("check", "").split())))
    return tests


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text


# The suite's x86/run evals each entry's command line in a shell; kvmsys runs no command that a
# file names.  The one substitution the suite uses (kvmclock_test's wall clock) is computed here,
# when the test runs, as the shell would; any other makes the test a SKIP that names it.
SUBSTITUTIONS = {"date +%s": lambda: str(int(time.time()))}


def expand_args(text: str) -> str:
    """*text* (an entry's test_args) with its `date +%s` evaluated; InvalidArgumentError for any
    other command substitution or shell expansion, which kvmsys does not run."""
    parts = text.split("`")
    if len(parts) % 2 == 0:
        raise InvalidArgumentError(f"test_args {text!r} has an unmatched backtick: kvmsys runs no shell to read it")
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            key = " ".join(part.split())
            if key not in SUBSTITUTIONS:
                raise InvalidArgumentError(f"test_args runs `{part}`: kvmsys runs no command a file names "
                                           f"(it computes only {', '.join(f'`{c}`' for c in SUBSTITUTIONS)} itself)")
            out.append(SUBSTITUTIONS[key]())
        elif "$" in part:        # $(cmd), $VAR: the shell would expand them
            raise InvalidArgumentError(f"test_args {text!r} needs a shell to expand '$': kvmsys runs none")
        else:
            out.append(part)
    return "".join(out)


# -device NAME,PROPS that kvmsys.q35 has, with the properties that say what it does anyway
Q35_DEVICES = {"edu": (), "intel-iommu": ("intremap=on", "eim=off")}

# -cpu models: kvmsys starts from the host's supported CPUID (as -cpu host, a superset of these)
CPU_MODELS = ("qemu64", "max", "host", "kvm64")


def kvmsys_options(test: Test) -> tuple[list[str], str | None]:
    """The kvmsys run options for *test*'s qemu_params, or (_, why it cannot be honoured)."""
    opts: list[str] = []
    words = shlex.split(test.qemu_params)
    i = 0
    while i < len(words):
        w = words[i]
        arg = words[i + 1] if i + 1 < len(words) else ""
        if w == "-cpu":
            model, *feats = arg.split(",")
            if model not in CPU_MODELS:
                return opts, f"-cpu model {model}"
            flags = []
            for f in feats:
                if f[:1] in "+-" and f[1:] in CPU_FEATURES:     # kvmsys.pc's
                    flags.append(f)
                elif f not in ("host-phys-bits", "migratable=no"):
                    return opts, f"-cpu {f}"
            if flags:
                opts.append("--cpu=" + ",".join(flags))     # "=": a leading "-" is no option
        elif w == "-m" and arg.isdigit():
            opts += ["--memory", arg]
        elif w == "-m" and re.fullmatch(r"\d+[gG]", arg):
            opts += ["--memory", str(int(arg[:-1]) * 1024)]
        elif w == "-machine" and arg == "pit=off":
            opts += ["--no-pit"]
        elif w in ("-M", "-machine") and arg.split(",")[0] == "q35":
            if any(o != "kernel-irqchip=split" for o in arg.split(",")[1:]):    # q35 here is always split
                return opts, f"{w} {arg}"
            opts += ["--machine", "q35"]
        elif w == "-device" and arg.split(",")[0] in Q35_DEVICES:
            name, *props = arg.split(",")
            if any(p not in Q35_DEVICES[name] for p in props):
                return opts, f"{w} {arg}"
            opts += ["--device", name]
        elif w == "-enable-kvm":         # kvmsys is KVM
            i += 1
            continue
        else:
            return opts, f"{w} {arg}".strip()
        i += 2
    return opts, None


def verdict_of(status: int | None) -> str:
    if status is not None and status & 1:
        code = status >> 1
        return "PASS" if code == 0 else "SKIP" if code == 77 else "FAIL"
    return "FAIL"


def _why_skip(test: Test, kut_dir: str, named: bool) -> str | None:
    if test.arch and test.arch != "x86_64":
        return f"arch {test.arch} (this is an x86_64 build)"
    if "nodefault" in test.groups and not named:
        return "nodefault group"
    for chk in test.check:
        path, _, want = chk.partition("=")
        try:
            with open(path, encoding="ascii") as f:
                if f.read().strip() != want:
                    return f"host check {chk} not met"
        except OSError:
            return f"host check {chk}: {path} absent"
    if not os.path.exists(os.path.join(kut_dir, "x86", test.file)):
        return f"x86/{test.file} not built"
    try:
        expand_args(test.test_args)
    except InvalidArgumentError as e:
        return str(e)
    return None


def command(test: Test, kut_dir: str, vmm: str, abi: str, timeout: float) -> tuple[list[str], str | None]:
    kernel = os.path.join(kut_dir, "x86", test.file)
    args = expand_args(test.test_args)
    if vmm == "qemu":
        cmd = ["qemu-system-x86_64", *QEMU_BASE, "-kernel", kernel, "-smp", str(test.smp),
               *shlex.split(test.qemu_params)]
        if args:
            cmd += ["-append", args]
        return cmd, None
    opts, why = kvmsys_options(test)
    # QEMU's Multiboot loader (as GRUB) puts the kernel's file name first on its command line:
    # the suite's argv[0]; its test names and options follow
    cmd = [sys.executable, "-m", "kvmsys", "run", "--kernel", kernel, "--abi", abi, "--vcpus", str(test.smp),
           "--test-device", "--serial", "stdio", "--timeout", str(timeout), *opts,
           "--append", f"{kernel} {args}".rstrip()]
    return cmd, why


def run_test(test: Test, kut_dir: str, *, vmm: str = "kvmsys", abi: str = "sys", timeout_cap: float | None = None,
             named: bool = False) -> Result:
    why = _why_skip(test, kut_dir, named)
    if why:
        return Result(test.name, "SKIP", None, why, 0.0)
    timeout = test.timeout if timeout_cap is None else min(test.timeout, timeout_cap)
    cmd, unsupported = command(test, kut_dir, vmm, abi, timeout)
    if unsupported:
        return Result(test.name, "SKIP", None, f"kvmsys cannot honour {unsupported}", 0.0)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 5.0,
                           check=False)
        out, status = (p.stdout + p.stderr).decode("utf-8", "replace"), p.returncode
        errors = [ln for ln in p.stderr.decode("utf-8", "replace").splitlines() if "warning" not in ln.lower()]
    except subprocess.TimeoutExpired as e:
        out, status = ((e.stdout or b"") + (e.stderr or b"")).decode("utf-8", "replace"), None
        errors = []
    elapsed = time.monotonic() - t0

    def ran(verdict: str, detail: str) -> Result:
        return Result(test.name, verdict, status, detail, elapsed, out, cmd)
    if status is None or (vmm == "kvmsys" and "DEADLINE" in _summary(out)):
        return ran("TIMEOUT", f"no result in {timeout:g} s")
    if vmm == "kvmsys" and not _summary(out):
        # kvmsys run prints its summary however the guest ended: without it, kvmsys itself failed
        # (a Python error also exits with status 1, which must not read as the guest's PASS)
        return ran("FAIL", f"kvmsys failed: {(errors or [''])[-1][:160]}")
    if vmm == "qemu" and status == 1 and errors:
        # as the suite's qemu_fixup_return_code: status 1 with errors (not warnings) is QEMU's own failure
        return ran("FAIL", f"QEMU failed: {errors[0][:160]}")
    return ran(verdict_of(status), _detail(out, vmm))


def _summary(out: str) -> str:
    """kvmsys run's summary line (it may follow a guest's unfinished last line)."""
    found = re.findall(r"--- \S.* over the \w+ ABI on .*$", out, re.M)
    return found[-1] if found else ""


def _detail(out: str, vmm: str) -> str:
    summary = [ln for ln in out.splitlines() if ln.startswith("SUMMARY:")]
    if summary:
        return summary[-1]
    if vmm == "kvmsys" and _summary(out):
        return _summary(out)
    tail = [ln for ln in out.splitlines() if ln.strip()]
    return tail[-1][:200] if tail else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmsys.kut", description=__doc__.split("\n\n")[0])
    p.add_argument("kut_dir", help="a built kvm-unit-tests tree")
    p.add_argument("tests", nargs="*", help="test names from x86/unittests.cfg (default: all)")
    p.add_argument("--vmm", choices=("kvmsys", "qemu"), default="kvmsys")
    p.add_argument("--abi", choices=("fd", "sys"), default="sys")
    p.add_argument("--timeout-cap", type=float, help="at most this many seconds per test")
    p.add_argument("--log", metavar="DIR", help="write each test's output to DIR/NAME.log")
    args = p.parse_args(argv)
    tests = parse_cfg(os.path.join(args.kut_dir, "x86", "unittests.cfg"))
    if args.tests:
        known = {t.name for t in tests}
        unknown = [n for n in args.tests if n not in known]
        if unknown:
            p.error(f"not in unittests.cfg: {', '.join(unknown)}")
        tests = [t for t in tests if t.name in args.tests]
    if args.log:
        os.makedirs(args.log, exist_ok=True)
    failed = 0
    for t in tests:
        r = run_test(t, args.kut_dir, vmm=args.vmm, abi=args.abi, timeout_cap=args.timeout_cap,
                     named=bool(args.tests))
        print(f"{r.verdict:7} {r.test:40} {r.seconds:6.1f}s  {r.detail}", flush=True)
        failed += r.verdict in ("FAIL", "TIMEOUT")
        if args.log and r.output:
            with open(os.path.join(args.log, f"{r.test}.log"), "w", encoding="utf-8") as f:
                f.write(" ".join(shlex.quote(c) for c in r.command) + "\n" + r.output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
