"""GDB remote serial protocol framing: packets ``$data#cs``, acks, Ctrl-C, escapes.

Written from GDB's manual ("Remote Protocol": Overview, Packets, Binary Data).  A
packet is ``$`` payload ``#`` and two hex digits of the payload's byte sum mod 256;
``}`` escapes ``$ # } *`` as ``}`` followed by the byte XOR 0x20; the receiver acks
with ``+`` (or asks again with ``-``) until both sides agree on QStartNoAckMode.  A
lone 0x03 byte outside a packet is an interrupt request.

The peer is untrusted: a packet longer than the PacketSize the server advertises, or
malformed (a payload ending inside an escape), is answered with a NAK (``-``, or an
error reply once acks are off) and dropped, and the session goes on; what is buffered
from the peer never exceeds a few packets' worth, whatever it sends.
"""
from __future__ import annotations

import re
import socket

INTERRUPT = b"\x03"     # what read() returns for a Ctrl-C from gdb
_ESCAPED = b"$#}*"
PACKET_SIZE = 0x4000    # the longest packet (payload) the server takes: qSupported's PacketSize
_FRAMED_MAX = PACKET_SIZE + 4           # with '$', '#' and the two checksum digits
_BUFFER_MAX = 2 * _FRAMED_MAX           # bytes kept from the peer at most
_START = re.compile(rb"[$\x03]")


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


def _checksum_ok(digits: bytes, body: bytes) -> bool:
    try:
        return int(digits, 16) == checksum(body)
    except ValueError:
        return False


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
        data = self.sock.recv(_FRAMED_MAX)
        if not data:
            return False
        self.buf += data
        if len(self.buf) > _BUFFER_MAX:     # more than any client in step with us sends: drop it
            self.buf.clear()
            self._refuse()
        return True

    def _refuse(self) -> None:
        """A packet dropped as malformed: NAK it (gdb sends again), or with acks off an
        error reply (nobody resends)."""
        self.sock.sendall(b"-" if self.ack else frame(b"E01"))

    def pending(self) -> bool:
        """True if a whole packet or an interrupt is already buffered."""
        return INTERRUPT[0] in self.buf or b"#" in self.buf

    def read(self) -> bytes | None:
        """The next packet's payload (unescaped), INTERRUPT, or None at end of stream."""
        while True:
            m = _START.search(self.buf)     # drop acks and line noise before the next packet
            del self.buf[:m.start() if m else len(self.buf)]
            if self.buf[:1] == INTERRUPT:
                del self.buf[0]
                return INTERRUPT
            end = self.buf.find(b"#", 0, _FRAMED_MAX)
            if self.buf[:1] == b"$" and (end > PACKET_SIZE + 1 or end < 0 and len(self.buf) >= _FRAMED_MAX):
                nxt = self.buf.find(b"$", 1)            # longer than PacketSize: dropped
                del self.buf[:nxt if nxt > 0 else len(self.buf)]
                self._refuse()
                continue
            if self.buf[:1] == b"$" and end >= 0 and len(self.buf) >= end + 3:
                body = bytes(self.buf[1:end])
                cs = bytes(self.buf[end + 1:end + 3])
                del self.buf[:end + 3]
                try:
                    payload = unescape(body)
                except ProtocolError:
                    payload = None
                if payload is not None and (not self.ack or _checksum_ok(cs, body)):
                    if self.ack:            # (without acks the checksum is not checked)
                        self.sock.sendall(b"+")
                    return payload
                self._refuse()              # the peer sends it again (or gets E01)
                continue
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
