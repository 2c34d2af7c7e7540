"""Registers in the comm area beyond the general ones (KVM_CAP_SYNC_REGS; issue 21, item 8):
the special registers (vcpu.sync_sregs) and the events (vcpu.sync_events) as zero-copy
views, with the caller choosing which sets KVM stores at every exit
(set/clear_sync_valid_reg) and which are sent (set/clear_sync_dirty_reg), as kvm-ioctls
has them; and how they meet the older mechanisms: set_*/get_* ioctls (the last write
wins, whichever way it was made), a refused write, queued interrupts, recycling, the
gdb server's reads and writes and vcpustate snapshots.  Every test over both ABIs.

Measured on our PVM host (kernel 6.18.44): KVM honours all three sets (KVM_CAP_SYNC_REGS
says 7), so nothing here skips for the host."""
import struct

import pytest

import kvmsys
from kvmsys import (ArgumentTypeError, InvalidArgumentError, IoExit, KvmOSError,
                    StaleVcpuError, StopExit, SyncReg, _core, vcpustate)
from kvmsys.enums import Kind, Space
from kvmsys.gdb import target
from kvmsys.guests.layout import PORT_OUT

from test_runloop import STOP, T, load_code, out_imm

MODES = ("real", "pm32", "long64")
ALL = SyncReg.REGS | SyncReg.SREGS | SyncReg.EVENTS
MOV_EAX_CR2 = b"\x0f\x20\xd0"           # mov eax, cr2 (the same in every mode)
OUT_AL = bytes([0xE6, PORT_OUT])        # out PORT_OUT, al
KVM_VALID_REGS = _core.KVM_RUN_LAYOUT["sync_regs"] - 16     # kvm_valid_regs, kvm_dirty_regs precede s


def comm_words(vcpu):
    """kvm_run.kvm_valid_regs and kvm_dirty_regs as the kernel reads them."""
    return struct.unpack_from("<QQ", vcpu.comm_area, KVM_VALID_REGS)


def to_first_exit(machine, mode, code=b""):
    """The guest stopped at its first `out PORT_OUT` (then *code*, then a stop)."""
    machine.devices()
    load_code(machine, mode, out_imm(PORT_OUT, 1) + code + STOP)
    machine.vm.add_handler(Space.PIO, PORT_OUT, PORT_OUT + 1, Kind.PYTHON)
    ex = machine.run(timeout=T)
    assert isinstance(ex, IoExit) and ex.value == 1, ex


def test_valid_and_dirty_sets_are_the_comm_areas(machine):
    v = machine.vcpu
    assert v.sync_valid_regs == SyncReg.REGS and v.sync_dirty_regs == 0     # kvmsys's default
    assert isinstance(v.sync_valid_regs, SyncReg)
    v.set_sync_valid_reg(SyncReg.SREGS | SyncReg.EVENTS)
    assert v.sync_valid_regs == ALL and comm_words(v) == (ALL, 0)
    v.clear_sync_valid_reg(SyncReg.REGS)
    assert comm_words(v) == (SyncReg.SREGS | SyncReg.EVENTS, 0)
    v.set_sync_dirty_reg(SyncReg.EVENTS)
    assert v.sync_dirty_regs == SyncReg.EVENTS and comm_words(v)[1] == SyncReg.EVENTS
    v.clear_sync_dirty_reg(SyncReg.EVENTS)
    assert comm_words(v)[1] == 0
    for bad, err in ((0, InvalidArgumentError), (8, InvalidArgumentError), (-1, InvalidArgumentError),
                     (1 << 64, InvalidArgumentError), (1.0, ArgumentTypeError), ("SREGS", ArgumentTypeError),
                     (None, ArgumentTypeError)):
        for method in (v.set_sync_valid_reg, v.clear_sync_valid_reg, v.set_sync_dirty_reg,
                       v.clear_sync_dirty_reg):
            with pytest.raises(err):
                method(bad)
    assert comm_words(v) == (SyncReg.SREGS | SyncReg.EVENTS, 0)            # nothing half-done


