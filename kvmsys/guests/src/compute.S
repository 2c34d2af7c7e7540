# xorshift32 (13, 17, 5) from COMPUTE_SEED, ECX = N rounds, no exits on the
# way. Then: result to RESULT_ADDR, 4-byte out to PORT_RESULT, debug-exit 0.
        .include "common.inc"
        movl    $COMPUTE_SEED, %eax
        jecxz   2f
1:      movl    %eax, %edx
        shll    $13, %edx
        xorl    %edx, %eax
        movl    %eax, %edx
        shrl    $17, %edx
        xorl    %edx, %eax
        movl    %eax, %edx
        shll    $5, %edx
        xorl    %edx, %eax
        decl    %ecx
        jnz     1b
2:      movl    %eax, RESULT_ADDR
        outl    %eax, $PORT_RESULT
        DONE
