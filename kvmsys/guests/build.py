"""Assemble src/*.S into the committed bin/*.bin (`python -m kvmsys.guests.build`).

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

from . import GUESTS, layout

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE / "src"
BIN_DIR = HERE / "bin"
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


def assemble(src: Path, mode_bits: int, link_addr: int) -> bytes:
    """Flat binary of `src` assembled for `mode_bits` and linked at `link_addr`."""
    defs = {**layout.ASM_SYMBOLS, "MODE": mode_bits}
    defsyms = [a for k, v in sorted(defs.items()) for a in ("--defsym", f"{k}={v:#x}")]
    env = dict(os.environ, LC_ALL="C")
    with tempfile.TemporaryDirectory(prefix="kvmsys-guest-") as tmp:
        obj, elf, out = (os.path.join(tmp, n) for n in ("g.o", "g.elf", "g.bin"))
        run = lambda *cmd: subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        try:
            run("as", "--64", "-I", str(SRC_DIR), *defsyms, "-o", obj, str(src))
            run("ld", "-m", "elf_x86_64", "-nostdlib", "--build-id=none", "-z", "noexecstack",
                f"-Ttext={link_addr:#x}", "-e", "_start", "-o", elf, obj)
            run("objcopy", "-O", "binary", "-j", ".text", elf, out)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"building {src.name} (MODE={mode_bits}) failed:\n"
                               f"{' '.join(e.cmd)}\n{e.stderr}") from None
        return Path(out).read_bytes()


def build_all(out_dir: Path = BIN_DIR) -> list[Path]:
    if missing := missing_tools():
        raise RuntimeError(f"missing binutils: {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (src, bits, addr) in targets().items():
        path = out_dir / f"{stem}.bin"
        path.write_bytes(assemble(src, bits, addr))
        written.append(path)
    return written


def main() -> int:
    for path in build_all():
        print(f"{path.stat().st_size:6d}  {path.relative_to(HERE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
