"""What crosses between the sandbox's judge and worker: plain values as JSON, length-prefixed on a
pair of pipes, requests answered in turn (rollout/sandbox_harness.py says why). Standard library only,
Python 3.8 or later; the judge decodes whatever the worker sends into exact built-in types and never
calls anything the worker defined."""
import sys

MESSAGE_LIMIT = 4 << 20        # bytes in one message from the worker
DEPTH_LIMIT = 100              # nesting of one plain value
SIZE_LIMIT = MESSAGE_LIMIT // 2    # estimated JSON bytes of one plain value; a larger one is lent
BIG_INT = 1 << 62              # ints at least this large cross as hex (no 4300-digit str limit)


def json_codec():
    """(dumps, loads) on the json package's C accelerator: `import json` costs ~8 ms (it pulls in
    re and enum), a fifth of a run. Falls back to the json package where _json differs."""
    def no_default(o):
        raise TypeError("not JSON: %s" % type(o).__name__)
    try:
        import _json

        class Context:
            strict, object_hook, object_pairs_hook, memo = True, None, None, None
            parse_float, parse_int = float, int
            parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__
        scan = _json.make_scanner(Context())
        enc = _json.make_encoder(None, no_default, _json.encode_basestring_ascii, None, ":", ",", False, False, True)

        def dumps(obj):
            return "".join(enc(obj, 0))

        def loads(text):
            try:
                obj, end = scan(text, 0)
            except StopIteration:
                raise ValueError("not JSON")
            if end != len(text):
                raise ValueError("data after the JSON value")
            return obj
        probe = [1, -2.5, "a\u00e9\ud800", {"t": [None, True, False]}, float("inf")]
        if dumps(probe) != '[1,-2.5,"a\\u00e9\\ud800",{"t":[null,true,false]},Infinity]' or loads(dumps(probe)) != probe:
            raise ValueError("unexpected _json behaviour")
        return dumps, loads
    except Exception:
        import json
        return json.JSONEncoder(separators=(",", ":"), default=no_default).encode, json.loads


JSON = json_codec()


class Broken(BaseException):
    """The channel to the other process failed (it exited, or sent something malformed). A
    BaseException, so a test's `except Exception:` cannot swallow it."""


class ProgramError(Exception):
    """An exception the other side raised whose type has no built-in counterpart here."""


class TooBig(Exception):
    pass


