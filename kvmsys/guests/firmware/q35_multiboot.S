# A Multiboot (version 1) test kernel for kvmsys's q35 machine (kvmsys.q35: run it with
# --machine q35 --device edu --device intel-iommu --test-device): loaded at 1 MiB, entered
# in flat 32-bit protected mode on one vCPU.  Step by step, each failing step stops through
# isa-debug-exit with its number (status (n << 1) | 1); all passed: "q35 ok\n" and 0.
#  1. user-space IOAPIC, level-triggered: pin 10 -> vector 0x40; the pc-testdev port 0x200a
#     raises the line; the ISR leaves it high on its first run and EOIs, so the IOAPIC must
#     deliver again on that EOI (KVM's IOAPIC_EOI exit); the second run lowers it.
#  2. edu (00:01.0, BAR 0xfe000000) DMA through the IOMMU: tables map IOVA 0 -> DATA;
#     a word DMAed from IOVA 0 into edu and back to IOVA 4 must land at DATA + 4.
#  3. a DMA from an unmapped IOVA: a fault record with reason 6 (read) for requester 0x0008.
#  4. interrupt remapping: edu's MSI in remappable format, handle 5 -> IRTE 5 -> vector 0x41.
#  5. a remapped level-triggered IOAPIC pin: pin 11 in remappable format -> IRTE 6 (level,
#     vector 0x42); as in step 1, delivered again on the EOI while the line (0x200b) is high.
# Build: python -m kvmsys.guests.build (as --32 -I. and objcopy -O binary -j .text)
    .include "debugcon.inc"
    .code32
    .text
    .set    APIC, 0xFEE00000
    .set    IOAPIC, 0xFEC00000
    .set    VTD, 0xFED90000
    .set    EDU, 0xFE000000
    .set    ROOT, 0x200000          # VT-d root table; then context, L3, L2, L1, DATA, IRT, IDT
    .set    CTX, 0x201000
    .set    L3, 0x202000
    .set    L2, 0x203000
    .set    L1, 0x204000
    .set    DATA, 0x205000
    .set    IRT, 0x206000
    .set    IDT, 0x207000
    .set    TE, 0x80000000
    .include "multiboot.inc"
entry:
    mov     $end + BASE + 0x1000, %esp
    mov     $0x40, %ebx
    mov     $isr_level + BASE, %eax
    call    set_gate
    mov     $0x41, %ebx
    mov     $isr_msi + BASE, %eax
    call    set_gate
    mov     $0x42, %ebx
    mov     $isr_remapped + BASE, %eax
    call    set_gate
    lidt    idtr + BASE
    orl     $0x100, APIC + 0xF0     # software-enable the local APIC
    movl    $0x10 + 2 * 10, IOAPIC  # pin 10: level, vector 0x40, APIC 0
    movl    $0x8040, IOAPIC + 0x10
    movl    $0x11 + 2 * 10, IOAPIC
    movl    $0, IOAPIC + 0x10
    sti
    mov     $0x200A, %dx            # step 1
    mov     $1, %al
    out     %al, %dx
1:  cmpl    $2, level_count + BASE
    jne     1b
    mov     $1, %ecx
    mov     $1000, %eax             # a third delivery would come now
2:  dec     %eax
    jnz     2b
    cmpl    $2, level_count + BASE
    jne     fail
    movl    $0x80000804, %eax       # step 2: edu's command register: memory, bus master
    mov     $0xCF8, %dx
    out     %eax, %dx
    mov     $6, %ax
    mov     $0xCFC, %dx
    out     %ax, %dx
    movl    $CTX | 1, ROOT
    movl    $L3 | 1, CTX + 8 * 16   # devfn 8: 3-level tables, 39-bit width, domain 8
    movl    $1 | 8 << 8, CTX + 8 * 16 + 8
    movl    $L2 | 3, L3
    movl    $L1 | 3, L2
    movl    $DATA | 3, L1
    movl    $0x5A5A1234, DATA
    movl    $0x77777777, 0          # where an untranslated DMA would read
    movl    $ROOT, VTD + 0x20
    movl    $0x40000000, VTD + 0x18         # SRTP
    movl    $TE, VTD + 0x18
    inc     %ecx
    testl   $TE, VTD + 0x1C
    jz      fail
    movl    $0, EDU + 0x80          # RAM (IOVA 0) -> edu's buffer
    movl    $0x40000, EDU + 0x88
    movl    $4, EDU + 0x90
    movl    $1, EDU + 0x98
    movl    $0x40000, EDU + 0x80    # edu's buffer -> RAM (IOVA 4)
    movl    $4, EDU + 0x88
    movl    $3, EDU + 0x98
    cmpl    $0x5A5A1234, DATA + 4
    jne     fail
    cmpl    $0, VTD + 0x34          # no fault
    jne     fail
    inc     %ecx                    # step 3: IOVA 0x5000 is not mapped
    movl    $0x5000, EDU + 0x80
    movl    $0x40000, EDU + 0x88
    movl    $1, EDU + 0x98
    testl   $2, VTD + 0x34          # FSTS.PPF
    jz      fail
    cmpl    $0x5000, VTD + 0x220    # the page
    jne     fail
    cmpl    $8, VTD + 0x228         # requester 00:01.0
    jne     fail
    movl    VTD + 0x22C, %eax       # reason 6, a read, F
    cmp     $0xC0000006, %eax
    jne     fail
    inc     %ecx                    # step 4
    movl    $1 | 0x41 << 16, IRT + 5 * 16   # present, vector 0x41, fixed, APIC 0
    movl    $8 | 1 << 18, IRT + 5 * 16 + 8  # requester 8, verified
    movl    $IRT | 3, VTD + 0xB8    # 16 entries
    movl    $TE | 0x01000000, VTD + 0x18    # SIRTP
    movl    $TE | 0x02000000, VTD + 0x18    # IRE
    mov     $0x44, %bl              # edu's MSI: address, data, enable
    mov     $0xFEE00000 | 1 << 4 | 5 << 5, %eax
    call    edu_config
    mov     $0x4C, %bl
    xor     %eax, %eax
    call    edu_config
    mov     $0x40, %bl              # capability id, next, control (+2): 0x0081 << 16 enables
    mov     $0x00810005, %eax
    call    edu_config
    movl    $1, EDU + 0x60          # raise
