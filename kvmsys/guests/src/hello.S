# "Hello, world!\n" to the 8250 at COM1_BASE, waiting for LSR.THRE before
# each byte as a real driver does; then debug-exit 0.
        .include "common.inc"
        cld
        movl    $msg, %esi
1:      lodsb
        testb   %al, %al
        jz      3f
        movb    %al, %bl
        movw    $COM1_LSR, %dx
2:      inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      2b
        movw    $COM1_BASE, %dx
        movb    %bl, %al
        outb    %al, %dx
        jmp     1b
3:      DONE
msg:    .asciz  "Hello, world!\n"
