"""Guest VMs for the benchmarks, over either ABI, with switchable exit handling.

Setup (VM, memory, vCPU, guest image) is never what is measured; it is here so
that every suite builds its machines the same way.
"""
from __future__ import annotations

import contextlib

import kvmsys
from kvmsys import _core, pvm, syscall
from kvmsys.enums import Kind, Space
from kvmsys.guests import get as get_guest, layout

PIO, MMIO = Space.PIO, Space.MMIO

# Exit kinds measured by the suites: guest base name, label, address space (None = HLT).
EXIT_KINDS = {
    "pio_out": ("pio_out_loop", "PIO out", PIO),
    "pio_in": ("pio_in_loop", "PIO in", PIO),
    "mmio_write": ("mmio_write_loop", "MMIO write", MMIO),
    "mmio_read": ("mmio_read_loop", "MMIO read", MMIO),
    "hlt": ("hlt_loop", "HLT", None),
}

MODE_LABELS = {"real": "16-bit real mode", "pm32": "flat 32-bit protected mode",
               "long64": "64-bit long mode"}


def noop_handler(exit_) -> None:
    """The trivial Python handler: look at nothing, let the guest go on."""
    return None


def set_handling(vm, kind: str, how: str) -> None:
    """Handle exit *kind* in the C loop ("c") or by a Python callback ("python").

    Uses the VM's default action for unhandled accesses, which can be switched
    between repetitions: "c" = IGNORE (writes dropped, reads all-ones, handled in
    the C run loop), "python" = PYTHON with vm.default_handler = noop_handler.
    HLT: IGNORE (re-entered in C) or PYTHON (run() returns every HLT)."""
    space = EXIT_KINDS[kind][2]
    action = Kind.IGNORE if how == "c" else Kind.PYTHON
    if space is None:
        vm.set_hlt_action(action)
    else:
        vm.set_default(space, action)
        vm.default_handler = noop_handler if how == "python" else None


def load(vcpu, mem, guest_name: str, **inputs) -> bool:
    """Load a built-in guest; returns True if a 64-bit guest runs natively (PVM host)."""
    guest = get_guest(guest_name)
    native = False
    if guest.mode == "long64":
        native = pvm.enable_native(vcpu, layout.PVM_PAGE)
    layout.prepare(guest, vcpu, mem, **inputs)
    return native


def read_counter(mem) -> int:
    """The guest's count of exit-causing instructions (u32 at COUNTER_ADDR)."""
    return int.from_bytes(mem[layout.COUNTER_ADDR:layout.COUNTER_ADDR + 4], "little")


class FdGuest:
    """A fresh fd-ABI VM with one vCPU running a built-in guest."""
    abi = "fd"

    def __init__(self, kvm, guest_name: str | None = None, **inputs):
        self.vm = kvm.create_vm()
        self.mem = self.vm.add_memory(0, 0, layout.RAM_SIZE)
        self.vcpu = self.vm.create_vcpu(0)
        self.run = self.vcpu.run
        self.native = load(self.vcpu, self.mem, guest_name, **inputs) if guest_name else False
        self.exits = 0             # exits the benchmark loops counted on this vCPU

    def counter(self) -> int:
        return read_counter(self.mem)

    def close(self) -> None:
        self.mem = None
        self.vm.close()


@contextlib.contextmanager
def process_vm(**options):
    """A fresh process VM (syscall ABI) for the duration; the old configuration is restored."""
    with syscall.fresh_vm(**{**dict(memory_size=layout.RAM_SIZE, pc_ports=False), **options}) as vm:
        yield vm


class SysGuest:
    """The calling thread's syscall-ABI vCPU, in the process VM (which must exist)."""
    abi = "sys"

    def __init__(self, guest_name: str | None = None, **inputs):
        kvmsys.add_vcpu()
        self.vm = kvmsys.vm()
        self.mem = self.vm.memory(0)
        self.vcpu = kvmsys.current()
        self.run = kvmsys.run
        self.native = load(self.vcpu, self.mem, guest_name, **inputs) if guest_name else False
        self.exits = 0

    def counter(self) -> int:
        return read_counter(self.mem)

    def close(self) -> None:
        self.mem = None
        if kvmsys.current() is self.vcpu:
            kvmsys.remove_vcpu()


def guest_name(base: str, mode: str) -> str:
    return f"{base}.{mode}"


def mode_label(mode: str, native: bool) -> str:
    label = f"{mode} ({MODE_LABELS.get(mode, mode)}"
    if native:
        label += ", native on this PVM host"
    elif pvm.host_flavour() == "PVM":
        label += ", run by KVM's instruction emulator on this PVM host"
    return label + ")"
