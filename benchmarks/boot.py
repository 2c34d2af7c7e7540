"""Suite `boot` (run it with --suite boot; not part of the default run): time from
process start to SeaBIOS's "No bootable device." and to GRUB's `grub rescue>`,
kvmsys over each ABI against QEMU (`qemu-system-x86_64 -M pc -accel kvm`), interleaved.

Every sample is a fresh process, timed from spawn until the text appears on its
serial output (both show the firmware's screen on the serial line through SeaBIOS's
serial console), then killed: the same span for both, start-up included.  Same
machine for both: 128 MiB, one vCPU, in-kernel irqchip, no VGA, the disk (GRUB
target) on the primary ATA channel.  Needs Debian's seabios (and grub-pc-bin for
the GRUB disk, qemu-system-x86 for the comparison); what is missing is skipped."""
from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import Stat, SuiteResult, derive, interleave, progress

NAME = "boot"
TITLE = "Booting real firmware: kvmsys vs QEMU"
SEABIOS = Path("/usr/share/seabios/bios.bin")
GRUB_BOOT_IMG = Path("/usr/lib/grub/i386-pc/boot.img")
QEMU = "qemu-system-x86_64"
TARGETS = {
    "seabios": (b"No bootable device.", "SeaBIOS 1.16 (Debian), no disk → \"No bootable device.\""),
    "grub": (b"grub rescue>", "SeaBIOS + GRUB i386-pc disk → `grub rescue>`"),
}
REPS = {"tiny": 1, "quick": 2, "full": 5}
LIMIT_S = 120.0


def make_grub_disk(directory: Path) -> Path:
    """A 1 MiB disk: GRUB's boot.img, then a core.img from grub-mkimage (no file system:
    GRUB ends at its rescue prompt)."""
    core = directory / "core.img"
    subprocess.run(["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-p", "(hd0)/boot/grub", "biosdisk"],
                   check=True)
    disk = bytearray(1 << 20)
    disk[:512] = GRUB_BOOT_IMG.read_bytes()
    c = core.read_bytes()
    disk[512:512 + len(c)] = c
    path = directory / "disk.img"
    path.write_bytes(disk)
    return path


def _plain(out: bytes) -> bytes:
    # SeaBIOS's serial console mixes cursor moves into the text wherever the screen changed
    return re.sub(rb"\x1b(\[[0-9;?]*[A-Za-z]|c)", b"", out)


def time_to(cmd: list[str], pattern: bytes) -> float:
    """Seconds from spawning *cmd* until *pattern* appears on its stdout; then kill it."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = b""
    try:
        while pattern not in _plain(out):
            if time.perf_counter() - t0 > LIMIT_S:
                raise RuntimeError(f"{cmd[0]}: no {pattern!r} within {LIMIT_S:.0f} s: {out[-300:]!r}")
            if select.select([p.stdout], [], [], 0.5)[0]:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{cmd[0]} ended before {pattern!r}: {out[-300:]!r}")
                out = out[-4096:] + chunk
        return time.perf_counter() - t0
    finally:
        p.kill()
        p.wait()


def kvmsys_cmd(abi: str, disk: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "kvmsys", "run", "--firmware", str(SEABIOS), "--serial", "stdio",
           "--abi", abi, "--memory", "128"]
    return cmd + (["--disk", str(disk)] if disk else [])


def qemu_cmd(disk: Path | None) -> list[str]:
    # -nographic: QEMU then gives SeaBIOS its serial console (fw_cfg etc/sercon-port), as kvmsys does
    cmd = [QEMU, "-M", "pc", "-accel", "kvm", "-m", "128", "-smp", "1", "-nodefaults", "-vga", "none",
           "-nographic", "-bios", str(SEABIOS), "-serial", "stdio"]
    return cmd + (["-drive", f"file={disk},format=raw,if=ide"] if disk else [])


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    res = SuiteResult(NAME, TITLE, columns=[("target", "boot to"), ("who", "VMM"), ("time", "time"),
                                            ("ratio", "kvmsys / QEMU")])
    if not SEABIOS.exists():
        res.skipped.append("Debian's seabios package is not installed (/usr/share/seabios/bios.bin)")
        res.elapsed_s = time.perf_counter() - t_start
        return res
    have_qemu = shutil.which(QEMU) is not None
    if not have_qemu:
        res.skipped.append(f"{QEMU} is not installed (Debian's qemu-system-x86): no comparison")
    targets = ["seabios"] if profile.name == "tiny" else list(TARGETS)
    reps = REPS.get(profile.name, 3)
    with tempfile.TemporaryDirectory(prefix="kvmsys-boot-") as tmp:
        disks: dict = {"seabios": None}
        if "grub" in targets:
            if GRUB_BOOT_IMG.exists() and shutil.which("grub-mkimage"):
                disks["grub"] = make_grub_disk(Path(tmp))
            else:
                targets.remove("grub")
                res.skipped.append("GRUB target: Debian's grub-pc-bin is not installed")
        variants = {}
        for t in targets:
            pattern = TARGETS[t][0]
            for abi in ("fd", "sys"):
                variants[f"{t}/kvmsys-{abi}"] = (lambda c=kvmsys_cmd(abi, disks[t]), p=pattern: time_to(c, p))
            if have_qemu:
                variants[f"{t}/qemu"] = (lambda c=qemu_cmd(disks[t]), p=pattern: time_to(c, p))
        progress(f"{NAME}: {reps} interleaved rounds of {len(variants)} boots")
        samples = interleave(variants, reps, 0, on_round=lambda r: progress(f"{NAME}: round {r}/{reps}"))
    labels = {"kvmsys-fd": "kvmsys, fd ABI", "kvmsys-sys": "kvmsys, syscall ABI", "qemu": "QEMU 7.2 (-M pc)"}
    for key, s in samples.items():
        t, who = key.split("/")
        res.add_row(key, {"target": TARGETS[t][1], "who": labels[who]}, {"time": Stat([x * 1e9 for x in s], "ns")})
        res.check(f"{key} reached", len(s) == reps, f"{key}: {len(s)} of {reps} boots reached the text")
    if have_qemu:
        for t in targets:
            for abi in ("fd", "sys"):
                row = res.rows[f"{t}/kvmsys-{abi}"]
                row["stats"]["ratio"] = derive(res.rows, "time", f"{t}/kvmsys-{abi}", f"{t}/qemu", "ratio")
    res.config = dict(reps=reps, targets=targets, memory_mib=128, qemu=have_qemu)
    res.notes += [
        f"{reps} interleaved rounds; each boot is a fresh process (`kvmsys run --firmware ... --serial stdio`, "
        f"`{QEMU} -M pc -accel kvm -nodefaults -vga none -nographic -serial stdio`), timed from spawn until the text "
        "appears on its serial output, then killed. Ratios are per round (paired samples).",
        "On a PVM host most of GRUB's time is its LZMA decompression in KVM's instruction emulator, "
        "the same for both VMMs.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
