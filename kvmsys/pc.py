"""A PC for real firmware: the memory map, the devices of kvmsys.devices, CPUID and
reset, assembled on one VM (either ABI).

What SeaBIOS needs to reach a boot loader (measured on our development host): a time
source (the PIT here, or KVM's in-kernel PIT + PIC with ``irqchip``), CMOS status A
with its update-in-progress bit clear, the debug port 0x402 reading back 0xe9 (else it
turns its log off), fw_cfg (RAM size, boot menu off, ``etc/sercon-port``: its serial
console, which mirrors the screen to the UART and reads the keyboard from it) and, for a
256 KiB image, the whole image below 1 MiB.  It finds the disk through the PCI IDE
function of an i440FX-like bus.

Reset (port 0xcf9, port 0x92, i8042 command 0xFE, a triple fault) puts every device and
vCPU back into its power-on state and rewrites the firmware copies; RAM keeps its
contents, as on a PC.

A kernel loaded without firmware (image None) gets what firmware would have left it:
ACPI tables (kvmsys.acpi) and their PM registers (kvmsys.devices.acpipm).  S3 (suspend
to RAM, PM1a_CNT) then works as the firmware's resume path does it: the vCPUs stop until
the RTC alarm fires (when PM1_EN's RTC_EN and the alarm are enabled; else until the run
ends), every vCPU is back in its power-on state, and the boot vCPU starts in real mode at
the FACS's firmware_waking_vector (RAM and the devices as they were).  S5 ends the run
("POWEROFF").  ``test_device``: QEMU's pc-testdev (kvmsys.devices.testdev).

``machine="q35"`` (kernels only, on a VM with the split irqchip): kvmsys.q35's bus,
user-space IOAPIC and the *devices* it offers ("edu", "intel-iommu")."""
from __future__ import annotations

import struct
import threading

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import acpi, platform, q35, smbios, vcpustate
from .devices import (AcpiPm, AtaDisk, Cmos, Debugcon, FwCfg, I8042, Irq, PciHost, PcTestdev, Pit, Port92,
                      Uart8250)
from .devices.acpipm import RTC_EN
from .errors import ArgumentTypeError, InvalidArgumentError, KvmsysError

if TYPE_CHECKING:
    from ._core import KvmCore
    from .fd import Vcpu, Vm

# A cpuid hook: (the CPUID entries a vCPU gets, its id) -> the entries (changed)
CpuidHook = Callable[[list[dict[str, int]], int], list[dict[str, int]]]

COM1 = 0x3F8
# xAPIC IDs are 8 bits and 0xFF is the broadcast ID; CMOS 0x5F holds the count - 1
MAX_CPUS = 255


def check_cpus(cpus: object) -> None:
    """A PC's vCPU count: an int in 1..MAX_CPUS (ArgumentTypeError, InvalidArgumentError)."""
    if not isinstance(cpus, int) or isinstance(cpus, bool):
        raise ArgumentTypeError(f"vcpus must be an int, not {type(cpus).__name__}")
    if not 1 <= cpus <= MAX_CPUS:
        raise InvalidArgumentError(f"a PC has 1 .. {MAX_CPUS} vCPUs, not {cpus}")


# Where VT-x's real-mode emulation gets its TSS and identity map (as QEMU puts them):
# pages just below the 16 MiB firmware window, unused by the guest.
TSS_ADDR = 0xFEFFD000
IDENTITY_MAP_ADDR = 0xFEFFC000


def default_cpuid(kvm: KvmCore, vcpu_id: int, cpus: int) -> list[dict[str, int]]:
    """KVM_GET_SUPPORTED_CPUID, with this vCPU's APIC ID and the CPU count filled in."""
    entries = kvm.supported_cpuid()
    for e in entries:
        if e["function"] == 1:
            e["ebx"] = (e["ebx"] & 0x0000FFFF) | (min(cpus, 255) << 16) | (vcpu_id << 24)
            if cpus > 1:
                e["edx"] |= 1 << 28         # HTT: the count in EBX[23:16] is valid
        elif e["function"] in (0x0B, 0x1F):
            e["edx"] = vcpu_id              # x2APIC ID
    return entries


def enter_real_mode(vcpu: Vcpu, segment: int, offset: int) -> None:
    """*vcpu* (in its power-on state) to start at *segment*:*offset* in real mode."""
    sregs = vcpu.get_sregs()
    sregs["cs"] = dict(sregs["cs"], selector=segment, base=segment << 4)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.update(rip=offset, rflags=0x2)
    vcpu.set_regs(regs)


# CPUID features --cpu can set or clear: name -> (leaf, register, bit) (subleaf 0)
CPU_FEATURES = {
    "x2apic": (1, "ecx", 21), "tsc-deadline": (1, "ecx", 24), "pcid": (1, "ecx", 17), "xsave": (1, "ecx", 26),
    "invpcid": (7, "ebx", 10), "umip": (7, "ecx", 2), "pku": (7, "ecx", 3), "rdtscp": (0x80000001, "edx", 27),
}


def cpu_features(spec: str) -> CpuidHook:
    """A cpuid hook (see Pc) from "+feature,-feature,..." (names in CPU_FEATURES): each
    feature set or cleared in every vCPU's CPUID.  InvalidArgumentError names a bad one."""
    if not isinstance(spec, str):
        raise ArgumentTypeError(f"CPU features must be a str, not {type(spec).__name__}")
    changes = []
    for item in filter(None, spec.split(",")):
        name = item[1:]
        if item[:1] not in ("+", "-") or name not in CPU_FEATURES:
            raise InvalidArgumentError(f"CPU feature {item!r}: expected +NAME or -NAME, NAME one of "
                                       f"{', '.join(sorted(CPU_FEATURES))}")
        changes.append((item[0] == "+", *CPU_FEATURES[name]))

    def hook(entries: list[dict[str, int]], vcpu_id: int) -> list[dict[str, int]]:
        for on, leaf, reg, bit in changes:
            for e in entries:
                if e["function"] == leaf and e.get("index", 0) == 0:
                    e[reg] = e[reg] | (1 << bit) if on else e[reg] & ~(1 << bit)
        return entries
    return hook


