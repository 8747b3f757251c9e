"""rollout/sandbox_harness.py (+ sandbox_wire.py, sandbox_confine.py): the tests run in the judge, the program in the worker, and only plain
data crosses. Honest programs must score exactly as they would if the tests ran beside them: classes,
generators, in-place changes, callbacks, exceptions, big numbers, the stdlib's value types. Plus the
pieces that need no sandbox run: the value codec, the seccomp program, the system call numbers."""
import math
import os
import re

import pytest

from rollout import sandbox_confine as C
from rollout import sandbox_wire as W
from rollout.sandbox import run_code, split_tests


def score(code, tests, **kw):
    r = run_code(code, tests, timeout=10.0, **kw)
    assert r.ok, r
    return r.score, r


@pytest.mark.parametrize("code, tests", [
    # objects of the program's own classes: methods, attributes, state between calls
    ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n"
     "    def pop(self):\n        return self.items.pop()\n",
     "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2\nassert s.items == [1]\nassert len(s.items) == 1"),
    # generators, iteration, membership, len, str, int, float, bool, indexing
    ("def gen(n):\n    yield from range(n)\nclass Box:\n    def __len__(self):\n        return 3\n"
     "    def __getitem__(self, i):\n        return i * 10\n    def __str__(self):\n        return 'box'\n"
     "    def __float__(self):\n        return 1.5\n    def __bool__(self):\n        return False\n",
     "assert list(gen(3)) == [0, 1, 2]\nassert 2 in gen(3)\nassert sum(gen(4)) == 6\nb = Box()\nassert len(b) == 3\n"
     "assert b[2] == 20\nassert str(b) == 'box'\nassert float(b) == 1.5\nassert not b\n"
     "assert [x for x in zip('ab', gen(2))] == [('a', 0), ('b', 1)]"),
    # in-place changes to arguments come back
    ("def sort_in_place(xs):\n    xs.sort()\ndef fill(d, s):\n    d['k'] = 1\n    s.add(2)\n",
     "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]\nd, s = {}, set()\nfill(d, s=s)\nassert d == {'k': 1} and s == {2}"),
    # callbacks into the tests and builtins handed over by name
    ("def apply(f, x):\n    return f(x)\ndef by(xs, key):\n    return sorted(xs, key=key)\n",
     "assert apply(lambda x: x + 1, 3) == 4\nassert by(['bbb', 'a', 'cc'], len) == ['a', 'cc', 'bbb']\n"
     "assert by(['B', 'a'], str.lower) == ['a', 'B']\nassert apply(int, '7') == 7\n"
     "def twice(x):\n    return apply(lambda y: y * 2, x)\nassert apply(twice, 5) == 10"),
    # exceptions cross with their built-in type
    ("def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return {}[x]\n",
     "try:\n    f(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n    assert False\n"
     "try:\n    f(1)\nexcept KeyError:\n    pass\nelse:\n    assert False"),
    # numbers and the stdlib's value types
    ("import math, fractions, decimal, collections\ndef fact(n):\n    return math.factorial(n)\n"
     "def values():\n    P = collections.namedtuple('P', 'x y')\n"
     "    return [float('nan'), float('inf'), -0.0, 1 + 2j, b'\\x00\\xff', bytearray(b'a'), {1, 2}, frozenset({3}),\n"
     "            {(1, 2): 'tuple key'}, fractions.Fraction(1, 3), decimal.Decimal('1.10'), collections.deque([1], maxlen=2),\n"
     "            P(1, 2), collections.Counter('aab'), collections.OrderedDict(a=1), True, None, 10 ** 30, -(10 ** 5000)]\n",
     "import math, fractions, decimal, collections\nassert fact(2000) == math.factorial(2000)\nv = values()\n"
     "assert math.isnan(v[0]) and v[1] == math.inf and str(v[2]) == '-0.0' and v[3] == 1 + 2j\n"
     "assert v[4] == b'\\x00\\xff' and v[5] == bytearray(b'a') and v[6] == {1, 2} and v[7] == frozenset({3})\n"
     "assert v[8] == {(1, 2): 'tuple key'} and v[9] == fractions.Fraction(1, 3) and str(v[10]) == '1.10'\n"
     "assert v[11] == collections.deque([1]) and v[11].maxlen == 2 and v[12] == (1, 2)\n"
     "assert v[13] == {'a': 2, 'b': 1} and v[14] == {'a': 1} and v[15] is True and v[16] is None\n"
     "assert v[17] == 10 ** 30 and v[18] == -(10 ** 5000)"),
    # the program's globals are read when the tests use them, so they are current
    ("count = 0\ncache = {}\ndef bump():\n    global count\n    count += 1\n    cache[count] = True\n",
     "bump()\nbump()\nassert count == 2\nassert cache == {1: True, 2: True}"),
    # HumanEval style: a check function taking the candidate
    ("def double(x):\n    return 2 * x\n",
     "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2\nassert check(double) is None"),
    # dict views keep their order and kind
    ("def keys():\n    return {'b': 1, 'a': 2}.keys()\ndef items():\n    return {'b': 1}.items()\n",
     "assert list(keys()) == ['b', 'a']\nassert keys() == {'a', 'b'}\nassert list(items()) == [('b', 1)]"),
])
def test_honest_programs_score_as_if_the_tests_ran_beside_them(code, tests):
    s, r = score(code, tests)
    assert s == 1.0, r


def test_what_cannot_cross_fails_the_test_with_a_reason():
    s, r = score("def f(x):\n    return x\n", "import math\nassert f(math) is math")
    assert s == 0.0 and "a module cannot cross" in r.reason, r
    # the program's objects compare by identity only: its own __eq__ never decides a test
    s, r = score("class P:\n    def __init__(s, x):\n        s.x = x\n    def __eq__(s, o):\n        return s.x == o.x\n"
                 "def make():\n    return P(1)\n", "p = make()\nassert p == p\nassert p != make()\nassert p.x == make().x")
    assert s == 1.0, r


def test_the_program_dying_during_a_test_fails_the_run():
    r = run_code("import os\ndef f():\n    os._exit(0)\n", "assert f() == 1", timeout=5)
    assert not r.ok and "exited with status 0 during line 1" in r.reason, r
    r = run_code("def f():\n    return f()\n", "assert f() == 1", timeout=5)
    assert r.ok and r.score == 0.0 and "RecursionError" in r.reason, r


def test_many_calls_stay_fast():
    import time
    t0 = time.monotonic()
    s, r = score("def f(x):\n    return x + 1\n", "for i in range(2000):\n    assert f(i) == i + 1")
    assert s == 1.0 and time.monotonic() - t0 < 5.0, r


def test_split_tests_keeps_decorators_and_semicolons():
    parts = split_tests("import functools\n@functools.lru_cache\ndef g(x):\n    return x\nx = 1; assert g(x) == 1\n")
    assert [p[1] for p in parts] == [False, False, False, True]
    assert parts[1][0].startswith("@functools.lru_cache")
    s, r = score("y = 0", "import functools\n@functools.lru_cache\ndef g(x):\n    return x\nx = 1; assert g(x) == 1\n")
    assert s == 1.0, r


# ------------------------------------------------------------------ pieces without a sandbox run
def test_codec_round_trips_plain_values_and_lends_the_rest():
    worker = W.Codec("ref", "jref", W.JudgeProxy, lambda x: True, take_builtins=True)
    judge = W.Codec("jref", "ref", W.Handle, W.judge_lendable, send_builtins=True)
    dumps, loads = W.JSON
    values = [None, True, 3, -2.5, "é\ud800", [1, [2]], (1, (2,)), {1: "a", (2, 3): [4]}, {1, 2}, frozenset({3}),
              b"\x00", bytearray(b"z"), 1 + 2j, 10 ** 40, -(10 ** 40)]
    for v in values:
        back = judge.decode(loads(dumps(worker.encode(v))))
        assert back == v and type(back) is type(v)
    nan = judge.decode(loads(dumps(worker.encode(float("nan")))))
    assert math.isnan(nan)
    obj = object()
    ref = worker.encode(obj)
    assert ref == {"t": "ref", "v": 1} and worker.lent[1] is obj
    handle = judge.decode(ref)
    assert type(handle) is W.Handle and handle == judge.decode(ref) and handle != obj
    # the judge decodes only exact built-in types; tags for builtins go one way only
    assert worker.decode(judge.encode(len)) is len and worker.decode(judge.encode(str.lower)) is str.lower
    with pytest.raises(W.Broken):
        judge.decode({"t": "builtin", "v": "eval"})
    with pytest.raises(W.Broken):
        judge.decode({"t": "jref", "v": 99})
    with pytest.raises(TypeError, match="a module cannot cross"):
        judge.encode(math)
    deep = []
    for _ in range(W.DEPTH_LIMIT + 5):
        deep = [deep]
    assert worker.encode(deep)["t"] == "ref"


def test_seccomp_program_is_well_formed():
    for arch, names in C.SYSCALLS.items():
        for no_writes in (False, True):
            prog = C.seccomp_program(names, C.seccomp_rules(names, 1234, no_writes))
            assert 10 < len(prog) < 4096
            for i, (code, jt, jf, k) in enumerate(prog):
                if code & 0x07 == 0x05:                  # jumps stay inside the program
                    target = i + 1 + (k if code == 0x05 else max(jt, jf))
                    assert target < len(prog), (arch, i)
            assert prog[-1] == (0x06, 0, 0, 0x7FFF0000)   # default: allow


def headers(path):
    try:
        with open(path) as f:
            return {m.group(1): int(m.group(2)) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)\b", f.read())}
    except OSError:
        return None


@pytest.mark.parametrize("arch, paths", [
    ("x86_64", ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h")),
    ("aarch64", ("/usr/include/asm-generic/unistd.h",))])
def test_syscall_numbers_match_the_kernel_headers(arch, paths):
    path = next((p for p in paths if os.path.exists(p)), None)
    known = headers(path) if path else None
    if not known:
        pytest.skip(f"no kernel headers for {arch} here ({', '.join(paths)})")
    table = {k: v for k, v in C.SYSCALLS[arch].items() if k != "arch"}
    checked = {k: v for k, v in table.items() if k in known}
    assert len(checked) > 0.8 * len(table)
    assert {k: known[k] for k in checked} == checked
    assert max(known.values()) <= C.LAST_KNOWN or os.uname().machine != arch
