"""Guest memory from the caller (memfd, file with offset, any writable buffer, huge pages),
flags-only slot updates, and dirty logging (bitmap with KVM_CLEAR_DIRTY_LOG, and the dirty
ring) counting exactly the pages a guest wrote; against the real /dev/kvm, both ABIs."""
import ctypes
import mmap
import os
import struct
import tempfile

import pytest

import kvmsys
from kvmsys import DirtyRingFullExit, StopExit, _core
from kvmsys.errors import InvalidArgumentError
from kvmsys.guests import layout as L
from test_wrappers import debug_exit_port, load_code, out

PAGE = 4096
SLOT, BASE, PAGES = 1, 0x400000, 512        # a 2 MiB slot of its own, above the guest's RAM


def writer(base, first, count, value=0x5A):
    """pm32: write one byte to each of *count* pages from page *first* of *base*, then exit.
    mov edi, base + first*PAGE; mov ecx, count; 1: mov byte [edi], value; add edi, PAGE; loop 1b"""
    return (b"\xBF" + struct.pack("<I", base + first * PAGE) + b"\xB9" + struct.pack("<I", count)
            + b"\xC6\x07" + bytes([value]) + b"\x81\xC7" + struct.pack("<I", PAGE) + b"\xE2\xF5"
            + out(L.PORT_DEBUG_EXIT, 0))


def run_writer(machine, first, count, value=0x5A):
    load_code(machine.vcpu, machine.mem, writer(BASE, first, count, value))
    ex = machine.run(timeout=10)
    assert isinstance(ex, StopExit) and ex.status == 1, ex


def bits(bitmap):
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1}


# === memory sources ======================================================================

def test_memfd_source_with_offset_is_shared(machine):
    debug_exit_port(machine.vm)
    fd = os.memfd_create("kvmsys-test")
    try:
        os.ftruncate(fd, 3 * PAGES * PAGE)
        view = machine.vm.add_memory(SLOT, BASE, PAGES * PAGE, source=fd, offset=PAGES * PAGE)
        run_writer(machine, 3, 2)
        assert view[3 * PAGE] == 0x5A and view[4 * PAGE] == 0x5A
        # the guest's writes are in the file, at the offset
        assert os.pread(fd, 1, PAGES * PAGE + 3 * PAGE) == b"\x5A"
        assert os.pread(fd, 1, 3 * PAGE) == b"\0"
    finally:
        os.close(fd)
    with pytest.raises(InvalidArgumentError, match="at least offset"):
        fd2 = os.memfd_create("short")
        try:
            machine.vm.add_memory(2, BASE + PAGES * PAGE, PAGES * PAGE, source=fd2)   # empty file
        finally:
            os.close(fd2)


def test_file_object_source(machine):
    debug_exit_port(machine.vm)
    with tempfile.TemporaryFile() as f:
        f.truncate(PAGES * PAGE)
        machine.vm.add_memory(SLOT, BASE, PAGES * PAGE, source=f)
        run_writer(machine, 0, 1, 0x77)
        f.seek(0)
        assert f.read(1) == b"\x77"


def test_buffer_source(machine):
    debug_exit_port(machine.vm)
    buf = mmap.mmap(-1, PAGES * PAGE)          # any writable buffer with a page-aligned address
    view = machine.vm.add_memory(SLOT, BASE, PAGES * PAGE, source=buf)
    buf[5 * PAGE] = 1
    assert view[5 * PAGE] == 1                 # the same memory, no copy
    run_writer(machine, 7, 1, 0x33)
    assert buf[7 * PAGE] == 0x33
    with pytest.raises(InvalidArgumentError):
        machine.vm.add_memory(2, BASE + PAGES * PAGE, PAGE, source=b"\0" * PAGE)   # read-only
    with pytest.raises(InvalidArgumentError):
        machine.vm.add_memory(2, BASE + PAGES * PAGE, 2 * PAGE, source=bytearray(PAGE))   # too small
    with pytest.raises(InvalidArgumentError):
        machine.vm.add_memory(2, BASE + PAGES * PAGE, PAGE, source=buf, offset=1)   # unaligned


