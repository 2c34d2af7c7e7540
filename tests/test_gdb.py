"""The gdb server, driven by the real gdb (batch mode) against `kvmsys run --gdb`, over
both ABIs, and by a small protocol client in process."""
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import kvmsys.guests
from kvmsys import runner
from kvmsys.gdb import GdbKilled, GdbServer, target
from kvmsys.gdb.protocol import Connection, INTERRUPT, checksum, escape, frame, unescape
from kvmsys.guests import compute_reference, get, layout as L

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="env: gdb is not installed (.ci/run installs it)")

# compute.<mode>: the `mov %eax, RESULT_ADDR` after the loop, where EAX holds the result
RESULT_STORE = {"real": b"\x66\xa3\x04\x10", "pm32": b"\xa3\x04\x10\x00\x00",
                "long64": b"\x89\x04\x25\x04\x10\x00\x00"}


def store_address(mode):
    image = get(f"compute.{mode}").image
    assert image.count(RESULT_STORE[mode]) == 1
    return L.LOAD_ADDR + image.index(RESULT_STORE[mode])


class KvmsysRun:
    """`kvmsys run ... --gdb ADDRESS` in a child process, until it listens."""

    def __init__(self, tmp_path, *args, address=None):
        address = address or str(tmp_path / "gdb.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvmsys", "run", *args, "--gdb", address],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=tmp_path)   # not the source tree: the installed package
        line = self.proc.stderr.readline()
        m = re.search(r"listening on (\S+);", line)
        assert m, f"no listening line: {line!r}"
        self.address = m.group(1)

    def wait(self, timeout=60):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode, out, err


def gdb_batch(address, *commands, timeout=60, interrupt_at=None):
    """gdb's output for *commands*; with interrupt_at=(marker path, seconds), SIGINT
    (what Ctrl-C at gdb's terminal does) that long after the marker file appears."""
    argv = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", f"target remote {address}"]
    for c in commands:
        argv += ["-ex", c]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if interrupt_at is not None:
        marker, delay = interrupt_at
        give_up = time.monotonic() + timeout
        while not os.path.exists(marker) and time.monotonic() < give_up and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


def values(out):
    """gdb's '$N = value' lines, in order."""
    return re.findall(r"^\$\d+ = (.*)$", out, re.M)


@needs_gdb
@pytest.mark.parametrize("mode", ("real", "pm32", "long64"))
def test_breakpoint_register_step_detach(tmp_path, abi, mode):
    # gdb stops the guest at its first instruction, breaks where the result is in EAX,
    # steps once, detaches; the guest then finishes on its own (isa-debug-exit status 1).
    at = store_address(mode)
    run = KvmsysRun(tmp_path, "--guest", f"compute.{mode}", "--n", "7", "--abi", abi)
    out = gdb_batch(run.address, "p/x $pc", f"break *{at:#x}", "continue", "p/x $eax", "p/x $pc",
                    "stepi", "p/x $pc", "detach")
    rc, stdout, stderr = run.wait()
    assert values(out) == [hex(L.LOAD_ADDR), hex(compute_reference(7)), hex(at),
                           hex(at + len(RESULT_STORE[mode]))], out
    assert "Breakpoint 1, " in out and "detached" in out, out
    assert rc == 1 and "STOP, exit status 1" in stdout, (stdout, stderr)


@needs_gdb
def test_write_watchpoint(tmp_path, abi):
    # Debug registers where the host honours data breakpoints, else the server steps.
    at = store_address("pm32")
    run = KvmsysRun(tmp_path, "--guest", "compute.pm32", "--n", "20", "--abi", abi)
    out = gdb_batch(run.address, f"watch *(unsigned int *){L.RESULT_ADDR:#x}", "continue",
                    "p/x $pc", "delete", "detach")
    rc, stdout, stderr = run.wait()
    assert f"New value = {compute_reference(20)}" in out, out
    assert values(out) == [hex(at + len(RESULT_STORE["pm32"]))], out       # after the store
    assert rc == 1, (stdout, stderr)


