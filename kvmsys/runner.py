"""One runner over either ABI: load a guest, run it on N vCPUs (one thread each),
collect its console output, exit status and exit counts.

The VM over either ABI is `kvmsys.machine.Machine`; this module only drives it.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Sequence

from . import _core, platform, pvm
from .errors import ArgumentTypeError, InvalidArgumentError, KvmsysError
from .guests import get as get_guest, layout
from .machine import ABIS, Machine, check_abi
from .machine import setup_devices as setup_devices     # re-exported: README's quick start uses it

if TYPE_CHECKING:
    from .pc import CpuidHook, Pc

Run = Callable[..., Any]            # an ABI's run entry point: run(timeout=) -> Exit


@dataclass
class RunResult:
    """What a run produced."""
    guest: str
    abi: str
    vcpus: int
    status: int | None          # isa-debug-exit status, None if the guest did not stop that way
    reason: str                 # STOP, SHUTDOWN, DEADLINE, INTERNAL_ERROR, ...
    console: bytes
    exits: dict[str, int] = field(default_factory=dict)         # by reason, all vCPUs
    port_counts: dict[int, int] = field(default_factory=dict)   # ports with no handler: {port: accesses}
    elapsed_s: float = 0.0
    native64: bool = False      # 64-bit guest ran natively on a PVM host
    debug: bytes = b""          # firmware: what it wrote to the debug console (0xe9, 0x402)
    resets: int = 0             # firmware: guest resets the run went through

    @property
    def ok(self) -> bool:
        return self.reason == "STOP"


# Exits after which a vCPU cannot go on.
_TERMINAL = {"SHUTDOWN", "INTERNAL_ERROR", "FAIL_ENTRY", "SYSTEM_EVENT", "DEADLINE", "UNKNOWN"}


def _drive(run: Run, deadline: Callable[[], float]) -> _core.Exit:
    """Run until the guest stops, fails, or the deadline (a function) passes."""
    while True:
        remaining = deadline() - time.monotonic()
        ex: _core.Exit = run(timeout=max(remaining, 0.0))
        if isinstance(ex, (_core.StopExit, _core.DeadlineExit, _core.KickExit)) or ex.name in _TERMINAL:
            return ex       # a kick is how the runner stops its vCPUs early (Ctrl-C)
        if isinstance(ex, (_core.IoExit, _core.MmioExit)):
            continue        # an access no handler took; reads already answered with all-ones
        if remaining <= 0:
            return ex


def _feed_interrupts(mem: memoryview, handles: Sequence[Any], vector: int, n: int, deadline: float,
                     done: threading.Event) -> None:
    """Send *n* interrupts to each vCPU through its handle, one at a time: the next only
    once the guest counted the last (a second one sent before would merge with it)."""
    def u32(addr: int) -> int:
        return int.from_bytes(mem[addr:addr + 4], "little")

    def wait(cond: Callable[[], bool]) -> bool:
        while not cond():
            if done.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    if not wait(lambda: u32(layout.SMP_READY_ADDR) == 1):     # the guest enabled its LAPIC
        return
    for i, h in enumerate(handles):
        for k in range(n):
            h.interrupt(vector)
            if not wait(lambda: u32(layout.IRQ_COUNTS_ADDR + 4 * i) > k):
                return


def _debugged(gdb: Any, vcpu: Any, run: Run, deadline: float, host_stop: Callable[[], str | None] | None = None
              ) -> tuple[ContextManager[Run], Callable[[], float]]:
    """*run* and its deadline function, under the gdb server if there is one: time the
    guest spends stopped in the debugger does not count against the timeout.
    *host_stop()*: why the host ends the run, or None (see GdbServer.attach)."""
    if gdb is None:
        return contextlib.nullcontext(run), lambda: deadline
    return gdb.attach(vcpu, run, host_stop), lambda: deadline + gdb.parked_seconds(vcpu.id)


def _check_run_args(abi: str, timeout: object) -> None:
    check_abi(abi)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise ArgumentTypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 <= timeout < float("inf"):
        raise InvalidArgumentError(f"timeout must be finite non-negative seconds, not {timeout!r}")


def _check_pc_args(abi: str, timeout: object) -> None:
    """As _check_run_args; a PC run may also have no deadline (timeout None)."""
    if timeout is None:
        check_abi(abi)
    else:
        _check_run_args(abi, timeout)


class _Crew:
    """The vCPU threads of one run, one per vCPU (vCPU 0 runs in the calling thread when it
    is the only one): each attaches its vCPU, sets it up under a common lock, waits for the
    others, then runs it (under the gdb server if there is one) until the run ends."""

    def __init__(self, machine: Machine, vcpus: int, *, setup: Callable[[int, Any], None],
                 drive: Callable[[Run, Any, Callable[[], float]], Any], gdb: Any, deadline: float,
                 parties: int = 0, host_stop: Callable[[], str | None] | None = None) -> None:
        self.machine, self.setup, self.drive, self.gdb, self.deadline = machine, setup, drive, gdb, deadline
        self.host_stop = host_stop
        self.results: list[Any] = [None] * vcpus
        self.errors: list[BaseException] = []
        self.stats: list[dict[str, Any]] = []
        self.setup_lock = threading.Lock()
        self.ready = threading.Barrier(vcpus + parties)         # *parties*: other threads that wait too
        self.finished = [threading.Event() for _ in range(vcpus)]   # vCPU given up (see run())

    def _worker(self, i: int, on_error: Callable[[], object]) -> None:
        vcpu = None
        try:
            vcpu = self.machine.attach(i)
            with self.setup_lock:
                self.setup(i, vcpu)
            self.ready.wait()
            debugged, until = _debugged(self.gdb, vcpu, self.machine.runner(vcpu), self.deadline,
                                        self.host_stop)
            with debugged as run:
                self.results[i] = self.drive(run, vcpu, until)
            self.stats.append(vcpu.stats())
        except BaseException as e:          # reported to the caller by outcome()
            self.errors.append(e)
            self.ready.abort()
            on_error()
        finally:
            try:
                if vcpu is not None:
                    self.machine.detach(vcpu)
            finally:
                self.finished[i].set()

    def run(self, *, stop: Callable[[], object], on_error: Callable[[], object] = lambda: None) -> None:
        """Run every vCPU until each has ended.  If the caller is interrupted (Ctrl-C lands
        in the main thread only) *stop()* makes every vCPU thread leave its run loop, then
        this waits until each has given its vCPU up before it re-raises: not with
        Thread.join(), since after a join that Ctrl-C interrupted CPython 3.11 counts the
        thread as stopped although it still runs, but for each thread's own event."""
        if len(self.results) == 1:
            self._worker(0, on_error)
            return
        threads: list[threading.Thread] = []
        try:
            for i in range(len(self.results)):
                t = threading.Thread(target=self._worker, args=(i, on_error), name=f"vcpu{i}")
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
        except BaseException:
            self.ready.abort()      # threads not yet past it never run
            stop()
            for done in self.finished[:len(threads)]:
                done.wait()
            raise

    def outcome(self) -> tuple[Any, dict[str, int], int | None]:
        """Raise the first worker error; else (vCPU 0's result, the exit counts of all vCPUs
        by reason, the isa-debug-exit status or None)."""
        if self.errors:
            raise self.errors[0]
        exits: Counter[str] = Counter()
        for s in self.stats:
            exits.update(s["exits"])
        first = self.results[0]
        return first, dict(exits), first.status if isinstance(first, _core.StopExit) else None


def _kick_all(handles: Iterable[Any]) -> None:
    for h in handles:
        if h is not None:
            try:
                h.kick()        # their run() returns KickExit and _drive returns it
            except KvmsysError:
                pass            # already removed: that thread is ending anyway


def run_guest(name: str, *, abi: str = "fd", vcpus: int = 1, timeout: float = 10.0,
              memory_size: int = layout.RAM_SIZE, gdb: Any = None, **inputs: int) -> RunResult:
    """Run built-in guest *name* over *abi* on *vcpus* threads until it stops.

    gdb: a kvmsys.gdb.GdbServer made for *vcpus* vCPUs; the guest then waits for gdb
    before its first instruction."""
    _check_run_args(abi, timeout)
    if not isinstance(vcpus, int) or isinstance(vcpus, bool):
        raise ArgumentTypeError(f"vcpus must be an int, not {type(vcpus).__name__}")
    if not 1 <= vcpus <= layout.SMP_MAX_CPUS:
        raise InvalidArgumentError(f"vcpus must be 1..{layout.SMP_MAX_CPUS}, not {vcpus}")
    guest = get_guest(name)
    irqchip = bool(guest.expect.get("irqchip"))
    if vcpus > 1 and irqchip and "cpu" not in {p.name for p in guest.params}:
        # with the in-kernel irqchip, vCPUs other than 0 wait for INIT/SIPI that it never sends
        raise InvalidArgumentError(f"{name} is a uniprocessor guest: run it with vcpus=1")
    machine = Machine(abi, memory_size=memory_size, irqchip=irqchip, devices=True)
    native = [False] * vcpus
    # A guest that waits for interrupts from the host (irq_count) gets them from a feeder thread.
    vector = guest.expect.get("vector")
    handles: list[Any] = [None] * vcpus
    done = threading.Event()

    def setup(i: int, vcpu: Any) -> None:
        per_cpu = {p.name: v for p in guest.params
                   for v in [{"cpu": i, "ncpus": vcpus}.get(p.name)] if v is not None}
        # PVM's native mode does not deliver interrupts to the guest, nor debug exits: stay emulated
        native_ok = not irqchip and (gdb is None or pvm.NATIVE_GUEST_DEBUG)
        native[i] = machine.load(name, vcpu, native=native_ok, **{**inputs, **per_cpu})
        handles[i] = vcpu.handle()

    crew = _Crew(machine, vcpus, setup=setup, drive=lambda run, vcpu, until: _drive(run, until), gdb=gdb,
                 deadline=time.monotonic() + timeout, parties=1 if vector else 0,
                 host_stop=lambda: "INTERRUPTED" if done.is_set() else None)

    def feeder() -> None:
        try:
            crew.ready.wait()
        except threading.BrokenBarrierError:
            return
        count = {p.name: p.default for p in guest.params}
        count.update(inputs)
        assert vector is not None               # (the feeder runs only for such guests)
        _feed_interrupts(machine.mem, handles, vector, count.get("n", 1), crew.deadline, done)

    def stop() -> None:
        done.set()
        _kick_all(handles)      # handles are set before the barrier: threads past it have one

    t0 = time.monotonic()
    feed = threading.Thread(target=feeder, name="interrupts") if vector else None
    try:
        if feed is not None:
            feed.start()
        crew.run(stop=stop)
        done.set()
        if feed is not None:
            feed.join()
        elapsed = time.monotonic() - t0
        first, exits, status = crew.outcome()
        return RunResult(guest=name, abi=abi, vcpus=vcpus, status=status, reason=first.name,
                         console=machine.vm.console(), exits=exits, port_counts=machine.vm.port_counts(),
                         elapsed_s=elapsed, native64=any(native))
    finally:
        machine.close()


def run_firmware(image: bytes, *, abi: str = "fd", timeout: float | None = 10.0,
                 memory_size: int = 16 << 20, label: str = "firmware", vcpus: int = 1,
                 irqchip: bool = False, disk: str | None = None, disk_readonly: bool = False,
                 serial: Callable[[bytes], object] | None = None, no_reboot: bool = False,
                 cpuid: CpuidHook | None = None, on_start: Callable[[Pc], object] | None = None,
                 until: bytes | None = None, debug_sink: Callable[[bytes], object] | None = None,
                 gdb: Any = None, pit: bool = True) -> RunResult:
    """Boot a raw firmware image (SeaBIOS, or any image entered at the reset vector F000:FFF0)
    on a PC (kvmsys.pc) over *abi*, on *vcpus* threads, until it stops, the deadline
    (*timeout* seconds, None: none) passes or something calls ``pc.stop()``.

    serial: a callable receiving the UART's output as it comes (it is also collected in
    ``RunResult.console``; the debug console 0xe9/0x402 in ``RunResult.debug``).
    disk: a raw image on the ATA primary master.  no_reboot: a guest reset ends the run
    (reason "RESET") instead of restarting the firmware.  cpuid: a hook
    ``cpuid(entries, vcpu_id) -> entries``.  on_start: called with the Pc before the
    vCPUs start (e.g. to connect a terminal to ``pc.uart``).  until: end the run (reason
    "MATCHED") once the serial or the debug console shows these bytes (looked for every
    few ms).  debug_sink: a callable receiving what the firmware writes to the debug
    console as it comes (every few ms, and the rest when the run ends, however it ends).
    gdb: as for run_guest (one vCPU).  pit: False for none (QEMU's -machine pit=off)."""
    from .pc import Pc, check_cpus
    _check_pc_args(abi, timeout)
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"firmware image must be bytes, not {type(image).__name__}")
    if not 0 < len(image) <= platform.MAX_FIRMWARE_SIZE:
        raise InvalidArgumentError(f"firmware image of {len(image)} bytes: expected 1 byte .. 16 MiB")
    check_cpus(vcpus)
    if gdb is not None and vcpus != 1:
        raise InvalidArgumentError("the gdb server debugs firmware on one vCPU")
    machine = Machine(abi, memory_size=memory_size, firmware=image, devices=True, irqchip=irqchip)
    return _run_pc(machine, lambda: Pc(machine.vm, image, ram_size=memory_size, cpus=vcpus, disk=disk,
                                       map_memory=False, disk_readonly=disk_readonly, serial_sink=serial,
                                       cpuid=cpuid, pit=pit),
                   label=label, vcpus=vcpus, timeout=timeout, no_reboot=no_reboot, on_start=on_start,
                   until=until, debug_sink=debug_sink, gdb=gdb)