def test_bytearray_source_cannot_be_resized_under_the_guest(machine):
    raw = bytearray(PAGES * PAGE + PAGE)
    c = (ctypes.c_char * len(raw)).from_buffer(raw)
    offset = -ctypes.addressof(c) % PAGE          # the first page-aligned byte
    del c
    view = machine.vm.add_memory(SLOT, BASE, PAGES * PAGE, source=raw, offset=offset)
    raw[offset] = 9
    assert view[0] == 9
    with pytest.raises(BufferError):
        raw.extend(b"x")                          # exported while the slot exists


def free_huge_pages():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def test_huge_pages(machine):
    if free_huge_pages() < 1:
        pytest.skip("host: no free huge pages (HugePages_Free is 0)")
    debug_exit_port(machine.vm)
    view = machine.vm.add_memory(SLOT, BASE, PAGES * PAGE, huge_pages=True)
    run_writer(machine, 9, 1)
    assert view[9 * PAGE] == 0x5A


def test_hugetlbfs_file_source(machine):
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2] == "hugetlbfs"]
    if not mounts or free_huge_pages() < 1:
        pytest.skip("host: no hugetlbfs mount with free huge pages")
    debug_exit_port(machine.vm)
    with tempfile.NamedTemporaryFile(dir=mounts[0]) as f:
        os.ftruncate(f.fileno(), PAGES * PAGE)          # one 2 MiB huge page
        view = machine.vm.add_memory(SLOT, BASE, PAGES * PAGE, source=f)
        run_writer(machine, 11, 1)
        assert view[11 * PAGE] == 0x5A and os.pread(f.fileno(), 1, 11 * PAGE) == b"\x5A"


# === dirty logging =======================================================================

def test_flags_only_update_turns_dirty_logging_on_for_a_live_slot(machine):
    vm = machine.vm
    debug_exit_port(vm)
    view = vm.add_memory(SLOT, BASE, PAGES * PAGE)
    view[0] = 0xEE
    with pytest.raises(InvalidArgumentError):
        vm.get_dirty_log(SLOT)                 # not logging yet
    vm.set_memory_flags(SLOT, log_dirty=True)
    assert vm.memory_slots[SLOT].flags & _core.MEM_FLAGS["LOG_DIRTY_PAGES"]
    assert view[0] == 0xEE                     # same memory
    run_writer(machine, 10, 5)
    assert bits(vm.get_dirty_log(SLOT)) == set(range(10, 15))
    vm.set_memory_flags(SLOT, log_dirty=False)
    assert not vm.memory_slots[SLOT].flags & _core.MEM_FLAGS["LOG_DIRTY_PAGES"]


def test_clear_dirty_log_counts_exactly_the_pages_written(machine):
    vm = machine.vm
    if not vm.check_extension("MANUAL_DIRTY_LOG_PROTECT2"):
        pytest.skip("host: lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    vm.enable_cap(kvmsys.fd.CAPABILITIES["MANUAL_DIRTY_LOG_PROTECT2"], 0,
                  (_core.DIRTY_LOG["MANUAL_PROTECT_ENABLE"],))
    debug_exit_port(vm)
    vm.add_memory(SLOT, BASE, PAGES * PAGE, log_dirty=True)
    run_writer(machine, 100, 37)
    assert bits(vm.get_dirty_log(SLOT)) == set(range(100, 137))
    # manual protection: reading the log does not clear it ...
    assert bits(vm.get_dirty_log(SLOT)) == set(range(100, 137))
    vm.clear_dirty_log(SLOT)                   # ... this does, and write-protects again
    assert bits(vm.get_dirty_log(SLOT)) == set()
    run_writer(machine, 200, 3)
    assert bits(vm.get_dirty_log(SLOT)) == {200, 201, 202}
    # clear only part: pages 192..255 (bit 8..10 of that range)
    vm.clear_dirty_log(SLOT, 192, 64, (0b100000000).to_bytes(8, "little"))
    assert bits(vm.get_dirty_log(SLOT)) == {201, 202}
    with pytest.raises(InvalidArgumentError):
        vm.clear_dirty_log(SLOT, 3, 64)        # not a multiple of 64


