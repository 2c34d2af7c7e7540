# A minimal bzImage for testing kvmsys's Linux boot-protocol loader where no real kernel
# can run (on our PVM host a Linux kernel never leaves its decompressor): a setup header
# (boot protocol 2.15, 64-bit entry point) and a protected-mode part whose 64-bit entry
# (offset 0x200, at 1 MiB + 0x200) reports on the debug console (port 0xe9) what the
# loader passed in the zero page (RSI):
#   "linux boot ok\n" <command line> "\n" <the initrd's bytes> "\n"
# and stops through isa-debug-exit with the number of e820 entries.
# Build: python -m kvmsys.guests.build (as --64 -I. and objcopy -O binary -j .text)
    .include "debugcon.inc"
    .text
    .org    0x1F1
    .byte   1                   # setup_sects: boot sector + 1 setup sector
    .word   0                   # root_flags
    .long   0                   # syssize
    .word   0, 0, 0             # ram_size, vid_mode, root_dev
    .word   0xAA55              # boot_flag
    .byte   0xEB, 0x6A          # jump; 0x202 + 0x6A = the end of the setup header
    .ascii  "HdrS"
    .word   0x020F              # boot protocol 2.15
    .long   0                   # realmode_swtch
    .word   0, 0                # start_sys_seg, kernel_version
    .byte   0                   # type_of_loader (the loader writes it)
    .byte   0x01                # loadflags: LOADED_HIGH
    .word   0                   # setup_move_size
    .long   0x100000            # code32_start
    .long   0, 0, 0             # ramdisk_image, ramdisk_size, bootsect_kludge
    .word   0                   # heap_end_ptr
    .byte   0, 0                # ext_loader_ver, ext_loader_type
    .long   0                   # cmd_line_ptr
    .long   0x7FFFFFFF          # initrd_addr_max
    .long   0x200000            # kernel_alignment
    .byte   0, 0                # relocatable_kernel, min_alignment
    .word   0x0001              # xloadflags: XLF_KERNEL_64
    .long   2047                # cmdline_size
    .org    0x400               # the protected-mode kernel (setup_sects + 1 sectors in)
pm32:
    hlt                         # the 32-bit entry: kvmsys uses the 64-bit one
    jmp     pm32
    .org    0x400 + 0x200
    .code64
entry64:
    mov     %rsi, %rbx          # RBX: the zero page
    lea     msg_ok(%rip), %rsi
    call    puts
    mov     0x228(%rbx), %esi   # cmd_line_ptr
    call    puts
    call    newline
    mov     0x218(%rbx), %esi   # ramdisk_image
    mov     0x21C(%rbx), %ecx   # ramdisk_size
1:  test    %ecx, %ecx
    jz      2f
    lodsb
    out     %al, $DEBUGCON
    dec     %ecx
    jmp     1b
2:  call    newline
    movzbl  0x1E8(%rbx), %eax   # e820_entries
    out     %al, $DEBUG_EXIT
hang:
    hlt
    jmp     hang
    PUTS
    NEWLINE
msg_ok:
    .asciz  "linux boot ok\n"