def run_kernel(kernel: bytes, *, cmdline: str = "", modules: Sequence[tuple[bytes, str]] = (),
               initrd: bytes | None = None, abi: str = "fd",
               timeout: float | None = 10.0,
               memory_size: int = 128 << 20, label: str = "kernel", irqchip: bool = False,
               disk: str | None = None, disk_readonly: bool = False,
               serial: Callable[[bytes], object] | None = None, cpuid: CpuidHook | None = None,
               on_start: Callable[[Pc], object] | None = None, until: bytes | None = None,
               debug_sink: Callable[[bytes], object] | None = None, gdb: Any = None, vcpus: int = 1,
               pit: bool = True, test_device: bool = False, machine: str = "pc",
               devices: Iterable[str] = ()) -> RunResult:
    """Boot a kernel with no firmware: RAM from 0, the PC's devices, ACPI tables, and
    either a Linux bzImage (kvmsys.loaders.linux: 64-bit entry, *cmdline*, *initrd*) or a
    Multiboot (v1) kernel (kvmsys.loaders.multiboot: 32-bit protected mode, *cmdline*,
    *modules* as [(bytes, command line)]).  vCPU 0 enters the kernel; with *vcpus* > 1
    (needs *irqchip*) the others wait for the INIT and SIPI the kernel sends through its
    local APIC, as on a PC.  *pit*: KVM's in-kernel PIT (or kvmsys's without the irqchip);
    *test_device*: QEMU's pc-testdev.  *machine* "q35" (needs *irqchip*): kvmsys.q35's
    machine, on the split irqchip, with *devices* ("edu", "intel-iommu").  Other arguments
    as for run_firmware; a guest reset ends the run (there is no firmware to restart)."""
    from .loaders import enter_linux, enter_multiboot, is_bzimage, load_linux, load_multiboot
    from .pc import Pc, check_cpus
    from .q35 import check as check_machine
    _check_pc_args(abi, timeout)
    check_cpus(vcpus)
    devices = check_machine(machine, devices)
    if machine == "q35" and not irqchip:
        raise InvalidArgumentError("the q35 machine needs the irqchip (its local APICs in the kernel)")
    if gdb is not None and vcpus != 1:
        raise InvalidArgumentError("the gdb server debugs a kernel on one vCPU")
    if not isinstance(kernel, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"kernel image must be bytes, not {type(kernel).__name__}")
    linux = is_bzimage(kernel)
    if linux and modules:
        raise InvalidArgumentError("modules are for Multiboot kernels; a Linux kernel takes an initrd")
    if not linux and initrd is not None:
        raise InvalidArgumentError("an initrd is for a Linux bzImage; a Multiboot kernel takes modules")
    vm_machine = Machine(abi, memory_size=memory_size, devices=True,
                         irqchip="split" if machine == "q35" else irqchip)
    try:
        if linux:
            entry, info = load_linux(vm_machine.mem, kernel, cmdline=cmdline, initrd=initrd)
        else:
            entry, info = load_multiboot(vm_machine.mem, kernel, cmdline=cmdline, modules=modules)
    except BaseException:
        vm_machine.close()
        raise
    enter = enter_linux if linux else enter_multiboot
    return _run_pc(vm_machine, lambda: Pc(vm_machine.vm, None, ram_size=memory_size, cpus=vcpus, disk=disk,
                                          map_memory=False, disk_readonly=disk_readonly, serial_sink=serial,
                                          cpuid=cpuid, pit=pit, test_device=test_device, machine=machine,
                                          devices=devices),
                   label=label, vcpus=vcpus, timeout=timeout, no_reboot=True, on_start=on_start, until=until,
                   debug_sink=debug_sink, gdb=gdb, prepare=lambda vcpu: enter(vcpu, entry, info))


