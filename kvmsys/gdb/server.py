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
import stat
import threading
import time
from typing import Any, Callable, Iterator

from .. import _core
from ..errors import InvalidArgumentError, KvmsysError
from . import probe, target
from .commands import DETACHED, KILLED, SIGINT, SIGTRAP, Commands, Failure
from .protocol import INTERRUPT, Connection



class GdbKilled(KvmsysError):
    """gdb killed the guest (``kill``)."""


# How long the server waits, once it has told gdb how the guest ended (W/X), for gdb to
# close the connection (it does so at once): closing first could reset the connection
# under the reply, and gdb would only see "Remote connection closed".
FINAL_REPLY_WAIT_S = 5.0

# How a run the host ended (the reason its host_stop() gave) reaches gdb.  Those the
# command line ends with status 0 exit with 0; Ctrl-C is SIGINT, anything else SIGABRT.
HOST_ENDINGS = {"MATCHED": "W00", "QUIT": "W00", "RESET": "W00", "INTERRUPTED": "X02"}


class _Cpu:
    def __init__(self, index: int, vcpu: Any, run: Callable[..., Any],
                 host_stop: Callable[[], str | None] | None = None) -> None:
        self.index = index
        self.tid = index + 1
        self.vcpu = vcpu
        self.real_run = run
        self.handle = vcpu.handle()
        self.state = "running"      # running, parked, done
        self.calls: list[list[Any]] = []    # [fn, result, done] run on the vCPU thread while parked
        self.resume: str | None = None      # "c" or "s", set by the server
        self.event: tuple[int, int, int, int | None] | None = None      # (exception, dr6, pc, watched address or None) that stopped it
        self.stepping = False
        self.debug: Any = None      # guest-debug settings last applied
        self.parked_s = 0.0         # time spent stopped in the debugger
        self.final: Any = None      # the exit that ended it
        self.host_stop = host_stop  # () -> why the host ends the run (a str), or None
        self.why: str | None = None     # what host_stop() said when a kick ended the run
        self.action: str | None = None  # how it was last resumed: "c" or "s"


def parse_address(address: str) -> tuple[socket.AddressFamily, Any]:
    """'HOST:PORT' -> (AF_INET, (host, port)); anything with a '/' -> (AF_UNIX, path)."""
    if "/" in address:
        return socket.AF_UNIX, address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgumentError(f"gdb address must be HOST:PORT or a Unix socket path, not {address!r}")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


class GdbServer(Commands):
    """Listen on *address* for one gdb and give it control of *vcpus* vCPUs.

    Each vCPU thread calls ``with server.attach(vcpu, run) as run:`` and then drives the
    vCPU with the returned function as it would with *run* (``vcpu.run`` or
    ``kvmsys.run``): with *wait* (QEMU's -S) it stops before the first instruction until
    gdb continues, without it the guest runs at once and stops when gdb connects (QEMU's
    -s alone); it handles debug exits itself, and returns every other exit.  After gdb
    detaches (or goes away) the guest runs on with guest debugging off."""

    def __init__(self, address: str, vcpus: int = 1, *, wait: bool = True):
        if vcpus < 1:
            raise InvalidArgumentError("vcpus must be at least 1")
        family, addr = parse_address(address)
        self.expected = vcpus
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(addr).st_mode):
                    os.unlink(addr)         # a stale socket of an earlier run; never a file
        try:
            self._listener.bind(addr)
            self._listener.listen(1)
        except OSError as e:
            self._listener.close()
            raise InvalidArgumentError(f"gdb server cannot listen on {address}: {e.strerror}") from None
        bound = self._listener.getsockname()
        self.address = bound if isinstance(bound, str) else f"{bound[0]}:{bound[1]}"
        self._unix_path = addr if family == socket.AF_UNIX else None
        self._cond = threading.Condition()
        self._cpus: dict[int, _Cpu] = {}
        self.wait = bool(wait)
        self._stop = self.wait      # stop at the first instruction
        self._ending = False        # the final W/X reply is being sent
        self._detached = False
        self._killed = False
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        self.sw_bp_native: bool | None = None      # int3 breakpoints (else debug registers)
        self.watch_native: bool | None = None      # data breakpoints (else stepped watchpoints)
        self._stepped: dict[tuple[int, int], list[Any]] = {}    # (address, length) -> [gpa, last bytes]: write watchpoints
                                    # checked after each single-step where DRs do not watch data
        self._sw_bps: dict[int, tuple[int, int]] = {}   # address -> (gpa, original byte)
        self._hw: list[tuple[int, int, int] | None] = [None] * target.HW_SLOTS         # (kind, address, length)
        self._hw_sw: set[int] = set()               # hw slots standing in for Z0
        self._phys = False
        self._g: Any = None         # selected thread (_Cpu) for registers/memory
        self.mode: Any = None
        self._conn: Any = None
        self._thread = threading.Thread(target=self._serve, name="gdb-server", daemon=True)
        self._thread.start()

    # --- vCPU side -------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, vcpu: Any, run: Callable[..., Any], host_stop: Callable[[], str | None] | None = None
               ) -> Iterator[Callable[..., Any]]:
        """On the vCPU's thread: *run* under the debugger (see the class docstring).
        *host_stop()*: why the host is ending the run (a str: the reason its kick means
        "stop", not a stop the server asked for), or None; its kick is then returned to
        the caller, and the reason tells gdb how the guest ended (HOST_ENDINGS)."""
        cpu = _Cpu(vcpu.id, vcpu, run, host_stop)
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

    def _run(self, cpu: _Cpu, **kw: Any) -> Any:
        while True:
            with self._cond:
                must_park = not self._detached and (self._stop or cpu.event is not None)
            if must_park:
                self._park(cpu)
            ex = cpu.real_run(**kw)
            cpu.final = ex
            cpu.why = None
            if isinstance(ex, _core.KickExit) and cpu.host_stop is not None:
                cpu.why = cpu.host_stop()
                if cpu.why is not None:
                    return ex           # the host ends the run (or resets the machine)
            with self._cond:
                if self._detached:
                    if isinstance(ex, (_core.DebugExit, _core.KickExit)):
                        continue        # left over from the debug session
                    return ex
                if isinstance(ex, _core.KickExit):
                    continue            # the server's stop request (or a stale kick): park
                if isinstance(ex, _core.DebugExit):
                    watch = self._check_stepped() if self._stepped else None
                    if watch is None and cpu.action == "c" and ex.exception == 1 and not ex.dr6 & 0xF:
                        continue        # a step of a stepped watchpoint, nothing written: go on
                    cpu.event = (ex.exception, ex.dr6, ex.pc, watch)
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
            cpu.action = cpu.resume
            step = cpu.resume == "s" or bool(self._stepped)
            cpu.resume = None
            # withdraw a stop request it took already; the server kicks only "running" vCPUs
            cpu.vcpu.immediate_exit = 0
            cpu.state = "running"
        self._apply_debug(cpu, step)
        cpu.parked_s += time.monotonic() - t0

    def _apply_debug(self, cpu: _Cpu, step: bool) -> None:
        if self._detached or self._closed:
            settings = None
            cpu.action = None
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

    def _check_stepped(self) -> int | None:
        """Under the lock: the address of a stepped watchpoint whose bytes changed."""
        vm = next(iter(self._cpus.values())).vcpu.vm
        for (addr, length), entry in self._stepped.items():
            now = vm.read(entry[0], length)
            if now != entry[1]:
                entry[1] = now
                return addr
        return None

    # --- server side: control of the vCPUs ----------------------------------------
    def _call(self, cpu: _Cpu, fn: Callable[[], Any]) -> Any:
        """Run fn() on the parked vCPU's own thread and return its result."""
        call: list[Any] = [fn, None, False]
        with self._cond:
            if cpu.state != "parked":
                raise Failure(1)
            cpu.calls.append(call)
            self._cond.notify_all()
            while not call[2]:
                if cpu.state == "done" or self._closed:     # its thread left (an exception)
                    raise Failure(1)
                self._cond.wait(0.1)
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
            while True:
                for c in self._cpus.values():
                    if c.state == "running":
                        c.handle.kick()         # kicks are never lost; again is harmless
                if self._all_stopped() or self._closed:
                    return
                self._cond.wait(0.1)

    def _resume(self, actions: dict[int, str], default: str | None) -> None:
        with self._cond:
            self._stop = False
            vm = self._vm()
            for entry in self._stepped.values():    # gdb may have written memory meanwhile
                entry[1] = vm.read(entry[0], len(entry[1]))
            for c in self._live():
                c.resume = actions.get(c.tid, default)     # None: gdb leaves it stopped
                if c.resume is not None:
                    c.event = None
            self._cond.notify_all()

    # --- the connection -----------------------------------------------------------
    def close(self) -> None:
        """Stop serving; vCPUs still waiting for gdb run on without it.  Once the guest
        has ended under a connected gdb, first lets the server tell gdb so (W or X) and
        waits (FINAL_REPLY_WAIT_S at most) for gdb to close the connection."""
        with self._cond:
            ended = self._conn is not None and self._cpus and not self._live() and not self._detached
        if ended and threading.current_thread() is not self._thread:
            self._wake()
            self._thread.join(FINAL_REPLY_WAIT_S + 1.0)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept(); close() alone does not
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

    def __enter__(self) -> GdbServer:
        return self

    def __exit__(self, *exc: object) -> None:
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
            if not self._stop:
                self._stop_all()        # gdb came while the guest runs (wait=False)
            with self._cond:
                while not self._all_stopped() and not self._closed:
                    self._cond.wait(0.1)
            if self._closed:
                return
            if self._live():
                self._setup()
                self._loop(self._dispatch)
            else:
                self._loop(self._ended)     # the guest ended before gdb came (wait=False)
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

    def _ended(self, packet: bytes) -> str:
        """The requests of a gdb that came after every vCPU had ended: its stop query (?)
        gets how the guest ended; everything else an empty reply (unsupported)."""
        return self._exit_reply() if packet == b"?" else ""

    def _loop(self, dispatch: Callable[[bytes], object]) -> None:
        conn = self._conn
        while not self._closed:
            packet = conn.read()
            if packet is None:
                return
            if packet == INTERRUPT:
                continue            # already stopped
            try:
                reply = dispatch(packet)
            except ConnectionError:
                raise                           # gdb went away while the guest ran
            except Failure as e:
                reply = f"E{e.code:02x}"
            except Exception:                   # a malformed or refused request: an error
                reply = "E01"                   # reply, never the end of the server
            if reply is DETACHED:
                conn.send("OK")
                return
            if reply is KILLED:
                return
            if reply is not None:
                conn.send(reply)
            if self._ending:
                self._await_close(conn)
                return
            if packet == b"QStartNoAckMode" and reply == "OK":
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
                raise ConnectionError("server closed")
            if conn.pending():
                readable = [conn]
            else:
                readable, _, _ = select.select([conn, self._wake_r], [], [])
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            if conn in readable:
                packet = conn.read()
                if packet is None:
                    raise ConnectionError("gdb went away")
                if packet == INTERRUPT:
                    self._stop_all()
                    with self._cond:
                        hit = next((c for c in self._cpus.values() if c.event is not None), None)
                    if hit is not None:
                        self._g = hit
                        return self._stop_reply(hit)
                    live = self._live()
                    cpu = self._g if self._g in live else (live[0] if live else None)
                    if cpu is None:
                        return self._exit_reply()
                    self._g = cpu
                    return f"T{SIGINT:02x}thread:{cpu.tid:x};"

    def _stop_reply(self, cpu: _Cpu) -> str:
        assert cpu.event is not None            # (a vCPU that stopped says why)
        exception, dr6, pc, watch = cpu.event
        why = ""
        if watch is not None:
            why = f"watch:{watch:x};"
        elif exception == 3:
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
        """The guest ended: W and its exit status, or X and a signal (the first vCPU's)."""
        self._ending = True
        first = min(self._cpus.values(), key=lambda c: c.index)
        ex = first.final
        if isinstance(ex, _core.StopExit):
            return f"W{ex.status & 0xFF:02x}"
        if first.why is not None:
            return HOST_ENDINGS.get(first.why, "X06")
        if isinstance(ex, _core.DeadlineExit):
            return "X0e"    # SIGALRM: the run's time ran out
        return "X06"        # ended some other way (triple fault, emulation failure, ...)

    def _await_close(self, conn: Connection) -> None:
        """After the final reply: gdb's acknowledgement was taken by send() (ack mode);
        now wait for gdb to close the connection, discarding what it sends, for
        FINAL_REPLY_WAIT_S at most (gdb is untrusted)."""
        give_up = time.monotonic() + FINAL_REPLY_WAIT_S
        with contextlib.suppress(OSError):
            while (left := give_up - time.monotonic()) > 0:
                readable, _, _ = select.select([conn.sock], [], [], left)
                if readable and not conn.sock.recv(4096):
                    return          # gdb closed it

    def _detach(self) -> None:
        with self._cond:
            if self._detached:
                return
        if self._cpus:
            self._stop_all()        # gdb may have gone while the guest ran
            with contextlib.suppress(Exception):
                self._remove_all_breakpoints()
        with self._cond:
            self._detached = True
            self._stop = False
            self._cond.notify_all()
