"""The host side of a guest's console: ``--serial stdio``, ``--serial file:PATH`` and
``--screen``.

stdio: the UART's output goes to stdout as it comes, stdin goes to the UART.  When stdin
is a terminal it is put in raw mode (keys reach the guest unchanged, Ctrl-C included) and
restored when the run ends; Ctrl-A x ends the run and Ctrl-A Ctrl-A sends a Ctrl-A, as
in QEMU.  When stdin is not a terminal its bytes are sent as they are, until EOF."""
from __future__ import annotations

import os
import select
import sys
import threading

from typing import IO, TYPE_CHECKING, Any

from .errors import KvmsysError

if TYPE_CHECKING:
    from ._core import VmCore
    from .pc import Pc

CTRL_A = 0x01


class FileSink:
    """--serial file:PATH: the UART's output appended to a file (created if missing);
    --debug-log PATH: the debug console, to a file emptied first (truncate).  Unbuffered:
    each write reaches the file at once (`tail -f`, a run that is killed)."""

    def __init__(self, path: str, truncate: bool = False) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                          | (os.O_TRUNC if truncate else 0), 0o644)

    def __call__(self, data: bytes) -> None:
        os.write(self.fd, data)

    def attach(self, pc: Pc) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Stdio:
    """--serial stdio."""

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.inp, self.out = stdin_fd, stdout_fd
        self._saved: list[Any] | None = None
        self._thread: threading.Thread | None = None
        self._escape = False

    def __call__(self, data: bytes) -> None:
        os.write(self.out, data)

    def attach(self, pc: Pc) -> None:
        """Connect stdin to *pc*'s UART (called when the run starts)."""
        if os.isatty(self.inp):
            import termios
            import tty
            self._saved = termios.tcgetattr(self.inp)
            tty.setraw(self.inp)
        self._thread = threading.Thread(target=self._read, args=(pc,), name="serial-stdin", daemon=True)
        self._thread.start()

    def keys(self, data: bytes, pc: Pc) -> bytes:
        """Bytes typed by the user -> bytes for the guest; Ctrl-A x stops *pc*."""
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    pc.stop("QUIT")
                    break
                if b == CTRL_A:
                    out.append(CTRL_A)
                continue            # other Ctrl-A commands: none
            if b == CTRL_A:
                self._escape = True
                continue
            out.append(b)
        return bytes(out)

    def _read(self, pc: Pc) -> None:
        while not pc.finished.is_set():
            ready, _, _ = select.select([self.inp], [], [], 0.1)
            if not ready:
                continue
            data = os.read(self.inp, 1024)
            if not data:
                return                  # EOF: the guest keeps running, with nothing more to read
            data = self.keys(data, pc)
            if data:
                pc.uart.feed(data)

    def close(self) -> None:
        """Restore the terminal (idempotent)."""
        if self._saved is not None:
            import termios
            termios.tcsetattr(self.inp, termios.TCSADRAIN, self._saved)
            self._saved = None


class Screen:
    """--screen: the VGA colour text page (80x25 at 0xB8000) printed whenever it changed,
    looked at every *interval* seconds from a thread; only the characters, trailing
    blanks and empty rows at the bottom left out."""

    ADDR, COLS, ROWS = 0xB8000, 80, 25

    def __init__(self, out: IO[str] | None = None, interval: float = 0.2) -> None:
        self.out = out if out is not None else sys.stdout
        self.interval = interval
        self.last: str | None = None

    @classmethod
    def text(cls, page: bytes) -> str:
        rows = []
        for r in range(cls.ROWS):
            cells = page[2 * cls.COLS * r:2 * cls.COLS * (r + 1):2]
            rows.append(bytes(c if 0x20 <= c < 0x7F else 0x20 for c in cells).decode().rstrip())
        while rows and not rows[-1]:
            rows.pop()
        return "\n".join(rows)

    def show(self, vm: VmCore) -> None:
        """Print the page if it changed since the last time."""
        try:
            page = vm.read(self.ADDR, 2 * self.COLS * self.ROWS)
        except KvmsysError:
            return                              # no memory there (or the VM is gone)
        text = self.text(page)
        if text != self.last:
            self.last = text
            self.out.write(f"\n--- screen ---\n{text}\n--------------\n")
            self.out.flush()

    def attach(self, pc: Pc) -> None:
        def watch() -> None:
            while not pc.finished.wait(self.interval):
                self.show(pc.vm)
        threading.Thread(target=watch, name="screen", daemon=True).start()

    def close(self) -> None:
        pass
