# The syscall-style ABI's thread binding.  The calling thread's vCPU is a C
# thread-local pointer (kvmsys_bound), so run() finds its vCPU with one TLS
# load: no argument, no lock, no dictionary.  A _Binding kept in a
# threading.local releases the vCPU when its thread ends, however it ends.
import threading as _thr

cdef object _local = _thr.local()

cdef class _Binding:
    """Lives in the owning thread's threading.local; dies with the thread."""
    cdef VcpuCore vcpu
    cdef object on_release
    cdef unsigned long forkgen

    def __dealloc__(self):
        cdef VcpuCore v = self.vcpu
        global kvmsys_bound
        if v is None or self.forkgen != kvmsys_fork_generation:
            # A fork child clearing the parent's other threads (inside os.fork()): their
            # vCPUs, locks and comm areas are the parent's; touch nothing.
            return
        if kvmsys_bound == <void *>v:
            kvmsys_bound = NULL
        if self.on_release is not None:
            try:
                self.on_release(v)
            except BaseException as e:      # a thread is ending: report, never raise
                import sys
                print(f"kvmsys: releasing vCPU {v.id} at thread exit failed: {e!r}", file=sys.stderr)


def bind(vcpu, on_release=None):
    """Bind *vcpu* to the calling thread; *on_release(vcpu)* runs if the thread ends bound."""
    global kvmsys_bound
    cdef VcpuCore vcpu_ = of_type(vcpu, VcpuCore, "vcpu")
    vcpu_.require_open()
    if kvmsys_bound != NULL:
        raise VcpuBindingError("this thread already has a vCPU: call remove_vcpu() first "
                               "(one vCPU per thread)")
    cdef _Binding b = _Binding.__new__(_Binding)
    b.vcpu = vcpu_
    b.on_release = on_release
    b.forkgen = kvmsys_fork_generation
    pthread_mutex_lock(&vcpu_.v.lock)
    vcpu_.v.bound = 1
    vcpu_.v.thread = pthread_self()
    vcpu_.v.generation += 1
    clear_queued_locked(vcpu_.v)
    pthread_mutex_unlock(&vcpu_.v.lock)
    _local.binding = b
    kvmsys_bound = <void *>vcpu_
    return vcpu_.v.generation


cdef int _unbind_state(VcpuCore vcpu) except -1:
    # Under the lock: a kick racing with this either lands before (and is
    # dropped with the binding) or sees the new generation and fails as stale.
    pthread_mutex_lock(&vcpu.v.lock)
    vcpu.v.bound = 0
    vcpu.v.generation += 1
    clear_queued_locked(vcpu.v)
    pthread_mutex_unlock(&vcpu.v.lock)
    work, vcpu.pending = vcpu.pending, []
    for _fn, _args, future in work:
        if future is not None:
            future.cancel()             # never run: the vCPU changed hands
    return 0


def unbind():
    """Detach the calling thread's vCPU and return it (no release callback runs)."""
    global kvmsys_bound
    if kvmsys_bound == NULL:
        raise VcpuBindingError("this thread has no vCPU: call add_vcpu() first")
    cdef VcpuCore vcpu = <VcpuCore>kvmsys_bound
    if kvmsys_load_int(&vcpu.v.active):
        raise StateError(f"vCPU {vcpu.id} is running (remove_vcpu() from its own exit handler "
                         "or a call_soon callback): let run() return first")
    kvmsys_bound = NULL
    b = _local.binding
    (<_Binding>b).vcpu = None
    del _local.binding
    _unbind_state(vcpu)
    return vcpu


def release_state(vcpu):
    """Mark a vCPU whose thread ended as unbound (called from the release callback)."""
    _unbind_state(of_type(vcpu, VcpuCore, "vcpu"))


def bound():
    """The calling thread's vCPU, or None."""
    if kvmsys_bound == NULL:
        return None
    return <VcpuCore>kvmsys_bound


def forget_after_fork():
    """In a fork child: drop the inherited binding without touching the parent's VM.
    (The C at-fork handler already cleared this thread's vCPU pointer and timer.)"""
    b = getattr(_local, "binding", None)
    if b is not None:
        (<_Binding>b).vcpu = None
        del _local.binding


def run(budget=None, timeout=None):
    """Run the calling thread's vCPU (see VcpuCore.run).  The vCPU is implied."""
    cdef void *p = kvmsys_bound
    if p == NULL:
        raise VcpuBindingError("this thread has no vCPU: call kvmsys.add_vcpu() first")
    return (<VcpuCore>p).run_once(as_budget(budget), as_timeout(timeout))


