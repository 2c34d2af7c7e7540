"""Test configuration: real /dev/kvm, the same test bodies over both ABIs.

Tests need /dev/kvm unless marked `nokvm`.  Without /dev/kvm they skip with a
reason, unless KVMSYS_REQUIRE_KVM=1 (CI sets it where /dev/kvm exists), in
which case a skipped KVM test is a failure.  The one exception: a test may skip
because the host's KVM cannot do something (detected, not assumed) or the test
environment lacks something; such reasons start with "host:" or "env:".

Tests cannot hang: each test (setup, call and teardown) has TEST_TIMEOUT seconds
(KVMSYS_TEST_TIMEOUT, or @pytest.mark.timeout(seconds) for one test); past it,
faulthandler prints every thread's traceback and ends the run with a failure, so a
lost kick or a deadlock fails CI with the place it hangs instead of stalling it.
"""
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time

import pytest

# Python processes the tests start (`python -c`, `python -m kvmsys`, the boot benchmark's)
# import the installed kvmsys, never the uncompiled source tree in the working directory
# (Python >= 3.11; tests that must also work on 3.10 pass cwd= themselves).
os.environ["PYTHONSAFEPATH"] = "1"

HAVE_KVM = os.path.exists("/dev/kvm")
REQUIRE_KVM = os.environ.get("KVMSYS_REQUIRE_KVM") == "1"
TEST_TIMEOUT = float(os.environ.get("KVMSYS_TEST_TIMEOUT", "120"))


def other_checkout(tests_dir, module_file):
    """The source checkout that *module_file* (a package's __init__.py) lies in, when it is
    not the checkout *tests_dir* belongs to; None for an installed package (CI tests the
    wheel) or this checkout's own."""
    from pathlib import Path
    root = Path(module_file).resolve().parent.parent
    here = Path(tests_dir).resolve().parent
    if root != here and (root / "setup.py").is_file() and (root / "pyx").is_dir():
        return root
    return None


def check_the_code_under_test():
    # An editable install of one checkout serves `import kvmsys` to every other checkout
    # (a git worktree): its tests would then pass or fail on code they do not contain
    import kvmsys
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    mods = [kvmsys]
    try:
        import kvmsys_bench
        mods.append(kvmsys_bench)
    except ImportError:
        pass
    for mod in mods:
        other = other_checkout(tests_dir, mod.__file__)
        if other is not None:
            raise pytest.UsageError(
                f"these tests are {os.path.dirname(tests_dir)}'s, but `import {mod.__name__}` "
                f"finds {other}'s (an editable install of another checkout?): install this "
                "checkout, or put its kvmsys/ and benchmarks/ (as kvmsys_bench) first on PYTHONPATH")


def pytest_configure(config):
    check_the_code_under_test()
    # A suite started with SIGINT ignored (`pytest &` in a script, nohup) would pass the
    # ignoring on to every child it starts (exec keeps SIG_IGN), and the Ctrl-C tests would
    # wait in vain: take Python's default handler here, so this process raises
    # KeyboardInterrupt and its children start with SIGINT at its default again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "nokvm: the test does not need /dev/kvm")
    config.addinivalue_line("markers", "timeout(seconds): this test's time limit (default TEST_TIMEOUT)")
    # The real stderr, not pytest's capture file: the dump must reach the CI log.
    global _dump_fd
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture()
    try:
        _dump_fd = os.dup(2)
    finally:
        if capman is not None:
            capman.resume_global_capture()


_dump_fd = 2


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker else TEST_TIMEOUT
    if limit > 0:
        faulthandler.dump_traceback_later(limit, exit=True, file=_dump_fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(config, items):
    if HAVE_KVM:
        return
    for item in items:
        if item.get_closest_marker("nokvm") is None:
            if REQUIRE_KVM:
                item.add_marker(pytest.mark.xfail(reason="/dev/kvm is required but absent", run=False, strict=True))
            else:
                item.add_marker(pytest.mark.skip(reason="/dev/kvm is absent (KVM module not loaded, "
                                                        "or a VM without nested virtualization)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_KVM and report.skipped and item.get_closest_marker("nokvm") is None \
            and not _declared_limit(report):
        report.outcome = "failed"
        report.longrepr = f"KVMSYS_REQUIRE_KVM=1 but a KVM test was skipped: {report.longrepr}"


def _declared_limit(report) -> bool:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ").startswith(("host:", "env:"))


def Machine(abi, memory_size, irqchip=False, pit=False):
    """kvmsys's one two-ABI machine (kvmsys.machine), with vCPU 0 attached to this thread."""
    from kvmsys.machine import Machine
    m = Machine(abi, memory_size=memory_size, irqchip=irqchip, pit=pit)
    m.attach(0)
    return m


def fork_child(child, timeout=30.0):
    """Start child() in a fork child of the calling thread (it never returns into pytest);
    its JSON-able result comes back through fork_result(pid, fd, deadline), which this
    returns the arguments of.  (In two steps, so the parent can act while the child runs.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                out = child()
            except BaseException as e:
                out = {"error": repr(e)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r, time.monotonic() + timeout


def fork_result(pid, r, deadline):
    """What the child of fork_child() returned; the test fails if it runs past *deadline*
    (killed then) or did not exit with 0."""
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the fork child hung")
            time.sleep(0.002)
        assert os.waitstatus_to_exitcode(status) == 0
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
    return json.loads(data)


def forked(child, timeout=30.0):
    """child() in a fork child of the calling thread: its JSON-able result."""
    return fork_result(*fork_child(child, timeout))


def interrupt_cli(args, ready, *, cwd, within=60.0, settle=0.0):
    """`python -m kvmsys *args*`, sent SIGINT (Ctrl-C) once ready(proc) holds (looked at every
    20 ms while it runs, for *within* s) and *settle* s more: (its exit status, its stderr).
    It must still be running then, and end within 20 s of the signal."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmsys", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd)
    try:
        deadline = time.monotonic() + within
        while not ready(proc):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, f"not ready within {within} s"
            time.sleep(0.02)
        time.sleep(settle)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


class FakeVm:
    """A VM as the Python device models see it: interrupt lines recorded, handlers accepted."""
    has_irqchip = True

    def __init__(self):
        self.lines = []

    def irq_line(self, line, level):
        self.lines.append((line, level))

    def add_handler(self, *args):
        return len(args)


@pytest.fixture(params=["fd", "sys"])
def abi(request):
    return request.param


@pytest.fixture
def machine(abi):
    from kvmsys.guests import layout
    m = Machine(abi, layout.RAM_SIZE)
    yield m
    m.close()


@pytest.fixture
def fresh_process_vm():
    """No process VM and no binding: the next add_vcpu()/vm() creates the VM (RAM_SIZE at
    0, no PC ports); afterwards the VM is destroyed and the configuration restored."""
    import kvmsys
    from kvmsys import syscall
    from kvmsys.guests import layout
    saved = syscall.config()
    syscall.destroy_vm()
    syscall.configure(memory_size=layout.RAM_SIZE, pc_ports=False)
    yield
    if kvmsys.current() is not None:
        kvmsys.remove_vcpu()
    syscall.destroy_vm()
    syscall.configure(**saved)


@pytest.fixture
def fdvm():
    """A bare fd-ABI VM with RAM_SIZE at 0 and no vCPU."""
    import kvmsys
    from kvmsys.guests import layout
    kvm = kvmsys.Kvm()
    vm = kvm.create_vm()
    vm.add_memory(0, 0, layout.RAM_SIZE)
    yield vm
    vm.close()
    kvm.close()
