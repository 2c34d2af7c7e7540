/* C-only helpers of the kvmsys core: atomics, thread-local vCPU state, the kick
 * signal handler and per-thread watchdog timers.  Everything here is
 * async-signal-safe where the signal handler touches it. */
#ifndef KVMSYS_NATIVE_H
#define KVMSYS_NATIVE_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/kvm.h>

#define KVMSYS_TLS __thread __attribute__((tls_model("initial-exec")))

/* KVM_EXIT_MEMORY_FAULT came with Linux 6.8; older <linux/kvm.h> lack it.  The
 * values and the layout (kvm_run.memory_fault, in the exit union) are the
 * kernel's ABI. */
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_MEMORY_EXIT_FLAG_PRIVATE
#define KVM_MEMORY_EXIT_FLAG_PRIVATE (1ULL << 3)
#endif
struct kvmsys_memory_fault { __u64 flags; __u64 gpa; __u64 size; };
static inline struct kvmsys_memory_fault *kvmsys_run_memory_fault(struct kvm_run *run) {
    return (struct kvmsys_memory_fault *)&run->hw;     /* first member of the union */
}

/* The vCPU bound to this thread by the syscall-style ABI (a borrowed PyObject*):
 * the implied-vCPU lookup of run() is one TLS load. */
static KVMSYS_TLS void *kvmsys_bound;
/* The kvm_run page of the vCPU this thread is running right now, for the
 * signal handler: setting immediate_exit there makes a kick that lands just
 * before KVM_RUN impossible to lose. */
static KVMSYS_TLS struct kvm_run *kvmsys_running;
/* Kick/watchdog signals this thread received: a late one (for a kick already
 * taken) must not be mistaken for somebody else's signal. */
static KVMSYS_TLS unsigned kvmsys_own_signals;
static KVMSYS_TLS int kvmsys_timer_ok;
static KVMSYS_TLS timer_t kvmsys_timer;

