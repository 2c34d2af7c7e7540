"""The exit a Python handler is given, over both ABIs: the run loop reuses the previous
exit object when nothing else refers to it, and keeps one view of the comm area to slice
`data` from.  Neither may be visible: an exit a handler keeps is its own, goes stale at
the next run, and never shows a later exit; a `data` slice kept past the vCPU's end is
still safe to read."""
import pytest

from kvmsys import (ExitReason, HltExit, InvalidArgumentError, IoExit, Kind, MmioExit, Space,
                    StaleVcpuError)
from kvmsys.guests import layout as L
from test_wrappers import debug_exit_port, load_code, out, status

PORT = 0x80
MMIO_ADDR = 0xD000_0000
N = 24


def outs(n):
    return b"".join(out(PORT, i) for i in range(1, n + 1)) + out(L.PORT_DEBUG_EXIT, 0)


def mmio_reads(n):
    """mov al, [MMIO_ADDR] n times (a read the handler answers), then the debug exit."""
    return b"".join(b"\x8A\x05" + MMIO_ADDR.to_bytes(4, "little") for _ in range(n)) \
        + out(L.PORT_DEBUG_EXIT, 0)


@pytest.mark.parametrize("keep_every", [1, 2, 3])
def test_kept_exits_are_distinct_and_go_stale(machine, keep_every):
    """The handler keeps every k-th exit: each kept one is a different object, shows the
    exit it was given until the next run, and is stale after it (a reused object would
    show a later port value or pass the staleness check)."""
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, outs(N))
    seen, kept = [], []

    def handler(ex):
        assert isinstance(ex, IoExit) and ex.port == PORT
        for old, value in kept:
            with pytest.raises(StaleVcpuError):
                old.port
        v = ex.value
        seen.append(v)
        if v % keep_every == 0:
            kept.append((ex, v))
        return None

    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, callback=handler)
    ex = m.run(timeout=10)
    assert getattr(ex, "status", None) == status(0), ex
    assert seen == list(range(1, N + 1))
    assert len({id(e) for e, _ in kept}) == len(kept) == N // keep_every
    assert all(type(e) is IoExit for e, _ in kept)
    assert ex not in [e for e, _ in kept]


def test_exit_kept_only_through_its_data_is_not_reused(machine):
    """A handler that keeps only `ex.data` (a slice of the comm area) keeps no exit object,
    so the exit is reused: the slice still reads what KVM put in the comm area then."""
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, outs(N))
    datas = []

    def handler(ex):
        d = ex.data
        assert bytes(d) == bytes([len(datas) + 1])
        datas.append(d)

    m.vm.add_handler(Space.PIO, PORT, PORT + 1, Kind.PYTHON, callback=handler)
    assert getattr(m.run(timeout=10), "status", None) == status(0)
    assert len(datas) == N
    # each slice is a window on the live comm area: it reads the data of the last PIO out
    # there (the debug exit's), never freed memory
    assert all(len(d) == 1 for d in datas)


def test_data_slice_kept_past_the_vcpus_end_stays_readable(machine):
    """The comm area view the vCPU object keeps for slicing is dropped with the vCPU; a
    slice the handler kept holds its own reference and reads safely afterwards."""
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, mmio_reads(3))
    kept = []

    def keep(ex):
        assert isinstance(ex, MmioExit) and not ex.is_write
        ex.data[:] = b"\x5a"
        kept.append(ex.data)

    m.vm.add_handler(Space.MMIO, MMIO_ADDR, MMIO_ADDR + 0x1000, Kind.PYTHON, callback=keep)
    assert getattr(m.run(timeout=10), "status", None) == status(0)
    assert len(kept) == 3
    m.detach(m.vcpu)
    for d in kept:
        assert len(bytes(d)) == 1       # readable: the comm area, or zeros once revoked


def hlts(n):
    return b"\xF4" * n + out(L.PORT_DEBUG_EXIT, 0)


def test_hlt_callback_takes_every_hlt_and_run_goes_on(machine):
    """set_hlt_action(PYTHON, callback): each HLT goes to the callback and the run goes on
    (a kept HltExit is its own and goes stale); without one, run() returns the HLT."""
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, hlts(5))
    got = []
    m.vm.set_hlt_action(Kind.PYTHON, got.append)
    assert m.vm.hlt_handler == got.append
    ex = m.run(timeout=10)
    assert getattr(ex, "status", None) == status(0), ex
    assert len(got) == 5 and all(type(e) is HltExit for e in got)
    assert len({id(e) for e in got}) == 5


def test_hlt_callback_that_returns_true_stops_the_run(machine):
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, hlts(3))
    calls = []
    m.vm.set_hlt_action(Kind.PYTHON, lambda ex: calls.append(ex.reason) or len(calls) == 2)
    ex = m.run(timeout=10)
    assert type(ex) is HltExit and calls == [ExitReason.HLT] * 2
    m.vm.set_hlt_action(Kind.PYTHON)        # no callback: run() returns the next HLT
    assert m.vm.hlt_handler is None
    assert type(m.run(timeout=10)) is HltExit
    assert getattr(m.run(timeout=10), "status", None) == status(0)
    assert calls == [ExitReason.HLT] * 2


@pytest.mark.parametrize("kind, callback, error", [
    (Kind.IGNORE, print, InvalidArgumentError), (Kind.EXIT, print, InvalidArgumentError),
    (Kind.PYTHON, 42, InvalidArgumentError)])
def test_hlt_callback_refused_where_it_cannot_apply(machine, kind, callback, error):
    with pytest.raises(error):
        machine.vm.set_hlt_action(kind, callback)
    assert machine.vm.hlt_handler is None


def test_own_exits_run_returns_are_reused_only_once_let_go(machine):
    """run() reuses its last own exit (stop, kick, budget) when nothing but the vCPU refers
    to it: one the caller holds keeps its type and status, and a new one is made."""
    m = machine
    debug_exit_port(m.vm)
    load_code(m.vcpu, m.mem, out(L.PORT_DEBUG_EXIT, 1) + out(L.PORT_DEBUG_EXIT, 2)
              + out(L.PORT_DEBUG_EXIT, 3))
    first = m.run(timeout=10)
    second = m.run(timeout=10)
    assert second is not first
    assert (first.status, second.status) == (status(1), status(2))
    let_go = id(second)
    del first, second
    third = m.run(timeout=10)
    assert third.status == status(3)
    assert id(third) == let_go          # reused: the kick's return path allocates nothing
    handle = m.vcpu.handle()
    handle.kick()
    kick1 = m.run(timeout=10)
    handle.kick()
    kick2 = m.run(timeout=10)
    budget = m.run(budget=0)
    assert len({id(third), id(kick1), id(kick2), id(budget)}) == 4
    assert [type(e).__name__ for e in (third, kick1, kick2, budget)] == \
        ["StopExit", "KickExit", "KickExit", "BudgetExit"]
    assert third.status == status(3)
