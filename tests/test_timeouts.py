"""Tests cannot hang: conftest gives every test a time limit, past which faulthandler prints
every thread's traceback and the run fails (a lost kick or a deadlock never stalls CI)."""
import os
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