static inline uint64_t kvmsys_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline int kvmsys_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void kvmsys_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline int kvmsys_or_int(int *p, int v) { return __atomic_or_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline int kvmsys_xchg_int(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline void kvmsys_store_u8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t kvmsys_add_u64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline uint32_t kvmsys_load_u32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void kvmsys_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t kvmsys_load_u64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

/* A real-time signal glibc does not reserve; Python never installs it. */
static inline int kvmsys_kick_signal(void) { return SIGRTMIN + 5; }

static void kvmsys_kick_handler(int sig) {
    struct kvm_run *run = kvmsys_running;
    (void)sig;
    kvmsys_own_signals++;
    if (run)
        __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
}

/* Install the kick handler once.  No SA_RESTART: KVM_RUN must return EINTR. */
static int kvmsys_install_kick_handler(void) {
    struct sigaction sa, old;
    int sig = kvmsys_kick_signal();
    if (sigaction(sig, NULL, &old) != 0)
        return -1;
    if (old.sa_handler == kvmsys_kick_handler)
        return 0;
    if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
        errno = EBUSY;          /* somebody else owns this signal */
        return -1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvmsys_kick_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

static inline unsigned kvmsys_own_signal_count(void) {
    return __atomic_load_n(&kvmsys_own_signals, __ATOMIC_SEQ_CST);
}

static inline void kvmsys_set_running(void *run) {
    __atomic_store_n(&kvmsys_running, (struct kvm_run *)run, __ATOMIC_SEQ_CST);
}

static pthread_key_t kvmsys_thread_key;
static pthread_once_t kvmsys_thread_key_once = PTHREAD_ONCE_INIT;

/* Runs at exit of any thread that armed a watchdog: no timer outlives its thread. */
static void kvmsys_thread_destructor(void *unused) {
    (void)unused;
    if (kvmsys_timer_ok) {
        timer_delete(kvmsys_timer);
        kvmsys_timer_ok = 0;
    }
}

static void kvmsys_make_key(void) { pthread_key_create(&kvmsys_thread_key, kvmsys_thread_destructor); }

static void kvmsys_thread_cleanup_register(void) {
    pthread_once(&kvmsys_thread_key_once, kvmsys_make_key);
    pthread_setspecific(kvmsys_thread_key, (void *)1);
}

/* Arm this thread's one-shot watchdog for an absolute CLOCK_MONOTONIC deadline.
 * When it fires, the kick signal goes to this thread only. */
static int kvmsys_arm_watchdog(uint64_t deadline_ns) {
    struct itimerspec its;
    if (!kvmsys_timer_ok) {
        struct sigevent sev;
        memset(&sev, 0, sizeof sev);
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = kvmsys_kick_signal();
#ifdef sigev_notify_thread_id
        sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
#else
        sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
#endif
        if (timer_create(CLOCK_MONOTONIC, &sev, &kvmsys_timer) != 0)
            return -1;
        kvmsys_timer_ok = 1;
        kvmsys_thread_cleanup_register();
    }
    memset(&its, 0, sizeof its);
    if (deadline_ns == 0)
        deadline_ns = 1;   /* 0 would disarm */
    its.it_value.tv_sec = (time_t)(deadline_ns / 1000000000ull);
    its.it_value.tv_nsec = (long)(deadline_ns % 1000000000ull);
    return timer_settime(kvmsys_timer, TIMER_ABSTIME, &its, NULL);
}

static int kvmsys_disarm_watchdog(void) {
    struct itimerspec its;
    if (!kvmsys_timer_ok)
        return 0;
    memset(&its, 0, sizeof its);
    return timer_settime(kvmsys_timer, 0, &its, NULL);
}

/* fork.  Every region kvmsys maps (guest RAM, vCPU comm areas with their rings)
 * is MADV_DONTFORK and listed here: in a fork child, before any Python code runs
 * (CPython clears the other threads' states, and with them their vCPU bindings,
 * inside os.fork()), each is replaced by private zero memory at the same address.
 * So the child can never read or write the parent's comm areas or guest RAM (a
 * view it still holds reads zeros instead of faulting), and the address stays
 * reserved until its owner unmaps it.  kvmsys_fork_generation changes in every
 * child: objects stamped with an older one belong to an ancestor process. */
typedef struct kvmsys_region {
    void *addr;
    size_t size;
    struct kvmsys_region *prev, *next;
} kvmsys_region_t;

static kvmsys_region_t kvmsys_regions = {NULL, 0, &kvmsys_regions, &kvmsys_regions};
static pthread_mutex_t kvmsys_regions_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long kvmsys_fork_generation = 1;

/* Replace [addr, addr+size) by private zero memory in place (no fault, no sharing). */
static int kvmsys_detach_region(void *addr, size_t size) {
    void *p = mmap(addr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? -1 : 0;
}

static void kvmsys_atfork_prepare(void) { pthread_mutex_lock(&kvmsys_regions_lock); }
static void kvmsys_atfork_parent(void) { pthread_mutex_unlock(&kvmsys_regions_lock); }

static void kvmsys_atfork_child(void) {
    kvmsys_region_t *r;
    pthread_mutex_init(&kvmsys_regions_lock, NULL);
    for (r = kvmsys_regions.next; r != &kvmsys_regions; r = r->next)
        kvmsys_detach_region(r->addr, r->size);
    kvmsys_fork_generation++;
    /* Only the forking thread exists here: it runs no vCPU and has no watchdog
     * timer (timers are not inherited). */
    kvmsys_bound = NULL;
    kvmsys_running = NULL;
    kvmsys_timer_ok = 0;
}

static pthread_once_t kvmsys_atfork_once = PTHREAD_ONCE_INIT;
static void kvmsys_atfork_register(void) {
    pthread_atfork(kvmsys_atfork_prepare, kvmsys_atfork_parent, kvmsys_atfork_child);
}
/* Installed with the first VM or mapping, not at import. */
static void kvmsys_atfork_install(void) { pthread_once(&kvmsys_atfork_once, kvmsys_atfork_register); }

/* Track a region kvmsys mapped and keep it out of fork children.  NULL on failure.
 * The at-fork handlers are installed with the first region (not at import). */
static kvmsys_region_t *kvmsys_region_add(void *addr, size_t size) {
    kvmsys_region_t *r = (kvmsys_region_t *)calloc(1, sizeof *r);
    if (!r)
        return NULL;
    if (madvise(addr, size, MADV_DONTFORK) != 0) {
        free(r);
        return NULL;
    }
    kvmsys_atfork_install();
    r->addr = addr;
    r->size = size;
    pthread_mutex_lock(&kvmsys_regions_lock);
    r->next = &kvmsys_regions;
    r->prev = kvmsys_regions.prev;
    kvmsys_regions.prev->next = r;
    kvmsys_regions.prev = r;
    pthread_mutex_unlock(&kvmsys_regions_lock);
    return r;
}

/* Forget a region (its owner unmaps it right after). */
static void kvmsys_region_remove(kvmsys_region_t *r) {
    if (!r)
        return;
    pthread_mutex_lock(&kvmsys_regions_lock);
    r->prev->next = r->next;
    r->next->prev = r->prev;
    pthread_mutex_unlock(&kvmsys_regions_lock);
    free(r);
}

#endif
