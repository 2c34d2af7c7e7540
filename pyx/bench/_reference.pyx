# cython: language_level=3
"""kvmsys_bench._reference: C reference loops for the benchmark harness.

The least possible work per operation, so a benchmark can show how close kvmsys's
loops come to the limit.  Not part of kvmsys: this extension knows the kernel objects
only by their fds (it maps a vCPU's kvm_run itself), and kvmsys's own extension
exports neither these loops nor ioctl numbers.  Every ioctl's result is checked.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from includes.kvm cimport *
from includes.posix cimport *

cdef extern from "<semaphore.h>" nogil:
    ctypedef struct sem_t:
        pass
    int sem_init(sem_t *s, int pshared, unsigned value)
    int sem_destroy(sem_t *s)
    int sem_post(sem_t *s)
    int sem_wait(sem_t *s)
    int sem_timedwait(sem_t *s, const timespec *abs_timeout)
    int sem_trywait(sem_t *s)

cdef extern from "<pthread.h>" nogil:
    int pthread_create(pthread_t *t, const void *attr, void *(*fn)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t t, void **ret)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigemptyset(sigset_t *s)
    int sigaddset(sigset_t *s, int sig)
    int sigdelset(sigset_t *s, int sig)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)
    enum: SIG_UNBLOCK
    enum: SIG_BLOCK
    enum: SIGRTMIN
    enum: SIGRTMAX

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<time.h>" nogil:
    enum: CLOCK_REALTIME
    int nanosleep(const timespec *req, timespec *rem)

cdef extern from "<errno.h>" nogil:
    enum: ETIMEDOUT

# The ioctl numbers the naive Python loops need, from <linux/kvm.h> (never hand-typed).
IOCTLS = {"KVM_RUN": KVM_RUN, "KVM_GET_MP_STATE": KVM_GET_MP_STATE,
          "KVM_CHECK_EXTENSION": KVM_CHECK_EXTENSION}


cdef int check_fd(int fd, str what) except -1:
    if fd < 0:
        raise ValueError(f"{what}: not an open fd ({fd})")
    return 0


cdef kvm_run *map_run(int fd, size_t size) except NULL:
    """Our own mapping of the vCPU's kvm_run (the kernel shares one page among all)."""
    check_fd(fd, "vCPU fd")
    if size < sizeof(kvm_run):
        raise ValueError(f"mmap size {size} is smaller than struct kvm_run")
    cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if p == MAP_FAILED:
        raise OSError(errno, "mmap of the vCPU's kvm_run")
    return <kvm_run *>p


# Minimal handling of one exit: IN and MMIO reads get zeros.  0: go on; else the
# exit reason that stops the loop (any other exit, or a bad data offset).
cdef inline uint32_t handle_min(kvm_run *run, size_t size) noexcept nogil:
    cdef uint32_t reason = run.exit_reason
    cdef uint64_t total
    if reason == KVM_EXIT_IO:
        if run.io.direction == KVM_EXIT_IO_IN:
            total = <uint64_t>run.io.size * run.io.count
            if run.io.data_offset < sizeof(kvm_run) or run.io.data_offset + total > size:
                return reason
            memset(<char *>run + run.io.data_offset, 0, total)
        return 0
    if reason == KVM_EXIT_MMIO:
        if not run.mmio.is_write:
            memset(run.mmio.data, 0, 8)
        return 0
    if reason == KVM_EXIT_HLT:
        return 0
    return reason if reason else <uint32_t>-1


# Run *exits* exits; kernel_ns: the time inside KVM_RUN, clocked around each call.
cdef int run_exits(int fd, kvm_run *run, size_t size, uint64_t exits, uint64_t *done,
                   uint64_t *kernel_ns, uint32_t *stop) noexcept nogil:
    cdef uint64_t i = 0, t_in, t_out, k = 0
    cdef uint32_t s = 0
    cdef int r, err = 0
    while i < exits:
        t_in = kvmsys_now_ns()
        r = ioctl(fd, KVM_RUN, 0)
        t_out = kvmsys_now_ns()
        if r < 0:
            err = errno
            break
        k += t_out - t_in
        i += 1
        s = handle_min(run, size)
        if s:
            break
    done[0] = i
    kernel_ns[0] = k
    stop[0] = s
    return err


