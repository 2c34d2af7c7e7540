"""Stop-the-world for the process VM (syscall ABI), and snapshot / restore::

    with kvmsys.smp.paused():           # every bound vCPU has left KVM_RUN and waits
        snap = kvmsys.smp.snapshot()    # picklable: vCPU states, guest memory, configuration
    ...
    states = kvmsys.smp.restore(snap)   # in a process without a process VM (a fork child)
    # then in N threads, in vCPU id order:  kvmsys.add_vcpu(); kvmsys.smp.apply_vcpu_state(states[i])

How a pause works: pause() queues a call on each bound vCPU (VcpuHandle.call_soon),
which kicks it out of KVM_RUN; its owning thread runs the call inside run() at that
exit, and the call blocks there (acknowledging first) until resume().  Nothing is
lost on the way: the run loop had already handled the exit it stopped at, a kick sent
while paused stays pending and ends the owner's run() with KickExit after resume, and
exits stay counted in the vCPU's stats.  The only new exits are INTR ones (one per
pause per vCPU that was inside KVM_RUN).  A paused vCPU stopped at an instruction
boundary with any I/O it started completed (KVM_RUN returned EINTR), so its state is
consistent and can be saved.

Precondition: every vCPU bound when pause() is called is driven by a run loop, i.e.
its thread is inside run() (``vcpu.active``) or will call run() again, and will not
remove its vCPU first.  Waiting for all acknowledgements
is then enough: a vCPU between two run() calls parks as soon as it re-enters.  A vCPU
whose thread never calls run() again cannot park: pause() raises TimeoutError after
*timeout* and resumes the others (its queued call then returns at once if it ever
runs).  The calling thread's own vCPU, if it has one, counts as paused: its thread is
here, not in run().  Note that run(timeout=...) counts paused time too.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import _core, pvm, syscall, vcpustate
from .fd import Vm
from .errors import (ArgumentTypeError, InvalidArgumentError, OperationTimeoutError, StaleVcpuError,
                     StateError, VcpuBindingError)

__all__ = ["pause", "resume", "paused", "is_paused", "snapshot", "restore", "apply_vcpu_state",
           "capture_vcpu_state", "Snapshot", "MemoryImage"]

_RESUME = None          # the inbox message that ends a park


class _Part:
    """One vCPU's share of one pause: its acknowledgement and its inbox."""

    def __init__(self, vcpu: syscall.ThreadVcpu) -> None:
        self.vcpu = vcpu
        self.arrived = threading.Event()
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()


class _Pause:
    def __init__(self) -> None:
        self.parts: dict[int, _Part] = {}
        self.own: syscall.ThreadVcpu | None = None         # the calling thread's vCPU, paused by being here


_lock = threading.Lock()
_current: _Pause | None = None


def _park(part: _Part) -> None:
    # Runs on the vCPU's owning thread, inside run(), at the exit the kick caused.
    # Serves requests (snapshot captures) until resumed.  A park of a pause that
    # already ended finds _RESUME waiting and returns at once.
    part.arrived.set()
    while True:
        msg = part.inbox.get()
        if msg is _RESUME:
            return
        fn, reply = msg
        try:
            reply.put((True, fn(part.vcpu)))
        except BaseException as e:      # handed to the requester, never raised into run()
            reply.put((False, e))


def _check_timeout(timeout: object) -> None:
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise ArgumentTypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 <= timeout < float("inf"):
        raise InvalidArgumentError(f"timeout must be finite non-negative seconds, not {timeout!r}")


def _release(p: _Pause) -> None:
    for part in p.parts.values():
        part.inbox.put(_RESUME)


def is_paused() -> bool:
    return _current is not None


def pause(timeout: float = 5.0) -> list[int]:
    """Stop every vCPU bound to a thread; return their ids once all are parked.

    Raises StateError if already paused, OperationTimeoutError (a TimeoutError; after
    resuming the others) if some vCPU did not park within *timeout* seconds (see the
    module's precondition)."""
    global _current
    _check_timeout(timeout)
    with _lock:
        if _current is not None:
            raise StateError("the process VM is already paused: resume() first")
        p = _Pause()
        _current = p
    try:
        own = syscall.current()
        p.own = own
        for vcpu_id, vcpu in sorted(syscall.vcpus().items()):
            if vcpu is own:
                continue
            part = _Part(vcpu)
            try:
                vcpu.handle().call_soon(_park, part)
            except (StaleVcpuError, StateError):
                continue        # removed (or closed) since vcpus() listed it: nothing to stop
            p.parts[vcpu_id] = part
        deadline = time.monotonic() + timeout
        late = [i for i, part in p.parts.items()
                if not part.arrived.wait(max(0.0, deadline - time.monotonic()))]
        if late:
            raise OperationTimeoutError(f"vCPU(s) {late} did not pause within {timeout} s: is every bound "
                               f"vCPU's thread running it (inside run() or about to call it)?")
    except BaseException:
        with _lock:
            _current = None
        _release(p)
        raise
    ids = sorted(p.parts) + ([own.id] if own is not None else [])
    return sorted(ids)


def resume() -> None:
    """Let every paused vCPU go on (StateError if not paused)."""
    global _current
    with _lock:
        p = _current
        if p is None:
            raise StateError("the process VM is not paused")
        _current = None
    _release(p)


@contextlib.contextmanager
def paused(timeout: float = 5.0) -> Iterator[list[int]]:
    """`with paused(): ...` -- pause(), then resume() however the block ends."""
    ids = pause(timeout)
    try:
        yield ids
    finally:
        resume()


# --- snapshot / restore --------------------------------------------------------------

@dataclass
class MemoryImage:
    slot: int
    gpa: int
    flags: int
    data: bytes


@dataclass
class Snapshot:
    """A paused process VM: configuration, guest memory and every vCPU's state.

    VM-level device state (in-kernel PIC/IOAPIC, PIT, kvmclock) is in ``devices``.
    Not included (host-side): fast handlers and the console, and interrupts queued
    through a VcpuHandle without irqchip that the owner had not injected yet."""
    config: dict[str, Any]
    memory: list[MemoryImage] = field(default_factory=list)
    vcpus: list[dict[str, Any]] = field(default_factory=list)     # by vCPU id
    devices: dict[str, Any] = field(default_factory=dict)


_MEM_LOG_DIRTY = _core.MEM_FLAGS["LOG_DIRTY_PAGES"]
_MEM_READONLY = _core.MEM_FLAGS["READONLY"]


def capture_vcpu_state(vcpu: syscall.ThreadVcpu) -> dict[str, Any]:
    """Everything KVM keeps about *vcpu* that kvmsys can read (call it on a stopped vCPU)."""
    return vcpustate.capture(vcpu)


def _ask(part: _Part, fn: Callable[[syscall.ThreadVcpu], Any], timeout: float) -> Any:
    reply: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    part.inbox.put((fn, reply))
    try:
        ok, value = reply.get(timeout=timeout)
    except queue.Empty:
        raise OperationTimeoutError(f"paused vCPU {part.vcpu.id} did not answer within {timeout} s") from None
    if not ok:
        raise value
    return value


def snapshot(timeout: float = 5.0) -> Snapshot:
    """Save the paused process VM (StateError unless paused, with the same vCPUs bound).

    Each vCPU's state is read by its own thread (where it is parked)."""
    _check_timeout(timeout)
    p = _current
    if p is None:
        raise StateError("snapshot() needs a paused VM: call pause() first")
    bound = syscall.vcpus()
    covered = set(p.parts) | ({p.own.id} if p.own is not None else set())
    if set(bound) != covered:
        raise StateError(f"vCPUs bound now {sorted(bound)} are not the paused ones {sorted(covered)}")
    if not bound:
        raise StateError("no vCPU is bound: nothing to snapshot")
    vm = next(iter(bound.values())).vm
    states = {}
    for vcpu_id, part in p.parts.items():
        states[vcpu_id] = _ask(part, capture_vcpu_state, timeout)
    if p.own is not None:
        states[p.own.id] = capture_vcpu_state(p.own)
    memory = [MemoryImage(slot=n, gpa=s.guest_phys_addr, flags=s.flags, data=bytes(s.view()))
              for n, s in sorted(vm.memory_slots.items())]
    return Snapshot(config=syscall.config(), memory=memory,
                    vcpus=[states[i] for i in sorted(states)], devices=capture_vm_devices(vm))


