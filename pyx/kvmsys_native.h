/* C-only helpers of the kvmsys core: atomics, thread-local vCPU state, the kick
 * signal handler and per-thread watchdog timers.  Everything here is
 * async-signal-safe where the signal handler touches it. */
#ifndef KVMSYS_NATIVE_H
#define KVMSYS_NATIVE_H

#include <errno.h>
#include <stddef.h>
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

/* KVM_SET_USER_MEMORY_REGION2 and guest_memfd came with Linux 6.8, guest_memfd's flags
 * (mmap, shared at creation) with 6.18; Debian 12's <linux/kvm.h> (6.1) has none of them.
 * What follows is the kernel's ABI as <linux/kvm.h> defines it (the ioctl numbers by the
 * same _IOW/_IOWR macros over the same structs), used only where the installed header
 * lacks it; the structs' sizes are checked below either way.  KVM_CAP_GUEST_MEMFD_FLAGS
 * (it returns the flags a VM's guest_memfd takes) was KVM_CAP_GUEST_MEMFD_MMAP in
 * 6.18's release candidates: one number, 244. */
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif
#ifndef GUEST_MEMFD_FLAG_MMAP
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif
#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    __u64 guest_memfd_offset;
    __u32 guest_memfd;
    __u32 pad1;
    __u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
    __u64 size;
    __u64 flags;
    __u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif
_Static_assert(sizeof(struct kvm_userspace_memory_region2) == 160, "kvm_userspace_memory_region2 is 160 bytes");
_Static_assert(sizeof(struct kvm_create_guest_memfd) == 64, "kvm_create_guest_memfd is 64 bytes");
/* (vm.pyx fills a region2 and copies its start into a region: the kernel's layouts) */
_Static_assert(offsetof(struct kvm_userspace_memory_region2, userspace_addr) ==
               offsetof(struct kvm_userspace_memory_region, userspace_addr) &&
               sizeof(struct kvm_userspace_memory_region) == 32, "region is the start of region2");
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

static inline void kvmsys_sleep_ns(uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    nanosleep(&ts, NULL);
}

