"""Kernel files are untrusted: the loaders (kvmsys.loaders) check every header field
against the file and RAM before any work, so a malformed Multiboot ELF, a.out-kludge
image or bzImage is a one-line error (exit status 2 from the CLI) at once, never a
traceback, minutes of zero-filling or a partly written RAM.  The fuzz test mutates the
headers of valid kernels, seeded, and holds every outcome to that."""
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import kvmsys.guests
from kvmsys.errors import InvalidArgumentError
from kvmsys.loaders import LinuxBootError, MultibootError, load_linux, load_multiboot

FIRMWARE = Path(kvmsys.guests.__file__).parent / "firmware"
AOUT = (FIRMWARE / "multiboot.bin").read_bytes()         # a.out kludge: header at 4, loaded at 1 MiB
BZIMAGE = (FIRMWARE / "bzimage.bin").read_bytes()
MAGIC = 0x1BADB002
RAM = 4 << 20


def mb_header(flags: int) -> bytes:
    return struct.pack("<III", MAGIC, flags, -(MAGIC + flags) & 0xFFFFFFFF)


def elf_kernel(phdrs=None, *, phentsize=32, phnum=None, body=None) -> bytes:
    """A Multiboot ELF32 kernel: the a.out test kernel's code as one PT_LOAD (by default)."""
    body = bytearray(AOUT if body is None else body)
    body[4:16] = mb_header(0x3)                             # ELF: no a.out-kludge fields
    if phdrs is None:
        phdrs = [(1, 84, 0x100000, 0x100000, len(body), 0x10CC, 5, 4)]
    phnum = len(phdrs) if phnum is None else phnum
    eh = bytearray(52)
    eh[:16] = b"\x7fELF\x01\x01\x01" + bytes(9)
    struct.pack_into("<HHIIIIIHHHHHH", eh, 16, 2, 3, 1, 0x100024, 52, 0, 0, 52, phentsize, phnum, 0, 0, 0)
    ph = b"".join(struct.pack("<8I", *p) for p in phdrs)
    return bytes(eh) + ph + bytes(body)


ZEROS = bytes(RAM)


def mem() -> memoryview:
    return memoryview(bytearray(RAM))


def untouched(m: memoryview) -> bool:
    return m == ZEROS


def test_elf_kernel_of_these_tests_loads():
    m = mem()
    entry, _ = load_multiboot(m, elf_kernel())
    assert entry == 0x100024 and bytes(m[0x100010:0x100010 + len(AOUT) - 16]) == AOUT[16:]


def hostile_elf_96() -> bytes:
    """The issue's 96-byte kernel: e_phentsize 0 and 65535 program headers, every one the
    same PT_LOAD of 48 MiB to zero (on the old loader: ~35 minutes of zero-filling)."""
    eh = bytearray(52)
    eh[:16] = b"\x7fELF\x01\x01\x01" + bytes(9)
    struct.pack_into("<HHIIIIIHHHHHH", eh, 16, 2, 3, 1, 0x100000, 52, 0, 0, 52, 0, 0xFFFF, 0, 0, 0)
    ph = struct.pack("<8I", 1, 0, 0x100000, 0x100000, 0, 48 << 20, 7, 4)
    img = bytes(eh) + ph + mb_header(0x3)
    assert len(img) == 96
    return img


@pytest.mark.parametrize("name,image,says", [
    ("phentsize-0", hostile_elf_96(), "program header entries of 0 bytes"),
    ("headers-past-eof", elf_kernel(phnum=500), "past the end of the file"),
    ("truncated-elf", elf_kernel()[:28] + mb_header(0x3), "not a 32-bit"),
    ("overlapping", elf_kernel([(1, 84, 0x100000, 0x100000, 16, 0x200000, 5, 4)] * 200), "overlap"),
    ("segment-outside-ram", elf_kernel([(1, 84, 0, 0xFFFFF000, 16, 0x2000, 5, 4)]), "outside"),
    ("filesz-past-eof", elf_kernel([(1, 84, 0, 0x100000, 1 << 30, 1 << 30, 5, 4)]), "outside the file"),
    ("ivt", elf_kernel([(1, 84, 0, 0x100, 16, 0x100, 5, 4)]), "real-mode IVT"),
    ("hole-below-1m", elf_kernel([(1, 84, 0, 0x9F000, 16, 0x2000, 5, 4)]), "not RAM"),
    ("no-load-segments", elf_kernel([(2, 84, 0, 0x100000, 16, 16, 5, 4)]), "without loadable segments"),
    ("aout-truncated", AOUT[:24], "past the end of the file"),
    ("aout-load-end-past-eof", AOUT[:4] + mb_header(0x10003) + struct.pack("<5I", 0x100004, 0x100000, 0x200000,
                                                                          0, 0x100024) + AOUT[32:],
     "past the end of the file"),
    ("aout-bss-before-end", AOUT[:4] + mb_header(0x10003) + struct.pack("<5I", 0x100004, 0x100000, 0x1000cc,
                                                                       0x100010, 0x100024) + AOUT[32:],
     "bss_end_addr"),
    ("aout-huge-bss", AOUT[:4] + mb_header(0x10003) + struct.pack("<5I", 0x100004, 0x100000, 0x1000cc,
                                                                 0xFFFFFFFF, 0x100024) + AOUT[32:], "outside"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else "")
def test_malformed_multiboot_kernels_are_refused_before_any_work(name, image, says):
    m = mem()
    t0 = time.monotonic()
    with pytest.raises(MultibootError, match=says) as e:
        load_multiboot(m, image)
    assert time.monotonic() - t0 < 1.0              # a bound on hanging, not a speed test
    assert "\n" not in str(e.value)
    assert untouched(m), "RAM was written before the kernel was refused"


def bz(**fields) -> bytes:
    img = bytearray(BZIMAGE)
    for off, (fmt, value) in fields.items():
        struct.pack_into(fmt, img, int(off[1:], 16), value)
    return bytes(img)


@pytest.mark.parametrize("image,says", [
    (bz(o1f1=("<B", 200)), "setup sectors"),                       # setup past the end of the file
    (BZIMAGE[:0x400], "setup sectors"),                    # no protected-mode kernel
    (bz(o201=("<B", 0xFF))[:0x280], "setup sectors"),              # setup header past the end
    (bz(o206=("<H", 0x205)), "boot protocol"),
    (bz(o211=("<B", 0)), "zImage"),
], ids=["setup-past-eof", "no-kernel", "header-past-eof", "protocol-2.05", "zimage"])
def test_malformed_bzimages_are_refused_before_any_work(image, says):
    m = mem()
    with pytest.raises(LinuxBootError, match=says):
        load_linux(m, image)
    assert untouched(m)


def test_bzimage_initrd_that_does_not_fit_writes_nothing():
    m = mem()
    with pytest.raises(LinuxBootError, match="initrd"):
        load_linux(m, BZIMAGE, initrd=bytes(RAM))
    with pytest.raises(LinuxBootError, match="command line"):
        load_linux(m, BZIMAGE, cmdline="x" * 70000)
    assert untouched(m)


# --- fuzzing ------------------------------------------------------------------------------
FUZZ_RAM = 2 << 20          # the kernels load at 1 MiB
BOUNDS = [0, 1, 2, 31, 32, 33, 52, 84, 0xFF, 0x100, 0xFFFF, 0x10000, 0x100000, 0x7FFFFFFF,
          0x80000000, 0xFFFFF000, 0xFFFFFFFF]


def _mutate(rng: random.Random, image: bytes, fields: list[tuple[int, str]]) -> bytes:
    img = bytearray(image)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.6:
            off, fmt = rng.choice(fields)
            bits = 8 * struct.calcsize(fmt)
            value = rng.choice(BOUNDS + [rng.getrandbits(bits)]) & ((1 << bits) - 1)
            if off + struct.calcsize(fmt) <= len(img):
                struct.pack_into(fmt, img, off, value)
        elif choice < 0.8:
            img = img[:rng.randint(0, len(img))]            # truncated
        else:
            i = rng.randrange(len(img)) if img else 0
            img[i:i + 1] = bytes([rng.getrandbits(8)])
    return bytes(img)


def _fields_elf() -> list[tuple[int, str]]:
    f = [(24, "<I"), (28, "<I"), (42, "<H"), (44, "<H"), (18, "<H"), (4, "<B"), (88, "<I")]
    f += [(52 + 4 * i, "<I") for i in range(8)]             # the program header
    return f


def _fields_aout() -> list[tuple[int, str]]:
    return [(16 + 4 * i, "<I") for i in range(5)] + [(8, "<I")]


def _fields_bz() -> list[tuple[int, str]]:
    return [(0x1F1, "<B"), (0x201, "<B"), (0x206, "<H"), (0x211, "<B"), (0x218, "<I"), (0x21C, "<I"),
            (0x22C, "<I"), (0x236, "<H"), (0x238, "<I"), (0x260, "<I")]


def _fix_checksum(img: bytes, at: int) -> bytes:
    """Keep a mutated Multiboot header valid (else every case stops at the first check)."""
    if len(img) < at + 12:
        return img
    b = bytearray(img)
    magic, flags = struct.unpack_from("<II", b, at)
    struct.pack_into("<I", b, at + 8, -(magic + flags) & 0xFFFFFFFF)
    return bytes(b)


@pytest.mark.parametrize("kind", ["elf", "aout", "bzimage"])
def test_fuzz_loaders_with_mutated_headers(kind):
    """Seeded mutations of valid kernels' headers: each load succeeds or is refused with a
    one-line error of the loader, within a bound, writing nothing when refused."""
    rng = random.Random(f"kvmsys-loaders-{kind}")
    base, fields, at = {"elf": (elf_kernel(), _fields_elf(), 88), "aout": (AOUT, _fields_aout(), 4),
                        "bzimage": (BZIMAGE, _fields_bz(), None)}[kind]
    outcomes = {"ok": 0, "refused": 0}
    m = memoryview(bytearray(FUZZ_RAM))
    for _ in range(300):
        img = _mutate(rng, base, fields)
        if at is not None:
            img = _fix_checksum(img, at)
        m[:] = ZEROS[:FUZZ_RAM]
        t0 = time.monotonic()
        try:
            if kind == "bzimage":
                load_linux(m, img, cmdline="console=ttyS0", initrd=b"I" * 4096)
            else:
                load_multiboot(m, img, cmdline="c", modules=[(b"mod", "m")])
            outcomes["ok"] += 1
        except (MultibootError, LinuxBootError) as e:
            outcomes["refused"] += 1
            assert "\n" not in str(e)
            assert m == ZEROS[:FUZZ_RAM], (img[:128].hex(), str(e))
        assert time.monotonic() - t0 < 2.0, img[:128].hex()     # bounded by file and RAM: never minutes
    assert outcomes["ok"] and outcomes["refused"], outcomes   # the mutations reach both sides


def kvmsys_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "kvmsys", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir())


@pytest.mark.parametrize("name,image", [
    ("elf-phentsize-0", hostile_elf_96()),
    ("elf-truncated", elf_kernel()[:60]),
    ("aout-huge-bss", AOUT[:4] + mb_header(0x10003) + struct.pack("<5I", 0x100004, 0x100000, 0x1000cc,
                                                                   0xFFFFFFFF, 0x100024) + AOUT[32:]),
    ("bzimage-setup-past-eof", bz(o1f1=("<B", 200))),
], ids=lambda v: v if isinstance(v, str) else "")
def test_cli_refuses_a_malformed_kernel_in_one_line(tmp_path, name, image):
    path = tmp_path / name
    path.write_bytes(image)
    t0 = time.monotonic()
    p = kvmsys_cli("run", "--kernel", str(path), "--timeout", "5")
    assert time.monotonic() - t0 < 20          # refused at once (the old loader took ~35 minutes)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_run_kernel_errors_are_invalid_argument_errors():
    from kvmsys.runner import run_kernel
    with pytest.raises(InvalidArgumentError):
        run_kernel(hostile_elf_96(), memory_size=64 << 20)
