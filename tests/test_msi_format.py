"""The x86 MSI messages the IOAPIC, the IOMMU's interrupt remapping and kvmsys.routing
build, field by field against the SDM / VT-d layouts (decoded here, independently of
the encoder), plus fixed values: their one encoder (kvmsys.msi) must keep all of them."""
import random
import struct

import pytest

from kvmsys import routing
from kvmsys.devices import ioapic, vtd_walk

pytestmark = pytest.mark.nokvm


def _compat_fields(address, data):
    """(dest, redirection hint, dest mode, vector, delivery mode, trigger, level) of a
    compatibility-format message, checking that nothing else is set."""
    assert address >> 20 == 0xFEE and not address & 0xFF3, hex(address)
    assert not data & ~0xC7FF, hex(data)
    return ((address >> 12) & 0xFF, (address >> 3) & 1, (address >> 2) & 1,
            data & 0xFF, (data >> 8) & 7, (data >> 15) & 1, (data >> 14) & 1)


def _handle(address):
    assert address >> 20 == 0xFEE and address & 0x10 and not address & 0xB, hex(address)
    return (address >> 5) & 0x7FFF | ((address >> 2) & 1) << 15


def test_ioapic_messages():
    assert ioapic.message(0x05 << 56 | 1 << 11 | 1 << 15 | 3 << 8 | 0x41) == (0xFEE05004, 0xC341)
    assert ioapic.message(0xED | 1 << 48 | 1 << 49) == (0xFEE00030, 0)
    assert ioapic.message(1 << 48 | 0x7FFF << 49 | 1 << 11) == (0xFEEFFFF4, 0)
    rnd = random.Random(21)
    for _ in range(2000):
        e = rnd.getrandbits(64)
        address, data = ioapic.message(e)
        if e & 1 << 48:
            assert data == 0 and _handle(address) == (e >> 49) & 0x7FFF | ((e >> 11) & 1) << 15
        else:
            level = (e >> 15) & 1
            assert _compat_fields(address, data) == (e >> 56, 0, (e >> 11) & 1, e & 0xFF, (e >> 8) & 7,
                                                     level, level)


def test_remapped_messages():
    irt, entries = 0x1000, 1 << 16
    table = {}

    def read(gpa, n):
        return b"".join(struct.pack("<Q", table.get(gpa + 8 * i, 0)) for i in range(n // 8))
    table[irt + 16 * 0x8003], table[irt + 16 * 0x8003 + 8] = 1 | 0x1F << 2 | 0x52 << 16 | 0xA5 << 40, 0
    assert vtd_walk.remap(read, irt, entries, 0xFEE00074, 0, None) == (0xFEEA500C, 0xC352)
    assert vtd_walk.remap(read, irt, entries, 0xFEE00028, 0x8002, 7) == (0xFEEA500C, 0xC352)   # SHV
    rnd = random.Random(21)
    for _ in range(2000):
        index, sub = rnd.getrandbits(16), rnd.getrandbits(16)
        dest, dm, rh, tm, dlm, vector = (rnd.getrandbits(8), rnd.getrandbits(1), rnd.getrandbits(1),
                                         rnd.getrandbits(1), rnd.getrandbits(3), rnd.getrandbits(8))
        shv = rnd.getrandbits(1)
        at = irt + 16 * ((index + sub) & 0xFFFF if shv else index)
        table[at] = 1 | dm << 2 | rh << 3 | tm << 4 | dlm << 5 | vector << 16 | dest << 40
        table[at + 8] = 0
        address = 0xFEE00000 | (index & 0x7FFF) << 5 | 1 << 4 | shv << 3 | (index >> 15) << 2
        out = vtd_walk.remap(read, irt, entries, address, sub if shv else 0, rnd.getrandbits(16))
        assert _compat_fields(*out) == (dest, rh, dm, vector, dlm, tm, tm)


def test_routing_messages():
    rnd = random.Random(21)
    for _ in range(500):
        apic_id, vector, level = rnd.getrandbits(32), rnd.randrange(16, 256), bool(rnd.getrandbits(1))
        lo, hi, data = routing.msi_message(apic_id, vector, level=level, x2apic_format=True)
        assert hi == apic_id & ~0xFF
        assert _compat_fields(lo, data) == (apic_id & 0xFF, 0, 0, vector, 0, level, level)
