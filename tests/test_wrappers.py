"""Every wrapper of the core against the real /dev/kvm: system, VM and vCPU objects.

VM and vCPU tests run over both ABIs (the `machine` fixture, or `rig` where the
VM needs an in-kernel irqchip, which must exist before the first vCPU).  Guest
code that the built-in guests do not provide is written as raw machine code
(flat 32-bit protected mode unless said otherwise) over a loaded guest's layout.
"""
import errno
import os
import struct
import threading

import pytest

import kvmsys
from kvmsys import (_core, syscall, pvm, DebugExit, IoExit, KickExit, MsrExit,
                    MmioExit, StopExit, UnknownExit)
from kvmsys.enums import ExitReason, Kind, MsrExitReason, Space
from kvmsys.errors import InvalidArgumentError, KvmOSError
from kvmsys.guests import get, layout as L

PIO, MMIO = Space.PIO, Space.MMIO
MODES = ("real", "pm32", "long64")

# struct kvm_run offsets (x86, stable ABI): immediate_exit, the exit union, sync regs
RUN_IMMEDIATE_EXIT = 1
RUN_DIRTY_REGS = 296
RUN_SYNC_REGS = 304
KVM_SYNC_X86_REGS = 1
KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_HALTED = 0, 3


# --- tiny assembler (encodings identical in 16-, 32- and 64-bit code unless noted) ----

def out(port, value):
    """mov al, value; out port, al"""
    return bytes([0xB0, value, 0xE6, port])


def store32(addr, value):
    """mov dword [addr], value (32-bit code only: in 64-bit code this is RIP-relative)"""
    return b"\xC7\x05" + struct.pack("<II", addr, value)


JMP_SELF = b"\xEB\xFE"
STI_HLT_LOOP = b"\xFB\xF4\xEB\xFD"          # sti; 1: hlt; jmp 1b


def u32(mem, addr):
    return struct.unpack_from("<I", mem, addr)[0]


def debug_exit_port(vm):
    """isa-debug-exit on port 0xf4 (a write stops the run with status (v << 1) | 1)."""
    vm.add_handler(PIO, L.PORT_DEBUG_EXIT, L.PORT_DEBUG_EXIT + 1, Kind.EXIT)


def load_code(vcpu, mem, code, mode="pm32", native=True):
    """Set up *mode* with the built-in layout (GDT, IDT, page tables) and run *code*."""
    guest = get(f"compute.{mode}")
    if mode == "long64" and native:
        pvm.enable_native(vcpu, L.PVM_PAGE)
    L.prepare(guest, vcpu, mem)
    mem[L.LOAD_ADDR:L.LOAD_ADDR + len(code)] = code


def status(value):
    return (value << 1) | 1


# --- a VM with an in-kernel irqchip, over either ABI ----------------------------------

def irq_machine(abi, pit=True):
    """The shared two-ABI Machine (conftest) with the irqchip (+ PIT) and the debug-exit port."""
    from conftest import Machine
    m = Machine(abi, L.RAM_SIZE, irqchip=True, pit=pit)
    debug_exit_port(m.vm)
    return m


@pytest.fixture
def rig(abi):
    r = irq_machine(abi)
    yield r
    r.close()


@pytest.fixture
def bare_vm(abi, request):
    """A VM with memory and no vCPU yet."""
    if abi == "fd":
        yield request.getfixturevalue("fdvm")
    else:
        request.getfixturevalue("fresh_process_vm")
        yield kvmsys.vm()


def pm32_with_vectors(vcpu, mem, code):
    """pm32 code plus IDT gates 32..63, each reporting its vector to isa-debug-exit."""
    load_code(vcpu, mem, code)
    for v in range(32, 64):
        stub = 0xE000 + 8 * (v - 32)
        mem[stub:stub + 7] = out(L.PORT_DEBUG_EXIT, v) + b"\xF4\xEB\xFD"
        struct.pack_into("<HHHH", mem, L.IDT_ADDR + 8 * v, stub, L.SEL_CODE32, 0x8E00, 0)
    s = vcpu.get_sregs()
    s["idt"] = dict(s["idt"], limit=8 * 64 - 1)
    vcpu.set_sregs(s)


def pic_init(unmasked_irq):
    """Program the master 8259: vectors 0x20.., only *unmasked_irq* enabled."""
    return (out(0x20, 0x11) + out(0x21, 0x20) + out(0x21, 0x04) + out(0x21, 0x01)
            + out(0x21, 0xFF & ~(1 << unmasked_irq)))


READY = out(L.PORT_OUT, 0)       # "set up": an exit the test answers before interrupting


# === Kvm (the system fd) ===============================================================

@pytest.fixture
def kvm():
    k = kvmsys.Kvm()
    yield k
    k.close()


def test_api_version(kvm):
    assert kvm.api_version() == 12


def test_check_extension_by_name_and_number(kvm):
    num = kvmsys.fd.CAPABILITIES["USER_MEMORY"]
    value = kvm.check_extension(num)
    assert value > 0            # every KVM since 2.6.x has user memory
    assert kvm.check_extension("USER_MEMORY") == value
    assert kvm.check_extension("KVM_CAP_USER_MEMORY") == value
    assert kvm.check_extension("user_memory") == value
    # a capability number nobody defines is simply absent
    assert kvm.check_extension(100000) == 0


def test_check_extension_unknown_name(kvm):
    with pytest.raises(InvalidArgumentError, match="NO_SUCH_CAP"):
        kvm.check_extension("NO_SUCH_CAP")
    with pytest.raises(ValueError):         # InvalidArgumentError is a ValueError
        kvm.check_extension("KVM_CAP_")


def test_capabilities(kvm):
    caps = kvm.capabilities()
    assert set(caps) == set(kvmsys.fd.CAPABILITIES)
    assert caps["USER_MEMORY"] > 0 and caps["NR_VCPUS"] >= 1
    for name in ("SYNC_REGS", "IRQCHIP", "NR_VCPUS", "X86_SMM"):
        assert caps[name] == kvm.check_extension(name)


def test_vcpu_mmap_size(kvm):
    size = kvm.vcpu_mmap_size()
    assert size >= 4096 and size % 4096 == 0
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        assert len(vcpu.comm_area) == size
    finally:
        vm.close()


def test_supported_cpuid(kvm):
    entries = kvm.supported_cpuid()
    assert entries
    assert all(set(e) == {"function", "index", "flags", "eax", "ebx", "ecx", "edx"} for e in entries)
    leaf0 = [e for e in entries if e["function"] == 0]
    assert len(leaf0) == 1
    assert leaf0[0]["eax"] >= 1            # highest basic leaf: at least leaf 1 exists
    assert any(e["function"] == 1 for e in entries)


def test_msr_index_list(kvm):
    msrs = kvm.msr_index_list()
    assert msrs
    assert all(isinstance(i, int) and 0 <= i < 1 << 32 for i in msrs)
    assert 0x174 in msrs        # IA32_SYSENTER_CS: always saved/restored by KVM on x86


def test_kvm_context_manager_and_fileno():
    with kvmsys.Kvm() as k:
        fd = k.fileno()
        assert fd >= 0 and not k.closed
        os.fstat(fd)
    assert k.closed
    with pytest.raises(OSError):
        os.fstat(fd)    # really closed (nothing else in this test opens an fd meanwhile)


# === VM: memory ========================================================================

