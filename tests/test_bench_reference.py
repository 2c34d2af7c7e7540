"""The benchmark harness's C reference loops (kvmsys_bench._reference, an extension of
its own): they count exits right, stop on exits they do not handle, refuse bad input,
and their thread-switch and kick loops really run the vCPU.  No timing assertions."""
import pytest

from kvmsys import _core
from kvmsys.guests import layout
from kvmsys_bench import _reference
from kvmsys_bench.guestvm import set_handling

IO, HLT = _core.EXIT_REASONS["IO"], _core.EXIT_REASONS["HLT"]


def ref_vcpu(machine):
    return _reference.RefVcpu(machine.vcpu.fileno(), machine.vm.mmap_size)


@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
def test_run_counts_exits_and_clocks_the_kernel(machine, mode):
    machine.load(f"pio_out_loop.{mode}", n=0)
    r = ref_vcpu(machine)
    done, ns, kernel_ns, stop = r.run_exits(300)
    r.close()
    assert (done, stop) == (300, 0)
    assert 0 < kernel_ns < ns
    assert machine.counter() == 300


def test_run_goes_on_through_hlt(machine):
    # 10 outs, the debug-exit out, then the guest halts forever: HLT exits until 100.
    machine.load("pio_out_loop.real", n=10)
    assert ref_vcpu(machine).run_exits(100)[::3] == (100, 0)
    assert machine.counter() == 10
    assert machine.vcpu.kvm_stats()["halt_exits"] >= 100 - 11


def test_run_stops_on_other_exits(machine):
    # A triple fault (#UD from ud2 in pm32 with a zero IDT limit) ends it early.
    machine.load("debug_exit.pm32")
    machine.mem[layout.LOAD_ADDR:layout.LOAD_ADDR + 2] = b"\x0f\x0b"
    sregs = machine.vcpu.get_sregs()
    sregs["idt"] = dict(sregs["idt"], base=0, limit=0)
    machine.vcpu.set_sregs(sregs)
    done, _ns, _k, stop = ref_vcpu(machine).run_exits(50)
    assert done == 1 and stop == _core.EXIT_REASONS["SHUTDOWN"]


def test_bad_input_is_refused(machine):
    with pytest.raises(ValueError):
        _reference.RefVcpu(-1, machine.vm.mmap_size)
    with pytest.raises(ValueError):
        _reference.RefVcpu(machine.vcpu.fileno(), 16)           # smaller than struct kvm_run
    r = ref_vcpu(machine)
    r.close()
    with pytest.raises(ValueError):
        r.run_exits(1)
    with pytest.raises(ValueError):
        _reference.reference_ioctl_costs(machine.vcpu.fileno(), machine.vm.fileno(), 0)
    with pytest.raises(ValueError):
        _reference.reference_lifecycle(machine.vm.fileno(), machine.vm.mmap_size, -1, 1)


def test_ioctl_costs_check_the_ioctls(machine):
    vcpu_ns, vm_ns, sys_ns = _reference.reference_ioctl_costs(machine.vcpu.fileno(), machine.vm.fileno(), 20)
    assert vcpu_ns > 0 and vm_ns > 0 and sys_ns > 0
    # a VM fd where a vCPU fd belongs: KVM_GET_MP_STATE fails, and is never timed as if it worked
    with pytest.raises(OSError):
        _reference.reference_ioctl_costs(machine.vm.fileno(), machine.vm.fileno(), 20)


def test_lifecycle_creates_vcpus(fdvm):
    assert _reference.reference_lifecycle(fdvm.fileno(), fdvm.mmap_size, 1, 3) > 0
    with pytest.raises(OSError):        # ids 1..3 are taken now
        _reference.reference_lifecycle(fdvm.fileno(), fdvm.mmap_size, 1, 1)


def test_thread_switch_runs_every_sample(machine):
    machine.load("pio_out_loop.pm32", n=0)
    out = ref_vcpu(machine).thread_switch(10, 3, 4)
    assert sorted(out) == ["caller", "new", "rotating", "worker"]
    assert all(len(v) == 4 and min(v) > 0 for v in out.values())
    assert machine.counter() == 4 * 4 * 10


@pytest.mark.parametrize("guest", ["pio_out_loop.pm32", "compute.pm32"])
def test_kick_ends_every_run(machine, guest):
    machine.load(guest, n=0 if guest.startswith("pio") else 0xFFFFFFFF)
    set_handling(machine.vm, "pio_out", "c")
    lat = ref_vcpu(machine).kick(5, 0.0005, 0.001, _core.kick_signal())
    assert len(lat) == 5 and min(lat) > 0
    with pytest.raises(ValueError):
        ref_vcpu(machine).kick(1, 0.0, 0.001, 2)       # SIGINT: not a real-time signal


def test_signal_mask_on_and_off(machine):
    """The reference sets kvmsys's kind of KVM signal mask and clears it again; the vCPU runs
    either way, and a signal number out of range is refused before any ioctl."""
    machine.load("pio_out_loop.pm32", n=0)
    r = ref_vcpu(machine)
    r.signal_mask(_core.kick_signal())
    assert r.run_exits(20)[::3] == (20, 0)
    r.signal_mask(-1)
    assert r.run_exits(20)[::3] == (20, 0)
    with pytest.raises(ValueError):
        r.signal_mask(65)
    r.close()
    with pytest.raises(ValueError):
        r.signal_mask(-1)
    assert machine.counter() == 40


@pytest.mark.parametrize("guest", ["pio_out_loop.pm32", "compute.pm32"])
def test_bare_kick_ends_a_bare_run(machine, guest):
    """The kick suite's Python floor: bare_run() runs the vCPU (exits handled minimally)
    until bare_kick() from another thread ends it, and returns its clock after KVM_RUN
    returned EINTR, which comes after the kicker's clock read before its signal."""
    import threading
    import time
    machine.load(guest, n=0 if guest.startswith("pio") else 0xFFFFFFFF)
    r = ref_vcpu(machine)
    with pytest.raises(RuntimeError):
        r.bare_kick()                   # nobody armed: no thread to signal
    with pytest.raises(RuntimeError):
        r.bare_run()
    with pytest.raises(ValueError):
        r.bare_arm(2)                   # SIGINT: not a real-time signal
    r.bare_arm(_core.kick_signal())
    before = []

    def kicker():
        time.sleep(0.02)
        before.append(time.perf_counter_ns())
        r.bare_kick()
    t = threading.Thread(target=kicker)
    t.start()
    try:
        intr = r.bare_run()
    finally:
        t.join()
    assert before[0] <= r.bare_sent_ns <= intr
    if guest.startswith("pio"):
        assert machine.counter() > 0    # it ran the guest, exit after exit
    other = []
    t = threading.Thread(target=lambda: other.append(pytest.raises(RuntimeError, r.bare_run)))
    t.start()
    t.join()
    assert other, "bare_run() from a thread that did not arm it must raise"
    r.close()
    with pytest.raises(ValueError):
        r.bare_arm(_core.kick_signal())


@pytest.mark.parametrize("mode", ["pm32", "long64"])
def test_run_callbacks_hands_every_exit_to_python(machine, mode):
    """The exits suite's Python floor: each exit goes to the callback for it, decoded, and
    a read is answered with what the callback returned (the guests sum what they read)."""
    from kvmsys.guests import layout
    got = []

    def read(address, size):
        got.append(("r", address, size))
        return 3

    def write(address, size, value):
        got.append(("w", address, size, value))

    def hlt(arg):
        got.append(("h", arg))

    def result():
        return int.from_bytes(machine.mem[layout.RESULT_ADDR:layout.RESULT_ADDR + 4], "little")
    for guest, want in (("pio_in_loop", ("r", layout.PORT_IN, 1)),
                        ("mmio_read_loop", ("r", layout.MMIO_READ_ADDR, 4)),
                        ("pio_out_loop", ("w", layout.PORT_OUT, 1)),
                        ("mmio_write_loop", ("w", layout.MMIO_WRITE_ADDR, 4)),
                        ("hlt_loop", ("h", None))):
        machine.load(f"{guest}.{mode}", n=0)
        got.clear()
        r = ref_vcpu(machine)
        done, ns, kernel, = r.run_callbacks(20, read, write, hlt)
        r.close()
        assert done == 20 and 0 < kernel < ns, guest
        assert [g[:len(want)] for g in got] == [want] * 20, (guest, got[:3])
        if guest == "pio_out_loop":         # data = the counter's low byte, one per iteration
            assert [g[3] for g in got[1:]] == [(got[0][3] + i) % 256 for i in range(1, 20)]
        if want[0] == "r":
            machine.run(budget=1)           # the last read completes; the guest stores its sum
            assert result() >= 3 * 19, (guest, result())


def test_run_callbacks_refuses_bad_callbacks_and_passes_on_their_errors(machine):
    machine.load("pio_in_loop.pm32", n=0)
    r = ref_vcpu(machine)
    with pytest.raises(TypeError):
        r.run_callbacks(1, None, print, print)

    def boom(address, size):
        raise KeyError("from the callback")
    with pytest.raises(KeyError, match="from the callback"):
        r.run_callbacks(5, boom, print, print)
    with pytest.raises(OverflowError):
        r.run_callbacks(1, lambda a, s: -1, print, print)     # no value of an unsigned read
    r.close()
    with pytest.raises(ValueError):
        r.run_callbacks(1, print, print, print)
