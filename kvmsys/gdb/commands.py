"""The packets of GDB's remote protocol that the gdb server answers while the guest is
stopped: registers, memory, breakpoints, threads, queries (GDB's manual, "Packets",
"General Query Packets", "Stop Reply Packets").  A mixin of GdbServer, which supplies
the vCPUs (_live, _call, _g) and resuming (_go)."""
from __future__ import annotations

import functools
import string
import threading
from typing import TYPE_CHECKING, Any, Callable

from . import target
from .protocol import PACKET_SIZE

if TYPE_CHECKING:
    from .server import _Cpu

SIGINT, SIGTRAP = 2, 5
_PAGE = 4096
DETACHED = object()     # _dispatch's answer to "D": reply OK, then let the guest go
KILLED = object()       # ... to "k": no reply, end the run


class Failure(Exception):
    """A request the stub answers with an error packet (E + errno-like code)."""

    def __init__(self, code: int = 1):
        self.code = code


def _hex(text: str) -> int:
    """A number in a packet: hex digits only, below 2**64, else an error reply (EINVAL),
    checked when the packet arrives (never later, when the guest runs)."""
    if not 0 < len(text) <= 64 or text.strip(string.hexdigits):
        raise Failure(0x16)
    value = int(text, 16)
    if value >> 64:
        raise Failure(0x16)
    return value


def _hexes(text: str, sep: str = ",") -> list[int]:
    return [_hex(x) for x in text.split(sep)]


