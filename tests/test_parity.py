"""kvm-ioctls parity: the VM limits with the kernel documentation's fallbacks,
create_vm(vm_type), and a repr() that shows each public object's state."""
import errno
import re

import pytest

import kvmsys
from kvmsys import Kvm
from kvmsys.errors import KvmOSError


def test_limits_are_what_kvm_reports():
    with Kvm() as kvm, kvm.create_vm() as vm:
        for owner in (kvm, vm):
            nr = owner.check_extension("NR_VCPUS")
            assert owner.get_nr_vcpus() == (nr or 4)
            assert owner.get_max_vcpus() == (owner.check_extension("MAX_VCPUS") or owner.get_nr_vcpus())
            assert owner.get_max_vcpu_id() == (owner.check_extension("MAX_VCPU_ID") or owner.get_max_vcpus())
            assert owner.get_nr_memslots() == (owner.check_extension("NR_MEMSLOTS") or 32)
        assert vm.get_nr_memslots() == vm.max_slots
        assert 1 <= vm.get_nr_vcpus() <= vm.get_max_vcpus() <= vm.get_max_vcpu_id()


@pytest.mark.parametrize("present", [set(), {"NR_VCPUS"}, {"NR_VCPUS", "MAX_VCPUS"}])
def test_limits_fall_back_as_the_kernel_documents(present):
    """A KVM without the capabilities: NR_VCPUS 4, MAX_VCPUS = NR_VCPUS, MAX_VCPU_ID =
    MAX_VCPUS, NR_MEMSLOTS 32."""
    values = {"NR_VCPUS": 8, "MAX_VCPUS": 64}

    class OldKvm(Kvm):
        def check_extension(self, cap):
            return values.get(cap, 0) if cap in present else 0
    with OldKvm() as kvm:
        nr = 8 if "NR_VCPUS" in present else 4
        mx = 64 if "MAX_VCPUS" in present else nr
        assert (kvm.get_nr_vcpus(), kvm.get_max_vcpus(), kvm.get_max_vcpu_id(), kvm.get_nr_memslots()) == \
            (nr, mx, mx, 32)


def test_create_vm_takes_a_vm_type():
    with Kvm() as kvm:
        with kvm.create_vm(vm_type=0) as vm:        # KVM_X86_DEFAULT_VM
            vm.add_memory(0, 0, 1 << 16)
        with pytest.raises(KvmOSError) as e:
            kvm.create_vm(vm_type=0x7fff)           # no such machine type
        assert e.value.errno == errno.EINVAL


def test_every_public_object_shows_its_state_in_repr(fdvm):
    from kvmsys.guests import get, layout as L
    vm = fdvm
    kvm = vm.kvm
    vcpu = vm.create_vcpu(0)
    L.prepare(get("hello.real"), vcpu, vm.memory(0))
    from kvmsys.runner import setup_devices
    setup_devices(vm)
    assert re.fullmatch(r"<Kvm /dev/kvm fd=\d+>", repr(kvm))
    assert re.fullmatch(r"<Vm fd=\d+ slots=1 \(\d+ KiB\) vcpus=\[0\] handlers=\d+>", repr(vm)), repr(vm)
    assert re.fullmatch(r"<Vcpu 0 fd=\d+ idle runs=0 exits=0>", repr(vcpu)), repr(vcpu)
    regs = vcpu.regs
    assert "rip=0x" in repr(regs) and "rax=0x" in repr(regs), repr(regs)
    ex = vcpu.run(timeout=5)
    assert re.fullmatch(r"<Vcpu 0 fd=\d+ idle runs=\d+ exits=[1-9]\d*>", repr(vcpu)), repr(vcpu)
    assert repr(ex).startswith("<StopExit")
    assert re.fullmatch(r"<Mapping memory slot 0 0x200000 bytes at 0x[0-9a-f]+>", repr(vm.memory(0).obj)), \
        repr(vm.memory(0).obj)
    handle = vcpu.handle()
    assert "alive" in repr(handle)
    vcpu.close()
    assert repr(vcpu) == "<Vcpu 0 closed>"
    assert "(" in repr(regs) and "object at" not in repr(regs)      # says why it cannot read them
    for obj in (kvm, vm, vcpu, regs, handle, ex, vm.memory_slots[0]):
        assert "object at 0x" not in repr(obj), repr(obj)


def test_exits_without_their_own_repr_show_their_fields(machine):
    """A HltExit has no fields; a DebugExit shows the exception and the PC."""
    from kvmsys.guests import get
    m = machine
    m.load("compute.pm32", n=3)
    m.vcpu.set_guest_debug(True, single_step=True)
    ex = m.run(timeout=5)
    assert isinstance(ex, kvmsys.DebugExit), ex
    r = repr(ex)
    assert r.startswith("<DebugExit DEBUG") and "exception=0x1" in r and "pc=0x" in r, r
    m.vcpu.set_guest_debug(False)
    m.run(timeout=5)
    assert repr(ex) == "<DebugExit DEBUG (stale)>"


def test_from_raw_fd_adopts_kvm_vm_and_vcpu_fds_made_elsewhere(tmp_path):
    """kvm-ioctls' from_raw_fd: objects over duplicates of fds another part of the process
    (a C library, another framework) made; each checks what the fd is before using it."""
    from kvmsys import Vm, Vcpu
    from kvmsys.errors import InvalidArgumentError
    from kvmsys.guests import get, layout as L
    from kvmsys.runner import setup_devices
    with Kvm() as maker, maker.create_vm() as theirs:
        their_vcpu = theirs.create_vcpu(3)
        kvm = Kvm.from_raw_fd(maker.fileno())
        assert kvm.fileno() != maker.fileno() and kvm.api_version() == 12
        vm = Vm.from_raw_fd(kvm, theirs.fileno())
        assert vm.fileno() != theirs.fileno() and vm.memory_slots == {}
        mem = vm.add_memory(0, 0, L.RAM_SIZE)
        setup_devices(vm)
        vcpu = Vcpu.from_raw_fd(vm, their_vcpu.fileno())
        assert vcpu.id == 3
        L.prepare(get("hello.pm32"), vcpu, mem)
        ex = vcpu.run(timeout=10)
        assert isinstance(ex, kvmsys.StopExit) and b"Hello" in vm.console(), (ex, vm.console())
        # the same kernel vCPU under both objects: the original sees what ran
        assert their_vcpu.get_regs()["rip"] == vcpu.get_regs()["rip"] != L.LOAD_ADDR
        for obj in (vcpu, vm, kvm):
            obj.close()
        assert not theirs.closed and theirs.check_extension("USER_MEMORY")      # theirs stay open
        f = open(tmp_path / "file", "wb")
        with pytest.raises(InvalidArgumentError, match="not a KVM kvm-vm fd"):
            Vm.from_raw_fd(maker, f.fileno())
        with pytest.raises(InvalidArgumentError, match="not a KVM vCPU fd"):
            Vcpu.from_raw_fd(theirs, theirs.fileno())
        with pytest.raises(kvmsys.KvmUnavailableError):
            Kvm.from_raw_fd(f.fileno())
        with pytest.raises(InvalidArgumentError):
            Vm.from_raw_fd(maker, 1 << 20)                  # not open
        f.close()
