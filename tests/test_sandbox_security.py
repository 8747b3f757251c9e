"""rollout/sandbox.py against code written to attack it: the defects of the reliability/security
issue (items 2-4) and the classes around them. Every attack here either did harm or scored on the
sandbox before the judge/worker split and the kernel layers (seccomp, Landlock, read-only mounts).

Layouts: `sandbox_mode()` is the namespaced one on a root machine with unshare; BASIC is what a
normal user gets (no namespaces, no uid drop: Landlock + seccomp), forced here as root.
`native` tests switch the audit hook off (AUDIT_HOOK) and make raw system calls through _ctypes, the
way code that got past the hook would: the kernel layers must hold on their own."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import rollout.sandbox as sandbox
from rollout.sandbox import SandboxMode, run_code, sandbox_mode
from test_sandbox import leftover_sandbox_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASIC = SandboxMode(namespaces=False, drop_uid=False, python=sys.executable)
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
LAYOUTS = [pytest.param(None, id="default"), pytest.param(BASIC, id="basic")]


def run(code, tests="assert True", mode=None, timeout=5.0):
    return run_code(code, tests, timeout=timeout, mode=mode)


@pytest.fixture
def victim():
    """A process of the caller's own user that the code must not be able to touch."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def world_writable_dir():
    """A mode-1777 directory outside every directory the sandbox knows as world-writable."""
    base = REPO if all(os.stat(d).st_mode & 0o001 for d in (REPO, os.path.dirname(REPO), "/")) else "/"
    d = tempfile.mkdtemp(prefix=".sandbox-ww-", dir=base)
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ item 2: the layout a normal user gets
@pytest.mark.parametrize("mode", LAYOUTS)
def test_the_code_cannot_kill_processes_of_the_same_user(mode, victim):
    code = (f"import os, signal\nfd = os.pidfd_open({victim.pid})\nsignal.pidfd_send_signal(fd, signal.SIGKILL)\n"
            f"killed = True")
    r = run(code, "assert killed", mode=mode)
    time.sleep(0.1)
    assert victim.poll() is None, f"the sandboxed code killed pid {victim.pid}: {r}"
    assert r.score == 0.0


@pytest.mark.parametrize("mode", LAYOUTS)
@pytest.mark.parametrize("how", ["mkfifo", "mknod", "sqlite3", "readline", "dir_fd", "tempfile", "shutil"])
def test_no_file_appears_outside_the_scratch_directory(mode, how):
    target = f"/tmp/sandbox-escape-{how}-{uuid.uuid4().hex}"
    name = os.path.basename(target)
    code = {"mkfifo": f"import os\nos.mkfifo({target!r})",
            "mknod": f"import os, stat\nos.mknod({target!r}, 0o644 | stat.S_IFREG)",
            "sqlite3": f"import sqlite3\nsqlite3.connect({target!r}).execute('create table t (x)')",
            "readline": f"import readline\nreadline.add_history('import os')\nreadline.write_history_file({target!r})",
            "dir_fd": f"import os\nd = os.open('/tmp', os.O_RDONLY)\nos.close(os.open({name!r}, os.O_CREAT | os.O_WRONLY, dir_fd=d))",
            "tempfile": f"import tempfile\ntempfile.mkstemp(dir='/tmp', prefix={name!r})",
            "shutil": f"import shutil\nshutil.copy('/etc/os-release', {target!r})"}[how]
    try:
        r = run(code, mode=mode)
        made = [f for f in os.listdir("/tmp") if f.startswith(name)]
        assert made == [], f"{how} created {made} in /tmp: {r}"
        assert not r.ok, r
    finally:
        for leftover in [f for f in os.listdir("/tmp") if f.startswith(name)]:
            os.unlink(os.path.join("/tmp", leftover))


def test_the_code_cannot_leave_the_process_group_and_outlive_the_run():
    r = run("import os, time\nos.setsid()\ntime.sleep(30)", mode=BASIC, timeout=1.0)
    time.sleep(0.3)
    left = leftover_sandbox_processes()
    for pid in left:
        os.kill(int(pid), 9)
    assert left == [], f"the code outlived its run ({r})"


