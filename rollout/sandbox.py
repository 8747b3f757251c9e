"""Run generated Python against `assert` tests in a separate, locked-down process.

`run_code(code, tests)` -> SandboxResult(passed, total, ok, reason, output). `ok` means the program
ran to completion and its tests were counted; any failure (syntax error, exception, timeout, memory,
blocked operation, output flood) is ok=False with a reason, and a code reward pays 0 for it. The
caller never hangs and never crashes: everything untrusted happens in another process, which is
SIGKILLed (with everything it started) at the deadline.

Tests: every top-level statement of `tests` that contains an `assert` is one test (normally one
`assert ...` line; a `for` loop of asserts counts once); other statements (imports, helpers) run as
setup. Tests run in order in the program's namespace after the program itself; a test passes when it
raises nothing. `__name__` is "solution", so an `if __name__ == "__main__":` block does not run.

How a run is built (strongest layout that works here, found once per process by `sandbox_mode()`):

    caller ── Popen(start_new_session) ──> unshare --net --pid --fork --kill-child --mount-proc
                                             └─ python -I -S -B (pid 1 of the new pid namespace:
                                                  the supervisor) ── fork ──> worker (runs the code)

  supervisor  (trusted) makes the world-writable directories (/tmp, /var/tmp, /run/lock, /dev/shm)
              read-only empty tmpfs in its private mount namespace (the scratch directory is bound
              back in place), forks the worker, waits for it and exits; when pid 1 exits the kernel
              kills every process left in the namespace.
  worker      (trusted until it runs the code) sets resource limits, drops to uid/gid 65534
              (nobody) with no_new_privs, installs an audit hook, then runs the program and tests.
  caller      reads output (capped) and a separate result pipe, SIGKILLs the process group at the
              deadline or when the output cap is passed, and deletes the scratch directory.

Guaranteed by the kernel (where the layout is available; `sandbox_mode()` says which one runs):
  * wall clock: the caller's SIGKILL of the process group at `timeout` (measured here: returns within
    timeout + 0.05 s for a busy loop, + 0.25 s for 16 processes of an unguarded fork bomb); CPU time:
    RLIMIT_CPU (ceil(timeout) + 1 s) per process. If the caller itself dies, the supervisor still
    kills the worker after ceil(timeout) + 5 s.
  * memory: RLIMIT_AS = memory_mb per process (allocations fail: MemoryError or a crash); files:
    RLIMIT_FSIZE 16 MB per file, RLIMIT_NOFILE 64, no core dumps.
  * processes [namespaces]: pid namespace - nothing started by the code outlives the run, even if it
    leaves the process group; [uid drop] RLIMIT_NPROC 16 for uid 65534 (root ignores RLIMIT_NPROC,
    hence the drop).
  * network [namespaces]: a fresh network namespace has no usable interface, not even loopback.
  * files [uid drop + namespaces]: as nobody the code can write only the scratch directory (its cwd)
    and, in the private mount namespace, finds every world-writable directory read-only. The scratch
    directory is deleted after the run.
  * env is empty but for PATH/HOME/TMPDIR/LANG/LC_ALL; stdin is /dev/null; `-I -S` means no
    site-packages, no user site, no PYTHON* variables: the code gets the standard library only. With
    the uid drop the interpreter must be readable by nobody: a pyenv Python under /root (0700) is not,
    and the probe then picks the system /usr/bin/python3 (same language, its own standard library).
  * [uid drop] no capabilities, no supplementary groups, no_new_privs set.
Guaranteed only at the Python level (an audit hook, PEP 578, that Python code cannot remove), in
every layout: fork/exec/spawn/system/subprocess, signals to other processes, sockets, ctypes/cffi/
_posixsubprocess/resource/mmap imports, gc.get_referrers-style walks, symlinks/hard links, and every
write, rename, delete, chmod... whose path leaves the scratch directory are refused with
PermissionError (os.open for writing needs an absolute path: the hook cannot see a dir_fd). This
is what stops a naive fork bomb at its first fork and a stray write to /tmp in every layout. Layouts,
strongest first: namespaces + uid drop (root with unshare: this machine), namespaces only, uid drop
only, neither (a non-root caller). In the last one the hook is the only file/network barrier; the
rlimits still hold and RLIMIT_NPROC then counts all of the caller's own processes.
NOT guaranteed:
  * integrity of the count against code written to attack the harness: the tests run in the code's
    own interpreter, so it can override __eq__, patch builtins, or write to the result pipe. The
    caller rejects malformed or duplicated results, but a determined program can inflate its own
    score. The sandbox protects the machine and the caller, not the reward from adversarial code.
  * Python-level guards against bytecode/memory tricks (crafted code objects, interpreter bugs).
  * reads: the code can read what uid 65534 (or the caller, without the uid drop) can read.
  * CPU and memory of concurrent runs add up: each run is limited, the sum is not.
"""
from __future__ import annotations

