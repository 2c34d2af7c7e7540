# An SMP Multiboot (version 1) test kernel: loaded at 1 MiB (a.out-kludge header) and
# entered on the boot vCPU in flat 32-bit protected mode.  It starts the other vCPUs as
# kvm-unit-tests does: INIT then SIPI to all but itself through its local APIC (xAPIC at
# 0xFEE00000), with the start-up vector 0x10 (real-mode code at 0x10000, copied there).
# Each AP increments a counter at 0x10000 + (counter - tramp) and halts.  The boot vCPU
# reads the CPU count from fw_cfg (port 0x510, key 0x05, as the suite does), waits until
# count - 1 APs checked in, writes "smp ok\n" to the debug console and stops through
# isa-debug-exit with the number of APs ((n << 1) | 1).
# Build: python -m kvmsys.guests.build (as --32 -I. and objcopy -O binary -j .text)
    .include "debugcon.inc"
    .code32
    .text
    .set    TRAMP, 0x10000          # SIPI vector 0x10
    .set    APIC, 0xFEE00000
    .include "multiboot.inc"
entry:
    mov     $end + BASE + 0x1000, %esp
    mov     $tramp + BASE, %esi     # the AP code to TRAMP
    mov     $TRAMP, %edi
    mov     $tramp_end - tramp, %ecx
    cld
    rep movsb
    movl    $0, TRAMP + (counter - tramp)
    orl     $0x100, APIC + 0xF0     # software-enable the local APIC (SVR)
    movl    $0, APIC + 0x310        # ICR high: no destination field (shorthand below)
    movl    $0x000C4500, APIC + 0x300       # INIT, assert, all excluding self
1:  testl   $0x1000, APIC + 0x300   # delivery status: wait until sent
    jnz     1b
    movl    $0x000C4600 + (TRAMP >> 12), APIC + 0x300  # SIPI, vector 0x10, all excluding self
2:  testl   $0x1000, APIC + 0x300
    jnz     2b
    mov     $0x05, %ax              # fw_cfg key 0x05: the number of CPUs (16 bits)
    mov     $0x510, %dx
    out     %ax, %dx
    inc     %dx
    in      %dx, %al
    movzbl  %al, %ecx
    in      %dx, %al
    movzbl  %al, %eax
    shl     $8, %eax
    or      %eax, %ecx
    dec     %ecx                    # ECX: APs expected
3:  cmp     TRAMP + (counter - tramp), %ecx
    je      4f
    pause
    jmp     3b
4:  mov     $msg_ok + BASE, %esi
    call    puts
    mov     %ecx, %eax
    out     %al, $DEBUG_EXIT
hang:
    hlt
    jmp     hang
    PUTS
msg_ok:
    .asciz  "smp ok\n"

    .code16                         # an AP starts here in real mode, CS = TRAMP >> 4, IP = 0
tramp:
    mov     %cs, %ax
    mov     %ax, %ds
    lock incl counter - tramp
5:  cli
    hlt
    jmp     5b
    .align  4
counter:
    .long   0
tramp_end:
    .code32
    .align  4
end:
