# Waits for n interrupts on IRQ_VECTOR from outside (e.g. an MSI the host sends
# through VcpuHandle.interrupt). Needs the in-kernel irqchip. Input: ECX = n.
# Sets the gates and software-enables the local APIC (IRQ_SETUP), then sets
# SMP_READY_ADDR to 1: interrupts sent before that may be dropped by a disabled
# APIC. The handler counts interrupts at IRQ_COUNTS_ADDR[APIC id] and sends EOI;
# the guest sleeps in `sti; hlt` until its count reaches n, then debug-exit 0.
        .include "common.inc"
        .include "smp.inc"
        movl    %ecx, %edi
        IRQ_SETUP
        APIC_ID_EAX
        shll    $2, %eax
        addl    $IRQ_COUNTS_ADDR, %eax
        movl    %eax, %ebx              # EBX: my interrupt count
        movl    $1, SMP_READY_ADDR
        WAIT_IRQ_COUNT_EDI
        DONE

        IRQ_HANDLERS
