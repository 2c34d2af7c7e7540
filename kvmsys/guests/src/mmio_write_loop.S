# 4-byte store of the new counter value to MMIO_WRITE_ADDR, N times.
        .include "common.inc"
        LOOP_INIT
        movl    $MMIO_WRITE_ADDR, %esi
1:      COUNT_EAX
        MMIO_STORE_EAX
        LOOP_NEXT 1b
