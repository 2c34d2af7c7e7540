"""Suite `console`: console output, one exit per byte vs a coalesced PIO zone, and the
host's floor for a write KVM handles without leaving the kernel.

The guest console_flood writes bytes to the debugcon port without polling.
Without coalescing every byte is a KVM_EXIT_IO handled by the C sink; with a
coalesced PIO zone on the port the kernel batches the writes in a ring that
the run loop drains after each KVM_RUN, and exits only when the ring is full.
The floor: the same port behind an ioeventfd, which KVM signals from inside the
kernel for each write (no exit at all; nothing reads the eventfd while the guest
runs).  All three on one vCPU of one VM per guest mode, switched between samples
(interleaved): two VMs differ by up to ~1 µs per exit on our host."""
from __future__ import annotations

import os
import time

import kvmsys
from kvmsys import platform
from kvmsys.guests import layout

from kvmsys.enums import Kind
from kvmsys.machine import Machine

from .guestvm import PIO, mode_label
from .harness import SuiteResult, Stat, derive, interleave, progress

NAME = "console"
TITLE = "Console output: an exit per byte vs a coalesced PIO zone vs the in-kernel floor"
HOWS = ("per_exit", "coalesced", "floor")


class _NoBytes(Exception):
    pass


class _Console:
    """One VM and vCPU running console_flood; the port's handling switched per sample."""

    def __init__(self, kvm, mode: str):
        self.m = Machine("fd", kvm=kvm)
        vm = self.m.vm
        vm.add_handler(PIO, layout.PORT_DEBUGCON, layout.PORT_DEBUGCON + 1, Kind.SINK)
        vm.add_handler(PIO, platform.DEBUG_EXIT_PORT, platform.DEBUG_EXIT_PORT + 1, Kind.EXIT)
        self.vcpu = self.m.attach(0)
        self.native = self.m.load(f"console_flood.{mode}", n=0)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.how = "per_exit"

    def switch(self, how: str) -> None:
        vm = self.m.vm
        if how == self.how:
            return
        if self.how == "coalesced":
            left = vm.register_coalesced(layout.PORT_DEBUGCON, 1, pio=True, unregister=True)
            assert not left, left       # SINK writes are applied there and then
        elif self.how == "floor":
            vm.ioeventfd(self.efd, layout.PORT_DEBUGCON, 1, pio=True, deassign=True)
        if how == "coalesced":
            vm.register_coalesced(layout.PORT_DEBUGCON, 1, pio=True)
        elif how == "floor":
            vm.ioeventfd(self.efd, layout.PORT_DEBUGCON, 1, pio=True)
        self.how = how

    def sample(self, how: str, seconds: float) -> tuple:
        """(ns per byte, KVM exits per 1000 bytes, bytes) over a run(timeout=seconds), the
        time doubled (up to 16×) while the guest wrote nothing in it (a host busy elsewhere)."""
        for _ in range(5):
            try:
                return self._sample(how, seconds)
            except _NoBytes:
                seconds *= 2
        raise RuntimeError(f"console_flood ({how}) wrote nothing in {seconds * 1e3 / 2:g} ms")

    def _sample(self, how: str, seconds: float) -> tuple:
        self.switch(how)
        vm, vcpu = self.m.vm, self.vcpu
        vm.console(clear=True)
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        before = vcpu.stats()["total_exits"]
        t0 = time.perf_counter_ns()
        ex = vcpu.run(timeout=seconds)
        elapsed = time.perf_counter_ns() - t0
        if not isinstance(ex, kvmsys.DeadlineExit):
            raise RuntimeError(f"console_flood ({how}) stopped with {ex!r} before its deadline")
        if how == "floor":
            try:
                nbytes = os.eventfd_read(self.efd)      # the writes KVM signalled
            except BlockingIOError:
                nbytes = 0
            nbytes += len(vm.console(clear=True))       # (none: no exit reaches the sink)
        else:
            nbytes = len(vm.console(clear=True))
        if nbytes == 0:
            raise _NoBytes()
        return elapsed / nbytes, (vcpu.stats()["total_exits"] - before) * 1000 / nbytes, nbytes

    def close(self) -> None:
        os.close(self.efd)
        self.m.close()


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    res = SuiteResult(NAME, TITLE, columns=[("mode", "guest mode"), ("how", "console bytes go out"),
                                            ("time", "per byte"), ("exits", "KVM exits per 1000 bytes"),
                                            ("ratio", "per byte, vs one exit per byte"),
                                            ("vs_floor", "per byte, vs the in-kernel floor")])
    # The profile's mode, and 64-bit too: on a PVM host that one runs natively, where a
    # trapped `out` costs what it costs on hardware virtualization.
    modes = list(dict.fromkeys([profile.mode, "long64"]))
    # at least 5 ms: a native 64-bit guest's first entries can take most of a millisecond here
    seconds = max(profile.sample_ms, 5.0) / 1e3
    exits: dict = {}
    counts: dict = {}
    with kvmsys.Kvm() as kvm:
        consoles = {mode: _Console(kvm, mode) for mode in modes}
        try:
            def variant(mode, how):
                def sample():
                    per_byte, per_k, nbytes = consoles[mode].sample(how, seconds)
                    exits.setdefault((mode, how), []).append(per_k)
                    counts.setdefault((mode, how), []).append(nbytes)
                    return per_byte
                return sample

            progress(f"{NAME}: {profile.reps} reps of {seconds * 1e3:g} ms each, modes {', '.join(modes)}")
            samples = interleave({f"{mode}/{how}": variant(mode, how) for mode in modes for how in HOWS},
                                 profile.reps, profile.warmup)
            native = {mode: c.native for mode, c in consoles.items()}
        finally:
            for c in consoles.values():
                c.close()
    labels = {"per_exit": "C sink handler, one KVM exit per byte",
              "coalesced": "C sink handler behind a coalesced PIO zone (`vm.register_coalesced(0xe9, 1, pio=True)`)",
              "floor": "floor: an ioeventfd on the port (KVM signals it in the kernel, no exit)"}
    for mode in modes:
        for how in HOWS:
            row = f"{mode}/{how}"
            n = len(samples[row])
            res.add_row(row, {"mode": mode_label(mode, native[mode]), "how": labels[how]},
                        {"time": Stat(samples[row], "ns"), "exits": Stat(exits[(mode, how)][-n:], "")})
        for how in ("coalesced", "floor"):
            res.rows[f"{mode}/{how}"]["stats"]["ratio"] = derive(res.rows, "time", f"{mode}/{how}",
                                                                  f"{mode}/per_exit", "ratio")
        for how in ("per_exit", "coalesced"):
            res.rows[f"{mode}/{how}"]["stats"]["vs_floor"] = derive(res.rows, "time", f"{mode}/{how}",
                                                                     f"{mode}/floor", "ratio")
        floor_exits = max(exits[(mode, "floor")])
        res.check(f"{mode} floor", floor_exits <= 1000 / min(counts[(mode, "floor")]),
                  f"{mode}: behind the ioeventfd the guest's writes made no exit but the deadline's "
                  f"(at most {floor_exits:.3g} per 1000 bytes)")
    res.config = dict(modes=modes, sample_ms=seconds * 1e3, reps=profile.reps)
    res.notes += [
        f"Guest console_flood with n=0 (endless) on one vCPU per mode; each sample is run(timeout="
        f"{seconds * 1e3:g} ms), divided by the bytes written (the C sink's console, or the "
        "ioeventfd's count).  The three ways alternate on that vCPU (the zone or the ioeventfd "
        "registered and removed between samples, not timed).",
        "The coalesced ring holds one page of entries: the guest exits when it is full, and the run loop "
        "drains it after every KVM_RUN.",
        "The floor is what this host's KVM spends on one port write it handles without leaving the kernel: "
        "the guest's `out`, decoded (emulated, or trapped from a native guest) and passed to an ioeventfd.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
