"""A gdb server (remote serial protocol stub) for kvmsys guests, all-stop mode.

Threads: each vCPU keeps running on its own thread, through the run function that
GdbServer.attach() wraps; one server thread talks to gdb.  While the guest is
stopped every vCPU thread waits in park() and executes the server's requests
(register access, KVM_TRANSLATE, guest-debug settings) itself, so vCPU state is
touched only by the vCPU's owner.  The server stops running vCPUs with kick().

One gdb thread per vCPU (thread id = vCPU id + 1).  Memory is addressed by guest-virtual
address (translated with KVM_TRANSLATE on the selected vCPU), or guest-physical after
``monitor phys``.  Software breakpoints are int3 with KVM_GUESTDBG_USE_SW_BP where the
host stops the guest at an int3 (kvmsys.gdb.probe), else debug registers (four in all,
shared with hardware breakpoints and watchpoints); watchpoints use debug registers
where the host honours them, else gdb's own (single-stepping) watchpoints.
"""
from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time

from .. import _core
from ..errors import InvalidArgumentError, KvmsysError
from . import probe, target
from .protocol import INTERRUPT, Connection

SIGINT, SIGTRAP = 2, 5
_PAGE = 4096


class GdbKilled(KvmsysError):
    """gdb killed the guest (``kill``)."""


class _Failure(Exception):
    """A request the stub answers with an error packet."""

    def __init__(self, code: int = 1):
        self.code = code


class _Cpu:
    def __init__(self, index: int, vcpu, run):
        self.index = index
        self.tid = index + 1
        self.vcpu = vcpu
        self.real_run = run
        self.handle = vcpu.handle()
        self.state = "running"      # running, parked, done
        self.calls: list = []       # [fn, result, done] run on the vCPU thread while parked
        self.resume: str | None = None      # "c" or "s", set by the server
        self.event = None           # (exception, dr6, pc) of the debug exit that stopped it
        self.stepping = False
        self.debug = None           # guest-debug settings last applied
        self.parked_s = 0.0         # time spent stopped in the debugger
        self.final = None           # the exit that ended it


def parse_address(address: str):
    """'HOST:PORT' -> (AF_INET, (host, port)); anything with a '/' -> (AF_UNIX, path)."""
    if "/" in address:
        return socket.AF_UNIX, address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgumentError(f"gdb address must be HOST:PORT or a Unix socket path, not {address!r}")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


class GdbServer:
    """Listen on *address* for one gdb and give it control of *vcpus* vCPUs.

    Each vCPU thread calls ``with server.attach(vcpu, run) as run:`` and then drives the
    vCPU with the returned function as it would with *run* (``vcpu.run`` or
    ``kvmsys.run``): it stops before the first instruction until gdb continues, handles
    debug exits itself, and returns every other exit.  After gdb detaches (or goes away)
    the guest runs on with guest debugging off."""

    def __init__(self, address: str, vcpus: int = 1):
        if vcpus < 1:
            raise InvalidArgumentError("vcpus must be at least 1")
        family, addr = parse_address(address)
        self.expected = vcpus
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(addr) and not os.path.isdir(addr):
                    os.unlink(addr)
        self._listener.bind(addr)
        self._listener.listen(1)
        bound = self._listener.getsockname()
        self.address = bound if isinstance(bound, str) else f"{bound[0]}:{bound[1]}"
        self._unix_path = addr if family == socket.AF_UNIX else None
        self._cond = threading.Condition()
        self._cpus: dict[int, _Cpu] = {}
        self._stop = True           # stop at the first instruction
        self._detached = False
        self._killed = False
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        self.sw_bp_native: bool | None = None      # int3 breakpoints (else debug registers)
        self.watch_native: bool | None = None      # data breakpoints (else gdb single-steps)
        self._sw_bps: dict[int, tuple[int, int]] = {}   # address -> (gpa, original byte)
        self._hw: list = [None] * target.HW_SLOTS         # (kind, address, length)
        self._hw_sw: set[int] = set()               # hw slots standing in for Z0
        self._phys = False
        self._g = None              # selected thread for registers/memory
        self.mode = None
        self._conn = None
        self._thread = threading.Thread(target=self._serve, name="gdb-server", daemon=True)
        self._thread.start()

    # --- vCPU side -------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, vcpu, run):
        """On the vCPU's thread: *run* under the debugger (see the class docstring)."""
        cpu = _Cpu(vcpu.id, vcpu, run)
        with self._cond:
            if cpu.index in self._cpus:
                raise InvalidArgumentError(f"vCPU {vcpu.id} is already attached")
            self._cpus[cpu.index] = cpu
            self._cond.notify_all()
        try:
            yield lambda **kw: self._run(cpu, **kw)
        finally:
            with self._cond:
                cpu.state = "done"
                self._cond.notify_all()
            self._wake()

    def parked_seconds(self, vcpu_id: int) -> float:
        """How long vCPU *vcpu_id* has been stopped in the debugger so far."""
        cpu = self._cpus.get(vcpu_id)
        return cpu.parked_s if cpu else 0.0

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def _run(self, cpu: _Cpu, **kw):
        while True:
            with self._cond:
                must_park = not self._detached and (self._stop or cpu.event is not None)
            if must_park:
                self._park(cpu)
            ex = cpu.real_run(**kw)
            cpu.final = ex
            with self._cond:
                if self._detached:
                    if isinstance(ex, (_core.DebugExit, _core.KickExit)):
                        continue        # left over from the debug session
                    return ex
                if isinstance(ex, _core.KickExit):
                    continue            # the server's stop request (or a stale kick): park
                if isinstance(ex, _core.DebugExit):
                    cpu.event = (ex.exception, ex.dr6, ex.pc)
                    self._cond.notify_all()
                else:
                    return ex
            self._wake()

    def _park(self, cpu: _Cpu) -> None:
        t0 = time.monotonic()
        with self._cond:
            cpu.state = "parked"
            self._cond.notify_all()
            while True:
                if cpu.calls:
                    call = cpu.calls.pop(0)
                    self._cond.release()
                    try:
                        call[1] = (True, call[0]())
                    except BaseException as e:      # handed to the server thread
                        call[1] = (False, e)
                    finally:
                        self._cond.acquire()
                    call[2] = True
                    self._cond.notify_all()
                    continue
                if self._killed:
                    raise GdbKilled("the guest was killed from gdb")
                if cpu.resume is not None or self._detached or self._closed:
                    break
                self._cond.wait()
            step = cpu.resume == "s" and not self._detached
            cpu.resume = None
            cpu.state = "running"
        self._apply_debug(cpu, step)
        cpu.vcpu.immediate_exit = 0     # withdraw a stop request it no longer needs
        cpu.parked_s += time.monotonic() - t0

    def _apply_debug(self, cpu: _Cpu, step: bool) -> None:
        if self._detached or self._closed:
            settings = None
        else:
            hw = any(s is not None for s in self._hw)
            settings = (step, hw, tuple(target.debugreg(self._hw)) if hw else None)
        if settings == cpu.debug:
            return
        if settings is None:
            cpu.vcpu.set_guest_debug(False)
        else:
            step, hw, regs = settings
            cpu.vcpu.set_guest_debug(True, single_step=step, sw_breakpoints=True,
                                     hw_breakpoints=hw, debugreg=regs)
        cpu.debug = settings

    # --- server side: control of the vCPUs ----------------------------------------
    def _call(self, cpu: _Cpu, fn):
        """Run fn() on the parked vCPU's own thread and return its result."""
        call = [fn, None, False]
        with self._cond:
            if cpu.state != "parked":
                raise _Failure(1)
            cpu.calls.append(call)
            self._cond.notify_all()
            while not call[2]:
                self._cond.wait()
        ok, value = call[1]
        if not ok:
            raise value
        return value

    def _live(self) -> list[_Cpu]:
        return sorted((c for c in self._cpus.values() if c.state != "done"), key=lambda c: c.index)

    def _all_stopped(self) -> bool:
        return len(self._cpus) >= self.expected and all(c.state != "running" for c in self._cpus.values())

    def _stop_all(self) -> None:
        with self._cond:
            self._stop = True
            for c in self._cpus.values():
                if c.state == "running":
                    c.handle.kick()
            while not self._all_stopped() and not self._closed:
                self._cond.wait(0.1)

    def _resume(self, actions: dict[int, str], default: str | None) -> None:
        with self._cond:
            self._stop = False
            for c in self._live():
                c.resume = actions.get(c.tid, default)     # None: gdb leaves it stopped
                if c.resume is not None:
                    c.event = None
            self._cond.notify_all()

    # --- the connection -----------------------------------------------------------
    def close(self) -> None:
        """Stop serving; vCPUs still waiting for gdb run on without it."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake()
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        if self._unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _serve(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return          # closed before gdb came
        with contextlib.suppress(OSError):
            self._listener.close()
        self._conn = Connection(sock)
        try:
            with self._cond:
                while not self._all_stopped() and not self._closed:
                    self._cond.wait(0.1)
            if self._closed:
                return
            self._setup()
            self._loop()
        except OSError:
            pass
        finally:
            self._detach()
            with contextlib.suppress(OSError):
                sock.close()

    def _setup(self) -> None:
        first = self._live()[0]
        self._g = first
        self.mode = target.mode_of(self._call(first, first.vcpu.get_sregs))
        self.regs = target.registers(self.mode)
        self.sw_bp_native = probe.sw_breakpoints_work(self.mode)
        self.watch_native = probe.watchpoints_work(self.mode)

    def _loop(self) -> None:
        conn = self._conn
        while not self._closed:
            packet = conn.read()
            if packet is None:
                return
            if packet == INTERRUPT:
                continue            # already stopped
            try:
                reply = self._dispatch(packet)
            except _Failure as e:
                reply = f"E{e.code:02x}"
            except (KvmsysError, OSError, ValueError) as e:
                reply = "E01" if not isinstance(e, OSError) else "E14"
            if reply is _DETACHED:
                conn.send("OK")
                return
            if reply is _KILLED:
                return
            if reply is not None:
                conn.send(reply)
            if packet == b"QStartNoAckMode":
                conn.ack = False

    def _wait_stop(self) -> str:
        """While the guest runs: the stop reply once a vCPU stops or gdb sends Ctrl-C."""
        conn = self._conn
        while True:
            with self._cond:
                hit = next((c for c in self._cpus.values() if c.event is not None), None)
                live = self._live()
            if hit is not None:
                self._stop_all()
                self._g = hit
                return self._stop_reply(hit)
            if not live:
                self._stop_all()
                return self._exit_reply()
            if self._closed:
                raise OSError("server closed")
            if conn.pending():
                readable = [conn]
            else:
                readable, _, _ = select.select([conn, self._wake_r], [], [])
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            if conn in readable:
                packet = conn.read()
                if packet is None:
                    raise OSError("gdb went away")
                if packet == INTERRUPT:
                    self._stop_all()
                    with self._cond:
                        hit = next((c for c in self._cpus.values() if c.event is not None), None)
                    if hit is not None:
                        self._g = hit
                        return self._stop_reply(hit)
                    cpu = self._g if self._g in self._live() else (self._live() or [None])[0]
                    if cpu is None:
                        return self._exit_reply()
                    self._g = cpu
                    return f"T{SIGINT:02x}thread:{cpu.tid:x};"

    def _stop_reply(self, cpu: _Cpu) -> str:
        exception, dr6, pc = cpu.event
        why = ""
        if exception == 3:
            self._fix_int3_pc(cpu)
            why = "swbreak:;"
        elif dr6 & 0xF:
            slot = (dr6 & 0xF).bit_length() - 1
            bp = self._hw[slot]
            if bp is not None:
                kind, addr, _ = bp
                why = ("swbreak:;" if slot in self._hw_sw else "hwbreak:;") if kind == 1 else \
                    f"{ {2: 'watch', 3: 'rwatch', 4: 'awatch'}[kind] }:{addr:x};"
        return f"T{SIGTRAP:02x}thread:{cpu.tid:x};{why}"

    def _fix_int3_pc(self, cpu: _Cpu) -> None:
        # KVM reports #BP with RIP at the int3; should a host report it after, step back
        regs = self._call(cpu, cpu.vcpu.get_regs)
        if regs["rip"] not in self._sw_bps and regs["rip"] - 1 in self._sw_bps:
            regs["rip"] -= 1
            self._call(cpu, lambda: cpu.vcpu.set_regs(regs))

    def _exit_reply(self) -> str:
        finals = [c.final for c in self._cpus.values()]
        ex = finals[0]
        if isinstance(ex, _core.StopExit):
            return f"W{ex.status & 0xFF:02x}"
        return "X06"        # ended some other way (triple fault, emulation failure, ...)

    def _detach(self) -> None:
        with self._cond:
            if self._detached:
                return
        if self._cpus:
            self._stop_all()        # gdb may have gone while the guest ran
            with contextlib.suppress(Exception):
                self._remove_sw_breakpoints()
        with self._cond:
            self._detached = True
            self._stop = False
            self._cond.notify_all()

    # --- packets --------------------------------------------------------------------
    def _cpu_for(self, tid_text: str) -> _Cpu:
        tid = int(tid_text, 16)
        live = self._live()
        if tid in (0, -1):
            return self._g if self._g in live else live[0]
        for c in live:
            if c.tid == tid:
                return c
        raise _Failure(2)

    def _dispatch(self, p: bytes):
        text = p.decode("latin-1")
        cmd = text[:1]
        if text.startswith("qSupported"):
            return ("PacketSize=4000;qXfer:features:read+;swbreak+;hwbreak+;"
                    "QStartNoAckMode+;vContSupported+")
        if text == "QStartNoAckMode":
            return "OK"
        if text.startswith("qXfer:features:read:target.xml:"):
            off, length = (int(x, 16) for x in text.rsplit(":", 1)[1].split(","))
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
            return self._read_regs(int(text[1:], 16))
        if cmd == "P":
            n, value = text[1:].split("=")
            return self._write_regs(bytes.fromhex(value), int(n, 16))
        if cmd == "m":
            addr, length = (int(x, 16) for x in text[1:].split(","))
            return self._read_memory(addr, length).hex()
        if cmd == "M":
            where, data = text[1:].split(":")
            addr, length = (int(x, 16) for x in where.split(","))
            data = bytes.fromhex(data)
            if len(data) != length:
                raise _Failure(1)
            self._write_memory(addr, data)
            return "OK"
        if cmd in "Zz" and text[1:2] in "01234":
            kind, addr, length = (int(x, 16) for x in text[1:].split(";")[0].split(","))
            if kind >= 2 and not self.watch_native:
                return ""           # unsupported: gdb falls back to software watchpoints
            (self._insert if cmd == "Z" else self._remove)(kind, addr, length)
            return "OK"
        if text == "vCont?":
            return "vCont;c;C;s;S"
        if text.startswith("vCont;"):
            actions, default = {}, None
            for action in text[6:].split(";"):
                what, _, tid = action.partition(":")
                what = what[:1].lower()
                if what not in "cs":
                    return ""
                if tid and tid != "-1":
                    actions.setdefault(int(tid, 16), what)
                else:
                    default = default or what
            return self._go(actions, default)
        if cmd in "cs" or cmd in "CS":
            if len(text) > 1 and cmd in "cs":
                raise _Failure(1)       # resume at another address: not supported
            what = cmd.lower()
            return self._go({self._g.tid: what}, "c")
        if cmd == "D":
            return _DETACHED
        if cmd == "k" or text.startswith("vKill"):
            with self._cond:
                self._killed = True
                self._cond.notify_all()
            return _KILLED
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
    def _state(self, cpu: _Cpu):
        v = cpu.vcpu
        return self._call(cpu, lambda: (v.get_regs(), v.get_sregs(), v.get_fpu()))

    def _read_regs(self, n: int | None = None) -> str:
        regs, sregs, fpu = self._state(self._g)
        if n is None:
            return b"".join(target.read_value(r, regs, sregs, fpu) for r in self.regs).hex()
        if not 0 <= n < len(self.regs):
            raise _Failure(0x16)
        return target.read_value(self.regs[n], regs, sregs, fpu).hex()

    def _write_regs(self, data: bytes, n: int | None = None) -> str:
        cpu = self._g
        regs, sregs, fpu = self._state(cpu)
        fpu = bytearray(fpu)
        if n is None:
            chosen, off = [], 0
            for r in self.regs:
                chosen.append((r, data[off:off + r.bits // 8]))
                off += r.bits // 8
            # gdb sends every register: write those that changed
            chosen = [(r, d) for r, d in chosen if d != target.read_value(r, regs, sregs, fpu)]
        else:
            if not 0 <= n < len(self.regs):
                raise _Failure(0x16)
            chosen = [(self.regs[n], data)]
        changed = {target.write_value(r, d, regs, sregs, fpu, self.mode) for r, d in chosen}
        v = cpu.vcpu

        def apply():
            if "sregs" in changed:
                v.set_sregs(sregs)
            if "regs" in changed:
                v.set_regs(regs)
            if "fpu" in changed:
                v.set_fpu(bytes(fpu))
        self._call(cpu, apply)
        return "OK"

    # memory
    def _gpa_ranges(self, addr: int, length: int):
        """[(gpa, length)] covering guest address [addr, addr+length), page by page."""
        if length > 0x10000 or addr < 0 or addr + length > 1 << 64:
            raise _Failure(1)
        if self._phys:
            return [(addr, length)] if length else []
        cpu = self._g
        out = []
        while length > 0:
            n = min(length, _PAGE - addr % _PAGE)
            t = self._call(cpu, lambda a=addr: cpu.vcpu.translate(a))
            if not t["valid"]:
                raise _Failure(0x0E)
            out.append((t["physical_address"], n))
            addr += n
            length -= n
        return out

    def _vm(self):
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
        data = bytearray(data)
        for a, (gpa, orig) in list(self._sw_bps.items()):
            if addr <= a < addr + len(data):
                self._sw_bps[a] = (gpa, data[a - addr])
                data[a - addr] = 0xCC
        off = 0
        for gpa, n in self._gpa_ranges(addr, len(data)):
            vm.write(gpa, bytes(data[off:off + n]))
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
            raise _Failure(0x16) from None
        slot = (hw_kind, addr, length if hw_kind != 1 else 1)
        if slot in self._hw:
            return
        if None not in self._hw:
            raise _Failure(0x1C)        # ENOSPC: four debug registers
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
        hw_kind = 1 if kind == 0 else kind
        slot = (hw_kind, addr, length if hw_kind != 1 else 1)
        if slot in self._hw:
            i = self._hw.index(slot)
            self._hw[i] = None
            self._hw_sw.discard(i)

    def _remove_sw_breakpoints(self) -> None:
        vm = self._vm()
        for gpa, orig in self._sw_bps.values():
            vm.write(gpa, bytes((orig,)))
        self._sw_bps.clear()
        self._hw = [None] * target.HW_SLOTS


_DETACHED = object()
_KILLED = object()
