"""How the sandbox's worker is confined: the seccomp filter, Landlock, the private mounts of the
namespaced layouts, and the audit hook. Used by rollout/sandbox_harness.py, in the judge before the
fork and in the worker before the code runs; standard library only, Python 3.8 or later.

The system calls go through ctypes (the stdlib has no seccomp, Landlock or mount_setattr); the
filter is classic BPF built here as data, so no libseccomp is needed.
"""
import os
import struct
import sys

# ----------------------------------------------------------------------------- syscalls
# Numbers from arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h (aarch64);
# 424 and up are the same on every architecture. tests/test_sandbox_judge.py checks them against
# the installed kernel headers when there are any.
COMMON = dict(pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
              open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434,
              clone3=435, openat2=437, pidfd_getfd=438, process_madvise=440, mount_setattr=442, quotactl_fd=443,
              landlock_create_ruleset=444, landlock_add_rule=445, landlock_restrict_self=446, memfd_secret=447,
              process_mrelease=448, fchmodat2=452, setxattrat=463, removexattrat=466, open_tree_attr=467)
LAST_KNOWN = 467               # anything newer gets ENOSYS (glibc falls back), so new kernels add no hole
SYSCALLS = {
    "x86_64": dict(COMMON, arch=0xC000003E, open=2, ioctl=16, shmget=29, shmat=30, shmctl=31, socket=41,
                   socketpair=53, clone=56, fork=57, vfork=58, execve=59, kill=62, semget=64, semop=65,
                   semctl=66, shmdt=67, msgget=68, msgsnd=69, msgrcv=70, msgctl=71, flock=73, truncate=76,
                   rename=82, mkdir=83, rmdir=84, creat=85, link=86, unlink=87, symlink=88, chmod=90, fchmod=91,
                   chown=92, fchown=93, lchown=94, ptrace=101, syslog=103, setpgid=109, setsid=112, capset=126,
                   rt_sigqueueinfo=129, utime=132, mknod=133, uselib=134, personality=135, ustat=136, sysfs=139,
                   setpriority=141, sched_setparam=142, sched_setscheduler=144, vhangup=153, modify_ldt=154,
                   pivot_root=155, _sysctl=156, prctl=157, adjtimex=159, chroot=161, acct=163, settimeofday=164,
                   mount=165, umount2=166, swapon=167, swapoff=168, reboot=169, sethostname=170,
                   setdomainname=171, iopl=172, ioperm=173, create_module=174, init_module=175,
                   delete_module=176, quotactl=179, nfsservctl=180, setxattr=188, lsetxattr=189, fsetxattr=190,
                   removexattr=197, lremovexattr=198, fremovexattr=199, tkill=200, sched_setaffinity=203,
                   lookup_dcookie=212, semtimedop=220, clock_settime=227, tgkill=234, utimes=235, mq_open=240,
                   mq_unlink=241, mq_timedsend=242, mq_timedreceive=243, mq_notify=244, mq_getsetattr=245,
                   kexec_load=246, add_key=248, request_key=249, keyctl=250, ioprio_set=251, migrate_pages=256,
                   openat=257, mkdirat=258, mknodat=259, fchownat=260, futimesat=261, unlinkat=263,
                   renameat=264, linkat=265, symlinkat=266, fchmodat=268, unshare=272, get_robust_list=274,
                   move_pages=279, utimensat=280, fallocate=285, rt_tgsigqueueinfo=297, perf_event_open=298,
                   fanotify_init=300, prlimit64=302, name_to_handle_at=303, open_by_handle_at=304,
                   clock_adjtime=305, setns=308, process_vm_readv=310, process_vm_writev=311, kcmp=312,
                   finit_module=313, sched_setattr=314, renameat2=316, seccomp=317, memfd_create=319,
                   kexec_file_load=320, bpf=321, execveat=322, userfaultfd=323),
    "aarch64": dict(COMMON, arch=0xC00000B7, setxattr=5, lsetxattr=6, fsetxattr=7, removexattr=14,
                    lremovexattr=15, fremovexattr=16, lookup_dcookie=18, ioctl=29, ioprio_set=30, flock=32,
                    mknodat=33, mkdirat=34, unlinkat=35, symlinkat=36, linkat=37, renameat=38, umount2=39,
                    mount=40, pivot_root=41, nfsservctl=42, truncate=45, fallocate=47, chroot=51, fchmod=52,
                    fchmodat=53, fchownat=54, fchown=55, openat=56, vhangup=58, quotactl=60, utimensat=88,
                    acct=89, capset=91, personality=92, unshare=97, get_robust_list=100, kexec_load=104,
                    init_module=105, delete_module=106, clock_settime=112, syslog=116, ptrace=117,
                    sched_setparam=118, sched_setscheduler=119, sched_setaffinity=122, kill=129, tkill=130,
                    tgkill=131, rt_sigqueueinfo=138, setpriority=140, reboot=142, setpgid=154, setsid=157,
                    sethostname=161, setdomainname=162, prctl=167, settimeofday=170, adjtimex=171, mq_open=180,
                    mq_unlink=181, mq_timedsend=182, mq_timedreceive=183, mq_notify=184, mq_getsetattr=185,
                    msgget=186, msgctl=187, msgrcv=188, msgsnd=189, semget=190, semctl=191, semtimedop=192,
                    semop=193, shmget=194, shmctl=195, shmat=196, shmdt=197, socket=198, socketpair=199,
                    add_key=217, request_key=218, keyctl=219, clone=220, execve=221, swapon=224, swapoff=225,
                    migrate_pages=238, move_pages=239, rt_tgsigqueueinfo=240, perf_event_open=241,
                    prlimit64=261, fanotify_init=262, name_to_handle_at=264, open_by_handle_at=265,
                    clock_adjtime=266, setns=268, process_vm_readv=270, process_vm_writev=271, kcmp=272,
                    finit_module=273, sched_setattr=274, renameat2=276, seccomp=277, memfd_create=279, bpf=280,
                    execveat=281, userfaultfd=282, kexec_file_load=294),
}

# Refused in every layout (EPERM): new processes and programs, reaching other processes, sockets,
# namespaces and mounts, System V / POSIX IPC objects (they outlive the process), device nodes and
# FIFOs, memfds (file memory outside RLIMIT_AS), flock on files it can read, and kernel interfaces no
# test needs (io_uring would also run file operations unseen).
DENY = ("fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
        "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "process_madvise", "process_mrelease", "tkill",
        "setsid", "setpgid", "socket", "socketpair", "unshare", "setns", "mount", "umount2", "pivot_root",
        "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
        "open_tree_attr", "mknod", "mknodat", "shmget", "shmat", "shmctl", "shmdt", "semget", "semop",
        "semctl", "semtimedop", "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink",
        "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr", "io_uring_setup",
        "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "userfaultfd", "keyctl",
        "add_key", "request_key", "fanotify_init", "name_to_handle_at", "open_by_handle_at",
        "init_module", "finit_module", "delete_module", "create_module", "kexec_load", "kexec_file_load",
        "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "iopl", "ioperm",
        "modify_ldt", "uselib", "ustat", "sysfs", "_sysctl", "vhangup", "lookup_dcookie", "nfsservctl",
        "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
        "personality", "capset", "memfd_create", "memfd_secret", "flock")
# Refused where the kernel cannot confine writes to the scratch directory (no private mounts):
# no file is created, changed, renamed or removed anywhere.
DENY_WRITES = ("creat", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
               "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown",
               "fchown", "lchown", "fchownat", "truncate", "fallocate", "utime", "utimes", "utimensat",
               "futimesat", "setxattr", "lsetxattr", "fsetxattr", "setxattrat", "removexattr",
               "lremovexattr", "fremovexattr", "removexattrat")
