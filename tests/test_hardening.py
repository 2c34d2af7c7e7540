"""Hostile use: nothing a Python caller does crashes, freezes or wedges the process, and
every wrong value or type is a typed KvmsysError (issue 10, and the limits of issue 9).

Checks that would segfault or hang on a broken build run in a subprocess, so that they
fail cleanly instead of taking the test run down."""
import math
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

import kvmsys
from kvmsys import _core, platform, pvm, runner, smp, syscall
from kvmsys.errors import (ArgumentTypeError, InvalidArgumentError, KvmOSError, KvmsysError,
                           StaleVcpuError, StateError, VcpuBindingError)
from kvmsys.guests import get, layout as L
from kvmsys.runner import setup_devices

K = _core.H_KINDS
PIO, MMIO = _core.SPACES["PIO"], _core.SPACES["MMIO"]
JMP_SELF = b"\xeb\xfe"


def python(code, timeout=60, **kw):
    """Run *code* in a fresh interpreter (installed package, not the source tree)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          timeout=timeout, cwd=tempfile.gettempdir(), **kw)


# === 1. no object without its native state ==========================================

EXIT_CLASSES = ["Exit", "IoExit", "MmioExit", "HltExit", "ShutdownExit", "IntrExit", "FailEntryExit",
                "InternalErrorExit", "SystemEventExit", "DebugExit", "UnknownExit", "StopExit",
                "KickExit", "DeadlineExit", "BudgetExit"]


def test_exits_and_regs_cannot_be_built_without_a_comm_area():
    # On a build without the checks every line below segfaults: hence the subprocess.
    p = python(f"""
        import kvmsys
        from kvmsys import _core
        from kvmsys.errors import ArgumentTypeError, StateError
        fields = ["port", "size", "count", "data", "value", "direction", "is_in", "address", "length",
                  "is_write", "suberror", "type", "exception", "pc", "dr6", "dr7", "cpu",
                  "hardware_entry_failure_reason", "rax", "rip", "rflags"]
        classes = [getattr(kvmsys, n) for n in {EXIT_CLASSES!r}] + [_core.SyncRegs]
        for cls in classes:
            try:
                cls()
                raise SystemExit(f"{{cls.__name__}}() was built")
            except ArgumentTypeError:
                pass
            obj = cls.__new__(cls)              # bypasses __init__: no comm area behind it
            repr(obj)
            for f in fields:
                if hasattr(type(obj), f):
                    try:
                        getattr(obj, f)
                        raise SystemExit(f"{{cls.__name__}}.{{f}} read nothing")
                    except StateError:
                        pass
            if cls is _core.SyncRegs:
                try:
                    obj.rip = 1
                    raise SystemExit("SyncRegs.rip written")
                except StateError:
                    pass
                try:
                    obj.as_dict()
                    raise SystemExit("SyncRegs.as_dict() read")
                except StateError:
                    pass
        print("ok")
    """)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert p.stdout.strip() == b"ok"


@pytest.mark.nokvm
def test_other_core_classes_refuse_construction():
    with pytest.raises(ArgumentTypeError):
        _core.VcpuHandle(None, 0)
    with pytest.raises(ArgumentTypeError):
        _core.MemorySlot()
    with pytest.raises(ArgumentTypeError):
        _core.DeviceCore()
    d = _core.DeviceCore.__new__(_core.DeviceCore)      # fd -1, not stdin's 0
    with pytest.raises(StateError):
        d.has_attr(0, 0)
    del d
    os.fstat(0)                                         # stdin was not closed by its dealloc
    h = _core.VcpuHandle.__new__(_core.VcpuHandle)
    assert not h.alive and "no vCPU" in repr(h)
    for op in (h.kick, h.nmi, h.stats, lambda: h.interrupt(32), lambda: h.call_soon(print), lambda: h.id):
        with pytest.raises(StaleVcpuError):
            op()
    with pytest.raises(ArgumentTypeError):
        _core.VmCore(None)
    with pytest.raises(ArgumentTypeError):
        _core.VcpuCore(None, 0)
    for fn in (_core.release_state, _core.handle_of):
        with pytest.raises(ArgumentTypeError):
            fn(None)
    with pytest.raises(ArgumentTypeError):                  # the binding step: no vCPU, no binding
        _core.bind_from_pool({"vcpu": None}, {}, {}, None)
    assert _core.bound() is None


def test_handle_generation_comes_from_the_vcpu(machine):
    h = machine.vcpu.handle()
    assert h.alive and h.generation >= 1
    with pytest.raises(ArgumentTypeError):
        type(h)(machine.vcpu, 0)            # no handle with a made-up generation


# === 2. no freeze: vCPU ioctls from another thread during KVM_RUN ======================

def test_vcpu_ioctl_from_another_thread_during_run_is_refused(machine):
    vcpu = machine.vcpu
    box = {}
    if machine.abi == "sys":        # the run happens in a thread of its own: hand it the vCPU
        kvmsys.remove_vcpu()

    def owner():
        try:
            if machine.abi == "sys":
                kvmsys.add_vcpu()
                v, run = kvmsys.current(), kvmsys.run
            else:
                v, run = vcpu, vcpu.run
            L.prepare(get("debug_exit.real"), v, machine.mem)
            machine.mem[L.LOAD_ADDR:L.LOAD_ADDR + 2] = JMP_SELF      # never exits
            box["vcpu"] = v
            box["ex"] = run(timeout=20)
        finally:
            if machine.abi == "sys":
                kvmsys.remove_vcpu()

    t = threading.Thread(target=owner)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while "vcpu" not in box or not box["vcpu"].running:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.001)
        v = box["vcpu"]
        t0 = time.monotonic()
        for op in (v.get_regs, v.get_sregs, v.get_fpu, v.get_mp_state, v.nmi,
                   lambda: v.get_msrs([0x10]), lambda: v.set_mp_state(0)):
            with pytest.raises(StateError, match="inside KVM_RUN"):
                op()
        assert time.monotonic() - t0 < 5        # refused at once, not after the run
    finally:
        box.get("vcpu", vcpu).handle().kick()
        t.join(30)
    assert isinstance(box["ex"], kvmsys.KickExit)


def test_nested_run_names_the_mistake(machine):
    machine.devices().load("pio_out_loop.pm32", n=3)
    seen = []

    def handler(ex):
        try:
            machine.run(timeout=1)
        except StateError as e:
            seen.append(str(e))
        return True

    machine.vm.add_handler(PIO, L.PORT_OUT, L.PORT_OUT + 1, K["PYTHON"], callback=handler)
    machine.run(timeout=10)
    assert seen and "inside its own run()" in seen[0]


# === 3. interpreter exit with vCPUs running in daemon threads =========================

@pytest.mark.parametrize("abi", ["fd", "sys"])
def test_interpreter_exit_with_a_daemon_thread_inside_run(abi):
    p = python(f"""
        import threading, time, kvmsys
        from kvmsys.guests import get, layout as L
        started = threading.Event()
        def spin():
            if "{abi}" == "sys":
                kvmsys.add_vcpu()
                vcpu, run, mem = kvmsys.current(), kvmsys.run, kvmsys.vm().memory(0)
            else:
                vm = kvmsys.Kvm().create_vm()
                mem = vm.add_memory(0, 0, L.RAM_SIZE)
                vcpu = vm.create_vcpu(0)
                run = vcpu.run
            L.prepare(get("debug_exit.real"), vcpu, mem)
            mem[L.LOAD_ADDR:L.LOAD_ADDR + 2] = b"\\xeb\\xfe"   # jmp . : never exits
            started.set()
            while True:
                run()                                         # no timeout
        t = threading.Thread(target=spin, daemon=True)
        t.start()
        started.wait(10)
        time.sleep(0.3)
        print("exiting", flush=True)
    """, timeout=60)
    assert p.stdout.strip() == b"exiting"
    assert p.returncode == 0, p.stderr.decode()[-2000:]


# === 4. garbage in the comm area ======================================================

def test_ring_indices_out_of_range_are_an_error_not_a_spin(abi):
    # The coalesced ring (the comm area's third page) is writable from Python.
    p = python(f"""
        import struct, kvmsys
        from kvmsys import _core
        from kvmsys.errors import KvmOSError
        from kvmsys.guests import get, layout as L
        from kvmsys.runner import setup_devices
        if "{abi}" == "sys":
            kvmsys.configure(memory_size=L.RAM_SIZE)
            vm = kvmsys.vm()
            kvmsys.add_vcpu()
            vcpu, run = kvmsys.current(), kvmsys.run
        else:
            vm = kvmsys.Kvm().create_vm()
            vm.add_memory(0, 0, L.RAM_SIZE)
            vcpu = vm.create_vcpu(0)
            run = vcpu.run
        if not vm.check_extension("COALESCED_MMIO"):
            print("host: no coalesced MMIO"); raise SystemExit(0)
        setup_devices(vm)
        vm.register_coalesced(0xe9, 1, pio=True)
        L.prepare(get("pio_out_loop.pm32"), vcpu, vm.memory(0), n=3)
        comm = vcpu.comm_area
        struct.pack_into("<II", comm, 2 * 4096, 0, 100000)       # first, last: last >= ring size
        try:
            ex = run(timeout=2)
            print("ran", ex)
        except KvmOSError as e:
            print("error", e)
    """, timeout=60)
    out = p.stdout.decode()
    if out.startswith("host:"):
        pytest.skip(out.strip())
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert out.startswith("error") and "out of range" in out, out


# === 5. lost or wrong results =========================================================

def debug_exit32(value):
    """Real mode: mov eax, value; out 0xf4, eax (a 32-bit isa-debug-exit write)."""
    return b"\x66\xb8" + struct.pack("<I", value) + b"\x66\xe7\xf4" + JMP_SELF


@pytest.mark.parametrize("value", [0, 0x7FFFFFFF, 0xFFFFFFFF])
def test_debug_exit_status_is_not_truncated(machine, value):
    machine.devices().load("debug_exit.real")
    code = debug_exit32(value)
    machine.mem[L.LOAD_ADDR:L.LOAD_ADDR + len(code)] = code
    ex = machine.run(timeout=10)
    assert isinstance(ex, kvmsys.StopExit), ex
    assert ex.status == (value << 1) | 1


def test_cli_exit_status_of_a_wide_debug_exit_is_8_bits(tmp_path):
    # the same code as a firmware image (4 KiB, so also mapped to end at 1 MiB): the reset
    # vector F000:FFF0 jumps to its start
    body = debug_exit32(0x7FFFFFFF)
    image = bytearray(b"\xf4" * 4096)
    image[:len(body)] = body
    image[-16:-11] = b"\xea\x00\xf0\x00\xf0"         # jmp far F000:F000 (the image's start)
    fw = tmp_path / "fw.bin"
    fw.write_bytes(bytes(image))
    p = subprocess.run([sys.executable, "-m", "kvmsys", "run", "--firmware", str(fw), "--timeout", "10"],
                       capture_output=True, timeout=60, cwd=tempfile.gettempdir())
    assert p.returncode == 0xFF, p.stderr.decode()      # (0x7fffffff << 1 | 1) & 0xff


def test_closing_the_process_vm_is_destroy_vm(fresh_process_vm):
    v = kvmsys.vm()
    v.close()
    assert v.closed
    comm = kvmsys.add_vcpu()            # a fresh process VM
    assert kvmsys.vm() is not v and len(comm) > 0
    with pytest.raises(VcpuBindingError):
        kvmsys.vm().close()             # refused while a vCPU is bound, as destroy_vm() is
    kvmsys.remove_vcpu()


def test_process_vm_closed_behind_its_back_is_replaced(fresh_process_vm):
    v = kvmsys.vm()
    kvmsys.Vm.close(v)                  # the base class's close, not destroy_vm()
    kvmsys.add_vcpu()
    assert kvmsys.vm() is not v and not kvmsys.vm().closed
    kvmsys.remove_vcpu()


@pytest.mark.parametrize("options", [dict(memory_size=2 ** 70), dict(memory_size=1.5),
                                     dict(irqchip=1), dict(pc_ports="yes"), dict(bogus=1)])
def test_configure_validates_before_destroying_anything(fresh_process_vm, options):
    before = kvmsys.vm()
    # configure() has keyword parameters: an unknown one is Python's TypeError
    with pytest.raises(TypeError if "bogus" in options else InvalidArgumentError):
        syscall.configure(**options)
    with pytest.raises(InvalidArgumentError):
        with syscall.fresh_vm(**options):
            pass
    assert kvmsys.vm() is before and not before.closed      # fresh_vm destroyed nothing
    kvmsys.add_vcpu()
    kvmsys.remove_vcpu()


def test_default_handler_must_be_callable(machine):
    with pytest.raises(ArgumentTypeError):
        machine.vm.default_handler = 5
    assert machine.vm.default_handler is None
    machine.vm.default_handler = print
    assert machine.vm.default_handler is print
    machine.vm.default_handler = None


def test_kvm_path_types():
    with pytest.raises(InvalidArgumentError):
        kvmsys.Kvm("/dev/kvm\0junk")
    with pytest.raises(InvalidArgumentError):
        kvmsys.Kvm("")
    with pytest.raises(ArgumentTypeError):
        kvmsys.Kvm(5)
    with kvmsys.Kvm(b"/dev/kvm") as k:
        assert k.path == "/dev/kvm"


# === 6. typed errors ==================================================================

def _regs(m):
    return m.vcpu.get_regs()


# (what, call) -- each must raise a KvmsysError (ArgumentTypeError for a wrong type)
BAD_CALLS = [
    ("add_handler kind float", lambda m: m.vm.add_handler(PIO, 0x10, 0x11, 1.9)),
    ("add_handler start float", lambda m: m.vm.add_handler(PIO, 0x10 * 1.0, 0x11, K["SINK"])),
    ("interrupt float", lambda m: m.vcpu.interrupt(32.9)),
    ("interrupt -1", lambda m: m.vcpu.interrupt(-1)),
    ("set_regs float", lambda m: m.vcpu.set_regs(dict(_regs(m), rax=1.5))),
    ("regs.rip float", lambda m: setattr(m.vcpu.regs, "rip", 2.5)),
    ("regs.rip -1", lambda m: setattr(m.vcpu.regs, "rip", -1)),
    ("run budget float", lambda m: m.run(budget=1.5)),
    ("run budget 2**70", lambda m: m.run(budget=2 ** 70)),
    ("run timeout str", lambda m: m.run(timeout="1")),
    ("run timeout -inf", lambda m: m.run(timeout=-math.inf)),
    ("write int", lambda m: m.vm.write(0, 5)),
    ("write str", lambda m: m.vm.write(0, "x")),
    ("read float", lambda m: m.vm.read(0.0, 4)),
    ("set_pit2 None", lambda m: m.vm.set_pit2(None)),
    ("set_clock list", lambda m: m.vm.set_clock([1000] * 4)),
    ("enable_cap args int", lambda m: m.vm.enable_cap(1, args=5)),
    ("enable_cap args str", lambda m: m.vm.enable_cap(1, args=["x"])),
    ("get_msrs str", lambda m: m.vcpu.get_msrs(["x"])),
    ("get_msrs float", lambda m: m.vcpu.get_msrs([0x10 * 1.0])),
    ("get_msrs not a list", lambda m: m.vcpu.get_msrs(5)),
    ("set_msrs list", lambda m: m.vcpu.set_msrs([1, 2])),
    ("set_msrs value float", lambda m: m.vcpu.set_msrs({0x10: 1.5})),
    ("set_sregs empty", lambda m: m.vcpu.set_sregs({})),
    ("set_sregs list", lambda m: m.vcpu.set_sregs([])),
    ("set_sregs float", lambda m: m.vcpu.set_sregs(dict(m.vcpu.get_sregs(), cr0=1.5))),
    ("set_sregs nested overflow", lambda m: m.vcpu.set_sregs(
        dict(m.vcpu.get_sregs(), cs=dict(m.vcpu.get_sregs()["cs"], selector=1 << 20)))),
    ("set_debugregs None", lambda m: m.vcpu.set_debugregs(None)),
    ("set_cpuid2 float", lambda m: m.vcpu.set_cpuid2([dict(function=0.5)])),
    ("set_cpuid2 str", lambda m: m.vcpu.set_cpuid2("abc")),
    ("set_mp_state -1", lambda m: m.vcpu.set_mp_state(-1)),
    ("set_mp_state float", lambda m: m.vcpu.set_mp_state(1.0)),
    ("register_coalesced -1", lambda m: m.vm.register_coalesced(0, -1)),
    ("register_coalesced wraps", lambda m: m.vm.register_coalesced(2 ** 64 - 4096, 8192)),
    ("get_dirty_log 2**40", lambda m: m.vm.get_dirty_log(2 ** 40)),
    ("get_dirty_log str", lambda m: m.vm.get_dirty_log("0")),
    ("set_tss_addr wraps", lambda m: m.vm.set_tss_addr(2 ** 64 - 4096)),
    ("set_tss_addr float", lambda m: m.vm.set_tss_addr(4096.5)),
    ("set_identity_map_addr float", lambda m: m.vm.set_identity_map_addr(4096.0)),
    ("create_pit2 float", lambda m: m.vm.create_pit2(1.2)),
    ("irq_line float", lambda m: m.vm.irq_line(1.5, 1)),
    ("signal_msi float", lambda m: m.vm.signal_msi(0xFEE00000, 32.0)),
    ("ioeventfd float", lambda m: m.vm.ioeventfd(3, 0x10, 1.0)),
    ("irqfd gsi -1", lambda m: m.vm.irqfd(3, -1)),
    ("check_extension float", lambda m: _core.VmCore.check_extension(m.vm, 1.5)),
    ("memory str", lambda m: m.vm.memory("0")),
    ("memory unhashable", lambda m: m.vm.memory([0])),
    ("add_memory float", lambda m: m.vm.add_memory(5, 0x10000000, 4096.0)),
    ("set_default float", lambda m: m.vm.set_default(0.0, K["IGNORE"])),
    ("set_hlt_action float", lambda m: m.vm.set_hlt_action(1.0)),
    ("get_irqchip float", lambda m: m.vm.get_irqchip(0.0)),
    ("handle interrupt float", lambda m: m.vcpu.handle().interrupt(32.5)),
    ("set_fpu int", lambda m: m.vcpu.set_fpu(5)),
    ("set_fpu bad bytes", lambda m: m.vcpu.set_fpu([300])),
]


@pytest.mark.parametrize("what, call", BAD_CALLS, ids=[w for w, _ in BAD_CALLS])
def test_wrong_values_and_types_are_typed_errors(machine, what, call):
    with pytest.raises(KvmsysError) as info:
        call(machine)
    assert isinstance(info.value, (InvalidArgumentError, StateError)), repr(info.value)
    assert not isinstance(info.value, OverflowError)


def test_io_exit_value_checks_its_type(machine):
    machine.devices().load("pio_in_loop.pm32", n=1)
    machine.vm.set_default(PIO, K["PYTHON"])
    ex = machine.run(timeout=10)
    while not (isinstance(ex, kvmsys.IoExit) and ex.is_in):
        ex = machine.run(timeout=10)
    with pytest.raises(ArgumentTypeError):
        ex.value = 1.5
    with pytest.raises(InvalidArgumentError):
        ex.value = 1 << (8 * ex.size)
    ex.value = 1


# --- limits of run() ---

@pytest.mark.parametrize("timeout", [None, math.inf, 1e12, 2 ** 64, 4294967296.0])
def test_huge_or_infinite_timeout_means_no_deadline(machine, timeout):
    machine.devices().load("pio_out_loop.pm32", n=200)
    ex = machine.run(timeout=timeout)
    assert isinstance(ex, kvmsys.StopExit), ex          # not an immediate DeadlineExit


@pytest.mark.parametrize("kw", [dict(timeout=math.nan), dict(timeout=-0.5), dict(budget=-1), dict(budget=2 ** 63)])
def test_bad_limits_are_invalid_arguments(machine, kw):
    with pytest.raises(InvalidArgumentError):
        machine.run(**kw)


def test_budget_zero_returns_before_kvm_run(machine):
    port = L.PORT_OUT
    code = b"\xb0\x01\xe6" + bytes([port]) + b"\xeb\xfe"     # mov al, 1; out port, al; jmp .
    machine.devices().load("debug_exit.real")
    machine.mem[L.LOAD_ADDR:L.LOAD_ADDR + len(code)] = code
    vcpu = machine.vcpu
    rip = vcpu.get_regs()["rip"]
    ex = machine.run(budget=0, timeout=0)       # an expired deadline too: the budget says 0 first
    assert isinstance(ex, kvmsys.BudgetExit), ex
    assert vcpu.stats()["runs"] == 0 and not vcpu.has_run
    assert vcpu.get_regs()["rip"] == rip
    # budget 1 is one exit, and 0 left is never "unlimited"
    ex = machine.run(budget=1, timeout=10)
    assert isinstance(ex, kvmsys.BudgetExit) and vcpu.stats()["total_exits"] == 1, ex
    assert machine.vm.port_counts() == {port: 1}
    # budget 0 makes the checks of every run first: not from inside the vCPU's own run
    machine.vm.add_handler(_core.SPACES["PIO"], port, port + 1, _core.H_KINDS["PYTHON"],
                           callback=lambda ex: machine.run(budget=0))
    vcpu.set_regs(dict(vcpu.get_regs(), rip=rip))
    with pytest.raises(StateError, match="from inside its own run"):
        machine.run(budget=5, timeout=10)
    assert isinstance(machine.run(budget=0), kvmsys.BudgetExit)


def test_budget_zero_needs_a_bound_vcpu(fresh_process_vm):
    with pytest.raises(VcpuBindingError):
        kvmsys.run(budget=0)


# --- the Python layer ---

HELPER_CALLS = [
    ("smp.restore(None)", lambda m: smp.restore(None)),
    ("smp.apply_vcpu_state({})", lambda m: smp.apply_vcpu_state({})),
    ("smp.apply_vcpu_state(None)", lambda m: smp.apply_vcpu_state(None)),
    ("smp.pause('x')", lambda m: smp.pause("x")),
    ("smp.pause(-1)", lambda m: smp.pause(-1)),
    ("set_placement('pin', 5)", lambda m: syscall.set_placement("pin", 5)),
    ("set_placement(5)", lambda m: syscall.set_placement(5)),
    ("guests.get('nope')", lambda m: get("nope")),
    ("guests.get([])", lambda m: get([])),
    ("run_guest('nope')", lambda m: runner.run_guest("nope")),
    ("run_guest vcpus str", lambda m: runner.run_guest("hello.real", vcpus="2")),
    ("run_guest timeout -1", lambda m: runner.run_guest("hello.real", timeout=-1)),
    ("run_guest unknown input", lambda m: runner.run_guest("hello.real", n=5)),
    ("run_firmware empty", lambda m: runner.run_firmware(b"")),
    ("load_firmware empty", lambda m: platform.load_firmware(m.vm, b"", ram_size=2 << 20)),
    ("load_firmware str", lambda m: platform.load_firmware(m.vm, "x", ram_size=2 << 20)),
    ("enable_native(v, 1)", lambda m: pvm.enable_native(m.vcpu, 1)),
    ("enable_native(v, 'x')", lambda m: pvm.enable_native(m.vcpu, "x")),
    ("layout.prepare float input", lambda m: L.prepare(get("pio_out_loop.pm32"), m.vcpu, m.mem, n=1.5)),
    ("layout.smp_stack_top(99)", lambda m: L.smp_stack_top(99)),
]


@pytest.mark.parametrize("what, call", HELPER_CALLS, ids=[w for w, _ in HELPER_CALLS])
def test_python_helpers_raise_typed_errors(machine, what, call):
    with pytest.raises(KvmsysError):
        call(machine)


@pytest.mark.nokvm
def test_pause_timeout_is_a_kvmsys_error():
    from kvmsys.errors import OperationTimeoutError
    assert issubclass(OperationTimeoutError, KvmsysError) and issubclass(OperationTimeoutError, TimeoutError)


# === 7. the command line ==============================================================

def kvmsys_cli(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "kvmsys", *args], capture_output=True, timeout=timeout,
                          cwd=tempfile.gettempdir(), **kw)


def one_line_error(p):
    err = p.stderr.decode()
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "missing", "empty"])
def test_cli_refuses_bad_firmware_files_in_one_line(tmp_path, kind):
    path = {"dev-zero": "/dev/zero", "directory": str(tmp_path), "missing": str(tmp_path / "nope"),
            "fifo": str(tmp_path / "fifo"), "empty": str(tmp_path / "empty")}[kind]
    if kind == "fifo":
        os.mkfifo(path)                 # no writer: a blocking open would never return
    if kind == "empty":
        open(path, "wb").close()
    for abi in ("sys", "fd"):
        p = kvmsys_cli("run", "--firmware", path, "--abi", abi, timeout=30)
        assert p.returncode == 2, p.stderr.decode()
        assert path in one_line_error(p)


def test_cli_user_errors_exit_2_without_traceback():
    p = kvmsys_cli("run", "--guest", "hello.real", "--n", "5")
    assert p.returncode == 2
    assert "unknown input" in one_line_error(p)
    p = kvmsys_cli("run", "--guest", "nope.real")
    assert p.returncode == 2
    one_line_error(p)
    for bad in (["--timeout", "-1"], ["--timeout", "nan"], ["--vcpus", "0"]):
        p = kvmsys_cli("run", "--guest", "hello.real", *bad)
        assert p.returncode == 2 and b"Traceback" not in p.stderr, p.stderr.decode()


def test_cli_closed_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "kvmsys", "guests"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    proc.stdout.close()                 # the reader is gone before anything is written
    _, err = proc.communicate(timeout=60)
    assert err == b"", err.decode()
    assert proc.returncode == 128 + 13


def test_cli_bench_checks_its_json_output_first(tmp_path):
    t0 = time.monotonic()
    p = kvmsys_cli("bench", "--quick", "--json", str(tmp_path / "no" / "such" / "dir.json"), timeout=120)
    assert p.returncode == 2, p.stderr.decode()[-1000:]
    assert "cannot write" in p.stderr.decode()
    assert time.monotonic() - t0 < 30            # refused before the run, not after it


def test_cli_ctrl_c_stops_every_vcpu():
    from conftest import interrupt_cli
    code, err = interrupt_cli(["run", "--guest", "smp_counter.pm32", "--vcpus", "2", "--n", "100000000",
                               "--timeout", "120"], cwd=tempfile.gettempdir(), within=30, settle=1.0,
                              ready=lambda proc: len(os.listdir(f"/proc/{proc.pid}/task")) >= 3)   # main + 2 vCPUs
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("bad,says", [
    (["--disk", "disk.img,sideways"], "expected FILE or FILE,readonly"),
    (["--serial", "tcp:1234"], "expected stdio, file:PATH or collect"),
    (["--serial", "file:/nonexistent-dir/serial.log"], "cannot open /nonexistent-dir/serial.log"),
    (["--vcpus", "300"], "1 .. 255 vCPUs"),
    (["--memory", "5000"], "3072 MiB"),
])
def test_cli_refuses_bad_pc_options_in_one_line(tmp_path, bad, says):
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"\xf4" * 4096)          # never runs: every case is refused before
    p = kvmsys_cli("run", "--firmware", str(fw), *bad, timeout=30)
    assert p.returncode == 2, p.stderr.decode()
    assert says in one_line_error(p)


@pytest.mark.parametrize("run,bad,says", [
    (["--guest", "hello.real"], ["--disk", "x.img"], "--disk applies to --firmware and --kernel, not to --guest"),
    (["--guest", "hello.real"], ["--serial", "stdio"], "--serial applies to --firmware and --kernel"),
    (["--guest", "hello.real"], ["--append", "quiet"], "--append applies to --kernel, not to --guest"),
    (["--firmware", "FW"], ["--initrd", "x"], "--initrd applies to --kernel, not to --firmware"),
    (["--firmware", "FW"], ["--n", "3"], "--n applies to --guest, not to --firmware"),
    (["--firmware", "FW"], ["--test-device"], "--test-device applies to --kernel, not to --firmware"),
    (["--guest", "hello.real"], ["--cpu=+x2apic"], "--cpu applies to --firmware and --kernel, not to --guest"),
    (["--kernel", "FW"], ["--cpu=+avx9"], "--cpu: CPU feature '+avx9'"),
])
def test_cli_refuses_options_that_would_be_ignored(tmp_path, run, bad, says):
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"\xf4" * 4096)
    p = kvmsys_cli("run", *[str(fw) if a == "FW" else a for a in run], *bad, timeout=30)
    assert p.returncode == 2, p.stderr.decode()
    assert says in one_line_error(p)


@pytest.mark.parametrize("kind", ["directory", "fifo", "dev-zero", "tiny"])
@pytest.mark.parametrize("opt", ["", ",readonly"])
def test_cli_refuses_what_is_not_a_disk_image_in_one_line(tmp_path, kind, opt):
    """--disk is opened as --firmware is: never blocking (a FIFO), a regular file or a
    block device, its size checked, before the run starts."""
    path = {"directory": tmp_path, "fifo": tmp_path / "fifo", "dev-zero": "/dev/zero",
            "tiny": tmp_path / "tiny.img"}[kind]
    if kind == "fifo":
        os.mkfifo(path)                     # no writer: a blocking open never returns
    if kind == "tiny":
        path.write_bytes(b"x" * 100)
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"\xf4" * 4096)
    p = kvmsys_cli("run", "--firmware", str(fw), "--disk", f"{path}{opt}", "--timeout", "5", timeout=30)
    assert p.returncode == 2, p.stderr.decode()
    assert str(path) in one_line_error(p)


def test_cli_disk_images_are_locked_against_other_runs(tmp_path):
    """A disk image in use read-write elsewhere is a one-line error (exit 2), readonly
    or not; readonly users share it."""
    from kvmsys.devices import AtaDisk
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(64 * 512))
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"\xf4" * 4096)
    holder = AtaDisk(str(img))              # another "run" holds it read-write
    try:
        for opt in ("", ",readonly"):
            p = kvmsys_cli("run", "--firmware", str(fw), "--disk", f"{img}{opt}", "--timeout", "1", timeout=30)
            assert p.returncode == 2 and "in use by another process" in one_line_error(p)
    finally:
        holder.close()
    reader = AtaDisk(str(img), readonly=True)
    try:
        p = kvmsys_cli("run", "--firmware", str(fw), "--disk", f"{img},readonly", "--timeout", "1", timeout=30)
        assert b"DEADLINE" in p.stdout, p.stderr.decode()       # shared with a readonly user: it ran
        p = kvmsys_cli("run", "--firmware", str(fw), "--disk", str(img), "--timeout", "1", timeout=30)
        assert p.returncode == 2 and "in use by another process" in one_line_error(p)
    finally:
        reader.close()


def test_cli_serial_file_write_error_is_one_line(tmp_path):
    """--serial file: that cannot be written (here /dev/full: ENOSPC) ends the run as
    --debug-log does: one line, exit status 2."""
    from pathlib import Path
    import kvmsys.guests
    hello = Path(kvmsys.guests.__file__).parent / "firmware" / "hello.bin"     # prints on the UART
    p = kvmsys_cli("run", "--firmware", str(hello), "--serial", "file:/dev/full", "--timeout", "20", timeout=60)
    assert p.returncode == 2, p.stderr.decode()
    assert "--serial: cannot write /dev/full" in one_line_error(p)
