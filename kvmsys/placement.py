"""Where vCPU threads run on the host, and what the scheduler did to them.

Policies for the vCPU threads of the process VM:

- ``float``: the OS decides (the process's own CPU set);
- ``pin``: vCPU i on host CPU i mod n;
- ``balance``: the VM's vCPUs spread over different host CPUs, each new one on the
  CPU with the fewest of its siblings (balance scheduling, Sukwong & Kim, EuroSys 2011).

Per-thread facts come from /proc/self/task/<tid>/{stat,status,sched}.
"""
from __future__ import annotations

import os
from typing import Any

POLICIES = ("float", "pin", "balance")

# The CPU set the process started with: `float` returns threads to it.
_ALLOWED = sorted(os.sched_getaffinity(0))


def allowed_cpus() -> list[int]:
    return list(_ALLOWED)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        from .errors import InvalidArgumentError
        raise InvalidArgumentError(f"placement must be one of {POLICIES}, not {policy!r}")
    return policy


def choose_cpus(policy: str, vcpu_id: int, siblings_cpus: list[int]) -> set[int]:
    """The CPU set for a vCPU thread under *policy*; *siblings_cpus* are the CPUs its
    siblings are pinned to (for ``balance``)."""
    cpus = _ALLOWED
    if policy == "float":
        return set(cpus)
    if policy == "pin":
        return {cpus[vcpu_id % len(cpus)]}
    load = {c: 0 for c in cpus}
    for c in siblings_cpus:
        if c in load:
            load[c] += 1
    return {min(cpus, key=lambda c: (load[c], c))}


def apply(tid: int, cpus: set[int]) -> None:
    # Set only if it differs: most add_vcpu()/remove_vcpu() pairs leave a `float` thread
    # where it was, and the look costs a third of the change (0.6 µs against 1.6 on our
    # AMD PVM host).
    if os.sched_getaffinity(tid) != cpus:
        os.sched_setaffinity(tid, cpus)


def _read(tid: int, name: str) -> str:
    with open(f"/proc/self/task/{tid}/{name}") as f:
        return f.read()


def thread_stats(tid: int) -> dict[str, object]:
    """Host CPU now, migrations between CPUs and context switches of thread *tid*."""
    stat = _read(tid, "stat")
    fields = stat[stat.rindex(")") + 2:].split()
    out: dict[str, Any] = {"host_cpu": int(fields[36]), "migrations": None}    # field 39 of stat(5)
    for line in _read(tid, "status").splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            out["voluntary_ctxt_switches"] = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            out["involuntary_ctxt_switches"] = int(line.split()[1])
    try:
        for line in _read(tid, "sched").splitlines():
            if line.startswith("se.nr_migrations"):
                out["migrations"] = int(line.split(":")[1])
    except OSError:
        pass        # kernels without CONFIG_SCHED_DEBUG have no sched file
    out["affinity"] = sorted(os.sched_getaffinity(tid))
    return out