O_WRITE = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000      # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND (same on both)
CLONE_THREAD, CLONE_NEW = 0x10000, 0x7E020080      # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET} | CLONE_NEWTIME
TIOCSTI, TIOCLINUX = 0x5412, 0x541C


def seccomp_rules(names, pid, no_writes):
    """(syscall number, conditions) pairs: conditions None = always EPERM, "ENOSYS", or a list of
    (argument index, allowed values, mask) that must all hold for the call to be allowed."""
    rules = []

    def add(name, conds):
        if name in names:
            rules.append((names[name], conds))
    for n in DENY:
        add(n, None)
    add("clone3", "ENOSYS")                              # glibc then uses clone, whose flags we can see
    add("clone", [(0, (CLONE_THREAD,), CLONE_THREAD | CLONE_NEW)])    # threads only
    for n in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        add(n, [(0, (pid,), None)])                      # signals to this process only (not 0, -1, -pgid)
    for n in ("prlimit64", "sched_setaffinity", "sched_setparam", "sched_setscheduler", "sched_setattr",
              "migrate_pages", "move_pages", "get_robust_list"):
        add(n, [(0, (0, pid), None)])                    # pid 0 = this process
    add("setpriority", [(0, (0,), None), (1, (0, pid), None)])        # PRIO_PROCESS, this process
    add("ioprio_set", [(0, (1,), None), (1, (0, pid), None)])         # IOPRIO_WHO_PROCESS, this process
    add("ioctl", [(1, ("!", TIOCSTI, TIOCLINUX), None)]) # no typing into a terminal
    if no_writes:
        for n in DENY_WRITES:
            add(n, None)
        add("open", [(1, (0,), O_WRITE)])
        add("openat", [(2, (0,), O_WRITE)])
        add("openat2", "ENOSYS")                         # its flags sit behind a pointer
    return rules


def seccomp_program(arch, rules):
    """A classic-BPF seccomp filter (list of (code, jt, jf, k)) for these rules; default allow. A
    foreign architecture is killed; numbers past LAST_KNOWN (x86's x32 ones included) get ENOSYS."""
    LD, JEQ, JGE, AND, RET, JA = 0x20, 0x15, 0x35, 0x54, 0x06, 0x05
    ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
    EPERM, ENOSYS = ERRNO | 1, ERRNO | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch["arch"]), (RET, 0, 0, KILL), (LD, 0, 0, 0),
            (JGE, 0, 1, LAST_KNOWN + 1), (RET, 0, 0, ENOSYS)]
    for nr, conds in rules:
        if conds is None or conds == "ENOSYS":
            body = [(RET, 0, 0, EPERM if conds is None else ENOSYS)]
        else:
            body = []
            for idx, values, mask in conds:              # each condition: fall through when it holds
                body.append((LD, 0, 0, 16 + 8 * idx))    # low 32 bits of the argument (little-endian)
                if mask is not None:
                    body.append((AND, 0, 0, mask))
                if values[0] == "!":                     # allowed unless equal to one of these
                    body += [(JEQ, "fail", 0, v) for v in values[1:]]
                else:
                    for j, v in enumerate(values):
                        body.append((JEQ, len(values) - j, 0, v))
                    body.append((JA, 0, 0, "fail"))
            body += [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
            fail = len(body) - 1
            body = [(c, (fail - i - 1) if jt == "fail" else jt, jf, (fail - i - 1) if k == "fail" else k)
                    for i, (c, jt, jf, k) in enumerate(body)]
        prog.append((JEQ, 0, len(body), nr))
        prog += body
    prog.append((RET, 0, 0, ALLOW))
    assert all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in prog) and len(prog) < 4096
    return prog