@needs_gdb
def test_ctrl_c_interrupts_a_running_guest(tmp_path, abi):
    # pio_out_loop with n=0 runs forever; Ctrl-C stops it, gdb ends the loop by writing
    # the loop registers, and after detach the guest finishes.
    run = KvmsysRun(tmp_path, "--guest", "pio_out_loop.real", "--n", "0", "--abi", abi)
    marker = tmp_path / "continuing"
    out = gdb_batch(run.address, f"shell touch {marker}", "continue", "p $edi", "set var $edi = 1",
                    "set var $ecx = 1", "detach", interrupt_at=(marker, 1.0))
    rc, stdout, stderr = run.wait()
    assert "received signal SIGINT" in out, out
    assert values(out) == ["0"], out
    assert rc == 1 and "STOP, exit status 1" in stdout, (stdout, stderr)


@needs_gdb
def test_smp_guest_one_thread_per_vcpu(tmp_path, abi):
    run = KvmsysRun(tmp_path, "--guest", "smp_counter.pm32", "--vcpus", "2", "--n", "50",
                    "--abi", abi, address="127.0.0.1:0")
    out = gdb_batch(run.address, "info threads", "thread apply all p/x $esp",
                    f"hbreak *{L.LOAD_ADDR + 4:#x}", "continue", "p/x $pc", "delete", "detach")
    rc, stdout, stderr = run.wait()
    assert re.search(r"Thread 1 \(vCPU 0\)", out) and re.search(r"Thread 2 \(vCPU 1\)", out), out
    # each thread shows its own vCPU's registers: the per-vCPU stacks of the SMP guests
    stacks = dict(re.findall(r"\(vCPU (\d)\)\):\n\$\d+ = (0x[0-9a-f]+)", out))
    assert stacks == {"0": hex(L.smp_stack_top(0)), "1": hex(L.smp_stack_top(1))}, out
    assert "hit Breakpoint 1," in out or "Breakpoint 1, " in out, out
    assert values(out)[-1] == hex(L.LOAD_ADDR + 4), out
    assert rc == 1 and "2 vCPU(s): STOP, exit status 1" in stdout, (stdout, stderr)


@needs_gdb
def test_firmware_real_mode_pc_is_linear(tmp_path):
    # The reset vector F000:FFF0 with CS base 0xFFFF0000: gdb's PC is the linear address.
    fw = Path(kvmsys.guests.__file__).parent / "firmware" / "hello.bin"
    run = KvmsysRun(tmp_path, "--firmware", str(fw), "--abi", "fd")
    out = gdb_batch(run.address, "p/x $pc", "break *0xfffff000", "continue", "p/x $pc", "stepi",
                    "p/x $pc", "detach")
    rc, stdout, stderr = run.wait()
    assert values(out) == ["0xfffffff0", "0xfffff000", "0xfffff001"], out
    assert rc == 0x21 and "hello from the reset vector" in stdout, (stdout, stderr)


def test_ctrl_c_while_waiting_for_gdb(tmp_path):
    run = KvmsysRun(tmp_path, "--guest", "compute.pm32")
    run.proc.send_signal(signal.SIGINT)
    rc, stdout, stderr = run.wait(timeout=10)
    assert rc == 130 and "interrupted" in stderr, (rc, stdout, stderr)


@needs_gdb
def test_memory_registers_virtual_and_physical(tmp_path):
    image = get("compute.long64").image
    run = KvmsysRun(tmp_path, "--guest", "compute.long64", "--n", "3", "--abi", "sys")
    out = gdb_batch(run.address,
                    f"p/x *(unsigned int *){L.LOAD_ADDR:#x}",
                    "set var *(unsigned char *)0x1100 = 0x5a",
                    "monitor phys", "p/x *(unsigned char *)0x1100",
                    f"p/x *(unsigned int *){L.LOAD_ADDR:#x}",
                    "monitor virt", "p/x *(unsigned long *)0x40000000",
                    "set var $rbx = 0x1122334455667788", "p/x $rbx", "p $st0", "p/x $fctrl",
                    "set var $xmm15.v4_int32[2] = 7", "set var $st1 = 1.5", "p $xmm15.v4_int32",
                    "p $st1", "set var $fs_base = 0x1000", "p/x $fs_base", "p $eflags",
                    "p/x $mxcsr", "set var $mxcsr = 0x1f00", "p/x $mxcsr", "p $xmm15.v4_int32", "detach")
    rc, stdout, stderr = run.wait()
    word = hex(int.from_bytes(image[:4], "little"))
    v = values(out)
    assert v[:3] == [word, "0x5a", word], out
    assert "memory by guest-physical address" in out and "memory by guest-virtual address" in out
    assert "Cannot access memory at address 0x40000000" in out, out      # not mapped
    assert v[3:] == ["0x1122334455667788", "0", "0x37f",                # x87 reset: FCW 0x37f
                     "{0, 0, 7, 0}", "1.5",                               # SSE and x87 written
                     "0x1000", "[ ]",                                     # FS base; EFLAGS by flag
                     "0x1f80", "0x1f00", "{0, 0, 7, 0}"], out             # MXCSR (XSAVE), xmm kept
    assert rc == 1, (stdout, stderr)


