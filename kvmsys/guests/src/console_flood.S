# out N bytes to the debugcon port with no polling ('A'..'P' by the counter's
# low 4 bits): a console flood, to compare one exit per byte with a coalesced
# PIO zone that batches the writes.
        .include "common.inc"
        LOOP_INIT
1:      COUNT_EAX
        andb    $0x0f, %al
        addb    $0x41, %al
        outb    %al, $PORT_DEBUGCON
        LOOP_NEXT 1b
