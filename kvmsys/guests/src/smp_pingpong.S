# A message ring through shared memory: 0 -> 1 -> ... -> N-1 -> 0, n rounds.
# Inputs: ECX = n (rounds), EDX = cpu, ESI = ncpus (N).
# vCPU i's mailbox is the u32 at SMP_MAILBOX_ADDR + i * SMP_MAILBOX_STRIDE.
# Round r (1..n): vCPU 0 sends r to vCPU 1; each vCPU i > 0 waits until its
# mailbox holds r and forwards r to i + 1 (mod N); vCPU 0 waits for r to come
# back. Whoever holds the token adds one to SMP_VALUE_ADDR with a plain
# read-modify-write before passing it on, so the total is N * n only if every
# hand-off orders memory. A mailbox value other than r - 1 or r while waiting
# sets SMP_FAIL_ADDR. SMP_FINISH (smp.inc) ends it: status 1 pass, 5 fail.
# With N = 1, vCPU 0 sends to itself.
        .include "common.inc"
        .include "smp.inc"
        movl    %edx, %ebx              # EBX: my mailbox
        shll    $4, %ebx
        addl    $SMP_MAILBOX_ADDR, %ebx
        movl    %edx, %ebp              # EBP: the next vCPU's mailbox
        incl    %ebp
        cmpl    %esi, %ebp
        jb      1f
        xorl    %ebp, %ebp
1:      shll    $4, %ebp
        addl    $SMP_MAILBOX_ADDR, %ebp
        movl    $1, %edi                # EDI: round r
2:      cmpl    %ecx, %edi
        ja      9f
        testl   %edx, %edx
        jnz     3f
        incl    SMP_VALUE_ADDR          # vCPU 0 starts the round
.if MODE == 64
        movl    %edi, (%rbp)
.else
        movl    %edi, %ds:(%ebp)        # DS: real mode's SS is this vCPU's stack
.endif
3:
.if MODE == 64
        movl    (%rbx), %eax
.else
        movl    (%ebx), %eax
.endif
        cmpl    %edi, %eax
        je      5f
        incl    %eax                    # only r - 1 may be seen before r
        cmpl    %edi, %eax
        je      4f
        movl    $1, SMP_FAIL_ADDR
4:      SPIN_PAUSE
        jmp     3b
5:      testl   %edx, %edx
        jz      6f
        incl    SMP_VALUE_ADDR          # forward
.if MODE == 64
        movl    %edi, (%rbp)
.else
        movl    %edi, %ds:(%ebp)
.endif
6:      incl    %edi
        jmp     2b
9:      SMP_FINISH