# --- in process, over the protocol ---------------------------------------------------

class Client:
    """A minimal remote-protocol client (acks on)."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(address)
        self.sock.settimeout(30)
        self.conn = Connection(self.sock)

    def ask(self, payload):
        self.conn.send(payload)
        return self.conn.read().decode()


@pytest.mark.parametrize("mode", ("real", "long64"))
def test_api_in_process(tmp_path, abi, mode):
    path = str(tmp_path / "s")
    server = GdbServer(path, vcpus=1)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "r", runner.run_guest(f"compute.{mode}", abi=abi, gdb=server, n=5)))
    t.start()
    try:
        c = Client(path)
        assert c.ask("qSupported:swbreak+;hwbreak+").startswith("PacketSize=")
        assert c.ask("?") == "T05thread:1;"
        xml = ""
        while True:                                     # in chunks, as gdb reads it
            chunk = c.ask(f"qXfer:features:read:target.xml:{len(xml):x},400")
            assert chunk[0] in "ml"
            xml += chunk[1:]
            if chunk[0] == "l":
                break
        assert xml.encode() == target.target_xml(mode)
        root = ET.fromstring(xml)
        regs = root.findall("./feature/reg")
        assert root.find("architecture").text == {"real": "i8086", "long64": "i386:x86-64"}[mode]
        assert [r.get("name") for r in regs] == [r.name for r in target.registers(mode)]
        g = c.ask("g")
        assert len(g) == 2 * sum(r.bits // 8 for r in target.registers(mode))
        pc = target.registers(mode)[16 if mode == "long64" else 8]
        off = sum(r.bits // 8 for r in target.registers(mode)[:16 if mode == "long64" else 8])
        assert int.from_bytes(bytes.fromhex(g[2 * off:2 * off + pc.bits // 4]), "little") == L.LOAD_ADDR
        assert bytes.fromhex(c.ask(f"m{L.LOAD_ADDR:x},4")) == get(f"compute.{mode}").image[:4]
        at = store_address(mode)
        assert c.ask(f"Z1,{at:x},1") == "OK"
        assert c.ask("vCont;c") == "T05thread:1;hwbreak:;"
        assert c.ask(f"z1,{at:x},1") == "OK"
        assert c.ask("vCont;s:1") == "T05thread:1;"
        for bad in ("H", "m", "mzz,4", "M1000,2:00", "Z1,zz", "pzz", "P0=zz", "Hg99", "T7",
                    f"m{L.MMIO_BASE:x},4", "qXfer:features:read:target.xml:zz", "G00"):
            assert c.ask(bad)[:1] in ("E", ""), bad      # an error reply, the server goes on
        assert c.ask("?") == "T05thread:1;"
        c.conn.send("D")
        assert c.conn.read() == b"OK"
        t.join(30)
        assert result["r"].status == 1
    finally:
        server.close()
        t.join(30)


def test_kill_from_gdb_ends_the_run(tmp_path, abi):
    path = str(tmp_path / "s")
    server = GdbServer(path, vcpus=1)
    errors = []

    def target_run():
        try:
            runner.run_guest("pio_out_loop.pm32", abi=abi, gdb=server, n=0)
        except GdbKilled as e:
            errors.append(e)
    t = threading.Thread(target=target_run)
    t.start()
    try:
        c = Client(path)
        c.conn.send("vCont;c")
        time.sleep(0.3)
        c.sock.sendall(INTERRUPT)
        assert c.conn.read() == b"T02thread:1;"
        c.conn.send("k")
        t.join(30)
        assert len(errors) == 1
    finally:
        server.close()
        t.join(30)


@pytest.mark.nokvm
def test_framing():
    assert checksum(b"OK") == 0x9A
    assert frame(b"OK") == b"$OK#9a"
    raw = b"a$b#c}d*e"
    assert escape(raw) == b"a}\x04b}\x03c}]d}\x0ae"
    assert unescape(escape(raw)) == raw
    a, b = socket.socketpair()
    with a, b:
        conn = Connection(b)
        a.sendall(b"+$m1000,4#ff$m1000,4#" + b"%02x" % checksum(b"m1000,4") + b"\x03")
        assert conn.read() == b"m1000,4"            # the bad one was refused with '-'
        assert conn.read() == INTERRUPT
        assert a.recv(10) == b"-+"
        a.close()
        assert conn.read() is None


@pytest.mark.nokvm
@pytest.mark.parametrize("mode", ("real", "pm32", "long64"))
def test_target_description(mode):
    root = ET.fromstring(target.target_xml(mode))
    feature = root.find("feature")
    assert feature.get("name") == "org.gnu.gdb.i386.core"
    names = [r.get("name") for r in feature.findall("reg")]
    pc = "rip" if mode == "long64" else "eip"
    assert names.index(pc) == (16 if mode == "long64" else 8)
    assert names[-8:] == ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    assert target.mode_of({"efer": 0x500, "cr0": 0x80000011}) == "long64"
    assert target.mode_of({"efer": 0, "cr0": 0x11}) == "pm32"
    assert target.mode_of({"efer": 0, "cr0": 0x10}) == "real"


def test_gdb_going_away_lets_the_guest_finish(tmp_path, abi):
    # No detach: gdb's connection ends while the guest runs with a breakpoint set.
    path = str(tmp_path / "s")
    server = GdbServer(path, vcpus=1)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "r", runner.run_guest("compute.pm32", abi=abi, gdb=server, n=200_000)))  # seconds of guest time
    t.start()
    try:
        c = Client(path)
        assert c.ask(f"Z1,{store_address('pm32'):x},1") == "OK"
        c.conn.send("vCont;c")
        c.sock.close()
        t.join(60)
        assert result["r"].status == 1 and result["r"].exits.get("DEBUG", 0) == 0
    finally:
        server.close()
        t.join(30)


def test_breakpoints_beyond_the_debug_registers(tmp_path, fdvm):
    # With int3 breakpoints any number works; with debug registers the fifth is refused.
    path = str(tmp_path / "s")
    server = GdbServer(path, vcpus=1)
    from kvmsys.runner import setup_devices
    setup_devices(fdvm)
    v = fdvm.create_vcpu(0)
    L.prepare(get("compute.pm32"), v, fdvm.memory(0), n=3)

    def vcpu_thread():
        with server.attach(v, v.run) as run:
            while run(timeout=30).name not in ("STOP", "DEADLINE"):
                pass
    t = threading.Thread(target=vcpu_thread)
    t.start()
    try:
        c = Client(path)
        c.ask("?")
        replies = [c.ask(f"Z0,{L.LOAD_ADDR + 0x100 + i:x},1") for i in range(5)]
        if server.sw_bp_native:
            assert replies == ["OK"] * 5
        else:
            assert replies == ["OK"] * 4 + ["E1c"]
            assert c.ask(f"Z1,{L.LOAD_ADDR:x},1") == "E1c"
        for i in range(5):
            assert c.ask(f"z0,{L.LOAD_ADDR + 0x100 + i:x},1") == "OK"
        assert bytes.fromhex(c.ask(f"m{L.LOAD_ADDR + 0x100:x},5")) == bytes(fdvm.memory(0)[L.LOAD_ADDR + 0x100:L.LOAD_ADDR + 0x105])
        c.conn.send("D")
        assert c.conn.read() == b"OK"
        t.join(30)
    finally:
        server.close()
        t.join(30)


@pytest.mark.nokvm
@pytest.mark.parametrize("bad", ["nohost", "host:port", "127.0.0.1:70000", ""])
def test_bad_gdb_address_is_refused(bad):
    from kvmsys.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError):
        GdbServer(bad)
    p = subprocess.run([sys.executable, "-m", "kvmsys", "run", "--guest", "compute.pm32", "--gdb", bad],
                       capture_output=True, text=True, timeout=60,
                       cwd=tempfile.gettempdir())   # not the source tree: the installed package
    assert p.returncode == 2 and "gdb address" in p.stderr, (p.returncode, p.stderr)


@pytest.mark.nokvm
def test_gdb_server_never_replaces_a_file_and_reports_a_busy_port(tmp_path):
    from kvmsys.errors import InvalidArgumentError
    f = tmp_path / "notasocket"
    f.write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="cannot listen"):
        GdbServer(str(f))
    assert f.read_text() == "keep me"
    with GdbServer("127.0.0.1:0") as server:
        with pytest.raises(InvalidArgumentError, match="cannot listen"):
            GdbServer(server.address)


def test_gdb_server_refuses_a_second_attach_of_one_vcpu(tmp_path, fdvm):
    from kvmsys.errors import InvalidArgumentError
    with GdbServer(str(tmp_path / "s")) as server:
        v = fdvm.create_vcpu(0)
        with server.attach(v, v.run):
            with pytest.raises(InvalidArgumentError):
                with server.attach(v, v.run):
                    pass


# --- the gdb client is untrusted ---------------------------------------------------------
class Debugged:
    """compute.real under an in-process gdb server, a Client connected to it."""

    def __init__(self, tmp_path, abi):
        path = str(tmp_path / "s")
        self.server = GdbServer(path, vcpus=1)
        self.result = {}
        self.thread = threading.Thread(target=lambda: self.result.setdefault(
            "r", runner.run_guest("compute.real", abi=abi, gdb=self.server, n=5)))
        self.thread.start()
        self.client = Client(path)

    def finish(self):
        """Detach: the guest runs to its end, as it would have without the bad packets."""
        self.client.conn.send("D")
        assert self.client.conn.read() == b"OK"
        self.thread.join(30)
        assert self.result["r"].status == 1

    def close(self):
        self.server.close()
        self.thread.join(30)


@pytest.fixture
def debugged(tmp_path, abi):
    d = Debugged(tmp_path, abi)
    yield d
    d.close()


def raw_reply(sock) -> bytes:
    """The next packet's payload from the server, skipping its acks and NAKs."""
    conn = Connection(sock)
    return conn.read()


def test_malformed_packets_get_a_nak_and_the_session_goes_on(debugged):
    c = debugged.client
    assert c.ask("?") == "T05thread:1;"
    for body in (b"m0,4}", b"}", b"qSupported}"):               # the payload ends inside an escape
        c.sock.sendall(b"$" + body + b"#%02x" % checksum(body))
        assert c.sock.recv(1) == b"-"
        assert c.ask("?") == "T05thread:1;"
    c.sock.sendall(b"$?#zz")                                    # not a checksum
    assert c.sock.recv(1) == b"-"
    assert c.ask("qC") == "QC1"
    debugged.finish()


def test_packets_longer_than_packet_size_are_dropped_and_memory_stays_bounded(debugged):
    """A client that sends '$' and never '#' (here 64 MiB of it) grows nothing: the
    server keeps at most a few PacketSize of it, NAKs it, and answers the next packet."""
    import psutil
    c = debugged.client
    packet_size = int(re.search(r"PacketSize=([0-9a-f]+)", c.ask("qSupported:swbreak+")).group(1), 16)
    rss = psutil.Process().memory_info().rss
    c.sock.sendall(b"$")
    for _ in range(64):
        c.sock.sendall(b"A" * (1 << 20))                        # the server has read all but a socket buffer
    assert psutil.Process().memory_info().rss - rss < 16 << 20
    c.sock.sendall(b"#00" + frame(b"?"))
    assert raw_reply(c.sock) == b"T05thread:1;"
    body = b"m0," + b"0" * (packet_size + 10) + b"4"            # one packet over PacketSize
    c.sock.sendall(b"$" + body + b"#%02x" % checksum(body) + frame(b"qC"))
    assert raw_reply(c.sock) == b"QC1"
    debugged.finish()


@pytest.mark.parametrize("packet", [
    "Z1,10000000000000000,1", "Z1,-1,1", "Z1,800000000000,1", "Z0,-1,1", "Z2,-8,4",
    "Z1,ffff7fffffffffff,1", "z1,-1,1", "m-1,4", "m0,-4", "m10000000000000000,1",
    "M-1,1:00", "p-1", "P-1=00", "Hg-5", "qXfer:features:read:target.xml:-1,10", "vCont;c:-1x",
])
def test_bad_addresses_and_lengths_are_refused_when_they_arrive(debugged, packet):
    """Every number is checked when its packet arrives: an error reply, and the guest
    runs on to its end (Z1 at 2**64 or -1 used to be OK and end the run at the next
    continue)."""
    c = debugged.client
    reply = c.ask(packet)
    assert reply.startswith("E"), (packet, reply)
    assert c.ask("?") == "T05thread:1;"
    assert c.ask("vCont;s") == "T05thread:1;"                  # the vCPU still runs
    debugged.finish()
