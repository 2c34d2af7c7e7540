"""What kvm-unit-tests needs from a VMM, tested without the suite (SMP Multiboot with our
own kernel, pc-testdev, ACPI tables, the PM timer and S3 registers, the loader's room for a
low kernel), and the suite itself when KVMSYS_KUT_DIR points at a build of it."""
import os
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FakeVm

import kvmsys.guests
from kvmsys import acpi, kut
from kvmsys.devices import AcpiPm, Cmos, PcTestdev
from kvmsys.errors import InvalidArgumentError
from kvmsys.runner import run_kernel

FIRMWARE = Path(kvmsys.guests.__file__).parent / "firmware"
SMP_KERNEL = (FIRMWARE / "smp_multiboot.bin").read_bytes()


# --- SMP Multiboot ---------------------------------------------------------------
@pytest.mark.parametrize("vcpus", [1, 2, 3])
def test_smp_multiboot_kernel_starts_its_aps_by_init_sipi(abi, vcpus):
    r = run_kernel(SMP_KERNEL, abi=abi, vcpus=vcpus, irqchip=True, timeout=30)
    assert (r.reason, r.status, r.vcpus) == ("STOP", ((vcpus - 1) << 1) | 1, vcpus), r
    assert r.debug == b"smp ok\n"


def test_smp_kernel_without_a_pit(abi):
    """-machine pit=off (vmexit_ipi): no in-kernel PIT, so nothing may save or restore one."""
    r = run_kernel(SMP_KERNEL, abi=abi, vcpus=2, irqchip=True, pit=False, timeout=30)
    assert (r.reason, r.status) == ("STOP", 3), r


def test_smp_kernel_needs_the_irqchip():
    with pytest.raises(InvalidArgumentError, match="irqchip"):
        run_kernel(SMP_KERNEL, vcpus=2, irqchip=False, timeout=5)


