"""Python handlers with read/write callbacks (`vm.add_handler(..., read=, write=)`), over
both ABIs: each access reaches its callback decoded (address, value, size as ints), a
read's answer reaches the guest, string I/O is one call per element, a batched write one
call per ring entry, a bad answer is a typed error out of run(), a direction without its
callback goes as in a range without a callback."""
import random
import signal
import struct
import threading
import time

import pytest

from kvmsys import (AccessOps, ArgumentTypeError, CoalescedExit, DeadlineExit, InvalidArgumentError, IoExit, KickExit, Kind,
                    MmioExit, Space, StateError, StopExit)
from kvmsys.guests import layout as L
from test_wrappers import debug_exit_port, load_code, out, status

PORT = 0x80
MMIO = 0xD000_0000
SCRATCH = L.DATA_ADDR + 0x100       # guest RAM the code stores what it read to
END = out(L.PORT_DEBUG_EXIT, 0)


def a32(x):
    return struct.pack("<I", x)


def in_store(size, port, at):
    """in al/ax/eax, port; mov [at], al/ax/eax"""
    op16 = b"\x66" if size == 2 else b""
    return op16 + bytes([0xE4 if size == 1 else 0xE5, port]) + op16 + (b"\xA2" if size == 1 else b"\xA3") + a32(at)


def mmio_load_store(addr, at):
    """mov eax, [addr]; mov [at], eax"""
    return b"\xA1" + a32(addr) + b"\xA3" + a32(at)


def mmio_store(size, addr, value):
    """mov byte/dword [addr], value"""
    return (b"\xC6\x05" + a32(addr) + bytes([value])) if size == 1 else (b"\xC7\x05" + a32(addr) + a32(value))


def rep_string(op, port, addr, n):
    """mov dx, port; mov ecx, n; mov esi/edi, addr; cld; rep ins/outs (op: 0x6C insb, 0x6E outsb)"""
    return (b"\x66\xBA" + struct.pack("<H", port) + b"\xB9" + a32(n)
            + (b"\xBF" if op == 0x6C else b"\xBE") + a32(addr) + b"\xFC\xF3" + bytes([op]))


def run_to_end(m):
    ex = m.run(timeout=10)
    assert isinstance(ex, StopExit) and ex.status == status(0), ex


def test_writes_arrive_decoded_in_order(machine):
    m = machine
    debug_exit_port(m.vm)
    code = (out(PORT, 1) + out(PORT, 0xFF) + mmio_store(4, MMIO, 0xDEADBEEF) + mmio_store(1, MMIO + 3, 0x5A)
            + mmio_store(4, MMIO + 8, 0x12345678) + mmio_store(4, MMIO, 7) + END)
    load_code(m.vcpu, m.mem, code)
    seen = []
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=lambda a, s, v: seen.append((a, v, s)))
    m.vm.add_handler(Space.MMIO, MMIO, MMIO + 0x1000, Kind.PYTHON, write=lambda a, s, v: seen.append((a, v, s)))
    run_to_end(m)
    # the addresses change between accesses: each call gets its own (an int reused
    # for the same address must never show an old one)
    assert seen == [(PORT, 1, 1), (PORT, 0xFF, 1), (MMIO, 0xDEADBEEF, 4), (MMIO + 3, 0x5A, 1),
                    (MMIO + 8, 0x12345678, 4), (MMIO, 7, 4)]


def test_a_reads_answer_reaches_the_guest(machine):
    m = machine
    debug_exit_port(m.vm)
    code = (in_store(1, PORT, SCRATCH) + in_store(2, PORT + 1, SCRATCH + 4) + in_store(4, PORT + 2, SCRATCH + 8)
            + mmio_load_store(MMIO + 0x10, SCRATCH + 12) + END)
    load_code(m.vcpu, m.mem, code)
    answers = {(PORT, 1): 0xA5, (PORT + 1, 2): 0xBEEF, (PORT + 2, 4): 0xCAFEF00D, (MMIO + 0x10, 4): 0x89ABCDEF}
    asked = []

    def read(address, size):
        asked.append((address, size))
        return answers[address, size]
    m.vm.add_handler(Space.PIO, PORT, PORT + 3, Kind.PYTHON, read=read)
    m.vm.add_handler(Space.MMIO, MMIO, MMIO + 0x1000, Kind.PYTHON, read=read)
    run_to_end(m)
    assert asked == list(answers)
    assert struct.unpack_from("<BxxxHxxII", m.mem, SCRATCH) == tuple(answers.values())