def test_memory_view_is_zero_copy_both_ways(machine):
    debug_exit_port(machine.vm)
    machine.vm.add_handler(PIO, L.PORT_OUT, L.PORT_OUT + 1, Kind.SINK)
    machine.load("pio_out_loop.pm32", n=5)
    mem = machine.mem
    struct.pack_into("<I", mem, L.COUNTER_ADDR, 100)    # the guest must see this
    ex = machine.run(timeout=5)
    assert isinstance(ex, StopExit) and ex.status == 1
    assert u32(mem, L.COUNTER_ADDR) == 105              # and we see the guest's writes
    assert machine.vm.read(L.COUNTER_ADDR, 4) == struct.pack("<I", 105)
    # another view of the same slot aliases the same memory
    other = machine.vm.memory(0)
    other[L.RESULT_ADDR] = 0x5A
    assert mem[L.RESULT_ADDR] == 0x5A
    # the guest's output bytes are the low bytes of the counter it saw
    assert machine.vm.console() == bytes([101, 102, 103, 104, 105])


def test_read_write(machine):
    machine.vm.write(0x7000, b"kvmsys")
    assert machine.vm.read(0x7000, 6) == b"kvmsys"
    assert bytes(machine.mem[0x7000:0x7006]) == b"kvmsys"
    machine.vm.write(0x7000, memoryview(bytearray(b"\x01\x02")))   # any bytes-like
    assert machine.vm.read(0x7000, 3) == b"\x01\x02m"
    assert machine.vm.read(0x7000, 0) == b""


def test_add_and_remove_memory(machine):
    vm = machine.vm
    debug_exit_port(vm)
    view = vm.add_memory(1, 0x200000, 0x10000)
    assert len(view) == 0x10000 and not view.readonly
    slot = vm.memory_slots[1]
    assert (slot.slot, slot.guest_phys_addr, slot.size) == (1, 0x200000, 0x10000)
    code = store32(0x201000, 0xDEADBEEF) + out(L.PORT_DEBUG_EXIT, 0)
    load_code(machine.vcpu, machine.mem, code)
    assert isinstance(machine.run(timeout=5), StopExit)
    assert u32(view, 0x1000) == 0xDEADBEEF
    assert vm.read(0x201000, 4) == struct.pack("<I", 0xDEADBEEF)

    vm.remove_memory(1)
    assert 1 not in vm.memory_slots
    # the host memory outlives the slot: the view still reads and writes
    assert u32(view, 0x1000) == 0xDEADBEEF
    view[0] = 7
    assert view[0] == 7
    # and the guest-physical range is unbacked now: the same store is an MMIO exit
    regs = machine.vcpu.get_regs()
    machine.vcpu.set_regs(dict(regs, rip=L.LOAD_ADDR))
    ex = machine.run(timeout=5)
    assert isinstance(ex, MmioExit)
    assert (ex.address, ex.length, ex.is_write, ex.value) == (0x201000, 4, True, 0xDEADBEEF)
    assert u32(view, 0x1000) == 0xDEADBEEF     # not written through any more
    # the slot number is free again
    assert len(vm.add_memory(1, 0x200000, 0x1000)) == 0x1000


def test_readonly_memory(machine):
    vm = machine.vm
    if not vm.check_extension("READONLY_MEM"):
        pytest.skip("host: lacks KVM_CAP_READONLY_MEM")
    debug_exit_port(vm)
    view = vm.add_memory(1, 0x200000, 0x1000, readonly=True)
    view[0:4] = b"ROM!"                          # the host may write it
    code = store32(0x200000, 0x11223344) + out(L.PORT_DEBUG_EXIT, 0)
    load_code(machine.vcpu, machine.mem, code)
    ex = machine.run(timeout=5)
    # a guest write to a read-only slot exits as MMIO; the memory is unchanged
    assert isinstance(ex, MmioExit) and ex.is_write and ex.address == 0x200000
    assert bytes(view[0:4]) == b"ROM!"


