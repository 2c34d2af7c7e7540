# A 512-byte boot sector for the PC firmware tests: the BIOS loads it at 0:7C00 and
# jumps there with the boot drive in DL.  The byte at offset 0x1B0 (ACTION) says what
# it does; it reports on the debug console (port 0xe9) and stops the run through
# isa-debug-exit (port 0xf4) with status (value << 1) | 1.
#   0: print "kvmsys boot sector: hello", stop with 1
#   1: write itself to the disk's second sector (int 13h AH=03), stop with 1 (2 if the
#      BIOS reported an error)
#   2/3/4: reset through port 0xcf9 / i8042 command 0xFE / port 0x92 bit 0
#   5: a triple fault (an interrupt in protected mode with an empty IDT)
# Build: python -m kvmsys.guests.build (as --32 -I. and objcopy -O binary -j .text)
    .include "debugcon.inc"
    .code16
    .text
start:
    ljmp    $0x07C0, $go        # CS = DS = ES = 0x7C0: offsets are from the sector's start
go:
    cli
    mov     %cs, %ax
    mov     %ax, %ds
    mov     %ax, %es
    xor     %ax, %ax
    mov     %ax, %ss
    mov     $0x7C00, %sp
    sti
    mov     action, %al
    cmp     $1, %al
    je      write
    cmp     $2, %al
    jae     reset
    mov     $msg_hello, %si
    call    puts
    mov     $1, %al
    jmp     done
write:
    mov     $0x0301, %ax        # write one sector
    mov     $0x0002, %cx        # cylinder 0, sector 2 (LBA 1)
    xor     %dh, %dh            # head 0; DL: the boot drive
    xor     %bx, %bx            # ES:BX: this sector
    int     $0x13
    jc      failed
    mov     $msg_written, %si
    call    puts
    mov     $1, %al
    jmp     done
failed:
    mov     $msg_failed, %si
    call    puts
    mov     $2, %al
    jmp     done
reset:
    mov     $msg_reset, %si
    call    puts
    mov     action, %al
    cmp     $3, %al
    je      reset_kbd
    cmp     $4, %al
    je      reset_92
    cmp     $5, %al
    je      triple
    mov     $0xCF9, %dx
    mov     $0x06, %al
    out     %al, %dx
    jmp     hang
reset_kbd:
    mov     $0xFE, %al
    out     %al, $0x64
    jmp     hang
reset_92:
    in      $0x92, %al
    and     $0xFE, %al
    out     %al, $0x92
    or      $0x01, %al
    out     %al, $0x92
    jmp     hang
triple:
    cli
    lidt    empty_idt           # limit 0: no vector is valid
    mov     %cr0, %eax
    or      $1, %eax            # protected mode, so the limit is checked
    mov     %eax, %cr0
    int     $0x03               # #GP, then #DF, then shutdown
hang:
    hlt
    jmp     hang
done:
    out     %al, $DEBUG_EXIT
    jmp     hang
    PUTS

empty_idt:
    .word   0
    .long   0
msg_hello:
    .asciz  "kvmsys boot sector: hello\n"
msg_written:
    .asciz  "kvmsys boot sector: written\n"
msg_failed:
    .asciz  "kvmsys boot sector: write failed\n"
msg_reset:
    .asciz  "kvmsys boot sector: reset\n"
    .org    0x1B0
action:
    .byte   0
    .org    510
    .word   0xAA55