@pytest.mark.parametrize("valid", [True, False], ids=["valid", "fetched"])
@pytest.mark.parametrize("mode", MODES)
def test_views_read_what_kvm_has(machine, mode, valid):
    v = machine.vcpu
    if valid:
        v.set_sync_valid_reg(SyncReg.SREGS | SyncReg.EVENTS)
    to_first_exit(machine, mode)
    assert v.sync_sregs.as_dict() == v.get_sregs()
    assert v.sync_events.as_dict() == v.get_vcpu_events().as_dict()
    assert v.sync_sregs.cs.selector == v.get_sregs()["cs"]["selector"]
    assert v.sync_sregs.gdt.limit == v.get_sregs()["gdt"]["limit"]
    assert v.sync_sregs.interrupt_bitmap == tuple(v.get_sregs()["interrupt_bitmap"])
    assert v.sync_events["flags"] == v.sync_events.flags == v.get_vcpu_events()["flags"]


@pytest.mark.parametrize("mode", MODES)
def test_a_valid_set_is_read_without_an_ioctl(machine, mode):
    # With SREGS valid KVM stored them at the exit, and the view trusts that copy: a value
    # put into the comm area behind its back shows (no KVM_GET_SREGS).  Without, the view
    # fetches from KVM (the planted value is overwritten).
    v = machine.vcpu
    off = _core.KVM_RUN_LAYOUT["sync_regs"] + _core.SYNC_LAYOUT["sregs"] + _core.SYNC_LAYOUT["sregs_cr2"]
    v.set_sync_valid_reg(SyncReg.SREGS)
    to_first_exit(machine, mode, OUT_AL)
    struct.pack_into("<Q", v.comm_area, off, 0xC0FFEE)
    assert v.sync_sregs.cr2 == 0xC0FFEE
    v.clear_sync_valid_reg(SyncReg.SREGS)
    assert machine.run(timeout=T).value == 1            # the second out (AL still 1)
    struct.pack_into("<Q", v.comm_area, off, 0xC0FFEE)
    assert v.sync_sregs.cr2 == v.get_sregs()["cr2"] != 0xC0FFEE


@pytest.mark.parametrize("valid", [True, False], ids=["valid", "fetched"])
@pytest.mark.parametrize("mode", MODES)
def test_sregs_written_in_a_handler_reach_the_guest(machine, mode, valid):
    # The guest reads CR2 after its first exit, where the handler wrote it through the view.
    v = machine.vcpu
    if valid:
        v.set_sync_valid_reg(SyncReg.SREGS)
    seen = []

    def cb(ex):
        seen.append(ex.value)
        if len(seen) == 1:
            ex.vcpu.sync_sregs.cr2 = 0x5A
            seen.append(ex.vcpu.sync_dirty_regs)

    machine.devices()
    load_code(machine, mode, out_imm(PORT_OUT, 1) + MOV_EAX_CR2 + OUT_AL + STOP)
    machine.vm.add_handler(Space.PIO, PORT_OUT, PORT_OUT + 1, Kind.PYTHON, callback=cb)
    assert isinstance(machine.run(timeout=T), StopExit)
    assert seen == [1, SyncReg.SREGS, 0x5A]
    assert v.sync_dirty_regs == 0                       # KVM took it at the next KVM_RUN
    assert v.get_sregs()["cr2"] == v.sync_sregs.cr2 == 0x5A


def test_events_written_through_the_view_reach_kvm(machine):
    v = machine.vcpu
    to_first_exit(machine, "pm32", OUT_AL)
    ev = v.sync_events
    assert ev["nmi_masked"] == 0
    ev["nmi_masked"] = 1
    assert v.sync_dirty_regs == SyncReg.EVENTS
    assert machine.run(timeout=T).value == 1            # KVM_RUN loads it
    assert v.sync_dirty_regs == 0
    assert v.get_vcpu_events()["nmi_masked"] == 1 and v.sync_events.nmi_masked == 1