def test_dirty_log(machine):
    vm = machine.vm
    debug_exit_port(vm)
    view = vm.add_memory(1, 0x200000, 0x10000, log_dirty=True)
    assert vm.get_dirty_log(1) == bytes(8)          # 16 pages: one u64 of bits, all clean
    view[0x5000] = 1                                # host writes are not logged
    assert vm.get_dirty_log(1) == bytes(8)
    code = (store32(0x201000, 1) + store32(0x20F004, 2) + store32(0x201008, 3)
            + out(L.PORT_DEBUG_EXIT, 0))
    load_code(machine.vcpu, machine.mem, code)
    assert isinstance(machine.run(timeout=5), StopExit)
    bits = int.from_bytes(vm.get_dirty_log(1), "little")
    assert bits == (1 << 1) | (1 << 15)
    assert vm.get_dirty_log(1) == bytes(8)          # reading the log clears it
    assert u32(view, 0x1000) == 1 and u32(view, 0xF004) == 2


# === VM: platform pieces ===============================================================

def test_tss_and_identity_map_addresses(bare_vm):
    assert bare_vm.check_extension("SET_TSS_ADDR")
    bare_vm.set_tss_addr(0xFFFBD000)
    bare_vm.set_identity_map_addr(0xFFFBC000)


def test_identity_map_after_vcpu_is_refused():
    # KVM accepts the identity map address only before the first vCPU (EINVAL after)
    with kvmsys.Kvm() as k, k.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmOSError) as e:
            vm.set_identity_map_addr(0xFFFBC000)
        assert e.value.errno == errno.EINVAL and e.value.op == "KVM_SET_IDENTITY_MAP_ADDR"


def test_pit_ports_are_in_kernel(abi):
    # With the PIT in the kernel a guest's `in al, 0x40` never reaches user space.
    code = b"\xE4\x40" + READY
    seen = {}
    for pit in (False, True):
        r = irq_machine(abi, pit=pit)
        try:
            load_code(r.vcpu, r.mem, code)
            ex = r.run(timeout=5)
            seen[pit] = (ex.port, ex.direction)
        finally:
            r.close()
    assert seen == {False: (0x40, "in"), True: (L.PORT_OUT, "out")}


def test_pit_timer_interrupt(rig):
    # PIT channel 0, mode 2, count 0x1000 (~3.4 ms) -> IRQ0 -> PIC vector 0x20
    code = (pic_init(0) + out(0x43, 0x34) + out(0x40, 0x00) + out(0x40, 0x10)
            + READY + STI_HLT_LOOP)
    pm32_with_vectors(rig.vcpu, rig.mem, code)
    ex = rig.run(timeout=5)
    assert isinstance(ex, IoExit) and ex.port == L.PORT_OUT
    ex = rig.run(timeout=5)     # the guest halts with IF=1 (in the kernel) until the tick
    assert isinstance(ex, StopExit) and ex.status == status(0x20)


def test_irq_line(rig):
    pm32_with_vectors(rig.vcpu, rig.mem, pic_init(5) + READY + STI_HLT_LOOP)
    assert isinstance(rig.run(timeout=5), IoExit)
    rig.vm.irq_line(5, 1)       # an edge on IRQ5
    rig.vm.irq_line(5, 0)
    ex = rig.run(timeout=5)
    assert isinstance(ex, StopExit) and ex.status == status(0x25)


def test_irqfd(rig):
    efd = os.eventfd(0)
    try:
        rig.vm.irqfd(efd, 5)
        pm32_with_vectors(rig.vcpu, rig.mem, pic_init(5) + READY + STI_HLT_LOOP)
        assert isinstance(rig.run(timeout=5), IoExit)
        os.eventfd_write(efd, 1)
        ex = rig.run(timeout=5)
        assert isinstance(ex, StopExit) and ex.status == status(0x25)
        rig.vm.irqfd(efd, 5, deassign=True)
    finally:
        os.close(efd)


def test_signal_msi(rig):
    # software-enable the local APIC (SVR bit 8), then take an MSI with vector 0x30
    code = store32(0xFEE000F0, 0x1FF) + READY + STI_HLT_LOOP
    pm32_with_vectors(rig.vcpu, rig.mem, code)
    assert isinstance(rig.run(timeout=5), IoExit)
    delivered = rig.vm.signal_msi(0xFEE00000, 0x30)     # physical destination APIC id 0
    assert delivered == 1
    ex = rig.run(timeout=5)
    assert isinstance(ex, StopExit) and ex.status == status(0x30)


