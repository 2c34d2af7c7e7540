"""One runner over either ABI: load a guest, run it on N vCPUs (one thread each),
collect its console output, exit status and exit counts.

Only two things differ between the ABIs, and they are the two small classes
below: how a thread gets its vCPU and how it runs it.  Everything else (memory,
devices, CPU setup, the drive loop) is shared.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from . import _core, platform, pvm, syscall
from .errors import InvalidArgumentError
from .fd import Kvm
from .guests import get as get_guest, layout

ABIS = ("fd", "sys")
_K = _core.H_KINDS


@dataclass
class RunResult:
    """What a run produced."""
    guest: str
    abi: str
    vcpus: int
    status: int | None          # isa-debug-exit status, None if the guest did not stop that way
    reason: str                 # STOP, SHUTDOWN, DEADLINE, INTERNAL_ERROR, ...
    console: bytes
    exits: dict = field(default_factory=dict)         # by reason, all vCPUs
    port_counts: dict = field(default_factory=dict)   # ports with no handler: {port: accesses}
    elapsed_s: float = 0.0
    native64: bool = False      # 64-bit guest ran natively on a PVM host
    debug: bytes = b""          # firmware: what it wrote to the debug console (0xe9, 0x402)
    resets: int = 0             # firmware: guest resets the run went through

    @property
    def ok(self) -> bool:
        return self.reason == "STOP"


# Exits after which a vCPU cannot go on.
_TERMINAL = {"SHUTDOWN", "INTERNAL_ERROR", "FAIL_ENTRY", "SYSTEM_EVENT", "DEADLINE", "UNKNOWN"}


def _drive(run, deadline: float) -> _core.Exit:
    """Run until the guest stops, fails, or the deadline passes."""
    while True:
        remaining = deadline - time.monotonic()
        ex = run(timeout=max(remaining, 0.0))
        if isinstance(ex, (_core.StopExit, _core.DeadlineExit)) or ex.name in _TERMINAL:
            return ex
        if isinstance(ex, (_core.IoExit, _core.MmioExit)):
            continue        # an access no handler took; reads already answered with all-ones
        if remaining <= 0:
            return ex


def setup_devices(vm) -> None:
    """The runner's devices: PC ports, MMIO reads as all-ones, HLT re-enters."""
    platform.install_pc_ports(vm)
    vm.set_default(platform.MMIO, _K["IGNORE"])
    vm.set_hlt_action(_K["IGNORE"])     # no irqchip: HLT just re-enters (hlt loops count exits)


def _memory(vm, memory_size: int, firmware: bytes | None):
    """RAM at 0 for a guest (its view); none for firmware, whose PC (kvmsys.pc) maps it."""
    if firmware is None:
        return vm.add_memory(0, 0, memory_size)
    return None


class _FdAbi:
    name = "fd"

    def __init__(self, memory_size: int, irqchip: bool, firmware: bytes | None = None):
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        if irqchip:
            self.vm.require("IRQCHIP", "a guest that takes interrupts")
            self.vm.create_irqchip()
        self.mem = _memory(self.vm, memory_size, firmware)
        setup_devices(self.vm)

    def attach(self, i: int):
        return self.vm.create_vcpu(i)

    def run(self, vcpu):
        return vcpu.run

    def detach(self, vcpu) -> None:
        pass

    def close(self) -> None:
        self.vm.close()
        self.kvm.close()


class _SysAbi:
    name = "sys"

    def __init__(self, memory_size: int, irqchip: bool, firmware: bytes | None = None):
        # a fresh process VM for this run
        self._scope = syscall.fresh_vm(memory_size=4096 if firmware else memory_size,
                                       pc_ports=False, irqchip=irqchip)
        self.vm = self._scope.__enter__()
        if firmware:
            self.vm.remove_memory(0)    # the firmware's PC memory map replaces the default slot
        self.mem = _memory(self.vm, memory_size, firmware) if firmware else self.vm.memory(0)
        setup_devices(self.vm)

    def attach(self, i: int):
        syscall.add_vcpu()
        return syscall.current()

    def run(self, vcpu):
        return syscall.run

    def detach(self, vcpu) -> None:
        syscall.remove_vcpu()

    def close(self) -> None:
        del self.mem
        self._scope.__exit__(None, None, None)


