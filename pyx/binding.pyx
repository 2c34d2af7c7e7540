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


def steps(lock, *calls):
    """Run *calls*, (fn, args) pairs, in order under *lock*, every one of them whatever
    asynchronous exception (KeyboardInterrupt from a Ctrl-C, SystemExit from a signal
    handler: a BaseException that is no Exception) arrives meanwhile: a call it cuts
    short runs again (each call must be idempotent), and the first such exception is
    raised once all ran.  The loop is C: nothing lands between two calls, and a call
    that is C itself cannot be cut.  An Exception from a call stops the steps and is
    raised (the first call is the one that refuses).  If waiting for the lock is
    interrupted, nothing ran."""
    lock.acquire()
    pending = None
    try:
        for fn, args in calls:
            while True:
                try:
                    fn(*args)
                    break
                except Exception:
                    raise
                except BaseException as e:
                    if pending is None:
                        pending = e
    finally:
        lock.release()
    if pending is not None:
        raise pending


cdef int bind_thread(VcpuCore vcpu_, object on_release) except -1:
    global kvmsys_bound
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
    return 0


def bind_from_pool(st_, pool_, bound_, on_release):
    """add_vcpu()'s commit, a step (see steps()): bind st["vcpu"] to the calling thread,
    take it from *pool* and list it in *bound*, all at once (no Python code runs)."""
    cdef dict st = of_type(st_, dict, "step state"), pool = of_type(pool_, dict, "pool")
    cdef dict bound = of_type(bound_, dict, "bound")
    if st.get("bound"):
        return
    cdef VcpuCore vcpu = of_type(st["vcpu"], VcpuCore, "vcpu")
    bind_thread(vcpu, on_release)
    pool.pop(vcpu.id, None)
    bound[vcpu.id] = vcpu
    st["bound"] = True


def create_into(cls, vm, vcpu_id, pool):
    """A new vCPU *cls*(vm, vcpu_id) put in *pool* at once: no Python code runs between
    the kernel vCPU's creation and its entry in the pool (none is lost to a Ctrl-C)."""
    of_type(pool, dict, "pool")[vcpu_id] = cls(vm, vcpu_id)


cdef list _unbind_state(VcpuCore vcpu):
    # Under the lock: a kick racing with this either lands before (and is
    # dropped with the binding) or sees the new generation and fails as stale.
    # Returns the queued calls, whose futures the caller cancels.
    pthread_mutex_lock(&vcpu.v.lock)
    vcpu.v.bound = 0
    vcpu.v.generation += 1
    clear_queued_locked(vcpu.v)
    pthread_mutex_unlock(&vcpu.v.lock)
    work, vcpu.pending = vcpu.pending, []
    return work


def unbind_into(st_):
    """remove_vcpu()'s commit, a step (see steps()): detach the calling thread's vCPU,
    claimed (as run() claims it) so that no thread runs it until release_into() hands it
    on, into st["vcpu"]; its queued calls into st["calls"].  No Python code runs."""
    global kvmsys_bound
    cdef dict st = of_type(st_, dict, "step state")
    if "vcpu" in st:
        return
    if kvmsys_bound == NULL:
        raise VcpuBindingError("this thread has no vCPU: call add_vcpu() first")
    cdef VcpuCore vcpu = <VcpuCore>kvmsys_bound
    if kvmsys_xchg_int(&vcpu.v.active, 1):
        raise StateError(f"vCPU {vcpu.id} is running (remove_vcpu() from its own exit handler "
                         "or a call_soon callback): let run() return first")
    kvmsys_bound = NULL
    b = _local.binding
    (<_Binding>b).vcpu = None
    del _local.binding
    st["calls"] = _unbind_state(vcpu)
    st["vcpu"] = vcpu
    st["claimed"] = True


def release_state(st_):
    """The release of a vCPU whose thread ended bound (st["vcpu"]): marked unbound and,
    unless a run() of it is still in progress (a daemon thread torn down inside run()
    at exit), claimed for release_into()."""
    cdef dict st = of_type(st_, dict, "step state")
    cdef VcpuCore vcpu = of_type(st.get("vcpu"), VcpuCore, "vcpu")
    st["calls"] = _unbind_state(vcpu)
    st["claimed"] = not kvmsys_xchg_int(&vcpu.v.active, 1)


