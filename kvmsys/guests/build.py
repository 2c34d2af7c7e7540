"""Assemble src/*.S into the committed bin/*.bin and firmware/*.S into firmware/*.bin
(`python -m kvmsys.guests.build`).

Needs GNU binutils (as, ld, objcopy). Output depends only on the sources, the
constants in layout.py and the binutils version: no timestamps, no build ids.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from . import GUESTS, layout

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE / "src"
BIN_DIR = HERE / "bin"
# The firmware-level test images (a raw image at the reset vector, a boot sector, a
# Multiboot kernel, a bzImage), built to firmware/<stem>.bin: stem -> `as` mode.
FIRMWARE_DIR = HERE / "firmware"
FIRMWARE = {"hello": 32, "bootsector": 32, "multiboot": 32, "smp_multiboot": 32, "s3_multiboot": 32, "bzimage": 64,
            "q35_multiboot": 32}
TOOLS = ("as", "ld", "objcopy")
VECTORS = "vectors"  # exception stubs: same bytes in every mode, assembled as 32-bit


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def targets() -> dict[str, tuple[Path, int, int]]:
    """bin stem -> (source, MODE bits, link address)."""
    out = {VECTORS: (SRC_DIR / "vectors.S", 32, layout.VECTORS_ADDR)}
    for g in GUESTS.values():
        out[g.name] = (SRC_DIR / f"{g.base}.S", layout.MODE_BITS[g.mode], g.load_addr)
    return out


def _binutils(src: Path, steps: Callable[[str, str, str], Iterable[list[str]]]) -> bytes:
    """Run *steps(obj, elf, out)* (binutils command lines) in a scratch directory; the bytes of out."""
    env = dict(os.environ, LC_ALL="C")
    with tempfile.TemporaryDirectory(prefix="kvmsys-guest-") as tmp:
        obj, elf, out = (os.path.join(tmp, n) for n in ("g.o", "g.elf", "g.bin"))
        try:
            for cmd in steps(obj, elf, out):
                subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"building {src.name} failed:\n{' '.join(e.cmd)}\n{e.stderr}") from None
        return Path(out).read_bytes()


def assemble(src: Path, mode_bits: int, link_addr: int) -> bytes:
    """Flat binary of `src` assembled for `mode_bits` and linked at `link_addr`."""
    defs = {**layout.ASM_SYMBOLS, "MODE": mode_bits}
    defsyms = [a for k, v in sorted(defs.items()) for a in ("--defsym", f"{k}={v:#x}")]
    return _binutils(src, lambda obj, elf, out: [
        ["as", "--64", "-I", str(SRC_DIR), *defsyms, "-o", obj, str(src)],
        ["ld", "-m", "elf_x86_64", "-nostdlib", "--build-id=none", "-z", "noexecstack",
         f"-Ttext={link_addr:#x}", "-e", "_start", "-o", elf, obj],
        ["objcopy", "-O", "binary", "-j", ".text", elf, out]])


def assemble_firmware(stem: str) -> bytes:
    """Flat binary of firmware/<stem>.S: assembled, not linked (an image's addresses are
    offsets from its start, or set in its source)."""
    src = FIRMWARE_DIR / f"{stem}.S"
    return _binutils(src, lambda obj, elf, out: [
        ["as", f"--{FIRMWARE[stem]}", "-I", str(FIRMWARE_DIR), "-o", obj, str(src)],
        ["objcopy", "-O", "binary", "-j", ".text", obj, out]])


def build_all(out_dir: Path = BIN_DIR, firmware_dir: Path = FIRMWARE_DIR) -> list[Path]:
    if missing := missing_tools():
        raise RuntimeError(f"missing binutils: {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (src, bits, addr) in targets().items():
        path = out_dir / f"{stem}.bin"
        path.write_bytes(assemble(src, bits, addr))
        written.append(path)
    for stem in FIRMWARE:
        path = firmware_dir / f"{stem}.bin"
        path.write_bytes(assemble_firmware(stem))
        written.append(path)
    return written


def main() -> int:
    for path in build_all():
        print(f"{path.stat().st_size:6d}  {path.relative_to(HERE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