def test_string_io_is_one_call_per_element(machine):
    m = machine
    debug_exit_port(m.vm)
    pattern = bytes([3, 1, 4, 1, 5, 9, 2, 6])
    code = rep_string(0x6E, PORT, SCRATCH, len(pattern)) + rep_string(0x6C, PORT, SCRATCH + 0x40, 6) + END
    load_code(m.vcpu, m.mem, code)
    m.mem[SCRATCH:SCRATCH + len(pattern)] = pattern
    written, reads = [], iter(range(0x40, 0x100))
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON,
                     read=lambda a, s: next(reads), write=lambda a, s, v: written.append((a, v, s)))
    run_to_end(m)
    assert written == [(PORT, b, 1) for b in pattern]
    assert bytes(m.mem[SCRATCH + 0x40:SCRATCH + 0x46]) == bytes(range(0x40, 0x46))


def test_a_callback_that_replaces_its_own_handler_finishes_the_access(machine):
    # The run loop holds the handler it called: the default AccessOps, referenced by
    # nothing but the VM, is replaced (and so released by the VM) from its own first
    # callback of a string OUT, and a range handler removed from its own.  Every element
    # still arrives, in order, to the old handler until the switch and to the new one
    # after (the rest of one string access goes to the old one; a host whose emulator
    # exits once per element sends those to the new one), never lost or twice
    m = machine
    debug_exit_port(m.vm)
    pattern = bytes([7, 8, 9])
    load_code(m.vcpu, m.mem, rep_string(0x6E, PORT, SCRATCH, 3) + out(PORT, 4)
              + rep_string(0x6E, PORT + 1, SCRATCH, 3) + out(PORT + 1, 5) + END)
    m.mem[SCRATCH:SCRATCH + 3] = pattern
    seen = []
    m.vm.set_default(Space.PIO, Kind.PYTHON)

    def first(a, s, v):
        seen.append(("first", a, v))
        m.vm.default_handler = AccessOps(write=lambda a, s, v: seen.append(("second", a, v)))

    def ranged(a, s, v):
        seen.append(("ranged", a, v))
        m.vm.remove_handler(index[0])

    m.vm.default_handler = AccessOps(write=first)
    index = [m.vm.add_handler(Space.PIO, PORT + 1, PORT + 2, Kind.PYTHON, write=ranged)]
    run_to_end(m)
    assert [(a, v) for _, a, v in seen] == [(PORT, 7), (PORT, 8), (PORT, 9), (PORT, 4),
                                            (PORT + 1, 7), (PORT + 1, 8), (PORT + 1, 9), (PORT + 1, 5)]
    who = [w for w, _, _ in seen]
    assert who[0] == "first" and who[3] == "second" and who[4] == "ranged" and who[7] == "second"
    for old, part in (("first", who[:4]), ("ranged", who[4:])):
        switch = part.index("second")
        assert part == [old] * switch + ["second"] * (len(part) - switch), who


@pytest.mark.parametrize("answer, error", [
    (0x100, InvalidArgumentError), (-1, InvalidArgumentError), (1 << 64, InvalidArgumentError),
    ("1", ArgumentTypeError), (None, ArgumentTypeError), (1.0, ArgumentTypeError)])
def test_a_bad_answer_is_a_typed_error_and_the_vcpu_goes_on(machine, answer, error):
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, in_store(1, PORT, SCRATCH) + in_store(1, PORT, SCRATCH + 1) + END)
    answers = [answer, 0x42]
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, read=lambda a, s: answers.pop(0))
    with pytest.raises(error, match="read|value|int"):
        m.run(timeout=10)
    run_to_end(m)       # the refused read got what the comm area held (stale); the next one its answer
    assert m.mem[SCRATCH + 1] == 0x42


def outs_through(m, n, action, at):
    """Guest: out PORT, 1..n; the write callback records each value and calls action()
    at value *at*.  Returns the list it records into."""
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, b"".join(out(PORT, i) for i in range(1, n + 1)) + END)
    seen = []

    def write(address, size, value):
        seen.append(value)
        if value == at:
            action()
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=write)
    return seen


def fault():
    raise RuntimeError("device fault")


def test_a_callbacks_exception_ends_the_run_and_the_next_run_goes_on(machine):
    seen = outs_through(machine, 6, fault, 3)
    with pytest.raises(RuntimeError, match="device fault"):
        machine.run(timeout=10)
    assert seen == [1, 2, 3]
    run_to_end(machine)
    assert seen == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_inside_a_callback_ends_the_run(machine):
    # Python's handler raises at the callback's next bytecode
    seen = outs_through(machine, 6, lambda: signal.raise_signal(signal.SIGINT), 2)
    with pytest.raises(KeyboardInterrupt):
        machine.run(timeout=10)
    assert seen == [1, 2]
    run_to_end(machine)
    assert seen == [1, 2, 3, 4, 5, 6]


def test_an_access_without_its_callback_is_returned_from_run(machine):
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, out(PORT, 9) + in_store(1, PORT, SCRATCH) + mmio_load_store(MMIO, SCRATCH + 4)
              + mmio_store(4, MMIO, 5) + END)
    seen = []
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=lambda a, s, v: seen.append(v))
    m.vm.add_handler(Space.MMIO, MMIO, MMIO + 8, Kind.PYTHON, read=lambda a, s: 0x77)
    m.vm.default_handler = lambda e: pytest.fail(f"the default handler got {e}")
    ex = m.run(timeout=10)
    assert isinstance(ex, IoExit) and ex.is_in and ex.port == PORT and seen == [9]
    ex.value = 0x33
    ex = m.run(timeout=10)
    assert isinstance(ex, MmioExit) and ex.is_write and ex.address == MMIO and ex.value == 5
    run_to_end(m)
    assert m.mem[SCRATCH] == 0x33 and m.mem[SCRATCH + 4] == 0x77


def test_access_ops_as_the_default_handler(machine):
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, out(0x81, 4) + in_store(2, 0x82, SCRATCH) + mmio_load_store(MMIO + 0x20, SCRATCH + 4)
              + mmio_store(4, MMIO + 0x24, 6) + END)
    seen = []

    def read(address, size):
        seen.append(("r", address, size))
        return 0x1234 if size == 2 else 0x5678

    m.vm.set_default(Space.PIO, Kind.PYTHON)
    m.vm.set_default(Space.MMIO, Kind.PYTHON)
    m.vm.default_handler = AccessOps(read, lambda a, s, v: seen.append(("w", a, v, s)))
    run_to_end(m)
    assert seen == [("w", 0x81, 4, 1), ("r", 0x82, 2), ("r", MMIO + 0x20, 4), ("w", MMIO + 0x24, 6, 4)]
    assert struct.unpack_from("<HxxI", m.mem, SCRATCH) == (0x1234, 0x5678)


def test_batched_writes_reach_write_in_order(machine):
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, b"".join(out(PORT, i) for i in range(1, 9)) + out(PORT + 1, 0) + END)
    seen = []
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=lambda a, s, v: seen.append((a, v, s)))
    m.vm.add_handler(Space.PIO, PORT + 1, PORT + 2, Kind.IGNORE)    # an exit that drains the ring
    m.vm.register_coalesced(PORT, 1, pio=True)
    run_to_end(m)
    assert seen == [(PORT, i, 1) for i in range(1, 9)]


def test_run_from_inside_a_callback_is_refused(machine):
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, out(PORT, 1) + END)
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=lambda a, s, v: m.run(timeout=1))
    with pytest.raises(StateError, match="inside its own run"):
        m.run(timeout=10)