@pytest.mark.parametrize("mode", MODES)
def test_ioeventfd_pio(machine, mode):
    debug_exit_port(machine.vm)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        machine.vm.ioeventfd(efd, L.PORT_OUT, 1, pio=True)
        machine.load(f"pio_out_loop.{mode}", n=5)
        ex = machine.run(timeout=5)
        assert isinstance(ex, StopExit)
        assert os.eventfd_read(efd) == 5            # five signals ...
        assert machine.vcpu.stats()["exits"] == {"IO": 1}   # ... and only the debug-exit exited
        # deassigned, the writes exit again
        machine.vm.ioeventfd(efd, L.PORT_OUT, 1, pio=True, deassign=True)
        machine.load(f"pio_out_loop.{mode}", n=5)
        ex = machine.run(timeout=5)
        assert isinstance(ex, IoExit) and ex.port == L.PORT_OUT
    finally:
        os.close(efd)


def test_ioeventfd_mmio_datamatch(machine):
    debug_exit_port(machine.vm)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        # only the store of the value 3 signals; the others exit as MMIO
        machine.vm.ioeventfd(efd, L.MMIO_WRITE_ADDR, 4, datamatch=3)
        machine.load("mmio_write_loop.pm32", n=5)
        values = []
        while True:
            ex = machine.run(timeout=5)
            if not isinstance(ex, MmioExit):
                break
            values.append(ex.value)
        assert isinstance(ex, StopExit)
        assert values == [1, 2, 4, 5]
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


@pytest.mark.parametrize("pio", [False, True], ids=["mmio", "pio"])
def test_coalesced_zone(machine, pio):
    vm = machine.vm
    debug_exit_port(vm)
    n = 300
    if pio:
        vm.add_handler(PIO, L.PORT_OUT, L.PORT_OUT + 1, Kind.SINK)
        vm.register_coalesced(L.PORT_OUT, 1, pio=True)
        machine.load("pio_out_loop.pm32", n=n)
        expected = bytes(i & 0xFF for i in range(1, n + 1))
    else:
        vm.add_handler(MMIO, L.MMIO_WRITE_ADDR, L.MMIO_WRITE_ADDR + 4, Kind.SINK)
        vm.register_coalesced(L.MMIO_WRITE_ADDR, 4)
        machine.load("mmio_write_loop.pm32", n=n)
        expected = b"".join(struct.pack("<I", i) for i in range(1, n + 1))
    ex = machine.run(timeout=5)
    assert isinstance(ex, StopExit) and ex.status == 1
    assert vm.console() == expected              # every write, in order
    stats = machine.vcpu.stats()
    assert stats["total_exits"] < n // 10        # batched in the ring, not one exit each
    assert stats["coalesced"] >= n - stats["total_exits"]
    assert vm.coalesced_unhandled == 0
    vm.register_coalesced(L.MMIO_WRITE_ADDR if not pio else L.PORT_OUT, 4 if not pio else 1,
                          pio=pio, unregister=True)


def test_enable_cap_user_space_msr(machine):
    # KVM_CAP_X86_USER_SPACE_MSR: unknown MSRs exit to user space (KVM_EXIT_X86_RDMSR)
    vm = machine.vm
    if not vm.check_extension("X86_USER_SPACE_MSR"):
        pytest.skip("host: lacks KVM_CAP_X86_USER_SPACE_MSR")
    reasons = MsrExitReason.INVAL | MsrExitReason.UNKNOWN
    vm.enable_cap(kvmsys.fd.CAPABILITIES["X86_USER_SPACE_MSR"], 0, (reasons,))
    msr = 0x12345678
    # mov ecx, msr; rdmsr; out 0x12, eax; hlt
    code = b"\xB9" + struct.pack("<I", msr) + b"\x0F\x32\xE7\x12\xF4"
    load_code(machine.vcpu, machine.mem, code)
    ex = machine.run(timeout=5)
    assert isinstance(ex, MsrExit)
    assert ex.reason == ExitReason.X86_RDMSR and ex.name == "X86_RDMSR"
    assert (ex.error, ex.index, ex.msr_reason) == (False, msr, MsrExitReason.UNKNOWN)
    ex.data = 0xCAFEF00D                # what rdmsr reads
    ex = machine.run(timeout=5)
    assert isinstance(ex, IoExit) and ex.port == L.PORT_RESULT and ex.value == 0xCAFEF00D