class Codec:
    """Plain values <-> JSON. Objects that are not plain data are lent by reference: `own` is this
    side's tag for what it lends, `peer` the other side's; `proxy(ref)` builds a stand-in for the
    other side's objects. Only exact built-in types come out of `decode`."""

    def __init__(self, own, peer, proxy, lendable, send_builtins=False, take_builtins=False):
        self.own, self.peer, self.proxy, self.lendable = own, peer, proxy, lendable
        self.send_builtins, self.take_builtins = send_builtins, take_builtins
        self.lent = {}
        self.budget = 0              # estimated JSON bytes the value being encoded may still take
        self.channel = None          # the Channel these values travel on (set by Channel)

    def encode(self, x, lend=True):
        self.budget = SIZE_LIMIT
        try:
            return self._enc(x, 0)
        except (TooBig, RecursionError, ValueError, OverflowError):
            if not lend:
                raise TypeError("value too large or too deep to cross between the tests and the program")
            return self.lend(x)

    def lend(self, x):
        if not self.lendable(x):
            raise TypeError("a %s cannot cross between the tests and the program (only plain data, the "
                            "program's own objects and functions defined in the tests)" % type(x).__name__)
        ref = len(self.lent) + 1
        self.lent[ref] = x
        return {"t": self.own, "v": ref}

    def _enc(self, x, depth):
        t = type(x)
        if t is str:
            self.budget -= len(x) if x.isascii() else 6 * len(x)
        elif t is bytes or t is bytearray:
            self.budget -= 2 * len(x)
        self.budget -= 8
        if self.budget < 0 or depth > DEPTH_LIMIT:
            raise TooBig()
        if x is None or t is bool or t is str or t is float:
            return x
        if t is int:
            return x if -BIG_INT < x < BIG_INT else {"t": "int", "v": hex(x)}
        d = depth + 1
        if t is list:
            return [self._enc(v, d) for v in x]
        if t is tuple:
            return {"t": "tuple", "v": [self._enc(v, d) for v in x]}
        if t is dict:
            return {"t": "dict", "v": [[self._enc(k, d), self._enc(v, d)] for k, v in x.items()]}
        if t is set or t is frozenset:
            return {"t": t.__name__, "v": [self._enc(v, d) for v in x]}
        if t is bytes or t is bytearray:
            return {"t": t.__name__, "v": x.hex()}
        if t is complex:
            return {"t": "complex", "v": [x.real, x.imag]}
        if t is self.proxy:
            return {"t": self.peer, "v": x._ref}
        if t is KEYS:
            return {"t": "keys", "v": [self._enc(v, d) for v in x]}
        if t is VALUES:
            return {"t": "values", "v": [self._enc(v, d) for v in x]}
        if t is ITEMS:
            return {"t": "items", "v": [[self._enc(k, d), self._enc(v, d)] for k, v in x]}
        for name, cls in (("Fraction", "fractions"), ("Decimal", "decimal"), ("deque", "collections")):
            mod = sys.modules.get(cls)
            if mod is not None and t is getattr(mod, name, None):
                if name == "Fraction":
                    return {"t": name, "v": [self._enc(x.numerator, d), self._enc(x.denominator, d)]}
                if name == "Decimal":
                    return {"t": name, "v": str(x)}
                return {"t": name, "v": [self._enc(v, d) for v in x], "m": x.maxlen}
        # subclasses of the plain types cross as their base value (an IntEnum as its int, a namedtuple
        # as its tuple, a Counter as its dict), read through the base type's own methods
        if isinstance(x, int):
            return self._enc(int.__int__(x), depth)
        if isinstance(x, float):
            return float.__float__(x)
        if isinstance(x, str):
            return str.__str__(x)
        if isinstance(x, list):
            return [self._enc(v, d) for v in list.__iter__(x)]
        if isinstance(x, tuple):
            return {"t": "tuple", "v": [self._enc(v, d) for v in tuple.__iter__(x)]}
        if isinstance(x, dict):
            return {"t": "dict", "v": [[self._enc(k, d), self._enc(v, d)] for k, v in dict.items(x)]}
        if isinstance(x, (set, frozenset)):
            base = set if isinstance(x, set) else frozenset
            return {"t": base.__name__, "v": [self._enc(v, d) for v in base.__iter__(x)]}
        if self.send_builtins:
            name = builtin_name(x)
            if name:
                return {"t": "builtin", "v": name}
        return self.lend(x)

    def decode(self, j):
        try:
            return self._dec(j)
        except Broken:
            raise
        except BaseException as e:
            raise Broken("malformed value from the other process (%s)" % type(e).__name__)

    def _dec(self, j):
        t = type(j)
        if j is None or t is bool or t is int or t is float or t is str:
            return j
        if t is list:
            return [self._dec(v) for v in j]
        if t is not dict:
            raise ValueError(t)
        tag, v = j["t"], j["v"]
        if tag == "tuple":
            return tuple(self._dec(x) for x in v)
        if tag == "dict":
            return {self._dec(k): self._dec(x) for k, x in v}
        if tag == "set":
            return {self._dec(x) for x in v}
        if tag == "frozenset":
            return frozenset(self._dec(x) for x in v)
        if tag == "int":
            return int(str(v), 16)
        if tag == "bytes":
            return bytes.fromhex(str(v))
        if tag == "bytearray":
            return bytearray.fromhex(str(v))
        if tag == "complex":
            return complex(float(v[0]), float(v[1]))
        if tag == "keys":
            return dict.fromkeys(self._dec(x) for x in v).keys()
        if tag == "values":
            return dict(enumerate(self._dec(x) for x in v)).values()
        if tag == "items":
            return dict((self._dec(k), self._dec(x)) for k, x in v).items()
        if tag == "Fraction":
            import fractions
            return fractions.Fraction(int(self._dec(v[0])), int(self._dec(v[1])))
        if tag == "Decimal":
            import decimal
            return decimal.Decimal(str(v))
        if tag == "deque":
            import collections
            m = j["m"]
            return collections.deque((self._dec(x) for x in v), None if m is None else int(m))
        if tag == "builtin" and self.take_builtins:
            return builtin_named(str(v))
        if tag == self.own and type(v) is int:
            return self.lent[v]
        if tag == self.peer and type(v) is int:
            return self.proxy(self, v)
        raise ValueError(tag)


