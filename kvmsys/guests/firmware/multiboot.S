# A Multiboot (version 1) test kernel for kvmsys's loader: an a.out-kludge header (the
# load addresses are in the header), loaded at 1 MiB and entered in flat 32-bit protected
# mode.  It checks EAX, then reports on the debug console (port 0xe9):
#   "multiboot ok\n" <command line> "\n" <mem_upper, 8 hex digits> "\n"
#   and per module: <its command line> ":" <its bytes> "\n"
# and stops through isa-debug-exit with the module count ((count << 1) | 1), or with
# 0x7f if EAX did not hold the Multiboot magic.
# Build: python -m kvmsys.guests.build (as --32 -I. and objcopy -O binary -j .text)
    .include "debugcon.inc"
    .code32
    .text
    .include "multiboot.inc"
entry:
    mov     $end + BASE + 0x1000, %esp      # the bss page is the stack (Multiboot leaves ESP undefined)
    cmp     $0x2BADB002, %eax
    jne     bad
    mov     %ebx, %edi              # EDI: the Multiboot information
    mov     $msg_ok + BASE, %esi
    call    puts
    mov     16(%edi), %esi          # command line
    call    puts
    call    newline
    mov     8(%edi), %eax           # mem_upper (KiB above 1 MiB)
    call    puthex
    call    newline
    mov     20(%edi), %ecx          # mods_count
    mov     24(%edi), %ebx          # mods_addr
modules:
    test    %ecx, %ecx
    jz      finish
    mov     8(%ebx), %esi           # the module's command line
    call    puts
    mov     $':', %al
    out     %al, $DEBUGCON
    mov     0(%ebx), %esi           # mod_start
    mov     4(%ebx), %edx           # mod_end
bytes:
    cmp     %edx, %esi
    jae     1f
    lodsb
    out     %al, $DEBUGCON
    jmp     bytes
1:  call    newline
    add     $16, %ebx
    dec     %ecx
    jmp     modules
finish:
    mov     20(%edi), %eax
    out     %al, $DEBUG_EXIT
hang:
    hlt
    jmp     hang
bad:
    mov     $0x7F, %al
    out     %al, $DEBUG_EXIT
    jmp     hang
    PUTS
    NEWLINE
    PUTHEX                          # EAX as 8 hex digits
msg_ok:
    .asciz  "multiboot ok\n"
    .align  4
end:
