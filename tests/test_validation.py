"""Every validation error: typed, raised before the kernel sees the request, never a crash.

After each refused call the object must be unchanged and still usable.
"""
import errno
import math
import pickle
import struct
import threading

import pytest

import kvmsys
from kvmsys import _core, syscall, KickExit, StopExit
from kvmsys.enums import Kind, Space
from kvmsys.errors import (ArgumentTypeError, ConfigurationError, InvalidArgumentError, KvmOSError, KvmsysError,
                           KvmUnavailableError, StaleVcpuError, StateError, VcpuBindingError)
from kvmsys.guests import get, layout as L

PIO, MMIO = Space.PIO, Space.MMIO
PAGE = 4096


def u32(mem, addr):
    return struct.unpack_from("<I", mem, addr)[0]


# === memory slots ======================================================================

BAD_SLOTS = {
    "misaligned gpa": lambda vm: vm.add_memory(1, 0x400000 + 0x800, PAGE),
    "misaligned size": lambda vm: vm.add_memory(1, 0x400000, PAGE + 1),
    "zero size": lambda vm: vm.add_memory(1, 0x400000, 0),
    "overlap": lambda vm: vm.add_memory(1, L.RAM_SIZE - PAGE, 2 * PAGE),
    "inside another": lambda vm: vm.add_memory(1, PAGE, PAGE),
    "covers another": lambda vm: vm.add_memory(1, 0, 2 * L.RAM_SIZE),
    "slot too large": lambda vm: vm.add_memory(vm.max_slots, 0x400000, PAGE),
    "slot negative": lambda vm: vm.add_memory(-1, 0x400000, PAGE),
    "slot reused": lambda vm: vm.add_memory(0, 0x400000, PAGE),
    "gpa+size wraps": lambda vm: vm.add_memory(1, (1 << 64) - PAGE, 2 * PAGE),
    "beyond 52 bits": lambda vm: vm.add_memory(1, 1 << 52, PAGE),
    "remove unknown": lambda vm: vm.remove_memory(5),
    "memory() unknown": lambda vm: vm.memory(5),
    "dirty log unknown slot": lambda vm: vm.get_dirty_log(5),
    "dirty log not enabled": lambda vm: vm.get_dirty_log(0),
}


@pytest.mark.parametrize("case", sorted(BAD_SLOTS))
def test_bad_memory_slot(machine, case):
    vm = machine.vm
    before = {n: (s.guest_phys_addr, s.size) for n, s in vm.memory_slots.items()}
    with pytest.raises(InvalidArgumentError):
        BAD_SLOTS[case](vm)
    assert {n: (s.guest_phys_addr, s.size) for n, s in vm.memory_slots.items()} == before
    # the VM still works: the next add succeeds
    assert len(vm.add_memory(1, 0x400000, PAGE)) == PAGE


def test_adjacent_slots_are_fine(machine):
    vm = machine.vm
    vm.add_memory(1, L.RAM_SIZE, PAGE)
    vm.add_memory(2, L.RAM_SIZE + PAGE, PAGE)
    assert sorted(vm.memory_slots) == [0, 1, 2]


BAD_ACCESS = {
    "read past the end": lambda vm: vm.read(L.RAM_SIZE - 2, 4),
    "read unbacked": lambda vm: vm.read(0x10000000, 1),
    "read spanning slots": lambda vm: vm.read(L.RAM_SIZE - 2, 4),
    "read huge": lambda vm: vm.read(0, 1 << 63),
    "read wrapping": lambda vm: vm.read((1 << 64) - 1, 2),
    "write past the end": lambda vm: vm.write(L.RAM_SIZE - 2, b"abcd"),
    "write spanning slots": lambda vm: vm.write(L.RAM_SIZE - 2, b"abcd"),
    "write unbacked": lambda vm: vm.write(0x10000000, b"a"),
}


@pytest.mark.parametrize("case", sorted(BAD_ACCESS))
def test_bad_memory_access(machine, case):
    vm = machine.vm
    if "spanning" in case:
        vm.add_memory(1, L.RAM_SIZE, PAGE)      # contiguous, but a different slot
    with pytest.raises(InvalidArgumentError):
        BAD_ACCESS[case](vm)
    assert bytes(machine.mem[L.RAM_SIZE - 2:]) == b"\0\0"      # nothing was written


def test_access_at_the_edges(machine):
    vm = machine.vm
    vm.write(L.RAM_SIZE - 4, b"edge")
    assert vm.read(L.RAM_SIZE - 4, 4) == b"edge"
    assert vm.read(L.RAM_SIZE, 0) == b""        # an empty range at the end is fine