def test_last_write_wins_whichever_way_it_was_made(machine):
    v = machine.vcpu
    v.set_sync_valid_reg(ALL)
    to_first_exit(machine, "pm32", OUT_AL)
    # a view write, then an ioctl: the ioctl's value stays
    v.sync_sregs.cr2 = 0x111
    assert v.get_sregs()["cr2"] == 0x111                # every read sees the unsent write
    assert v.sync_dirty_regs == 0                       # (sent before that ioctl)
    sregs = v.get_sregs()
    sregs["cr2"] = 0x222
    v.sync_sregs.cr2 = 0x333
    v.set_sregs(sregs)
    assert v.sync_sregs.cr2 == 0x222 and v.get_sregs()["cr2"] == 0x222
    # an ioctl, then a view write: the view's value stays
    v.set_sregs(dict(sregs, cr2=0x444))
    v.sync_sregs.cr2 = 0x555
    # an unrelated ioctl in between sends it, loses nothing
    v.set_msrs({0x174: 0x10})
    assert v.get_sregs()["cr2"] == 0x555
    if v.vm.check_extension("SREGS2") > 0:
        v.sync_sregs.cr2 = 0x666
        assert v.get_sregs2()["cr2"] == 0x666           # the overlapping ioctl sees it too
    # the same for events and for the general registers
    v.sync_events["nmi_masked"] = 1
    v.set_vcpu_events(v.get_vcpu_events())              # read (sent first), written back
    ev = v.get_vcpu_events()
    ev["nmi_masked"] = 0
    v.sync_events["nmi_masked"] = 1
    v.set_vcpu_events(ev)
    assert v.sync_events["nmi_masked"] == 0
    v.regs.rbx = 7
    regs = v.get_regs()
    assert regs["rbx"] == 7
    v.set_regs(dict(regs, rbx=8))
    assert v.regs.rbx == 8
    assert machine.run(timeout=T).value == 1
    assert v.get_sregs()["cr2"] == (0x666 if v.vm.check_extension("SREGS2") > 0 else 0x555)
    assert v.get_regs()["rbx"] == 8 and v.get_vcpu_events()["nmi_masked"] == 0


def test_clear_dirty_drops_an_unsent_write(machine):
    v = machine.vcpu
    to_first_exit(machine, "pm32", OUT_AL)
    before = v.get_sregs()["cr2"]
    v.sync_sregs.cr2 = before + 0x1000
    v.clear_sync_dirty_reg(SyncReg.SREGS)
    assert v.sync_sregs.cr2 == before                   # fetched from KVM again
    assert machine.run(timeout=T).value == 1
    assert v.get_sregs()["cr2"] == before
    # set_sync_dirty_reg sends what the comm area holds (current first, never stale bytes)
    v.sync_sregs.cr2 = 0x77
    v.clear_sync_dirty_reg(SyncReg.SREGS)
    v.set_sync_dirty_reg(SyncReg.SREGS)
    assert v.get_sregs()["cr2"] == before


@pytest.mark.parametrize("when", ["at KVM_RUN", "before an ioctl"])
def test_a_refused_write_is_a_clear_error_and_is_dropped(machine, when):
    # CR0.PG without PE: KVM refuses these sregs (EINVAL).  The error names the set; the
    # write is dropped, so the vCPU goes on with what KVM had.
    v = machine.vcpu
    v.set_sync_valid_reg(SyncReg.SREGS)
    to_first_exit(machine, "pm32", OUT_AL)
    good = v.get_sregs()
    v.sync_sregs.cr0 = 0x80000000
    with pytest.raises(KvmOSError, match="KVM refused the SREGS written through the comm area") as e:
        if when == "at KVM_RUN":
            machine.run(timeout=T)
        else:
            v.get_regs()
    assert e.value.errno == 22
    assert v.sync_dirty_regs == 0
    assert v.sync_sregs.as_dict() == v.get_sregs() == good
    assert machine.run(timeout=T).value == 1


