"""The program rollout/sandbox.py runs (see BOOT below), with the job on stdin.

Standard library only (it runs under whichever interpreter the layout picked, 3.8 or later), and it
must not import anything from this repository. The module doc of rollout/sandbox.py says what the
sandbox guarantees; this file is how. One process starts here and becomes two:

  judge   (trusted; never runs the code) reads the code from stdin, makes the private mounts in the
          namespaced layouts, forks the worker, and only then reads the tests from stdin, so the
          worker's memory never held them. It makes itself non-dumpable (no /proc/PID/mem, no
          ptrace by a process of its own uid) and runs the tests in its own interpreter. Every name
          the tests take from the program is fetched from the worker over a pipe as plain data
          (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, Fraction, Decimal,
          deque...), decoded into fresh built-in objects; the comparisons of a test therefore run on
          the judge's own objects and never call a method the program defined. Anything else (a
          function, a class, an instance of a user class, a generator) stays in the worker and the
          judge holds a Handle to it: calling it, reading an attribute, iterating, len(), str()...
          go to the worker and come back as plain data again; `==` on a Handle is identity, so an
          object that claims to equal everything equals nothing here. The judge alone writes the
          result line to the caller's result descriptor.
  worker  (untrusted once it runs the code): closes every descriptor but stdout/stderr and its two
          pipes, sets rlimits, drops to uid 65534 (or drops every capability), sets no_new_privs,
          then Landlock and a seccomp filter, installs an audit hook, runs the program, and then
          answers the judge's requests until it is killed. Whatever the code does to the worker's
          interpreter (patch the harness, forge replies, load _ctypes) it can only choose the
          replies the judge gets, which is what a function does anyway.

A round trip through the pipes costs tens of microseconds; a test makes one per call into the
program. Arguments cross by value; a list/dict/set/bytearray argument the program changes in place
is copied back into the judge's object after the call (top level only).
"""
import os
import sys

if __package__:      # imported by rollout/sandbox.py, which so leaves the bytecode cached for the judge
    from .sandbox_confine import Kernel, landlock_rules, make_guard, private_mounts, seccomp_program, seccomp_rules
    from .sandbox_wire import (JSON, MESSAGE_LIMIT, Broken, Channel, Codec, Handle, JudgeProxy, error_reply,
                               judge_lendable, serve_call)
else:                # the judge: BOOT put this directory on sys.path
    from sandbox_confine import Kernel, landlock_rules, make_guard, private_mounts, seccomp_program, seccomp_rules
    from sandbox_wire import (JSON, MESSAGE_LIMIT, Broken, Channel, Codec, Handle, JudgeProxy, error_reply,
                              judge_lendable, serve_call)

# What rollout/sandbox.py runs: `python -I -S -B -c BOOT DIR CONFIG_JSON`. Importing (not running) this
# file lets the interpreter use the cached bytecode of all three modules: compiling them costs ~12 ms.
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); import sandbox_harness; del sys.path[0]; "
        "sandbox_harness.judge_main(sys.argv[2])")


class Names(dict):
    """The tests' namespace: a name the tests do not define and that is not a builtin is the
    program's global, fetched when it is used (so it is current). Builtins always win: a program
    cannot redefine `len` or `sorted` for the tests."""

    def __missing__(self, name):
        import builtins
        if name in builtins.__dict__ or name.startswith("__"):
            raise KeyError(name)
        try:
            return self.codec.decode(self.codec.channel.request(["global", name])[1])
        except NameError:
            raise KeyError(name)


def judge_serve(codec, msg):
    """The worker calls back into the judge: only functions the tests lent, only calls."""
    try:
        if msg[0] == "call" and len(msg) == 4:
            fn = codec.lent[msg[1]]
            return serve_call(codec, fn, msg[2], msg[3])
        raise Broken("an unexpected request from the program")
    except Broken:
        raise
    except KeyError:
        raise Broken("a request for an object the tests never lent")
    except Exception as e:
        return error_reply(e)


def worker_serve(codec, ns, msg):
    """The judge's requests, answered in the worker (which the code may have rewritten: the judge
    trusts none of it)."""
    dec = codec.decode
    try:
        op = msg[0]
        if op == "global":
            if msg[1] not in ns:
                raise NameError(msg[1])
            return ["ok", codec.encode(ns[msg[1]]), None]
        obj = codec.lent[msg[1]]
        if op == "call":
            return serve_call(codec, obj, msg[2], msg[3])
        if op == "getattr":
            value = getattr(obj, str(msg[2]))
        elif op == "setattr":
            value = setattr(obj, str(msg[2]), dec(msg[3]))
        elif op == "getitem":
            value = obj[dec(msg[2])]
        elif op == "setitem":
            obj[dec(msg[2])] = dec(msg[3])
            value = None
        elif op in UNARY:
            value = UNARY[op](obj)
        else:
            raise ValueError(op)
        return ["ok", codec.encode(value), None]
    except BaseException as e:
        return error_reply(e)


