# 4-byte load from MMIO_READ_ADDR, N times. EBX = sum (mod 2^32) of the values
# read; the same values are added atomically to the u32 at RESULT_ADDR.
        .include "common.inc"
        LOOP_INIT
        xorl    %ebx, %ebx
        movl    $MMIO_READ_ADDR, %esi
1:      COUNT
        MMIO_LOAD_EAX
        addl    %eax, %ebx
        lock addl %eax, RESULT_ADDR
        LOOP_NEXT 1b