def test_fields_are_validated(machine):
    v = machine.vcpu
    to_first_exit(machine, "pm32")
    s, ev = v.sync_sregs, v.sync_events
    for obj, name, bad, err in ((s, "cr0", -1, InvalidArgumentError), (s, "cr0", 1 << 64, InvalidArgumentError),
                                (s, "efer", 1.0, ArgumentTypeError), (s.cs, "type", 16, InvalidArgumentError),
                                (s.cs, "dpl", 4, InvalidArgumentError), (s.cs, "present", 2, InvalidArgumentError),
                                (s.ds, "selector", 0x10000, InvalidArgumentError),
                                (s.tr, "limit", 1 << 32, InvalidArgumentError),
                                (s.gdt, "limit", 0x10000, InvalidArgumentError),
                                (ev, "nmi_masked", 2, InvalidArgumentError),
                                (ev, "flags", 0x8000, InvalidArgumentError),
                                (ev, "interrupt_shadow", 4, InvalidArgumentError),
                                (ev, "exception_nr", 256, InvalidArgumentError),
                                (ev, "exception_payload", "1", ArgumentTypeError)):
        with pytest.raises(err):
            setattr(obj, name, bad)
    for bad in ((1, 0, 0), (1, 0, 0, 0, 0), 5, (1, 1, 0, 0), (0, 0, 0, -1)):
        with pytest.raises(InvalidArgumentError):
            s.interrupt_bitmap = bad
    with pytest.raises(KeyError, match="no field 'bogus'"):
        ev["bogus"]
    with pytest.raises(KeyError):
        ev["bogus"] = 1
    with pytest.raises(ArgumentTypeError):
        ev["nmi_masked"] = None
    assert v.sync_dirty_regs == 0                       # no refused write marked anything
    assert set(ev.keys()) == set(v.get_vcpu_events().keys())
    for cls in (_core.SyncSregs, _core.SyncEvents, _core.SyncSegment, _core.SyncDtable):
        with pytest.raises(ArgumentTypeError):
            cls()


def test_repr_shows_the_registers(machine):
    v = machine.vcpu
    to_first_exit(machine, "pm32")
    sregs = v.get_sregs()
    r = repr(v.sync_sregs)
    assert r.startswith("<SyncSregs ") and f"cr0={sregs['cr0']:#x}" in r and f"cs={sregs['cs']['selector']:#x}" in r
    assert f"selector={sregs['cs']['selector']:#x}" in repr(v.sync_sregs.cs)
    assert repr(v.sync_events).startswith("<SyncEvents ")
    v.sync_events["nmi_masked"] = 1
    assert "nmi_masked=0x1" in repr(v.sync_events)


@pytest.fixture
def fd_machine():
    from kvmsys.guests import layout
    from kvmsys.machine import Machine
    m = Machine("fd", memory_size=layout.RAM_SIZE)
    m.attach(0)
    yield m
    m.close()


def test_views_of_a_handed_on_vcpu_are_dead_and_its_settings_do_not_follow(fd_machine):
    # renew() (what the syscall ABI does inside remove_vcpu(), tested below over it): the
    # new owner gets kvmsys's defaults, and the old owner's unsent write never reaches KVM.
    machine = fd_machine
    v = machine.vcpu
    to_first_exit(machine, "pm32", OUT_AL)
    v.set_sync_valid_reg(ALL)
    before = v.get_sregs()["cr2"]
    view, events = v.sync_sregs, v.sync_events
    view.cr2 = before + 0x1000
    n = v.renew()
    with pytest.raises(StaleVcpuError):
        view.cr2
    with pytest.raises(StaleVcpuError):
        events["nmi_masked"] = 1
    assert "stale" in repr(view).lower() or "removed" in repr(view)
    assert n.sync_valid_regs == SyncReg.REGS and n.sync_dirty_regs == 0
    assert n.get_sregs()["cr2"] == before
    machine.vcpu, machine._run = n, n.run
    assert machine.run(timeout=T).value == 1
    assert n.get_sregs()["cr2"] == before


def test_replace_kernel_vcpu_resets_the_sets(machine):
    v = machine.vcpu
    v.set_sync_valid_reg(ALL)
    to_first_exit(machine, "pm32")
    v.sync_events["nmi_masked"] = 1
    v.replace_kernel_vcpu(max(v.vm.vcpu_ids) + 1)
    assert v.sync_valid_regs == SyncReg.REGS and v.sync_dirty_regs == 0
    assert comm_words(v) == (SyncReg.REGS, 0)
    assert v.sync_events["nmi_masked"] == 0 == v.get_vcpu_events()["nmi_masked"]


def test_a_recycled_vcpu_starts_with_the_default_sets(fresh_process_vm):
    kvmsys.add_vcpu()
    v = kvmsys.current()
    v.set_sync_valid_reg(ALL)
    initial_cr2 = v.get_sregs()["cr2"]
    v.sync_sregs.cr2 = 0xBAD000                      # unsent when the vCPU goes back
    vid = v.id
    kvmsys.remove_vcpu()
    kvmsys.add_vcpu()
    w = kvmsys.current()
    assert w.id == vid and w is not v
    assert w.sync_valid_regs == SyncReg.REGS and w.sync_dirty_regs == 0
    assert comm_words(w) == (SyncReg.REGS, 0)
    assert w.get_sregs()["cr2"] == w.sync_sregs.cr2 == initial_cr2
    with pytest.raises(StaleVcpuError):
        v.sync_sregs


