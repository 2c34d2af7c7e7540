# in one byte from PORT_IN, N times. EBX = sum of the bytes read; the same
# values are added atomically to the u32 at RESULT_ADDR.
        .include "common.inc"
        LOOP_INIT
        xorl    %ebx, %ebx
1:      COUNT
        inb     $PORT_IN, %al
        movzbl  %al, %eax
        addl    %eax, %ebx
        lock addl %eax, RESULT_ADDR
        LOOP_NEXT 1b