def release_into(st_, pool_):
    """A step (see steps()): the claimed vCPU st["vcpu"] goes to *pool* as a new object
    (renew()), also put in st["fresh"] for the caller's next step, if st["keep"]; else
    its claim is dropped.  The old object is stale from here on.  No Python code runs."""
    cdef dict st = of_type(st_, dict, "step state"), pool = of_type(pool_, dict, "pool")
    if st.get("released"):
        return
    cdef VcpuCore vcpu = of_type(st["vcpu"], VcpuCore, "vcpu")
    cdef VcpuCore fresh
    if st.get("claimed"):
        if st.get("keep") and not vcpu.closed:
            fresh = vcpu.renew_claimed()
            pool[fresh.id] = fresh
            st["fresh"] = fresh
        elif vcpu.v != NULL:
            kvmsys_store_int(&vcpu.v.active, 0)
    st["released"] = True


def move_into(st_, bound_):
    """A step (see steps()): st["vcpu"] moved onto a new kernel vCPU st["new_id"]
    (VcpuCore.replace_kernel_vcpu) and the binding table *bound* keyed by its new id,
    at once (no Python code runs)."""
    cdef dict st = of_type(st_, dict, "step state"), bound = of_type(bound_, dict, "bound")
    if st.get("moved"):
        return
    cdef VcpuCore vcpu = of_type(st["vcpu"], VcpuCore, "vcpu")
    cdef int old_id = vcpu.id
    VcpuCore.replace_kernel_vcpu(vcpu, st["new_id"])
    if bound.get(old_id) is vcpu:
        del bound[old_id]
        bound[vcpu.id] = vcpu
    st["moved"] = True


def cancel_calls(st):
    """A step: cancel the futures of the calls st["calls"] (idempotent)."""
    for _fn, _args, future in st.get("calls", ()):
        if future is not None:
            future.cancel()             # never run: the vCPU changed hands


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


@cython.final           # its methods are called directly, not through a table: see _kick
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

    cdef inline bint _alive(self) noexcept:
        # generation 0 is never a vCPU's (they start at 1): a handle made by __new__ is dead
        return self.vcpu is not None and self.generation != 0 and not self.vcpu.is_closed() \
            and self.vcpu.v.generation == self.generation

    @property
    def alive(self):
        """True while the vCPU this handle names is still bound (same generation)."""
        return self._alive()

    cdef int _check(self) except -1:
        if not self._alive():
            if self.vcpu is None:
                raise StaleVcpuError("this VcpuHandle names no vCPU (not made by handle())")
            raise StaleVcpuError(f"vCPU {self.vcpu.id} (generation {self.generation}) was removed")
        return 0

    cdef inline int _kick(self, int bits) except -1:
        # _alive(), the generation again under the vCPU's lock (kick_vcpu), and _check()
        # only to raise.  A kicker runs cold after its sleep: every function it enters and
        # every cache line it touches costs more than its work (a call through the type's
        # method table 0.5-0.7 us on our AMD PVM host), so this, _alive() and kick_vcpu()
        # are inlined into kick() (the class is final).  Never a parent's vCPU in a fork
        # child (is_closed).
        # With the GIL held: kick_vcpu waits for v.lock at most, which no holder keeps
        # across a wait for the GIL; releasing and taking the GIL back would put more
        # work between the kick and the caller's next blocking call (on a shared core
        # the kicked thread runs only then).
        if self._alive() and kick_vcpu(self.vcpu.v, self.generation, bits) == 0:
            return 0
        self._check()
        raise StaleVcpuError(f"vCPU {self.vcpu.id} (generation {self.generation}) was removed")

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
        entry = (fn, args, future)
        self.vcpu.pending.append(entry)
        try:
            self._kick(KICK_CALLS)
        except BaseException:
            if entry in self.vcpu.pending:     # gone meanwhile: nobody runs it
                self.vcpu.pending.remove(entry)
            future.cancel()
            raise
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