import ast
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

NOBODY = 65534            # uid and gid the code runs as when the caller is root
NPROC_LIMIT = 16          # processes + threads of uid 65534 (all runs together)
FILE_LIMIT_MB = 16        # largest file the code may write
NOFILE_LIMIT = 64         # open file descriptors
RESULT_LIMIT = 1 << 16    # bytes accepted on the result pipe
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")   # made read-only inside the namespace
SCRATCH_BASE = "/tmp" if os.path.isdir("/tmp") else None        # world-traversable, whatever TMPDIR says
BLOCKED_MODULES = ("ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "subprocess",
                   "multiprocessing", "_multiprocessing", "socket", "_socket", "ssl", "_ssl", "resource",
                   "mmap", "pty", "_xxsubinterpreters", "_testcapi", "_testinternalcapi")


@dataclass
class SandboxResult:
    passed: int
    total: int
    ok: bool
    reason: str = ""
    output: str = ""          # the program's stdout + stderr, truncated to max_output bytes

    @property
    def score(self) -> float:
        """Fraction of tests passed; 0 when the run failed."""
        return self.passed / self.total if self.ok and self.total else 0.0


@dataclass(frozen=True)
class SandboxMode:
    namespaces: bool          # unshare: pid + net + mount namespaces, read-only world-writable dirs
    drop_uid: bool            # run the code as uid/gid 65534
    python: str               # the interpreter that runs the code (must be readable by nobody when drop_uid)
    unshare: str | None = None


# ----------------------------------------------------------------------------- the child program
# Runs as `python -I -S -B -c RUNNER CONFIG_JSON`. Only the standard library; no state outside main().
RUNNER = r'''
import sys

def main():
    import ast, builtins, json, os, signal
    cfg = json.loads(sys.argv[1])
    res_fd, scratch = cfg["result_fd"], cfg["scratch"]
    write, _exit = os.write, os._exit

    def report(kind, text=""):
        text = text.replace("\n", " ").replace("\r", " ")[:2000]
        write(res_fd, (kind + " " + text + "\n").encode("utf-8", "replace"))

    def setup_failed(what, e):
        report("X", "%s: %s: %s" % (what, type(e).__name__, e))
        _exit(3)

    # ---- supervisor: private mounts, then fork the worker and reap until it exits
    if cfg["mounts"]:
        try:
            import ctypes
            if os.readlink("/proc/self/ns/mnt") == cfg["host_mnt_ns"]:
                raise RuntimeError("the mount namespace is the host's; refusing to mount")
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
            RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND = 1, 2, 4, 8, 32, 4096
            def mount(src, target, fstype, flags, data):
                if libc.mount(src, target.encode(), fstype, flags, data) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, "mount %s: %s" % (target, os.strerror(err)))
            for d in cfg["writable_dirs"]:
                if not os.path.isdir(d) or os.path.islink(d):
                    continue
                if scratch.startswith(d.rstrip("/") + "/"):
                    # cwd still holds the real scratch directory after /tmp is covered: bind it back
                    mount(b"tmpfs", d, b"tmpfs", NOSUID | NODEV | NOEXEC, b"size=64k,mode=755")
                    os.makedirs(scratch)
                    mount(b".", scratch, None, BIND, None)
                    os.chdir(scratch)
                    mount(None, d, None, REMOUNT | RDONLY | NOSUID | NODEV | NOEXEC, None)
                else:
                    mount(b"tmpfs", d, b"tmpfs", RDONLY | NOSUID | NODEV | NOEXEC, b"size=4k,mode=755")
        except BaseException as e:
            setup_failed("mounts", e)
    worker = os.fork()
    if worker:
        def expire(signum, frame):
            os.kill(worker, signal.SIGKILL)
            _exit(137)
        signal.signal(signal.SIGALRM, expire)
        signal.alarm(cfg["backstop"])      # in case the caller died and nobody kills us
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                _exit(1)
            if pid == worker:
                code = os.waitstatus_to_exitcode(status)
                _exit(code if code >= 0 else 128 - code)

    # ---- worker: limits, identity, input, guard, run
    try:
        import resource
        cpu, mem = cfg["cpu_seconds"], cfg["memory_bytes"]
        for name, value in (("RLIMIT_CPU", (cpu, cpu + 1)), ("RLIMIT_AS", (mem, mem)),
                            ("RLIMIT_FSIZE", (cfg["file_bytes"],) * 2), ("RLIMIT_NOFILE", (cfg["nofile"],) * 2),
                            ("RLIMIT_CORE", (0, 0)), ("RLIMIT_NPROC", (cfg["nproc"],) * 2)):
            resource.setrlimit(getattr(resource, name), value)
        if cfg["drop_uid"] is not None:
            uid = cfg["drop_uid"]
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid:
                raise RuntimeError("uid drop did not take")
        try:
            import ctypes
            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)   # PR_SET_NO_NEW_PRIVS
        except Exception:
            pass
        with open(cfg["input"], encoding="utf-8") as f:
            job = json.load(f)
        code_src, tests_src = job["code"], job["tests"]
    except BaseException as e:
        setup_failed("worker setup", e)

    tree = ast.parse(tests_src, "tests.py")
    tests = []
    for stmt in tree.body:
        is_test = any(isinstance(n, ast.Assert) for n in ast.walk(stmt))
        seg = (ast.get_source_segment(tests_src, stmt) or "").strip().replace("\n", " ")
        tests.append((compile(ast.Module(body=[stmt], type_ignores=[]), "tests.py", "exec"), is_test,
                      "line %d `%s`" % (stmt.lineno, seg[:120])))
    tests = tuple(tests)
    report("S")
    try:
        code_obj = compile(code_src, "solution.py", "exec")
    except BaseException as e:
        report("E", "code does not compile: %s: %s" % (type(e).__name__, e))
        _exit(0)

    for name in list(sys.modules):   # the code must import these itself, through the guard
        if name.split(".")[0] in cfg["blocked_modules"]:
            del sys.modules[name]
    sys.addaudithook(make_guard(scratch, tuple(cfg["blocked_modules"]), os.getcwd, os.O_WRONLY | os.O_RDWR |
                                os.O_APPEND | os.O_CREAT | os.O_TRUNC))

    _exec, _type, _str = exec, type, str
    streams = (sys.stdout, sys.stderr)

    def describe(e):
        try:
            name = _type(e).__name__
            msg = _str(e)
            return "%s: %s" % (name, msg[:300]) if msg else "%s" % (name,)
        except BaseException:
            return "an exception"

    def flush():
        for s in streams:
            try:
                s.flush()
            except BaseException:
                pass

    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        _exec(code_obj, namespace)
    except BaseException as e:
        flush()
        report("E", "code raised " + describe(e))
        _exit(0)
    passed = total = 0
    first = ""
    for obj, is_test, where in tests:
        try:
            _exec(obj, namespace)
            ok = True
        except BaseException as e:
            ok = False
            if not first:
                first = "%s %s: %s" % ("test" if is_test else "setup", where, describe(e))
        if is_test:
            total += 1
            passed += ok
    flush()
    report("R", "%d %d %s" % (passed, total, first))
    _exit(0)


def make_guard(scratch, blocked, getcwd, write_flags):
    """The audit hook. Only builtin-type methods and objects bound here: code cannot patch them."""
    deny_events = frozenset({
        "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.startfile",
        "subprocess.Popen", "os.kill", "os.killpg", "os.symlink", "os.link", "pty.spawn",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents"})
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                   "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
                   "os.chflags": (0,), "os.lchflags": (0,), "os.rename": (0, 1), "shutil.rmtree": (0,),
                   "shutil.copyfile": (1,), "shutil.copymode": (1,), "shutil.copystat": (1,),
                   "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.chown": (0,)}
    dir_fd_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3,
                     "os.utime": 3, "os.rename": (2, 3)}
    prefix = scratch.rstrip("/") + "/"
    _str, _bytes, _type, _int, _len, _tuple = str, bytes, type, int, len, tuple
    PermissionError_ = PermissionError

    def norm(p):
        if _type(p) is _bytes:
            p = p.decode("utf-8", "surrogateescape")
        if _type(p) is not _str:
            return None
        if not p.startswith("/"):
            p = getcwd() + "/" + p
        parts = []
        for c in p.split("/"):
            if c == "" or c == ".":
                continue
            if c == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(c)
        return "/" + "/".join(parts)

    def inside(p):
        q = norm(p)
        return q is not None and (q == scratch or q.startswith(prefix) or q == "/dev/null")

    def deny(what):
        raise PermissionError_("sandbox: %s is not allowed" % (what,))

    def guard(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (_type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or \
                      (_type(flags) is _int and flags & write_flags)
            if not writing or _type(path) is _int:
                return
            relative = (_type(path) is _str and not path.startswith("/")) or \
                       (_type(path) is _bytes and not path.startswith(b"/"))
            if mode is None and relative:
                deny("os.open for writing with a relative path (use an absolute path or open())")
            if not inside(path):
                deny("writing %r outside the scratch directory" % (path,))
        elif event == "import":
            name = args[0]
            if _type(name) is _str:
                root = name.split(".")[0]
                if root in blocked:
                    deny("importing %s" % (name,))
        elif event in deny_events:
            deny(event)
        elif event.startswith("socket.") or event.startswith("ctypes."):
            deny(event)
        elif event in path_events:
            for i in path_events[event]:
                if i < _len(args) and not inside(args[i]):
                    deny("%s on %r outside the scratch directory" % (event, args[i]))
            fds = dir_fd_events.get(event, ())
            for i in (fds if _type(fds) is _tuple else (fds,)):
                if i < _len(args) and args[i] is not None and args[i] != -1:
                    deny("%s with dir_fd" % (event,))

    return guard


main()
'''

PROBE_CODE = "import fractions\nx = fractions.Fraction(1, 2)\n"


# ----------------------------------------------------------------------------- the caller's side
def count_tests(tests: str) -> int:
    """Number of tests (top-level statements containing an assert); ValueError for unusable tests."""
    if not isinstance(tests, str):
        raise TypeError(f"tests must be a str of `assert ...` lines, got {type(tests).__name__}")
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"tests do not parse: {e.msg} (line {e.lineno})") from None
    n = sum(any(isinstance(x, ast.Assert) for x in ast.walk(s)) for s in tree.body)
    if n == 0:
        raise ValueError("tests hold no assert statement: each test is one `assert ...` line")
    return n


def _kill_group(proc: subprocess.Popen):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except (ProcessLookupError, OSError):
        pass


def _parse_result(raw: bytes, total: int):
    """(kind, passed, reason) from the result pipe; kind is None when nothing usable arrived."""
    lines = raw.decode("utf-8", "replace").splitlines()
    final = [ln for ln in lines if ln[:2] in ("R ", "E ", "X ")]
    if not final:
        return None, 0, ""
    if len(final) > 1 or (final[0][0] != "X" and lines[0] != "S "):
        return "bad", 0, "result channel tampered with (unexpected result lines)"
    kind, text = final[0][0], final[0][2:]
    if kind != "R":
        return kind, 0, text
    parts = text.split(" ", 2)
    try:
        passed, got_total = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return "bad", 0, "result channel garbled"
    if got_total != total or not 0 <= passed <= total:
        return "bad", 0, f"result channel tampered with ({passed}/{got_total} reported for {total} tests)"
    return "R", passed, parts[2] if len(parts) > 2 else ""


def _exit_reason(code) -> str:
    if code is None:
        return "did not exit"
    if code < 0 or code > 128:
        sig = -code if code < 0 else code - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = {"SIGKILL": " (memory, CPU or process limit)", "SIGXCPU": " (CPU time limit)",
                "SIGSEGV": " (crash, possibly out of memory)", "SIGABRT": " (aborted, possibly out of memory)"}
        return f"killed by {name}{hint.get(name, '')}"
    return f"exited with status {code} before reporting a result"


def _run(code: str, tests: str, total: int, timeout: float, memory_mb: int, max_output: int,
         mode: SandboxMode) -> SandboxResult:
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="posttrain-sandbox-", dir=SCRATCH_BASE))
    proc = None
    res_r = res_w = None
    try:
        input_path = os.path.join(scratch, ".sandbox_input.json")
        with open(input_path, "w", encoding="utf-8") as f:
            json.dump({"code": code, "tests": tests}, f)
        if mode.drop_uid:
            os.chown(scratch, NOBODY, NOBODY)
            os.chmod(input_path, 0o644)
        res_r, res_w = os.pipe()
        cfg = {
            "result_fd": res_w, "scratch": scratch, "input": input_path,
            "mounts": mode.namespaces, "host_mnt_ns": os.readlink("/proc/self/ns/mnt") if mode.namespaces else "",
            "writable_dirs": list(WRITABLE_DIRS), "backstop": int(math.ceil(timeout)) + 5,
            "cpu_seconds": int(math.ceil(timeout)) + 1, "memory_bytes": int(memory_mb) << 20,
            "file_bytes": FILE_LIMIT_MB << 20, "nofile": NOFILE_LIMIT, "nproc": NPROC_LIMIT,
            "drop_uid": NOBODY if mode.drop_uid else None, "blocked_modules": list(BLOCKED_MODULES),
        }
        argv = [mode.python, "-I", "-S", "-B", "-X", "utf8", "-c", RUNNER, json.dumps(cfg)]
        if mode.namespaces:
            argv = [mode.unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--"] + argv
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=scratch, env=env, pass_fds=(res_w,), start_new_session=True, close_fds=True)
        os.close(res_w)
        res_w = None

        out, res = bytearray(), bytearray()
        failure = None
        deadline = start + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(res_r, selectors.EVENT_READ, "res")
            open_streams = 2
            while open_streams and failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    failure = f"timed out after {timeout:g}s"
                    break
                for key, _ in sel.select(min(remaining, 0.25)):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
                    elif key.data == "out":
                        out += chunk
                        if len(out) > max_output:
                            failure = f"output limit exceeded (more than {max_output} bytes; truncated)"
                            break
                    else:
                        res += chunk
                        if len(res) > RESULT_LIMIT:
                            failure = "result channel flooded"
                            break
                # without namespaces a background child can hold the pipes open: stop once we have it all
                if proc.poll() is not None and res.rstrip(b"\n").rsplit(b"\n", 1)[-1][:2] in (b"R ", b"E ", b"X "):
                    break
        _kill_group(proc)
        try:
            returncode = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            returncode = None

        text = out[:max_output].decode("utf-8", "replace")
        if len(out) > max_output:
            text += "\n[... output truncated]"
        if failure is not None:
            return SandboxResult(0, total, False, failure, text)
        kind, passed, reason = _parse_result(bytes(res), total)
        if kind == "R":
            if passed < total:
                reason = f"{total - passed} of {total} tests failed; first: {reason}"
            elif reason:  # every test passed but some setup statement raised
                reason = f"all tests passed; {reason}"
            return SandboxResult(passed, total, True, reason, text)
        if kind == "E":
            return SandboxResult(0, total, False, reason, text)
        if kind == "X":
            return SandboxResult(0, total, False, f"sandbox setup failed: {reason}", text)
        if kind == "bad":
            return SandboxResult(0, total, False, reason, text)
        return SandboxResult(0, total, False, _exit_reason(returncode), text)
    finally:
        if proc is not None:
            _kill_group(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.returncode is None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for fd in (res_r, res_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)


_MODE: SandboxMode | None = None
_MODE_LOCK = threading.Lock()


def _candidates() -> list[SandboxMode]:
    pythons = []
    for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if p and os.path.isfile(p) and os.access(p, os.X_OK) and os.path.realpath(p) not in pythons:
            pythons.append(os.path.realpath(p))
    out = []
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
        if unshare:
            out += [SandboxMode(True, True, p, unshare) for p in pythons]
            out.append(SandboxMode(True, False, pythons[0], unshare))
        out += [SandboxMode(False, True, p) for p in pythons]
    out.append(SandboxMode(False, False, pythons[0] if pythons else sys.executable))
    return out


def sandbox_mode() -> SandboxMode:
    """The strongest layout that works on this machine (probed once per process, then cached)."""
    global _MODE
    with _MODE_LOCK:
        if _MODE is None:
            tried = []
            for mode in _candidates():
                uid = NOBODY if mode.drop_uid else os.getuid()
                tests = f"assert x == 0.5\nassert __import__('os').getuid() == {uid}\n"
                r = _run(PROBE_CODE, tests, 2, timeout=20.0, memory_mb=256, max_output=10_000, mode=mode)
                if r.ok and r.passed == 2:
                    _MODE = mode
                    break
                tried.append(f"{mode}: {r.reason} {r.output[-300:]}")
            if _MODE is None:
                raise RuntimeError("no sandbox layout works on this machine:\n" + "\n".join(tried))
        return _MODE


def run_code(code: str, tests: str, timeout: float = 5.0, memory_mb: int = 256, max_output: int = 10_000,
             *, mode: SandboxMode | None = None) -> SandboxResult:
    """Run `code`, then each `assert` of `tests`, in a separate sandboxed process (see the module doc)."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if timeout <= 0 or memory_mb <= 0 or max_output < 0:
        raise ValueError(f"need timeout > 0, memory_mb > 0, max_output >= 0; got {timeout}, {memory_mb}, {max_output}")
    total = count_tests(tests)
    return _run(code, tests, total, float(timeout), int(memory_mb), int(max_output), mode or sandbox_mode())