def test_enable_cap_unknown_is_refused(machine):
    with pytest.raises(KvmOSError) as e:
        machine.vm.enable_cap(0xFFFF)
    assert e.value.errno == errno.EINVAL and e.value.op == "KVM_ENABLE_CAP"


def test_vm_check_extension_and_context_manager():
    with kvmsys.Kvm() as k:
        with k.create_vm() as vm:
            assert vm.check_extension("USER_MEMORY") == k.check_extension("USER_MEMORY")
            assert vm.require("USER_MEMORY", "a test") > 0
            with pytest.raises(kvmsys.CapabilityError):
                vm.require(100000, "a test")
            vcpu = vm.create_vcpu(0)
        assert vm.closed and vcpu.closed


# === vCPU state: get -> set -> get =====================================================

def test_regs_roundtrip(machine):
    v = machine.vcpu
    regs = v.get_regs()
    regs.update(rax=1, rbx=0x1234, r15=(1 << 64) - 1, rip=0xC000, rflags=0x202)
    v.set_regs(regs)
    assert v.get_regs() == regs
    assert v.regs.as_dict() == regs         # the comm-area copy agrees


def test_sregs_roundtrip(machine):
    v = machine.vcpu
    s = v.get_sregs()
    s["cr2"] = 0xFEEDF000
    s["ds"] = dict(s["ds"], base=0x10000, selector=0x1000)
    v.set_sregs(s)
    assert v.get_sregs() == s


def test_fpu_roundtrip(machine):
    v = machine.vcpu
    fpu = v.get_fpu()
    assert len(fpu) == 416
    fpu["xmm0"] = bytes(range(16))
    v.set_fpu(fpu)
    assert v.get_fpu() == bytes(fpu)


def test_msrs_roundtrip(machine):
    v = machine.vcpu
    want = {0x174: 0x10, 0x175: 0x8000, 0x176: 0xC000,             # SYSENTER_CS/ESP/EIP
            0xC0000081: 0x0023001000000000, 0xC0000082: 0xFFFFFFFF81000000,  # STAR, LSTAR
            0xC0000102: 0x00007F0000001000}                         # KERNEL_GS_BASE
    assert set(v.get_msrs(list(want))) == set(want)
    assert v.set_msrs(want) == len(want)
    assert v.get_msrs(list(want)) == want
    # an MSR KVM does not know: the kernel stops there (0 set, none read)
    assert v.set_msrs({0x12345678: 1}) == 0
    assert v.get_msrs([0x12345678]) == {}


def test_cpuid2_is_what_the_guest_sees(machine):
    with kvmsys.Kvm() as k:
        entries = k.supported_cpuid()
    for e in entries:
        if e["function"] == 0:
            e["ebx"] = 0x736D766B           # "kvms"
    machine.vcpu.set_cpuid2(entries)
    # xor eax, eax; cpuid; mov eax, ebx; out 0x12, eax; hlt
    load_code(machine.vcpu, machine.mem, b"\x31\xC0\x0F\xA2\x89\xD8\xE7\x12\xF4")
    ex = machine.run(timeout=5)
    assert isinstance(ex, IoExit) and ex.port == L.PORT_RESULT and ex.value == 0x736D766B


