# A shared counter under a spinlock, for N vCPUs running this one image.
# Inputs: ECX = n (increments per vCPU), EDX = cpu, ESI = ncpus (N).
# Each vCPU takes the lock (xchg, which is implicitly locked; `pause` while it
# waits), does a plain read-modify-write of the u32 at SMP_VALUE_ADDR, and
# releases it with a plain store (x86 stores are not reordered with earlier
# loads or stores). Then SMP_FINISH (smp.inc): the last vCPU to finish checks
# the counter == N * n; every vCPU writes the verdict to isa-debug-exit:
# value 0 (status 1) if it matched, 2 (status 5) if not.
        .include "common.inc"
        .include "smp.inc"
        movl    %ecx, %edi              # EDI: increments left
        testl   %edi, %edi
        jz      3f
1:      movl    $1, %eax
        xchgl   %eax, SMP_LOCK_ADDR
        testl   %eax, %eax
        jz      2f
4:      SPIN_PAUSE                      # taken: wait with plain reads until it looks free
        cmpl    $0, SMP_LOCK_ADDR
        jne     4b
        jmp     1b
2:      movl    SMP_VALUE_ADDR, %eax
        incl    %eax
        movl    %eax, SMP_VALUE_ADDR
        movl    $0, SMP_LOCK_ADDR
        decl    %edi
        jnz     1b
3:      SMP_FINISH
