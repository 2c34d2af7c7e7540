"""Interrupt routing: GSI routing tables (KVM_SET_GSI_ROUTING) and x86 MSI messages.

    vm.set_gsi_routing([irqchip_route(0, "IOAPIC", 0), msi_route(10, apic_id=0, vector=0x46)])
    vm.irq_line(10, 1)        # raises GSI 10: an MSI of vector 0x46 to APIC 0

A table replaces the kernel's default one (which maps GSIs 0..15 to the PICs and
0..23 to the IOAPIC) entirely: include those routes if the guest still uses them.
"""
from __future__ import annotations

from . import _core
from .errors import ArgumentTypeError, InvalidArgumentError
from .msi import compat_message

__all__ = ["msi_message", "msi_route", "irqchip_route", "default_routes"]


def msi_message(apic_id: int, vector: int, *, level: bool = False,
                x2apic_format: bool = False) -> tuple[int, int, int]:
    """(address_lo, address_hi, data) of a fixed, physical-destination MSI.  APIC ids
    above 255 travel in address_hi (KVM_X2APIC_API_USE_32BIT_IDS, *x2apic_format*)."""
    for name, v in (("vector", vector), ("APIC id", apic_id)):
        if not isinstance(v, int):
            raise ArgumentTypeError(f"{name} must be an int, not {type(v).__name__}")
    if not 16 <= vector <= 255:
        raise InvalidArgumentError(f"vector must be 16..255, not {vector}")
    if not 0 <= apic_id < (1 << 32) or (apic_id > 0xFF and not x2apic_format):
        raise InvalidArgumentError(f"APIC id {apic_id} needs KVM_CAP_X2APIC_API with 32-bit ids"
                                   if 0xFF < apic_id < (1 << 32) else f"APIC id {apic_id} is out of range")
    address, data = compat_message(apic_id & 0xFF, vector, level=bool(level))
    return address, apic_id & ~0xFF, data


def msi_route(gsi: int, apic_id: int, vector: int, *, level: bool = False,
              x2apic_format: bool = False, devid: int | None = None) -> tuple[int | None, ...]:
    """A route that turns GSI *gsi* into an MSI of *vector* to *apic_id*."""
    return (gsi, _core.IRQ_ROUTING["MSI"], *msi_message(apic_id, vector, level=level,
                                                        x2apic_format=x2apic_format), devid)


def irqchip_route(gsi: int, chip: str | int, pin: int) -> tuple[int | None, ...]:
    """A route from GSI *gsi* to pin *pin* of an in-kernel irqchip ("PIC_MASTER",
    "PIC_SLAVE" or "IOAPIC")."""
    if isinstance(chip, str):
        try:
            chip = _core.IRQCHIPS[chip.upper()]
        except KeyError:
            raise InvalidArgumentError(f"unknown irqchip {chip!r}; one of {sorted(_core.IRQCHIPS)}") from None
    return (gsi, _core.IRQ_ROUTING["IRQCHIP"], chip, pin)


def default_routes() -> list[tuple[int | None, ...]]:
    """The table KVM starts with on x86: GSIs 0..15 to the PICs (2 is the cascade), and
    0..23 to the IOAPIC (GSI 0 to IOAPIC pin 2, as the PC's timer is wired)."""
    routes = [irqchip_route(g, "PIC_MASTER" if g < 8 else "PIC_SLAVE", g % 8) for g in range(16) if g != 2]
    routes += [irqchip_route(g, "IOAPIC", 2 if g == 0 else g) for g in range(24)]
    return routes