def _index(x):
    import operator
    return operator.index(x)


UNARY = {"len": len, "bool": bool, "str": str, "repr": repr, "int": int, "float": float, "iter": iter,
         "next": next, "index": _index}


def describe(e):
    try:
        name = type(e).__name__
        msg = str(e)
        return "%s: %s" % (name, msg[:300]) if msg else name
    except BaseException:
        return "an exception"


def worker_main(cfg, kernel, code_src, rpc_r, rpc_w):
    """Runs in the forked worker; never returns."""
    import builtins

    namespace = {"__name__": "solution", "__builtins__": builtins}
    codec = Codec("ref", "jref", JudgeProxy, lambda x: True, take_builtins=True)
    channel = Channel(rpc_r, rpc_w, codec, lambda m: worker_serve(codec, namespace, m), 1 << 30)

    def send_raw(kind, text=""):
        channel.send([kind, text.replace("\n", " ")[:2000]])
    try:
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)      # not the job pipe: the tests come through it
        keep = sorted({0, 1, 2, rpc_r, rpc_w})
        for lo, hi in zip(keep, keep[1:] + [1 << 20]):
            os.closerange(lo + 1, hi)
        import resource
        cpu, mem = cfg["cpu_seconds"], cfg["memory_bytes"]
        for name, value in (("RLIMIT_CPU", (cpu, cpu + 1)), ("RLIMIT_AS", (mem, mem)),
                            ("RLIMIT_FSIZE", (cfg["file_bytes"],) * 2), ("RLIMIT_NOFILE", (cfg["nofile"],) * 2),
                            ("RLIMIT_CORE", (0, 0)), ("RLIMIT_NPROC", (cfg["nproc"],) * 2),
                            ("RLIMIT_MSGQUEUE", (0, 0))):
            resource.setrlimit(getattr(resource, name), value)
        if cfg["drop_uid"] is not None:
            uid = cfg["drop_uid"]
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
                raise RuntimeError("uid drop did not take")
        kernel.drop_capabilities()
        kernel.prctl(1, 9)                               # PR_SET_PDEATHSIG SIGKILL: die with the judge
        if os.getppid() != cfg["judge_pid"]:
            os._exit(1)
        kernel.prctl(38, 1)                              # PR_SET_NO_NEW_PRIVS
        if cfg["landlock"]:
            kernel.landlock(cfg["landlock"], landlock_rules(cfg))
        pid = os.getpid()
        rules = seccomp_rules(kernel.arch or {}, pid, no_writes=not cfg["namespaces"])
        if kernel.arch is None:
            raise RuntimeError("no seccomp table for this architecture")
        kernel.seccomp(seccomp_program(kernel.arch, rules))
    except BaseException as e:
        send_raw("setup_failed", describe(e))
        os._exit(3)

    for name in list(sys.modules):   # the code must import these itself, through the guard
        if name.split(".")[0] in cfg["blocked_modules"]:
            del sys.modules[name]
    if cfg["audit_hook"]:
        sys.addaudithook(make_guard(cfg["scratch"], tuple(cfg["blocked_modules"]), os.getcwd,
                                    os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC))
    send_raw("ready")
    streams = (sys.stdout, sys.stderr)

    def flush():
        for s in streams:
            try:
                s.flush()
            except BaseException:
                pass
    try:
        code_obj = compile(code_src, "solution.py", "exec")
    except BaseException as e:
        send_raw("failed", "code does not compile: " + describe(e))
        os._exit(0)
    try:
        exec(code_obj, namespace)
    except BaseException as e:
        flush()
        send_raw("failed", "code raised " + describe(e))
        os._exit(0)
    flush()
    send_raw("done")
    while True:
        try:
            msg = channel.recv()
            reply = worker_serve(codec, namespace, msg)
            flush()
            channel.send(reply)
        except BaseException:
            os._exit(0)


# ----------------------------------------------------------------------------- the judge
def read_exact(fd, n):
    chunks = []
    while n:
        c = os.read(fd, min(n, 1 << 20))
        if not c:
            raise EOFError("the job ended early")
        chunks.append(c)
        n -= len(c)
    return b"".join(chunks)


def read_job_part(fd):
    return read_exact(fd, int(read_exact(fd, 16))).decode("utf-8", "surrogatepass")


def judge_main(config):
    """No `import json`, `ast` or `signal` here: they cost more than the rest of a run (re, enum)."""
    import _signal
    import builtins
    cfg = JSON[1](config)
    res_fd = cfg["result_fd"]

    def report(kind, text=""):
        os.write(res_fd, (kind + " " + text.replace("\n", " ").replace("\r", " ")[:2000] + "\n")
                 .encode("utf-8", "replace"))
        os._exit(0)

    try:
        kernel = Kernel()
        code_src = read_job_part(0)
        if cfg["namespaces"]:
            private_mounts(cfg, kernel)
        cfg["judge_pid"] = os.getpid()
        worker_in, judge_out = os.pipe()      # (read end, write end)
        judge_in, worker_out = os.pipe()
    except BaseException as e:
        report("X", "judge setup: %s" % describe(e))
    worker = os.fork()
    if worker == 0:
        os.close(judge_out)
        os.close(judge_in)
        os.close(res_fd)
        worker_main(cfg, kernel, code_src, worker_in, worker_out)
        os._exit(1)
    os.close(worker_in)
    os.close(worker_out)
    del code_src

    def kill_worker():
        try:
            os.kill(worker, 9)
        except OSError:
            pass

    def expire(signum, frame):
        kill_worker()
        os._exit(137)
    _signal.signal(_signal.SIGALRM, expire)
    _signal.alarm(cfg["backstop"])                       # in case the caller died and nobody kills us

    def exit_status():
        import time
        for _ in range(40):
            pid, status = os.waitpid(worker, os.WNOHANG)
            if pid:
                if os.WIFSIGNALED(status):
                    sig = os.WTERMSIG(status)
                    return "was killed by %s" % SIGNALS.get(sig, "signal %d" % sig)
                return "exited with status %d" % os.WEXITSTATUS(status)
            time.sleep(0.005)
        kill_worker()
        return "closed the channel to the tests"

    try:
        kernel.prctl(4, 0)                               # PR_SET_DUMPABLE 0: our memory stays ours
        tests = []                                       # (code, is_test, where), split by the caller
        for src, is_test, where in JSON[1](read_job_part(0)):
            tests.append((compile(src, "tests.py", "exec"), bool(is_test), str(where)))
        os.close(0)
        codec = Codec("jref", "ref", Handle, judge_lendable, send_builtins=True)
        channel = Channel(judge_in, judge_out, codec, lambda m: judge_serve(codec, m), MESSAGE_LIMIT)
    except BaseException as e:
        kill_worker()
        report("X", "judge setup: %s" % describe(e))

    def first_message(expected):
        try:
            msg = channel.recv()
        except Broken:
            return None, ""
        if len(msg) != 2 or msg[0] not in expected or type(msg[1]) is not str:
            kill_worker()
            report("E", "the program broke the harness channel (an unexpected message)")
        return msg[0], msg[1]

    kind, text = first_message(("ready", "setup_failed"))
    if kind != "ready":
        report("X", "worker setup: %s" % (text or "the worker " + exit_status()))
    kind, text = first_message(("done", "failed"))
    if kind is None:
        report("E", "the program %s before reporting a result" % exit_status())
    if kind == "failed":
        kill_worker()
        report("E", text)

    namespace = Names(__name__="tests", __builtins__=builtins)
    namespace.codec = codec
    passed = total = 0
    first = ""
    for obj, is_test, where in tests:
        try:
            exec(obj, namespace)
            ok = True
        except BaseException as e:
            ok = False
            if channel.broken is None and not first:
                first = "%s %s: %s" % ("test" if is_test else "setup", where, describe(e))
        if channel.broken is not None:
            why = channel.broken
            kill_worker()
            if why == "eof":
                report("E", "the program %s during %s, before reporting a result" % (exit_status(), where))
            report("E", "the program broke the harness channel (%s) during %s" % (why, where))
        if is_test:
            total += 1
            passed += ok
    kill_worker()
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass
    report("R", "%d %d %s" % (passed, total, first))


SIGNALS = {4: "SIGILL", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 11: "SIGSEGV", 13: "SIGPIPE",
           14: "SIGALRM", 15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ", 31: "SIGSYS"}