# === vCPU ids and the thread binding ===================================================

def test_bad_vcpu_ids(fdvm):
    max_id = fdvm.check_extension("MAX_VCPU_ID") or fdvm.check_extension("MAX_VCPUS")
    with pytest.raises(InvalidArgumentError):
        fdvm.create_vcpu(-1)
    with pytest.raises(InvalidArgumentError):
        fdvm.create_vcpu(max_id)
    v = fdvm.create_vcpu(0)
    with pytest.raises(InvalidArgumentError, match="already exists"):
        fdvm.create_vcpu(0)
    # a closed vCPU's id stays taken: KVM keeps the vCPU until the VM goes
    v.close()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        fdvm.create_vcpu(0)
    assert fdvm.create_vcpu(max_id - 1).id == max_id - 1


def test_binding_errors(fresh_process_vm):
    for call in (kvmsys.run, kvmsys.remove_vcpu, kvmsys.handle):
        with pytest.raises(VcpuBindingError):
            call()
    assert kvmsys.current() is None
    kvmsys.add_vcpu()
    with pytest.raises(VcpuBindingError):
        kvmsys.add_vcpu()                       # one vCPU per thread
    with pytest.raises(VcpuBindingError):
        kvmsys.destroy_vm()                     # a vCPU is still bound
    handle = kvmsys.handle()
    assert handle.alive
    kvmsys.remove_vcpu()
    assert not handle.alive
    for call in (handle.kick, handle.nmi, handle.stats):
        with pytest.raises(StaleVcpuError):
            call()
    with pytest.raises(StaleVcpuError):
        handle.call_soon(print)
    assert issubclass(VcpuBindingError, StateError) and issubclass(StaleVcpuError, StateError)


def test_configure_errors(fresh_process_vm):
    with pytest.raises(TypeError):                 # keyword parameters: Python's own error
        kvmsys.configure(no_such_option=1)
    for size in (-PAGE, PAGE + 1, "1M", True):
        with pytest.raises(InvalidArgumentError):
            kvmsys.configure(memory_size=size)
    with pytest.raises(InvalidArgumentError):
        kvmsys.configure(irqchip=False, pit=True)
    kvmsys.vm()                                 # the process VM exists from here on
    with pytest.raises(ConfigurationError):
        kvmsys.configure(memory_size=4 << 20)
    assert syscall.config()["memory_size"] == L.RAM_SIZE
    kvmsys.destroy_vm()
    kvmsys.configure(memory_size=4 << 20)       # fine again once it is gone
    assert len(kvmsys.vm().memory(0)) == 4 << 20


# === fast handlers =====================================================================

BAD_HANDLERS = {
    "empty range": (PIO, 0x10, 0x10, Kind.SINK, {}),
    "reversed range": (PIO, 0x11, 0x10, Kind.SINK, {}),
    "PIO beyond 0xffff": (PIO, 0xFFF0, 0x10001, Kind.SINK, {}),
    "bad kind": (PIO, 0x10, 0x11, 99, {}),
    "bad space": (7, 0x10, 0x11, Kind.SINK, {}),
    "callback on a C kind": (PIO, 0x10, 0x11, Kind.SINK, {"callback": print}),
    "callback not callable": (PIO, 0x10, 0x11, Kind.PYTHON, {"callback": 42}),
}


@pytest.mark.parametrize("case", sorted(BAD_HANDLERS))
def test_bad_handler(machine, case):
    space, start, end, kind, kw = BAD_HANDLERS[case]
    before = machine.vm.handlers()
    with pytest.raises(InvalidArgumentError):
        machine.vm.add_handler(space, start, end, kind, **kw)
    assert machine.vm.handlers() == before


def test_at_most_64_handlers(machine):
    vm = machine.vm
    for i in range(64 - len(vm.handlers())):
        vm.add_handler(MMIO, 0xE0000000 + i, 0xE0000001 + i, Kind.IGNORE)
    assert len(vm.handlers()) == 64
    with pytest.raises(InvalidArgumentError, match="64"):
        vm.add_handler(PIO, 0x10, 0x11, Kind.SINK)
    assert len(vm.handlers()) == 64
    # the full table still works (port 0x10 has no handler: returned to Python)
    machine.load("pio_out_loop.pm32", n=3)
    ex = machine.run(timeout=5)
    assert ex.name == "IO" and ex.port == L.PORT_OUT