class Pc:
    """The platform around one firmware image (None: a kernel loaded by kvmsys.loaders) on
    *vm*, which has the in-kernel irqchip or not (then a PIT in Python and no interrupts).
    *cpuid* is a hook
    ``cpuid(entries, vcpu_id) -> entries`` that may change the CPUID entries each vCPU gets.
    *map_memory*: map RAM and the image (platform.load_firmware); False if done already."""

    def __init__(self, vm: Vm, image: bytes | None, *, ram_size: int, cpus: int = 1, disk: str | None = None,
                 disk_readonly: bool = False, serial_sink: Callable[[bytes], object] | None = None,
                 cpuid: CpuidHook | None = None, boot_menu: bool = False,
                 map_memory: bool = True, pit: bool = True, test_device: bool = False, machine: str = "pc",
                 devices: Iterable[str] = ()) -> None:
        check_cpus(cpus)
        devices = q35.check(machine, devices)
        if machine == "q35" and image is not None:
            raise InvalidArgumentError("the q35 machine boots kernels only (no firmware here knows it)")
        if cpus > 1 and not vm.has_irqchip:
            raise InvalidArgumentError("more than one vCPU needs the in-kernel irqchip (irqchip=True): "
                                       "firmware starts application processors through the local APIC")
        self.vm, self.cpus, self.cpuid_hook, self.ram_size = vm, cpus, cpuid, ram_size
        self.image = None if image is None else bytes(image)    # None: a kernel loaded without firmware
        if map_memory:
            if self.image is None:
                raise InvalidArgumentError("map_memory maps a firmware image: pass one, or map_memory=False")
            platform.load_firmware(vm, self.image, ram_size=ram_size)
        for call, addr in ((vm.set_tss_addr, TSS_ADDR), (vm.set_identity_map_addr, IDENTITY_MAP_ADDR)):
            try:
                call(addr)
            except OSError:
                pass        # only VT-x without unrestricted guest needs them; others may refuse
        self.q35 = q35.Q35Parts(vm, ram_size=ram_size, devices=devices) if machine == "q35" else None
        self.split = self.q35 is not None
        self.in_kernel_pit = bool(vm.has_irqchip and pit and not self.split)
        if self.in_kernel_pit:
            vm.create_pit2()
        irqs = vm if self.q35 is None else self.q35.ioapic       # where the ISA interrupt lines go
        self.uart = Uart8250(COM1, irq=Irq(irqs, 4), sink=serial_sink)
        self.fw_cfg = FwCfg(vm, ram_size=ram_size, cpus=cpus, boot_menu=boot_menu,
                            files={"etc/sercon-port": struct.pack("<H", COM1)})
        self.disk = AtaDisk(disk, readonly=disk_readonly) if disk else None
        self.cmos = Cmos(ram_size, cpus=cpus)
        pci = [PciHost()] if self.q35 is None else self.q35.devices
        self.devices = [Debugcon(), self.cmos, self.fw_cfg, *pci, I8042(), Port92(), self.uart]
        if (self.split or not vm.has_irqchip) and pit:
            self.devices.append(Pit())
        self.pm: AcpiPm | None = None
        if self.image is None:          # a kernel without firmware: the tables firmware would leave
            self.pm = AcpiPm(acpi.PM_BASE, on_sleep=self.request_sleep)
            self.devices.append(self.pm)
            iommu = self.q35 is not None and self.q35.iommu is not None
            _, tables = acpi.tables(cpus=cpus, iommu=q35.IOMMU_BASE if iommu else None)
            vm.write(acpi.BASE, tables)
        if test_device:
            self.devices.append(PcTestdev(irqs))
        if self.disk is not None:
            self.devices.append(self.disk)
        for d in self.devices:
            if hasattr(d, "request_reset"):
                d.request_reset = self.request_reset
            d.install(vm)
        self._chip_state = self._save_chips()
        self.pending: str | None = None     # "reset", or why the run ends
        self.reset_reason = ""
        self.resets = 0
        self.vcpus: list[tuple[Vcpu, dict[str, Any]]] = []     # (vcpu, its power-on state)
        self._handles: list[Any] = []
        self._barrier = threading.Barrier(cpus)
        self._lock = threading.Lock()
        self.finished = threading.Event()   # set when the run is over (close())

    # --- vCPUs ----------------------------------------------------------------
    def add_vcpu(self, vcpu: Vcpu) -> None:
        """Give a new vCPU (in its reset state, never run) its CPUID; remember that state."""
        entries = default_cpuid(self.vm.kvm, vcpu.id, self.cpus)
        if self.cpuid_hook is not None:
            entries = self.cpuid_hook(entries, vcpu.id)
        vcpu.set_cpuid2(entries)
        if vcpu.id == 0:        # SMBIOS describes the processors by what vCPU 0 was given
            self._add_smbios(entries)
        with self._lock:
            self.vcpus.append((vcpu, vcpustate.capture(vcpu)))
            self._handles.append(vcpu.handle())

    def _add_smbios(self, entries: list[dict[str, int]]) -> None:
        leaf1 = next((e for e in entries if e["function"] == 1), None)
        anchor, blob = smbios.tables(ram_size=self.ram_size, cpus=self.cpus,
                                     cpuid_1=(leaf1["eax"], leaf1["edx"]) if leaf1 else (0, 0))
        self.fw_cfg.add_file("etc/smbios/smbios-anchor", anchor)
        self.fw_cfg.add_file("etc/smbios/smbios-tables", blob)

    def _kick_all(self) -> None:
        with self._lock:
            handles = list(self._handles)
        for h in handles:
            try:
                h.kick()
            except KvmsysError:     # a vCPU already gone (stale handle) has nothing to leave
                pass

    # --- requests from devices and the host -----------------------------------
    def request_reset(self, why: str) -> bool:
        """A device asks for a reset: every vCPU leaves KVM_RUN and the runner resets."""
        if self.pending is None:
            self.pending, self.reset_reason = "reset", why
        self._kick_all()
        return True

    def request_sleep(self, state: int) -> bool:
        """The PM device's SLP_EN: S3 suspends every vCPU until a wake-up (see
        synchronized_resume), S5 ends the run."""
        if state == 5:
            self.stop("POWEROFF")
        elif self.pending is None:
            self.pending = "suspend"
            self._kick_all()
        return True

    def stop(self, why: str) -> None:
        """End the run (from any thread): every vCPU's run loop returns, also one waiting
        for the others in a reset."""
        self.pending = why
        self._barrier.abort()
        self._kick_all()

    # --- reset ----------------------------------------------------------------
    def _save_chips(self) -> tuple[list[bytes], bytes | None] | None:
        if not self.vm.has_irqchip or self.split:         # split: the IOAPIC is a device here
            return None
        return ([self.vm.get_irqchip(i) for i in range(3)], self.vm.get_pit2() if self.in_kernel_pit else None)

    def reset_platform(self) -> None:
        """Devices, in-kernel chips and firmware back to power-on (vCPUs: reset_vcpu)."""
        for d in self.devices:
            d.reset()
        if self._chip_state is not None:
            chips, pit = self._chip_state
            for c in chips:
                self.vm.set_irqchip(c)
            if pit is not None:
                self.vm.set_pit2(pit)
        if self.image is not None:
            platform.copy_firmware(self.vm, self.image)
        self.resets += 1

    def reset_vcpu(self, vcpu: Vcpu) -> None:
        for v, state in self.vcpus:
            if v is vcpu:
                vcpustate.apply(vcpu, state)
                return

    def synchronized_reset(self, vcpu: Vcpu, timeout: float | None) -> None:
        """Called by every vCPU thread once it saw a reset request: one resets the platform
        while all wait, then each resets its vCPU, and all start together."""
        try:
            if self._barrier.wait(timeout) == 0:
                self.reset_platform()
                self.pending = None
            self._barrier.wait(timeout)
            self.reset_vcpu(vcpu)
            self._barrier.wait(timeout)
        except threading.BrokenBarrierError:
            if self.pending in (None, "reset"):     # not stopped: a vCPU never came (deadline)
                self.pending = "DEADLINE"

    def synchronized_resume(self, vcpu: Vcpu, deadline: float) -> None:
        """Called by every vCPU thread once it saw a suspend request: one waits for the
        wake-up (the RTC alarm, checked at each second; *deadline*: time.monotonic() when
        the run ends) while all wait; then each vCPU is put back in its power-on state and
        the boot vCPU enters real mode at the FACS's waking vector.  A zero vector, as on a
        PC whose firmware then boots afresh, is a reset, which ends a kernel's run."""
        def until() -> float | None:
            return None if deadline == float("inf") else max(deadline - time.monotonic(), 0.0)
        try:
            if self._barrier.wait(until()) == 0:
                self._sleep_until_wake(deadline)
            self._barrier.wait(until())
            if self.pending is not None:        # the run ends instead
                return
            self.reset_vcpu(vcpu)
            if vcpu.id == 0:
                vector = self._waking_vector()
                enter_real_mode(vcpu, vector >> 4, vector & 0xF)
            self._barrier.wait(until())
        except threading.BrokenBarrierError:
            if self.pending in (None, "suspend"):
                self.pending = "DEADLINE"

    def _waking_vector(self) -> int:
        return int.from_bytes(self.vm.read(acpi.FACS + 12, 4), "little")     # firmware_waking_vector

    def _sleep_until_wake(self, deadline: float) -> None:
        """In S3 until the RTC alarm (enabled in PM1_EN and the RTC) fires or the run ends;
        then the PM registers say the machine woke, or the run ends as a reset when
        there is no waking vector to resume at."""
        update = math.floor(time.time()) + 1.0     # the alarm can fire at the RTC's next update
        while self.pending == "suspend":
            now = time.time()
            if now >= update:
                if self.pm is not None and self.pm.enable & RTC_EN and self.cmos.alarm_matches(update):
                    break
                update = math.floor(now) + 1.0
                continue
            if time.monotonic() >= deadline:
                self.pending = "DEADLINE"
                return
            time.sleep(min(update - now, 0.05))
        if self.pending != "suspend":
            return
        if self.pm is not None:
            self.pm.woke(by_rtc=True)
        self.pending = None if self._waking_vector() else "reset"

    def close(self) -> None:
        self.finished.set()
        if self.disk is not None:
            self.disk.close()
