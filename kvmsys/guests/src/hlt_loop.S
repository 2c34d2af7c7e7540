# hlt, N times. PVM's native 64-bit mode skips the first hlt without an exit,
# so there the counter may exceed the HLT exits by one.
        .include "common.inc"
        LOOP_INIT
1:      COUNT
        hlt
        LOOP_NEXT 1b
