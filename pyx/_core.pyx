# cython: language_level=3
"""kvmsys._core: the compiled core shared by both ABIs.

Kernel objects (system, VM, vCPU), the comm area, exits, the run loop and the
thread binding of the syscall-style ABI.  Policy and documentation live in
the Python package; this module checks every size, offset and id it is given.
"""
# Declarations of each concept live in their own .pxd, implementations in the
# matching .pyx; this module includes them all (one extension, like uvloop).
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from includes.kvm cimport *
from includes.posix cimport *

include "runstate.pxd"

from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

include "errors.pyx"
include "mapping.pyx"
include "weakrefs.pyx"
include "runstate.pyx"
include "signals.pyx"
include "system.pyx"
include "vm.pyx"
include "device.pyx"
include "exits.pyx"
include "ops.pyx"
include "syncregs.pyx"
include "vcpu.pyx"
include "binding.pyx"
include "caps.pyx"
include "kvmstats.pyx"

# Constants the Python layer needs, resolved from <linux/kvm.h> at build time.
H_KINDS = dict(PYTHON=H_PYTHON, SINK=H_SINK, CONST=H_CONST, IGNORE=H_IGNORE, EXIT=H_EXIT)
SPACES = dict(PIO=SPACE_PIO, MMIO=SPACE_MMIO, MSR=SPACE_MSR)
EXIT_REASONS = {name: num for num, name in _EXIT_NAMES.items()}
SYSTEM_EVENTS = dict(SHUTDOWN=KVM_SYSTEM_EVENT_SHUTDOWN, RESET=KVM_SYSTEM_EVENT_RESET,
                     CRASH=KVM_SYSTEM_EVENT_CRASH, WAKEUP=KVM_SYSTEM_EVENT_WAKEUP,
                     SUSPEND=KVM_SYSTEM_EVENT_SUSPEND, SEV_TERM=KVM_SYSTEM_EVENT_SEV_TERM)
MP_STATES = dict(RUNNABLE=KVM_MP_STATE_RUNNABLE, UNINITIALIZED=KVM_MP_STATE_UNINITIALIZED,
                 INIT_RECEIVED=KVM_MP_STATE_INIT_RECEIVED, HALTED=KVM_MP_STATE_HALTED,
                 SIPI_RECEIVED=KVM_MP_STATE_SIPI_RECEIVED, STOPPED=KVM_MP_STATE_STOPPED,
                 CHECK_STOP=KVM_MP_STATE_CHECK_STOP, OPERATING=KVM_MP_STATE_OPERATING,
                 LOAD=KVM_MP_STATE_LOAD, AP_RESET_HOLD=KVM_MP_STATE_AP_RESET_HOLD,
                 SUSPENDED=KVM_MP_STATE_SUSPENDED)
MSR_EXIT_REASONS = dict(INVAL=KVM_MSR_EXIT_REASON_INVAL, UNKNOWN=KVM_MSR_EXIT_REASON_UNKNOWN,
                        FILTER=KVM_MSR_EXIT_REASON_FILTER)
X2APIC_API = dict(USE_32BIT_IDS=KVM_X2APIC_API_USE_32BIT_IDS,
                  DISABLE_BROADCAST_QUIRK=KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK)
DEVICE_TYPES = dict(VFIO=KVM_DEV_TYPE_VFIO)
VFIO_ATTRS = dict(FILE=KVM_DEV_VFIO_GROUP, FILE_ADD=KVM_DEV_VFIO_GROUP_ADD, FILE_DEL=KVM_DEV_VFIO_GROUP_DEL)
DIRTY_LOG = dict(MANUAL_PROTECT_ENABLE=KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                 INITIALLY_SET=KVM_DIRTY_LOG_INITIALLY_SET)
IRQ_ROUTING = dict(IRQCHIP=KVM_IRQ_ROUTING_IRQCHIP, MSI=KVM_IRQ_ROUTING_MSI)
IRQCHIPS = dict(PIC_MASTER=KVM_IRQCHIP_PIC_MASTER, PIC_SLAVE=KVM_IRQCHIP_PIC_SLAVE,
                IOAPIC=KVM_IRQCHIP_IOAPIC)
HYPERCALLS = dict(MAP_GPA_RANGE=KVM_HC_MAP_GPA_RANGE)
MSR_FILTER = dict(READ=KVM_MSR_FILTER_READ, WRITE=KVM_MSR_FILTER_WRITE)
cdef kvm_run _layout_run
KVM_RUN_LAYOUT = dict(       # offsets in struct kvm_run, from the C header
    exit_reason=<size_t>(<char *>&_layout_run.exit_reason - <char *>&_layout_run),
    exit_union=<size_t>(<char *>&_layout_run.hw - <char *>&_layout_run),
    sync_regs=<size_t>(<char *>&_layout_run.s - <char *>&_layout_run))
cdef kvm_fpu _l_fpu
cdef kvm_vcpu_events _l_ev
cdef kvm_xcrs _l_xcrs
# sizes and a few field offsets of the state structs, from the C header: kvmsys.state's
# layouts are checked against these
STATE_LAYOUT = dict(
    fpu=sizeof(kvm_fpu), lapic=sizeof(kvm_lapic_state), vcpu_events=sizeof(kvm_vcpu_events),
    xsave=sizeof(kvm_xsave), xcrs=sizeof(kvm_xcrs),
    fpu_fcw=<size_t>(<char *>&_l_fpu.fcw - <char *>&_l_fpu),
    fpu_last_dp=<size_t>(<char *>&_l_fpu.last_dp - <char *>&_l_fpu),
    fpu_xmm=<size_t>(<char *>&_l_fpu.xmm - <char *>&_l_fpu),
    fpu_mxcsr=<size_t>(<char *>&_l_fpu.mxcsr - <char *>&_l_fpu),
    vcpu_events_sipi_vector=<size_t>(<char *>&_l_ev.sipi_vector - <char *>&_l_ev),
    vcpu_events_smi=<size_t>(<char *>&_l_ev.smi - <char *>&_l_ev),
    vcpu_events_exception_payload=<size_t>(<char *>&_l_ev.exception_payload - <char *>&_l_ev),
    xcrs_xcrs=<size_t>(<char *>&_l_xcrs.xcrs - <char *>&_l_xcrs))
MEM_FLAGS = dict(LOG_DIRTY_PAGES=KVM_MEM_LOG_DIRTY_PAGES, READONLY=KVM_MEM_READONLY, GUEST_MEMFD=KVM_MEM_GUEST_MEMFD)
GUEST_MEMFD_FLAGS = dict(MMAP=GUEST_MEMFD_FLAG_MMAP, INIT_SHARED=GUEST_MEMFD_FLAG_INIT_SHARED)