3:  cmpl    $1, msi_count + BASE
    jne     3b
    inc     %ecx                    # step 5
    movl    $1 | 1 << 4 | 0x42 << 16, IRT + 6 * 16  # present, level, vector 0x42, APIC 0
    movl    $0, IRT + 6 * 16 + 8    # no source-id check (the IOAPIC sends none)
    movl    $0x10 + 2 * 11, IOAPIC  # pin 11: remappable, index 6, level, vector 0x42
    movl    $0x8042, IOAPIC + 0x10
    movl    $0x11 + 2 * 11, IOAPIC
    movl    $(1 << 16) | (6 << 17), IOAPIC + 0x10
    mov     $0x200B, %dx
    mov     $1, %al
    out     %al, %dx
4:  cmpl    $2, remapped_count + BASE
    jne     4b
    mov     $1000, %eax
5:  dec     %eax
    jnz     5b
    cmpl    $2, remapped_count + BASE
    jne     fail
    mov     $msg_ok + BASE, %esi
    call    puts
    xor     %ecx, %ecx
fail:
    mov     %ecx, %eax
    out     %al, $DEBUG_EXIT
hang:
    hlt
    jmp     hang

set_gate:                           # IDT entry EBX: a 32-bit interrupt gate to EAX
    mov     %eax, %edx
    and     $0xFFFF, %eax
    mov     %cs, %cx
    shl     $16, %ecx
    or      %ecx, %eax
    and     $0xFFFF0000, %edx
    or      $0x8E00, %edx
    mov     %eax, IDT(, %ebx, 8)
    mov     %edx, IDT + 4(, %ebx, 8)
    ret

edu_config:                         # edu's config dword at BL := EAX
    push    %eax
    movzbl  %bl, %eax
    or      $0x80000800, %eax
    mov     $0xCF8, %dx
    out     %eax, %dx
    pop     %eax
    mov     $0xCFC, %dx
    out     %eax, %dx
    ret

# The ISRs return with sti; ret $8 (dropping CS and EFLAGS, their flags kept by pushf/popf),
# not iret: KVM's instruction emulator, which runs 32-bit guests on a PVM host, has IRET
# for real mode only.
isr_level:
    pushf
    push    %eax
    push    %edx
    incl    level_count + BASE
    cmpl    $2, level_count + BASE
    jb      1f                      # first run: the line stays high
    mov     $0x200A, %dx
    xor     %al, %al
    out     %al, %dx
1:  movl    $0, APIC + 0xB0         # EOI
    pop     %edx
    pop     %eax
    popf
    sti
    ret     $8

isr_remapped:
    pushf
    push    %eax
    push    %edx
    incl    remapped_count + BASE
    cmpl    $2, remapped_count + BASE
    jb      1f
    mov     $0x200B, %dx
    xor     %al, %al
    out     %al, %dx
1:  movl    $0, APIC + 0xB0
    pop     %edx
    pop     %eax
    popf
    sti
    ret     $8

isr_msi:
    pushf
    incl    msi_count + BASE
    movl    $1, EDU + 0x64          # acknowledge
    movl    $0, APIC + 0xB0
    popf
    sti
    ret     $8

    PUTS
    .align  4
level_count:
    .long   0
msi_count:
    .long   0
remapped_count:
    .long   0
idtr:
    .word   0x43 * 8 - 1
    .long   IDT
msg_ok:
    .asciz  "q35 ok\n"
    .align  4
end:
