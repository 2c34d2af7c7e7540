# The ping-pong ring of smp_pingpong, with interrupts: vCPU i passes round r to
# vCPU i + 1 (mod N) by an inter-processor interrupt (local APIC ICR, fixed
# delivery, physical destination) on IRQ_VECTOR. Needs the in-kernel irqchip.
# Inputs: ECX = n (rounds), EDX = cpu, ESI = ncpus (N).
# Setup: gates and LAPIC enabled (IRQ_SETUP), own APIC id published at
# mailbox(cpu) + 4, then a barrier on SMP_READY_ADDR. The handler counts
# interrupts per APIC id at IRQ_COUNTS_ADDR. Round r: vCPU 0 sends an IPI;
# each vCPU waits (sti; hlt) until its count reaches r, and vCPUs i > 0 forward
# it. At the end each vCPU adds its count to SMP_VALUE_ADDR (lock add); the
# total must be N * n: SMP_FINISH (smp.inc), status 1 pass, 5 fail.
        .include "common.inc"
        .include "smp.inc"
        IRQ_SETUP
        movl    %edx, %ebx              # my mailbox
        shll    $4, %ebx
        addl    $SMP_MAILBOX_ADDR, %ebx
        APIC_ID_EAX
.if MODE == 64
        movl    %eax, 4(%rbx)
.else
        movl    %eax, 4(%ebx)
.endif
        shll    $2, %eax                # EBX: my interrupt count
        addl    $IRQ_COUNTS_ADDR, %eax
        movl    %eax, %ebx
        lock incl SMP_READY_ADDR
1:      cmpl    %esi, SMP_READY_ADDR
        je      2f
        SPIN_PAUSE
        jmp     1b
2:      movl    %edx, %eax              # EBP: the next vCPU's APIC id
        incl    %eax
        cmpl    %esi, %eax
        jb      3f
        xorl    %eax, %eax
3:      shll    $4, %eax
.if MODE == 64
        movl    SMP_MAILBOX_ADDR + 4(%rax), %ebp
.else
        movl    SMP_MAILBOX_ADDR + 4(%eax), %ebp
.endif
        movl    $1, %edi                # EDI: round r
4:      cmpl    %ecx, %edi
        ja      8f
        testl   %edx, %edx
        jnz     5f
        call    send_ipi                # vCPU 0 starts the round
5:      WAIT_IRQ_COUNT_EDI
        testl   %edx, %edx
        jz      6f
        call    send_ipi
6:      incl    %edi
        jmp     4b
8:
.if MODE == 64
        movl    (%rbx), %eax
.else
        movl    (%ebx), %eax
.endif
        lock addl %eax, SMP_VALUE_ADDR
        SMP_FINISH

# IPI on IRQ_VECTOR to APIC id EBP: destination first, then the low half sends.
send_ipi:
        movl    %ebp, %eax
        shll    $24, %eax
        LAPIC_STORE_EAX LAPIC_ICR_HIGH
        movl    $(0x4000 | IRQ_VECTOR), %eax    # level assert, fixed, physical, edge
        LAPIC_STORE_EAX LAPIC_ICR_LOW
.if MODE == 16
        retw
.else
        ret
.endif

        IRQ_HANDLERS
