"""QEMU's debugcon (isa-debugcon): bytes written to the port go to the console buffer.

Reads return 0xe9, which is how SeaBIOS decides its debug port 0x402 is there (it
turns its log off when the port reads anything else).  All in the C run loop."""
from __future__ import annotations
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .._core import VmCore

from ..enums import Kind
from . import PIO

READBACK = 0xE9


class Debugcon:
    ports: tuple[int, ...] = (0xE9, 0x402)

    def __init__(self, ports: Iterable[int] = ports) -> None:
        self.ports = tuple(ports)
        self._handlers: list[int] = []
        self._vm: VmCore | None = None

    def reset(self) -> None:
        pass

    def install(self, vm: VmCore) -> list[int]:
        self._vm = vm
        self._handlers = [vm.add_handler(PIO, p, p + 1, Kind.SINK, READBACK) for p in self.ports]
        return self._handlers

    def uninstall(self) -> None:
        for h in self._handlers:
            assert self._vm is not None         # handlers only after install()
            self._vm.remove_handler(h)
        self._handlers = []
