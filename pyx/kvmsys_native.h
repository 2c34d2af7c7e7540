/* C-only helpers of the kvmsys core: atomics, thread-local vCPU state, the kick
 * signal handler and per-thread watchdog timers.  Everything here is
 * async-signal-safe where the signal handler touches it. */
#ifndef KVMSYS_NATIVE_H
#define KVMSYS_NATIVE_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
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

/* In a fork child: POSIX timers are not inherited, so forget this thread's. */
static void kvmsys_forget_watchdog(void) { kvmsys_timer_ok = 0; }

static int kvmsys_disarm_watchdog(void) {
    struct itimerspec its;
    if (!kvmsys_timer_ok)
        return 0;
    memset(&its, 0, sizeof its);
    return timer_settime(kvmsys_timer, 0, &its, NULL);
}

#endif