def dirty_ring_machine(abi, request, ring_bytes):
    if abi == "fd":
        vm = request.getfixturevalue("fdvm")
        if not vm.check_extension("DIRTY_LOG_RING"):
            pytest.skip("host: lacks KVM_CAP_DIRTY_LOG_RING")
        vm.enable_dirty_ring(ring_bytes)
        v = vm.create_vcpu(0)
        return type("M", (), dict(vm=vm, vcpu=v, mem=vm.memory(0), run=staticmethod(v.run)))
    request.getfixturevalue("fresh_process_vm")
    vm = kvmsys.vm()
    if not vm.check_extension("DIRTY_LOG_RING"):
        pytest.skip("host: lacks KVM_CAP_DIRTY_LOG_RING")
    vm.enable_dirty_ring(ring_bytes)
    kvmsys.add_vcpu()
    return type("M", (), dict(vm=vm, vcpu=kvmsys.current(), mem=vm.memory(0), run=staticmethod(kvmsys.run)))


def test_dirty_ring_counts_exactly_the_pages_written(abi, request):
    m = dirty_ring_machine(abi, request, 16 * PAGE)       # 4096 entries
    debug_exit_port(m.vm)
    m.vm.add_memory(SLOT, BASE, PAGES * PAGE, log_dirty=True)
    run_writer(m, 40, 25)
    got = m.vcpu.harvest_dirty_ring()
    assert sorted(got) == [(SLOT, p) for p in range(40, 65)]      # each page once, slot 1 only
    assert m.vcpu.harvest_dirty_ring() == []
    assert m.vm.reset_dirty_rings() == 25
    run_writer(m, 40, 2)                                        # logged again after the reset
    assert sorted(m.vcpu.harvest_dirty_ring()) == [(SLOT, 40), (SLOT, 41)]


def test_dirty_ring_full_exit(abi, request):
    # A 64-bit guest (native on PVM): KVM checks for a full ring at each guest entry, and
    # our host's instruction emulator runs a 32-bit guest's whole loop between two entries,
    # overrunning the ring (measured: pages lost); a hardware-run guest re-enters per fault.
    m = dirty_ring_machine(abi, request, PAGE)              # 256 entries: fills up
    debug_exit_port(m.vm)
    m.vm.add_memory(SLOT, BASE, PAGES * PAGE, log_dirty=True)
    load_code(m.vcpu, m.mem, writer(BASE, 0, 400), mode="long64")
    seen, fulls = set(), 0
    while True:
        ex = m.run(timeout=10)
        if isinstance(ex, StopExit):
            break
        assert isinstance(ex, DirtyRingFullExit), ex
        fulls += 1
        seen.update(m.vcpu.harvest_dirty_ring())
        m.vm.reset_dirty_rings()
    seen.update(m.vcpu.harvest_dirty_ring())
    assert fulls >= 1
    assert {p for s, p in seen if s == SLOT} == set(range(400))


def test_dirty_ring_validation(fdvm):
    if not fdvm.check_extension("DIRTY_LOG_RING"):
        pytest.skip("host: lacks KVM_CAP_DIRTY_LOG_RING")
    with pytest.raises(InvalidArgumentError):
        fdvm.enable_dirty_ring(PAGE + 16)       # not a power of two
    v = fdvm.create_vcpu(0)
    with pytest.raises(InvalidArgumentError):
        v.harvest_dirty_ring()                  # no ring on this vCPU
    with pytest.raises(InvalidArgumentError):
        fdvm.enable_dirty_ring(PAGE)            # after a vCPU
