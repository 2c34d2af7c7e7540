# Cython declarations of the Linux KVM userspace ABI (x86_64), from
# <linux/kvm.h> and the <asm/kvm.h> it includes.
#
# Every name is the kernel's own, so the C compiler resolves each value and
# layout from the system headers; no numeric value is typed here (array
# lengths only).  Cython never computes layout for these extern types:
# sizeof(), offsets and field accesses are all emitted as C against the real
# header definitions.
#
# Constants are `enum:` (Cython `int`).  ioctl request numbers are declared as
# `const unsigned long` instead: _IOR/_IOWR numbers have bit 31 set, and an
# `enum:` (int) constant converts to a *negative* Python int.  Used from C
# (ioctl(fd, KVM_GET_MSRS, p)) both forms emit the bare macro.
#
# Anonymous members.  C anonymous unions (kvm_run's exit union,
# kvm_irq_level's irq/status, ...) are declared as plain fields of the outer
# struct: Cython emits `run->io.port`, which is what C expects.  Anonymous
# struct/union *types* get Cython-side names of the form `_<struct>_<member>`
# (e.g. `_kvm_run_io`).  These names do not exist in C; each is bound to the
# C type expression `__typeof__(((struct X *)0)->member)` (GCC/Clang), so
# sizeof() and struct-to-dict conversion work.  Prefer field access through a
# pointer (run.io.port); do not rely on these names as a public C type.
#
# Flexible array members (kvm_msrs.entries, kvm_msr_list.indices,
# kvm_cpuid2.entries, kvm_irq_routing.entries, kvm_coalesced_mmio_ring
# .coalesced_mmio, kvm_xsave.extra, kvm_signal_mask.sigset,
# kvm_stats_desc.name) are declared as `[0]` arrays.  sizeof(struct) is the C
# one (header only, without the tail) and, for every struct here, equals the
# offset of the flexible member.  Allocate sizeof(hdr) + n * sizeof(elem) and
# index either way:
#     p.entries[i]                                            # emits p->entries[i]
#     (<kvm_msr_entry *>(<char *>p + sizeof(kvm_msrs)))[i]    # equivalent
from libc.stdint cimport (
    uint8_t, uint16_t, uint32_t, uint64_t, int16_t, int32_t, int64_t,
)

