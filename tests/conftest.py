"""Test configuration: real /dev/kvm, the same test bodies over both ABIs.

Tests need /dev/kvm unless marked `nokvm`.  Without /dev/kvm they skip with a
reason, unless KVMSYS_REQUIRE_KVM=1 (CI sets it where /dev/kvm exists), in
which case a skipped KVM test is a failure.  The one exception: a test may skip
because the host's KVM cannot do something (detected, not assumed) or the test
environment lacks something; such reasons start with "host:" or "env:".
"""
import os

import pytest

HAVE_KVM = os.path.exists("/dev/kvm")
REQUIRE_KVM = os.environ.get("KVMSYS_REQUIRE_KVM") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "nokvm: the test does not need /dev/kvm")


def pytest_collection_modifyitems(config, items):
    if HAVE_KVM:
        return
    for item in items:
        if item.get_closest_marker("nokvm") is None:
            if REQUIRE_KVM:
                item.add_marker(pytest.mark.xfail(reason="/dev/kvm is required but absent", run=False, strict=True))
            else:
                item.add_marker(pytest.mark.skip(reason="/dev/kvm is absent (KVM module not loaded, "
                                                        "or a VM without nested virtualization)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_KVM and report.skipped and item.get_closest_marker("nokvm") is None \
            and not _declared_limit(report):
        report.outcome = "failed"
        report.longrepr = f"KVMSYS_REQUIRE_KVM=1 but a KVM test was skipped: {report.longrepr}"


def _declared_limit(report) -> bool:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ").startswith(("host:", "env:"))


def Machine(abi, memory_size, irqchip=False, pit=False):
    """kvmsys's one two-ABI machine (kvmsys.machine), with vCPU 0 attached to this thread."""
    from kvmsys.machine import Machine
    m = Machine(abi, memory_size=memory_size, irqchip=irqchip, pit=pit)
    m.attach(0)
    return m


@pytest.fixture(params=["fd", "sys"])
def abi(request):
    return request.param


@pytest.fixture
def machine(abi):
    from kvmsys.guests import layout
    m = Machine(abi, layout.RAM_SIZE)
    yield m
    m.close()


@pytest.fixture
def fresh_process_vm():
    """No process VM and no binding: the next add_vcpu()/vm() creates the VM (RAM_SIZE at
    0, no PC ports); afterwards the VM is destroyed and the configuration restored."""
    import kvmsys
    from kvmsys import syscall
    from kvmsys.guests import layout
    saved = syscall.config()
    syscall.destroy_vm()
    syscall.configure(memory_size=layout.RAM_SIZE, pc_ports=False)
    yield
    if kvmsys.current() is not None:
        kvmsys.remove_vcpu()
    syscall.destroy_vm()
    syscall.configure(**saved)


@pytest.fixture
def fdvm():
    """A bare fd-ABI VM with RAM_SIZE at 0 and no vCPU."""
    import kvmsys
    from kvmsys.guests import layout
    kvm = kvmsys.Kvm()
    vm = kvm.create_vm()
    vm.add_memory(0, 0, layout.RAM_SIZE)
    yield vm
    vm.close()
    kvm.close()
