"""Run generated Python against `assert` tests in separate, locked-down processes.

`run_code(code, tests)` -> SandboxResult(passed, total, ok, reason, output). `ok` means the program
ran to completion and its tests were counted; any failure (syntax error, exception, timeout, memory,
blocked operation, output flood) is ok=False with a reason, and a code reward pays 0 for it. The
caller never hangs and never crashes: everything untrusted happens in other processes, SIGKILLed
(with everything they started) at the deadline. RuntimeError when the layout cannot contain the code.

Tests: every top-level statement of `tests` that contains an `assert` is one test (normally one
`assert ...` line; a `for` loop of asserts counts once); other statements (imports, helpers) run as
setup. A test passes when it raises nothing. The program runs as module "solution" (an
`if __name__ == "__main__":` block does not run); the tests run in order, after it, in a namespace
where any name they do not define and that is not a builtin is the program's global of that name.

How a run is built (rollout/sandbox_harness.py; the layout is found once per process by `sandbox_mode()`):

    caller ──Popen(new session)──> [unshare --net --pid --ipc --mount-proc --fork --kill-child]
                                     └─ judge: python -I -S -c BOOT (sandbox_harness.py) ──fork──> worker

  caller  sends the code, then the tests, on the judge's stdin; reads stdout+stderr (capped) and the
          judge's result pipe; SIGKILLs the process group at the deadline; deletes the scratch dir.
          The judge's bytecode is cached in /tmp/posttrain-pyc-UID (see _bytecode_flags).
  judge   (trusted, never runs the code) reads the code, makes the private mounts (namespaced
          layouts), forks the worker, and only then reads the tests; it makes itself non-dumpable and
          runs the tests in its own interpreter. Values of the program reach it as plain data (None,
          bool, int, float, complex, str, bytes, list, tuple, dict, set, Fraction, Decimal, deque ...)
          over a pipe, decoded into its own built-in objects: every comparison a test makes runs on
          those, never on a method the program defined. Other objects (functions, classes, instances,
          generators) stay in the worker; the judge holds a handle that calls, reads attributes,
          iterates, len()/str()... through the pipe, and compares by identity. It alone writes the result.
  worker  (untrusted once the code runs) keeps only stdout/stderr and its two pipes, sets rlimits,
          drops to uid 65534 or drops every capability, sets no_new_privs, then Landlock and a seccomp
          filter (rollout/sandbox_confine.py), runs the program and answers the judge. Whatever the
          code does to its own interpreter, it only chooses the answers, as a function does anyway.

Layouts, strongest first (`sandbox_mode()` takes the first whose probe run passes):
  A  namespaces + uid drop      root with unshare (this machine)            [+ Landlock if the kernel has it]
  B  namespaces, no uid drop    root with unshare, no Python readable by 65534   only with Landlock
  C  uid drop only              root without unshare                        [+ Landlock if the kernel has it]
  D  neither                    a normal user                               only with Landlock
  refused                       a normal user on a kernel without Landlock (Linux < 5.13, or landlock
                                not in lsm=): run_code raises RuntimeError rather than run the code
                                as the caller's own user with nothing between it and the caller.

Guaranteed by the kernel, in every layout (Linux x86_64 or aarch64; anything else is refused):
  * processes: seccomp refuses fork, vfork, clone of a process (threads only), execve; signals except
    to itself (kill/tgkill/rt_sigqueueinfo with another pid, 0 or -1; tkill; pidfd_*); ptrace,
    process_vm_*, kcmp; setsid/setpgid (it stays in the process group the caller kills); prlimit64,
    setpriority, sched_setaffinity/setscheduler/setattr, ioprio_set, migrate/move_pages on another
    process. It dies with the judge (PDEATHSIG), the judge with the caller's SIGKILL or its own alarm.
  * no network and no IPC: socket and socketpair are refused; System V and POSIX IPC, memfd, mknod
    (FIFOs, devices), flock, mount/namespace calls, io_uring, bpf, perf_event_open, userfaultfd,
    keyctl and system calls newer than the table (ENOSYS) too. No capabilities, no_new_privs.
  * time and size: the caller's SIGKILL at `timeout` (measured here: returns within timeout + 0.05 s,
    a busy loop or eight busy threads); RLIMIT_CPU ceil(timeout) + 1 s; RLIMIT_AS = memory_mb;
    RLIMIT_FSIZE 16 MB per file; RLIMIT_NOFILE 64; no core dumps; RLIMIT_NPROC 16 (threads; counts
    every process of the user, so for a normal user it counts theirs too); output capped at max_output.
  * the score: only the judge can write the result, and the worker never held the tests: not in a
    file, not in its memory, not in the judge's memory (non-dumpable, another uid or outside its
    Landlock domain). A forged result line, an `__eq__` that is always true, patched builtins or a
    `len` of the program's own all change nothing.
Files:
  * namespaced (A, B): in a private mount namespace every mount is read-only, /tmp, /var/tmp,
    /run/lock and /dev/shm are empty read-only tmpfs, /dev holds only null, zero, full, random,
    urandom and the fd/stdin/stdout/stderr links, and the scratch directory (the cwd) is a fresh tmpfs of SCRATCH_LIMIT_MB: the only
    writable place, and the total disk quota (it is RAM). The pid namespace hides every other process
    and nothing outlives the run.
  * not namespaced (C, D): no file is created, opened for writing, renamed, removed, linked, or has
    its mode, owner, times or xattrs changed, anywhere, the scratch directory included (seccomp on
    the open flags and on those calls). Code that writes files fails there with PermissionError.
Reads:
  * with Landlock: only /usr, /lib*, /bin, /sbin, /etc/{ld.so.cache,localtime,passwd,group,
    nsswitch.conf,os-release,mime.types}, the interpreter's standard library, /proc, the five /dev
    nodes and the scratch directory. Landlock also refuses ptrace-class access out of the worker's
    domain (the caller's and the judge's /proc/PID/mem, environ and fd/), TCP bind/connect (ABI >= 4),
    and signals and abstract unix sockets out of the domain (ABI >= 6).
  * without Landlock (A or C): what uid 65534 may read, i.e. every world-readable file, a dataset
    with its tests included if it is world-readable. Not another process's memory or environment.
NOT guaranteed:
  * the audit hook (PEP 578) is a convenience, not a barrier: it gives clear errors ("sandbox:
    os.fork is not allowed") and is the only thing that blocks ctypes, but it sees only what the
    interpreter reports (its import check, for one, is skipped by loading _ctypes through importlib's
    spec machinery; an interpreter bug that corrupts memory skips all of it). Everything above holds
    without it: tests/test_sandbox_security.py makes the raw system calls with it off (AUDIT_HOOK).
  * without a pid namespace (C, D) the code can list the host's processes and read their cmdline
    and stat (world-readable anyway), not their memory or environment.
  * the kernel itself: seccomp and Landlock narrow its interface, they do not remove it.
  * CPU and memory of concurrent runs add up; the judge's memory is not limited (a message from the
    worker is at most 4 MB); the namespaced scratch tmpfs is RAM.
  * fidelity of the tests: values cross by value, so an object of the program's own class equals
    only itself; builtins named in the tests are always the builtins; class bodies in the tests do not
    see the program's names; a test that hands the program a module or an object not defined in the
    tests fails ("cannot cross"). In-place changes to list/dict/set/bytearray arguments are copied
    back (top level only). Assigning a name in the tests does not change the program's global.
  * SandboxResult.output is the program's own text: untrusted.
If any layer cannot be installed the run fails ("sandbox setup failed", ok=False); it never runs with less.
"""
from __future__ import annotations

import ast
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from rollout import sandbox_harness   # the judge's code; importing it caches its bytecode

NOBODY = 65534            # uid and gid the code runs as when the caller is root
NPROC_LIMIT = 16          # processes + threads of uid 65534 (all runs together)
FILE_LIMIT_MB = 16        # largest file the code may write
NOFILE_LIMIT = 64         # open file descriptors
RESULT_LIMIT = 1 << 16    # bytes accepted on the result pipe
SCRATCH_LIMIT_MB = 32     # total size of the scratch directory (namespaced layouts: a tmpfs of this size)
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")   # made read-only inside the namespace
SCRATCH_BASE = "/tmp" if os.path.isdir("/tmp") else None        # world-traversable, whatever TMPDIR says
BLOCKED_MODULES = ("ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "subprocess",
                   "multiprocessing", "_multiprocessing", "socket", "_socket", "ssl", "_ssl", "resource",
                   "mmap", "pty", "_xxsubinterpreters", "_testcapi", "_testinternalcapi")
AUDIT_HOOK = True         # tests turn it off to check that the kernel layers hold on their own


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
    namespaces: bool          # unshare: pid + net + mount + ipc namespaces, every mount read-only, tmpfs scratch
    drop_uid: bool            # run the code as uid/gid 65534
    python: str               # the interpreter that runs the code (must be readable by nobody when drop_uid)
    unshare: str | None = None
    landlock: int | None = None   # Landlock ABI to use: None = what the kernel offers, 0 = none


