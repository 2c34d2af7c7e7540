"""The syscall-style ABI: vCPUs bound to threads, one implicit VM per process.

    comm = kvmsys.add_vcpu()     # this thread now has a vCPU (and the process a VM)
    kvmsys.run()                 # runs *this thread's* vCPU: no argument, no lock
    kvmsys.remove_vcpu()

The binding itself (a C thread-local pointer, the handle, the kick) is in the
compiled core; this module holds the policy: the process VM's configuration,
its creation, recycling of kernel vCPUs, and fork.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import inspect
import os
import threading
from typing import Any, Callable, Iterable, Iterator, Literal, cast

from . import _core, platform, vcpustate
from . import placement as _placement
from .errors import (ArgumentTypeError, ConfigurationError, InvalidArgumentError, KvmOSError, KvmsysError,
                     StateError, VcpuBindingError)
from .fd import Kvm, Vm, Vcpu

__all__ = ["configure", "add_vcpu", "run", "remove_vcpu", "current", "handle", "vm",
           "destroy_vm", "config", "vcpus", "set_placement", "fresh_vm", "DEFAULTS"]

# The VM belongs to the process: one lock guards its creation and the vCPU pool
# (add/remove only; run() never takes it).
_lock = threading.Lock()
_kvm: Kvm | None = None
_vm: "ProcessVm | None" = None
_vm_pid = 0                              # the process that created _vm
_pool: dict[int, "ThreadVcpu"] = {}      # released kernel vCPUs by id, ready for reuse
_bound: dict[int, "ThreadVcpu"] = {}     # id -> vCPU bound to some thread


# The state an add/remove step list shares (see _core.steps): keyed by step.
Steps = dict[str, Any]


class ThreadVcpu(Vcpu):
    """A vCPU owned by one thread (the syscall-style ABI)."""
    tid: int | None = None          # native id of the owning thread while bound
    placement: str | None = None    # its placement policy while bound
    _initial: Any = None            # its state when created (captured before its first owner gets it)
    _dirty: bool = False            # in the pool, used by its last owner: reset before the next one

    def set_cpuid2(self, entries: Iterable[dict[str, int]]) -> None:
        """KVM_SET_CPUID2.  KVM freezes a vCPU's CPUID at its first KVM_RUN, for good; a
        recycled vCPU that ran under an earlier owner, and not yet under this one, is
        therefore moved onto a new kernel vCPU (a new id, the lowest free one; the comm
        area stays where it is) when KVM refuses the table, as a new vCPU would take it."""
        changed = self.touched      # before the attempt: a refused ioctl marks it touched
        try:
            return super().set_cpuid2(entries)
        except KvmOSError as e:
            if e.errno != errno.EINVAL or not self.run_before:
                raise
        st: Steps = {"vcpu": self, "changed": changed}
        _core.steps(_lock, (_capture_for_move, (st,)), (_pick_id, (st,)), (_core.move_into, (st, _bound)),
                    (_recapture, (st,)))
        super().set_cpuid2(entries)
        if changed:         # what this owner did before: carried over (KVM order, CPUID first)
            vcpustate.apply(self, st["state"])

    def replace_kernel_vcpu(self, new_id: int) -> None:
        """Move onto a new kernel vCPU *new_id* (see VcpuCore.replace_kernel_vcpu); the
        binding table follows the new id, and recycling resets it to the new one's state.
        All or nothing against a Ctrl-C, as add_vcpu() and remove_vcpu() are."""
        st = {"vcpu": self, "new_id": new_id}
        _core.steps(_lock, (_core.move_into, (st, _bound)), (_recapture, (st,)))

    def stats(self) -> dict[str, Any]:
        """Run-loop counters, plus host CPU, migrations and context switches of its thread."""
        s = super().stats()
        tid = self.tid
        if tid is not None:
            try:
                s.update(_placement.thread_stats(tid))
            except OSError:
                pass        # the thread just ended
        return s


# The steps of a move onto a new kernel vCPU (see _core.steps and add_vcpu below).
def _capture_for_move(st: Steps) -> None:
    if st["changed"]:
        st["state"] = vcpustate.capture(st["vcpu"])


def _pick_id(st: Steps) -> None:
    if "new_id" not in st:
        st["new_id"] = _free_id(st["vcpu"].vm)


def _recapture(st: Steps) -> None:
    # the new kernel vCPU's initial state, what recycling resets it to
    st["vcpu"]._initial = vcpustate.capture(st["vcpu"])


class ProcessVm(Vm):
    """The process's implicit VM."""

    def close(self) -> None:
        """Closing the process VM is destroy_vm(): refused while vCPUs are bound."""
        if self is _vm:
            destroy_vm()
        else:
            super().close()


