"""rollout/sandbox.py: generated code runs in a separate locked-down process. Correct, wrong and
partial programs are counted; infinite loops, memory bombs, fork bombs, writes outside the scratch
directory, output floods and network access end as ok=False with a reason, within the timeout plus
a small margin, and the caller (this test process) carries on.

The fork bomb is safe to run: the audit hook refuses the first fork and, under it, the seccomp filter
refuses every fork in every layout (tests/test_sandbox_security.py covers the attacks on the sandbox
itself, tests/test_sandbox_judge.py how the tests see the program's values)."""
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from rollout.sandbox import SandboxMode, count_tests, run_code, sandbox_mode

MARGIN = 2.0      # seconds over the timeout a run may take (typically 0.05-0.3 s on an idle machine)
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
BASIC = SandboxMode(namespaces=False, drop_uid=False, python=sys.executable)   # the weakest layout


def timed(code, tests="assert True", timeout=2.0, **kw):
    t0 = time.monotonic()
    r = run_code(code, tests, timeout=timeout, **kw)
    elapsed = time.monotonic() - t0
    assert elapsed <= timeout + MARGIN, f"took {elapsed:.2f}s for timeout {timeout}s: {r}"
    return r


def leftover_sandbox_processes():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"posttrain-sandbox-" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_mode_is_the_strongest_layout_available():
    mode = sandbox_mode()
    print(mode)
    unshare = shutil.which("unshare")
    if sys.platform.startswith("linux") and os.geteuid() == 0 and unshare and subprocess.run(
            [unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--", "true"]).returncode == 0:
        assert mode.namespaces and mode.drop_uid     # root where namespaces work: the strongest layout
    assert os.path.isfile(mode.python)


def test_correct_code_passes():
    r = timed("def add(a, b):\n    return a + b\nprint('hello')", TESTS)
    assert r.ok and (r.passed, r.total) == (3, 3) and r.score == 1.0 and r.reason == ""
    assert r.output == "hello\n"


def test_wrong_code_scores_zero_and_partial_code_partially():
    r = timed("def add(a, b):\n    return a - b - 1", TESTS)
    assert r.ok and r.passed == 0 and r.score == 0.0 and "3 of 3 tests failed" in r.reason
    r = timed("def add(a, b):\n    return 3 if a == 1 else 0", TESTS)
    assert r.ok and (r.passed, r.total) == (2, 3) and r.score == pytest.approx(2 / 3)
    assert "assert add(2, 2) == 4" in r.reason and "AssertionError" in r.reason


@pytest.mark.parametrize("code, needle", [
    ("def add(a, b) return a", "compile"),
    ("raise ValueError('boom')", "ValueError: boom"),
    ("import sys\nsys.exit(0)", "SystemExit"),                 # exiting early is not passing
    ("import os\nos._exit(0)", "before reporting"),
    ("def add(a, b):\n    return a + b\nimport numpy", "ModuleNotFoundError"),   # stdlib only
])
def test_failures_give_zero_with_a_reason(code, needle):
    r = timed(code, TESTS)
    assert not r.ok and r.score == 0.0 and needle in r.reason, r


def test_tests_are_assert_statements():
    assert count_tests("import math\nassert math.pi > 3\nfor i in range(3):\n    assert i < 3\nx = 1") == 2
    with pytest.raises(ValueError, match="no assert"):
        count_tests("x = 1")
    with pytest.raises(ValueError, match="do not parse"):
        count_tests("assert (")
    # setup statements run, a loop of asserts is one test, and a failing setup is reported
    r = timed("def sq(x):\n    return x * x", "import math\nassert sq(3) == 9\nfor i in range(4):\n    assert sq(i) == i * i\n"
              "y = undefined_name\nassert math.sqrt(sq(5)) == 5")
    assert r.ok and (r.passed, r.total) == (3, 3) and "NameError" in r.reason


def test_infinite_loop_is_killed_at_the_timeout():
    r = timed("while True:\n    pass", timeout=1.0)
    assert not r.ok and "timed out after 1s" in r.reason
    r = timed("import time\ntime.sleep(60)", timeout=1.0)
    assert not r.ok and "timed out" in r.reason


@pytest.mark.parametrize("code", ["x = ' ' * 10**10", "xs = []\nwhile True:\n    xs.append(' ' * 10**6)"])
def test_memory_bombs_end_with_a_reason(code):
    r = timed(code, timeout=5.0, memory_mb=256)
    assert not r.ok and r.reason
    assert "MemoryError" in r.reason or "killed" in r.reason or "timed out" in r.reason, r


def test_fork_bomb_is_contained():
    r = timed("import os\nwhile True:\n    os.fork()", timeout=3.0)
    assert not r.ok and "os.fork is not allowed" in r.reason
    r = timed("import os\npid = os.fork()", timeout=3.0)
    assert not r.ok
    for code in ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])", "import os\nos.system('echo hi')",
                 "import multiprocessing\nmultiprocessing.Process(target=print).start()"):
        assert not timed(code, timeout=3.0).ok
    time.sleep(0.2)
    assert leftover_sandbox_processes() == []


def test_writes_outside_the_scratch_directory_do_not_happen():
    target = f"/tmp/escape_{uuid.uuid4().hex}"
    for code in (f"open({target!r}, 'w').write('x')",
                 f"import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
                 f"import os\nos.chdir('/tmp')\nopen({target.split('/')[-1]!r}, 'w').write('x')",
                 f"import shutil\nopen('a.txt', 'w').write('x')\nshutil.copyfile('a.txt', {target!r})",
                 f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
                 f"open('../{target.split('/')[-1]}', 'w').write('x')"):
        r = timed(code)
        assert not r.ok and ("not allowed" in r.reason or "Errno" in r.reason), r
        assert not os.path.exists(target), code
    # inside the scratch directory (the cwd) files work, and the directory is gone afterwards
    r = timed("import os\nopen('out.txt', 'w').write('hi')\nprint(os.getcwd())\nx = open('out.txt').read()",
              "assert x == 'hi'")
    assert r.ok and r.passed == 1
    scratch = r.output.strip()
    assert "posttrain-sandbox-" in scratch and not os.path.exists(scratch)


@pytest.mark.parametrize("code", ["print('x' * 10**8)", "for _ in range(10**4):\n    print('x' * 10**4)",
                                  "import sys\nwhile True:\n    sys.stderr.write('y' * 4096)"])
def test_output_flood_is_truncated(code):
    r = timed(code, timeout=5.0, max_output=10_000)
    assert not r.ok and "output limit exceeded" in r.reason, r
    assert len(r.output) <= 10_000 + 100 and r.output.endswith("[... output truncated]")


def test_network_is_unreachable():
    r = timed("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", timeout=3.0)
    assert not r.ok and r.reason
    r = timed("import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=2)", timeout=3.0)
    assert not r.ok


def test_namespaced_layout_isolation_is_visible_from_inside():
    mode = sandbox_mode()
    if not (mode.namespaces and mode.drop_uid):
        pytest.skip(f"layout {mode} has no namespaces here")
    code = ("import os\nuid = os.getuid()\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "tmp = os.listdir('/tmp')\nnet = open('/proc/net/dev').read()\n")
    r = timed(code, "assert uid == 65534\nassert len(pids) <= 3\nassert len(tmp) == 1\n"
                    "assert 'eth' not in net and 'ens' not in net")
    assert r.ok and r.passed == r.total == 4, r


def test_tampering_with_the_result_channel_is_rejected():
    code = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'R 1 1 \\n')\n"
            "    except OSError:\n        pass\n")
    r = timed(code, "assert False")
    assert r.score == 0.0 and not r.ok


def test_the_weakest_layout_still_refuses_the_dangerous_things():
    """No namespaces, no uid drop: the audit hook, rlimits and the group kill alone."""
    target = f"/tmp/escape_{uuid.uuid4().hex}"
    assert timed("def add(a, b):\n    return a + b", TESTS, mode=BASIC).score == 1.0
    for code, needle in [("import os\nwhile True:\n    os.fork()", "os.fork"),
                         (f"open({target!r}, 'w').write('x')", "outside the scratch"),
                         ("import socket", "importing socket"),
                         ("import ctypes", "importing ctypes"),
                         ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "os.kill"),
                         ("xs = []\nwhile True:\n    xs.append(' ' * 10**6)", "MemoryError"),
                         ("print('x' * 10**8)", "output limit")]:
        r = timed(code, mode=BASIC)
        assert not r.ok and needle in r.reason, (code, r)
    assert not os.path.exists(target)


def test_the_caller_is_alive_and_runs_in_parallel():
    from concurrent.futures import ThreadPoolExecutor
    codes = ["def add(a, b):\n    return a + b", "while True:\n    pass", "def add(a, b):\n    return 0"] * 2
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run_code(c, TESTS, timeout=1.5), codes))
    assert time.monotonic() - t0 < 2 * 1.5 + MARGIN
    assert [r.score for r in results] == [1.0, 0.0, pytest.approx(1 / 3)] * 2
    assert timed("def add(a, b):\n    return a + b", TESTS).score == 1.0