HERE = os.path.dirname(os.path.abspath(__file__))
PROBE_CODE = "import fractions, os\nx = fractions.Fraction(1, 2)\nuid = os.getuid()\nstatus = open('/proc/self/status').read()\n"
PROBE_TESTS = "assert x == 0.5\nassert uid == {uid}\nassert 'NoNewPrivs:\\t1' in status and 'Seccomp:\\t2' in status\n"
_LANDLOCK: int | None = None


def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers (0: none). Asking creates nothing."""
    global _LANDLOCK
    if _LANDLOCK is None:
        _LANDLOCK = 0
        if sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "aarch64"):
            try:
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                libc.syscall.restype = ctypes.c_long
                # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
                _LANDLOCK = max(0, int(libc.syscall(ctypes.c_long(444), ctypes.c_long(0), ctypes.c_long(0),
                                                    ctypes.c_long(1))))
            except (OSError, AttributeError):
                _LANDLOCK = 0
    return _LANDLOCK


def containment_problem(mode: SandboxMode, landlock: int) -> str | None:
    """Why this layout cannot contain untrusted code, or None when it can (see the module doc)."""
    if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "aarch64"):
        return (f"the sandbox needs Linux on x86_64 or aarch64 for its seccomp filter "
                f"(this is {sys.platform} {os.uname().machine})")
    if not mode.drop_uid and not landlock:
        return (f"the code would run as the caller's own user (uid {os.getuid()}) and this kernel has no Landlock, "
                f"so nothing would keep it out of the caller's files, memory and processes: run as root "
                f"(uid drop; namespaces with unshare) or on Linux >= 5.13 with Landlock enabled (lsm=...,landlock)")
    return None


# ----------------------------------------------------------------------------- the caller's side
def split_tests(tests: str) -> list[tuple[str, bool, str]]:
    """The top-level statements of `tests` as (source, is_test, where); a statement is a test when it
    contains an assert. ValueError for unusable tests. Done here, not in the judge, so the judge needs
    no `import ast`."""
    if not isinstance(tests, str):
        raise TypeError(f"tests must be a str of `assert ...` lines, got {type(tests).__name__}")
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"tests do not parse: {e.msg} (line {e.lineno})") from None
    parts = []
    for stmt in tree.body:
        seg = (ast.get_source_segment(tests, stmt) or "").strip().replace("\n", " ")
        parts.append((ast.unparse(stmt), any(isinstance(n, ast.Assert) for n in ast.walk(stmt)),
                      f"line {stmt.lineno} `{seg[:120]}`"))
    if not any(is_test for _, is_test, _ in parts):
        raise ValueError("tests hold no assert statement: each test is one `assert ...` line")
    return parts


def count_tests(tests: str) -> int:
    """Number of tests (top-level statements containing an assert); ValueError for unusable tests."""
    return sum(is_test for _, is_test, _ in split_tests(tests))


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
    """(kind, passed, reason) from the judge's result pipe; kind is None when nothing arrived. Only
    the judge holds that pipe, so anything unexpected here is a harness bug, reported as such."""
    lines = raw.decode("utf-8", "replace").splitlines()
    final = [ln for ln in lines if ln[:2] in ("R ", "E ", "X ")]
    if not final:
        return None, 0, ""
    if len(final) > 1 or len(lines) > 1:
        return "bad", 0, "sandbox harness error: unexpected result lines"
    kind, text = final[0][0], final[0][2:]
    if kind != "R":
        return kind, 0, text
    parts = text.split(" ", 2)
    try:
        passed, got_total = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return "bad", 0, "sandbox harness error: garbled result"
    if got_total != total or not 0 <= passed <= total:
        return "bad", 0, f"sandbox harness error: {passed}/{got_total} reported for {total} tests"
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


_PYC: list | None = None


def _bytecode_flags() -> list:
    """The judge compiles ~1200 lines of harness on every start (~12 ms, a third of a run) unless it
    may keep the bytecode: in a cache directory of our own (uid-owned, mode 0700, not a link), where
    only the judge writes, before it forks; the worker can write no file there in any layout (no
    writes outside a private read-only mount namespace, and the namespaced judge has mounted /tmp
    away by then). Without such a directory: -B, and compile every time."""
    global _PYC
    if _PYC is None:
        _PYC = ["-B"]
        if SCRATCH_BASE:
            path = os.path.join(SCRATCH_BASE, f"posttrain-pyc-{os.getuid()}")
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError:
                return _PYC
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700:
                _PYC = ["-X", f"pycache_prefix={path}"]
    return _PYC


def _frame(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return b"%016d" % len(data) + data


def _run(code: str, tests: list, timeout: float, memory_mb: int, max_output: int,
         mode: SandboxMode) -> SandboxResult:
    total = sum(is_test for _, is_test, _ in tests)
    abi = landlock_abi() if mode.landlock is None else min(int(mode.landlock), landlock_abi())
    problem = containment_problem(mode, abi)
    if problem:
        raise RuntimeError(f"rollout/sandbox.py: refusing to run untrusted code in layout {mode}: {problem}")
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="posttrain-sandbox-", dir=SCRATCH_BASE))
    proc = None
    res_r = res_w = None
    try:
        if mode.drop_uid and not mode.namespaces:
            os.chown(scratch, NOBODY, NOBODY)    # its cwd (read-only for it: see the module doc)
        res_r, res_w = os.pipe()
        cfg = {
            "result_fd": res_w, "scratch": scratch, "namespaces": mode.namespaces,
            "host_mnt_ns": os.readlink("/proc/self/ns/mnt") if mode.namespaces else "",
            "writable_dirs": list(WRITABLE_DIRS), "backstop": int(math.ceil(timeout)) + 5,
            "cpu_seconds": int(math.ceil(timeout)) + 1, "memory_bytes": int(memory_mb) << 20,
            "file_bytes": FILE_LIMIT_MB << 20, "nofile": NOFILE_LIMIT, "nproc": NPROC_LIMIT,
            "scratch_bytes": SCRATCH_LIMIT_MB << 20, "landlock": abi,
            "drop_uid": NOBODY if mode.drop_uid else None, "blocked_modules": list(BLOCKED_MODULES),
            "audit_hook": AUDIT_HOOK,
        }
        argv = [mode.python, "-I", "-S", *_bytecode_flags(), "-X", "utf8", "-c", sandbox_harness.BOOT, HERE,
                json.dumps(cfg)]
        if mode.namespaces:
            argv = [mode.unshare, "--net", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc", "--"] + argv
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "MALLOC_ARENA_MAX": "2"}   # a 64 MB arena per thread would spend RLIMIT_AS on 4 threads
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=scratch, env=env, pass_fds=(res_w,), start_new_session=True, close_fds=True)
        os.close(res_w)
        res_w = None
        job, sent = _frame(code) + _frame(json.dumps(tests)), 0   # the judge reads the tests after the fork
        os.set_blocking(proc.stdin.fileno(), False)

        out, res = bytearray(), bytearray()
        failure = None
        deadline = start + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(res_r, selectors.EVENT_READ, "res")
            sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
            open_streams = 2
            while open_streams and failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    failure = f"timed out after {timeout:g}s"
                    break
                for key, _ in sel.select(min(remaining, 0.25)):
                    if key.data == "in":
                        try:
                            sent += os.write(key.fd, job[sent:sent + (1 << 16)])
                        except BlockingIOError:
                            continue
                        except OSError:          # the judge is gone; its result (or silence) says why
                            sent = len(job)
                        if sent >= len(job):
                            sel.unregister(proc.stdin)
                            proc.stdin.close()
                        continue
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
                            failure = "sandbox harness error: result channel flooded"
                            break
                # without namespaces a stray thread can hold stdout open: stop once the judge has reported
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
        return SandboxResult(0, total, False, "the sandbox judge " + _exit_reason(returncode), text)
    finally:
        if proc is not None:
            _kill_group(proc)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
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
    """Layouts that can contain the code here, strongest first (see the module doc)."""
    pythons = []
    for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if p and os.path.isfile(p) and os.access(p, os.X_OK) and os.path.realpath(p) not in pythons:
            pythons.append(os.path.realpath(p))
    abi = landlock_abi()
    out = []
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
        if unshare:
            out += [SandboxMode(True, True, p, unshare, abi) for p in pythons]
            if abi:
                out.append(SandboxMode(True, False, pythons[0], unshare, abi))
        out += [SandboxMode(False, True, p, None, abi) for p in pythons]
    if abi and pythons:
        out.append(SandboxMode(False, False, pythons[0], None, abi))
    return [m for m in out if containment_problem(m, abi) is None]


def sandbox_mode() -> SandboxMode:
    """The strongest layout that works on this machine (probed once per process, then cached).
    RuntimeError when none can contain untrusted code here."""
    global _MODE
    with _MODE_LOCK:
        if _MODE is None:
            candidates = _candidates()
            if not candidates:
                problem = containment_problem(SandboxMode(False, False, sys.executable), landlock_abi())
                raise RuntimeError(f"rollout/sandbox.py: no sandbox layout can contain untrusted code on this "
                                   f"machine: {problem or 'no usable Python interpreter'}")
            tried = []
            for mode in candidates:
                uid = NOBODY if mode.drop_uid else os.getuid()
                r = _run(PROBE_CODE, split_tests(PROBE_TESTS.format(uid=uid)), timeout=20.0, memory_mb=256,
                         max_output=10_000, mode=mode)
                if r.ok and r.passed == 3:
                    _MODE = mode
                    break
                tried.append(f"{mode}: {r.reason} {r.output[-300:]}")
            if _MODE is None:
                raise RuntimeError("rollout/sandbox.py: no sandbox layout works on this machine:\n" + "\n".join(tried))
        return _MODE


def run_code(code: str, tests: str, timeout: float = 5.0, memory_mb: int = 256, max_output: int = 10_000,
             *, mode: SandboxMode | None = None) -> SandboxResult:
    """Run `code`, then each `assert` of `tests`, in a separate sandboxed process (see the module doc).
    RuntimeError when the layout (given, or the one found here) cannot contain untrusted code."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if timeout <= 0 or memory_mb <= 0 or max_output < 0:
        raise ValueError(f"need timeout > 0, memory_mb > 0, max_output >= 0; got {timeout}, {memory_mb}, {max_output}")
    return _run(code, split_tests(tests), float(timeout), int(memory_mb), int(max_output), mode or sandbox_mode())
