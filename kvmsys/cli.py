"""The kvmsys command line: info, guests, run, bench."""
from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import TYPE_CHECKING, Any, ContextManager, TextIO

from .errors import CapabilityError, KvmOSError, KvmsysError

if TYPE_CHECKING:
    from .pc import Pc
    from .runner import RunResult


def _cmd_info(args: argparse.Namespace) -> int:
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


def _cmd_guests(args: argparse.Namespace) -> int:
    from .guests import GUESTS
    width = max(map(len, GUESTS))
    for name, g in sorted(GUESTS.items()):
        print(f"{name:{width}}  {g.description}")
    return 0


def _print_result(r: RunResult, out: TextIO | None = None) -> None:
    """The console (to stdout), then the run's summary to *out* (stdout by default)."""
    if r.console:
        sys.stdout.write(r.console.decode("utf-8", "replace"))
        if not r.console.endswith(b"\n"):
            sys.stdout.write("\n")
    out = sys.stdout if out is None else out
    sys.stdout.flush()
    status = "none" if r.status is None else str(r.status)
    print(f"--- {r.guest} over the {r.abi} ABI on {r.vcpus} vCPU(s): {r.reason}, exit status {status}, "
          f"{r.elapsed_s * 1e3:.1f} ms{' (64-bit native on PVM)' if r.native64 else ''}", file=out)
    total = sum(r.exits.values())
    print(f"exits: {total} (" + ", ".join(f"{k} {v}" for k, v in sorted(r.exits.items())) + ")", file=out)
    if r.port_counts:
        print("unhandled ports: " + ", ".join(f"{p:#x}×{n}" for p, n in sorted(r.port_counts.items())), file=out)


class UsageError(Exception):
    """A user error the CLI reports in one line (exit status 2)."""


def read_image(path: str, limit: int) -> bytes:
    """The bytes of a regular file of 1..limit bytes, opened so that nothing blocks (a
    FIFO, a device) and nothing is read past the size checked first (/dev/zero)."""
    from .hostfiles import open_checked
    fd, size = open_checked(path)       # InvalidArgumentError: one line, exit status 2
    try:
        if not 0 < size <= limit:
            raise UsageError(f"{path} has {size} bytes: expected 1 .. {limit}")
        chunks, left = [], size
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


_UNITS = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}


def _memory(text: str) -> int:
    """argparse type of --memory: a size in bytes from MiB (a bare number, as QEMU's -m) or
    with a unit: 512M, 1G, 2048K (binary multiples; a trailing B or iB is allowed)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t[-1:] in ("K", "M", "G", "T") else (t, "")
    try:
        value = int(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 128, 512M, 1G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value << _UNITS[unit]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


KERNEL_MAX = 256 << 20      # kernels, initrds and modules read by --kernel, --initrd, --module


def _serial(spec: str) -> Any:
    """--serial: None (collect), or a sink with attach(pc) and close()."""
    from . import terminal
    if spec == "collect":
        return None
    if spec == "stdio":
        return terminal.Stdio()
    if spec.startswith("file:") and len(spec) > 5:
        return _FileOutput("--serial", spec[5:])
    raise UsageError(f"--serial {spec!r}: expected stdio, file:PATH or collect")


class _FileOutput:
    """--serial file:PATH (appended to) and --debug-log PATH (emptied first): what the
    guest writes, to the file as it comes.  Its errors are the user's: a write error
    ends the run (the runner raises it when the run has ended) as a one-line UsageError."""

    def __init__(self, option: str, path: str, truncate: bool = False) -> None:
        from .terminal import FileSink
        self.option, self.path = option, path
        try:
            self.file = FileSink(path, truncate=truncate)
        except OSError as e:
            raise UsageError(f"{option}: cannot open {path}: {e.strerror}") from None

    def __call__(self, data: bytes) -> None:
        try:
            self.file(data)
        except OSError as e:
            raise UsageError(f"{self.option}: cannot write {self.path}: {e.strerror}") from None

    def attach(self, pc: Pc) -> None:
        pass

    def close(self) -> None:
        self.file.close()


def _read(path: str) -> bytes:
    return read_image(path, KERNEL_MAX)


def _run_pc(args: argparse.Namespace, image: bytes | None, gdb: Any = None) -> RunResult:
    """--firmware or --kernel: the PC of kvmsys.pc."""
    from . import runner, terminal
    disk, readonly = None, False
    if args.disk:
        disk, _, opt = args.disk.partition(",")
        if opt not in ("", "readonly"):
            raise UsageError(f"--disk {args.disk!r}: expected FILE or FILE,readonly")
        readonly = opt == "readonly"
    sink = _serial(args.serial)
    debug = None
    attach = [x.attach for x in (sink, terminal.Screen() if args.screen else None) if x is not None]
    timeout = args.timeout
    if timeout is None:
        timeout = None if args.serial == "stdio" else 10.0     # an interactive session has no deadline
    common = dict(abi=args.abi, timeout=timeout, memory_size=args.memory, irqchip=args.irqchip == "kernel",
                  disk=disk, disk_readonly=readonly, serial=sink, gdb=gdb,
                  until=args.until.encode() if args.until else None, pit=not args.no_pit,
                  cpuid=_cpu_hook(args.cpu),
                  on_start=(lambda pc: [a(pc) for a in attach]) if attach else None)
    try:
        if args.debug_log:
            debug = _FileOutput("--debug-log", args.debug_log, truncate=True)
        common["debug_sink"] = debug
        if args.kernel:
            modules = []
            for spec in args.module or ():
                path, _, margs = spec.partition(",")
                modules.append((_read(path), margs or path))
            return runner.run_kernel(_read(args.kernel), cmdline=args.append or "", modules=modules,
                                     initrd=_read(args.initrd) if args.initrd else None, label=args.kernel,
                                     vcpus=args.vcpus, test_device=args.test_device, machine=args.machine,
                                     devices=tuple(args.device or ()), **common)
        assert image is not None            # --firmware (read by _cmd_run)
        return runner.run_firmware(image, label=args.firmware, vcpus=args.vcpus,
                                   no_reboot=args.no_reboot, **common)
    finally:
        for f in (sink, debug):
            if f is not None:
                f.close()


def _cpu_hook(spec: str | None) -> Any:
    """--cpu: a cpuid hook, or None."""
    if spec is None:
        return None
    from .errors import InvalidArgumentError
    from .pc import cpu_features
    try:
        return cpu_features(spec)
    except InvalidArgumentError as e:
        raise UsageError(f"--cpu: {e}") from None


def _gdb_server(args: argparse.Namespace) -> ContextManager[Any]:
    """The gdb server --gdb asks for (it says where it listens), or a no-op context."""
    import contextlib
    if args.gdb is None:
        return contextlib.nullcontext()
    from .gdb import GdbServer
    address, wait = args.gdb, True
    if address.endswith(",nowait"):
        address, wait = address[:-len(",nowait")], False
    server = GdbServer(address, vcpus=1 if args.firmware or args.kernel else args.vcpus, wait=wait)
    print(f"kvmsys: gdb server listening on {server.address}; "
          f"{'the guest waits for gdb' if wait else 'the guest runs, gdb may attach at any time'} "
          f"(gdb -ex 'target remote {server.address}')", file=sys.stderr, flush=True)
    return server


# Options that apply to one kind of run only: given elsewhere (not at the parser's
# default) they would be silently ignored, so they are refused.
_PC_ONLY = ("disk", "serial", "irqchip", "screen", "memory", "no_reboot", "until", "debug_log", "cpu", "no_pit")
_KERNEL_ONLY = ("append", "initrd", "module", "test_device", "machine", "device")
_GUEST_ONLY = ("n",)


def _check_applicable(args: argparse.Namespace) -> None:
    kind = "--guest" if args.guest else "--firmware" if args.firmware else "--kernel"
    scopes = ((_PC_ONLY, "--firmware and --kernel", kind != "--guest"), (_KERNEL_ONLY, "--kernel", kind == "--kernel"),
              (_GUEST_ONLY, "--guest", kind == "--guest"))
    for options, where, applies in scopes:
        for dest in options:
            if not applies and getattr(args, dest) != args.default_of(dest):
                raise UsageError(f"--{dest.replace('_', '-')} applies to {where}, not to {kind}")


def _cmd_run(args: argparse.Namespace) -> int:
    _check_applicable(args)
    from . import platform, runner
    image = read_image(args.firmware, platform.MAX_FIRMWARE_SIZE) if args.firmware else None
    with _gdb_server(args) as gdb:
        if args.firmware or args.kernel:
            r = _run_pc(args, image, gdb)
            if args.serial != "collect":
                r.console = b""         # already shown as it came
        else:
            inputs = {}
            if args.n is not None:
                inputs["n"] = args.n
            r = runner.run_guest(args.guest, abi=args.abi, vcpus=args.vcpus,
                                 timeout=10.0 if args.timeout is None else args.timeout, gdb=gdb, **inputs)
    # with the terminal on stdio, stdout is the guest's alone: the summary goes to stderr
    _print_result(r, sys.stderr if getattr(args, "serial", None) == "stdio" else None)
    if r.status is not None:
        return int(r.status) & 0xFF      # a process exit status is 8 bits (QEMU truncates it too)
    return 0 if r.ok or r.reason in ("QUIT", "RESET", "MATCHED", "POWEROFF") else 2     # as QEMU: quit, -no-reboot


def _cmd_bench(args: argparse.Namespace) -> int:
    # The harness is a layer above the library: found through its entry point
    # (kvmsys_bench, installed with kvmsys), never imported by name from here.
    from importlib.metadata import entry_points
    found = entry_points(group="kvmsys.commands", name="bench")
    if not found:
        print("kvmsys: the benchmark harness is not installed (pip install kvmsys, "
              "or python -m benchmarks from a checkout)", file=sys.stderr)
        return 2
    return int(next(iter(found)).load()(args.rest, prog="kvmsys bench"))


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    p = argparse.ArgumentParser(prog="kvmsys", description="Real vCPUs on Linux KVM.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    i = sub.add_parser("info", help="host KVM: API version, flavour, capabilities, /dev/kvm access")
    i.add_argument("--all", action="store_true", help="also list absent capabilities")
    i.set_defaults(fn=_cmd_info)
    g = sub.add_parser("guests", help="list the built-in guests")
    g.set_defaults(fn=_cmd_guests)
    r = sub.add_parser("run", help="run a built-in guest or a raw firmware image to completion")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--guest", help="built-in guest name (see `kvmsys guests`)")
    what.add_argument("--firmware", help="raw firmware image (e.g. SeaBIOS), started at the reset vector "
                      "of a PC (see the PC options below)")
    what.add_argument("--kernel", help="a Linux bzImage or a Multiboot kernel, loaded and entered with no "
                      "firmware on the same PC")
    r.add_argument("--abi", choices=("fd", "sys"), default="sys", help="which ABI drives the vCPUs")
    r.add_argument("--vcpus", type=_positive, default=1, help="number of vCPUs (one thread each)")
    r.add_argument("--timeout", type=_seconds, help="seconds before the watchdog stops it (default 10; "
                   "none for firmware with --serial stdio)")
    r.add_argument("--n", type=int, help="iteration count input of loop/compute guests")
    r.add_argument("--gdb", metavar="ADDRESS[,nowait]",
                   help="serve gdb on HOST:PORT (port 0: any free one) or a Unix socket path; the "
                        "guest waits for gdb before its first instruction (QEMU's -s -S), or with "
                        ",nowait runs at once and stops when gdb attaches (QEMU's -s)")
    pcg = r.add_argument_group("the PC of --firmware and --kernel")
    pcg.add_argument("--append", metavar="CMDLINE", help="--kernel: its command line")
    pcg.add_argument("--initrd", metavar="FILE", help="--kernel (Linux): the initial RAM disk")
    pcg.add_argument("--module", action="append", metavar="FILE[,CMDLINE]",
                     help="--kernel: a Multiboot module, with its command line (repeatable)")
    pcg.add_argument("--test-device", action="store_true",
                     help="--kernel: QEMU's pc-testdev (ports 0xe0-0xe7 and the IRQ lines at 0x2000), "
                          "which kvm-unit-tests uses")
    pcg.add_argument("--cpu", metavar="+FEATURE,-FEATURE",
                     help="set or clear CPUID features of every vCPU (x2apic, tsc-deadline, pcid, invpcid, "
                          "umip, pku, xsave, rdtscp)")
    pcg.add_argument("--no-pit", action="store_true", help="no PIT (QEMU's -machine pit=off)")
    pcg.add_argument("--machine", choices=("pc", "q35"), default="pc",
                     help="--kernel: pc (default), or q35: the split irqchip with a user-space IOAPIC and "
                          "the --device options (as QEMU's -M q35,kernel-irqchip=split)")
    pcg.add_argument("--device", action="append", choices=("edu", "intel-iommu"), metavar="edu|intel-iommu",
                     help="--kernel --machine q35: QEMU's edu PCI device, or an Intel IOMMU (VT-d, "
                          "intremap=on, eim=off) with a DMAR table (repeatable)")
    pcg.add_argument("--disk", metavar="FILE[,readonly]", help="raw disk image on the ATA primary master")
    pcg.add_argument("--serial", default="collect", metavar="stdio|file:PATH|collect",
                     help="the UART: the terminal (Ctrl-A x quits), a file, or collected and printed "
                          "at the end (default)")
    pcg.add_argument("--irqchip", nargs="?", const="kernel", default="kernel", choices=("kernel", "none"),
                     help="KVM's in-kernel PIC, IOAPIC, LAPIC and PIT (default), or none: a PIT in "
                          "kvmsys and no interrupts")
    pcg.add_argument("--screen", action="store_true", help="print the VGA text page (0xB8000) when it changes")
    pcg.add_argument("--memory", type=_memory, default=128 << 20, metavar="SIZE",
                     help="RAM size: MiB, or with a unit (512M, 1G); default 128M")
    pcg.add_argument("--no-reboot", action="store_true", help="a guest reset ends the run")
    pcg.add_argument("--until", metavar="TEXT", help="end the run once the serial or debug console shows TEXT")
    pcg.add_argument("--debug-log", metavar="PATH",
                     help="write the debug console (0xe9, 0x402) to PATH as the firmware writes it")
    r.set_defaults(fn=_cmd_run, default_of=r.get_default)     # for _check_applicable
    b = sub.add_parser("bench", help="benchmark both ABIs on built-in guests (python -m benchmarks)",
                       add_help=False)
    b.set_defaults(fn=_cmd_bench)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:       # everything after "bench" belongs to the benchmark's parser
            return _cmd_bench(argparse.Namespace(rest=argv[1:]))
        args = p.parse_args(argv)
        if args.cmd is None:        # a bare `kvmsys`: what it can do
            p.print_help()
            return 0
        status = _run(args)
        sys.stdout.flush()          # a closed pipe shows here, not in the interpreter's exit
        return status
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


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.fn(args))
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