# ----------------------------------------------------------------------------- kernel calls (ctypes)
class Kernel:
    """The few system calls the standard library lacks. Built before the worker forks; the worker
    uses it for its own setup, before the code runs."""

    def __init__(self):
        import ctypes
        self.ct = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.arch = SYSCALLS.get(os.uname().machine)

    def call(self, what, fn, *args):
        ct = self.ct
        r = fn(*[a if isinstance(a, (ct.c_char_p, ct.c_void_p)) or a is None else ct.c_long(a) for a in args])
        if r < 0:
            err = ct.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))
        return r

    def syscall(self, name, *args):
        if self.arch is None:
            raise OSError(38, "no system call table for this architecture")
        return self.call(name, self.libc.syscall, self.arch[name], *args)

    def prctl(self, *args):
        return self.call("prctl%r" % (args,), self.libc.prctl, *(list(args) + [0] * (5 - len(args))))

    def buf(self, data):
        b = self.ct.create_string_buffer(data, len(data))
        return b, self.ct.addressof(b)

    def mount(self, src, target, fstype, flags, data):
        c = self.ct.c_char_p
        self.call("mount %s" % target, self.libc.mount, c(src), c(target.encode()), c(fstype), flags, c(data))

    def all_mounts_read_only(self):
        attr, addr = self.buf(struct.pack("QQQQ", 1, 0, 0, 0))      # MOUNT_ATTR_RDONLY
        self.syscall("mount_setattr", -100, self.ct.c_char_p(b"/"), 0x8000, addr, 32)   # AT_FDCWD, AT_RECURSIVE

    def drop_capabilities(self):
        hdr, hdr_addr = self.buf(struct.pack("Ii", 0x20080522, 0))   # _LINUX_CAPABILITY_VERSION_3, this thread
        data, data_addr = self.buf(bytes(24))
        self.syscall("capset", hdr_addr, data_addr)
        self.prctl(47, 4)                                            # PR_CAP_AMBIENT_CLEAR_ALL

    def landlock(self, abi, rules):
        """Restrict this process to `rules` [(path, rights)]; everything of the ABI not granted is denied."""
        fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
        net = 3 if abi >= 4 else 0                   # bind and connect TCP: no rule grants them
        scoped = 3 if abi >= 6 else 0                # abstract unix sockets and signals outside the domain
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        attr, addr = self.buf(struct.pack("QQQ", fs, net, scoped)[:size])
        ruleset = self.syscall("landlock_create_ruleset", addr, size, 0)
        file_rights = 1 | 2 | 4 | (1 << 14) | (1 << 15)
        try:
            for path, rights in rules:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    is_dir = os.fstat(fd).st_mode & 0o170000 == 0o040000
                    allowed = rights & fs & (fs if is_dir else file_rights)
                    if not allowed:
                        continue
                    rule, raddr = self.buf(struct.pack("=Qi", allowed, fd))
                    self.syscall("landlock_add_rule", ruleset, 1, raddr, 0)
                finally:
                    os.close(fd)
            self.syscall("landlock_restrict_self", ruleset, 0)
        finally:
            os.close(ruleset)

    def seccomp(self, prog):
        raw = b"".join(struct.pack("HBBI", c, jt, jf, k) for c, jt, jf, k in prog)
        filt, faddr = self.buf(raw)
        fprog, paddr = self.buf(struct.pack("HxxxxxxQ", len(prog), faddr))
        self.prctl(22, 2, paddr)                             # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


READ = 4 | 8                                                  # READ_FILE | READ_DIR
WRITE = 2 | 16 | 32 | 128 | 256 | 4096 | (1 << 13) | (1 << 14)   # write, remove, make dir/reg/sym, refer, truncate
READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/localtime",
              "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/os-release", "/etc/mime.types",
              "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/proc")


def landlock_rules(cfg):
    """Reads: the system's libraries and this interpreter's standard library, /proc (other processes'
    memory and environment stay closed: Landlock refuses ptrace-class access out of the domain) and
    the scratch directory; writes: the scratch directory, only where the private mounts bound it."""
    rules = [(p, READ) for p in READ_PATHS]
    rules += [(p, READ) for p in sys.path if p] + [(os.path.dirname(os.__file__), READ)]
    rules.append(("/dev/null", 2 | (1 << 14)))
    if cfg["namespaces"]:
        rules += [(d, READ) for d in cfg["writable_dirs"]]      # empty tmpfs there
        rules.append((cfg["scratch"], READ | WRITE))
    else:
        rules.append((cfg["scratch"], READ))
    return rules