def test_bad_defaults(machine):
    with pytest.raises(InvalidArgumentError):
        machine.vm.set_default(PIO, Kind.SINK)
    with pytest.raises(InvalidArgumentError):
        machine.vm.set_default(len(Space), Kind.IGNORE)    # no such space
    with pytest.raises(InvalidArgumentError):
        machine.vm.set_hlt_action(Kind.SINK)


# === run() arguments ===================================================================

@pytest.mark.parametrize("kw", [dict(budget=2 ** 63), dict(budget=-1), dict(timeout=-1),
                                dict(timeout=-1e-9), dict(timeout=math.nan)],
                         ids=["budget2**63", "budget-1", "timeout-1", "timeout-tiny", "timeout-nan"])
def test_bad_run_arguments(machine, kw):
    machine.devices().load("pio_out_loop.pm32", n=3)
    with pytest.raises(InvalidArgumentError):
        machine.run(**kw)
    assert u32(machine.mem, L.COUNTER_ADDR) == 0       # the guest never ran
    ex = machine.run(timeout=5)                         # and the vCPU is not left "running"
    assert isinstance(ex, StopExit)


def test_run_argument_types(machine):
    with pytest.raises(TypeError):
        machine.run(timeout="soon")
    with pytest.raises(TypeError):
        machine.run(budget="many")


# === register and state conversions ====================================================

def test_set_regs_missing_key(machine):
    v = machine.vcpu
    before = v.get_regs()
    regs = dict(before, rax=5)
    del regs["rbx"]
    # Cython's dict -> struct kvm_regs conversion refuses a missing field
    with pytest.raises(ValueError, match="rbx"):
        v.set_regs(regs)
    assert v.get_regs() == before


@pytest.mark.parametrize("bad, exc", [("x", ArgumentTypeError), (-1, InvalidArgumentError),
                                      (1 << 64, InvalidArgumentError), (None, ArgumentTypeError),
                                      (1.5, ArgumentTypeError)])
def test_set_regs_bad_value(machine, bad, exc):
    v = machine.vcpu
    before = v.get_regs()
    with pytest.raises(exc):
        v.set_regs(dict(before, rax=bad))
    assert v.get_regs() == before


def test_set_regs_not_a_dict(machine):
    with pytest.raises(TypeError):
        machine.vcpu.set_regs(list(machine.vcpu.get_regs().values()))


def test_set_sregs_missing_nested_key(machine):
    v = machine.vcpu
    before = v.get_sregs()
    s = dict(before, cs=dict(before["cs"]))
    del s["cs"]["base"]
    with pytest.raises(ValueError):
        v.set_sregs(s)
    d = v.get_debugregs()
    del d["db"]
    with pytest.raises(ValueError):
        v.set_debugregs(d)
    assert v.get_sregs() == before


@pytest.mark.parametrize("name", ["fpu", "xsave", "xcrs", "vcpu_events"])
@pytest.mark.parametrize("data", [b"x", b"", "wrong size"], ids=["1byte", "empty", "str"])
def test_blob_of_wrong_size(machine, name, data):
    v = machine.vcpu
    before = getattr(v, "get_" + name)()
    with pytest.raises(InvalidArgumentError):     # a str too: a typed error, not bytearray's TypeError
        getattr(v, "set_" + name)(data)
    with pytest.raises(InvalidArgumentError):
        getattr(v, "set_" + name)(before + b"\0")      # one byte too many
    assert getattr(v, "get_" + name)() == before


def test_lapic_needs_irqchip(machine):
    with pytest.raises(InvalidArgumentError, match="irqchip"):
        machine.vcpu.get_lapic()
    with pytest.raises(InvalidArgumentError, match="irqchip"):
        machine.vcpu.set_lapic(bytes(1024))


@pytest.mark.parametrize("call", [
    lambda v: v.get_msrs([1 << 32]),
    lambda v: v.get_msrs([-1]),
    lambda v: v.get_msrs([]),
    lambda v: v.get_msrs(range(4097)),
    lambda v: v.set_msrs({1 << 32: 0}),
    lambda v: v.set_msrs({-1: 0}),
    lambda v: v.set_msrs({0x174: 1 << 64}),
    lambda v: v.set_msrs({0x174: -1}),
    lambda v: v.set_msrs({}),
], ids=["get>32bit", "get-neg", "get-none", "get-too-many", "set>32bit", "set-neg",
        "value>64bit", "value-neg", "set-none"])
