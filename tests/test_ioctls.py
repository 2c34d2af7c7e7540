"""The fd-ABI wrappers kvm-ioctls users expect, each against the real /dev/kvm (or a skip /
CapabilityError naming the missing capability), reached over both ABIs through the vCPU
and VM objects (`current()` and `vm()` in the syscall ABI)."""
import os

import pytest

import kvmsys
from kvmsys import _core
from kvmsys.errors import CapabilityError, InvalidArgumentError, KvmOSError

CPUID_KEYS = {"function", "index", "flags", "eax", "ebx", "ecx", "edx"}
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01   # kvmclock: guest-physical address of its page | enable


@pytest.fixture
def kvm():
    with kvmsys.Kvm() as k:
        yield k


# === system fd ============================================================================

def test_emulated_cpuid(kvm):
    if not kvm.check_extension("EXT_EMUL_CPUID"):
        with pytest.raises(CapabilityError, match="EXT_EMUL_CPUID"):
            kvm.emulated_cpuid()
        return
    entries = kvm.emulated_cpuid()
    assert entries and all(set(e) == CPUID_KEYS for e in entries)
    # KVM emulates MOVBE (leaf 1, ECX bit 22) whatever the host CPU has
    assert any(e["function"] == 1 and e["ecx"] & (1 << 22) for e in entries)


def test_msr_feature_list_and_system_get_msrs(kvm):
    if not kvm.check_extension("GET_MSR_FEATURES"):
        pytest.skip("host: lacks KVM_CAP_GET_MSR_FEATURES")
    features = kvm.msr_feature_index_list()
    assert features and all(0 <= i < 1 << 32 for i in features)
    values = kvm.get_msrs(features)
    assert set(values) <= set(features) and values
    assert 0x8B in values or 0x10A in values     # IA32_UCODE_REV or IA32_ARCH_CAPABILITIES


# === vCPU ================================================================================

def test_get_cpuid2_returns_what_was_set(machine, kvm):
    v = machine.vcpu
    assert v.get_cpuid2() == []                  # nothing set yet
    entries = kvm.supported_cpuid()
    v.set_cpuid2(entries)
    got = v.get_cpuid2()
    # KVM keeps what it will expose, not every leaf given (PVM on an Intel host drops the AMX and
    # AVX10 leaves 0x1d, 0x1e, 0x24) and updates run-time bits (OSXSAVE, XSAVE sizes): compare keys.
    keys = lambda es: {(e["function"], e["index"]) for e in es}
    assert keys(got) <= keys(entries)
    assert {0, 1, 7, 0x80000000, 0x80000001} <= {e["function"] for e in got}
    assert [e for e in got if e["function"] == 0] == [e for e in entries if e["function"] == 0]


def test_sregs2_round_trip(machine):
    v = machine.vcpu
    if not v.vm.check_extension("SREGS2"):
        with pytest.raises(CapabilityError, match="SREGS2"):
            v.get_sregs2()
        return
    s2 = v.get_sregs2()
    s1 = v.get_sregs()
    assert s2["cs"] == s1["cs"] and s2["cr0"] == s1["cr0"] and len(s2["pdptrs"]) == 4
    s2["cr2"] = 0xC0FFEE000
    v.set_sregs2(s2)
    assert v.get_sregs()["cr2"] == 0xC0FFEE000


def test_tsc_khz(machine):
    v = machine.vcpu
    khz = v.get_tsc_khz()
    assert 100_000 < khz < 10_000_000            # between 100 MHz and 10 GHz
    if not v.vm.check_extension("TSC_CONTROL"):
        with pytest.raises(CapabilityError, match="TSC_CONTROL"):
            v.set_tsc_khz(khz // 2)
    else:
        v.set_tsc_khz(khz // 2)
        assert abs(v.get_tsc_khz() - khz // 2) <= 1
    with pytest.raises(InvalidArgumentError):
        v.set_tsc_khz(0)


def test_nested_state_needs_the_capability(machine):
    v = machine.vcpu
    if v.vm.check_extension("NESTED_STATE"):
        blob = v.get_nested_state()
        v.set_nested_state(blob)
        assert v.get_nested_state() == blob
    else:
        with pytest.raises(CapabilityError, match="NESTED_STATE"):
            v.get_nested_state()
        with pytest.raises(CapabilityError, match="NESTED_STATE"):
            v.set_nested_state(bytes(128))


def test_smi_needs_the_capability(machine):
    v = machine.vcpu
    if v.vm.check_extension("X86_SMM"):
        v.smi()
        assert v.get_vcpu_events()["smi_pending"] == 1
    else:
        with pytest.raises(CapabilityError, match="X86_SMM"):
            v.smi()


def test_kvmclock_ctrl(machine):
    v = machine.vcpu
    v.vm.require("KVMCLOCK_CTRL", "KVM_KVMCLOCK_CTRL")
    with pytest.raises(KvmOSError) as e:
        v.kvmclock_ctrl()                        # the guest has no kvmclock yet
    assert e.value.errno == 22 and e.value.op == "KVM_KVMCLOCK_CTRL"
    assert v.set_msrs({MSR_KVM_SYSTEM_TIME_NEW: 0x6000 | 1}) == 1   # what a guest's wrmsr does
    v.kvmclock_ctrl()


def test_vcpu_enable_cap(machine):
    v = machine.vcpu
    caps = kvmsys.fd.CAPABILITIES
    if not v.vm.check_extension("ENFORCE_PV_FEATURE_CPUID"):
        pytest.skip("host: lacks KVM_CAP_ENFORCE_PV_FEATURE_CPUID")
    assert v.set_msrs({MSR_KVM_SYSTEM_TIME_NEW: 0x6000 | 1}) == 1
    v.enable_cap(caps["ENFORCE_PV_FEATURE_CPUID"], 0, (1,))
    # now a paravirtual MSR the (empty) guest CPUID does not announce is refused
    assert v.set_msrs({MSR_KVM_SYSTEM_TIME_NEW: 0x7000 | 1}) == 0
    with pytest.raises(KvmOSError):
        v.enable_cap(0xFFFF)
    with pytest.raises(InvalidArgumentError):
        v.enable_cap(caps["ENFORCE_PV_FEATURE_CPUID"], 0, (1, 2, 3, 4, 5))


# === VM: devices ==========================================================================

def test_create_device_and_its_attributes(machine):
    vm = machine.vm
    vfio = _core.DEVICE_TYPES["VFIO"]
    if not vm.create_device(vfio, test=True):
        pytest.skip("host: KVM has no VFIO device (CONFIG_KVM_VFIO)")
    assert vm.create_device(0xFFFF, test=True) is False     # no such device type
    with vm.create_device(vfio) as dev:
        assert dev.fileno() >= 0 and dev.type == vfio
        group, add = _core.VFIO_ATTRS["FILE"], _core.VFIO_ATTRS["FILE_ADD"]
        assert dev.has_attr(group, add) and not dev.has_attr(99, 0)
        r, w = os.pipe()
        try:
            with pytest.raises(KvmOSError) as e:
                dev.set_attr(group, add, r)             # a pipe is not a VFIO file
            assert e.value.op == "KVM_SET_DEVICE_ATTR"
        finally:
            os.close(r)
            os.close(w)
    assert dev.closed
    with pytest.raises(kvmsys.StateError):
        dev.has_attr(group, add)