def _feed_interrupts(mem, handles, vector: int, n: int, deadline: float, done) -> None:
    """Send *n* interrupts to each vCPU through its handle, one at a time: the next only
    once the guest counted the last (a second one sent before would merge with it)."""
    def u32(addr):
        return int.from_bytes(mem[addr:addr + 4], "little")

    def wait(cond) -> bool:
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


def run_guest(name: str, *, abi: str = "fd", vcpus: int = 1, timeout: float = 10.0,
              memory_size: int = layout.RAM_SIZE, **inputs) -> RunResult:
    """Run built-in guest *name* over *abi* on *vcpus* threads until it stops."""
    if abi not in ABIS:
        raise InvalidArgumentError(f"abi must be one of {ABIS}, not {abi!r}")
    if vcpus < 1:
        raise InvalidArgumentError("vcpus must be at least 1")
    guest = get_guest(name)
    irqchip = bool(guest.expect.get("irqchip"))
    if vcpus > 1 and irqchip and "cpu" not in {p.name for p in guest.params}:
        # with the in-kernel irqchip, vCPUs other than 0 wait for INIT/SIPI that it never sends
        raise InvalidArgumentError(f"{name} is a uniprocessor guest: run it with vcpus=1")
    machine = (_FdAbi if abi == "fd" else _SysAbi)(memory_size, irqchip)
    results: list = [None] * vcpus
    errors: list = []
    stats: list = []
    native = [False] * vcpus
    setup_lock = threading.Lock()
    # A guest that waits for interrupts from the host (irq_count) gets them from a feeder thread.
    vector = guest.expect.get("vector")
    handles: list = [None] * vcpus
    done = threading.Event()
    ready = threading.Barrier(vcpus + (1 if vector else 0))
    deadline = time.monotonic() + timeout

    def feeder() -> None:
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        count = {p.name: p.default for p in guest.params}
        count.update(inputs)
        _feed_interrupts(machine.mem, handles, vector, count.get("n", 1), deadline, done)

    def worker(i: int) -> None:
        vcpu = None
        try:
            vcpu = machine.attach(i)
            with setup_lock:
                if guest.mode == "long64" and not irqchip:
                    # PVM's native mode does not deliver interrupts to the guest: stay emulated
                    native[i] = pvm.enable_native(vcpu, layout.PVM_PAGE)
                per_cpu = {p.name: v for p in guest.params
                           for v in [{"cpu": i, "ncpus": vcpus}.get(p.name)] if v is not None}
                layout.prepare(guest, vcpu, machine.mem, **{**inputs, **per_cpu})
                handles[i] = vcpu.handle()
            ready.wait()
            results[i] = _drive(machine.run(vcpu), deadline)
            stats.append(vcpu.stats())
        except BaseException as e:          # reported to the caller below
            errors.append(e)
            ready.abort()
        finally:
            if vcpu is not None:
                machine.detach(vcpu)

    t0 = time.monotonic()
    feed = threading.Thread(target=feeder, name="interrupts") if vector else None
    try:
        if feed is not None:
            feed.start()
        if vcpus == 1:
            worker(0)
        else:
            threads = [threading.Thread(target=worker, args=(i,), name=f"vcpu{i}") for i in range(vcpus)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        done.set()
        if feed is not None:
            feed.join()
        elapsed = time.monotonic() - t0
        if errors:
            raise errors[0]
        first = results[0]
        exits = Counter()
        for s in stats:
            exits.update(s["exits"])
        return RunResult(
            guest=name, abi=abi, vcpus=vcpus,
            status=first.status if isinstance(first, _core.StopExit) else None,
            reason=first.name, console=machine.vm.console(), exits=dict(exits),
            port_counts=machine.vm.port_counts(), elapsed_s=elapsed, native64=any(native))
    finally:
        machine.close()


def run_firmware(image: bytes, *, abi: str = "fd", timeout: float | None = 10.0,
                 memory_size: int = 16 << 20, label: str = "firmware", vcpus: int = 1,
                 irqchip: bool = False, disk: str | None = None, disk_readonly: bool = False,
                 serial=None, no_reboot: bool = False, cpuid=None, on_start=None,
                 until: bytes | None = None) -> RunResult:
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
    few ms)."""
    from .pc import Pc
    if abi not in ABIS:
        raise InvalidArgumentError(f"abi must be one of {ABIS}, not {abi!r}")
    if vcpus < 1:
        raise InvalidArgumentError("vcpus must be at least 1")
    deadline = None if timeout is None else time.monotonic() + timeout
    machine = (_FdAbi if abi == "fd" else _SysAbi)(memory_size, irqchip, firmware=image)
    pc = None
    try:
        pc = Pc(machine.vm, image, ram_size=memory_size, cpus=vcpus, disk=disk,
                disk_readonly=disk_readonly, serial_sink=serial, cpuid=cpuid)
        results: list = [None] * vcpus
        errors: list = []
        stats: list = []
        setup_lock = threading.Lock()
        ready = threading.Barrier(vcpus)

        def remaining():
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        def worker(i: int) -> None:
            vcpu = None
            try:
                vcpu = machine.attach(i)
                with setup_lock:
                    pc.add_vcpu(vcpu)
                ready.wait()
                results[i] = _drive_pc(pc, machine.run(vcpu), vcpu, remaining, no_reboot)
                stats.append(vcpu.stats())
            except BaseException as e:          # reported to the caller below
                errors.append(e)
                ready.abort()
                pc.stop("ERROR")
            finally:
                if vcpu is not None:
                    machine.detach(vcpu)

        t0 = time.monotonic()
        if on_start is not None:
            on_start(pc)
        if until is not None:
            threading.Thread(target=_watch, args=(pc, bytes(until)), name="until", daemon=True).start()
        if vcpus == 1:
            worker(0)
        else:
            threads = [threading.Thread(target=worker, args=(i,), name=f"vcpu{i}") for i in range(vcpus)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        elapsed = time.monotonic() - t0
        if errors:
            raise errors[0]
        first = results[0]
        exits = Counter()
        for s in stats:
            exits.update(s["exits"])
        return RunResult(guest=label, abi=abi, vcpus=vcpus,
                         status=first.status if isinstance(first, _core.StopExit) else None,
                         reason=first if isinstance(first, str) else first.name,
                         console=bytes(pc.uart.output), debug=machine.vm.console(), exits=dict(exits),
                         port_counts=machine.vm.port_counts(), elapsed_s=elapsed, resets=pc.resets)
    finally:
        if pc is not None:
            pc.close()
        machine.close()


def _watch(pc, pattern: bytes) -> None:
    """Stop *pc* once its serial output or debug console contains *pattern*."""
    while not pc.finished.wait(0.005):
        if pattern in pc.uart.output or pattern in pc.vm.console():
            pc.stop("MATCHED")
            return


def _drive_pc(pc, run, vcpu, remaining, no_reboot: bool):
    """One vCPU of a PC until the run ends: an Exit, or the reason the PC stopped (a str)."""
    while True:
        left = remaining()
        ex = run(timeout=left)
        if ex.name == "SHUTDOWN":               # a triple fault resets a PC
            pc.request_reset("triple fault")
        if pc.pending == "reset" and not no_reboot:
            pc.synchronized_reset(vcpu, left)
            continue
        if pc.pending is not None:
            return "RESET" if pc.pending == "reset" else pc.pending
        if isinstance(ex, (_core.StopExit, _core.DeadlineExit)) or ex.name in _TERMINAL:
            pc.stop(ex.name)                    # the other vCPUs end too
            return ex
        if left == 0.0:
            pc.stop("DEADLINE")
            return ex
