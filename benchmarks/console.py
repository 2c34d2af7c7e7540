"""Suite `console`: console output, one exit per byte vs a coalesced PIO zone.

The guest console_flood writes bytes to the debugcon port without polling.
Without coalescing every byte is a KVM_EXIT_IO handled by the C sink; with a
coalesced PIO zone on the port the kernel batches the writes in a ring that
the run loop drains after each KVM_RUN, and exits only when the ring is full."""
from __future__ import annotations

import time

import kvmsys
from kvmsys import platform
from kvmsys.guests import layout

from kvmsys.enums import Kind
from kvmsys.machine import Machine

from .guestvm import PIO, mode_label
from .harness import SuiteResult, Stat, calibrate_count, derive, interleave, progress

NAME = "console"
TITLE = "Console output: an exit per byte vs a coalesced PIO zone"


def _machine(kvm, mode: str, coalesced: bool):
    m = Machine("fd", kvm=kvm)
    vm = m.vm
    vm.add_handler(PIO, layout.PORT_DEBUGCON, layout.PORT_DEBUGCON + 1, Kind.SINK)
    vm.add_handler(PIO, platform.DEBUG_EXIT_PORT, platform.DEBUG_EXIT_PORT + 1, Kind.EXIT)
    if coalesced:
        vm.register_coalesced(layout.PORT_DEBUGCON, 1, pio=True)
    vcpu = m.attach(0)
    native = m.load(f"console_flood.{mode}", n=0)
    return m, vcpu, native


def run(profile) -> SuiteResult:
    t_start = time.perf_counter()
    res = SuiteResult(NAME, TITLE, columns=[("mode", "guest mode"), ("how", "console bytes go out"),
                                            ("time", "per byte"), ("exits", "KVM exits per 1000 bytes"),
                                            ("ratio", "per byte, vs one exit per byte")])
    # The profile's mode, and 64-bit too: on a PVM host that one runs natively, where a
    # trapped `out` costs what it costs on hardware virtualization.
    modes = list(dict.fromkeys([profile.mode, "long64"]))
    with kvmsys.Kvm() as kvm:
        machines = {(mode, key): _machine(kvm, mode, key == "coalesced")
                    for mode in modes for key in ("per_exit", "coalesced")}
        exits = {m: [] for m in machines}
        # exits per sample, calibrated at run time per machine (a coalesced exit carries a
        # ring of writes, so it needs far fewer for a sample of the same length)
        budgets = {m: calibrate_count(lambda k, v=mc[1]: v.run(budget=k), profile.sample_ms,
                                      2 if m[1] == "coalesced" else profile.min_exits, profile.max_exits,
                                      probe=4 if m[1] == "coalesced" else 20)
                   for m, mc in machines.items()}

        def variant(m):
            machine, vcpu, _ = machines[m]
            vm = machine.vm
            n = budgets[m]

            def sample():
                vm.console(clear=True)
                before = vcpu.stats()["total_exits"]
                t0 = time.perf_counter_ns()
                vcpu.run(budget=n)
                elapsed = time.perf_counter_ns() - t0
                nbytes = len(vm.console(clear=True))
                exits[m].append((vcpu.stats()["total_exits"] - before) * 1000 / nbytes)
                return elapsed / nbytes
            return sample

        progress(f"{NAME}: exits per sample {budgets}, {profile.reps} reps, modes {', '.join(modes)}")
        samples = interleave({f"{mode}/{key}": variant((mode, key)) for mode, key in machines},
                             profile.reps, profile.warmup)
        native = {mode: machines[(mode, "per_exit")][2] for mode in modes}
        for machine, _, _ in machines.values():
            machine.close()
    labels = {"per_exit": "C sink handler, one KVM exit per byte",
              "coalesced": "C sink handler behind a coalesced PIO zone (`vm.register_coalesced(0xe9, 1, pio=True)`)"}
    for mode in modes:
        for key, label in labels.items():
            row = f"{mode}/{key}"
            res.add_row(row, {"mode": mode_label(mode, native[mode]), "how": label},
                        {"time": Stat(samples[row], "ns"), "exits": Stat(exits[(mode, key)][-len(samples[row]):], "")})
        res.rows[f"{mode}/coalesced"]["stats"]["ratio"] = derive(res.rows, "time", f"{mode}/coalesced",
                                                                  f"{mode}/per_exit", "ratio")
    res.config = dict(modes=modes, budgets={f"{md}/{k}": b for (md, k), b in budgets.items()}, reps=profile.reps)
    res.notes += [
        "Guest console_flood with n=0 (endless); each sample is run(budget=N), N calibrated at run time to "
        f"~{profile.sample_ms:g} ms per machine ("
        + ", ".join(f"{md} {k.replace('_', ' ')} {b}" for (md, k), b in budgets.items())
        + "), and is divided by "
        "the bytes that reached the console.",
        "The coalesced ring holds one page of entries: the guest exits when it is full, and the run loop "
        "drains it after every KVM_RUN.",
    ]
    res.elapsed_s = time.perf_counter() - t_start
    return res