static inline int kvmsys_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void kvmsys_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline int kvmsys_or_int(int *p, int v) { return __atomic_or_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline int kvmsys_and_int(int *p, int v) { return __atomic_and_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline int kvmsys_xchg_int(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline void kvmsys_set_errno(int e) { errno = e; }
static inline int kvmsys_add_int(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline void kvmsys_store_u8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
/* Weaker stores for the run loop's entry and exit, each where its reason says: a
 * seq_cst store is an xchg on x86 (a full barrier), and the loop paid six of them for
 * every exit it handed to Python. */
static inline void kvmsys_store_int_release(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void kvmsys_store_u8_relaxed(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint8_t kvmsys_xchg_u8(uint8_t *p, uint8_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t kvmsys_add_u64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline uint32_t kvmsys_load_u32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void kvmsys_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t kvmsys_load_u64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

/* The kick signal: a real-time signal glibc does not reserve and Python never
 * installs (SIGRTMIN + 5), unless kvmsys_set_kick_signal() chose another before
 * the handler was installed (at the first VM or vCPU, never at import). */
static int kvmsys_kick_sig;
static int kvmsys_kick_installed;
static inline int kvmsys_kick_signal(void) { return kvmsys_kick_sig ? kvmsys_kick_sig : SIGRTMIN + 5; }

static void kvmsys_kick_handler(int sig) {
    struct kvm_run *run = kvmsys_running;
    (void)sig;
    kvmsys_own_signals++;
    if (run)
        __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
}

static inline int kvmsys_kick_handler_installed(void) { return kvmsys_kick_installed; }

/* Choose the kick signal; only before the handler is installed.  -1/EBUSY after. */
static int kvmsys_set_kick_signal(int sig) {
    if (kvmsys_kick_installed && sig != kvmsys_kick_signal()) {
        errno = EBUSY;
        return -1;
    }
    kvmsys_kick_sig = sig;
    return 0;
}

/* Install the kick handler once.  SA_RESTART: a kick or watchdog signal that lands
 * while a handler of the application is in a system call restarts it (KVM_RUN
 * returns EINTR all the same: the kernel never restarts it).  -1/EBUSY if the
 * signal already has somebody else's handler. */
static int kvmsys_install_kick_handler(void) {
    struct sigaction sa, old;
    int sig = kvmsys_kick_signal();
    if (kvmsys_kick_installed)
        return 0;
    if (sigaction(sig, NULL, &old) != 0)
        return -1;
    if (old.sa_handler != kvmsys_kick_handler &&
            ((old.sa_flags & SA_SIGINFO) || (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN))) {
        errno = EBUSY;          /* somebody else owns this signal */
        return -1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvmsys_kick_handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0)
        return -1;
    kvmsys_kick_installed = 1;
    return 0;
}

/* Signals without a signal mask (Firecracker's design): kvmsys never blocks a
 * signal, so handlers, fork children and spawned programs see the thread's own
 * mask.  What closes the window between the loop's last look and KVM_RUN's entry
 * is a handler that sets kvm_run.immediate_exit of the vCPU this thread runs:
 * the kick handler above for kicks and the watchdog, the SIGINT relay below for
 * Ctrl-C.  No system call per exit, and no KVM_SET_SIGNAL_MASK, which costs
 * ~200 ns inside every KVM_RUN on our host (the kernel swaps the mask twice).
 * Only a thread that blocks the kick signal itself gets a KVM signal mask (its
 * own mask with the kick signal let in), or a kick could never reach its KVM_RUN. */
static inline int kvmsys_thread_blocks_kick(uint64_t *kvm_mask) {
    sigset_t cur;
    if (pthread_sigmask(SIG_BLOCK, NULL, &cur) != 0 || sigismember(&cur, kvmsys_kick_signal()) != 1)
        return 0;
    sigdelset(&cur, kvmsys_kick_signal());
    memcpy(kvm_mask, &cur, sizeof *kvm_mask);   /* the kernel's 64-bit sigset */
    return 1;
}

/* The SIGINT relay: chained in front of the SIGINT handler the process has (for
 * Python, its C-level handler that trips the KeyboardInterrupt flag), installed
 * by the main thread's run loop whenever it finds another handler there (Python's
 * signal.signal() replaces it).  SIG_DFL and SIG_IGN are left alone: nothing to
 * relay.  It counts every SIGINT; in the main thread's run loop it sets
 * immediate_exit; in any other thread it sends the kick signal to the main thread
 * while that one is inside run(), since a KVM_RUN there would not notice. */
static unsigned kvmsys_sigints;
static struct sigaction kvmsys_sigint_next;
static KVMSYS_TLS int kvmsys_sigint_watch;      /* this is the main thread, inside run() */
static int kvmsys_main_looping;
static pthread_t kvmsys_main_thread;

static void kvmsys_sigint_relay(int sig, siginfo_t *si, void *ctx) {
    int saved = errno;
    struct kvm_run *run;
    if (kvmsys_sigint_next.sa_flags & SA_SIGINFO)
        kvmsys_sigint_next.sa_sigaction(sig, si, ctx);
    else if (kvmsys_sigint_next.sa_handler != SIG_DFL && kvmsys_sigint_next.sa_handler != SIG_IGN)
        kvmsys_sigint_next.sa_handler(sig);
    /* counted after Python's flag is up: a run loop that sees the count finds it */
    __atomic_add_fetch(&kvmsys_sigints, 1, __ATOMIC_SEQ_CST);
    if (kvmsys_sigint_watch) {
        run = kvmsys_running;
        if (run)
            __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    } else if (__atomic_load_n(&kvmsys_main_looping, __ATOMIC_SEQ_CST)) {
        pthread_kill(kvmsys_main_thread, kvmsys_kick_signal());
    }
    errno = saved;
}

static inline unsigned kvmsys_sigint_count(void) { return __atomic_load_n(&kvmsys_sigints, __ATOMIC_SEQ_CST); }

/* Main thread only (one caller at a time): put the relay in front of SIGINT's
 * handler if another one is there.  Two system calls the first time, one after. */
static inline int kvmsys_sigint_relay_ensure(void) {
    struct sigaction cur, sa;
    if (sigaction(SIGINT, NULL, &cur) != 0)
        return -1;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == kvmsys_sigint_relay)
        return 0;
    if ((!(cur.sa_flags & SA_SIGINFO) && (cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN)) ||
            (cur.sa_flags & SA_RESETHAND))
        return 0;                       /* Ctrl-C ends the process, or is ignored, or a one-shot */
    kvmsys_sigint_next = cur;           /* the relay is not installed now: nobody reads it */
    sa = cur;
    sa.sa_sigaction = kvmsys_sigint_relay;
    sa.sa_flags = cur.sa_flags | SA_SIGINFO;
    return sigaction(SIGINT, &sa, NULL);
}

/* The main thread enters or leaves a run() call (nested ones count): from the
 * first entry to the last exit the relay sets immediate_exit of the vCPU it runs
 * (none while a handler runs: then Python's flag is enough) and other threads'
 * relays kick it.  Seq-cst against the count: a relay that finds no run here has
 * counted first, and the run loop's next look at the count sees it. */
static KVMSYS_TLS int kvmsys_sigint_depth;
static inline void kvmsys_sigint_watch_enter(void) {
    if (kvmsys_sigint_depth++ == 0) {
        kvmsys_main_thread = pthread_self();
        kvmsys_sigint_watch = 1;
        __atomic_store_n(&kvmsys_main_looping, 1, __ATOMIC_SEQ_CST);
    }
}
static inline void kvmsys_sigint_watch_leave(void) {
    if (kvmsys_sigint_depth > 0 && --kvmsys_sigint_depth == 0) {
        kvmsys_sigint_watch = 0;
        __atomic_store_n(&kvmsys_main_looping, 0, __ATOMIC_SEQ_CST);
    }
}

/* Test hook: a signal to raise in the next thread that enters the run loop, once,
 * after it last looked at signals and before KVM_RUN: one that lands between two
 * KVM_RUNs. */
static int kvmsys_window_signal;
static inline void kvmsys_raise_window_signal(void) {
    int sig;
    if (__builtin_expect(__atomic_load_n(&kvmsys_window_signal, __ATOMIC_RELAXED) == 0, 1))
        return;             /* the usual case: no locked instruction per entry */
    sig = __atomic_exchange_n(&kvmsys_window_signal, 0, __ATOMIC_SEQ_CST);
    if (sig)
        pthread_kill(pthread_self(), sig);
}
static inline void kvmsys_set_window_signal(int sig) { __atomic_store_n(&kvmsys_window_signal, sig, __ATOMIC_SEQ_CST); }

/* Test hook: the next kick pauses this long after setting kick_pending (at 1)
 * and after setting immediate_exit (at 2), as a kicker preempted there does. */
static long kvmsys_kick_delay_ns;
static int kvmsys_kick_delay_at;
static inline void kvmsys_kick_pause(int at) {
    long ns;
    if (__builtin_expect(!(__atomic_load_n(&kvmsys_kick_delay_at, __ATOMIC_RELAXED) & at), 1))
        return;             /* the usual case: no locked instruction in a kick */
    ns = __atomic_load_n(&kvmsys_kick_delay_ns, __ATOMIC_SEQ_CST);
    if (!(__atomic_fetch_and(&kvmsys_kick_delay_at, ~at, __ATOMIC_SEQ_CST) & at) || ns <= 0)
        return;
    kvmsys_sleep_ns((uint64_t)ns);
}
static inline void kvmsys_set_kick_delay(long ns) {
    __atomic_store_n(&kvmsys_kick_delay_ns, ns, __ATOMIC_SEQ_CST);
    __atomic_store_n(&kvmsys_kick_delay_at, ns > 0 ? 3 : 0, __ATOMIC_SEQ_CST);
}

/* Benchmark hook (its self-test injects known regressions): busy-wait this long at
 * place 0 (every exit the C run loop dispatches), 1 (before every Python exit
 * handler) or 2 (every kick, before its signal).  Off by default: one relaxed load
 * and an untaken branch. */
static uint64_t kvmsys_bench_delay[3];
static inline void kvmsys_bench_pause(int at) {
    uint64_t ns = __atomic_load_n(&kvmsys_bench_delay[at], __ATOMIC_RELAXED), end;
    if (__builtin_expect(ns == 0, 1))
        return;
    end = kvmsys_now_ns() + ns;
    while (kvmsys_now_ns() < end)
        ;
}
/* returns the delay it replaces */
static inline uint64_t kvmsys_set_bench_delay(int at, uint64_t ns) {
    return __atomic_exchange_n(&kvmsys_bench_delay[at], ns, __ATOMIC_RELAXED);
}


/* A thread that blocks the kick signal: take the kick signals pending for it
 * (they interrupted KVM_RUN through its KVM signal mask and stay pending); returns
 * how many. */
static inline unsigned kvmsys_take_kick_signals(void) {
    sigset_t s;
    struct timespec zero = {0, 0};
    unsigned n = 0;
    sigemptyset(&s);
    sigaddset(&s, kvmsys_kick_signal());
    while (sigtimedwait(&s, NULL, &zero) > 0)
        n++;
    return n;
}

static inline unsigned kvmsys_own_signal_count(void) {
    return __atomic_load_n(&kvmsys_own_signals, __ATOMIC_SEQ_CST);
}

/* Only this thread's signal handlers read it: ordered against them by the compiler
 * alone (a signal fence), no CPU barrier. */
static inline void kvmsys_set_running(void *run) {
    __atomic_store_n(&kvmsys_running, (struct kvm_run *)run, __ATOMIC_RELAXED);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* The watchdog: one timer per thread, created once, that sends the kick signal
 * to this thread only, armed at the deadline of the innermost run this thread
 * is inside (a run nested in a handler arms its own; the outer one's is armed
 * again when it returns).
 * timer_create can fail for a while (on some hosts EAGAIN for up to ~0.5 s
 * after a process that ran a VM exits): it is retried for up to ~1 s, then a
 * helper thread that sleeps until the deadline and signals stands in for the timer. */
static KVMSYS_TLS uint64_t kvmsys_armed_ns;      /* the deadline armed now; 0: none */

struct kvmsys_wd_thread {
    pthread_t owner, helper;
    pthread_mutex_t m;
    pthread_cond_t c;
    uint64_t deadline;
    int quit;
};
static KVMSYS_TLS struct kvmsys_wd_thread *kvmsys_wd;
static int kvmsys_timer_failures;   /* test hook: make this many timer_create calls fail (EAGAIN) */

static pthread_key_t kvmsys_thread_key;
static pthread_once_t kvmsys_thread_key_once = PTHREAD_ONCE_INIT;

/* Runs at exit of any thread that armed a watchdog: no timer or helper outlives its thread. */
static void kvmsys_thread_destructor(void *unused) {
    struct kvmsys_wd_thread *w = kvmsys_wd;
    (void)unused;
    if (kvmsys_timer_ok) {
        timer_delete(kvmsys_timer);
        kvmsys_timer_ok = 0;
    }
    if (w) {
        pthread_mutex_lock(&w->m);
        w->quit = 1;
        pthread_cond_signal(&w->c);
        pthread_mutex_unlock(&w->m);
        pthread_join(w->helper, NULL);
        pthread_cond_destroy(&w->c);
        pthread_mutex_destroy(&w->m);
        free(w);
        kvmsys_wd = NULL;
    }
}

static void kvmsys_make_key(void) { pthread_key_create(&kvmsys_thread_key, kvmsys_thread_destructor); }

static void kvmsys_thread_cleanup_register(void) {
    pthread_once(&kvmsys_thread_key_once, kvmsys_make_key);
    pthread_setspecific(kvmsys_thread_key, (void *)1);
}

static void *kvmsys_wd_main(void *arg) {
    struct kvmsys_wd_thread *w = (struct kvmsys_wd_thread *)arg;
    struct timespec ts;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);      /* signals are for the owner, not for us */
    pthread_mutex_lock(&w->m);
    while (!w->quit) {
        if (w->deadline == 0) {
            pthread_cond_wait(&w->c, &w->m);
        } else if (kvmsys_now_ns() >= w->deadline) {
            w->deadline = 0;
            pthread_kill(w->owner, kvmsys_kick_signal());
        } else {
            ts.tv_sec = (time_t)(w->deadline / 1000000000ull);
            ts.tv_nsec = (long)(w->deadline % 1000000000ull);
            pthread_cond_timedwait(&w->c, &w->m, &ts);
        }
    }
    pthread_mutex_unlock(&w->m);
    return NULL;
}

static int kvmsys_start_wd_thread(void) {
    pthread_condattr_t ca;
    int rc;
    struct kvmsys_wd_thread *w = (struct kvmsys_wd_thread *)calloc(1, sizeof *w);
    if (!w)
        return ENOMEM;
    w->owner = pthread_self();
    pthread_mutex_init(&w->m, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->c, &ca);
    pthread_condattr_destroy(&ca);
    rc = pthread_create(&w->helper, NULL, kvmsys_wd_main, w);
    if (rc) {
        pthread_cond_destroy(&w->c);
        pthread_mutex_destroy(&w->m);
        free(w);
        return rc;
    }
    kvmsys_wd = w;
    kvmsys_thread_cleanup_register();
    return 0;
}

static int kvmsys_timer_create(void) {
    struct sigevent sev;
    if (__atomic_load_n(&kvmsys_timer_failures, __ATOMIC_SEQ_CST) > 0 &&
            __atomic_sub_fetch(&kvmsys_timer_failures, 1, __ATOMIC_SEQ_CST) >= 0) {
        errno = EAGAIN;
        return -1;
    }
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = kvmsys_kick_signal();
#ifdef sigev_notify_thread_id
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
#else
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
#endif
    return timer_create(CLOCK_MONOTONIC, &sev, &kvmsys_timer);
}

/* Try number *tries* (from 0) to make this thread's timer (or helper thread) if
 * it has none yet; before the deadline is taken.  EAGAIN passes within ~0.5 s
 * where we saw it: retried for up to ~1 s (1, 2, 4 ... 512 ms apart), since the
 * helper thread costs a thread for the rest of this one.  Returns 0, an errno
 * (*op names the call), or -1: wait *wait_ns, then try again with tries + 1
 * (the caller looks at signals meanwhile: a Ctrl-C ends run() there). */
static int kvmsys_watchdog_try(int tries, uint64_t *wait_ns, const char **op) {
    if (kvmsys_timer_ok || kvmsys_wd)
        return 0;
    if (kvmsys_timer_create() == 0) {
        kvmsys_timer_ok = 1;
        kvmsys_thread_cleanup_register();
        return 0;
    }
    if (errno == EAGAIN && tries < 10) {
        *wait_ns = 1000000ull << tries;
        return -1;
    }
    *op = "pthread_create(watchdog thread, after timer_create failed)";
    return kvmsys_start_wd_thread();
}

static int kvmsys_watchdog_ready(const char **op) {
    int tries, rc;
    uint64_t wait_ns;
    for (tries = 0; (rc = kvmsys_watchdog_try(tries, &wait_ns, op)) < 0; tries++)
        kvmsys_sleep_ns(wait_ns);
    return rc;
}

/* Set this thread's watchdog to fire at deadline_ns (0: disarm).  Returns 0 or
 * an errno; *op names the call that failed. */
static int kvmsys_set_watchdog(uint64_t deadline_ns, const char **op) {
    struct itimerspec its;
    int rc;
    if (deadline_ns && (rc = kvmsys_watchdog_ready(op)) != 0)
        return rc;
    kvmsys_armed_ns = deadline_ns;
    if (kvmsys_wd) {
        pthread_mutex_lock(&kvmsys_wd->m);
        kvmsys_wd->deadline = deadline_ns;
        pthread_cond_signal(&kvmsys_wd->c);
        pthread_mutex_unlock(&kvmsys_wd->m);
        return 0;
    }
    if (!kvmsys_timer_ok)
        return 0;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = (time_t)(deadline_ns / 1000000000ull);
    its.it_value.tv_nsec = (long)(deadline_ns % 1000000000ull);
    *op = "timer_settime(watchdog)";
    return timer_settime(kvmsys_timer, TIMER_ABSTIME, &its, NULL) ? errno : 0;
}

/* A run with a deadline starts: arm at its deadline, the innermost run's, whether
 * earlier or later than an enclosing run's (that one cannot return before this one
 * does; it sees its own deadline passed when this one returns).  *saved gets what
 * to restore when the run ends. */
static int kvmsys_watchdog_push(uint64_t deadline_ns, uint64_t *saved, const char **op) {
    *saved = kvmsys_armed_ns;
    if (deadline_ns == 0 || kvmsys_armed_ns == deadline_ns)
        return 0;
    return kvmsys_set_watchdog(deadline_ns, op);
}

/* The run ends: back to the enclosing runs' deadline (or none). */
static int kvmsys_watchdog_pop(uint64_t saved, const char **op) {
    if (saved == kvmsys_armed_ns)
        return 0;
    return kvmsys_set_watchdog(saved, op);
}

static inline int kvmsys_watchdog_uses_thread(void) { return kvmsys_wd != NULL; }
static inline void kvmsys_fail_timer_create(int n) { __atomic_store_n(&kvmsys_timer_failures, n, __ATOMIC_SEQ_CST); }


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
    kvmsys_wd = NULL;           /* its helper thread is not inherited either */
    kvmsys_armed_ns = 0;
    kvmsys_sigint_watch = 0;    /* no main thread runs a vCPU here: the relay kicks nobody */
    kvmsys_sigint_depth = 0;
    kvmsys_main_looping = 0;
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

/* How many records cover addr (tests: a mapping's record is kept, and dropped with it). */
static int kvmsys_region_records(void *addr) {
    kvmsys_region_t *r;
    int n = 0;
    pthread_mutex_lock(&kvmsys_regions_lock);
    for (r = kvmsys_regions.next; r != &kvmsys_regions; r = r->next)
        n += (char *)r->addr <= (char *)addr && (char *)addr < (char *)r->addr + r->size;
    pthread_mutex_unlock(&kvmsys_regions_lock);
    return n;
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
