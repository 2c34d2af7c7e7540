# out one byte (low byte of the new counter value) to PORT_OUT, N times.
        .include "common.inc"
        LOOP_INIT
1:      COUNT_EAX
        outb    %al, $PORT_OUT
        LOOP_NEXT 1b
