"""Built-in guest programs: flat binaries (bin/, built from src/ by build.py) plus metadata.

Each guest exists in three modes: real (16-bit real mode), pm32 (flat 32-bit
protected mode, no paging) and long64 (64-bit long mode, identity-mapped).
`layout.prepare(guest, vcpu, mem, n=...)` loads one into a VM.

Exit protocol shared by all guests (ports/addresses from layout):
- loop guests count each exit-causing instruction in the u32 at COUNTER_ADDR
  (before executing it), and after N iterations write 0 to PORT_DEBUG_EXIT
  (status 1) and halt forever;
- a CPU exception writes EXC_EXIT_BASE | vector to PORT_DEBUG_EXIT and halts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import InvalidArgumentError
from . import layout
from .layout import (COM1_BASE, COMPUTE_SEED, LOAD_ADDR, MMIO_READ_ADDR, MMIO_WRITE_ADDR,
                     PORT_DEBUG_EXIT, PORT_DEBUGCON, PORT_IN, PORT_OUT, PORT_RESULT)

MODES = tuple(layout.MODE_BITS)


@dataclass(frozen=True)
class Param:
    """One guest input, passed in register `reg` (a key of vcpu.get_regs())."""
    name: str
    reg: str
    default: int
    doc: str
    bits: int = 32


@dataclass(frozen=True)
class Guest:
    name: str            # "<base>.<mode>", also the bin/ file stem
    mode: str            # 'real' | 'pm32' | 'long64'
    description: str
    load_addr: int       # guest-physical address of image[0]
    entry: int           # guest-physical RIP at start
    params: tuple[Param, ...] = ()
    # Outcome with default inputs. Keys (only those that apply):
    #   exit_value / exit_status: byte written to PORT_DEBUG_EXIT, (v << 1) | 1
    #   exit: per-iteration exit {'kind': 'pio_out'|'pio_in'|'mmio_write'|'mmio_read'|'hlt',
    #         'port'/'addr', 'size'}; iterations: N; serial: text on COM1;
    #   result / result_port: compute's 32-bit result and the port it goes to
    expect: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def base(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def image(self) -> bytes:
        # Cached without functools.cached_property: before Python 3.12 its lock is one
        # for all guests, and a fork child forked while another thread held it hung.
        image = self.__dict__.get("_image")
        if image is None:
            image = layout.read_bin(self.name)
            object.__setattr__(self, "_image", image)
        return image


class UnknownGuestError(InvalidArgumentError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def exit_status(value: int) -> int:
    """isa-debug-exit status for a byte written to PORT_DEBUG_EXIT."""
    return (value << 1) | 1


def compute_reference(n: int, seed: int = COMPUTE_SEED) -> int:
    """What the compute guest reports for N rounds."""
    x = seed
    for _ in range(n):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
    return x


DEFAULT_N = 1000
COMPUTE_N = 10_000           # ~80 ms under KVM's instruction emulator
COMPUTE_RESULT = 0x4970AB92  # compute_reference(COMPUTE_N), checked by the tests
HELLO_TEXT = "Hello, world!\n"


def _n(default: int, doc: str) -> tuple[Param, ...]:
    return (Param("n", "rcx", default, doc),)


_LOOP_N = "iterations (ECX); 0 = forever"
_DONE = {"exit_value": 0, "exit_status": exit_status(0)}

# base name -> (description, params, expect)
_SPECS: dict[str, tuple[str, tuple[Param, ...], dict[str, Any]]] = {
    "pio_out_loop": (
        f"1-byte out to port {PORT_OUT:#x} per iteration (data = low byte of the counter)",
        _n(DEFAULT_N, _LOOP_N),
        {**_DONE, "iterations": DEFAULT_N,
         "exit": {"kind": "pio_out", "port": PORT_OUT, "size": 1}}),
    "console_flood": (
        f"1-byte out to the debugcon port {PORT_DEBUGCON:#x} per iteration, no polling "
        "('A'..'P' from the counter's low 4 bits)",
        _n(DEFAULT_N, _LOOP_N),
        {**_DONE, "iterations": DEFAULT_N,
         "exit": {"kind": "pio_out", "port": PORT_DEBUGCON, "size": 1}}),
    "pio_in_loop": (
        f"1-byte in from port {PORT_IN:#x} per iteration; sum in EBX and at RESULT_ADDR",
        _n(DEFAULT_N, _LOOP_N),
        {**_DONE, "iterations": DEFAULT_N,
         "exit": {"kind": "pio_in", "port": PORT_IN, "size": 1}}),
    "mmio_write_loop": (
        f"4-byte store to {MMIO_WRITE_ADDR:#x} per iteration (data = counter)",
        _n(DEFAULT_N, _LOOP_N),
        {**_DONE, "iterations": DEFAULT_N,
         "exit": {"kind": "mmio_write", "addr": MMIO_WRITE_ADDR, "size": 4}}),
    "mmio_read_loop": (
        f"4-byte load from {MMIO_READ_ADDR:#x} per iteration; sum in EBX and at RESULT_ADDR",
        _n(DEFAULT_N, _LOOP_N),
        {**_DONE, "iterations": DEFAULT_N,
         "exit": {"kind": "mmio_read", "addr": MMIO_READ_ADDR, "size": 4}}),
    "hlt_loop": (
        "hlt per iteration (needs no in-kernel irqchip: with IF=0 it would block in the kernel)",
        _n(DEFAULT_N, _LOOP_N),
        {**_DONE, "iterations": DEFAULT_N, "exit": {"kind": "hlt"}}),
    "compute": (
        f"xorshift32 over N rounds without exits; 4-byte out of the result to port "
        f"{PORT_RESULT:#x}, then debug-exit 0",
        _n(COMPUTE_N, "xorshift32 rounds (ECX)"),
        {**_DONE, "result": COMPUTE_RESULT, "result_port": PORT_RESULT}),
    "hello": (
        f"'Hello, world!' to the 8250 at {COM1_BASE:#x}, polling LSR.THRE; then debug-exit 0",
        (),
        {**_DONE, "serial": HELLO_TEXT}),
    "debug_exit": (
        f"1-byte out of AL to isa-debug-exit (port {PORT_DEBUG_EXIT:#x})",
        (Param("value", "rax", 0x21, "byte written to the debug-exit port (AL)", bits=8),),
        {"exit_value": 0x21, "exit_status": exit_status(0x21)}),
}

# --- SMP and interrupt guests (smp.inc) -----------------------------------------
# The SMP guests run one image on N vCPUs (one thread each) and take `cpu` (this
# vCPU's index, EDX) and `ncpus` (N, ESI): the runner passes both, and
# layout.prepare() gives each vCPU its own stack. Every vCPU of a run ends with
# the same isa-debug-exit verdict after a final barrier: value 0 (status 1) if the
# shared result is right, value 2 (status 5) if not. `value` is SMP_VALUE_ADDR's
# final content, ncpus * n; COUNTER_ADDR ends at ncpus (one exit per vCPU).
SMP_N = 2000
PINGPONG_N = 200
IPI_N = 50


def _smp(default: int, doc: str) -> tuple[Param, ...]:
    return (Param("n", "rcx", default, doc),
            Param("cpu", "rdx", 0, "this vCPU's index, 0..ncpus-1 (EDX)", bits=6),
            Param("ncpus", "rsi", 1, f"number of vCPUs running the guest, 1..{layout.SMP_MAX_CPUS} (ESI)",
                  bits=7))


def _smp_expect(n: int, **more: Any) -> dict[str, Any]:
    return {**_DONE, "fail_value": layout.SMP_FAIL_VALUE,
            "fail_status": exit_status(layout.SMP_FAIL_VALUE),
            "value_addr": layout.SMP_VALUE_ADDR, "value": n, **more}


_SPECS.update({
    "smp_counter": (
        "SMP: each vCPU adds 1 to a shared u32 n times under a spinlock (xchg + pause); "
        "the last to finish checks it is ncpus * n; all report pass (status 1) or fail (5)",
        _smp(SMP_N, "increments per vCPU (ECX)"),
        _smp_expect(SMP_N, irqchip=False)),
    "smp_pingpong": (
        "SMP: a token goes round the ring 0 -> 1 -> ... -> ncpus-1 -> 0 through shared "
        "mailboxes, n rounds; hops counted by the token holder; pass (1) or fail (5)",
        _smp(PINGPONG_N, "rounds (ECX)"),
        _smp_expect(PINGPONG_N, irqchip=False)),
    "smp_ipi": (
        f"SMP, in-kernel irqchip: the ring of smp_pingpong passed by local APIC IPIs on "
        f"vector {layout.IRQ_VECTOR:#x}, n rounds; pass (1) or fail (5)",
        _smp(IPI_N, "rounds (ECX)"),
        _smp_expect(IPI_N, irqchip=True)),
    "irq_count": (
        f"in-kernel irqchip: enables its local APIC, sets SMP_READY_ADDR, sleeps in sti; hlt "
        f"until n interrupts on vector {layout.IRQ_VECTOR:#x} arrived (counted per APIC id at "
        f"IRQ_COUNTS_ADDR); then debug-exit 0",
        _n(1, "interrupts to wait for (ECX)"),
        {**_DONE, "irqchip": True, "vector": layout.IRQ_VECTOR}),
    "irq_window": (
        f"no in-kernel irqchip: cli, n reports of its interrupt count on port {PORT_OUT:#x}, sti, "
        f"n more (bit 8 set); handlers for vectors {layout.IRQ_VECTOR:#x}, "
        f"{layout.IRQ_SPURIOUS_VECTOR:#x} (counted at IRQ_COUNTS_ADDR) and NMI report their vector "
        f"on port {PORT_RESULT:#x}; then debug-exit 0",
        _n(4, "reports before and after sti (ECX), at least 1"),
        {**_DONE, "irqchip": False, "vectors": (2, layout.IRQ_VECTOR, layout.IRQ_SPURIOUS_VECTOR)}),
})


def _build() -> dict[str, Guest]:
    guests = {}
    for base, (desc, params, expect) in _SPECS.items():
        for mode in MODES:
            g = Guest(name=f"{base}.{mode}", mode=mode, description=desc,
                      load_addr=LOAD_ADDR, entry=LOAD_ADDR, params=params,
                      expect=MappingProxyType(expect))
            guests[g.name] = g
    return guests


GUESTS: dict[str, Guest] = _build()


def get(name: str) -> Guest:
    guest = GUESTS.get(name) if isinstance(name, str) else None
    if guest is None:
        raise UnknownGuestError(
            f"unknown guest {name!r}; available: {', '.join(sorted(GUESTS))}")
    return guest


__all__ = ["GUESTS", "Guest", "MODES", "Param", "UnknownGuestError", "compute_reference",
           "exit_status", "get", "layout"]