def test_cli_runs_an_smp_multiboot_kernel():
    p = subprocess.run([sys.executable, "-m", "kvmsys", "run", "--kernel", str(FIRMWARE / "smp_multiboot.bin"),
                        "--vcpus", "2", "--timeout", "30"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr           # one AP: (1 << 1) | 1
    assert "on 2 vCPU(s): STOP" in p.stdout


# --- pc-testdev ------------------------------------------------------------------
class FakeMmio:
    def __init__(self, address, length, is_write, data=b""):
        self.address, self.length, self.is_write = address, length, is_write
        self.data = memoryview(bytearray(data.ljust(8, b"\0")))


@pytest.mark.nokvm
def test_testdev_data_register_by_byte_word_and_long():
    t = PcTestdev()
    t.write(0xE0, 4, 0x12345678)
    assert [t.read(0xE0 + k, 1) for k in range(4)] == [0x78, 0x56, 0x34, 0x12]
    assert t.read(0xE2, 2) == 0x1234 and t.read(0xE0, 4) == 0x12345678
    t.write(0xE1, 1, 0xAB)
    t.write(0xE2, 2, 0xCDEF)
    assert t.read(0xE0, 4) == 0xCDEFAB78
    t.write(0xE4, 4, 0x1000)                        # flush page: accepted, no state
    assert t.flushes == 1 and t.read(0xE0, 4) == 0xCDEFAB78
    t.reset()
    assert t.read(0xE0, 4) == 0


@pytest.mark.nokvm
def test_testdev_irq_lines_and_iomem():
    t, vm = PcTestdev(), FakeVm()
    t.install(vm)
    t.write(0x2000 + 10, 1, 1)
    t.write(0x2000 + 10, 1, 0)
    t.write(0x2000 + 23, 1, 0x80)
    assert vm.lines == [(10, 1), (10, 0), (23, 1)]
    t.mmio(FakeMmio(0xFF000010, 8, True, b"abcdefgh"))
    rd = FakeMmio(0xFF000012, 4, False)
    t.mmio(rd)
    assert bytes(rd.data[:4]) == b"cdef"
    edge = FakeMmio(0xFF00FFFE, 4, True, b"WXYZ")     # runs past the window: the rest is dropped
    t.mmio(edge)
    assert len(t.iomem) == 0x10000 and t.iomem[-2:] == b"WX"
    rd = FakeMmio(0xFF00FFFE, 4, False)
    t.mmio(rd)
    assert bytes(rd.data[:4]) == b"WX\xff\xff"


# --- ACPI tables -----------------------------------------------------------------
def parse_acpi(mem, base=0xE0000):
    """The tables a guest finds: {signature: bytes}, every checksum checked on the way."""
    rsdp = next(a for a in range(base, 0x100000, 16) if mem[a:a + 8] == b"RSD PTR ")
    assert sum(mem[rsdp:rsdp + 20]) % 256 == 0
    rsdt = struct.unpack_from("<I", mem, rsdp + 16)[0]
    found = {}

    def table(addr):
        sig, length = struct.unpack_from("<4sI", mem, addr)
        data = bytes(mem[addr:addr + length])
        assert sum(data) % 256 == 0, sig
        found[sig] = (addr, data)
        return data
    rsdt_data = table(rsdt)
    for (addr,) in struct.iter_unpack("<I", rsdt_data[36:]):
        table(addr)
    fadt = found[b"FACP"][1]
    facs, dsdt = struct.unpack_from("<II", fadt, 36)
    table(dsdt)
    assert facs % 64 == 0 and mem[facs:facs + 4] == b"FACS" and struct.unpack_from("<I", mem, facs + 4)[0] == 64
    found[b"FACS"] = (facs, bytes(mem[facs:facs + 64]))
    return found


@pytest.mark.nokvm
@pytest.mark.parametrize("cpus", [1, 4])
def test_acpi_tables_parse_and_checksum(cpus):
    mem = bytearray(0x100000)
    rsdp, blob = acpi.tables(cpus=cpus)
    mem[acpi.BASE:acpi.BASE + len(blob)] = blob
    t = parse_acpi(mem)
    assert set(t) == {b"RSDT", b"FACP", b"APIC", b"DSDT", b"FACS"} and acpi.BASE <= rsdp < 0x100000
    fadt = t[b"FACP"][1]
    assert struct.unpack_from("<I", fadt, 56)[0] == 0x600             # PM1a_EVT_BLK
    assert struct.unpack_from("<I", fadt, 64)[0] == 0x604             # PM1a_CNT_BLK
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608             # PM_TMR_BLK
    assert fadt[91] == 4 and struct.unpack_from("<H", fadt, 46)[0] == 9
    madt = t[b"APIC"][1]
    lapics, off = [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        if kind == 0:
            lapics.append(madt[off + 3])
        off += length
    assert off == len(madt) and lapics == list(range(cpus))
    assert t[b"FACS"][0] == acpi.FACS


@pytest.mark.nokvm
def test_acpi_tables_refuse_bad_input():
    for bad in (0, 256):
        with pytest.raises(InvalidArgumentError):
            acpi.tables(cpus=bad)
    with pytest.raises(InvalidArgumentError):
        acpi.tables(cpus=1, base=0xF8000)


def test_a_kernel_finds_the_acpi_tables_in_guest_memory(abi):
    from kvmsys.machine import Machine
    from kvmsys.pc import Pc
    with Machine(abi, memory_size=16 << 20, devices=True, irqchip=True) as m:
        pc = Pc(m.vm, None, ram_size=16 << 20, cpus=2, map_memory=False)
        try:
            t = parse_acpi(m.vm.read(0, 0x100000))
        finally:
            pc.close()
    assert b"FACP" in t and b"APIC" in t


# --- S3 and S5 on the kernel PC (our own kernel) ------------------------------------
S3_KERNEL = (FIRMWARE / "s3_multiboot.bin").read_bytes()


@pytest.mark.parametrize("vcpus", [1, 2])
def test_s3_resumes_at_the_facs_waking_vector_on_the_rtc_alarm(abi, vcpus):
    r = run_kernel(S3_KERNEL, abi=abi, vcpus=vcpus, irqchip=True, cmdline="s", timeout=30)
    # 0x10 | WAK_STS seen (0x20) | marker 0 (the vCPU stopped at the S3 write): (0x30 << 1) | 1
    assert (r.reason, r.status) == ("STOP", 0x61), r
    assert r.elapsed_s < 2.5            # the alarm fires at the RTC's next update, within a second


def test_s3_without_a_wake_up_sleeps_until_the_run_ends(abi):
    r = run_kernel(S3_KERNEL, abi=abi, vcpus=2, irqchip=True, cmdline="n", timeout=1.5)
    assert (r.reason, r.status) == ("DEADLINE", None), r
    assert 1.4 < r.elapsed_s < 10


def test_stopping_a_suspended_machine_ends_the_run_at_once(abi):
    """pc.stop (Ctrl-C's path) reaches a machine in S3: the run ends, not at its deadline."""
    import threading
    import time
    stopped = []

    def on_start(pc):
        def stop():
            while pc.pending != "suspend":
                if pc.finished.wait(0.01):
                    return
            stopped.append(time.monotonic())
            pc.stop("INTERRUPTED")
        threading.Thread(target=stop, daemon=True).start()
    r = run_kernel(S3_KERNEL, abi=abi, vcpus=2, irqchip=True, cmdline="n", timeout=60, on_start=on_start)
    assert r.reason == "INTERRUPTED" and stopped and r.elapsed_s < 10, r


def test_s5_powers_off(abi):
    r = run_kernel(S3_KERNEL, abi=abi, irqchip=True, cmdline="o", timeout=30)
    assert (r.reason, r.status) == ("POWEROFF", None), r


def test_cli_s5_exits_0_as_qemu_on_poweroff():
    p = subprocess.run([sys.executable, "-m", "kvmsys", "run", "--kernel", str(FIRMWARE / "s3_multiboot.bin"),
                        "--append", "o", "--timeout", "30"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "POWEROFF" in p.stdout, p.stdout + p.stderr


# --- PM timer, PM1 registers, S3 request -------------------------------------------
@pytest.mark.nokvm
def test_pm_timer_counts_at_the_acpi_rate_in_24_bits():
    now = [0]
    pm = AcpiPm()
    pm.clock = lambda: now[0]
    pm.t0 = 0
    assert pm.read(0x608, 4) == 0
    now[0] = 1_000_000_000                                  # one second
    assert pm.read(0x608, 4) == 3_579_545
    assert pm.read(0x608, 2) == 3_579_545 & 0xFFFF and pm.read(0x60A, 1) == (3_579_545 >> 16) & 0xFF
    now[0] = 5_000_000_000                                  # 17.9 M ticks wrap at 2^24
    assert pm.read(0x608, 4) == (5 * 3_579_545) & 0xFFFFFF


@pytest.mark.nokvm
def test_pm_timer_runs_on_the_host_clock():
    import time
    pm = AcpiPm()
    a = pm.read(0x608, 4)
    time.sleep(0.02)
    b = pm.read(0x608, 4)
    assert 0.01 * 3_579_545 < (b - a) % (1 << 24) < 2.0 * 3_579_545


@pytest.mark.nokvm
def test_pm1_registers_and_sleep_requests():
    asked = []
    pm = AcpiPm(on_sleep=lambda s: asked.append(s) or True)
    assert pm.read(0x604, 2) & 1 == 1                       # SCI_EN: always in ACPI mode
    pm.write(0x602, 2, 0x400)                               # RTC_EN
    assert pm.read(0x602, 2) == 0x400
    assert pm.write(0x604, 2, 0x2400) is True and asked == [3]      # SLP_TYP 1 + SLP_EN: S3
    assert pm.read(0x604, 2) & 0x2000 == 0                  # SLP_EN reads 0
    pm.write(0x604, 2, 0x2000)                              # SLP_TYP 0: S5
    assert asked == [3, 5]
    pm.write(0x604, 2, 0x2C00)                              # SLP_TYP 3: no such state, nothing
    assert asked == [3, 5]
    pm.woke(by_rtc=True)
    assert pm.read(0x600, 2) == 0x8400
    pm.write(0x600, 2, 0x8000)                              # write 1 to clear
    assert pm.read(0x600, 2) == 0x0400


@pytest.mark.nokvm
def test_cmos_alarm_matches_with_dont_care_fields():
    c = Cmos(16 << 20)
    t = 1767225599.3                                        # 23:59:59
    for reg, v in ((1, 0xC0), (3, 0xC0), (5, 0xC0)):
        c.ram[reg] = v
    assert not c.alarm_matches(t)                           # AIE off
    c.ram[0x0B] |= 0x20
    assert c.alarm_matches(t)
    c.ram[1] = 0x58                                         # seconds 58 (BCD)
    assert not c.alarm_matches(t) and c.alarm_matches(t - 1)


# --- the Multiboot loader and a kernel in its low area -----------------------------
def low_kernel(load=0x8000, size=0x3000):
    """An a.out-kludge Multiboot image loaded at *load* (as the suite's realmode test)."""
    flags = 0x00010000
    hdr = struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF, load, load, load + size,
                      load + size, load)
    return hdr + bytes(size - len(hdr))


@pytest.mark.nokvm
def test_multiboot_loader_moves_its_information_after_a_low_kernel():
    from kvmsys.loaders import MultibootError, load_multiboot
    mem = memoryview(bytearray(16 << 20))
    entry, info = load_multiboot(mem, low_kernel(), cmdline="x86/realmode.flat", modules=[(b"m", "mod")])
    assert entry == 0x8000 and info >= 0xB000 and info < 0x9FC00
    cmdline = struct.unpack_from("<I", mem, info + 16)[0]
    assert bytes(mem[cmdline:cmdline + 18]) == b"x86/realmode.flat\0"
    mod_start = struct.unpack_from("<I", mem, struct.unpack_from("<I", mem, info + 24)[0])[0]
    assert mod_start >= info and bytes(mem[mod_start:mod_start + 1]) == b"m"
    with pytest.raises(MultibootError):
        load_multiboot(mem, low_kernel(load=0x9E000, size=0x2000))     # into the hole below 1 MiB
    with pytest.raises(MultibootError):
        load_multiboot(mem, low_kernel(load=0x100, size=0x1000))       # over the real-mode IVT
    with pytest.raises(MultibootError):
        load_multiboot(mem, low_kernel(load=0x8000, size=0x90000))     # no room left after it


# --- -cpu features ------------------------------------------------------------------
@pytest.mark.nokvm
def test_cpu_features_set_and_clear_cpuid_bits():
    from kvmsys.pc import cpu_features
    entries = [dict(function=1, index=0, eax=0, ebx=0, ecx=1 << 21, edx=0), dict(function=7, index=0, eax=0,
               ebx=0, ecx=0, edx=0)]
    out = cpu_features("-x2apic,+tsc-deadline,+umip")(entries, 0)
    assert out[0]["ecx"] == 1 << 24 and out[1]["ecx"] == 1 << 2
    for bad in ("x2apic", "+nosuch", "+"):
        with pytest.raises(InvalidArgumentError):
            cpu_features(bad)


# --- the runner's reading of unittests.cfg -----------------------------------------
CFG = """
# a comment
[smptest3]
file = smptest.flat
smp = 3

[vmexit_inl_pmtimer]
file = vmexit.flat
test_args = 'inl_from_pmtimer'
groups = vmexit

[xapic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,-x2apic,+tsc-deadline -m 256
timeout = 60

[intel_iommu]
file = intel-iommu.flat
qemu_params = -M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu

[cet]
file = cet.flat
smp = 2
qemu_params = -enable-kvm -m 2048 -cpu host

[cmpxchg8b]
file = cmpxchg8b.flat
arch = i386
"""


@pytest.mark.nokvm
def test_kut_reads_unittests_cfg_and_maps_qemu_params(tmp_path):
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "unittests.cfg").write_text(CFG)
    tests = {t.name: t for t in kut.parse_cfg(str(tmp_path / "x86" / "unittests.cfg"))}
    assert list(tests) == ["smptest3", "vmexit_inl_pmtimer", "xapic", "intel_iommu", "cet", "cmpxchg8b"]
    assert kut.kvmsys_options(tests["cet"]) == (["--memory", "2048"], None)
    assert tests["smptest3"].smp == 3 and tests["vmexit_inl_pmtimer"].test_args == "inl_from_pmtimer"
    assert tests["xapic"].timeout == 60 and tests["smptest3"].timeout == kut.DEFAULT_TIMEOUT
    assert kut.kvmsys_options(tests["xapic"]) == (["--cpu=-x2apic,+tsc-deadline", "--memory", "256"], None)
    assert kut.kvmsys_options(tests["intel_iommu"]) == (["--machine", "q35", "--device", "intel-iommu", "--device",
                                                         "edu"], None)
    for params, refused in (("-M q35,smm=on", "-M q35,smm=on"), ("-device intel-iommu,eim=on", "-device "
                            "intel-iommu,eim=on"), ("-device edu,dma_mask=0xff", "-device edu,dma_mask=0xff")):
        assert kut.kvmsys_options(kut.Test("t", "t.flat", qemu_params=params))[1] == refused
    cmd, why = kut.command(tests["vmexit_inl_pmtimer"], str(tmp_path), "kvmsys", "fd", 90)
    kernel = str(tmp_path / "x86" / "vmexit.flat")
    assert why is None and cmd[cmd.index("--append") + 1] == f"{kernel} inl_from_pmtimer"
    assert cmd[cmd.index("--vcpus") + 1] == "1" and "--test-device" in cmd and cmd[cmd.index("--abi") + 1] == "fd"
    r = kut.run_test(tests["cmpxchg8b"], str(tmp_path))
    assert r.verdict == "SKIP" and "i386" in r.detail
    r = kut.run_test(tests["smptest3"], str(tmp_path))
    assert r.verdict == "SKIP" and "not built" in r.detail
    assert [kut.verdict_of(s) for s in (1, 3, 155, 0, 2, None)] == ["PASS", "FAIL", "SKIP", "FAIL", "FAIL", "FAIL"]
    broken = tmp_path / "x86" / "smptest.flat"            # kvmsys itself fails (here: not a kernel)
    broken.write_bytes(b"\0" * 64)
    r = kut.run_test(tests["smptest3"], str(tmp_path))
    assert r.verdict == "FAIL" and r.detail.startswith("kvmsys failed"), r
    summary = "--- x86/sieve.flat over the sys ABI on 1 vCPU(s): DEADLINE, exit status none, 30000.0 ms"
    assert kut._summary(f"starting sieve\nstatic:{summary}\nexits: 138\n") == summary    # after an unfinished line



@pytest.mark.nokvm
def test_kut_runs_no_command_that_unittests_cfg_names(tmp_path):
    # x86/run evals each entry in a shell; the file is untrusted: only `date +%s` is honoured,
    # computed in Python, and any other expansion makes the test a SKIP that says why
    ran = tmp_path / "ran"
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "kvmclock.flat").write_bytes(b"")
    (tmp_path / "x86" / "unittests.cfg").write_text(f"""
[kvmclock_test]
file = kvmclock.flat
test_args = "10000000 `date +%s`"

[backtick]
file = kvmclock.flat
test_args = "1 `touch {ran}`"

[dollar]
file = kvmclock.flat
test_args = '$(touch {ran}) `date +%s`'

[unmatched]
file = kvmclock.flat
test_args = "1 `date +%s"
""")
    tests = {t.name: t for t in kut.parse_cfg(str(tmp_path / "x86" / "unittests.cfg"))}
    for vmm in ("kvmsys", "qemu"):
        for name, why in (("backtick", f"runs `touch {ran}`"), ("dollar", "'$'"), ("unmatched", "unmatched")):
            r = kut.run_test(tests[name], str(tmp_path), vmm=vmm)
            assert r.verdict == "SKIP" and why in r.detail and r.status is None, r
            with pytest.raises(InvalidArgumentError, match="kvmsys runs no"):
                kut.command(tests[name], str(tmp_path), vmm, "sys", 90)
    assert not ran.exists()
    before = int(time.time())
    for vmm, flag in (("kvmsys", "--append"), ("qemu", "-append")):
        cmd, why = kut.command(tests["kvmclock_test"], str(tmp_path), vmm, "sys", 90)
        loops, stamp = cmd[cmd.index(flag) + 1].split()[-2:]
        assert why is None and loops == "10000000" and before <= int(stamp) <= time.time()



@pytest.mark.nokvm
def test_kut_log_names_the_command_that_ran(tmp_path, monkeypatch):
    # the log's first line is the command run_test ran (the capped timeout, the same clock
    # reading), not one built again afterwards
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "kvmclock.flat").write_bytes(b"")
    (tmp_path / "x86" / "unittests.cfg").write_text(
        '[kvmclock_test]\nfile = kvmclock.flat\ntest_args = "7 `date +%s`"\ntimeout = 90\n')
    ran = []
    clock = iter(range(1000, 2000))

    def fake_run(cmd, **kwargs):
        ran.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 1, b"PASS\n", b"")
    monkeypatch.setattr(kut.subprocess, "run", fake_run)
    monkeypatch.setitem(kut.SUBSTITUTIONS, "date +%s", lambda: str(next(clock)))   # a new reading per call
    log = tmp_path / "log"
    kut.main([str(tmp_path), "--vmm", "qemu", "--timeout-cap", "5", "--log", str(log)])
    assert len(ran) == 1
    assert (log / "kvmclock_test.log").read_text().splitlines()[0] == " ".join(shlex.quote(c) for c in ran[0])


# --- the suite itself ----------------------------------------------------------------
KUT_DIR = os.environ.get("KVMSYS_KUT_DIR")
# Tests QEMU passes on our host (README: kvm-unit-tests), which kvmsys must pass on both ABIs.
KUT_CHOSEN = ("smptest", "smptest3", "vmexit_cpuid", "vmexit_inl_pmtimer", "vmexit_ipi", "vmexit_ipi_halt",
              "vmexit_tscdeadline", "vmexit_cr0_wp", "s3", "realmode", "intel_iommu")


@pytest.mark.skipif(not KUT_DIR, reason="env: KVMSYS_KUT_DIR does not point at a kvm-unit-tests build "
                                        "(README: kvm-unit-tests)")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", KUT_CHOSEN)
def test_kvm_unit_tests_pass(abi, name):
    tests = {t.name: t for t in kut.parse_cfg(os.path.join(KUT_DIR, "x86", "unittests.cfg"))}
    r = kut.run_test(tests[name], KUT_DIR, abi=abi, timeout_cap=120)
    assert r.verdict == "PASS", f"{r.verdict} {r.detail}\n{r.output[-3000:]}"