def test_bad_msrs(machine, call):
    v = machine.vcpu
    before = v.get_msrs([0x174])
    with pytest.raises(InvalidArgumentError):
        call(v)
    assert v.get_msrs([0x174]) == before


def test_bad_vcpu_misc(machine):
    v = machine.vcpu
    with pytest.raises(InvalidArgumentError):
        v.set_cpuid2([])
    with pytest.raises(InvalidArgumentError):
        v.set_cpuid2([{"function": 0}] * 513)
    with pytest.raises(Exception):      # an entry without "function": refused, not a crash
        v.set_cpuid2([{}])
    with pytest.raises(InvalidArgumentError):
        v.interrupt(256)
    with pytest.raises(KvmOSError) as e:        # no validation here: the kernel's EINVAL
        v.set_mp_state(99)
    assert e.value.errno == errno.EINVAL


# === VM platform and interrupt calls ===================================================

@pytest.mark.parametrize("call", [
    lambda vm: vm.set_tss_addr(0xFFFFF000),
    lambda vm: vm.set_identity_map_addr(0xFFFBC001),
    lambda vm: vm.set_identity_map_addr(1 << 32),
    lambda vm: vm.irq_line(4, 1),
    lambda vm: vm.signal_msi(0xFEE00000, 0x30),
    lambda vm: vm.irqfd(0, 4),
    lambda vm: vm.ioeventfd(0, 0x10, 3, pio=True),
    lambda vm: vm.ioeventfd(-1, 0x10, 1, pio=True),
    lambda vm: vm.ioeventfd(0, 0x10000, 1, pio=True),
    lambda vm: vm.register_coalesced(0xD0000000, 0),
    lambda vm: vm.register_coalesced(0xFFF0, 0x20, pio=True),
    lambda vm: vm.enable_cap(1, 0, (1, 2, 3, 4, 5)),
    lambda vm: vm.check_extension(-1),
    lambda vm: vm.check_extension("NO_SUCH_CAP"),
], ids=["tss-high", "idmap-unaligned", "idmap-high", "irq_line-no-irqchip",
        "msi-no-irqchip", "irqfd-no-irqchip", "ioeventfd-len", "ioeventfd-fd",
        "ioeventfd-port", "coalesced-empty", "coalesced-pio-range", "enable_cap-args",
        "ext-negative", "ext-name"])
def test_bad_vm_call(machine, call):
    with pytest.raises(InvalidArgumentError):
        call(machine.vm)


def test_irqchip_after_vcpu(machine):
    with pytest.raises(InvalidArgumentError, match="before the first vCPU"):
        machine.vm.create_irqchip()


# === C-integer arguments out of their C range ==========================================

OUT_OF_C_RANGE = {
    "negative gpa": lambda m: m.vm.add_memory(1, -PAGE, PAGE),
    "negative size": lambda m: m.vm.add_memory(1, 0x400000, -PAGE),
    "slot beyond int": lambda m: m.vm.add_memory(1 << 40, 0x400000, PAGE),
    "negative read address": lambda m: m.vm.read(-1, 4),
    "vCPU id beyond int": lambda m: m.vm.create_vcpu(1 << 40),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_C_RANGE))
def test_out_of_c_range_is_refused(machine, case):
    # refused with an exception, never wrapped around into a valid-looking value
    with pytest.raises((InvalidArgumentError, OverflowError)):
        OUT_OF_C_RANGE[case](machine)
    assert sorted(machine.vm.memory_slots) == [0]


@pytest.mark.parametrize("case", sorted(OUT_OF_C_RANGE))
def test_out_of_c_range_is_invalid_argument(machine, case):
    with pytest.raises(InvalidArgumentError):
        OUT_OF_C_RANGE[case](machine)


# === closed objects ====================================================================

KVM_CALLS = {
    "api_version": lambda k: k.api_version(),
    "check_extension": lambda k: k.check_extension("USER_MEMORY"),
    "capabilities": lambda k: k.capabilities(),
    "vcpu_mmap_size": lambda k: k.vcpu_mmap_size(),
    "supported_cpuid": lambda k: k.supported_cpuid(),
    "msr_index_list": lambda k: k.msr_index_list(),
    "create_vm": lambda k: k.create_vm(),
    "fileno": lambda k: k.fileno(),
}


@pytest.mark.parametrize("op", sorted(KVM_CALLS))
def test_closed_kvm(op):
    k = kvmsys.Kvm()
    vm = k.create_vm()
    k.close()
    k.close()                               # idempotent
    assert k.closed
    with pytest.raises(StateError):
        KVM_CALLS[op](k)
    # VMs created from it stay valid
    assert vm.check_extension("USER_MEMORY") and not vm.closed
    vm.close()