def _run_pc(machine: Machine, make_pc: Callable[[], Pc], *, label: str, vcpus: int, timeout: float | None,
            no_reboot: bool, on_start: Callable[[Pc], object] | None, until: bytes | None,
            debug_sink: Callable[[bytes], object] | None, gdb: Any,
            prepare: Callable[[Any], object] | None = None) -> RunResult:
    """Run a PC on *machine* (closed at the end) on *vcpus* threads: the part of
    run_firmware and run_kernel that is the same.  *prepare(vcpu)* sets up vCPU 0."""
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    pc = None
    try:
        if debug_sink is not None and not callable(debug_sink):
            raise ArgumentTypeError(f"debug_sink must be callable, not {type(debug_sink).__name__}")
        pc = make_pc()

        def setup(i: int, vcpu: Any) -> None:
            pc.add_vcpu(vcpu)
            if i == 0 and prepare is not None:
                prepare(vcpu)

        crew = _Crew(machine, vcpus, setup=setup, gdb=gdb, deadline=deadline,
                     drive=lambda run, vcpu, until_fn: _drive_pc(pc, run, vcpu, until_fn, no_reboot),
                     host_stop=lambda: None if pc.pending is None else
                     "RESET" if pc.pending == "reset" and no_reboot else pc.pending)
        t0 = time.monotonic()
        if on_start is not None:
            on_start(pc)
        with _Watcher(pc, None if until is None else bytes(until), debug_sink):
            crew.run(stop=lambda: pc.stop("INTERRUPTED"), on_error=lambda: pc.stop("ERROR"))
        elapsed = time.monotonic() - t0
        first, exits, status = crew.outcome()
        return RunResult(guest=label, abi=machine.abi, vcpus=vcpus, status=status,
                         reason=first if isinstance(first, str) else first.name,
                         console=bytes(pc.uart.output), debug=machine.vm.console(), exits=exits,
                         port_counts=machine.vm.port_counts(), elapsed_s=elapsed, resets=pc.resets)
    finally:
        if pc is not None:
            pc.close()
        machine.close()