class Commands:
    if TYPE_CHECKING:       # what GdbServer supplies (see server.py)
        mode: Any                   # the guest's CPU mode (target.MODES), once a session began
        regs: tuple[target.Reg, ...]
        sw_bp_native: bool | None
        watch_native: bool | None
        _g: Any                     # the selected _Cpu, once a session began
        _conn: Any                  # the session's protocol.Connection
        _cond: threading.Condition
        _phys: bool
        _stepped: dict[tuple[int, int], list[Any]]
        _sw_bps: dict[int, tuple[int, int]]
        _hw: list[tuple[int, int, int] | None]
        _hw_sw: set[int]

        def _live(self) -> list[_Cpu]: ...
        def _call(self, cpu: _Cpu, fn: Callable[[], Any]) -> Any: ...
        def _resume(self, actions: dict[int, str], default: str | None) -> None: ...
        def _wait_stop(self) -> str: ...

    # --- packets --------------------------------------------------------------------
    def _cpu_for(self, tid_text: str) -> _Cpu:
        tid = -1 if tid_text == "-1" else _hex(tid_text)
        live = self._live()
        if tid in (0, -1):
            return self._g if self._g in live else live[0]
        for c in live:
            if c.tid == tid:
                return c
        raise Failure(2)

    def _dispatch(self, p: bytes) -> object:
        text = p.decode("latin-1")
        cmd = text[:1]
        if text.startswith("qSupported"):
            return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;"
                    "QStartNoAckMode+;vContSupported+")
        if text == "QStartNoAckMode":
            return "OK"
        if text.startswith("qXfer:features:read:target.xml:"):
            off, length = _hexes(text.rsplit(":", 1)[1])
            xml = target.target_xml(self.mode)
            chunk = xml[off:off + length]
            return ("l" if off + length >= len(xml) else "m") + chunk.decode()
        if text == "?":
            return f"T{SIGTRAP:02x}thread:{self._g.tid:x};"
        if text == "qfThreadInfo":
            return "m" + ",".join(f"{c.tid:x}" for c in self._live())
        if text == "qsThreadInfo":
            return "l"
        if text == "qC":
            return f"QC{self._g.tid:x}"
        if text == "qAttached":
            return "1"
        if text.startswith("qThreadExtraInfo,"):
            cpu = self._cpu_for(text.split(",", 1)[1])
            return f"vCPU {cpu.vcpu.id}".encode().hex()
        if cmd == "H":
            cpu = self._cpu_for(text[2:])
            if text[1] == "g":
                self._g = cpu
            return "OK"
        if cmd == "T":
            self._cpu_for(text[1:])
            return "OK"
        if text.startswith("qRcmd,"):
            return self._monitor(bytes.fromhex(text[6:]).decode())
        if cmd == "g":
            return self._read_regs()
        if cmd == "G":
            return self._write_regs(bytes.fromhex(text[1:]))
        if cmd == "p":
            return self._read_regs(_hex(text[1:]))
        if cmd == "P":
            n, value = text[1:].split("=")
            return self._write_regs(bytes.fromhex(value), _hex(n))
        if cmd == "m":
            addr, length = _hexes(text[1:])
            return self._read_memory(addr, length).hex()
        if cmd == "M":
            where, data = text[1:].split(":")
            addr, length = _hexes(where)
            raw = bytes.fromhex(data)
            if len(raw) != length:
                raise Failure(1)
            self._write_memory(addr, raw)
            return "OK"
        if cmd in "Zz" and text[1:2] in "01234":
            kind, addr, length = _hexes(text[1:].split(";")[0])
            if kind >= 3 and not self.watch_native:
                return ""           # unsupported: read/access watchpoints need the DRs
            (self._insert if cmd == "Z" else self._remove)(kind, addr, length)
            return "OK"
        if text == "vCont?":
            return "vCont;c;C;s;S"
        if text.startswith("vCont;"):
            actions: dict[int, str] = {}
            default: str | None = None
            for action in text[6:].split(";"):
                what, _, tid = action.partition(":")
                what = what[:1].lower()
                if what not in "cs":
                    return ""
                if tid and tid != "-1":
                    actions.setdefault(_hex(tid), what)
                else:
                    default = default or what
            return self._go(actions, default)
        if cmd in "cs" or cmd in "CS":
            if len(text) > 1 and cmd in "cs":
                raise Failure(1)       # resume at another address: not supported
            what = cmd.lower()
            return self._go({self._g.tid: what}, "c")
        if cmd == "D":
            return DETACHED
        if cmd == "k" or text.startswith("vKill"):
            with self._cond:
                self._killed = True
                self._cond.notify_all()
            return KILLED
        return ""

    def _go(self, actions: dict[int, str], default: str | None) -> str:
        self._resume(actions, default)
        return self._wait_stop()

    def _monitor(self, command: str) -> str:
        words = command.split()
        if words == ["phys"]:
            self._phys = True
        elif words == ["virt"]:
            self._phys = False
        else:
            text = ("monitor commands: phys (memory by guest-physical address), "
                    "virt (by guest-virtual address, the default)\n")
            self._conn.send("O" + text.encode().hex())
            return "OK"
        self._conn.send("O" + f"memory by guest-{'physical' if self._phys else 'virtual'} address\n".encode().hex())
        return "OK"

    # registers
    def _state(self, cpu: _Cpu) -> target.VcpuState:
        st: target.VcpuState = self._call(cpu, lambda: target.VcpuState.of(cpu.vcpu))
        return st

    def _read_regs(self, n: int | None = None) -> str:
        st = self._state(self._g)
        if n is None:
            return b"".join(target.read_value(r, st, self.mode) for r in self.regs).hex()
        if not 0 <= n < len(self.regs):
            raise Failure(0x16)
        return target.read_value(self.regs[n], st, self.mode).hex()

    def _write_regs(self, data: bytes, n: int | None = None) -> str:
        cpu = self._g
        st = self._state(cpu)
        if n is None:
            chosen, off = [], 0
            for r in self.regs:
                chosen.append((r, data[off:off + r.bits // 8]))
                off += r.bits // 8
            # gdb sends every register: write those that changed
            chosen = [(r, d) for r, d in chosen if d != target.read_value(r, st, self.mode)]
        else:
            if not 0 <= n < len(self.regs):
                raise Failure(0x16)
            chosen = [(self.regs[n], data)]
        changed = {target.write_value(r, d, st, self.mode) for r, d in chosen}
        self._call(cpu, lambda: st.apply(cpu.vcpu, changed))
        return "OK"

    # memory
    def _gpa_ranges(self, addr: int, length: int) -> list[tuple[int, int]]:
        """[(gpa, length)] covering guest address [addr, addr+length), page by page."""
        if length > 0x10000 or addr < 0 or addr + length > 1 << 64:
            raise Failure(1)
        if self._phys:
            return [(addr, length)] if length else []
        cpu = self._g
        out = []
        while length > 0:
            n = min(length, _PAGE - addr % _PAGE)
            t = self._call(cpu, functools.partial(cpu.vcpu.translate, addr))
            if not t["valid"]:
                raise Failure(0x0E)
            out.append((t["physical_address"], n))
            addr += n
            length -= n
        return out

    def _vm(self) -> Any:
        return self._g.vcpu.vm

    def _read_memory(self, addr: int, length: int) -> bytes:
        vm = self._vm()
        data = bytearray()
        for gpa, n in self._gpa_ranges(addr, length):
            data += vm.read(gpa, n)
        base = addr
        for a, (gpa, orig) in self._sw_bps.items():     # show the guest's bytes, not our int3
            if base <= a < base + length:
                data[a - base] = orig
        return bytes(data)

    def _write_memory(self, addr: int, data: bytes) -> None:
        vm = self._vm()
        buf = bytearray(data)
        for a, (gpa, orig) in list(self._sw_bps.items()):
            if addr <= a < addr + len(buf):
                self._sw_bps[a] = (gpa, buf[a - addr])
                buf[a - addr] = 0xCC
        off = 0
        for gpa, n in self._gpa_ranges(addr, len(buf)):
            vm.write(gpa, bytes(buf[off:off + n]))
            off += n

    # breakpoints
    def _insert(self, kind: int, addr: int, length: int) -> None:
        if kind == 0 and self.sw_bp_native:
            if addr in self._sw_bps:
                return
            (gpa, _), = self._gpa_ranges(addr, 1)
            vm = self._vm()
            self._sw_bps[addr] = (gpa, vm.read(gpa, 1)[0])
            vm.write(gpa, b"\xcc")
            return
        hw_kind = 1 if kind == 0 else kind
        try:
            target.check_watch(hw_kind, addr, length)
        except ValueError:
            raise Failure(0x16) from None
        if kind == 2 and not self.watch_native:
            if (addr, length) not in self._stepped:
                (gpa, _), = self._gpa_ranges(addr, length)
                self._stepped[(addr, length)] = [gpa, self._vm().read(gpa, length)]
            return
        slot = (hw_kind, addr, length if hw_kind != 1 else 1)
        if slot in self._hw:
            return
        if None not in self._hw:
            raise Failure(0x1C)        # ENOSPC: four debug registers
        i = self._hw.index(None)
        self._hw[i] = slot
        if kind == 0:
            self._hw_sw.add(i)

    def _remove(self, kind: int, addr: int, length: int) -> None:
        if kind == 0 and self.sw_bp_native:
            entry = self._sw_bps.pop(addr, None)
            if entry is not None:
                self._vm().write(entry[0], bytes((entry[1],)))
            return
        if kind == 2 and not self.watch_native:
            self._stepped.pop((addr, length), None)
            return
        hw_kind = 1 if kind == 0 else kind
        slot = (hw_kind, addr, length if hw_kind != 1 else 1)
        if slot in self._hw:
            i = self._hw.index(slot)
            self._hw[i] = None
            self._hw_sw.discard(i)

    def _remove_all_breakpoints(self) -> None:
        vm = self._vm()
        for gpa, orig in self._sw_bps.values():
            vm.write(gpa, bytes((orig,)))
        self._sw_bps.clear()
        self._hw = [None] * target.HW_SLOTS
        self._stepped.clear()