def test_clear_comm_area_resets_the_sets(machine):
    v = machine.vcpu
    v.set_sync_valid_reg(ALL)
    v.sync_events["nmi_masked"] = 1
    v.clear_comm_area()
    assert comm_words(v) == (SyncReg.REGS, 0)
    assert v.get_vcpu_events()["nmi_masked"] == 0


def test_events_written_before_a_queued_interrupt_do_not_drop_it(machine):
    # The run loop injects a queued interrupt (KVM_INTERRUPT) before KVM_RUN; events
    # written through the comm area go to KVM before that, not after (where KVM_RUN would
    # load them over the injected interrupt and lose it).
    from test_interrupts import A, AFTER_STI, N, get, layout
    v = machine.vcpu
    machine.devices()
    layout.prepare(get("irq_window.real"), v, machine.mem, n=N)
    h = v.handle()
    log = []

    def report(ex):
        log.append(("main", ex.value))
        if ex.value & AFTER_STI and len([e for e in log if e[1] & AFTER_STI]) == 1:
            ex.vcpu.sync_events["nmi_masked"] = 1       # dirty events, sent at the next entry
            h.interrupt(A)

    machine.vm.add_handler(Space.PIO, layout.PORT_OUT, layout.PORT_OUT + 1, Kind.PYTHON, callback=report)
    machine.vm.add_handler(Space.PIO, layout.PORT_RESULT, layout.PORT_RESULT + 1, Kind.PYTHON,
                           callback=lambda ex: log.append(("isr", ex.value)))
    ex = machine.run(timeout=20)
    assert isinstance(ex, StopExit) and ex.status == 1, (ex, log)
    assert log.count(("isr", A)) == 1, log
    assert v.pending_interrupts == ([], 0)


def test_gdb_server_state_sees_and_overrides_comm_area_writes(machine):
    # The gdb server reads the vCPU through get_regs/get_sregs (VcpuState.of) and writes
    # through set_*: it sees an unsent comm-area write, and its own write wins over one.
    v = machine.vcpu
    v.set_sync_valid_reg(ALL)
    to_first_exit(machine, "real", OUT_AL)         # (gdb writes selectors in real mode only)
    mode = target.mode_of(v.get_sregs())
    es = next(r for r in target.registers(mode) if r.name == "es")
    v.sync_sregs.es.selector = 0x18
    st = target.VcpuState.of(v)
    assert target.read_value(es, st, mode) == (0x18).to_bytes(4, "little")
    v.sync_sregs.es.selector = 0x20                 # written after gdb read, before it writes
    assert target.write_value(es, (0x10).to_bytes(4, "little"), st, mode) == "sregs"
    st.apply(v, {"sregs"})
    assert v.sync_sregs.es.selector == 0x10 == v.get_sregs()["es"]["selector"]


def test_snapshots_see_and_override_comm_area_writes(machine):
    v = machine.vcpu
    v.set_sync_valid_reg(ALL)
    to_first_exit(machine, "pm32", OUT_AL)
    v.sync_sregs.cr2 = 0xAAA000
    v.sync_events["nmi_masked"] = 1
    state = vcpustate.capture(v)
    assert state["sregs"]["cr2"] == 0xAAA000
    if "sregs2" in state:
        assert state["sregs2"]["cr2"] == 0xAAA000
    assert state["vcpu_events"]["nmi_masked"] == 1
    v.sync_sregs.cr2 = 0xBBB000                     # unsent when the snapshot is applied
    v.sync_events["nmi_masked"] = 0
    vcpustate.apply(v, state)
    assert v.sync_sregs.cr2 == 0xAAA000 and v.sync_events["nmi_masked"] == 1
    assert machine.run(timeout=T).value == 1
    assert v.get_sregs()["cr2"] == 0xAAA000 and v.get_vcpu_events()["nmi_masked"] == 1