KEYS, VALUES, ITEMS = type({}.keys()), type({}.values()), type({}.items())
FUNCTION = type(lambda: 0)


def builtin_named(name):
    import builtins
    obj = builtins
    for part in name.split(".", 1):
        obj = getattr(obj, part)
    return obj


def builtin_name(x):
    """'len', 'int', 'str.lower' when x is that builtin: the tests may pass one to the program (a key
    function, a type to convert to), and it crosses by name: the worker uses its own. The judge never
    decodes this tag, so the program cannot hand the tests an `eval`."""
    name = getattr(x, "__qualname__", None)
    if type(name) is not str or name.count(".") > 1:
        return None
    try:
        return name if builtin_named(name) is x else None
    except AttributeError:
        return None
MUTABLE = (list, dict, set, bytearray)


def restore(target, state):
    """Copy a mutated argument's new contents back into the caller's object (same type only)."""
    if isinstance(target, list) and type(state) is list or isinstance(target, bytearray) and type(state) is bytearray:
        target[:] = state
    elif isinstance(target, dict) and type(state) is dict or isinstance(target, set) and type(state) is set:
        target.clear()
        target.update(state)
    else:
        raise Broken("an argument came back as a %s" % type(state).__name__)


class Channel:
    """Length-prefixed JSON messages over a pair of pipes, requests answered in strict turn. While it
    waits for its answer a side serves the other side's requests (callbacks), so calls nest."""

    def __init__(self, rfd, wfd, codec, serve, limit):
        import os
        import struct
        self.rfd, self.wfd, self.codec, self.serve = rfd, wfd, codec, serve
        self.read, self.write, self.pack, self.unpack = os.read, os.write, struct.pack, struct.unpack
        self.dumps, self.loads = JSON
        self.limit = limit
        self.broken = None
        codec.channel = self

    def _fail(self, why):
        if self.broken is None:
            self.broken = why
        raise Broken(self.broken)

    def send(self, msg):
        if self.broken is not None:
            raise Broken(self.broken)
        data = self.dumps(msg).encode("utf-8", "surrogatepass")
        data = self.pack(">I", len(data)) + data
        try:
            while data:
                data = data[self.write(self.wfd, data):]
        except OSError as e:
            self._fail("the other process closed the channel (%s)" % e.strerror)

    def _read(self, n):
        chunks = []
        try:
            while n:
                c = self.read(self.rfd, min(n, 1 << 20))
                if not c:
                    self._fail("eof")
                chunks.append(c)
                n -= len(c)
        except OSError as e:
            self._fail("the other process closed the channel (%s)" % e.strerror)
        return b"".join(chunks)

    def recv(self):
        if self.broken is not None:
            raise Broken(self.broken)
        n = self.unpack(">I", self._read(4))[0]
        if n > self.limit:
            self._fail("a message of %d bytes (limit %d)" % (n, self.limit))
        try:
            msg = self.loads(self._read(n).decode("utf-8", "surrogatepass"))
            if type(msg) is not list or not msg or type(msg[0]) is not str:
                raise ValueError()
        except (ValueError, RecursionError, UnicodeDecodeError):
            self._fail("a malformed message")
        return msg

    def request(self, msg):
        self.send(msg)
        while True:
            m = self.recv()
            if m[0] == "ok" and len(m) == 3:
                return m
            if m[0] == "err" and len(m) == 3:
                raise remote_error(m[1], m[2])
            self.send(self.serve(m))

    def call(self, ref, args, kwargs):
        enc = self.codec.encode
        ok = self.request(["call", ref, [enc(a) for a in args], {str(k): enc(v) for k, v in kwargs.items()}])
        back = ok[2]
        try:
            for i, state in back.items():
                target = args[int(i)] if i.isdigit() else kwargs[i[1:]]
                if isinstance(target, MUTABLE):
                    restore(target, self.codec.decode(state))
        except Broken as e:
            self._fail(str(e))
        except Exception:
            self._fail("a malformed call reply")
        return self.codec.decode(ok[1])


