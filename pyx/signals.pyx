# Process-wide set-up done at the first VM, never at import: the kick signal's
# handler, and the Python layer's at-fork/atexit hooks (registered through
# on_first_vm).  Importing kvmsys changes nothing in the process.
import signal as _signal

cdef list _first_vm_hooks = []
cdef bint _first_vm_done = False


def kick_signal():
    """The signal kvmsys uses to get a vCPU thread out of KVM_RUN (kicks, the watchdog)."""
    return kvmsys_kick_signal()


def _signal_name(int sig):
    rtmin = <int>_signal.SIGRTMIN
    return f"{sig} (SIGRTMIN+{sig - rtmin})" if sig >= rtmin else f"{sig} ({_signal.Signals(sig).name})"


def set_kick_signal(signum):
    """Choose the kick signal (a real-time signal, SIGRTMIN..SIGRTMAX); only before the first
    VM exists, since its handler is installed then.  For applications that use SIGRTMIN+5."""
    cdef int sig = as_int(signum, "kick signal", <int>_signal.SIGRTMIN, <int>_signal.SIGRTMAX)
    if kvmsys_set_kick_signal(sig) != 0:
        from kvmsys.errors import ConfigurationError
        raise ConfigurationError(f"the kick signal is {_signal_name(kvmsys_kick_signal())} already: "
                                 "choose another before the first VM is created")


def on_first_vm(fn):
    """Call fn() once, when this process creates its first VM (now, if it has)."""
    if _first_vm_done:
        fn()
    else:
        _first_vm_hooks.append(fn)


cdef int first_vm() except -1:
    global _first_vm_done
    if _first_vm_done:
        return 0
    if kvmsys_install_kick_handler() != 0:
        err = errno
        if err == EBUSY:
            from kvmsys.errors import ConfigurationError
            raise ConfigurationError(
                f"signal {_signal_name(kvmsys_kick_signal())}, kvmsys's kick signal, already has "
                "a handler in this process: choose a free real-time signal with "
                "kvmsys.set_kick_signal(signum) before creating the first VM")
        raise_os(err, "sigaction(kick signal)")
    _first_vm_done = True
    hooks = list(_first_vm_hooks)
    _first_vm_hooks.clear()
    for fn in hooks:
        fn()
    return 0


def kick_handler_installed():
    return bool(kvmsys_kick_handler_installed())


def _fail_timer_create(int n):
    """Test hook: the next n timer_create calls of the watchdog fail with EAGAIN."""
    kvmsys_fail_timer_create(n)


def watchdog_uses_thread():
    """True if this thread's watchdog is the helper thread (timer_create kept failing)."""
    return bool(kvmsys_watchdog_uses_thread())


def _signal_between_runs(int sig):
    """Test hook: the next thread to enter the run loop raises *sig* on itself there, once,
    after blocking its signals: a signal that lands between two KVM_RUNs."""
    kvmsys_set_window_signal(sig)



cdef double hook_seconds(object seconds, double most) except -1.0:
    # a test or benchmark hook's delay: a number in [0, most] (never NaN, never one whose
    # nanoseconds overflow the C integer it becomes)
    if not isinstance(seconds, (int, float)):
        raise ArgumentTypeError(f"seconds must be a number, not {type(seconds).__name__}")
    if not 0 <= seconds <= most:
        raise InvalidArgumentError(f"seconds must be within [0, {most:g}], not {seconds!r}")
    return seconds


def _delay_kick(seconds):
    """Test hook: the next kick pauses *seconds* (0..10) after setting its pending bit and
    again after setting immediate_exit, before its signal (holding the vCPU's lock), as a
    kicker preempted there does.  0 cancels."""
    kvmsys_set_kick_delay(<long>(hook_seconds(seconds, 10.0) * 1e9))


def _bench_delay(at, seconds):
    """Benchmark hook: busy-wait *seconds* on every exit the C run loop dispatches (at 0),
    before every Python exit handler (at 1) or in every kick of a running vCPU, before
    its signal (at 2), process-wide; 0 turns it off.  Returns the delay it replaces (s)."""
    return kvmsys_set_bench_delay(as_int(at, "at", 0, 2), <uint64_t>(hook_seconds(seconds, 0.01) * 1e9)) / 1e9