class _Watcher:
    """One thread that looks at a running PC every few ms: it passes what the firmware
    wrote to the debug console (0xe9, 0x402) since the last look to *debug_sink*, and
    stops the PC (reason "MATCHED") once the serial or the debug console shows *until*.
    Each look reads only the new bytes.  Leaving the ``with`` block stops the thread and
    drains the debug console once more, so the sink misses nothing however the run ended;
    an error of the sink ends the run and is raised there."""
    PERIOD_S = 0.005

    def __init__(self, pc: Pc, until: bytes | None, debug_sink: Callable[[bytes], object] | None) -> None:
        self.pc, self.until, self.sink = pc, until, debug_sink
        self.debug_seen = 0         # debug console bytes read so far
        self.serial_seen = 0        # serial bytes searched so far
        self.tail = b""             # the debug console's last len(until) - 1 bytes: a match may span looks
        self.error: BaseException | None = None
        self.stopping, self.exited = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Watcher:
        if self.until is not None or self.sink is not None:
            self.thread = threading.Thread(target=self._loop, name="watch", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self.thread is None:
            return
        self.stopping.set()
        self.exited.wait()          # not join(): see _Crew.run
        try:
            if self.error is not None:
                raise self.error
            self.look(final=True)
        except Exception:
            if exc_type is None:    # else the run's own error goes first
                raise

    def _loop(self) -> None:
        try:
            while not self.stopping.wait(self.PERIOD_S):
                self.look()
        except BaseException as e:  # raised by __exit__
            self.error = e
            self.pc.stop("ERROR")
        finally:
            self.exited.set()

    def look(self, final: bool = False) -> None:
        new = self.pc.vm.console(start=self.debug_seen)
        self.debug_seen += len(new)
        if new and self.sink is not None:
            self.sink(new)
        if self.until is None or final:
            return
        keep = len(self.until) - 1
        out = self.pc.uart.output
        end = len(out)              # a vCPU thread may append meanwhile: search what was there
        hit = out.find(self.until, max(0, self.serial_seen - keep), end) >= 0
        self.serial_seen = end
        if new:
            seen = self.tail + new
            hit = hit or self.until in seen
            self.tail = seen[-keep:] if keep else b""
        if hit:
            self.pc.stop("MATCHED")


def _drive_pc(pc: Pc, run: Run, vcpu: Any, deadline: Callable[[], float], no_reboot: bool) -> Any:
    """One vCPU of a PC until the run ends: an Exit, or the reason the PC stopped (a str).
    *deadline*: a function (the gdb server moves it), inf for none."""
    while True:
        remaining = deadline() - time.monotonic()
        left = None if remaining == float("inf") else max(remaining, 0.0)
        ex = run(timeout=left)
        if ex.name == "IOAPIC_EOI" and pc.q35 is not None:     # split irqchip: the IOAPIC is ours
            pc.q35.eoi(ex.vector)
            continue
        if ex.name == "SHUTDOWN":               # a triple fault resets a PC
            pc.request_reset("triple fault")
        if pc.pending == "reset" and not no_reboot:
            pc.synchronized_reset(vcpu, left)
            continue
        if pc.pending == "suspend":             # S3: back when the machine wakes, or the run ends
            pc.synchronized_resume(vcpu, deadline())
            if pc.pending is None:
                continue
        if pc.pending is not None:
            return "RESET" if pc.pending == "reset" else pc.pending
        if isinstance(ex, (_core.StopExit, _core.DeadlineExit)) or ex.name in _TERMINAL:
            pc.stop(ex.name)                    # the other vCPUs end too
            return ex
        if left == 0.0:
            pc.stop("DEADLINE")
            return ex