def private_mounts(cfg, kernel):
    """Namespaced layouts, in the judge before the fork: every mount read-only, the world-writable
    directories covered by empty read-only tmpfs, /dev reduced to null/zero/full/random/urandom, and
    the scratch directory a fresh tmpfs of scratch_bytes (the only writable place; the total quota)."""
    if os.readlink("/proc/self/ns/mnt") == cfg["host_mnt_ns"]:
        raise RuntimeError("the mount namespace is the host's; refusing to mount")
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, MOVE = 1, 2, 4, 8, 32, 4096, 8192
    SAFE = NOSUID | NODEV | NOEXEC
    kernel.all_mounts_read_only()
    scratch, owner = cfg["scratch"], cfg["drop_uid"] if cfg["drop_uid"] is not None else os.getuid()
    scratch_opts = ("size=%d,nr_inodes=4096,mode=0700,uid=%d,gid=%d" % (cfg["scratch_bytes"], owner, owner)).encode()
    holder = None
    for d in cfg["writable_dirs"]:
        if not os.path.isdir(d) or os.path.islink(d):
            continue
        if scratch.startswith(d.rstrip("/") + "/"):
            holder = d
            kernel.mount(b"tmpfs", d, b"tmpfs", SAFE, b"size=1m,nr_inodes=64,mode=755")
        else:
            kernel.mount(b"tmpfs", d, b"tmpfs", RDONLY | SAFE, b"size=4k,nr_inodes=4,mode=755")
    if holder is None:   # the scratch directory is elsewhere: stage /dev under a tmpfs on it
        kernel.mount(b"tmpfs", scratch, b"tmpfs", SAFE, b"size=1m,nr_inodes=64,mode=755")
        stage_root = scratch
    else:
        stage_root = holder
    stage = stage_root.rstrip("/") + "/.sandbox-dev"
    os.mkdir(stage)
    kernel.mount(b"tmpfs", stage, b"tmpfs", NOSUID | NOEXEC, b"size=4k,nr_inodes=32,mode=755")
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + name):
            open(stage + "/" + name, "w").close()
            kernel.mount(("/dev/" + name).encode(), stage + "/" + name, None, BIND, None)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, stage + "/" + name)
    kernel.mount(stage.encode(), "/dev", None, MOVE, None)
    kernel.mount(None, "/dev", None, REMOUNT | RDONLY | NOSUID | NOEXEC, None)
    os.rmdir(stage)
    if holder is None:
        kernel.mount(b"tmpfs", scratch, b"tmpfs", SAFE, scratch_opts)   # on top of the staging tmpfs
    else:
        os.makedirs(scratch)
        kernel.mount(b"tmpfs", scratch, b"tmpfs", SAFE, scratch_opts)
        kernel.mount(None, holder, None, REMOUNT | BIND | RDONLY | SAFE, None)
    os.chdir(scratch)


def make_guard(scratch, blocked, getcwd, write_flags):
    """The audit hook: clear errors for the common escapes. Not the barrier (the kernel is): code that
    reaches native calls (e.g. by loading _ctypes through importlib's spec machinery) gets past it."""
    deny_events = frozenset({
        "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.startfile",
        "subprocess.Popen", "os.kill", "os.killpg", "os.symlink", "os.link", "pty.spawn", "signal.pthread_kill",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__",
        "sqlite3.enable_load_extension", "sqlite3.load_extension"})
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                   "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
                   "os.chflags": (0,), "os.lchflags": (0,), "os.rename": (0, 1), "shutil.rmtree": (0,),
                   "shutil.copyfile": (1,), "shutil.copymode": (1,), "shutil.copystat": (1,),
                   "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.chown": (0,), "sqlite3.connect": (0,)}
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
        if p == ":memory:" or p == b":memory:" or p == "" or p == b"":
            return True
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