cdef class VcpuHandle:
    """Names a vCPU by (VM, id, generation), never by thread: safe to hold in any thread.

    Every operation raises StaleVcpuError once the vCPU was removed or its thread ended,
    even if a new vCPU reuses the id."""
    cdef VcpuCore vcpu
    cdef readonly uint64_t generation

    def __init__(self, *args, **kwargs):
        raise ArgumentTypeError("VcpuHandle objects come from vcpu.handle() or kvmsys.handle(); "
                                "they cannot be constructed")

    @staticmethod
    cdef VcpuHandle _new(VcpuCore vcpu):
        cdef VcpuHandle h = VcpuHandle.__new__(VcpuHandle)
        h.vcpu = vcpu
        h.generation = vcpu.v.generation
        return h

    cdef VcpuCore _named(self):
        if self.vcpu is None:
            raise StaleVcpuError("this VcpuHandle names no vCPU (not made by handle())")
        return self.vcpu

    @property
    def id(self):
        return self._named().id

    @property
    def vm(self):
        """The VM of the vCPU (StaleVcpuError once it is gone)."""
        return self._named().vm

    @property
    def alive(self):
        """True while the vCPU this handle names is still bound (same generation)."""
        # generation 0 is never a vCPU's (they start at 1): a handle made by __new__ is dead
        return self.vcpu is not None and self.generation != 0 and not self.vcpu.closed \
            and self.vcpu.v.generation == self.generation

    cdef int _check(self) except -1:
        if not self.alive:
            if self.vcpu is None:
                raise StaleVcpuError("this VcpuHandle names no vCPU (not made by handle())")
            raise StaleVcpuError(f"vCPU {self.vcpu.id} (generation {self.generation}) was removed")
        return 0

    cdef int _kick(self, int bits) except -1:
        cdef int rc
        self._check()               # also: never a parent's vCPU in a fork child
        with nogil:
            rc = kick_vcpu(self.vcpu.v, self.generation, bits)
        if rc:
            raise StaleVcpuError(f"vCPU {self.vcpu.id} (generation {self.generation}) was removed")
        return 0

    def kick(self):
        """Force the vCPU out of KVM_RUN; its run() returns a KickExit.  Never lost."""
        self._kick(KICK_USER)

    def call_soon(self, fn, *args):
        """Run ``fn(*args)`` on the vCPU's owning thread at its next exit; the run goes on.

        Returns a concurrent.futures.Future with fn's result or exception (a call
        that raises does not keep the calls queued behind it from running).  Calls
        still queued when the vCPU is removed are cancelled."""
        if not callable(fn):
            raise ArgumentTypeError(f"call_soon takes a callable, not {type(fn).__name__}")
        self._check()
        from concurrent.futures import Future     # here: it imports logging, which hooks atexit
        future = Future()
        self.vcpu.pending.append((fn, args, future))
        self._kick(KICK_CALLS)
        return future

    cdef int _queue(self, int vector) except -1:
        cdef int rc
        with nogil:
            rc = queue_interrupt(self.vcpu.v, self.generation, vector)
        if rc == ESRCH:
            raise StaleVcpuError(f"vCPU {self.vcpu.id} (generation {self.generation}) was removed")
        if rc == ENOSPC:
            raise StateError(f"vCPU {self.vcpu.id} already has {IRQ_QUEUE_MAX} interrupts queued "
                             "that the guest has not taken (interrupts disabled?)")
        return 0

    def interrupt(self, vector):
        """Request external interrupt *vector* for this vCPU: queued and injected by the
        thread that runs it, at once if it is running (a kick), else at its next run().

        With the in-kernel irqchip that thread sends an MSI to the APIC id the vCPU has
        then (read from its LAPIC state: a guest may change it, x2APIC ids exceed 255),
        which only it can read: KVM_GET_LAPIC waits while the vCPU is in KVM_RUN.
        Without: queued; the owner's run loop injects each vector once, in order, when
        the guest can take it (IF=1, as KVM reports), asking KVM for an
        interrupt-window exit meanwhile."""
        cdef uint32_t vector_ = <uint32_t>as_uint(vector, "interrupt vector", 255)
        require(vector_ >= 16, "vector must be 16..255")
        self._check()
        if self.vcpu.vm.has_irqchip:
            self.vcpu.pending.append((self.vcpu.interrupt, (vector_,), None))
            self._kick(KICK_CALLS)
            return
        self._queue(vector_)

    def nmi(self):
        """Request an NMI for this vCPU: queued; the owner's run loop injects each one
        once, in order, when KVM holds no NMI pending."""
        self._check()
        self._queue(-1)

    def stats(self):
        """The vCPU's run-loop statistics."""
        self._check()
        return self.vcpu.stats()

    def __repr__(self):
        if self.vcpu is None:
            return "<VcpuHandle (no vCPU)>"
        return f"<VcpuHandle id={self.vcpu.id} generation={self.generation} {'alive' if self.alive else 'stale'}>"


def handle_of(vcpu):
    """A handle naming *vcpu* as it is now (its current generation)."""
    cdef VcpuCore vcpu_ = of_type(vcpu, VcpuCore, "vcpu")
    vcpu_.require_open()
    return VcpuHandle._new(vcpu_)
