# Declarations of the libc/POSIX calls the core uses that Cython's bundled
# libc/posix .pxd files do not cover (or cover without nogil).
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<fcntl.h>" nogil:
    int open(const char *path, int flags, ...)
    enum: O_RDWR
    enum: O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    long sysconf(int name)
    int getppid()
    int getpid()
    enum: _SC_PAGESIZE

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    enum: PROT_READ
    enum: PROT_WRITE
    enum: MAP_SHARED
    enum: MAP_PRIVATE
    enum: MAP_ANONYMOUS
    enum: MAP_NORESERVE
    enum: MAP_HUGETLB
    enum: MAP_FIXED
    enum: MADV_DONTFORK
    void *MAP_FAILED

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<errno.h>" nogil:
    int errno
    enum: EINTR
    enum: EAGAIN
    enum: EINVAL
    enum: EEXIST
    enum: ENOENT
    enum: EACCES
    enum: ESRCH
    enum: EBADF
    enum: EFAULT
    enum: E2BIG
    enum: EBUSY
    enum: ENOSPC

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    pthread_t pthread_self()
    int pthread_equal(pthread_t a, pthread_t b)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int pthread_kill(pthread_t t, int sig)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    enum: CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec *ts)

# Small C helpers that have no Cython spelling: atomics, thread-local state,
# the kick signal handler and per-thread watchdog timers.
cdef extern from "kvmsys_native.h" nogil:
    uint64_t kvmsys_now_ns()
    int kvmsys_load_int(int *p)
    void kvmsys_store_int(int *p, int v)
    int kvmsys_xchg_int(int *p, int v)
    int kvmsys_add_int(int *p, int v)
    void kvmsys_set_errno(int e)
    int kvmsys_or_int(int *p, int v)
    int kvmsys_and_int(int *p, int v)
    void kvmsys_store_u8(uint8_t *p, uint8_t v)
    void kvmsys_store_u8_relaxed(uint8_t *p, uint8_t v)
    void kvmsys_store_int_release(int *p, int v)
    uint8_t kvmsys_xchg_u8(uint8_t *p, uint8_t v)
    uint64_t kvmsys_add_u64(uint64_t *p, uint64_t v)
    uint64_t kvmsys_load_u64(uint64_t *p)
    uint32_t kvmsys_load_u32(uint32_t *p)
    void kvmsys_store_u32(uint32_t *p, uint32_t v)
    int kvmsys_kick_signal()
    int kvmsys_install_kick_handler()
    int kvmsys_kick_handler_installed()
    int kvmsys_set_kick_signal(int sig)
    void kvmsys_set_running(void *run_page)
    unsigned kvmsys_own_signal_count()
    int kvmsys_watchdog_ready(const char **op)
    int kvmsys_watchdog_try(int tries, uint64_t *wait_ns, const char **op)
    int kvmsys_watchdog_push(uint64_t deadline_ns, uint64_t *saved, const char **op)
    int kvmsys_watchdog_pop(uint64_t saved, const char **op)
    int kvmsys_watchdog_uses_thread()
    void kvmsys_fail_timer_create(int n)
    int kvmsys_thread_blocks_kick(uint64_t *kvm_mask)
    unsigned kvmsys_take_kick_signals()
    unsigned kvmsys_sigint_count()
    int kvmsys_sigint_relay_ensure()
    void kvmsys_sigint_watch_enter()
    void kvmsys_sigint_watch_leave()
    void kvmsys_sleep_ns(uint64_t ns)
    void kvmsys_raise_window_signal()
    void kvmsys_set_window_signal(int sig)
    void kvmsys_kick_pause(int at)
    void kvmsys_set_kick_delay(long ns)
    void kvmsys_bench_pause(int at)
    uint64_t kvmsys_set_bench_delay(int at, uint64_t ns)
    void kvmsys_thread_cleanup_register()
    void *kvmsys_bound
    ctypedef struct kvmsys_region_t:
        pass
    kvmsys_region_t *kvmsys_region_add(void *addr, size_t size)
    void kvmsys_region_remove(kvmsys_region_t *r)
    int kvmsys_region_records(void *addr)
    int kvmsys_detach_region(void *addr, size_t size)
    unsigned long kvmsys_fork_generation
    void kvmsys_atfork_install()

