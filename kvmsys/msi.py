"""x86 MSI address/data: the one place they are built and taken apart (the IOAPIC,
the IOMMU and kvmsys.routing all use it).

Compatibility format (Intel SDM vol. 3, "Message Signalled Interrupts"): address
0xFEE00000 | destination id << 12 | redirection hint << 3 | destination mode << 2;
data vector | delivery mode << 8 | level-asserted << 14 | level-triggered << 15.
Remappable format (Intel VT-d spec, "Interrupt Requests in Remappable Format"): bit 4
of the address set, the handle's bits 14:0 in address bits 19:5 and bit 15 in bit 2,
bit 3 (SHV) says a subhandle is in data bits 15:0."""
from __future__ import annotations

ADDRESS = 0xFEE00000
LEVEL_ASSERT, TRIGGER_LEVEL = 1 << 14, 1 << 15     # data bits
REMAPPABLE, SHV = 1 << 4, 1 << 3                  # address bits of the remappable format


def compat_message(dest: int, vector: int, *, dest_mode: int = 0, redirection_hint: int = 0,
                   delivery_mode: int = 0, level: bool = False) -> tuple[int, int]:
    """(address, data) of a compatibility-format message to 8-bit destination *dest*;
    a *level*-triggered one is sent asserted."""
    return (ADDRESS | dest << 12 | redirection_hint << 3 | dest_mode << 2,
            vector | delivery_mode << 8 | (TRIGGER_LEVEL | LEVEL_ASSERT if level else 0))


def remappable_address(handle: int) -> int:
    """The address of a remappable-format request for 16-bit *handle* (no subhandle)."""
    return ADDRESS | (handle & 0x7FFF) << 5 | REMAPPABLE | (handle >> 15) << 2


def handle(address: int) -> int:
    """The 16-bit handle of a remappable-format *address*."""
    return ((address >> 5) & 0x7FFF) | ((address >> 2) & 1) << 15


def is_interrupt(address: int) -> bool:
    """Whether a memory write to *address* is an interrupt message (the APICs' window)."""
    return address >> 20 == ADDRESS >> 20


def halves(address: int) -> tuple[int, int]:
    """(low, high) 32 bits of a message address, as KVM takes it (kvm_msi, an MSI route)."""
    return address & 0xFFFFFFFF, address >> 32