cdef class RefVcpu:
    """A vCPU (by its fd, which stays the caller's) driven by the C reference loops through
    this object's own mapping of its kvm_run, made once."""
    cdef int fd
    cdef kvm_run *run
    cdef size_t size
    cdef target_t *target        # the kick target thread, kept between kick() calls
    cdef pthread_t py_thread     # the Python floor's target: the thread in bare_run()
    cdef bint py_armed
    cdef int py_signo
    cdef uint64_t py_sent        # the clock bare_kick() read right before its pthread_kill

    def __cinit__(self, int fd, size_t mmap_size):
        self.run = map_run(fd, mmap_size)
        self.fd, self.size = fd, mmap_size

    def __dealloc__(self):
        self.close()

    def close(self):
        if self.target != NULL:
            with nogil:
                target_stop(self.target)
            self.target = NULL
        if self.run != NULL:
            munmap(self.run, self.size)
            self.run = NULL

    cdef int require_open(self) except -1:
        if self.run == NULL:
            raise ValueError("RefVcpu is closed")
        return 0

    def run_exits(self, uint64_t exits):
        """KVM_RUN *exits* times with minimal handling (IN/MMIO reads get zeros).

        Returns (exits_done, elapsed_ns, kernel_ns, stop_reason): kernel_ns is the time
        inside KVM_RUN (a clock read on each side of every call), elapsed_ns - kernel_ns
        the loop's own time; stop_reason is 0, or the exit reason that stopped it early."""
        self.require_open()
        cdef uint64_t done = 0, kernel = 0, t0, t1
        cdef uint32_t stop = 0
        cdef int err
        with nogil:
            t0 = kvmsys_now_ns()
            err = run_exits(self.fd, self.run, self.size, exits, &done, &kernel, &stop)
            t1 = kvmsys_now_ns()
        if err:
            raise OSError(err, "KVM_RUN")
        return done, t1 - t0, kernel, stop

    def signal_mask(self, int unblock):
        """KVM_SET_SIGNAL_MASK on the vCPU: with *unblock* < 0 none (KVM_RUN keeps the
        thread's own mask, as a loop that never sets one); otherwise KVM_RUN runs with the
        calling thread's current mask less signal *unblock*, the mask kvmsys computes for
        its kick signal on the main thread.  Lets the benchmark time KVM_RUN with and
        without a mask on one vCPU, and give kvmsys's back afterwards."""
        self.require_open()
        cdef uint8_t buf[16]             # struct kvm_signal_mask (4 bytes) + the kernel's 8-byte set
        cdef kvm_signal_mask *m = <kvm_signal_mask *>buf
        cdef sigset_t cur
        cdef int r
        if unblock >= 0 and not 0 < unblock <= 64:
            raise ValueError(f"signal {unblock} is out of range")
        if unblock < 0:
            r = ioctl(self.fd, KVM_SET_SIGNAL_MASK, <void *>0)
        else:
            pthread_sigmask(SIG_BLOCK, NULL, &cur)
            sigdelset(&cur, unblock)
            m.len = 8
            memcpy(m.sigset, &cur, 8)
            r = ioctl(self.fd, KVM_SET_SIGNAL_MASK, m)
        if r < 0:
            raise OSError(errno, "KVM_SET_SIGNAL_MASK")

    def thread_switch(self, uint64_t exits, int pool, int reps):
        """The thread-switch rotation done from C.  Per repetition, interleaved, three
        samples of *exits* exits each, timed inside the thread that runs them: from the
        calling thread ("caller"), from one fixed worker thread ("worker"), and from the
        next of *pool* threads in rotation ("rotating": a different thread every time), and
        from a thread created for that one run ("new"; its creation is not timed).
        Returns {"caller": [ns], "worker": [ns], "rotating": [ns], "new": [ns]}."""
        self.require_open()
        return thread_switch(self.fd, self.run, self.size, exits, pool, reps)

    def kick(self, int samples, double delay_lo_s, double delay_hi_s, int signo, uint64_t seed=1):
        """Kick latency floor from C: a target thread runs the vCPU (exits handled
        minimally) until KVM_RUN fails with EINTR; the calling thread waits a pseudo-random
        delay in [delay_lo_s, delay_hi_s], reads the clock, sets kvm_run.immediate_exit and
        sends *signo* (a real-time signal with a handler) with pthread_kill.  Returns [ns]
        from the clock read before the kick to the one after KVM_RUN returned.  The target
        thread is created by the first call and kept (it stays the vCPU's thread) until
        close()."""
        self.require_open()
        if not SIGRTMIN <= signo <= SIGRTMAX:
            raise ValueError(f"signo {signo} is not a real-time signal")
        if self.target != NULL and self.target.signo != signo:
            with nogil:
                target_stop(self.target)
            self.target = NULL
        if self.target == NULL:
            self.target = target_start(self.fd, self.run, self.size, signo)
        return kick(self.target, samples, delay_lo_s, delay_hi_s, seed)

    # --- the Python floor of an exit: the least any binding that calls Python does ---------
    def run_callbacks(self, uint64_t exits, read, write, hlt):
        """*exits* exits, each handed to Python the way kvmsys's read/write callbacks
        (AccessOps) get them, with nothing else around it: KVM_RUN with the GIL released,
        then ``read(address, size) -> int`` answers an IN or MMIO read, ``write(address,
        size, value)`` takes an OUT or MMIO write, ``hlt(None)`` a HLT.  Returns (done,
        elapsed_ns, kernel_ns): kernel_ns clocked around each KVM_RUN, as run_exits does.
        Single accesses only (string I/O raises); what a callback raises ends the loop."""
        self.require_open()
        for name, fn in (("read", read), ("write", write), ("hlt", hlt)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
        cdef uint64_t i, t_in = 0, t_out = 0, kernel = 0, t0, value
        cdef int r = 0, err = 0
        cdef uint32_t size
        cdef uint8_t *p
        cdef kvm_run *run = self.run
        t0 = kvmsys_now_ns()
        for i in range(exits):
            with nogil:
                t_in = kvmsys_now_ns()
                r = ioctl(self.fd, KVM_RUN, 0)
                err = errno
                t_out = kvmsys_now_ns()
            if r < 0:
                raise OSError(err, "KVM_RUN")
            kernel += t_out - t_in
            if run.exit_reason == KVM_EXIT_IO:
                size = run.io.size
                if run.io.count != 1 or size not in (1, 2, 4):
                    raise RuntimeError(f"run_callbacks: string or odd-sized port access (size {size}, "
                                       f"count {run.io.count})")
                if run.io.data_offset < sizeof(kvm_run) or run.io.data_offset + size > self.size:
                    raise RuntimeError(f"run_callbacks: data offset {run.io.data_offset} out of the mapping")
                p = <uint8_t *>run + run.io.data_offset
                if run.io.direction == KVM_EXIT_IO_IN:
                    value = read(run.io.port, size)
                    memcpy(p, &value, size)         # (x86: the low bytes, little-endian)
                else:
                    value = 0
                    memcpy(&value, p, size)
                    write(run.io.port, size, value)
            elif run.exit_reason == KVM_EXIT_MMIO:
                size = run.mmio.len
                if not 1 <= size <= 8:
                    raise RuntimeError(f"run_callbacks: MMIO length {size}")
                if run.mmio.is_write:
                    value = 0
                    memcpy(&value, run.mmio.data, size)
                    write(run.mmio.phys_addr, size, value)
                else:
                    value = read(run.mmio.phys_addr, size)
                    memcpy(run.mmio.data, &value, size)
            elif run.exit_reason == KVM_EXIT_HLT:
                hlt(None)
            else:
                raise RuntimeError(f"run_callbacks: exit reason {run.exit_reason} after {i} exits")
        return exits, kvmsys_now_ns() - t0, kernel

    # --- the Python floor of a kick: the least any binding called from Python does ---------
    def bare_arm(self, int signo):
        """The calling thread becomes the one bare_kick() signals with *signo* (a real-time
        signal with a handler); a stale kick is cleared.  Called by the target before it
        tells the kicker it runs."""
        self.require_open()
        if not SIGRTMIN <= signo <= SIGRTMAX:
            raise ValueError(f"signo {signo} is not a real-time signal")
        self.py_signo = signo
        kvmsys_store_u8(&self.run.immediate_exit, 0)
        self.py_thread = pthread_self()
        self.py_armed = 1

    def bare_run(self):
        """KVM_RUN with minimal exit handling, the GIL released, until it fails with EINTR
        (a kick, or a signal of someone else's) -> the clock read right after (ns).  Raises
        on any other error and on an exit the minimal handling does not take."""
        self.require_open()
        if not self.py_armed or not pthread_equal(self.py_thread, pthread_self()):
            raise RuntimeError("bare_run() from a thread that did not call bare_arm()")
        cdef int r, err = 0
        cdef uint32_t stop = 0
        cdef uint64_t t = 0
        with nogil:
            while True:
                r = ioctl(self.fd, KVM_RUN, 0)
                if r < 0:
                    t = kvmsys_now_ns()
                    err = errno
                    break
                stop = handle_min(self.run, self.size)
                if stop:
                    break
        if stop:
            raise RuntimeError(f"bare_run(): the guest stopped on exit reason {stop}")
        if err != EINTR:
            raise OSError(err, "KVM_RUN")
        return t

    def bare_kick(self):
        """Sets kvm_run.immediate_exit and sends the target that called bare_arm() its signal
        with pthread_kill, the GIL held throughout (as kvmsys's kick())."""
        self.require_open()
        if not self.py_armed:
            raise RuntimeError("bare_kick() before a target called bare_arm()")
        kvmsys_store_u8(&self.run.immediate_exit, 1)
        self.py_sent = kvmsys_now_ns()
        pthread_kill(self.py_thread, self.py_signo)

    @property
    def bare_sent_ns(self):
        """The clock bare_kick() read right before its pthread_kill."""
        return self.py_sent


def reference_lifecycle(int vmfd, size_t mmap_size, int first_id, int count):
    """*count* times: KVM_CREATE_VCPU + mmap + munmap + close, ids first_id... -> elapsed ns.

    (KVM never frees a vCPU before its VM: ids are used up.)"""
    check_fd(vmfd, "VM fd")
    if first_id < 0 or count <= 0:
        raise ValueError("bad vCPU id range")
    cdef int i, fd, err = 0
    cdef void *p
    cdef uint64_t t0, t1
    with nogil:
        t0 = kvmsys_now_ns()
        for i in range(first_id, first_id + count):
            fd = ioctl(vmfd, KVM_CREATE_VCPU, <unsigned long>i)
            if fd < 0:
                err = errno
                break
            p = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if p == MAP_FAILED:
                err = errno
                close(fd)
                break
            munmap(p, mmap_size)
            close(fd)
        t1 = kvmsys_now_ns()
    if err:
        raise OSError(err, "KVM_CREATE_VCPU + mmap")
    return t1 - t0


def reference_ioctl_costs(int vcpufd, int vmfd, int n):
    """Totals over *n* calls each: (KVM_GET_MP_STATE ns, KVM_CHECK_EXTENSION ns, getppid ns).
    A failing ioctl raises: it is never timed as if it had worked."""
    check_fd(vcpufd, "vCPU fd")
    check_fd(vmfd, "VM fd")
    if n <= 0:
        raise ValueError("n must be positive")
    cdef int i, err = 0
    cdef const char *op = NULL
    cdef kvm_mp_state s
    cdef uint64_t t0 = 0, t1 = 0, t2 = 0, t3 = 0
    with nogil:
        t0 = kvmsys_now_ns()
        for i in range(n):
            if ioctl(vcpufd, KVM_GET_MP_STATE, &s) < 0:
                err, op = errno, "KVM_GET_MP_STATE"
                break
        t1 = kvmsys_now_ns()
        if not err:
            for i in range(n):
                if ioctl(vmfd, KVM_CHECK_EXTENSION, <unsigned long>KVM_CAP_USER_MEMORY) <= 0:
                    err, op = (errno or EINVAL), "KVM_CHECK_EXTENSION(USER_MEMORY)"
                    break
        t2 = kvmsys_now_ns()
        for i in range(n):
            getppid()
        t3 = kvmsys_now_ns()
    if err:
        raise OSError(err, op.decode())
    return t1 - t0, t2 - t1, t3 - t2


# --- threads: a vCPU run from the same thread, one worker, or a rotating pool ----------
cdef struct worker_t:
    pthread_t thread
    sem_t go
    sem_t done
    int quit
    int fd
    kvm_run *run
    size_t size
    uint64_t exits
    uint64_t ns            # result: the job timed inside this thread
    int err
    uint32_t stop


# sem_wait is never restarted after a signal handler (signal(7)): a late kick signal
# must not pass for a post.
cdef inline void wait_post(sem_t *s) noexcept nogil:
    while sem_wait(s) != 0 and errno == EINTR:
        pass


cdef void *worker_main(void *arg) noexcept nogil:
    cdef worker_t *w = <worker_t *>arg
    cdef uint64_t done, kernel, t0
    while True:
        wait_post(&w.go)
        if w.quit:
            return NULL
        t0 = kvmsys_now_ns()
        w.err = run_exits(w.fd, w.run, w.size, w.exits, &done, &kernel, &w.stop)
        w.ns = kvmsys_now_ns() - t0
        sem_post(&w.done)


cdef int job_on(worker_t *w) noexcept nogil:
    sem_post(&w.go)
    wait_post(&w.done)
    return w.err or <int>w.stop


cdef thread_switch(int fd, kvm_run *run, size_t mmap_size, uint64_t exits, int pool, int reps):
    if pool < 2 or pool > 64 or reps <= 0 or exits == 0:
        raise ValueError("pool must be 2..64, reps and exits positive")
    cdef worker_t *ws = <worker_t *>calloc(pool + 1, sizeof(worker_t))
    if ws == NULL:
        raise MemoryError()
    cdef int i, r, started = 0, err = 0, nxt = 0
    cdef uint64_t done, kernel, t0
    cdef uint32_t stop
    cdef worker_t fresh
    out = {"caller": [], "worker": [], "rotating": [], "new": []}
    try:
        for i in range(pool + 1):           # ws[0]: the fixed worker; ws[1..pool]: the rotation
            ws[i].fd, ws[i].run, ws[i].size, ws[i].exits = fd, run, mmap_size, exits
            sem_init(&ws[i].go, 0, 0)
            sem_init(&ws[i].done, 0, 0)
            if pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]) != 0:
                raise OSError(errno, "pthread_create")
            started += 1
        for r in range(reps):
            with nogil:
                t0 = kvmsys_now_ns()
                err = run_exits(fd, run, mmap_size, exits, &done, &kernel, &stop) or <int>stop
                t0 = kvmsys_now_ns() - t0
            if err:
                break
            out["caller"].append(t0)
            with nogil:
                err = job_on(&ws[0])
            if err:
                break
            out["worker"].append(ws[0].ns)
            with nogil:
                err = job_on(&ws[1 + nxt])
            if err:
                break
            out["rotating"].append(ws[1 + nxt].ns)
            nxt = (nxt + 1) % pool
            # a thread created for this one run (its creation is not timed)
            memset(&fresh, 0, sizeof(fresh))
            fresh.fd, fresh.run, fresh.size, fresh.exits = fd, run, mmap_size, exits
            sem_init(&fresh.go, 0, 0)
            sem_init(&fresh.done, 0, 0)
            if pthread_create(&fresh.thread, NULL, worker_main, &fresh) != 0:
                err = errno
                break
            with nogil:
                err = job_on(&fresh)
                fresh.quit = 1
                sem_post(&fresh.go)
                pthread_join(fresh.thread, NULL)
            sem_destroy(&fresh.go)
            sem_destroy(&fresh.done)
            if err:
                break
            out["new"].append(fresh.ns)
    finally:
        with nogil:
            for i in range(started):
                ws[i].quit = 1
                sem_post(&ws[i].go)
                pthread_join(ws[i].thread, NULL)
            for i in range(pool + 1):
                sem_destroy(&ws[i].go)
                sem_destroy(&ws[i].done)
        free(ws)
    if err:
        raise OSError(err, "KVM_RUN (or an exit the reference loop does not handle)")
    return out


