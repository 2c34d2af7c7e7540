"""Everything specific to the PVM flavour of KVM (our development and CI hosts).

On PVM, 64-bit guests run under KVM's instruction emulator unless MSR
0x4b564d10 is set to (page | 1) before the first KVM_RUN; MSR 0x4b564d11 reads
"PVM" there.  On an ordinary VT-x/AMD-V host neither MSR exists and nothing
here changes anything.  See shared/HOST-KVM.md.
"""
from __future__ import annotations

import os

from typing import TYPE_CHECKING

from .errors import ArgumentTypeError, InvalidArgumentError

if TYPE_CHECKING:
    from ._core import VcpuCore

MSR_PVM_NATIVE = 0x4B564D10   # write (page-aligned GPA in a memory slot) | 1
MSR_PVM_SIGNATURE = 0x4B564D11
PVM_SIGNATURE = 0x4D5650      # "PVM"
# In native mode KVM_SET_GUEST_DEBUG has no effect on PVM: single-step and hardware
# breakpoints reach the guest as its own #DB (measured 2026-11-30).  A debugged
# 64-bit guest stays under the emulator, where they end in KVM_EXIT_DEBUG.
NATIVE_GUEST_DEBUG = False


def module_loaded() -> bool:
    """True if the kvm_pvm module is loaded (no VM needed)."""
    return os.path.isdir("/sys/module/kvm_pvm")


def host_flavour() -> str:
    """'PVM', 'VT-x', 'AMD-V' or 'unknown', from the loaded KVM modules."""
    if module_loaded():
        return "PVM"
    if os.path.isdir("/sys/module/kvm_intel"):
        return "VT-x"
    if os.path.isdir("/sys/module/kvm_amd"):
        return "AMD-V"
    return "unknown"


_host_is_pvm: bool | None = None     # the first vCPU's answer: the host does not change


def is_pvm(vcpu: VcpuCore) -> bool:
    """True if *vcpu* runs on a PVM host (its signature MSR reads 'PVM').  Asked of the
    first vCPU that answers, once per process (a vCPU ioctl, ~10 µs here, that every
    state capture and 64-bit guest load would otherwise pay)."""
    global _host_is_pvm
    if _host_is_pvm is None:
        try:
            _host_is_pvm = vcpu.get_msrs([MSR_PVM_SIGNATURE]).get(MSR_PVM_SIGNATURE) == PVM_SIGNATURE
        except OSError:
            return False
    return _host_is_pvm


def extra_msrs(vcpu: VcpuCore) -> list[int]:
    """MSRs of this host flavour to save and restore with a vCPU's state (not in KVM's list)."""
    return [MSR_PVM_NATIVE] if is_pvm(vcpu) else []


def enable_native(vcpu: VcpuCore, page_gpa: int) -> bool:
    """On PVM, let a 64-bit guest run natively; elsewhere do nothing.  Returns True if enabled.

    Must be called before the vCPU's first KVM_RUN; *page_gpa* is a free page in a memory slot."""
    if not isinstance(page_gpa, int) or isinstance(page_gpa, bool):
        raise ArgumentTypeError(f"page_gpa must be an int, not {type(page_gpa).__name__}")
    if page_gpa % 4096 or not 0 <= page_gpa < 1 << 52:
        raise InvalidArgumentError(f"PVM page {page_gpa:#x} is not page-aligned")
    if not is_pvm(vcpu):
        return False
    return vcpu.set_msrs({MSR_PVM_NATIVE: page_gpa | 1}) == 1
