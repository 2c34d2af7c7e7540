"""The kvmsys command line: info, guests, run, bench."""
from __future__ import annotations

import argparse
import os
import stat
import sys

from .errors import CapabilityError, KvmOSError, KvmsysError


def _cmd_info(args) -> int:
    from . import __version__, pvm
    from .fd import Kvm
    print(f"kvmsys {__version__}")
    try:
        st = os.stat("/dev/kvm")
        print(f"/dev/kvm: mode {stat.filemode(st.st_mode)}, uid {st.st_uid}, gid {st.st_gid}, "
              f"{'readable and writable' if os.access('/dev/kvm', os.R_OK | os.W_OK) else 'NOT accessible'} by this user")
    except FileNotFoundError:
        print("/dev/kvm: missing")
    with Kvm() as kvm:
        print(f"KVM API version: {kvm.api_version()}")
        print(f"host KVM flavour: {pvm.host_flavour()}")
        print(f"vCPU mmap size: {kvm.vcpu_mmap_size()} bytes")
        caps = kvm.capabilities()
        present = {k: v for k, v in caps.items() if v}
        print(f"capabilities: {len(present)} of {len(caps)} known to this build are present")
        if args.all:
            rows = caps.items()
        else:
            rows = present.items()
        width = max(len(k) for k, _ in rows)
        print(f"  {'capability':{width}}  value")
        for name, value in rows:
            print(f"  {name:{width}}  {value}")
    return 0


def _cmd_guests(args) -> int:
    from .guests import GUESTS
    width = max(map(len, GUESTS))
    for name, g in sorted(GUESTS.items()):
        print(f"{name:{width}}  {g.description}")
    return 0


def _print_result(r) -> None:
    if r.console:
        sys.stdout.write(r.console.decode("utf-8", "replace"))
        if not r.console.endswith(b"\n"):
            sys.stdout.write("\n")
    status = "none" if r.status is None else str(r.status)
    print(f"--- {r.guest} over the {r.abi} ABI on {r.vcpus} vCPU(s): {r.reason}, exit status {status}, "
          f"{r.elapsed_s * 1e3:.1f} ms{' (64-bit native on PVM)' if r.native64 else ''}")
    total = sum(r.exits.values())
    print(f"exits: {total} (" + ", ".join(f"{k} {v}" for k, v in sorted(r.exits.items())) + ")")
    if r.port_counts:
        print("unhandled ports: " + ", ".join(f"{p:#x}×{n}" for p, n in sorted(r.port_counts.items())))


class UsageError(Exception):
    """A user error the CLI reports in one line (exit status 2)."""


def read_image(path: str, limit: int) -> bytes:
    """The bytes of a regular file of 1..limit bytes, opened so that nothing blocks (a
    FIFO, a device) and nothing is read past the size checked first (/dev/zero)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")
        if not 0 < st.st_size <= limit:
            raise UsageError(f"{path} has {st.st_size} bytes: expected 1 .. {limit}")
        chunks, left = [], st.st_size
        while left:
            chunk = os.read(fd, left)
            if not chunk:
                break           # truncated meanwhile: the run refuses what is short
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _seconds(text: str) -> float:
    """argparse type of --timeout: finite, non-negative seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and non-negative: {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _gdb_server(args):
    """The gdb server --gdb asks for (it says where it listens), or a no-op context."""
    import contextlib
    if args.gdb is None:
        return contextlib.nullcontext()
    from .gdb import GdbServer
    server = GdbServer(args.gdb, vcpus=1 if args.firmware else args.vcpus)
    print(f"kvmsys: gdb server listening on {server.address}; the guest waits for gdb "
          f"(gdb -ex 'target remote {server.address}')", file=sys.stderr, flush=True)
    return server


def _cmd_run(args) -> int:
    from . import platform, runner
    image = read_image(args.firmware, platform.MAX_FIRMWARE_SIZE) if args.firmware else None
    with _gdb_server(args) as gdb:
        if args.firmware:
            r = runner.run_firmware(image, abi=args.abi, timeout=args.timeout, label=args.firmware,
                                    gdb=gdb)
        else:
            inputs = {}
            if args.n is not None:
                inputs["n"] = args.n
            r = runner.run_guest(args.guest, abi=args.abi, vcpus=args.vcpus, timeout=args.timeout,
                                 gdb=gdb, **inputs)
    _print_result(r)
    if r.status is not None:
        return r.status & 0xFF      # a process exit status is 8 bits (QEMU truncates it too)
    return 0 if r.ok else 2


def _cmd_bench(args) -> int:
    # The harness is a layer above the library: found through its entry point
    # (kvmsys_bench, installed with kvmsys), never imported by name from here.
    from importlib.metadata import entry_points
    found = entry_points(group="kvmsys.commands", name="bench")
    if not found:
        print("kvmsys: the benchmark harness is not installed (pip install kvmsys, "
              "or python -m benchmarks from a checkout)", file=sys.stderr)
        return 2
    return next(iter(found)).load()(args.rest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvmsys", description="Real vCPUs on Linux KVM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="host KVM: API version, flavour, capabilities, /dev/kvm access")
    i.add_argument("--all", action="store_true", help="also list absent capabilities")
    i.set_defaults(fn=_cmd_info)
    g = sub.add_parser("guests", help="list the built-in guests")
    g.set_defaults(fn=_cmd_guests)
    r = sub.add_parser("run", help="run a built-in guest or a raw firmware image to completion")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--guest", help="built-in guest name (see `kvmsys guests`)")
    what.add_argument("--firmware", help="raw firmware image, started at the reset vector")
    r.add_argument("--abi", choices=("fd", "sys"), default="sys", help="which ABI drives the vCPUs")
    r.add_argument("--vcpus", type=_positive, default=1, help="number of vCPUs (one thread each)")
    r.add_argument("--timeout", type=_seconds, default=10.0, help="seconds before the watchdog stops it")
    r.add_argument("--n", type=int, help="iteration count input of loop/compute guests")
    r.add_argument("--gdb", metavar="ADDRESS",
                   help="serve gdb on HOST:PORT (port 0: any free one) or a Unix socket path; "
                        "the guest waits for gdb before its first instruction")
    r.set_defaults(fn=_cmd_run)
    b = sub.add_parser("bench", help="benchmark both ABIs on built-in guests (python -m benchmarks)",
                       add_help=False)
    b.set_defaults(fn=_cmd_bench)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:       # everything after "bench" belongs to the benchmark's parser
            return _cmd_bench(argparse.Namespace(rest=argv[1:]))
        args = p.parse_args(argv)
        return _run(args)
    except BrokenPipeError:
        # the reader went away (`kvmsys guests | head -1`): end quietly, as a program
        # killed by SIGPIPE would; stdout points at /dev/null so the final flush is silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13
    except KeyboardInterrupt:
        print("kvmsys: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"kvmsys: {e}", file=sys.stderr)
        return 2
    except CapabilityError as e:
        print(f"kvmsys: {e}", file=sys.stderr)
        return 3
    except KvmOSError as e:
        print(f"kvmsys: {e}", file=sys.stderr)
        return 3
    except KvmsysError as e:
        print(f"kvmsys: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
