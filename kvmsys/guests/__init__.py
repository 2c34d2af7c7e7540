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
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping

from . import layout
from .layout import (COM1_BASE, COMPUTE_SEED, LOAD_ADDR, MMIO_READ_ADDR, MMIO_WRITE_ADDR,
                     PORT_DEBUG_EXIT, PORT_IN, PORT_OUT, PORT_RESULT)

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

    @cached_property
    def image(self) -> bytes:
        return layout.read_bin(self.name)


class UnknownGuestError(KeyError):
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
_SPECS: dict[str, tuple[str, tuple[Param, ...], dict]] = {
    "pio_out_loop": (
        f"1-byte out to port {PORT_OUT:#x} per iteration (data = low byte of the counter)",
        _n(DEFAULT_N, _LOOP_N),
        {**_DONE, "iterations": DEFAULT_N,
         "exit": {"kind": "pio_out", "port": PORT_OUT, "size": 1}}),
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
    try:
        return GUESTS[name]
    except KeyError:
        raise UnknownGuestError(
            f"unknown guest {name!r}; available: {', '.join(sorted(GUESTS))}") from None


__all__ = ["GUESTS", "Guest", "MODES", "Param", "UnknownGuestError", "compute_reference",
           "exit_status", "get", "layout"]
