"""A VM over either ABI: the one adapter that the runner, the benchmarks and the tests share.

Only two things differ between the ABIs, and they are all this class hides: how a thread
gets its vCPU (`attach`: `vm.create_vcpu(i)` or `add_vcpu()`, which binds the calling
thread) and how it runs it (`runner`: `vcpu.run` or `kvmsys.run`).  Memory, devices and
guest loading are the same code for both.

    with Machine("sys", irqchip=True) as m:
        vcpu = m.attach()                  # this thread's vCPU
        m.load("hello.pm32", vcpu)
        ex = m.runner(vcpu)(timeout=5)     # the ABI's own entry point, no wrapper

For the syscall ABI the machine is a fresh process VM (`syscall.fresh_vm`) for its
lifetime: one such machine at a time per process.
"""
from __future__ import annotations

from typing import Any, Callable

from . import platform, pvm, syscall
from .enums import Kind
from .errors import InvalidArgumentError
from .fd import Kvm, Vm
from .guests import get as get_guest, layout

ABIS = ("fd", "sys")


def setup_devices(vm: Vm) -> None:
    """The runner's devices: PC ports, MMIO reads as all-ones, HLT re-enters."""
    platform.install_pc_ports(vm)
    vm.set_default(platform.MMIO, Kind.IGNORE)
    vm.set_hlt_action(Kind.IGNORE)    # no irqchip: HLT just re-enters (hlt loops count exits)


def check_abi(abi: str) -> str:
    if abi not in ABIS:
        raise InvalidArgumentError(f"abi must be one of {ABIS}, not {abi!r}")
    return abi


class Machine:
    """One VM over *abi* ("fd" or "sys"): RAM at 0 (or a PC memory map around *firmware*),
    optionally the in-kernel irqchip (+ PIT; "split": the local APICs only) and the runner's
    devices.  *kvm*: an open `Kvm` to create the fd VM from (kept open); by default the
    machine opens its own.

    `vcpu` and `run` are the first attached vCPU and its ABI's entry point (one-vCPU use)."""

    def __init__(self, abi: str = "fd", *, memory_size: int = layout.RAM_SIZE, irqchip: bool | str = False,
                 pit: bool = False, firmware: bytes | None = None, devices: bool = False,
                 kvm: Kvm | None = None) -> None:
        self.abi = check_abi(abi)
        # (None only before _make() and after close(): Any, so users need no checks)
        self.vcpu: Any = None
        self._run: Any = None
        self.native = False         # a 64-bit guest was loaded to run natively (PVM host)
        self._kvm: Kvm | None = None
        self._scope: Any = None
        self.vm: Any = None
        self.mem: Any = None
        try:
            self._make(memory_size, irqchip, pit, firmware, devices, kvm)
        except BaseException:
            self.close()
            raise

    def _make(self, memory_size: int, irqchip: bool | str, pit: bool, firmware: bytes | None, devices: bool,
              kvm: Kvm | None) -> None:
        if self.abi == "fd":
            if kvm is None:
                kvm = self._kvm = Kvm()
            self.vm = kvm.create_vm()
            self.vm.create_interrupt_controllers(irqchip, pit, "a guest that takes interrupts")
            self.mem = self.vm.add_memory(0, 0, memory_size) if firmware is None else None
        else:
            self._scope = syscall.fresh_vm(memory_size=4096 if firmware is not None else memory_size,
                                           pc_ports=False, irqchip=irqchip, pit=pit)
            self.vm = self._scope.__enter__()
            if firmware is None:
                self.mem = self.vm.memory(0)
            else:
                self.vm.remove_memory(0)    # the firmware's PC memory map replaces the default slot
                self.mem = None
        if firmware is not None:
            platform.load_firmware(self.vm, firmware, ram_size=memory_size)
        if devices:
            setup_devices(self.vm)

    # --- what differs between the ABIs -------------------------------------------------
    def attach(self, i: int = 0) -> Any:
        """A vCPU for the calling thread.  fd ABI: `vm.create_vcpu(i)`; syscall ABI:
        `add_vcpu()` binds it to this thread (its id is the lowest free one)."""
        if self.abi == "fd":
            vcpu = self.vm.create_vcpu(i)
        else:
            syscall.add_vcpu()
            vcpu = syscall.current()
        if self.vcpu is None:
            self.vcpu, self._run = vcpu, self.runner(vcpu)
        return vcpu

    @property
    def run(self) -> Any:
        """The first attached vCPU's run entry point (`vcpu.run` or `kvmsys.run`)."""
        return self._run

    def runner(self, vcpu: Any) -> Callable[..., Any]:
        """The ABI's own run entry point for *vcpu* (no wrapper: what a user calls)."""
        return vcpu.run if self.abi == "fd" else syscall.run

    def detach(self, vcpu: Any) -> None:
        """Give the vCPU up (syscall ABI: `remove_vcpu()` if this thread still holds it)."""
        if self.abi == "sys" and syscall.current() is vcpu:
            syscall.remove_vcpu()

    # --- shared ------------------------------------------------------------------------
    def load(self, guest_name: str, vcpu: Any = None, *, native: bool = True, **inputs: int) -> bool:
        """Load built-in guest *guest_name* for *vcpu* (default: the first one).  A 64-bit
        guest runs natively on a PVM host when *native*; returns whether it does."""
        vcpu = vcpu if vcpu is not None else self.vcpu
        guest = get_guest(guest_name)
        on = native and guest.mode == "long64" and pvm.enable_native(vcpu, layout.PVM_PAGE)
        layout.prepare(guest, vcpu, self.mem, **inputs)
        self.native = self.native or on
        return on

    def counter(self) -> int:
        """The guest's count of exit-causing instructions (u32 at layout.COUNTER_ADDR)."""
        return int.from_bytes(self.mem[layout.COUNTER_ADDR:layout.COUNTER_ADDR + 4], "little")

    def devices(self) -> "Machine":
        setup_devices(self.vm)
        return self

    def close(self) -> None:
        if self.vcpu is not None:
            self.detach(self.vcpu)
        self.vcpu = self._run = None
        self.mem = None
        if self._scope is not None:
            scope, self._scope = self._scope, None
            scope.__exit__(None, None, None)
        elif self.abi == "fd" and self.vm is not None:
            self.vm.close()
            if self._kvm is not None:
                self._kvm.close()
        self.vm = None

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