VM_CALLS = {
    "add_memory": lambda vm: vm.add_memory(1, 0x400000, PAGE),
    "remove_memory": lambda vm: vm.remove_memory(0),
    "create_vcpu": lambda vm: vm.create_vcpu(1),
    "check_extension": lambda vm: vm.check_extension(1),
    "set_tss_addr": lambda vm: vm.set_tss_addr(0xFFFBD000),
    "set_identity_map_addr": lambda vm: vm.set_identity_map_addr(0xFFFBC000),
    "create_pit2": lambda vm: vm.create_pit2(),
    "get_dirty_log": lambda vm: vm.get_dirty_log(0),
    "register_coalesced": lambda vm: vm.register_coalesced(0xD0000000, 4),
    "ioeventfd": lambda vm: vm.ioeventfd(0, 0x10, 1, pio=True),
    "enable_cap": lambda vm: vm.enable_cap(1),
    "fileno": lambda vm: vm.fileno(),
}
VM_CALLS_BUGGY = {
    "memory": lambda vm: vm.memory(0),
    "read": lambda vm: vm.read(0, 4),
    "write": lambda vm: vm.write(0, b"x"),
    "add_handler": lambda vm: vm.add_handler(PIO, 0x10, 0x11, Kind.SINK),
    "set_default": lambda vm: vm.set_default(PIO, Kind.IGNORE),
    "set_hlt_action": lambda vm: vm.set_hlt_action(Kind.IGNORE),
}


@pytest.fixture
def closed_vm():
    k = kvmsys.Kvm()
    vm = k.create_vm()
    view = vm.add_memory(0, 0, L.RAM_SIZE)
    vcpu = vm.create_vcpu(0)
    vm.close()
    vm.close()                              # idempotent
    yield vm, vcpu, view
    k.close()


@pytest.mark.parametrize("op", sorted(VM_CALLS))
def test_closed_vm(closed_vm, op):
    vm, vcpu, view = closed_vm
    assert vm.closed and vcpu.closed        # closing the VM closed its vCPUs
    with pytest.raises(StateError):
        VM_CALLS[op](vm)


@pytest.mark.parametrize("op", sorted(VM_CALLS_BUGGY))
def test_closed_vm_memory_and_handlers(closed_vm, op):
    vm, vcpu, view = closed_vm
    with pytest.raises(StateError):
        VM_CALLS_BUGGY[op](vm)


def test_closed_vm_keeps_collected_output(closed_vm):
    vm, vcpu, view = closed_vm
    assert vm.console() == b"" and vm.port_counts() == {}
    view[0] = 1                             # views outlive the VM
    assert view[0] == 1


VCPU_CALLS = {
    "run": lambda v: v.run(),
    "run(timeout)": lambda v: v.run(timeout=1),
    "kick": lambda v: v.kick(),
    "regs": lambda v: v.regs,
    "get_regs": lambda v: v.get_regs(),
    "set_regs": lambda v, r=dict.fromkeys(L.REG_NAMES, 0): v.set_regs(r),
    "get_sregs": lambda v: v.get_sregs(),
    "get_fpu": lambda v: v.get_fpu(),
    "set_fpu": lambda v: v.set_fpu(bytes(416)),
    "get_msrs": lambda v: v.get_msrs([0x174]),
    "set_msrs": lambda v: v.set_msrs({0x174: 0}),
    "set_cpuid2": lambda v: v.set_cpuid2([{"function": 0}]),
    "get_mp_state": lambda v: v.get_mp_state(),
    "get_vcpu_events": lambda v: v.get_vcpu_events(),
    "get_xsave": lambda v: v.get_xsave(),
    "get_xcrs": lambda v: v.get_xcrs(),
    "get_debugregs": lambda v: v.get_debugregs(),
    "set_guest_debug": lambda v: v.set_guest_debug(True),
    "interrupt": lambda v: v.interrupt(32),
    "nmi": lambda v: v.nmi(),
    "immediate_exit": lambda v: v.immediate_exit,
    "set immediate_exit": lambda v: setattr(v, "immediate_exit", 1),
    "comm_area": lambda v: v.comm_area,
    "stats": lambda v: v.stats(),
    "reset_stats": lambda v: v.reset_stats(),
    "fileno": lambda v: v.fileno(),
    "handle": lambda v: v.handle(),
}