cdef extern from "linux/kvm.h" nogil:

    # ------------------------------------------------------------------
    # Kernel integer types (<linux/types.h>)
    # ------------------------------------------------------------------
    ctypedef uint8_t __u8
    ctypedef uint16_t __u16
    ctypedef uint32_t __u32
    ctypedef uint64_t __u64
    ctypedef int16_t __s16
    ctypedef int32_t __s32
    ctypedef int64_t __s64

    # ------------------------------------------------------------------
    # API version, mmap offsets, sizes
    # ------------------------------------------------------------------
    enum: KVM_API_VERSION
    enum: KVM_PIO_PAGE_OFFSET            # pages into the vCPU mmap
    enum: KVM_COALESCED_MMIO_PAGE_OFFSET
    enum: KVM_DIRTY_LOG_PAGE_OFFSET
    enum: KVM_NR_INTERRUPTS
    enum: KVM_APIC_REG_SIZE
    enum: KVM_MAX_XCRS
    enum: KVM_IOAPIC_NUM_PINS
    enum: SYNC_REGS_SIZE_BYTES

    # ------------------------------------------------------------------
    # ioctls on the /dev/kvm (system) fd
    # ------------------------------------------------------------------
    const unsigned long KVM_GET_API_VERSION
    const unsigned long KVM_CREATE_VM
    const unsigned long KVM_GET_MSR_INDEX_LIST
    const unsigned long KVM_GET_MSR_FEATURE_INDEX_LIST
    const unsigned long KVM_CHECK_EXTENSION        # also valid on VM fds
    const unsigned long KVM_GET_VCPU_MMAP_SIZE
    const unsigned long KVM_GET_SUPPORTED_CPUID
    const unsigned long KVM_GET_EMULATED_CPUID

    # ------------------------------------------------------------------
    # ioctls on a VM fd
    # ------------------------------------------------------------------
    const unsigned long KVM_CREATE_VCPU
    const unsigned long KVM_GET_DIRTY_LOG
    const unsigned long KVM_CLEAR_DIRTY_LOG
    const unsigned long KVM_SET_USER_MEMORY_REGION
    const unsigned long KVM_SET_TSS_ADDR
    const unsigned long KVM_SET_IDENTITY_MAP_ADDR
    const unsigned long KVM_CREATE_IRQCHIP
    const unsigned long KVM_GET_IRQCHIP
    const unsigned long KVM_SET_IRQCHIP
    const unsigned long KVM_IRQ_LINE
    const unsigned long KVM_IRQ_LINE_STATUS
    const unsigned long KVM_SET_GSI_ROUTING
    const unsigned long KVM_CREATE_PIT2
    const unsigned long KVM_GET_PIT2
    const unsigned long KVM_SET_PIT2
    const unsigned long KVM_SIGNAL_MSI
    const unsigned long KVM_IOEVENTFD
    const unsigned long KVM_IRQFD
    const unsigned long KVM_REGISTER_COALESCED_MMIO
    const unsigned long KVM_UNREGISTER_COALESCED_MMIO
    const unsigned long KVM_GET_CLOCK
    const unsigned long KVM_SET_CLOCK
    const unsigned long KVM_RESET_DIRTY_RINGS
    const unsigned long KVM_ENABLE_CAP             # VM and vCPU fds
    const unsigned long KVM_GET_STATS_FD           # VM and vCPU fds

    # ------------------------------------------------------------------
    # ioctls on a vCPU fd
    # ------------------------------------------------------------------
    const unsigned long KVM_RUN
    const unsigned long KVM_GET_REGS
    const unsigned long KVM_SET_REGS
    const unsigned long KVM_GET_SREGS
    const unsigned long KVM_SET_SREGS
    const unsigned long KVM_GET_SREGS2
    const unsigned long KVM_SET_SREGS2
    const unsigned long KVM_GET_FPU
    const unsigned long KVM_SET_FPU
    const unsigned long KVM_GET_MSRS
    const unsigned long KVM_SET_MSRS
    const unsigned long KVM_SET_CPUID2
    const unsigned long KVM_GET_CPUID2
    const unsigned long KVM_GET_LAPIC
    const unsigned long KVM_SET_LAPIC
    const unsigned long KVM_GET_MP_STATE
    const unsigned long KVM_SET_MP_STATE
    const unsigned long KVM_GET_VCPU_EVENTS
    const unsigned long KVM_SET_VCPU_EVENTS
    const unsigned long KVM_GET_XSAVE
    const unsigned long KVM_GET_XSAVE2
    const unsigned long KVM_SET_XSAVE
    const unsigned long KVM_GET_XCRS
    const unsigned long KVM_SET_XCRS
    const unsigned long KVM_GET_DEBUGREGS
    const unsigned long KVM_SET_DEBUGREGS
    const unsigned long KVM_SET_GUEST_DEBUG
    const unsigned long KVM_INTERRUPT
    const unsigned long KVM_NMI
    const unsigned long KVM_SMI
    const unsigned long KVM_TRANSLATE
    const unsigned long KVM_SET_SIGNAL_MASK
    const unsigned long KVM_GET_TSC_KHZ
    const unsigned long KVM_SET_TSC_KHZ
    const unsigned long KVM_KVMCLOCK_CTRL

    # ------------------------------------------------------------------
    # x86 register state (vCPU)
    # ------------------------------------------------------------------
    cdef struct kvm_regs:
        __u64 rax, rbx, rcx, rdx
        __u64 rsi, rdi, rsp, rbp
        __u64 r8, r9, r10, r11
        __u64 r12, r13, r14, r15
        __u64 rip, rflags

    cdef struct kvm_segment:
        __u64 base
        __u32 limit
        __u16 selector
        __u8 type
        __u8 present, dpl, db, s, l, g, avl
        __u8 unusable
        __u8 padding

    cdef struct kvm_dtable:
        __u64 base
        __u16 limit
        __u16 padding[3]

    cdef struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss
        kvm_segment tr, ldt
        kvm_dtable gdt, idt
        __u64 cr0, cr2, cr3, cr4, cr8
        __u64 efer
        __u64 apic_base
        __u64 interrupt_bitmap[4]      # (KVM_NR_INTERRUPTS + 63) / 64

    cdef struct kvm_sregs2:
        kvm_segment cs, ds, es, fs, gs, ss
        kvm_segment tr, ldt
        kvm_dtable gdt, idt
        __u64 cr0, cr2, cr3, cr4, cr8
        __u64 efer
        __u64 apic_base
        __u64 flags
        __u64 pdptrs[4]

    enum: KVM_SREGS2_FLAGS_PDPTRS_VALID

    cdef struct kvm_fpu:
        __u8 fpr[8][16]
        __u16 fcw
        __u16 fsw
        __u8 ftwx                      # fxsave format
        __u8 pad1
        __u16 last_opcode
        __u64 last_ip
        __u64 last_dp
        __u8 xmm[16][16]
        __u32 mxcsr
        __u32 pad2

    cdef struct kvm_msr_entry:
        __u32 index
        __u32 reserved
        __u64 data

    cdef struct kvm_msrs:              # KVM_GET_MSRS / KVM_SET_MSRS
        __u32 nmsrs
        __u32 pad
        kvm_msr_entry entries[0]       # flexible array

    cdef struct kvm_msr_list:          # KVM_GET_MSR_INDEX_LIST
        __u32 nmsrs
        __u32 indices[0]               # flexible array

    cdef struct kvm_cpuid_entry2:
        __u32 function
        __u32 index
        __u32 flags
        __u32 eax
        __u32 ebx
        __u32 ecx
        __u32 edx
        __u32 padding[3]

    cdef struct kvm_cpuid2:            # KVM_{GET_SUPPORTED,SET,GET}_CPUID(2)
        __u32 nent
        __u32 padding
        kvm_cpuid_entry2 entries[0]    # flexible array

    enum: KVM_CPUID_FLAG_SIGNIFCANT_INDEX   # (sic) kernel spelling
    enum: KVM_CPUID_FLAG_STATEFUL_FUNC
    enum: KVM_CPUID_FLAG_STATE_READ_NEXT

    cdef struct kvm_lapic_state:
        char regs[1024]                # KVM_APIC_REG_SIZE

    cdef struct kvm_xsave:
        __u32 region[1024]
        __u32 extra[0]                 # flexible; KVM_GET_XSAVE2 size from KVM_CAP_XSAVE2

    cdef struct kvm_xcr:
        __u32 xcr
        __u32 reserved
        __u64 value

    cdef struct kvm_xcrs:
        __u32 nr_xcrs
        __u32 flags
        kvm_xcr xcrs[16]               # KVM_MAX_XCRS
        __u64 padding[16]

    cdef struct kvm_debugregs:
        __u64 db[4]
        __u64 dr6
        __u64 dr7
        __u64 flags
        __u64 reserved[9]

    cdef struct kvm_mp_state:
        __u32 mp_state

    cdef struct kvm_interrupt:         # KVM_INTERRUPT
        __u32 irq

    cdef struct kvm_translation:       # KVM_TRANSLATE
        __u64 linear_address
        __u64 physical_address
        __u8 valid
        __u8 writeable
        __u8 usermode
        __u8 pad[5]

    cdef struct kvm_signal_mask:       # KVM_SET_SIGNAL_MASK
        __u32 len
        __u8 sigset[0]                 # flexible array

    # kvm_vcpu_events: anonymous nested struct types (Cython-side names)
    ctypedef struct _kvm_vcpu_events_exception "__typeof__(((struct kvm_vcpu_events *)0)->exception)":
        __u8 injected
        __u8 nr
        __u8 has_error_code
        __u8 pending
        __u32 error_code

    ctypedef struct _kvm_vcpu_events_interrupt "__typeof__(((struct kvm_vcpu_events *)0)->interrupt)":
        __u8 injected
        __u8 nr
        __u8 soft
        __u8 shadow

    ctypedef struct _kvm_vcpu_events_nmi "__typeof__(((struct kvm_vcpu_events *)0)->nmi)":
        __u8 injected
        __u8 pending
        __u8 masked
        __u8 pad

    ctypedef struct _kvm_vcpu_events_smi "__typeof__(((struct kvm_vcpu_events *)0)->smi)":
        __u8 smm
        __u8 pending
        __u8 smm_inside_nmi
        __u8 latched_init

    ctypedef struct _kvm_vcpu_events_triple_fault "__typeof__(((struct kvm_vcpu_events *)0)->triple_fault)":
        __u8 pending

    cdef struct kvm_vcpu_events:
        _kvm_vcpu_events_exception exception
        _kvm_vcpu_events_interrupt interrupt
        _kvm_vcpu_events_nmi nmi
        __u32 sipi_vector
        __u32 flags                    # KVM_VCPUEVENT_VALID_*
        _kvm_vcpu_events_smi smi
        _kvm_vcpu_events_triple_fault triple_fault
        __u8 reserved[26]
        __u8 exception_has_payload
        __u64 exception_payload

    enum: KVM_VCPUEVENT_VALID_NMI_PENDING
    enum: KVM_VCPUEVENT_VALID_SIPI_VECTOR
    enum: KVM_VCPUEVENT_VALID_SHADOW
    enum: KVM_VCPUEVENT_VALID_SMM
    enum: KVM_VCPUEVENT_VALID_PAYLOAD
    enum: KVM_VCPUEVENT_VALID_TRIPLE_FAULT
    enum: KVM_X86_SHADOW_INT_MOV_SS
    enum: KVM_X86_SHADOW_INT_STI

    cdef struct kvm_sync_regs:         # kvm_run.s.regs (KVM_CAP_SYNC_REGS)
        kvm_regs regs
        kvm_sregs sregs
        kvm_vcpu_events events

    enum: KVM_SYNC_X86_REGS
    enum: KVM_SYNC_X86_SREGS
    enum: KVM_SYNC_X86_EVENTS
    enum: KVM_SYNC_X86_VALID_FIELDS

    # ------------------------------------------------------------------
    # Guest debug
    # ------------------------------------------------------------------
    cdef struct kvm_debug_exit_arch:
        __u32 exception
        __u32 pad
        __u64 pc
        __u64 dr6
        __u64 dr7

    cdef struct kvm_guest_debug_arch:
        __u64 debugreg[8]

    cdef struct kvm_guest_debug:       # KVM_SET_GUEST_DEBUG
        __u32 control                  # KVM_GUESTDBG_*
        __u32 pad
        kvm_guest_debug_arch arch

    enum: KVM_GUESTDBG_ENABLE
    enum: KVM_GUESTDBG_SINGLESTEP
    enum: KVM_GUESTDBG_USE_SW_BP
    enum: KVM_GUESTDBG_USE_HW_BP
    enum: KVM_GUESTDBG_INJECT_DB
    enum: KVM_GUESTDBG_INJECT_BP
    enum: KVM_GUESTDBG_BLOCKIRQ

    # x86 exception vectors (asm/kvm.h)
    enum: DE_VECTOR
    enum: DB_VECTOR
    enum: BP_VECTOR
    enum: OF_VECTOR
    enum: BR_VECTOR
    enum: UD_VECTOR
    enum: NM_VECTOR
    enum: DF_VECTOR
    enum: TS_VECTOR
    enum: NP_VECTOR
    enum: SS_VECTOR
    enum: GP_VECTOR
    enum: PF_VECTOR
    enum: MF_VECTOR
    enum: AC_VECTOR
    enum: MC_VECTOR
    enum: XM_VECTOR
    enum: VE_VECTOR

    # ------------------------------------------------------------------
    # VM: memory, dirty logging
    # ------------------------------------------------------------------
    cdef struct kvm_userspace_memory_region:
        __u32 slot
        __u32 flags                    # KVM_MEM_*
        __u64 guest_phys_addr
        __u64 memory_size
        __u64 userspace_addr

    enum: KVM_MEM_LOG_DIRTY_PAGES
    enum: KVM_MEM_READONLY

    cdef struct kvm_dirty_log:         # KVM_GET_DIRTY_LOG
        __u32 slot
        __u32 padding1
        void *dirty_bitmap             # anonymous union with __u64 padding2

    cdef struct kvm_clear_dirty_log:   # KVM_CLEAR_DIRTY_LOG
        __u32 slot
        __u32 num_pages
        __u64 first_page
        void *dirty_bitmap             # anonymous union with __u64 padding2

    enum: KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    enum: KVM_DIRTY_LOG_INITIALLY_SET

    cdef struct kvm_dirty_gfn:         # dirty-ring entry
        __u32 flags
        __u32 slot
        __u64 offset

    enum: KVM_DIRTY_GFN_F_DIRTY
    enum: KVM_DIRTY_GFN_F_RESET
    enum: KVM_DIRTY_GFN_F_MASK

    # ------------------------------------------------------------------
    # VM: coalesced MMIO / PIO
    # ------------------------------------------------------------------
    cdef struct kvm_coalesced_mmio_zone:
        __u64 addr
        __u32 size
        __u32 pad                      # anonymous union {pad, pio}
        __u32 pio

    cdef struct kvm_coalesced_mmio:
        __u64 phys_addr
        __u32 len
        __u32 pad                      # anonymous union {pad, pio}
        __u32 pio
        __u8 data[8]

    cdef struct kvm_coalesced_mmio_ring:   # at KVM_COALESCED_MMIO_PAGE_OFFSET
        __u32 first, last
        kvm_coalesced_mmio coalesced_mmio[0]   # flexible array

    # ------------------------------------------------------------------
    # VM: interrupts (irqchip, lines, MSI, routing, irqfd, ioeventfd, PIT)
    # ------------------------------------------------------------------
    cdef struct kvm_irq_level:         # KVM_IRQ_LINE(_STATUS)
        __u32 irq                      # anonymous union {irq, status}
        __s32 status
        __u32 level

    cdef struct kvm_pic_state:
        __u8 last_irr
        __u8 irr
        __u8 imr
        __u8 isr
        __u8 priority_add
        __u8 irq_base
        __u8 read_reg_select
        __u8 poll
        __u8 special_mask
        __u8 init_state
        __u8 auto_eoi
        __u8 rotate_on_auto_eoi
        __u8 special_fully_nested_mode
        __u8 init4
        __u8 elcr
        __u8 elcr_mask

    # redirtbl entry: the bit-field view (.fields) is omitted; use .bits
    ctypedef union _kvm_ioapic_state_redirtbl "__typeof__(((struct kvm_ioapic_state *)0)->redirtbl[0])":
        __u64 bits

    cdef struct kvm_ioapic_state:
        __u64 base_address
        __u32 ioregsel
        __u32 id
        __u32 irr
        __u32 pad
        _kvm_ioapic_state_redirtbl redirtbl[24]   # KVM_IOAPIC_NUM_PINS

    ctypedef union _kvm_irqchip_chip "__typeof__(((struct kvm_irqchip *)0)->chip)":
        char dummy[512]
        kvm_pic_state pic
        kvm_ioapic_state ioapic

    cdef struct kvm_irqchip:           # KVM_GET_IRQCHIP / KVM_SET_IRQCHIP
        __u32 chip_id                  # KVM_IRQCHIP_*
        __u32 pad
        _kvm_irqchip_chip chip

    enum: KVM_IRQCHIP_PIC_MASTER
    enum: KVM_IRQCHIP_PIC_SLAVE
    enum: KVM_IRQCHIP_IOAPIC
    enum: KVM_NR_IRQCHIPS

    cdef struct kvm_msi:               # KVM_SIGNAL_MSI
        __u32 address_lo
        __u32 address_hi
        __u32 data
        __u32 flags
        __u32 devid
        __u8 pad[12]

    enum: KVM_MSI_VALID_DEVID

    cdef struct kvm_irq_routing_irqchip:
        __u32 irqchip
        __u32 pin

    cdef struct kvm_irq_routing_msi:
        __u32 address_lo
        __u32 address_hi
        __u32 data
        __u32 pad                      # anonymous union {pad, devid}
        __u32 devid

    ctypedef union _kvm_irq_routing_entry_u "__typeof__(((struct kvm_irq_routing_entry *)0)->u)":
        kvm_irq_routing_irqchip irqchip
        kvm_irq_routing_msi msi
        __u32 pad[8]                   # s390/hv/xen members omitted

    cdef struct kvm_irq_routing_entry:
        __u32 gsi
        __u32 type                     # KVM_IRQ_ROUTING_*
        __u32 flags
        __u32 pad
        _kvm_irq_routing_entry_u u

    cdef struct kvm_irq_routing:       # KVM_SET_GSI_ROUTING
        __u32 nr
        __u32 flags
        kvm_irq_routing_entry entries[0]   # flexible array

    enum: KVM_IRQ_ROUTING_IRQCHIP
    enum: KVM_IRQ_ROUTING_MSI

    # ------------------------------------------------------------------
    # VM: MSR filter (KVM_CAP_X86_MSR_FILTER, <asm/kvm.h>)
    # ------------------------------------------------------------------
    cdef struct kvm_msr_filter_range:
        __u32 flags                    # KVM_MSR_FILTER_READ / _WRITE
        __u32 nmsrs
        __u32 base
        __u8 *bitmap                   # 1 allows, 0 denies (exits to user space)

    cdef struct kvm_msr_filter:
        __u32 flags                    # KVM_MSR_FILTER_DEFAULT_*
        kvm_msr_filter_range ranges[16]    # KVM_MSR_FILTER_MAX_RANGES

    enum: KVM_MSR_FILTER_MAX_RANGES
    enum: KVM_MSR_FILTER_MAX_BITMAP_SIZE
    enum: KVM_MSR_FILTER_READ
    enum: KVM_MSR_FILTER_WRITE
    enum: KVM_MSR_FILTER_DEFAULT_ALLOW
    enum: KVM_MSR_FILTER_DEFAULT_DENY
    const unsigned long KVM_X86_SET_MSR_FILTER

    # ------------------------------------------------------------------
    # VM: devices (KVM_CREATE_DEVICE) and their attribute ioctls
    # ------------------------------------------------------------------
    cdef struct kvm_create_device:
        __u32 type                     # KVM_DEV_TYPE_*
        __u32 fd                       # out
        __u32 flags                    # KVM_CREATE_DEVICE_TEST

    cdef struct kvm_device_attr:
        __u32 flags
        __u32 group
        __u64 attr
        __u64 addr                     # user address of the attribute's data

    enum: KVM_CREATE_DEVICE_TEST
    enum: KVM_DEV_TYPE_VFIO
    enum: KVM_DEV_VFIO_GROUP           # = KVM_DEV_VFIO_FILE in newer headers
    enum: KVM_DEV_VFIO_GROUP_ADD
    enum: KVM_DEV_VFIO_GROUP_DEL
    const unsigned long KVM_CREATE_DEVICE
    const unsigned long KVM_SET_DEVICE_ATTR
    const unsigned long KVM_GET_DEVICE_ATTR
    const unsigned long KVM_HAS_DEVICE_ATTR

    # ------------------------------------------------------------------
    # vCPU: nested virtualization state (header only; data follows)
    # ------------------------------------------------------------------
    cdef struct kvm_nested_state:
        __u16 flags
        __u16 format
        __u32 size                     # of the whole blob, header included

    const unsigned long KVM_GET_NESTED_STATE
    const unsigned long KVM_SET_NESTED_STATE

    cdef struct kvm_irqfd:             # KVM_IRQFD
        __u32 fd
        __u32 gsi
        __u32 flags                    # KVM_IRQFD_FLAG_*
        __u32 resamplefd
        __u8 pad[16]

    enum: KVM_IRQFD_FLAG_DEASSIGN
    enum: KVM_IRQFD_FLAG_RESAMPLE

    cdef struct kvm_ioeventfd:         # KVM_IOEVENTFD
        __u64 datamatch
        __u64 addr
        __u32 len
        __s32 fd
        __u32 flags                    # KVM_IOEVENTFD_FLAG_*
        __u8 pad[36]

    enum: KVM_IOEVENTFD_FLAG_DATAMATCH
    enum: KVM_IOEVENTFD_FLAG_PIO
    enum: KVM_IOEVENTFD_FLAG_DEASSIGN
    enum: KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY
    enum: KVM_IOEVENTFD_VALID_FLAG_MASK

    cdef struct kvm_pit_config:        # KVM_CREATE_PIT2
        __u32 flags                    # KVM_PIT_SPEAKER_DUMMY
        __u32 pad[15]

    enum: KVM_PIT_SPEAKER_DUMMY

    cdef struct kvm_pit_channel_state:
        __u32 count
        __u16 latched_count
        __u8 count_latched
        __u8 status_latched
        __u8 status
        __u8 read_state
        __u8 write_state
        __u8 write_latch
        __u8 rw_mode
        __u8 mode
        __u8 bcd
        __u8 gate
        __s64 count_load_time

    cdef struct kvm_pit_state2:        # KVM_GET_PIT2 / KVM_SET_PIT2
        kvm_pit_channel_state channels[3]
        __u32 flags
        __u32 reserved[9]

    enum: KVM_PIT_FLAGS_HPET_LEGACY
    enum: KVM_PIT_FLAGS_SPEAKER_DATA_ON

    # ------------------------------------------------------------------
    # VM: misc (enable_cap, clock, stats)
    # ------------------------------------------------------------------
    cdef struct kvm_enable_cap:        # KVM_ENABLE_CAP
        __u32 cap
        __u32 flags
        __u64 args[4]
        __u8 pad[64]

    cdef struct kvm_clock_data:        # KVM_GET_CLOCK / KVM_SET_CLOCK
        __u64 clock
        __u32 flags
        __u32 pad0
        __u64 realtime
        __u64 host_tsc
        __u32 pad[4]

    enum: KVM_CLOCK_TSC_STABLE
    enum: KVM_CLOCK_REALTIME
    enum: KVM_CLOCK_HOST_TSC

    cdef struct kvm_stats_header:      # read at offset 0 of a stats fd
        __u32 flags
        __u32 name_size
        __u32 num_desc
        __u32 id_offset
        __u32 desc_offset
        __u32 data_offset

    cdef struct kvm_stats_desc:        # stride: sizeof + header.name_size
        __u32 flags
        __s16 exponent
        __u16 size
        __u32 offset
        __u32 bucket_size
        char name[0]                   # flexible array

    enum: KVM_STATS_TYPE_SHIFT
    enum: KVM_STATS_TYPE_MASK
    enum: KVM_STATS_TYPE_CUMULATIVE
    enum: KVM_STATS_TYPE_INSTANT
    enum: KVM_STATS_TYPE_PEAK
    enum: KVM_STATS_TYPE_LINEAR_HIST
    enum: KVM_STATS_TYPE_LOG_HIST
    enum: KVM_STATS_UNIT_SHIFT
    enum: KVM_STATS_UNIT_MASK
    enum: KVM_STATS_UNIT_NONE
    enum: KVM_STATS_UNIT_BYTES
    enum: KVM_STATS_UNIT_SECONDS
    enum: KVM_STATS_UNIT_CYCLES
    enum: KVM_STATS_UNIT_BOOLEAN
    enum: KVM_STATS_BASE_SHIFT
    enum: KVM_STATS_BASE_MASK
    enum: KVM_STATS_BASE_POW10
    enum: KVM_STATS_BASE_POW2

    # ------------------------------------------------------------------
    # kvm_run (mmap of the vCPU fd at offset 0) and exit payloads
    # ------------------------------------------------------------------
    # Cython-side names for the anonymous per-exit structs; see top comment.
    ctypedef struct _kvm_run_hw "__typeof__(((struct kvm_run *)0)->hw)":
        __u64 hardware_exit_reason

    ctypedef struct _kvm_run_fail_entry "__typeof__(((struct kvm_run *)0)->fail_entry)":
        __u64 hardware_entry_failure_reason
        __u32 cpu

    ctypedef struct _kvm_run_ex "__typeof__(((struct kvm_run *)0)->ex)":
        __u32 exception
        __u32 error_code

    ctypedef struct _kvm_run_io "__typeof__(((struct kvm_run *)0)->io)":
        __u8 direction                 # KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT
        __u8 size                      # bytes
        __u16 port
        __u32 count
        __u64 data_offset              # relative to the kvm_run start

    ctypedef struct _kvm_run_debug "__typeof__(((struct kvm_run *)0)->debug)":
        kvm_debug_exit_arch arch

    ctypedef struct _kvm_run_mmio "__typeof__(((struct kvm_run *)0)->mmio)":
        __u64 phys_addr
        __u8 data[8]
        __u32 len
        __u8 is_write

    ctypedef struct _kvm_run_hypercall "__typeof__(((struct kvm_run *)0)->hypercall)":
        __u64 nr
        __u64 args[6]
        __u64 ret
        __u32 longmode
        __u32 pad

    ctypedef struct _kvm_run_tpr_access "__typeof__(((struct kvm_run *)0)->tpr_access)":
        __u64 rip
        __u32 is_write
        __u32 pad

    ctypedef struct _kvm_run_internal "__typeof__(((struct kvm_run *)0)->internal)":
        __u32 suberror                 # KVM_INTERNAL_ERROR_*
        __u32 ndata
        __u64 data[16]

    # overlay of `internal` for KVM_INTERNAL_ERROR_EMULATION
    ctypedef struct _kvm_run_emulation_failure "__typeof__(((struct kvm_run *)0)->emulation_failure)":
        __u32 suberror
        __u32 ndata
        __u64 flags                    # KVM_INTERNAL_ERROR_EMULATION_FLAG_*
        __u8 insn_size                 # anonymous union/struct members
        __u8 insn_bytes[15]

    ctypedef struct _kvm_run_system_event "__typeof__(((struct kvm_run *)0)->system_event)":
        __u32 type                     # KVM_SYSTEM_EVENT_*
        __u32 ndata
        __u64 flags                    # anonymous union {flags, data[16]}
        __u64 data[16]

    ctypedef struct _kvm_run_eoi "__typeof__(((struct kvm_run *)0)->eoi)":
        __u8 vector

    ctypedef struct _kvm_run_msr "__typeof__(((struct kvm_run *)0)->msr)":
        __u8 error                     # user -> kernel
        __u8 pad[7]
        __u32 reason                   # KVM_MSR_EXIT_REASON_*
        __u32 index
        __u64 data

    ctypedef struct _kvm_run_notify "__typeof__(((struct kvm_run *)0)->notify)":
        __u32 flags                    # KVM_NOTIFY_CONTEXT_INVALID

    ctypedef union _kvm_run_s "__typeof__(((struct kvm_run *)0)->s)":
        kvm_sync_regs regs
        char padding[2048]             # SYNC_REGS_SIZE_BYTES

    cdef struct kvm_run:
        # in
        __u8 request_interrupt_window
        __u8 immediate_exit
        __u8 padding1[6]
        # out
        __u32 exit_reason              # KVM_EXIT_*
        __u8 ready_for_interrupt_injection
        __u8 if_flag
        __u16 flags                    # KVM_RUN_X86_*
        # in (pre-run) / out (post-run)
        __u64 cr8
        __u64 apic_base
        # anonymous union of exit payloads (x86-relevant members only)
        _kvm_run_hw hw
        _kvm_run_fail_entry fail_entry
        _kvm_run_ex ex
        _kvm_run_io io
        _kvm_run_debug debug
        _kvm_run_mmio mmio
        _kvm_run_hypercall hypercall
        _kvm_run_tpr_access tpr_access
        _kvm_run_internal internal
        _kvm_run_emulation_failure emulation_failure
        _kvm_run_system_event system_event
        _kvm_run_eoi eoi
        _kvm_run_msr msr
        _kvm_run_notify notify
        char padding[256]              # fixes the union's size
        # shared register sync (KVM_CAP_SYNC_REGS)
        __u64 kvm_valid_regs           # KVM_SYNC_X86_*
        __u64 kvm_dirty_regs
        _kvm_run_s s

    enum: KVM_RUN_X86_SMM
    enum: KVM_RUN_X86_BUS_LOCK

    # exit reasons (kvm_run.exit_reason)
    enum:
        KVM_EXIT_UNKNOWN
        KVM_EXIT_EXCEPTION
        KVM_EXIT_IO
        KVM_EXIT_HYPERCALL
        KVM_EXIT_DEBUG
        KVM_EXIT_HLT
        KVM_EXIT_MMIO
        KVM_EXIT_IRQ_WINDOW_OPEN
        KVM_EXIT_SHUTDOWN
        KVM_EXIT_FAIL_ENTRY
        KVM_EXIT_INTR
        KVM_EXIT_SET_TPR
        KVM_EXIT_TPR_ACCESS
        KVM_EXIT_S390_SIEIC
        KVM_EXIT_S390_RESET
        KVM_EXIT_DCR
        KVM_EXIT_NMI
        KVM_EXIT_INTERNAL_ERROR
        KVM_EXIT_OSI
        KVM_EXIT_PAPR_HCALL
        KVM_EXIT_S390_UCONTROL
        KVM_EXIT_WATCHDOG
        KVM_EXIT_S390_TSCH
        KVM_EXIT_EPR
        KVM_EXIT_SYSTEM_EVENT
        KVM_EXIT_S390_STSI
        KVM_EXIT_IOAPIC_EOI
        KVM_EXIT_HYPERV
        KVM_EXIT_ARM_NISV
        KVM_EXIT_X86_RDMSR
        KVM_EXIT_X86_WRMSR
        KVM_EXIT_DIRTY_RING_FULL
        KVM_EXIT_AP_RESET_HOLD
        KVM_EXIT_X86_BUS_LOCK
        KVM_EXIT_XEN
        KVM_EXIT_RISCV_SBI
        KVM_EXIT_RISCV_CSR
        KVM_EXIT_NOTIFY

    # io.direction
    enum: KVM_EXIT_IO_IN
    enum: KVM_EXIT_IO_OUT

    # internal.suberror
    enum: KVM_INTERNAL_ERROR_EMULATION
    enum: KVM_INTERNAL_ERROR_SIMUL_EX
    enum: KVM_INTERNAL_ERROR_DELIVERY_EV
    enum: KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
    enum: KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES

    # system_event.type
    enum: KVM_SYSTEM_EVENT_SHUTDOWN
    enum: KVM_SYSTEM_EVENT_RESET
    enum: KVM_SYSTEM_EVENT_CRASH
    enum: KVM_SYSTEM_EVENT_WAKEUP
    enum: KVM_SYSTEM_EVENT_SUSPEND
    enum: KVM_SYSTEM_EVENT_SEV_TERM

    # msr.reason
    enum: KVM_MSR_EXIT_REASON_INVAL
    enum: KVM_MSR_EXIT_REASON_UNKNOWN
    enum: KVM_MSR_EXIT_REASON_FILTER

    # notify.flags
    enum: KVM_NOTIFY_CONTEXT_INVALID

    # ------------------------------------------------------------------
    # Other constants
    # ------------------------------------------------------------------
    # kvm_mp_state.mp_state
    enum: KVM_MP_STATE_RUNNABLE
    enum: KVM_MP_STATE_UNINITIALIZED
    enum: KVM_MP_STATE_INIT_RECEIVED
    enum: KVM_MP_STATE_HALTED
    enum: KVM_MP_STATE_SIPI_RECEIVED
    enum: KVM_MP_STATE_STOPPED
    enum: KVM_MP_STATE_CHECK_STOP
    enum: KVM_MP_STATE_OPERATING
    enum: KVM_MP_STATE_LOAD
    enum: KVM_MP_STATE_AP_RESET_HOLD
    enum: KVM_MP_STATE_SUSPENDED

    # KVM_ENABLE_CAP arguments
    enum: KVM_X86_DISABLE_EXITS_MWAIT       # KVM_CAP_X86_DISABLE_EXITS
    enum: KVM_X86_DISABLE_EXITS_HLT
    enum: KVM_X86_DISABLE_EXITS_PAUSE
    enum: KVM_X86_DISABLE_EXITS_CSTATE
    enum: KVM_X86_DISABLE_VALID_EXITS
    enum: KVM_BUS_LOCK_DETECTION_OFF        # KVM_CAP_X86_BUS_LOCK_EXIT
    enum: KVM_BUS_LOCK_DETECTION_EXIT
    enum: KVM_X86_NOTIFY_VMEXIT_ENABLED     # KVM_CAP_X86_NOTIFY_VMEXIT
    enum: KVM_X86_NOTIFY_VMEXIT_USER
    enum: KVM_X2APIC_API_USE_32BIT_IDS      # KVM_CAP_X2APIC_API
    enum: KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK
    enum: KVM_PMU_CAP_DISABLE               # KVM_CAP_PMU_CAPABILITY

    # KVM_CHECK_EXTENSION capabilities (every KVM_CAP_* in this header)
    enum:
        KVM_CAP_IRQCHIP
        KVM_CAP_HLT
        KVM_CAP_MMU_SHADOW_CACHE_CONTROL
        KVM_CAP_USER_MEMORY
        KVM_CAP_SET_TSS_ADDR
        KVM_CAP_VAPIC
        KVM_CAP_EXT_CPUID
        KVM_CAP_CLOCKSOURCE
        KVM_CAP_NR_VCPUS
        KVM_CAP_NR_MEMSLOTS
        KVM_CAP_PIT
        KVM_CAP_NOP_IO_DELAY
        KVM_CAP_PV_MMU
        KVM_CAP_MP_STATE
        KVM_CAP_COALESCED_MMIO
        KVM_CAP_SYNC_MMU
        KVM_CAP_IOMMU
        KVM_CAP_DESTROY_MEMORY_REGION_WORKS
        KVM_CAP_USER_NMI
        KVM_CAP_SET_GUEST_DEBUG
        KVM_CAP_REINJECT_CONTROL
        KVM_CAP_IRQ_ROUTING
        KVM_CAP_IRQ_INJECT_STATUS
        KVM_CAP_ASSIGN_DEV_IRQ
        KVM_CAP_JOIN_MEMORY_REGIONS_WORKS
        KVM_CAP_MCE
        KVM_CAP_IRQFD
        KVM_CAP_PIT2
        KVM_CAP_SET_BOOT_CPU_ID
        KVM_CAP_PIT_STATE2
        KVM_CAP_IOEVENTFD
        KVM_CAP_SET_IDENTITY_MAP_ADDR
        KVM_CAP_XEN_HVM
        KVM_CAP_ADJUST_CLOCK
        KVM_CAP_INTERNAL_ERROR_DATA
        KVM_CAP_VCPU_EVENTS
        KVM_CAP_S390_PSW
        KVM_CAP_PPC_SEGSTATE
        KVM_CAP_HYPERV
        KVM_CAP_HYPERV_VAPIC
        KVM_CAP_HYPERV_SPIN
        KVM_CAP_PCI_SEGMENT
        KVM_CAP_PPC_PAIRED_SINGLES
        KVM_CAP_INTR_SHADOW
        KVM_CAP_DEBUGREGS
        KVM_CAP_X86_ROBUST_SINGLESTEP
        KVM_CAP_PPC_OSI
        KVM_CAP_PPC_UNSET_IRQ
        KVM_CAP_ENABLE_CAP
        KVM_CAP_XSAVE
        KVM_CAP_XCRS
        KVM_CAP_PPC_GET_PVINFO
        KVM_CAP_PPC_IRQ_LEVEL
        KVM_CAP_ASYNC_PF
        KVM_CAP_TSC_CONTROL
        KVM_CAP_GET_TSC_KHZ
        KVM_CAP_PPC_BOOKE_SREGS
        KVM_CAP_SPAPR_TCE
        KVM_CAP_PPC_SMT
        KVM_CAP_PPC_RMA
        KVM_CAP_MAX_VCPUS
        KVM_CAP_PPC_HIOR
        KVM_CAP_PPC_PAPR
        KVM_CAP_SW_TLB
        KVM_CAP_ONE_REG
        KVM_CAP_S390_GMAP
        KVM_CAP_TSC_DEADLINE_TIMER
        KVM_CAP_S390_UCONTROL
        KVM_CAP_SYNC_REGS
        KVM_CAP_PCI_2_3
        KVM_CAP_KVMCLOCK_CTRL
        KVM_CAP_SIGNAL_MSI
        KVM_CAP_PPC_GET_SMMU_INFO
        KVM_CAP_S390_COW
        KVM_CAP_PPC_ALLOC_HTAB
        KVM_CAP_READONLY_MEM
        KVM_CAP_IRQFD_RESAMPLE
        KVM_CAP_PPC_BOOKE_WATCHDOG
        KVM_CAP_PPC_HTAB_FD
        KVM_CAP_S390_CSS_SUPPORT
        KVM_CAP_PPC_EPR
        KVM_CAP_ARM_PSCI
        KVM_CAP_ARM_SET_DEVICE_ADDR
        KVM_CAP_DEVICE_CTRL
        KVM_CAP_IRQ_MPIC
        KVM_CAP_PPC_RTAS
        KVM_CAP_IRQ_XICS
        KVM_CAP_ARM_EL1_32BIT
        KVM_CAP_SPAPR_MULTITCE
        KVM_CAP_EXT_EMUL_CPUID
        KVM_CAP_HYPERV_TIME
        KVM_CAP_IOAPIC_POLARITY_IGNORED
        KVM_CAP_ENABLE_CAP_VM
        KVM_CAP_S390_IRQCHIP
        KVM_CAP_IOEVENTFD_NO_LENGTH
        KVM_CAP_VM_ATTRIBUTES
        KVM_CAP_ARM_PSCI_0_2
        KVM_CAP_PPC_FIXUP_HCALL
        KVM_CAP_PPC_ENABLE_HCALL
        KVM_CAP_CHECK_EXTENSION_VM
        KVM_CAP_S390_USER_SIGP
        KVM_CAP_S390_VECTOR_REGISTERS
        KVM_CAP_S390_MEM_OP
        KVM_CAP_S390_USER_STSI
        KVM_CAP_S390_SKEYS
        KVM_CAP_MIPS_FPU
        KVM_CAP_MIPS_MSA
        KVM_CAP_S390_INJECT_IRQ
        KVM_CAP_S390_IRQ_STATE
        KVM_CAP_PPC_HWRNG
        KVM_CAP_DISABLE_QUIRKS
        KVM_CAP_X86_SMM
        KVM_CAP_MULTI_ADDRESS_SPACE
        KVM_CAP_GUEST_DEBUG_HW_BPS
        KVM_CAP_GUEST_DEBUG_HW_WPS
        KVM_CAP_SPLIT_IRQCHIP
        KVM_CAP_IOEVENTFD_ANY_LENGTH
        KVM_CAP_HYPERV_SYNIC
        KVM_CAP_S390_RI
        KVM_CAP_SPAPR_TCE_64
        KVM_CAP_ARM_PMU_V3
        KVM_CAP_VCPU_ATTRIBUTES
        KVM_CAP_MAX_VCPU_ID
        KVM_CAP_X2APIC_API
        KVM_CAP_S390_USER_INSTR0
        KVM_CAP_MSI_DEVID
        KVM_CAP_PPC_HTM
        KVM_CAP_SPAPR_RESIZE_HPT
        KVM_CAP_PPC_MMU_RADIX
        KVM_CAP_PPC_MMU_HASH_V3
        KVM_CAP_IMMEDIATE_EXIT
        KVM_CAP_MIPS_VZ
        KVM_CAP_MIPS_TE
        KVM_CAP_MIPS_64BIT
        KVM_CAP_S390_GS
        KVM_CAP_S390_AIS
        KVM_CAP_SPAPR_TCE_VFIO
        KVM_CAP_X86_DISABLE_EXITS
        KVM_CAP_ARM_USER_IRQ
        KVM_CAP_S390_CMMA_MIGRATION
        KVM_CAP_PPC_FWNMI
        KVM_CAP_PPC_SMT_POSSIBLE
        KVM_CAP_HYPERV_SYNIC2
        KVM_CAP_HYPERV_VP_INDEX
        KVM_CAP_S390_AIS_MIGRATION
        KVM_CAP_PPC_GET_CPU_CHAR
        KVM_CAP_S390_BPB
        KVM_CAP_GET_MSR_FEATURES
        KVM_CAP_HYPERV_EVENTFD
        KVM_CAP_HYPERV_TLBFLUSH
        KVM_CAP_S390_HPAGE_1M
        KVM_CAP_NESTED_STATE
        KVM_CAP_ARM_INJECT_SERROR_ESR
        KVM_CAP_MSR_PLATFORM_INFO
        KVM_CAP_PPC_NESTED_HV
        KVM_CAP_HYPERV_SEND_IPI
        KVM_CAP_COALESCED_PIO
        KVM_CAP_HYPERV_ENLIGHTENED_VMCS
        KVM_CAP_EXCEPTION_PAYLOAD
        KVM_CAP_ARM_VM_IPA_SIZE
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT
        KVM_CAP_HYPERV_CPUID
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
        KVM_CAP_PPC_IRQ_XIVE
        KVM_CAP_ARM_SVE
        KVM_CAP_ARM_PTRAUTH_ADDRESS
        KVM_CAP_ARM_PTRAUTH_GENERIC
        KVM_CAP_PMU_EVENT_FILTER
        KVM_CAP_ARM_IRQ_LINE_LAYOUT_2
        KVM_CAP_HYPERV_DIRECT_TLBFLUSH
        KVM_CAP_PPC_GUEST_DEBUG_SSTEP
        KVM_CAP_ARM_NISV_TO_USER
        KVM_CAP_ARM_INJECT_EXT_DABT
        KVM_CAP_S390_VCPU_RESETS
        KVM_CAP_S390_PROTECTED
        KVM_CAP_PPC_SECURE_GUEST
        KVM_CAP_HALT_POLL
        KVM_CAP_ASYNC_PF_INT
        KVM_CAP_LAST_CPU
        KVM_CAP_SMALLER_MAXPHYADDR
        KVM_CAP_S390_DIAG318
        KVM_CAP_STEAL_TIME
        KVM_CAP_X86_USER_SPACE_MSR
        KVM_CAP_X86_MSR_FILTER
        KVM_CAP_ENFORCE_PV_FEATURE_CPUID
        KVM_CAP_SYS_HYPERV_CPUID
        KVM_CAP_DIRTY_LOG_RING
        KVM_CAP_X86_BUS_LOCK_EXIT
        KVM_CAP_PPC_DAWR1
        KVM_CAP_SET_GUEST_DEBUG2
        KVM_CAP_SGX_ATTRIBUTE
        KVM_CAP_VM_COPY_ENC_CONTEXT_FROM
        KVM_CAP_PTP_KVM
        KVM_CAP_HYPERV_ENFORCE_CPUID
        KVM_CAP_SREGS2
        KVM_CAP_EXIT_HYPERCALL
        KVM_CAP_PPC_RPT_INVALIDATE
        KVM_CAP_BINARY_STATS_FD
        KVM_CAP_EXIT_ON_EMULATION_FAILURE
        KVM_CAP_ARM_MTE
        KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
        KVM_CAP_VM_GPA_BITS
        KVM_CAP_XSAVE2
        KVM_CAP_SYS_ATTRIBUTES
        KVM_CAP_PPC_AIL_MODE_3
        KVM_CAP_S390_MEM_OP_EXTENSION
        KVM_CAP_PMU_CAPABILITY
        KVM_CAP_DISABLE_QUIRKS2
        KVM_CAP_VM_TSC_CONTROL
        KVM_CAP_SYSTEM_EVENT_DATA
        KVM_CAP_ARM_SYSTEM_SUSPEND
        KVM_CAP_S390_PROTECTED_DUMP
        KVM_CAP_X86_TRIPLE_FAULT_EVENT
        KVM_CAP_X86_NOTIFY_VMEXIT
        KVM_CAP_VM_DISABLE_NX_HUGE_PAGES
        KVM_CAP_S390_ZPCI_OP
        KVM_CAP_S390_CPU_TOPOLOGY
        KVM_CAP_DIRTY_LOG_RING_ACQ_REL