def test_a_callback_may_remove_its_own_handler(machine):
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, out(PORT, 1) + out(PORT, 2) + END)
    seen = []

    def write(address, size, value):
        seen.append(value)
        m.vm.remove_handler(index)
    index = m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=write)
    ex = m.run(timeout=10)          # the second out falls to the PYTHON default: returned
    assert seen == [1] and isinstance(ex, IoExit) and ex.value == 2


def r0(a, s):
    return 0


@pytest.mark.parametrize("space, kind, kwargs, error", [
    (Space.PIO, Kind.SINK, dict(read=r0), "only a Python handler"),
    (Space.PIO, Kind.CONST, dict(callback=AccessOps(r0)), "only a Python handler"),
    (Space.PIO, Kind.PYTHON, dict(read=r0, callback=lambda e: None), "not both"),
    (Space.MSR, Kind.PYTHON, dict(write=lambda a, s, v: None), "not MSRs"),
    (Space.MSR, Kind.PYTHON, dict(callback=AccessOps(r0)), "not MSRs"),
    (Space.PIO, Kind.PYTHON, dict(read=5), "read must be callable"),
    (Space.MMIO, Kind.PYTHON, dict(write="w"), "write must be callable"),
    (Space.MMIO, Kind.PYTHON, dict(callback=3), "callback must be callable, an AccessOps or None, not int"),
])
def test_add_handler_refuses_bad_callbacks(machine, space, kind, kwargs, error):
    n = len(machine.vm.handlers())
    with pytest.raises(InvalidArgumentError, match=error):
        machine.vm.add_handler(space, 0x80, 0x81, kind, **kwargs)
    assert len(machine.vm.handlers()) == n


def test_access_ops_values(machine):
    i = machine.vm.add_handler(Space.MMIO, MMIO, MMIO + 4, Kind.PYTHON, read=r0)
    ops = machine.vm.handlers()[i][5]
    assert type(ops) is AccessOps and ops.read is r0 and ops.write is None and "read=" in repr(ops)
    for args, error in [((), "read, write or both"), ((None, None), "read, write or both"),
                        ((1,), "read must be callable"), ((None, 1), "write must be callable")]:
        with pytest.raises(InvalidArgumentError, match=error):
            AccessOps(*args)
    with pytest.raises(ArgumentTypeError, match="default_handler"):
        machine.vm.default_handler = 5
    machine.vm.default_handler = ops
    assert machine.vm.default_handler is ops
    with pytest.raises(ArgumentTypeError, match="callback must be callable or None, not AccessOps"):
        machine.vm.set_hlt_action(Kind.PYTHON, ops)     # HLT has no access to decode
    with pytest.raises(ArgumentTypeError, match="callback must be callable, an AccessOps or None, not int"):
        machine.vm.add_handler(Space.PIO, 0x80, 0x81, Kind.PYTHON, callback=7)


def test_a_write_that_returns_true_makes_run_return_the_access(machine):
    """As Device.write and an exit callback: a true value returns the exit from run();
    every element of a string write still reaches the device first."""
    m = machine
    debug_exit_port(m.vm)
    pattern = bytes([1, 2, 3, 4])
    load_code(m.vcpu, m.mem, out(PORT, 7) + mmio_store(4, MMIO, 0xABCD) + rep_string(0x6E, PORT, SCRATCH, 4) + END)
    m.mem[SCRATCH:SCRATCH + 4] = pattern
    seen = []

    def write(address, size, value):
        seen.append(value)
        return value in (7, 0xABCD, 2)
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=write)
    m.vm.add_handler(Space.MMIO, MMIO, MMIO + 4, Kind.PYTHON, write=write)
    ex = m.run(timeout=10)
    assert isinstance(ex, IoExit) and not ex.is_in and ex.value == 7 and seen == [7]
    ex = m.run(timeout=10)
    assert isinstance(ex, MmioExit) and ex.is_write and ex.value == 0xABCD and seen == [7, 0xABCD]
    ex = m.run(timeout=10)
    # KVM may hand `rep outsb` over in one exit or in several: the stop comes at the
    # end of the exit that held the element which asked for it
    assert isinstance(ex, IoExit) and seen[:4] == [7, 0xABCD, 1, 2]
    run_to_end(m)
    assert seen == [7, 0xABCD, 1, 2, 3, 4]


