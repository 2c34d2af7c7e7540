"""Tests cannot hang: conftest gives every test a time limit, past which faulthandler prints
every thread's traceback and the run fails (a lost kick or a deadlock never stalls CI)."""
import os
import signal
import subprocess
import sys
import time

import pytest

HANGS = '''
import threading
import pytest

@pytest.mark.nokvm
@pytest.mark.timeout(2)
def test_waits_forever():
    threading.Event().wait()
'''


@pytest.mark.nokvm
def test_a_hanging_test_fails_with_a_traceback(tmp_path):
    (tmp_path / "test_hang.py").write_text(HANGS)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_hang.py")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert "Timeout" in out.stderr and "test_waits_forever" in out.stderr, out.stderr[-3000:]
    assert elapsed < 60


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_a_suite_started_with_sigint_ignored_still_runs_its_ctrl_c_tests(tmp_path):
    """`pytest &` in a script or under nohup starts with SIGINT ignored; the Ctrl-C tests
    (in-process and in the children they start) must still pass, not time out or skip."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/test_hardening.py::test_cli_ctrl_c_stops_every_vcpu",
                          "tests/test_runloop.py::test_sigint_interrupts_exits_handled_in_c"],
                         capture_output=True, text=True, timeout=240, preexec_fn=_ignore_sigint,
                         cwd=os.path.dirname(tests_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]
