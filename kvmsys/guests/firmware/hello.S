# A 4 KiB raw firmware image, run the way a PC starts: the CPU resets to real
# mode with CS base 0xFFFF0000 and IP 0xFFF0, i.e. 16 bytes below 4 GiB, where
# this image ends.  It prints a line on the 8250 serial port (polling LSR like a
# real driver), then quits through QEMU's isa-debug-exit (status (0x10<<1)|1).
# Build: as --32 -o hello.o hello.S && objcopy -O binary -j .text hello.o hello.bin
    .code16
    .text
start:                          # image offset 0 = linear 0xFFFFF000 (CS offset 0xF000)
    cli
    xor     %ax, %ax
    mov     %ax, %ss
    mov     $0x7000, %sp
    mov     $0xF000 + msg - start, %si
next:
    mov     %cs:(%si), %al      # CS base is 0xFFFF0000: read the message through CS
    test    %al, %al
    jz      done
    mov     %al, %bl
    mov     $0x3FD, %dx         # LSR: wait for "transmit holding register empty"
wait:
    in      %dx, %al
    test    $0x20, %al
    jz      wait
    mov     $0x3F8, %dx         # THR
    mov     %bl, %al
    out     %al, %dx
    inc     %si
    jmp     next
done:
    mov     $0x10, %al
    out     %al, $0xF4          # isa-debug-exit: status 0x21
halt:
    hlt
    jmp     halt
msg:
    .asciz  "kvmsys firmware: hello from the reset vector\n"

    .org    0xFF0               # the reset vector: linear 0xFFFFFFF0
reset:
    jmp     start
    .org    0x1000
