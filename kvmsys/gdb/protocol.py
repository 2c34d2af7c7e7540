"""GDB remote serial protocol framing: packets ``$data#cs``, acks, Ctrl-C, escapes.

Written from GDB's manual ("Remote Protocol": Overview, Packets, Binary Data).  A
packet is ``$`` payload ``#`` and two hex digits of the payload's byte sum mod 256;
``}`` escapes ``$ # } *`` as ``}`` followed by the byte XOR 0x20; the receiver acks
with ``+`` (or asks again with ``-``) until both sides agree on QStartNoAckMode.  A
lone 0x03 byte outside a packet is an interrupt request.
"""
from __future__ import annotations

import socket

INTERRUPT = b"\x03"     # what read() returns for a Ctrl-C from gdb
_ESCAPED = b"$#}*"


class ProtocolError(Exception):
    """The peer sent something that is not the remote protocol."""


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            try:
                b = next(it) ^ 0x20
            except StopIteration:
                raise ProtocolError("packet ends inside an escape") from None
        out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


class Connection:
    """One gdb connection over a connected stream socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.ack = True         # until QStartNoAckMode

    def fileno(self) -> int:
        return self.sock.fileno()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def pending(self) -> bool:
        """True if a whole packet or an interrupt is already buffered."""
        return INTERRUPT[0] in self.buf or b"#" in self.buf

    def read(self) -> bytes | None:
        """The next packet's payload (unescaped), INTERRUPT, or None at end of stream."""
        while True:
            # drop acks and line noise before the next packet
            while self.buf and self.buf[0] not in (0x24, 0x03):
                del self.buf[0]
            if self.buf[:1] == INTERRUPT:
                del self.buf[0]
                return INTERRUPT
            end = self.buf.find(b"#")
            if self.buf[:1] == b"$" and end >= 0 and len(self.buf) >= end + 3:
                body = bytes(self.buf[1:end])
                cs = bytes(self.buf[end + 1:end + 3])
                del self.buf[:end + 3]
                try:
                    good = int(cs, 16) == checksum(body)
                except ValueError:
                    good = False
                if self.ack:
                    self.sock.sendall(b"+" if good else b"-")
                if good or not self.ack:
                    return unescape(body)
                continue            # the peer sends it again
            if not self._fill():
                return None

    def send(self, payload: bytes | str) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        packet = frame(payload)
        while True:
            self.sock.sendall(packet)
            if not self.ack:
                return
            # wait for '+' (resend on '-'); a packet arriving meanwhile stays buffered
            while True:
                i = next((k for k, b in enumerate(self.buf) if b in b"+-"), -1)
                if i >= 0 and b"$" not in self.buf[:i]:
                    c = self.buf[i]
                    del self.buf[i]
                    break
                if not self._fill():
                    return
            if c == 0x2B:
                return
