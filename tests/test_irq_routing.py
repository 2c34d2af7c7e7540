"""Interrupt routing against the real /dev/kvm: VcpuHandle.interrupt to the vCPU's current
APIC id (xAPIC and x2APIC), GSI routing tables with MSI routes, IRQ_LINE_STATUS, and the
split irqchip with its IOAPIC_EOI exit.  Both ABIs where a vCPU id can be chosen freely
by neither (ids above 255: fd ABI)."""
import struct
import threading

import pytest

import kvmsys
from kvmsys import DeadlineExit, IoapicEoiExit, IoExit, routing
from kvmsys.errors import InvalidArgumentError
from kvmsys.guests import layout as L
from test_wrappers import debug_exit_port, irq_machine, load_code, out

VECTOR = 0x40
MSR_APICBASE = 0x1B
APICBASE_ENABLE, APICBASE_X2APIC = 1 << 11, 1 << 10


def enable_lapic(vcpu):
    lapic = vcpu.get_lapic()
    lapic["svr"] |= 0x100              # software-enable: a disabled APIC accepts nothing
    vcpu.set_lapic(lapic)


def to_x2apic(vcpu):
    """x2APIC mode, as a guest's wrmsr would set it (the CPUID must announce x2APIC)."""
    with kvmsys.Kvm() as kvm:
        vcpu.set_cpuid2(kvm.supported_cpuid())
    base = vcpu.get_msrs([MSR_APICBASE])[MSR_APICBASE]
    assert vcpu.set_msrs({MSR_APICBASE: base | APICBASE_ENABLE | APICBASE_X2APIC}) == 1
    assert vcpu.x2apic_mode()


def spin_with_interrupts_off(machine, vcpu, mem):
    """cli; report; spin: a requested interrupt stays in the IRR, where the test sees it."""
    load_code(vcpu, mem, b"\xFA" + out(L.PORT_OUT, 0) + b"\xEB\xFE")
    assert machine.run(timeout=5).port == L.PORT_OUT


def interrupt_from_another_thread_then_run(machine, vcpu):
    h = vcpu.handle()
    t = threading.Thread(target=h.interrupt, args=(VECTOR,))
    t.start()
    t.join()
    # the owner injects it at its next run, from the LAPIC state it reads then
    assert isinstance(machine.run(timeout=0.3), DeadlineExit)
    assert vcpu.pending == []


@pytest.fixture
def irq_rig(abi):
    m = irq_machine(abi, pit=False)
    yield m
    m.close()


def test_interrupt_goes_to_the_current_xapic_id(irq_rig):
    m, v = irq_rig, irq_rig.vcpu
    lapic = v.get_lapic()
    lapic["svr"] |= 0x100
    lapic["id"] = 7 << 24                # the guest (or its firmware) moved this APIC to id 7
    v.set_lapic(lapic)
    assert v.apic_id() == 7 and not v.x2apic_mode()
    spin_with_interrupts_off(m, v, m.mem)
    interrupt_from_another_thread_then_run(m, v)
    assert v.get_lapic().irr == {VECTOR}


def test_interrupt_in_x2apic_mode(irq_rig):
    m, v = irq_rig, irq_rig.vcpu
    to_x2apic(v)
    enable_lapic(v)
    assert v.apic_id() == v.id
    spin_with_interrupts_off(m, v, m.mem)
    interrupt_from_another_thread_then_run(m, v)
    assert v.get_lapic().irr == {VECTOR}


def test_interrupt_to_an_x2apic_id_above_255():
    with kvmsys.Kvm() as kvm, kvm.create_vm() as vm:
        if not vm.check_extension("X2APIC_API") & 1:
            pytest.skip("host: lacks KVM_CAP_X2APIC_API (32-bit APIC ids)")
        vm.create_irqchip()
        vm.enable_cap("X2APIC_API", 0, (kvmsys._core.X2APIC_API["USE_32BIT_IDS"],))
        assert vm.x2apic_format
        mem = vm.add_memory(0, 0, L.RAM_SIZE)
        debug_exit_port(vm)
        v = vm.create_vcpu(300)
        v.set_mp_state(kvmsys.MpState.RUNNABLE)     # an AP waits for INIT/SIPI otherwise
        to_x2apic(v)
        enable_lapic(v)
        assert v.apic_id() == 300
        rig = type("Rig", (), {"run": staticmethod(v.run)})
        spin_with_interrupts_off(rig, v, mem)
        interrupt_from_another_thread_then_run(rig, v)
        assert v.get_lapic().irr == {VECTOR}


@pytest.mark.nokvm
def test_msi_message_encoding():
    assert routing.msi_message(3, 0x41) == (0xFEE03000, 0, 0x41)
    assert routing.msi_message(0x12C, 0x41, x2apic_format=True) == (0xFEE2C000, 0x100, 0x41)
    assert routing.msi_message(1, 0x41, level=True)[2] == 0x41 | 0xC000
    with pytest.raises(InvalidArgumentError):
        routing.msi_message(300, 0x41)          # needs 32-bit ids
    with pytest.raises(InvalidArgumentError):
        routing.msi_message(0, 15)


def test_gsi_routing_msi_route_and_line_status(irq_rig):
    m, v = irq_rig, irq_rig.vcpu
    enable_lapic(v)
    spin_with_interrupts_off(m, v, m.mem)
    m.vm.set_gsi_routing(routing.default_routes() + [routing.msi_route(40, v.apic_id(), 0x46)])
    assert m.vm.irq_line_status(40, 1) == 1          # delivered to one CPU
    m.vm.irq_line(40, 0)
    assert v.get_lapic().irr == {0x46}
    with pytest.raises(InvalidArgumentError):
        m.vm.set_gsi_routing([(1, 99)])                 # unknown route type
    with pytest.raises(InvalidArgumentError):
        routing.irqchip_route(0, "NOPE", 0)


def test_split_irqchip_ioapic_eoi_exit(abi):
    # Local APIC in the kernel, IOAPIC in user space: GSI 5 is a level-triggered MSI
    # route; the guest's EOI of its vector comes back to us as IOAPIC_EOI.
    if abi == "fd":
        kvm = kvmsys.Kvm()
        vm = kvm.create_vm()
        vm.create_split_irqchip(24)
        mem = vm.add_memory(0, 0, L.RAM_SIZE)
        v = vm.create_vcpu(0)
        run = v.run
    else:
        kvm = None
        scope = kvmsys.syscall.fresh_vm(memory_size=L.RAM_SIZE, pc_ports=False, irqchip="split")
        vm = scope.__enter__()
        kvmsys.add_vcpu()
        v, mem, run = kvmsys.current(), vm.memory(0), kvmsys.run
    try:
        assert vm.has_irqchip and vm.split_irqchip
        debug_exit_port(vm)
        enable_lapic(v)
        vector = 0x45
        vm.set_gsi_routing([routing.msi_route(5, 0, vector, level=True)])
        # handler: mov dword [LAPIC EOI], 0; out PORT_RESULT; spin.  main: sti; report; spin
        handler = 0xE000
        mem[handler:handler + 14] = (b"\xC7\x05" + struct.pack("<II", L.LAPIC_BASE + L.LAPIC_EOI, 0)
                                     + bytes([0xE7, L.PORT_RESULT]) + b"\xEB\xFE")
        load_code(v, mem, b"\xFB" + out(L.PORT_OUT, 0) + b"\xEB\xFE")
        struct.pack_into("<HHHH", mem, L.IDT_ADDR + 8 * vector, handler, L.SEL_CODE32, 0x8E00, 0)
        s = v.get_sregs()
        s["idt"] = dict(s["idt"], limit=8 * (vector + 1) - 1)
        v.set_sregs(s)
        assert run(timeout=5).port == L.PORT_OUT
        assert vm.irq_line_status(5, 1) == 1
        # the EOI exit and the handler's report, in either order: a host that emulates
        # the guest (ours) checks the EOI request only at its next exit to user space
        seen = []
        for _ in range(2):
            ex = run(timeout=5)
            seen.append(("eoi", ex.vector) if isinstance(ex, IoapicEoiExit) else
                        ("io", ex.port) if isinstance(ex, IoExit) else ex)
        assert sorted(seen) == [("eoi", vector), ("io", L.PORT_RESULT)]
        vm.irq_line(5, 0)
        assert v.get_lapic().isr == set()           # the guest's EOI reached its local APIC
    finally:
        if kvm is not None:
            vm.close()
            kvm.close()
        else:
            kvmsys.remove_vcpu()
            scope.__exit__(None, None, None)


def test_split_irqchip_refused_after_a_vcpu(fdvm):
    fdvm.create_vcpu(0)
    with pytest.raises(InvalidArgumentError):
        fdvm.create_split_irqchip()
