# Interrupts without the in-kernel irqchip: the host injects them (KVM_INTERRUPT,
# KVM_NMI) and must respect IF. Input: ECX = n (>= 1). Gates: IRQ_VECTOR and
# IRQ_SPURIOUS_VECTOR (plain external-interrupt handlers here) and NMI (vector 2).
# Each handler writes its vector to PORT_RESULT (an exit, so the host sees the
# order); the two external ones also add one to the u32 at IRQ_COUNTS_ADDR. The
# program runs `cli`, reports that count on PORT_OUT n times (4-byte out), runs
# `sti`, reports it n times more with bit 8 set, then debug-exit 0. A host that
# requests interrupts at the first report must deliver none before the `sti`.
        .include "common.inc"
        .include "smp.inc"
        movl    %ecx, %edi
        SET_GATE 2, nmi_handler
        SET_GATE IRQ_VECTOR, irq_a
        SET_GATE IRQ_SPURIOUS_VECTOR, irq_b
        LOAD_IDT (IRQ_SPURIOUS_VECTOR + 1)
        cli
        movl    %edi, %ecx
1:      movl    IRQ_COUNTS_ADDR, %eax
        outl    %eax, $PORT_OUT
        decl    %ecx
        jnz     1b
        sti
        movl    %edi, %ecx
2:      movl    IRQ_COUNTS_ADDR, %eax
        orl     $0x100, %eax
        outl    %eax, $PORT_OUT
        decl    %ecx
        jnz     2b
        DONE

# An interrupt handler that reports `vec` on PORT_RESULT (and counts it if `counted`).
.macro ISR vec, counted
.if MODE == 64
        pushq   %rax
.else
        pushl   %eax
.endif
.if \counted
        lock incl IRQ_COUNTS_ADDR
.endif
        movb    $\vec, %al
        outb    %al, $PORT_RESULT
.if MODE == 64
        popq    %rax
        iretq
.elseif MODE == 32
        popl    %eax
        iretl
.else
        popl    %eax
        iretw
.endif
.endm

nmi_handler:
        ISR     2, 0
irq_a:
        ISR     IRQ_VECTOR, 1
irq_b:
        ISR     IRQ_SPURIOUS_VECTOR, 1