def test_the_code_cannot_renice_or_pin_the_caller():
    me = os.getpid()
    before = (os.getpriority(os.PRIO_PROCESS, me), os.sched_getaffinity(me))
    code = (f"import os\nos.setpriority(os.PRIO_PROCESS, {me}, 19)\nos.sched_setaffinity({me}, {{0}})\n"
            "changed = True")
    try:
        r = run(code, "assert changed", mode=BASIC)
        assert (os.getpriority(os.PRIO_PROCESS, me), os.sched_getaffinity(me)) == before, r
        assert r.score == 0.0
    finally:
        os.setpriority(os.PRIO_PROCESS, me, before[0])
        os.sched_setaffinity(me, before[1])


def test_the_code_cannot_read_the_callers_environment_or_memory():
    me = os.getpid()
    code = ("got = []\n"
            f"for name in ('environ', 'mem', 'maps'):\n"
            f"    try:\n"
            f"        with open('/proc/{me}/' + name, 'rb') as f:\n"
            f"            got.append((name, len(f.read(64))))\n"
            f"    except OSError:\n"
            f"        pass\n")
    r = run(code, "assert got == []", mode=BASIC)
    assert r.ok and r.score == 1.0, r


@pytest.mark.parametrize("mode", LAYOUTS)
def test_the_code_cannot_read_files_outside_the_system_directories(mode):
    """The dataset (and so its tests), the checkout, credentials: nothing outside /usr, /lib, the
    interpreter's standard library, /proc and a few /etc files. Needs Landlock."""
    if getattr(sandbox, "landlock_abi", lambda: 1)() == 0:
        pytest.skip("no Landlock on this kernel: reads are only as narrow as the uid allows")
    path = os.path.join(REPO, f".sandbox-secret-{uuid.uuid4().hex}")
    with open(path, "w") as f:
        f.write("the expected answers")
    os.chmod(path, 0o644)
    try:
        r = run(f"try:\n    text = open({path!r}).read()\nexcept OSError:\n    text = None", "assert text is None",
                mode=mode)
        assert r.ok and r.score == 1.0, r
    finally:
        os.unlink(path)


def test_a_layout_that_cannot_contain_the_code_is_refused():
    weakest = SandboxMode(namespaces=False, drop_uid=False, python=sys.executable, landlock=0)
    with pytest.raises(RuntimeError, match="refusing to run untrusted code.*Landlock"):
        run_code("x = 1", "assert x == 1", mode=weakest)


def test_a_non_root_caller_gets_a_layout_that_holds():
    """The real thing: the caller runs as uid 65534 (setpriv), picks its own layout, and the code
    tries to kill a process of that user and to write a file in /tmp."""
    setpriv = shutil.which("setpriv")
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not setpriv or not os.path.exists(python):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to start a non-root caller")
    if not all(os.stat(d).st_mode & 0o005 == 0o005 for d in (REPO, os.path.join(REPO, "rollout"))):
        pytest.skip("the checkout is not readable by uid 65534")
    target = f"/tmp/sandbox-escape-nonroot-{uuid.uuid4().hex}"
    script = f"""
import json, os, subprocess, sys, time
sys.path.insert(0, {REPO!r})
from rollout.sandbox import run_code, sandbox_mode
victim = subprocess.Popen(["sleep", "30"])
try:
    mode = sandbox_mode()
except RuntimeError as e:
    print(json.dumps({{"refused": str(e)}})); victim.kill(); sys.exit(0)
code = ("import os, signal\\n"
        "try:\\n    signal.pidfd_send_signal(os.pidfd_open(%d), signal.SIGKILL)\\nexcept OSError:\\n    pass\\n"
        "try:\\n    os.mkfifo({target!r})\\nexcept OSError:\\n    pass\\n") % victim.pid
r = run_code(code, "assert True")
time.sleep(0.1)
print(json.dumps({{"mode": str(mode), "alive": victim.poll() is None, "ok": r.ok, "reason": r.reason}}))
victim.kill()
"""
    out = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
                         capture_output=True, text=True, timeout=60, cwd="/")
    try:
        got = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"the non-root caller failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    finally:
        if os.path.lexists(target):
            os.unlink(target)
    if "refused" in got:   # a kernel without Landlock: refusing is the right answer
        assert "Landlock" in got["refused"]
        return
    assert got["alive"] and got["ok"], got
    assert not os.path.lexists(target), got


# ------------------------------------------------------------------ item 3: the namespaced layout
def namespaced():
    mode = sandbox_mode()
    if not mode.namespaces:
        pytest.skip(f"layout {mode} has no namespaces here")
    return mode


@pytest.mark.parametrize("how", ["mkfifo", "sqlite3", "open"])
def test_namespaced_no_file_in_other_world_writable_directories(how, world_writable_dir):
    mode = namespaced()
    target = os.path.join(world_writable_dir, "x")
    code = {"mkfifo": f"import os\nos.mkfifo({target!r})",
            "sqlite3": f"import sqlite3\nsqlite3.connect({target!r}).execute('create table t (x)')",
            "open": f"import os\nos.close(os.open({target!r}, os.O_CREAT | os.O_WRONLY))"}[how]
    r = run(code, mode=mode)
    assert os.listdir(world_writable_dir) == [], f"{how} wrote into {world_writable_dir}: {r}"
    assert not r.ok


def test_namespaced_the_scratch_directory_has_a_total_quota():
    mode = namespaced()
    code = ("written = 0\ntry:\n    for i in range(12):\n        with open('f%d' % i, 'wb') as f:\n"
            "            for _ in range(8):\n                f.write(b'x' * (1 << 20))\n                written += 1\n"
            "except OSError as e:\n    error = str(e)\n")
    r = run(code, "assert written < 64\nassert 'No space left' in error", mode=mode, timeout=20.0)
    assert r.ok and r.score == 1.0, r


def test_namespaced_dev_holds_only_the_harmless_devices():
    """Without Landlock too: /dev/kvm, /dev/fuse, /dev/pts... are not there to open."""
    mode = namespaced()
    mode = SandboxMode(mode.namespaces, mode.drop_uid, mode.python, mode.unshare, landlock=0)
    code = "import os\nopen('/dev/null', 'w').write('x')\ntry:\n    names = sorted(os.listdir('/dev'))\nexcept OSError:\n" \
           "    names = None\n"
    r = run(code, "assert names == ['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']",
            mode=mode)
    assert r.ok and r.score == 1.0, r


# ------------------------------------------------------------------ item 4: the reward cannot be forged
@pytest.mark.parametrize("mode", LAYOUTS)
@pytest.mark.parametrize("code, tests", [
    # a forged result line on every descriptor, then exit before the real result
    ("import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'S \\nR 3 3 \\n')\n    except OSError:\n"
     "        pass\nos._exit(0)", TESTS),
    # an object that equals everything, alone, in a str subclass, inside a list
    ("class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
     "def add(a, b):\n    return Any()", TESTS),
    ("class S(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
     "def add(a, b):\n    return S('wrong')", TESTS),
    ("class Any:\n    def __eq__(self, other):\n        return True\ndef f():\n    return [Any(), Any()]",
     "assert f() == [1, 2]"),
    # patching the builtins the tests use
    ("import builtins\nbuiltins.len = lambda x: 2\nbuiltins.sorted = lambda x: [1, 2]\ndef f():\n    return []",
     "assert len(f()) == 2\nassert sorted(f()) == [1, 2]"),
], ids=["forged-result-line", "eq-always-true", "str-subclass-eq", "eq-in-a-list", "patched-builtins"])
def test_the_score_cannot_be_forged(mode, code, tests):
    r = run(code, tests, mode=mode)
    assert r.score == 0.0, r


def test_builtins_in_the_tests_are_the_real_ones():
    code = "def sorted(x):\n    return [1, 2, 3]\ndef len(x):\n    return 3\ndef f():\n    return [3, 2]\n"
    r = run(code, "assert sorted(f()) == [1, 2, 3]\nassert len(f()) == 3")
    assert r.ok and r.score == 0.0, r


@pytest.mark.parametrize("mode", LAYOUTS)
def test_the_tests_are_not_readable_by_the_code(mode):
    """The expected value lives only in the caller and the judge: not in the scratch directory, the
    worker's frames, objects or memory, nor in anything of the judge the worker can open."""
    token = "tok-" + uuid.uuid4().hex
    code = r'''
import os, sys
found = None
def search(x, depth=0):
    global found
    if found or depth > 4:
        return
    if isinstance(x, (str, bytes)):
        s = x.decode('latin-1') if isinstance(x, bytes) else x
        i = s.find('tok-')
        if i >= 0 and s[i + 4:i + 36].isalnum():
            found = s[i:i + 36]
    elif isinstance(x, dict):
        for k, v in list(x.items()):
            search(k, depth + 1); search(v, depth + 1)
    elif isinstance(x, (list, tuple, set, frozenset)):
        for v in list(x):
            search(v, depth + 1)
for root, dirs, files in os.walk('.'):
    for name in files:
        try:
            search(open(os.path.join(root, name), 'rb').read())
        except OSError:
            pass
for pid in ('self', str(os.getppid()), '1'):
    for what in ('cmdline', 'environ', 'mem'):
        try:
            search(open('/proc/%s/%s' % (pid, what), 'rb').read(1 << 20))
        except (OSError, ValueError):
            pass
    try:                                 # (not our own: reading those would eat our channel's bytes)
        for fd in os.listdir('/proc/%s/fd' % pid) if pid != 'self' else ():
            try:
                search(os.read(os.open('/proc/%s/fd/%s' % (pid, fd), os.O_RDONLY | os.O_NONBLOCK), 1 << 16))
            except OSError:
                pass
    except OSError:
        pass
try:                                     # our own memory, all of it
    maps = open('/proc/self/maps').read().splitlines()
    mem = open('/proc/self/mem', 'rb')
    for line in maps:
        lo, hi = (int(x, 16) for x in line.split()[0].split('-'))
        if 'r' in line.split()[1] and hi - lo < (64 << 20):
            try:
                mem.seek(lo); search(mem.read(hi - lo))
            except (OSError, OverflowError, ValueError):
                pass
except OSError:
    pass
def secret():
    global found
    f = sys._getframe(1)
    while f is not None and not found:
        search(f.f_locals); search(f.f_globals); f = f.f_back
    return found
'''
    r = run(code, f"assert secret() == {token!r}", mode=mode, timeout=20.0)
    assert r.ok and r.score == 0.0, r


# ------------------------------------------------------------------ beyond the list: raw system calls
NATIVE = r'''
import importlib.util, sys, os, glob
_so = [f for p in sys.path if p.endswith('lib-dynload') for f in glob.glob(p + '/_ctypes.*.so')][0]
_spec = importlib.util.spec_from_file_location('_ctypes', _so)
_C = importlib.util.module_from_spec(_spec)
class c_long(_C._SimpleCData):
    _type_ = 'l'
class _Libc:
    _handle = _C.dlopen(None, 2)
class _F(_C.CFuncPtr):
    _flags_ = _C.FUNCFLAG_CDECL | _C.FUNCFLAG_USE_ERRNO
    _restype_ = c_long
_syscall = _F(('syscall', _Libc()))
NR = {'x86_64': dict(kill=62, tgkill=234, tkill=200, pidfd_open=434, setsid=112, setpgid=109, socket=41,
                     socketpair=53, fork=57, clone=56, execve=59, unshare=272, ptrace=101, process_vm_readv=310,
                     prlimit64=302, setpriority=141, mknodat=259, mount=165, io_uring_setup=425, bpf=321,
                     memfd_create=319, shmget=29, mq_open=240, keyctl=250, perf_event_open=298, userfaultfd=323),
      'aarch64': dict(kill=129, tgkill=131, tkill=130, pidfd_open=434, setsid=157, setpgid=154, socket=198,
                      socketpair=199, clone=220, execve=221, unshare=97, ptrace=117, process_vm_readv=270,
                      prlimit64=261, setpriority=140, mknodat=33, mount=40, io_uring_setup=425, bpf=280,
                      memfd_create=279, shmget=194, mq_open=180, keyctl=219, perf_event_open=241,
                      userfaultfd=282)}[os.uname().machine]
def sc(name, *args):
    r = _syscall(*[c_long(a) for a in (NR[name],) + args])
    return 0 if r >= 0 else _C.get_errno()
reached_native = True
'''


@pytest.mark.parametrize("mode", LAYOUTS)
def test_native_calls_cannot_reach_other_processes_or_the_kernel(mode, victim, monkeypatch):
    """With the audit hook off, raw system calls (signal 0 and read-only forms where a mistake would
    do harm) all come back EPERM from the seccomp filter."""
    monkeypatch.setattr(sandbox, "AUDIT_HOOK", False, raising=False)
    me, v = os.getpid(), victim.pid
    calls = {
        "kill victim": f"sc('kill', {v}, 0)", "kill group": "sc('kill', 0, 0)", "kill all": "sc('kill', -1, 0)",
        "tgkill victim": f"sc('tgkill', {v}, {v}, 0)", "tkill victim": f"sc('tkill', {v}, 0)",
        "pidfd_open victim": f"sc('pidfd_open', {v}, 0)", "setsid": "sc('setsid')", "setpgid": "sc('setpgid', 0, 0)",
        "socket inet": "sc('socket', 2, 1, 0)", "socketpair unix": "sc('socketpair', 1, 1, 0, 0)",
        "clone process": "sc('clone', 17, 0, 0, 0, 0)", "execve": "sc('execve', 0, 0, 0)",
        "unshare user": "sc('unshare', 0x10000000)", "ptrace seize caller": f"sc('ptrace', 0x4206, {me}, 0, 0)",
        "process_vm_readv caller": f"sc('process_vm_readv', {me}, 0, 0, 0, 0, 0)",
        "prlimit caller (read)": f"sc('prlimit64', {me}, 7, 0, 0)",
        "setpriority caller": f"sc('setpriority', 0, {me}, {os.getpriority(os.PRIO_PROCESS, me)})",
        "mknodat fifo": "sc('mknodat', -100, 0, 0o10644, 0)", "mount": "sc('mount', 0, 0, 0, 0, 0)",
        "io_uring_setup": "sc('io_uring_setup', 8, 0)", "bpf": "sc('bpf', 0, 0, 0)",
        "memfd_create": "sc('memfd_create', 0, 0)", "shmget": "sc('shmget', 0x5A5A5A5A, 4096, 0)",
        "mq_open": "sc('mq_open', 0, 0, 0, 0)", "keyctl": "sc('keyctl', 0, 0, 0, 0, 0)",
        "perf_event_open": "sc('perf_event_open', 0, 0, -1, -1, 0)", "userfaultfd": "sc('userfaultfd', 0)",
    }
    code = NATIVE + "got = {}\n" + "".join(f"got[{k!r}] = {c}\n" for k, c in calls.items())
    r = run(code, "assert reached_native\nassert got == {k: 1 for k in got}", mode=mode)
    assert r.ok and r.score == 1.0, r
    assert victim.poll() is None


@pytest.mark.parametrize("mode", LAYOUTS)
def test_native_writes_stay_in_the_scratch_directory(mode, world_writable_dir, monkeypatch):
    monkeypatch.setattr(sandbox, "AUDIT_HOOK", False, raising=False)
    target = os.path.join(world_writable_dir, "x")
    pyc = f"/tmp/posttrain-pyc-{os.getuid()}/sandbox_harness.cpython-311.pyc"   # the judge's bytecode cache
    code = NATIVE + f"""
import os
errors = []
for path, flags in (({target!r}, os.O_CREAT | os.O_WRONLY), ('/tmp/sandbox-native-' + str(os.getpid()), os.O_CREAT),
                    ('/dev/shm/sandbox-native', os.O_CREAT | os.O_RDWR), ('/proc/self/mem', os.O_RDWR),
                    ({pyc!r}, os.O_CREAT | os.O_WRONLY)):
    try:                                 # (our own memory: it holds the audit hook; the judge's bytecode)
        os.close(os.open(path, flags))
    except OSError as e:
        errors.append(e.errno)
"""
    r = run(code, "assert reached_native\nassert len(errors) == 5", mode=mode)
    assert r.ok and r.score == 1.0, r
    assert os.listdir(world_writable_dir) == [] and not os.path.exists(pyc)


def test_threads_still_work_under_the_filter():
    """Eight threads at once: clone with CLONE_THREAD passes the filter, and RLIMIT_AS is not spent on
    glibc's 64 MB arena per thread (MALLOC_ARENA_MAX)."""
    code = ("import threading\nout = []\nbarrier = threading.Barrier(9, timeout=5)\n"
            "def work(i):\n    barrier.wait()\n    out.append(i)\n"
            "ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]\n"
            "[t.start() for t in ts]\nbarrier.wait()\n[t.join() for t in ts]\n")
    for mode in (None, BASIC):
        r = run(code, "assert sorted(out) == list(range(8))", mode=mode)
        assert r.ok and r.score == 1.0, (mode, r)