def configure(*, memory_size: int = 0, irqchip: bool | Literal["split"] = False, pit: bool = False,
              pc_ports: bool = False, placement: str = "float") -> None:
    """Set the configuration of the process VM, before it exists (ConfigurationError
    after: destroy_vm() first).  Each call sets every option; one not named takes its
    default, which is what an fd-ABI VM from Kvm().create_vm() has: nothing.

    :param memory_size: bytes of guest RAM at guest-physical 0, a multiple of 4096 up
        to 1 TiB (reserved lazily); 0: no memory slot (add one with vm().add_memory()).
    :param irqchip: True for KVM's in-kernel PIC, IOAPIC and LAPICs (HLT no longer
        exits with it), "split" for the LAPICs only.
    :param pit: KVM's in-kernel i8254 PIT (needs irqchip=True).
    :param pc_ports: the PC's ports handled in C (kvmsys.platform.install_pc_ports:
        isa-debug-exit, debug console, a serial console, the other ports ignored and
        counted).
    :param placement: how vCPU threads are placed on host CPUs: "float", "pin" or
        "balance" (kvmsys.placement)."""
    new = _checked(dict(memory_size=memory_size, irqchip=irqchip, pit=pit, pc_ports=pc_ports,
                        placement=placement))
    with _lock:
        if _vm is not None:
            raise ConfigurationError("the process VM already exists (created by the first add_vcpu "
                                     "or vm()); configure() must come before it, or call destroy_vm() first")
        _config.update(new)


#: configure()'s defaults: the configuration of a process that never called it.
DEFAULTS: dict[str, Any] = {name: p.default for name, p in inspect.signature(configure).parameters.items()}
_config: dict[str, Any] = dict(DEFAULTS)

# Guest RAM of the process VM: up to 1 TiB (reserved lazily, MAP_NORESERVE).
MAX_MEMORY_SIZE = 1 << 40


