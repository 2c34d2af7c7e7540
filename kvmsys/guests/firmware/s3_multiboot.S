# A Multiboot (version 1) test kernel for S3 on kvmsys's kernel PC (kvmsys.pc, kvmsys.acpi):
# loaded at 1 MiB and entered in flat 32-bit protected mode, it copies a real-mode resume
# stub to 0x10000, puts that address in the FACS's firmware_waking_vector (the FACS is the
# first ACPI table, at 0xF0000), sets the RTC alarm to fire every second (all three alarm
# registers "don't care", status B's AIE) and, by the first byte of its command line:
#   "s": enables the RTC wake-up (PM1_EN's RTC_EN) and enters S3 (PM1a_CNT = SLP_TYP 1 | SLP_EN);
#   "n": enters S3 with no wake-up enabled (the machine sleeps until the run ends);
#   "o": enters S5 (SLP_TYP 0 | SLP_EN), soft off.
# After the S3 write it sets a marker word to 1 forever (it is 0 if the vCPU stopped at the
# write).  The stub, entered in real mode at 1000:0000 on resume, stops through
# isa-debug-exit with 0x10 | marker | (0x20 if PM1_STS has WAK_STS): 0x30 on a clean resume.
# Build: python -m kvmsys.guests.build (as --32 -I. and objcopy -O binary -j .text)
    .include "debugcon.inc"
    .code32
    .text
    .set    STUB, 0x10000
    .set    FACS_WAKING_VECTOR, 0xF000C
    .set    PM1_STS, 0x600
    .set    PM1_EN, 0x602
    .set    PM1_CNT, 0x604
    .include "multiboot.inc"
entry:
    mov     $end + BASE + 0x1000, %esp
    mov     16(%ebx), %ebp          # the command line
    mov     $stub + BASE, %esi
    mov     $STUB, %edi
    mov     $stub_end - stub, %ecx
    cld
    rep movsb
    movl    $STUB, FACS_WAKING_VECTOR
    movl    $0, STUB + (marker - stub)
    cmpb    $'o', (%ebp)
    je      soft_off
    mov     $1, %bl                 # the three alarm registers (1, 3, 5): don't care
1:  mov     %bl, %al
    out     %al, $0x70
    mov     $0xC0, %al
    out     %al, $0x71
    add     $2, %bl
    cmp     $7, %bl
    jne     1b
    mov     $0x0B, %al              # status B: alarm interrupt enable
    out     %al, $0x70
    in      $0x71, %al
    or      $0x20, %al
    mov     %al, %cl
    mov     $0x0B, %al
    out     %al, $0x70
    mov     %cl, %al
    out     %al, $0x71
    cmpb    $'n', (%ebp)
    je      2f
    mov     $0x400, %ax             # RTC_EN
    mov     $PM1_EN, %dx
    out     %ax, %dx
2:  mov     $0x2400, %ax            # SLP_TYP 1 (S3) | SLP_EN
    mov     $PM1_CNT, %dx
    out     %ax, %dx
3:  movl    $1, STUB + (marker - stub)
    jmp     3b
soft_off:
    mov     $0x2000, %ax            # SLP_TYP 0 (S5) | SLP_EN
    mov     $PM1_CNT, %dx
    out     %ax, %dx
    mov     $0x7F, %al              # not reached when S5 ends the run
    out     %al, $DEBUG_EXIT
4:  hlt
    jmp     4b

    .code16                         # resume: real mode, CS = STUB >> 4, IP = 0
stub:
    mov     %cs, %ax
    mov     %ax, %ds
    mov     marker - stub, %bl
    or      $0x10, %bl
    mov     $PM1_STS, %dx
    in      %dx, %ax
    test    $0x8000, %ax            # WAK_STS
    jz      5f
    or      $0x20, %bl
5:  mov     %bl, %al
    out     %al, $DEBUG_EXIT
6:  hlt
    jmp     6b
    .align  4
marker:
    .long   0
stub_end:
    .code32
    .align  4
end:
