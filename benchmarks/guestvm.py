"""Guest VMs for the benchmarks (kvmsys.machine over either ABI) with switchable exit handling.

Setup (VM, memory, vCPU, guest image) is never what is measured; it is here so
that every suite builds its machines the same way.
"""
from __future__ import annotations

from kvmsys import pvm
from kvmsys.enums import Kind, Space
from kvmsys.fd import Vm
from kvmsys.guests import get as get_guest
from kvmsys.guests import layout
from kvmsys.machine import Machine

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
    HLT: IGNORE (re-entered in C) or PYTHON with noop_handler as its callback."""
    space = EXIT_KINDS[kind][2]
    action = Kind.IGNORE if how == "c" else Kind.PYTHON
    if space is None:
        vm.set_hlt_action(action, noop_handler if how == "python" else None)
    else:
        vm.set_default(space, action)
        vm.default_handler = noop_handler if how == "python" else None


def one_vcpu(abi: str, guest_name: str | None = None, *, kvm=None, **inputs) -> Machine:
    """A fresh machine over *abi* with vCPU 0 attached to this thread, running *guest_name*."""
    m = Machine(abi, kvm=kvm)
    try:
        m.attach(0)
        if guest_name:
            m.load(guest_name, **inputs)
    except BaseException:
        m.close()
        raise
    return m


def guest_counter(mem) -> int:
    """A built-in guest's u32 count of exit-causing instructions, read from its memory
    (what Machine.counter() reads for a Machine)."""
    return int.from_bytes(mem[layout.COUNTER_ADDR:layout.COUNTER_ADDR + 4], "little")


def guest_name(base: str, mode: str) -> str:
    return f"{base}.{mode}"


def mode_label(mode: str, native: bool) -> str:
    label = f"{mode} ({MODE_LABELS.get(mode, mode)}"
    if native:
        label += ", native on this PVM host"
    elif pvm.host_flavour() == "PVM":
        label += ", run by KVM's instruction emulator on this PVM host"
    return label + ")"


def paired_pvm_page(vcpu_id: int) -> int:
    """vCPU *vcpu_id*'s page (>= 1) for PVM's native-mode MSR: pages above the built-in
    images, which nothing writes (layout.PVM_PAGE is vCPU 0's)."""
    page = layout.IMAGE_LIMIT + (vcpu_id - 1) * 0x1000
    if not 1 <= vcpu_id or page + 0x1000 > layout.RAM_SIZE:
        raise ValueError(f"no PVM page for vCPU {vcpu_id} in the built-in layout")
    return page


class PairedFd:
    """An fd-ABI vCPU in the kernel VM of *sysg*, a syscall-ABI Machine: a `Vm` over a
    duplicate of the process VM's fd (`Vm.from_raw_fd`) and vCPU *vcpu_id* of it, set up
    for *guest_name* in the same memory.  The two ABIs' loops then run vCPUs of one VM,
    so a comparison of them carries no VM-to-VM difference.  The guest's counter in
    memory is shared: it counts both vCPUs' exits.  Prepare it before either vCPU runs
    (prepare() writes the guest's data page)."""

    def __init__(self, sysg: Machine, kvm, guest_name: str, vcpu_id: int = 1, **inputs):
        self.vm = Vm.from_raw_fd(kvm, sysg.vm.fileno())
        try:
            self.vcpu = self.vm.create_vcpu(vcpu_id)
            self.run = self.vcpu.run
            self.mem = sysg.mem
            guest = get_guest(guest_name)
            self.native = guest.mode == "long64" and pvm.enable_native(self.vcpu, paired_pvm_page(vcpu_id))
            layout.prepare(guest, self.vcpu, self.mem, **inputs)
        except BaseException:
            self.close()
            raise

    def counter(self) -> int:
        return guest_counter(self.mem)

    def close(self) -> None:
        vcpu, self.vcpu = getattr(self, "vcpu", None), None
        if vcpu is not None:
            vcpu.close()
        self.vm.close()         # our duplicate of the fd: the kernel VM is the process VM's
