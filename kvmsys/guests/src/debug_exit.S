# One-byte out of AL to isa-debug-exit (status = (AL << 1) | 1), then stop.
        .include "common.inc"
        outb    %al, $PORT_DEBUG_EXIT
        HALT_FOREVER