@pytest.mark.parametrize("op", sorted(VCPU_CALLS))
def test_closed_vcpu(fdvm, op):
    v = fdvm.create_vcpu(0)
    v.close()
    v.close()                               # idempotent
    assert v.closed
    with pytest.raises(StateError):
        VCPU_CALLS[op](v)


def test_close_while_running_and_second_runner(fdvm):
    inside = threading.Event()
    # the guest reports once (a Python handler, called inside run()), then loops forever
    fdvm.add_handler(PIO, L.PORT_OUT, L.PORT_OUT + 1, Kind.PYTHON, callback=lambda ex: inside.set())
    v = fdvm.create_vcpu(0)
    mem = fdvm.memory(0)
    L.prepare(get("compute.pm32"), v, mem)
    code = bytes([0xE6, L.PORT_OUT]) + b"\xEB\xFE"       # out 0x10, al; jmp .
    mem[L.LOAD_ADDR:L.LOAD_ADDR + len(code)] = code
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("exit", v.run(timeout=10)))
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(StateError, match="already running"):
            v.run(timeout=1)
        with pytest.raises(StateError, match="running"):
            v.close()
        assert not v.closed
    finally:
        v.kick()
        t.join(10)
    assert isinstance(result["exit"], KickExit)
    v.close()
    assert v.closed


# === kernel errors and the error types =================================================

def test_kvm_os_error_carries_errno_and_op(machine):
    with pytest.raises(KvmOSError) as e:
        machine.vm.enable_cap(0xFFFF)
    err = e.value
    assert isinstance(err, OSError) and isinstance(err, KvmsysError)
    assert err.errno == errno.EINVAL and err.op == "KVM_ENABLE_CAP"
    assert "KVM_ENABLE_CAP" in str(err) and "EINVAL" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.errno, copy.op, str(copy)) == (KvmOSError, err.errno, err.op, str(err))


def test_kvm_os_error_pit_without_irqchip(fdvm):
    with pytest.raises(KvmOSError) as e:
        fdvm.create_pit2()          # the kernel answers ENOENT: no in-kernel PIC
    assert e.value.errno == errno.ENOENT and e.value.op == "KVM_CREATE_PIT2"


@pytest.mark.nokvm
def test_missing_device_is_unavailable_with_hint():
    with pytest.raises(KvmUnavailableError) as e:
        kvmsys.Kvm("/nonexistent/kvm")
    err = e.value
    assert isinstance(err, KvmOSError) and isinstance(err, OSError)
    assert err.errno == errno.ENOENT and err.op == "open(/nonexistent/kvm)"
    assert err.hint and "modprobe" in err.hint and err.hint in str(err)


@pytest.mark.nokvm
def test_other_open_failures_are_plain_os_errors():
    with pytest.raises(KvmOSError) as e:
        kvmsys.Kvm("/")             # a directory: EISDIR, not "KVM is missing"
    assert e.value.errno == errno.EISDIR
    assert not isinstance(e.value, KvmUnavailableError)


@pytest.mark.nokvm
def test_error_hierarchy():
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, KvmsysError)
    assert issubclass(StateError, RuntimeError)
    assert issubclass(ConfigurationError, StateError)
    assert issubclass(KvmUnavailableError, KvmOSError) and issubclass(KvmOSError, OSError)
    assert issubclass(kvmsys.KvmPermissionError, PermissionError)


def test_close_racing_run_never_crashes():
    # close() and run() claim the vCPU atomically: one of them is refused, cleanly.
    import threading
    from kvmsys import Kvm, _core
    from kvmsys.guests import get, layout
    outcomes = []
    with Kvm() as kvm:
        for _ in range(100):
            vm = kvm.create_vm()
            mem = vm.add_memory(0, 0, layout.RAM_SIZE)
            vm.set_default(0, Kind.IGNORE)
            v = vm.create_vcpu(0)
            layout.prepare(get("pio_out_loop.pm32"), v, mem, n=0)
            go = threading.Barrier(2)

            def run():
                go.wait()
                try:
                    outcomes.append(type(v.run(budget=20, timeout=5)).__name__)
                except StateError:
                    outcomes.append("run refused")

            t = threading.Thread(target=run)
            t.start()
            go.wait()
            try:
                v.close()
                outcomes.append("closed")
            except StateError:
                outcomes.append("close refused")
            t.join()
            if not v.closed:
                v.close()
            vm.close()
    assert len(outcomes) == 200
    assert set(outcomes) <= {"closed", "close refused", "run refused", "BudgetExit"}
    assert outcomes.count("closed") + outcomes.count("close refused") == 100
