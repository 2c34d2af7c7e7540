"""KVM's binary statistics (KVM_GET_STATS_FD) by name, for a VM and a vCPU, over both ABIs."""
import pytest

from kvmsys import _core
from kvmsys.errors import StateError

pytestmark = pytest.mark.skipif(not _core.CAPABILITIES.get("BINARY_STATS_FD"), reason="env: old header")


def _require(machine):
    if not machine.vm.check_extension("BINARY_STATS_FD"):
        pytest.skip("host: no KVM_CAP_BINARY_STATS_FD")


def test_vcpu_stats_count_the_exits(machine):
    _require(machine)
    machine.load("mmio_write_loop.pm32", n=0)
    machine.vm.set_default(_core.SPACES["MMIO"], _core.H_KINDS["IGNORE"])
    before = machine.vcpu.kvm_stats()
    assert all(isinstance(v, (int, list)) for v in before.values())
    machine.run(budget=200)
    after = machine.vcpu.kvm_stats()
    # KVM counts every MMIO exit to user space it made, as this loop does (io_exits would not
    # do: PVM counts an emulated `out` only as insn_emulation)
    assert after["mmio_exits"] - before["mmio_exits"] == 200
    assert after["exits"] - before["exits"] >= 200


def test_vm_stats_and_detail(machine):
    _require(machine)
    stats = machine.vm.kvm_stats()
    assert stats and all(isinstance(k, str) and k for k in stats)
    detail = machine.vm.kvm_stats(detail=True)
    assert set(detail) == set(stats)
    for d in detail.values():
        assert d["type"] in {"cumulative", "instant", "peak", "linear_hist", "log_hist"}
        assert d["base"] in (2, 10)
    hist = [d for d in machine.vcpu.kvm_stats(detail=True).values() if d["type"].endswith("hist")]
    assert all(isinstance(d["value"], list) for d in hist)


def test_stats_of_a_closed_or_wrong_object(fdvm):
    with pytest.raises(TypeError):
        _core.stats_fd(object())
    vcpu = fdvm.create_vcpu(0)
    vcpu.close()
    with pytest.raises(StateError):
        vcpu.kvm_stats()