def capture_vm_devices(vm: Vm) -> dict[str, Any]:
    """The VM's in-kernel device state: irqchips, PIT, kvmclock (raw kernel structs)."""
    devices: dict[str, Any] = {"clock": vm.get_clock()}
    if vm.has_irqchip:
        devices["irqchip"] = [vm.get_irqchip(chip) for chip in (0, 1, 2)]
        if syscall.config().get("pit"):
            devices["pit2"] = vm.get_pit2()
    return devices


def restore(snap: Snapshot) -> list[dict[str, Any]]:
    """Recreate a snapshot's process VM in this process: configuration and memory.

    There must be no process VM (a fork child, or after destroy_vm()): else
    ConfigurationError.  Returns the vCPU states by id; each of N threads then calls
    kvmsys.add_vcpu() -- one after the other, so that ids come out 0, 1, ... as in
    the snapshot -- and apply_vcpu_state(its state), then runs.  Fast handlers
    (e.g. kvmsys.runner.setup_devices) are the caller's to install again."""
    if not isinstance(snap, Snapshot):
        raise ArgumentTypeError(f"restore() takes a Snapshot, not {type(snap).__name__}")
    syscall.configure(**snap.config)
    vm = syscall.vm()
    for img in snap.memory:
        slots = vm.memory_slots
        if img.slot in slots and (slots[img.slot].guest_phys_addr != img.gpa
                                  or slots[img.slot].size != len(img.data)):
            vm.remove_memory(img.slot)
            slots = vm.memory_slots
        if img.slot not in slots:
            vm.add_memory(img.slot, img.gpa, len(img.data),
                          readonly=bool(img.flags & _MEM_READONLY),
                          log_dirty=bool(img.flags & _MEM_LOG_DIRTY))
        vm.memory(img.slot)[:] = img.data
    for chip in snap.devices.get("irqchip", ()):
        vm.set_irqchip(chip)
    if "pit2" in snap.devices:
        vm.set_pit2(snap.devices["pit2"])
    if "clock" in snap.devices:
        vm.set_clock(snap.devices["clock"])
    return [dict(s) for s in snap.vcpus]


def apply_vcpu_state(state: dict[str, Any], *, check_id: bool = True, pvm_page: int | None = None) -> list[int]:
    """Load a saved vCPU state into the calling thread's vCPU (before it runs).

    check_id: the vCPU id must be the saved one (its APIC id and MSI routing follow it).
    pvm_page: on a PVM host, let a 64-bit guest run natively (kvmsys.pvm.enable_native).
    Returns the indices of saved MSRs that differ from the vCPU's and that KVM refused
    to write (usually none)."""
    vcpustate.check(state)
    vcpu = syscall.current()
    if vcpu is None:
        raise VcpuBindingError("this thread has no vCPU: call add_vcpu() first")
    if check_id and vcpu.id != state["id"]:
        raise StateError(f"this thread's vCPU has id {vcpu.id}, the state is of vCPU {state['id']}: "
                         f"add the vCPUs in id order, or pass check_id=False")
    if pvm_page is not None:
        pvm.enable_native(vcpu, pvm_page)
    return vcpustate.apply(vcpu, state)


def _after_fork_in_child() -> None:
    # The parent's pause (and its parked threads) do not exist in the child.
    global _current, _lock
    _current = None
    _lock = threading.Lock()


_core.on_first_vm(lambda: os.register_at_fork(after_in_child=_after_fork_in_child))