# --- kick: pthread_kill + immediate_exit, the floor under any kick -----------------------
cdef struct target_t:
    pthread_t thread
    sem_t go
    sem_t done
    int quit
    int signo
    int fd
    kvm_run *run
    size_t size
    int in_run
    uint64_t t1
    int err


cdef void *target_main(void *arg) noexcept nogil:
    cdef target_t *t = <target_t *>arg
    cdef sigset_t s
    cdef int r
    cdef uint32_t stop
    sigemptyset(&s)
    sigaddset(&s, t.signo)
    pthread_sigmask(SIG_UNBLOCK, &s, NULL)     # a creator's blocked mask must not hide kicks
    while True:
        wait_post(&t.go)
        if t.quit:
            return NULL
        # a kick that came after the last run had ended (see kick()) is no kick of this one
        kvmsys_store_u8(&t.run.immediate_exit, 0)
        kvmsys_store_int(&t.in_run, 1)
        while True:
            r = ioctl(t.fd, KVM_RUN, 0)
            if r < 0:
                t.t1 = kvmsys_now_ns()
                if errno != EINTR:
                    t.err = errno
                break
            stop = handle_min(t.run, t.size)
            if stop:
                t.err = -<int>stop
                break
        kvmsys_store_u8(&t.run.immediate_exit, 0)
        kvmsys_store_int(&t.in_run, 0)
        sem_post(&t.done)


cdef target_t *target_start(int fd, kvm_run *run, size_t mmap_size, int signo) except NULL:
    cdef target_t *t = <target_t *>calloc(1, sizeof(target_t))
    if t == NULL:
        raise MemoryError()
    t.fd, t.run, t.size, t.signo = fd, run, mmap_size, signo
    sem_init(&t.go, 0, 0)
    sem_init(&t.done, 0, 0)
    if pthread_create(&t.thread, NULL, target_main, t) != 0:
        err = errno
        sem_destroy(&t.go)
        sem_destroy(&t.done)
        free(t)
        raise OSError(err, "pthread_create")
    return t


cdef void target_stop(target_t *t) noexcept nogil:
    t.quit = 1
    sem_post(&t.go)
    pthread_join(t.thread, NULL)
    sem_destroy(&t.go)
    sem_destroy(&t.done)
    free(t)


cdef kick(target_t *t, int samples, double delay_lo_s, double delay_hi_s, uint64_t seed):
    if samples <= 0 or not 0 <= delay_lo_s <= delay_hi_s <= 1.0:
        raise ValueError("samples must be positive and 0 <= delay_lo_s <= delay_hi_s <= 1")
    cdef int i, err = 0, early, retries = 0
    cdef uint64_t x = seed or 1, t0 = 0, lo = <uint64_t>(delay_lo_s * 1e9), span
    cdef timespec ts, dl
    cdef kvm_run *run = t.run
    span = <uint64_t>(delay_hi_s * 1e9) - lo + 1
    out = []
    i = 0
    while i < samples:
        with nogil:
            sem_post(&t.go)
            early = 0
            while not kvmsys_load_int(&t.in_run) and not kvmsys_load_int(&t.err):
                if sem_trywait(&t.done) == 0:
                    early = 1        # the run began and ended before this thread saw it
                    break
                sched_yield()
            if not early:
                x ^= x << 13
                x ^= x >> 7
                x ^= x << 17
                ts.tv_sec = 0
                ts.tv_nsec = <long>(lo + x % span)
                nanosleep(&ts, NULL)
                t0 = kvmsys_now_ns()
                kvmsys_store_u8(&run.immediate_exit, 1)
                pthread_kill(t.thread, t.signo)
                while True:          # a kick that cannot be lost, but never wait forever
                    clock_gettime(CLOCK_REALTIME, &dl)
                    dl.tv_sec += 5
                    if sem_timedwait(&t.done, &dl) == 0:
                        break
                    if errno == ETIMEDOUT:
                        pthread_kill(t.thread, t.signo)
            err = t.err
        if err:
            raise OSError(err if err > 0 else EINVAL,
                          "KVM_RUN" if err > 0 else f"the target stopped on exit reason {-err}")
        if early or t.t1 < t0:
            # KVM_RUN returned EINTR before the kick (a signal that was not ours): not a
            # sample; the kick's immediate_exit store is cleared when the next run starts
            retries += 1
            if retries > 5 * samples + 5:
                raise RuntimeError("the C floor's runs kept ending before their kick")
            continue
        out.append(t.t1 - t0)
        i += 1
    return out