# Newer than some distributions' <linux/kvm.h> (Linux 6.8): kvmsys_native.h
# supplies the kernel's values where the installed header lacks them.
cdef extern from "kvmsys_native.h" nogil:
    enum: KVM_EXIT_MEMORY_FAULT
    enum: KVM_MEMORY_EXIT_FLAG_PRIVATE
    cdef struct kvmsys_memory_fault:
        __u64 flags
        __u64 gpa
        __u64 size
    kvmsys_memory_fault *kvmsys_run_memory_fault(kvm_run *run)
    # KVM_SET_USER_MEMORY_REGION2 and guest_memfd (Linux 6.8; guest_memfd flags 6.18)
    enum: KVM_CAP_USER_MEMORY2
    enum: KVM_CAP_GUEST_MEMFD
    enum: KVM_CAP_VM_TYPES
    enum: KVM_CAP_GUEST_MEMFD_FLAGS
    enum: KVM_MEM_GUEST_MEMFD
    const unsigned long long GUEST_MEMFD_FLAG_MMAP
    const unsigned long long GUEST_MEMFD_FLAG_INIT_SHARED
    const unsigned long KVM_SET_USER_MEMORY_REGION2
    const unsigned long KVM_CREATE_GUEST_MEMFD
    cdef struct kvm_userspace_memory_region2:
        __u32 slot
        __u32 flags
        __u64 guest_phys_addr
        __u64 memory_size
        __u64 userspace_addr
        __u64 guest_memfd_offset
        __u32 guest_memfd
        __u32 pad1
        __u64 pad2[14]
    cdef struct kvm_create_guest_memfd:
        __u64 size
        __u64 flags
        __u64 reserved[6]

cdef extern from "linux/kvm_para.h" nogil:
    enum: KVM_HC_MAP_GPA_RANGE         # hypercall numbers (KVM_CAP_EXIT_HYPERCALL bits)
