# Exception stubs for vectors 0..31, VECTOR_STUB_SIZE bytes apart, loaded at
# VECTORS_ADDR and shared by all modes: the bytes are position-independent and
# encode the same in 16-, 32- and 64-bit code. Each reports
# EXC_EXIT_BASE | vector to isa-debug-exit and halts (the host finds the
# faulting RIP on the stack at RSP).
        .include "common.inc"
        .set    vec, 0
        .rept   NUM_VECTORS
        movb    $(EXC_EXIT_BASE | vec), %al
        outb    %al, $PORT_DEBUG_EXIT
1:      hlt
        jmp     1b
        .org    _start + (vec + 1) * VECTOR_STUB_SIZE, 0xf4   # errors if a stub outgrows its slot
        .set    vec, vec + 1
        .endr
