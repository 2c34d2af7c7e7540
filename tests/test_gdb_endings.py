"""gdb sees every ending of the guest (the final W/X reply reaches it, and the server
waits for gdb to close before it goes), and --gdb offers both of QEMU's starts: waiting
for gdb before the first instruction (-s -S) and running at once (-s)."""
import threading
import time
import pytest

from kvmsys import runner
from kvmsys.gdb import GdbServer

from kvmsys.gdb import target
from kvmsys.guests import layout as L

from test_gdb import Client, KvmsysRun, gdb_batch, needs_gdb



def _pc(client, mode):
    regs = target.registers(mode)
    n = 16 if mode == "long64" else 8
    g = client.ask("g")
    off = sum(r.bits // 8 for r in regs[:n])
    return int.from_bytes(bytes.fromhex(g[2 * off:2 * off + regs[n].bits // 4]), "little")


def test_the_exit_reply_waits_for_gdb_to_close(tmp_path, abi):
    """The guest's exit status reaches gdb (W01), and kvmsys stays until gdb has closed
    the connection, so the reply is never cut off by the server's close."""
    run = KvmsysRun(tmp_path, "--guest", "hello.pm32", "--abi", abi)
    c = Client(run.address)
    assert c.ask("?") == "T05thread:1;"
    assert c.ask("vCont;c") == "W01"
    time.sleep(1.0)
    assert run.proc.poll() is None, "kvmsys closed before gdb did"
    c.sock.close()
    rc, stdout, stderr = run.wait(timeout=30)
    assert rc == 1 and "STOP, exit status 1" in stdout, (stdout, stderr)


def test_a_client_that_never_closes_does_not_hold_kvmsys(tmp_path):
    run = KvmsysRun(tmp_path, "--guest", "hello.pm32")
    c = Client(run.address)
    t0 = time.monotonic()
    assert c.ask("vCont;c") == "W01"
    rc, stdout, stderr = run.wait(timeout=30)           # the socket stays open meanwhile
    assert rc == 1 and time.monotonic() - t0 < 15, (stdout, stderr)
    c.sock.close()


def test_a_run_ended_by_until_reaches_gdb_as_a_normal_exit(tmp_path):
    # at the reset vector: "ok" to the UART (mov dx,0x3f8; mov al,'o'; out; mov al,'k'; out),
    # then a loop that never ends (jmp $): only the match ends the run
    code = b"\xba\xf8\x03\xb0o\xee\xb0k\xee\xeb\xfe"
    fw = tmp_path / "ok.bin"
    fw.write_bytes(b"\xf4" * (4096 - 16) + code.ljust(16, b"\xf4"))
    run = KvmsysRun(tmp_path, "--firmware", str(fw), "--until", "ok", "--timeout", "60")
    c = Client(run.address)
    t0 = time.monotonic()
    assert c.ask("vCont;c") == "W00"                    # the command line exits 0 too
    c.sock.close()
    rc, stdout, stderr = run.wait(timeout=60)
    assert rc == 0 and "MATCHED" in stdout, (stdout, stderr)
    assert time.monotonic() - t0 < 30                   # ended by the match, not the deadline


@needs_gdb
def test_gdb_prints_the_exit_code(tmp_path, abi):
    run = KvmsysRun(tmp_path, "--guest", "hello.long64", "--abi", abi)
    out = gdb_batch(run.address, "continue")
    rc, stdout, stderr = run.wait()
    assert "exited with code 01" in out and "Remote connection closed" not in out, out
    assert rc == 1, (stdout, stderr)


def test_nowait_runs_the_guest_before_gdb_attaches(tmp_path):
    """--gdb ADDRESS,nowait: the guest runs at once (it is well past its first instruction
    when gdb comes) and stops when gdb attaches; detached, it runs on."""
    run = KvmsysRun(tmp_path, "--guest", "pio_out_loop.pm32", "--n", "0", "--timeout", "60",
                    address=str(tmp_path / "gdb.sock") + ",nowait")
    try:
        assert run.address == str(tmp_path / "gdb.sock")
        time.sleep(1.0)
        c = Client(run.address)
        assert c.ask("?").startswith("T")
        first = _pc(c, "pm32")
        assert first != L.LOAD_ADDR                     # it ran before gdb came
        assert _pc(c, "pm32") == first                  # and is stopped now
        c.conn.send("D")
        assert c.conn.read() == b"OK"
        time.sleep(0.5)
        assert run.proc.poll() is None                  # it runs on (n=0: forever)
    finally:
        run.proc.kill()
        run.wait()


def test_the_default_waits_before_the_first_instruction(tmp_path):
    run = KvmsysRun(tmp_path, "--guest", "pio_out_loop.pm32", "--n", "0", "--timeout", "60")
    try:
        time.sleep(1.0)
        c = Client(run.address)
        assert c.ask("?") == "T05thread:1;"
        assert _pc(c, "pm32") == L.LOAD_ADDR
    finally:
        run.proc.kill()
        run.wait()


def test_gdb_that_comes_after_the_guest_ended_is_told_how_it_ended(tmp_path, abi):
    """wait=False: a gdb that connects once every vCPU has ended (before the server is
    closed) gets the guest's ending to its stop query, not a server thread that dies."""
    path = str(tmp_path / "s")
    died = []
    hook, threading.excepthook = threading.excepthook, lambda a: died.append(a.exc_value)
    server = GdbServer(path, vcpus=1, wait=False)
    try:
        result = runner.run_guest("hello.pm32", abi=abi, gdb=server)
        assert result.reason == "STOP" and result.status == 1
        c = Client(path)
        assert c.ask("qSupported:swbreak+;hwbreak+") == ""
        assert c.ask("?") == "W01"
        c.sock.close()
        server._thread.join(10)
        assert not server._thread.is_alive() and not died, died
    finally:
        threading.excepthook = hook
        server.close()