def test_debugregs_roundtrip(machine):
    v = machine.vcpu
    d = v.get_debugregs()
    d["db"] = [0x1000, 0x2000, 0x3000, 0x4000]
    d["dr7"] = 0x401
    v.set_debugregs(d)
    assert v.get_debugregs() == d


@pytest.mark.parametrize("name", ["vcpu_events", "xsave", "xcrs"])
def test_blob_roundtrip(machine, name):
    v = machine.vcpu
    if name == "xsave":
        assert v.vm.check_extension("XSAVE")
    blob = getattr(v, "get_" + name)()
    assert isinstance(blob, bytearray) and blob and bytes(blob)     # typed state, still bytes
    getattr(v, "set_" + name)(blob)
    assert getattr(v, "get_" + name)() == blob


def test_mp_state_roundtrip(machine):
    v = machine.vcpu
    state = v.get_mp_state()
    assert state == KVM_MP_STATE_RUNNABLE
    v.set_mp_state(state)
    assert v.get_mp_state() == state


def test_lapic_and_mp_state_with_irqchip(rig):
    v = rig.vcpu
    lapic = v.get_lapic()
    assert len(lapic) == 1024
    lapic["tpr"] = 0x10
    v.set_lapic(lapic)
    got = v.get_lapic()
    assert got["tpr"] == 0x10 and got["ppr"] == 0x10   # and the PPR KVM derives from it
    v.set_lapic(got)
    assert v.get_lapic() == got
    v.set_mp_state(KVM_MP_STATE_HALTED)
    assert v.get_mp_state() == KVM_MP_STATE_HALTED
    v.set_mp_state(KVM_MP_STATE_RUNNABLE)
    assert v.get_mp_state() == KVM_MP_STATE_RUNNABLE


# === vCPU: debugging, immediate exit, kick =============================================

@pytest.mark.parametrize("mode", MODES)
def test_single_step(machine, mode):
    # long64 without the PVM native switch: on PVM, native mode reflects the
    # single-step #DB into the guest instead of exiting (a host quirk).
    load_code(machine.vcpu, machine.mem, b"\x90\x90" + JMP_SELF, mode=mode, native=False)
    machine.vcpu.set_guest_debug(True, single_step=True)
    pcs = []
    for _ in range(4):
        ex = machine.run(timeout=5)
        assert isinstance(ex, DebugExit) and ex.name == "DEBUG"
        assert ex.exception == 1                    # #DB
        pcs.append(ex.pc)
    # nop, nop, then the jump to itself, again and again
    assert pcs == [L.LOAD_ADDR + 1, L.LOAD_ADDR + 2, L.LOAD_ADDR + 2, L.LOAD_ADDR + 2]
    machine.vcpu.set_guest_debug(False)
    ex = machine.run(timeout=0.1)
    assert ex.name == "DEADLINE"                   # no more debug exits


def test_immediate_exit(machine):
    v = machine.vcpu
    machine.load("pio_out_loop.pm32", n=5)
    assert v.immediate_exit == 0
    v.immediate_exit = 1                # documented: setting it is a kick
    assert v.immediate_exit == 1 and v.comm_area[RUN_IMMEDIATE_EXIT] == 1
    ex = machine.run(timeout=5)
    # KVM_RUN returned at once (EINTR), reported as the kick it is
    assert isinstance(ex, KickExit)
    assert u32(machine.mem, L.COUNTER_ADDR) == 0     # the guest did not run
    assert v.immediate_exit == 0                      # taken: the next run is normal
    ex = machine.run(timeout=5)
    assert isinstance(ex, IoExit) and ex.port == L.PORT_OUT
    assert u32(machine.mem, L.COUNTER_ADDR) == 1


def test_immediate_exit_cleared_withdraws_the_kick(machine):
    v = machine.vcpu
    machine.load("pio_out_loop.pm32", n=5)
    v.immediate_exit = 1
    v.immediate_exit = 0
    assert v.immediate_exit == 0 and v.comm_area[RUN_IMMEDIATE_EXIT] == 0
    ex = machine.run(timeout=5)
    assert isinstance(ex, IoExit) and u32(machine.mem, L.COUNTER_ADDR) == 1