def remote_error(name, message):
    import builtins
    cls = getattr(builtins, str(name), None)
    text = str(message)[:500]
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls(text)
    return ProgramError("%s: %s" % (str(name)[:100], text) if text else str(name)[:100])


def serve_call(codec, fn, args, kwargs):
    """Run fn(*args, **kwargs) for the other side; reply with the result and the new contents of
    mutable arguments."""
    args = [codec.decode(a) for a in args]
    kwargs = {str(k): codec.decode(v) for k, v in kwargs.items()}
    result = fn(*args, **kwargs)
    back = {}
    for i, a in enumerate(args):
        if type(a) in MUTABLE:
            back[str(i)] = codec.encode(a, lend=False)
    for k, a in kwargs.items():
        if type(a) in MUTABLE:
            back["=" + k] = codec.encode(a, lend=False)
    return ["ok", codec.encode(result), back]


def error_reply(e):
    try:
        return ["err", type(e).__name__, str(e)[:500]]
    except BaseException:
        return ["err", "Exception", "an exception"]


class Handle:
    """The judge's stand-in for an object that lives in the worker. Every operation is a request;
    what comes back is plain data or another Handle. No __contains__ and no ordering: `x in h`
    iterates h and compares here; `h == v` is identity (same worker object)."""
    __slots__ = ("_codec", "_ref")

    def __init__(self, codec, ref):
        object.__setattr__(self, "_codec", codec)
        object.__setattr__(self, "_ref", ref)

    def _ask(self, op, *rest):
        return self._codec.decode(self._codec.channel.request([op, self._ref] + list(rest))[1])

    def __call__(self, *args, **kwargs):
        return self._codec.channel.call(self._ref, args, kwargs)

    def __getattr__(self, name):
        return self._ask("getattr", name)

    def __setattr__(self, name, value):
        self._ask("setattr", name, self._codec.encode(value))

    def __getitem__(self, key):
        return self._ask("getitem", self._codec.encode(key))

    def __setitem__(self, key, value):
        self._ask("setitem", self._codec.encode(key), self._codec.encode(value))

    def __len__(self):
        return self._ask("len")

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __bool__(self):
        return self._ask("bool")

    def __str__(self):
        return self._ask("str")

    def __repr__(self):
        return self._ask("repr")

    def __int__(self):
        return self._ask("int")

    def __float__(self):
        return self._ask("float")

    def __index__(self):
        return self._ask("index")

    def __eq__(self, other):
        return type(other) is Handle and other._ref == self._ref

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(("worker object", self._ref))


class JudgeProxy:
    """The worker's stand-in for a function the tests lent: calling it runs it in the judge."""
    __slots__ = ("_codec", "_ref")

    def __init__(self, codec, ref):
        self._codec, self._ref = codec, ref

    def __call__(self, *args, **kwargs):
        return self._codec.channel.call(self._ref, args, kwargs)


def judge_lendable(x):
    """What the tests may hand to the program: their own functions and classes (a key function, a
    callback), by reference; never a builtin like open or eval."""
    f = getattr(x, "__func__", x)
    if isinstance(f, FUNCTION):
        return f.__code__.co_filename == "tests.py"
    return isinstance(x, type) and getattr(x, "__module__", None) == "tests"
