# C-level state shared by the run loop, both ABIs and the kick path.  It lives
# in malloc'd structs so the loop can use it without the GIL.

cdef enum:
    MAX_HANDLERS = 64
    NR_REASONS = 64          # KVM exit reasons are small integers; larger ones count as [63]
    NR_PORTS = 65536
    IRQ_QUEUE_MAX = 64       # external interrupts queued per vCPU without an in-kernel irqchip

# What a fast handler does with an exit in its range.
cdef enum:
    H_PYTHON = 0    # return to the Python layer (per-range callable or default)
    H_SINK = 1      # writes append to the VM's console buffer; reads return the value (0)
    H_CONST = 2     # reads return a constant; writes are ignored
    H_IGNORE = 3    # reads return all-ones; writes are ignored (counted)
    H_EXIT = 4      # isa-debug-exit: a write stops the run with status (value << 1) | 1

cdef enum:
    SPACE_PIO = 0
    SPACE_MMIO = 1
    SPACE_MSR = 2       # user-space MSR exits (KVM_EXIT_X86_RDMSR/WRMSR), by MSR index
    NR_SPACES = 3

# What the loop tells the Python layer.
cdef enum:
    R_EXIT = 0       # an exit for the Python layer (v.last_handler says which range)
    R_STOP = 1       # the guest asked to stop (v.stop_status)
    R_KICK = 2
    R_DEADLINE = 3
    R_BUDGET = 4
    R_SIGNAL = 5     # EINTR from a signal that is not ours: check Python signals, return INTR
    R_ERROR = 6      # KVM_RUN failed (v.error)
    R_POLL = 7       # main thread, every POLL_NS: check Python signals, then go on

# KVM_SET_SIGNAL_MASK on a vCPU: only for a thread that blocks the kick signal.
cdef enum:
    SIGMASK_UNUSED = 0      # never ran
    SIGMASK_NONE = 1        # no KVM signal mask (the usual case)
    SIGMASK_KVM = 2         # the running thread blocks the kick signal: a KVM mask lets it in
    SIGMASK_REFUSED = -1    # the host refused KVM_SET_SIGNAL_MASK

# Why a vCPU was kicked (bits, OR-ed together until the owner takes them).
cdef enum:
    KICK_USER = 1    # kick(): run() returns a KickExit
    KICK_CALLS = 2   # run queued functions on the owning thread, then go on
    KICK_IRQ = 4     # queued interrupts / NMIs: the loop injects them when the guest can take them

cdef struct handler_t:
    int space
    int kind
    uint64_t start
    uint64_t end         # exclusive
    uint64_t value

cdef struct vmstate_t:
    pthread_mutex_t lock
    pthread_mutex_t ring_lock    # one vCPU at a time drains the coalesced ring, in order
    int fd
    int nhandlers
    handler_t handlers[MAX_HANDLERS]
    int default_kind[NR_SPACES]  # per space: H_PYTHON or H_IGNORE
    int hlt_action               # H_PYTHON (return), H_IGNORE (re-enter), H_EXIT (stop)
    uint64_t *port_counts        # unhandled ports, counted when default is H_IGNORE
    uint8_t *console
    size_t console_len
    size_t console_cap
    uint64_t console_dropped
    uint64_t coalesced_unhandled
    # the VM's coalesced ring (one page, the same through every vCPU's mapping): mapped
    # by the VM itself from its first vCPU, so it outlives any vCPU; NULL before that
    kvm_coalesced_mmio_ring *ring
    uint32_t ring_max
    # a zone may exist (one was registered here, or the VM fd came from elsewhere): only
    # then does the loop read the ring at every exit (its page is one more TLB miss)
    int ring_used
    uint64_t coalesced_flushed   # ring entries taken by unregistering a zone (no vCPU's stats)

cdef struct vcpustate_t:
    int fd
    kvm_run *run
    size_t run_size
    vmstate_t *vm
    pthread_mutex_t lock         # kick vs release, and vs the end of an fd-ABI run()
    int running
    int ioctls                   # vCPU ioctls in flight outside the run loop (vcpu_ioctl_outside)
    int active                   # inside a run() call (any thread)
    int kick_pending             # KICK_* bits
    int kick_bits                # the bits the loop took when it returned R_KICK
    int bound                    # owned by one thread (syscall ABI)
    pthread_t thread
    uint64_t generation
    # when the last kick signal was sent, by the kicker's clock (the kick suite's
    # breakdown): beside what a kicker reads anyway, so it costs no cache line more
    uint64_t kick_sent_ns
    uint64_t run_seq             # bumped before every KVM_RUN: exits of earlier runs are stale
    int64_t budget_left          # < 0: unlimited
    uint64_t deadline_ns         # 0: none
    int poll_signals             # main thread: come back every few ms to check signals
    int last_handler
    uint32_t ignored_port        # the last port the PIO default (H_IGNORE) took, and how many
    uint64_t ignored_pending     # of its accesses are not in vm.port_counts yet (flush_port_count)
    uint64_t stop_status
    int error
    uint64_t exits[NR_REASONS]
    uint64_t handler_hits[MAX_HANDLERS]
    uint64_t default_hits
    uint64_t ns_in_run
    uint64_t ns_in_handlers
    uint64_t runs
    uint64_t coalesced
    # SIGMASK_*: whether the vCPU has a KVM signal mask now (sigmask: the one set)
    int sigmask_state
    uint64_t sigmask
    unsigned sigint_snap         # main thread: kvmsys_sigint_count() at run_once's last look
    int sample_signals           # run_loop looks at the thread's signal mask on entry
    uint64_t t_left              # the last KVM_RUN return run_loop saw, or run()'s start
    uint64_t intr_ns             # the loop's clock when KVM_RUN last returned EINTR (kick suite)
    uint64_t t_sampled           # when run_once last asked for sample_signals
    # interrupts without an in-kernel irqchip (under lock): a FIFO of vectors and a count
    # of NMIs, injected by the owner's loop only when the guest can take them
    uint8_t irq_queue[IRQ_QUEUE_MAX]
    int irq_head
    int nirq
    int nmi_queued
    int irq_window               # we set request_interrupt_window
    int state_set                # state set since the last KVM_RUN: its exit's IF may be stale
    uint64_t irqs_injected
    uint64_t nmis_injected
    # coalesced ring entries go to their handlers in order before the exit that
    # drained them: need_dispatch says that exit still waits (a ring entry went to
    # Python or stopped the run first); from_ring that the result is ring_entry's
    int need_dispatch
    int from_ring
    kvm_coalesced_mmio ring_entry