def _checked(options: dict[str, Any]) -> dict[str, Any]:
    """*options* (names of configure()'s parameters) validated, the others at their defaults."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise InvalidArgumentError(f"unknown option(s) {sorted(unknown, key=str)}; known: {sorted(DEFAULTS)}")
    new = dict(DEFAULTS, **options)
    size = new["memory_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_MEMORY_SIZE or size % 4096:
        raise InvalidArgumentError(f"memory_size must be 0 or a positive multiple of 4096 up to "
                                   f"{MAX_MEMORY_SIZE:#x}, not {size!r}")
    for flag in ("pit", "pc_ports"):
        if not isinstance(new[flag], bool):
            raise ArgumentTypeError(f"{flag} must be True or False, not {new[flag]!r}")
    if not (isinstance(new["irqchip"], bool) or new["irqchip"] == "split"):
        raise InvalidArgumentError(f"irqchip must be False, True or 'split', not {new['irqchip']!r}")
    _placement.check_policy(new["placement"])
    if new["pit"] and new["irqchip"] is not True:
        raise InvalidArgumentError("pit=True needs irqchip=True")
    return new


def config() -> dict[str, Any]:
    """The process VM's configuration (a copy): configure()'s keyword arguments."""
    return dict(_config)


def _create_vm() -> ProcessVm:
    global _kvm, _vm
    if _kvm is None:
        _kvm = Kvm()
    v = ProcessVm(_kvm)
    try:
        v.create_interrupt_controllers(_config["irqchip"], _config["pit"], "configure(irqchip=True)")
        if _config["memory_size"]:
            v.add_memory(0, 0, _config["memory_size"])
        if _config["pc_ports"]:
            platform.install_pc_ports(v)
    except BaseException:
        v.close()
        raise
    global _vm_pid
    _vm, _vm_pid = v, os.getpid()
    return v


def _live_vm() -> ProcessVm:
    # Under _lock: the process VM, created if there is none (or it was closed behind
    # our back, e.g. through Vm.close(vm()): then it is forgotten with its pool).
    global _vm
    if _vm is not None and _vm.closed:
        _vm = None
        _pool.clear()
    return _vm if _vm is not None else _create_vm()


def vm() -> ProcessVm:
    """The process VM, created with the current configuration if it does not exist yet."""
    with _lock:
        return _live_vm()


def _reset_for_reuse(vcpu: ThreadVcpu) -> bool:
    # A kernel vCPU lives as long as its VM, so kvmsys recycles it: back to the
    # state it had when created, so a new owner cannot tell it from a fresh one.
    # False where KVM cannot undo what happened to it (a CPUID table, a vCPU
    # capability): retired.  Idempotent (a Ctrl-C may cut it short: it runs again).
    if vcpu.irreversible:
        return False
    try:
        vcpustate.reset(vcpu, vcpu._initial)
    except KvmsysError:
        return False
    vcpu.reset_stats()
    vcpu.pending.clear()
    return True


# add_vcpu() and remove_vcpu() are all or nothing, whatever exception arrives and
# wherever (a Ctrl-C while they wait for _lock, or in the middle): each is a list of
# idempotent steps that _core.steps() runs under _lock, in C, each to its end; the
# ones that change what others see (the binding with _bound and _pool, the hand-over
# of the kernel vCPU, its creation with its pool entry) are single C calls.

def _forget(st: Steps) -> None:
    # Step: the released vCPU leaves the binding table; its thread floats again; it
    # goes back to the pool only if its VM is still the process VM.
    vcpu = st["vcpu"]
    vcpu_id = vcpu.id
    if _bound.get(vcpu_id) is vcpu:
        del _bound[vcpu_id]
    if vcpu.tid is not None and vcpu.tid == threading.get_native_id():
        _placement.apply(vcpu.tid, set(_placement.allowed_cpus()))
    vcpu.tid = vcpu.placement = None
    # else its VM was destroyed meanwhile, or belongs to the parent of this fork child
    st["keep"] = vcpu.vm is _vm and not vcpu.closed and _vm_pid == os.getpid()


def _mark_for_reuse(st: Steps) -> None:
    # Step: the pool's new object for the released kernel vCPU (release_into's
    # st["fresh"]) is reset to the state it was created in before its next owner gets it.
    fresh = st.get("fresh")
    if fresh is not None:
        fresh._initial = st["vcpu"]._initial
        fresh._dirty = True


def _give_back(st: Steps) -> tuple[tuple[Callable[..., object], tuple[Any, ...]], ...]:
    # The steps after the commit (st["vcpu"] unbound and claimed).
    return ((_forget, (st,)), (_core.release_into, (st, _pool)), (_mark_for_reuse, (st,)),
            (_core.cancel_calls, (st,)))


def _release(vcpu: ThreadVcpu) -> None:
    """Return a vCPU whose thread ended bound to the pool (the binding's release callback).

    The pool gets a new object for the kernel vCPU (renew()): the old one, its
    comm-area views, exits and regs are dead for whoever still holds them."""
    st = {"vcpu": vcpu}
    _core.release_state(st)
    if _core.is_shutting_down():
        return      # interpreter exit: no reset (a frozen daemon thread may hold _lock)
    _core.steps(_lock, *_give_back(st))


def _place(vcpu: ThreadVcpu) -> None:
    # Under _lock.  Siblings (only `balance` looks at them, a system call each): the other
    # bound vCPUs pinned to one CPU.
    assert vcpu.tid is not None and vcpu.placement is not None     # bound: both set
    siblings = [] if vcpu.placement != "balance" else [
        next(iter(c)) for v in _bound.values() if v is not vcpu and v.tid is not None
        for c in [os.sched_getaffinity(v.tid)] if len(c) == 1]
    _placement.apply(vcpu.tid, _placement.choose_cpus(vcpu.placement, vcpu.id, siblings))


def set_placement(policy: str, vcpu: ThreadVcpu | None = None) -> None:
    """Change the placement policy at run time: of one bound vCPU, or of all (and the
    default).  All or nothing against a Ctrl-C, as add_vcpu() is."""
    _placement.check_policy(policy)
    if vcpu is not None and not isinstance(vcpu, ThreadVcpu):
        raise ArgumentTypeError(f"vcpu must be a vCPU of the process VM or None, not {type(vcpu).__name__}")
    st: Steps = {"policy": policy, "vcpu": vcpu}
    _core.steps(_lock, (_placement_targets, (st,)), (_apply_placement, (st,)))


def _placement_targets(st: Steps) -> None:
    # Step: the vCPUs set_placement() places; it refuses (nothing changed) one not bound.
    targets = [st["vcpu"]] if st["vcpu"] is not None else list(_bound.values())
    for v in targets:
        if v.tid is None:
            raise VcpuBindingError(f"vCPU {v.id} is not bound to a thread")
    st["targets"] = targets


def _apply_placement(st: Steps) -> None:
    # Step: the policy set and applied, to every target (idempotent: cut short, it runs again).
    if st["vcpu"] is None:
        _config["placement"] = st["policy"]
    for v in st["targets"]:
        v.placement = st["policy"]
        _place(v)


def _free_id(v: _core.VmCore) -> int:
    # Under _lock: the lowest id KVM has no vCPU for (retired ones keep theirs).
    vcpu_id = 0
    while vcpu_id in v.vcpu_ids:
        vcpu_id += 1
    return vcpu_id


def _take(st: Steps) -> None:
    # Step: the vCPU the caller gets, st["vcpu"]: the pool's lowest id (reset first if
    # its last owner used it), or a new one created straight into the pool.
    if "vcpu" in st:
        return
    v = _live_vm()
    while True:
        if not _pool:
            _core.create_into(ThreadVcpu, v, _free_id(v), _pool)
        vcpu_id = min(_pool)
        vcpu = _pool[vcpu_id]
        if vcpu._initial is None:
            vcpu._initial = vcpustate.capture(vcpu)
        if vcpu._dirty:
            if not _reset_for_reuse(vcpu):
                _pool.pop(vcpu_id, None)
                vcpu.close()    # retired: KVM keeps it (and its id) until the VM is destroyed
                continue
            vcpu._dirty = False
        st["vcpu"] = vcpu
        return


def _settle(st: Steps) -> None:
    # Step: the new owner's thread placed by its policy.
    vcpu = st["vcpu"]
    vcpu.tid = threading.get_native_id()
    vcpu.placement = st["policy"] or _config["placement"]
    _place(vcpu)


def add_vcpu(placement: str | None = None) -> memoryview:
    """Attach a new vCPU to the calling thread and return its comm area.

    The comm area is a writable zero-copy memoryview of the vCPU's struct kvm_run.
    The first call in a process creates the process VM (see configure()).
    *placement* overrides the configured policy for this vCPU's thread.  All or
    nothing: an exception (a Ctrl-C included) leaves the thread unbound and the
    vCPU in the pool, or it arrives after the vCPU was bound."""
    policy = None if placement is None else _placement.check_policy(placement)
    if _core.bound() is not None:
        raise VcpuBindingError("this thread already has a vCPU: call remove_vcpu() first "
                               "(one vCPU per thread)")
    st: Steps = {"policy": policy}
    # the commit (bind_from_pool) last: whatever can fail with an error comes before it
    _core.steps(_lock, (_take, (st,)), (_settle, (st,)),
                (_core.bind_from_pool, (st, _pool, _bound, _release)))
    vcpu: ThreadVcpu = st["vcpu"]
    return vcpu.comm_area


run = _core.run
run.__doc__ = _core.run.__doc__


def remove_vcpu() -> None:
    """Detach the calling thread's vCPU and release it (its id becomes reusable).  All or
    nothing: an exception (a Ctrl-C included) while it waits for the process VM's lock
    leaves the vCPU bound; once detached, the release completes."""
    st: Steps = {}
    _core.steps(_lock, (_core.unbind_into, (st,)), *_give_back(st))


def current() -> ThreadVcpu | None:
    """The calling thread's vCPU, or None."""
    return cast("ThreadVcpu | None", _core.bound())


def handle() -> "_core.VcpuHandle":
    """A handle to the calling thread's vCPU, for other threads to hold."""
    vcpu = current()
    if vcpu is None:
        raise VcpuBindingError("this thread has no vCPU: call add_vcpu() first")
    return vcpu.handle()


def vcpus() -> dict[int, ThreadVcpu]:
    """The vCPUs bound to threads right now, by id."""
    with _lock:
        return dict(_bound)


def destroy_vm() -> None:
    """Close the process VM (no vCPU may be bound); the next add_vcpu creates a fresh one.
    All or nothing against a Ctrl-C, as remove_vcpu() is."""
    _core.steps(_lock, (_check_unbound, ()), (_close_vm, ()))


def _check_unbound() -> None:
    # Step: destroy_vm() refuses (nothing changed) while vCPUs are bound.
    running = sorted(v.id for v in _bound.values() if v.active)
    if running:
        raise StateError(f"vCPUs {running} are running (destroy_vm() from an exit handler or "
                         "another thread): nothing is released under a running loop")
    if _bound:
        raise VcpuBindingError(f"vCPUs {sorted(_bound)} are still bound to threads: remove them first")


def _close_vm() -> None:
    # Step: the process VM closed and forgotten with its pool (idempotent: Vm.close is).
    global _vm
    if _vm is not None:
        Vm.close(_vm)
    _vm = None
    _pool.clear()


@contextlib.contextmanager
def fresh_vm(**options: Any) -> Iterator[ProcessVm]:
    """A fresh process VM configured with *options* (configure()'s keyword arguments)
    for the duration of a `with` block, which yields it; afterwards it is destroyed and
    the old configuration is back.  No vCPU may be bound when it starts or ends."""
    _checked(options)               # before anything is destroyed
    saved = config()
    destroy_vm()
    try:
        configure(**options)
        yield vm()
    finally:
        destroy_vm()
        configure(**saved)


def _before_fork() -> None:
    # The child gets this module's state consistent: no add/remove half done.
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    # KVM refuses a VM from another process (EIO): the child starts with none.  The
    # parent's objects refuse every use here (StateError); their fds close when they
    # are collected, and their mappings were never shared (MADV_DONTFORK).
    global _vm, _kvm, _lock
    _core.forget_after_fork()
    _lock = threading.Lock()
    _vm = None
    _kvm = None
    _pool.clear()
    _bound.clear()


def _at_exit() -> None:
    # Release the main thread's vCPU and the VM explicitly rather than leaving
    # them to interpreter teardown (daemon threads may still hold theirs): first
    # kick every vCPU out of KVM_RUN for good, so daemon threads inside run() stop
    # and nothing waits on a vCPU that keeps running.
    _core.shutdown()
    try:
        if _core.bound() is not None:
            remove_vcpu()
        destroy_vm()
    except Exception:
        pass


def _install_hooks() -> None:
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
    atexit.register(_at_exit)


_core.on_first_vm(_install_hooks)     # not at import: importing kvmsys changes nothing