def test_kick_before_run_is_not_lost(machine):
    machine.load("pio_out_loop.pm32", n=5)
    machine.vcpu.kick()
    ex = machine.run(timeout=5)
    assert isinstance(ex, KickExit) and ex.name == "KICK"
    assert u32(machine.mem, L.COUNTER_ADDR) == 0
    ex = machine.run(timeout=5)                       # one kick, one KickExit
    assert isinstance(ex, IoExit)


def test_kick_from_another_thread(machine):
    load_code(machine.vcpu, machine.mem, JMP_SELF)
    kicker = threading.Timer(0.1, machine.vcpu.kick)
    kicker.start()
    try:
        ex = machine.run(timeout=10)
    finally:
        kicker.join()
    assert isinstance(ex, KickExit)


# === vCPU: registers in the comm area (SyncRegs) =======================================

@pytest.mark.parametrize("mode", MODES)
def test_sync_regs_read_after_exit(machine, mode):
    v = machine.vcpu
    assert v.vm.has_sync_regs
    machine.load(f"pio_out_loop.{mode}", n=7)
    for _ in range(3):
        ex = machine.run(timeout=5)
        assert isinstance(ex, IoExit)
    regs = v.regs
    assert regs.rax & 0xFF == 3                 # AL = low byte of the counter
    assert regs.rcx == 7 - 2                    # ECX counts iterations down
    assert regs.as_dict() == v.get_regs()       # the view agrees with KVM_GET_REGS
    # and it is the comm area itself, read in place
    comm = v.comm_area
    assert struct.unpack_from("<Q", comm, RUN_SYNC_REGS + 16 * 8)[0] == regs.rip
    assert struct.unpack_from("<Q", comm, RUN_SYNC_REGS)[0] == regs.rax


@pytest.mark.parametrize("mode", MODES)
def test_sync_regs_write_takes_effect_on_next_run(machine, mode):
    v = machine.vcpu
    debug_exit_port(machine.vm)
    machine.load(f"pio_out_loop.{mode}", n=5)
    ex = machine.run(timeout=5)
    assert isinstance(ex, IoExit)
    # the value a guest program somewhere else will report: mov al, 0x5a; out 0xf4, al
    machine.mem[0xE000:0xE004] = out(L.PORT_DEBUG_EXIT, 0x5A)
    regs = v.regs
    regs.rip = 0xE000
    regs.rbx = 0x1234
    comm = v.comm_area
    assert struct.unpack_from("<Q", comm, RUN_DIRTY_REGS)[0] & KVM_SYNC_X86_REGS
    assert v.get_regs()["rip"] == 0xE000         # unsent writes are what get_regs reports
    ex = machine.run(timeout=5)
    assert isinstance(ex, StopExit) and ex.status == status(0x5A)
    # the kernel took them (and cleared the dirty bit); RBX survived the run
    assert not struct.unpack_from("<Q", comm, RUN_DIRTY_REGS)[0] & KVM_SYNC_X86_REGS
    assert v.get_regs()["rbx"] == 0x1234 == v.regs.rbx


def test_sync_regs_write_rax_before_first_run(machine):
    debug_exit_port(machine.vm)
    machine.load("debug_exit.pm32")             # writes AL to isa-debug-exit
    machine.vcpu.regs.rax = 0x33
    ex = machine.run(timeout=5)
    assert isinstance(ex, StopExit) and ex.status == status(0x33)


def test_comm_area(machine):
    comm = machine.vcpu.comm_area
    assert not comm.readonly and len(comm) == machine.vcpu.vm.mmap_size
    machine.load("pio_out_loop.pm32", n=5)
    ex = machine.run(timeout=5)
    assert struct.unpack_from("<I", comm, 8)[0] == ex.reason == 2    # exit_reason: KVM_EXIT_IO
    assert ex.vcpu is machine.vcpu
