"""Guest-driven device fuzzing: a firmware image of seeded random traffic (port reads and
writes of every width, string I/O, MMIO to unbacked addresses, fw_cfg DMA descriptors
with hostile lengths and targets, ATA commands with random registers and transfers) runs
on the PC of kvmsys.pc until its deadline.  The guest is untrusted: whatever it does,
kvmsys raises nothing, its memory stays bounded, and the run ends by the deadline."""
import random
import struct
import time

import psutil
import pytest

from kvmsys.runner import run_firmware

# the PC's ports (kvmsys.pc), and a few nobody handles; never the isa-debug-exit port
# 0xf4, which would end the run before its deadline
PORTS = ([0x60, 0x64, 0x70, 0x71, 0x92, 0x40, 0x41, 0x42, 0x43, 0x61, 0x510, 0x511, 0xE9, 0x402]
         + list(range(0x1F0, 0x1F8)) + [0x3F6] + list(range(0x3F8, 0x400)) + list(range(0x514, 0x51C))
         + list(range(0xCF8, 0xD00)) + [0x80, 0x3D4, 0x3D5, 0x1234, 0xFFFF])
VALUES = [0, 1, 2, 4, 0x08, 0x10, 0x20, 0x24, 0x30, 0x34, 0x40, 0x80, 0xA0, 0xC6, 0xD1, 0xD2, 0xE0,
          0xEC, 0xEE, 0xF0, 0xFE, 0xFF, 0xFFFF, 0xFFFFFFFF]
DESC = 0x1000                   # where the guest builds its fw_cfg DMA descriptors
RAM = 16 << 20
DEADLINE_S = 2.0


class Asm:
    """Just the 16-bit real-mode encodings the traffic needs."""

    def __init__(self):
        self.code = bytearray()

    def __call__(self, *parts):
        for p in parts:
            self.code += p

    def mov_dx(self, v):
        self(b"\xba", struct.pack("<H", v & 0xFFFF))

    def mov_a(self, size, v):
        self({1: b"\xb0" + bytes([v & 0xFF]), 2: b"\xb8" + struct.pack("<H", v & 0xFFFF),
              4: b"\x66\xb8" + struct.pack("<I", v & 0xFFFFFFFF)}[size])

    def out(self, size):
        self({1: b"\xee", 2: b"\xef", 4: b"\x66\xef"}[size])

    def in_(self, size):
        self({1: b"\xec", 2: b"\xed", 4: b"\x66\xed"}[size])

    def store32(self, addr, v):                     # mov dword [addr], imm32 (DS = 0)
        self(b"\x66\xc7\x06", struct.pack("<HI", addr, v & 0xFFFFFFFF))


def traffic_image(seed: int, ops: int = 2500) -> bytes:
    """A 64 KiB firmware image: *ops* random device operations, then cli; hlt for ever."""
    rng = random.Random(seed)
    a = Asm()
    a(b"\xfa\x31\xc0\x8e\xd8\x8e\xc0\x8e\xd0\xbc\x00\x70")     # cli; DS = ES = SS = 0; SP = 0x7000
    a(b"\xb8\x00\xa0\x8e\xe0")                                  # FS = 0xA000: unbacked (MMIO)
    port = lambda: rng.choice(PORTS) if rng.random() < 0.9 else rng.getrandbits(16)  # noqa: E731
    value = lambda: rng.choice(VALUES) if rng.random() < 0.5 else rng.getrandbits(32)  # noqa: E731
    for _ in range(ops):
        r = rng.random()
        size = rng.choice((1, 1, 2, 4))
        if r < 0.45:                                            # out
            p = port()
            if p in (0xCF9, 0x92, 0x64) and rng.random() < 0.9:
                p = 0x80        # resets (there) restart the traffic: rarer, so more of it runs
            a.mov_dx(p)
            a.mov_a(size, value())
            a.out(size)
        elif r < 0.7:                                           # in
            a.mov_dx(port())
            a.in_(size)
        elif r < 0.78:                                          # string I/O: rep ins/outs[bw]
            p = rng.choice([0x1F0, 0x1F0, 0x511, 0x3F8, 0x60, port()])
            op = rng.choice([b"\x6c", b"\x6d", b"\x6e", b"\x6f"])    # insb, insw, outsb, outsw
            # KVM returns a string `in` a page per exit, an `out` an element per exit (here)
            whole = p in (0x1F0, 0x511) and op in (b"\x6c", b"\x6d")
            a.mov_dx(p)
            big = [4096, rng.randrange(0x6000)] if whole else []     # DI + the string stays below 64 KiB
            a(b"\xb9", struct.pack("<H", rng.choice([1, 2, 255, 256] + big)))
            a(b"\xbe", struct.pack("<H", rng.getrandbits(16)))    # SI
            a(b"\xbf", struct.pack("<H", 0x2000 + rng.getrandbits(12)))   # DI: away from DESC
            a(b"\xf3", op)
        elif r < 0.86:                                          # MMIO write / read (FS:)
            off = rng.getrandbits(15)
            if rng.random() < 0.5:
                a(b"\x64\xc6\x06", struct.pack("<HB", off, rng.getrandbits(8)))
            else:
                a(b"\x64\xa0", struct.pack("<H", off))
        elif r < 0.94:                                          # fw_cfg DMA
            control = rng.choice([0x02, 0x08 | 0x02, 0x04, 0x10, 0x01, rng.getrandbits(32)])
            control |= rng.choice([0x00, 0x19, 0x20, 0x21, rng.getrandbits(16)]) << 16
            length = rng.choice([0, 4, 4096, 0x10000, 0xFFFFFFFF, 1 << 28, rng.getrandbits(32)])
            target = rng.choice([0x30000, 0x9F000, 0xA0000, 0xFEE00000, RAM - 64, 1 << 40,
                                 (1 << 64) - 8, 0x20000 + rng.getrandbits(16)])
            a.store32(DESC, int.from_bytes(struct.pack(">I", control), "little"))
            a.store32(DESC + 4, int.from_bytes(struct.pack(">I", length), "little"))
            a.store32(DESC + 8, int.from_bytes(struct.pack(">I", target >> 32), "little"))
            a.store32(DESC + 12, int.from_bytes(struct.pack(">I", target & 0xFFFFFFFF), "little"))
            a.mov_dx(0x514)
            a.mov_a(4, 0)
            a.out(4)
            a.mov_dx(0x518)
            a.mov_a(4, int.from_bytes(struct.pack(">I", DESC), "little"))
            a.out(4)
        else:                                                   # an ATA command
            for reg in (0x1F6, 0x1F2, 0x1F3, 0x1F4, 0x1F5):
                a.mov_dx(reg)
                a.mov_a(1, rng.choice([0, 1, 0x40, 0xA0, 0xE0, 0xFF, rng.getrandbits(8)]))
                a.out(1)
            a.mov_dx(0x1F7)
            a.mov_a(1, rng.choice([0x20, 0x24, 0x30, 0x34, 0xC4, 0xC5, 0xC6, 0xEC, 0xEF, 0xA1,
                                   rng.getrandbits(8)]))
            a.out(1)
    a(b"\xfa\xf4\xeb\xfc")                                      # cli; hlt; jmp back
    image = bytearray(b"\xf4" * 0x10000)
    assert len(a.code) <= 0xFFF0, len(a.code)
    image[:len(a.code)] = a.code
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"              # reset vector: jmp F000:0000
    return bytes(image)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_guest_driven_device_fuzz(abi, tmp_path, seed):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 256)                   # 64 KiB, 128 sectors
    proc = psutil.Process()
    rss = proc.memory_info().rss
    t0 = time.monotonic()
    r = run_firmware(traffic_image(seed), abi=abi, irqchip=True, memory_size=RAM, disk=str(disk),
                     timeout=DEADLINE_S)
    elapsed = time.monotonic() - t0
    # a reset (0xcf9, 0x92, the i8042) starts the traffic again; the deadline ends it, or
    # the guest's own state (a DMA over its code) ends it sooner
    assert r.reason in ("DEADLINE", "SHUTDOWN", "INTERNAL_ERROR"), r.reason
    assert elapsed < DEADLINE_S + 10, elapsed                   # ended by its deadline (+ load slack)
    assert proc.memory_info().rss - rss < RAM + (64 << 20)      # guest RAM it touched + a bound
    assert sum(r.exits.values()) > 100                          # the traffic ran