def test_a_batched_write_that_returns_true_makes_run_return_it(machine):
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, b"".join(out(PORT, i) for i in range(1, 5)) + out(PORT + 1, 0) + END)
    seen = []
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=lambda a, s, v: seen.append(v) or v == 2)
    m.vm.add_handler(Space.PIO, PORT + 1, PORT + 2, Kind.IGNORE)
    m.vm.register_coalesced(PORT, 1, pio=True)
    ex = m.run(timeout=10)
    assert isinstance(ex, CoalescedExit) and ex.value == 2 and seen == [1, 2]
    run_to_end(m)
    assert seen == [1, 2, 3, 4]


def test_a_kick_from_inside_a_callback_is_not_lost(machine):
    handle = machine.vcpu.handle()
    seen = outs_through(machine, 4, handle.kick, 2)
    ex = machine.run(timeout=10)
    assert isinstance(ex, KickExit) and seen == [1, 2]
    run_to_end(machine)
    assert seen == [1, 2, 3, 4]


def test_kicks_racing_with_exits_that_go_to_python_are_each_seen(machine):
    # Every exit goes to a write callback, so run() leaves the C loop and enters it again
    # at each one: kicks from another thread land anywhere on that path (the callback,
    # which lets the kicker in by releasing the GIL as a device model doing I/O would, the
    # loop's entry before or after `running`, KVM_RUN itself), and each one is seen (run()
    # returns KickExit) and none is invented.  (Without the loop reading kick_pending at
    # its entry, kicks that land in the callback are lost: checked.)
    m = machine
    loop = out(PORT, 1)
    load_code(m.vcpu, m.mem, loop + b"\xEB" + bytes([(-(len(loop) + 2)) & 0xFF]))     # jmp back
    calls = [0]

    def write(address, size, value):
        calls[0] += 1
        time.sleep(0)               # releases the GIL

    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, write=write)
    handle = m.vcpu.handle()
    n, go, rng, failed = 300, threading.Semaphore(0), random.Random(20), []

    def kicker():
        try:
            for _ in range(n):
                if not go.acquire(timeout=20):
                    return
                end = time.perf_counter() + rng.uniform(0, 150e-6)    # a few exits in
                while time.perf_counter() < end:
                    pass
                handle.kick()
        except BaseException as e:      # (reported by the main thread)
            failed.append(e)

    t = threading.Thread(target=kicker)
    t.start()
    try:
        for i in range(n):
            go.release()
            ex = m.run(timeout=10)
            assert isinstance(ex, KickExit), f"kick {i}: {ex!r}"
    finally:
        t.join(30)
    assert not failed and not t.is_alive()
    assert isinstance(m.run(timeout=0.05), DeadlineExit)     # nothing left over
    assert calls[0] > n


def test_a_callback_that_rewrites_the_comm_area_mid_string_cannot_derail_it(machine):
    """The comm area is writable from Python while a string access is being handed to the
    callbacks: the direction, port and element size are read once, and every element is
    bounds-checked again, so a callback scribbling over io.direction/size/data_offset
    changes nothing about the calls still to come (and never reaches outside the map)."""
    from kvmsys import _core
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, rep_string(0x6C, PORT, SCRATCH, 6) + END)
    io = _core.KVM_RUN_LAYOUT["exit_union"]           # struct kvm_io: direction, size, port, count, data_offset
    area = m.vcpu.comm_area
    calls = []

    def read(address, size):
        calls.append((address, size))
        if len(calls) == 2:
            area[io] = 1                                   # KVM_EXIT_IO_OUT
            area[io + 1] = 4
            struct.pack_into("<Q", area, io + 8, len(area) - 1)     # data_offset: the map's last byte
        return 0x60 + len(calls)
    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, read=read)
    try:
        run_to_end(m)
    finally:
        area.release()
    assert calls == [(PORT, 1)] * 6
    # every answer went where KVM takes the string from (its own record of the access,
    # not the scribbled comm area)
    assert bytes(m.mem[SCRATCH:SCRATCH + 6]) == bytes(range(0x61, 0x67))
