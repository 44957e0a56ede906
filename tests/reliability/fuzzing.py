"""A protobuf fuzzer driven by the descriptors of ``backend.proto``: the cases it sends.

Cases are encoded on the wire by hand (``tests.reliability.wire``) from each message's descriptor, not with the protobuf
API, so they can hold what the API refuses to build: invalid UTF-8 in string fields, enums
outside their range, packed and unpacked repeated scalars, unknown and mistyped fields. Three
kinds of case per rpc:

* ``mutant``: the rpc's valid seed request with one to three fields overwritten by edge values
  (protobuf's last-one-wins makes appending a field an override), so validation passes on the
  other fields and the mutated one is really exercised;
* ``random``: every field of the request drawn independently (edge values per type, NaN/inf,
  huge repeated fields, oversize strings, hostile JSON in string fields, wrong enums);
* ``frame``: a malformed frame (truncated, random bytes, bad tags, overlong varints, a length
  past the end, deeply nested groups).

plus the *sweep* (``sweep_cases``): every field of the seed request overwritten by each of its
type's most hostile values once. ``tests.reliability.fuzz_runner`` sends the cases and checks
the replies.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from inferd.proto import backend_pb2 as pb
from inferd.protocol import Rpc
from tests.reliability.wire import (
    _INT_RANGES,
    WT_EGROUP,
    WT_LEN,
    WT_SGROUP,
    WT_VARINT,
    T,
    encode_scalar,
    is_repeated,
    length_delimited,
    tag,
    varint,
)

# ---- edge values -----------------------------------------------------------------------------
_FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, math.nan, math.inf, -math.inf, 3.4e38, -3.4e38,
                1e-45, 1e-30, 1e6, 100.0)
_DOUBLE_EXTRA = (1e308, -1e308, 5e-324)


def _deep_json(rng: random.Random) -> str:
    n = rng.choice((65, 1000, 50_000))
    opener = rng.choice(("[", '{"a":'))
    return opener * n


def _big_json(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return "[" + ",".join("1" for _ in range(rng.choice((1000, 200_000)))) + "]"
    if kind == 1:
        return '{"' + "x" * 100 + '": ' + "1e999" + "}"
    if kind == 2:
        return '{"1": NaN, "2": Infinity, "3": -Infinity}'
    if kind == 3:
        return '[{"type": "function", "function": {"name": "' + "f" * 5000 + '", "parameters": {"type": "object"}}}]'
    return '{"type": "object", "properties": {"a": {"$ref": "#"}}}'


_HOSTILE_TEXT = (
    "", "a", " ", "hello world", "日本語 🚀 ÿ", "\x00", "a\x00b", "\r\n\t", "%s%n%x{0}{}", "\u202e\u200b",
    "../../../../etc/passwd", "/etc/passwd", "/proc/self/mem", "store://../../../tmp/x", "store://",
    "~/x", "..", "/", "\\\\server\\share", "true", "false", "null", "-1", "NaN", "1e999",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% include '/etc/passwd' %}",
    "{{ cycler.__init__.__globals__.os.system('id') }}", "root ::= [a-z]+", "root ::= root",
    "key:value", "parallel:100000000", "threads:1000000", "n_ubatch:0", "chat_template:{{ 1/0 }}",
    "queue:-5", "parallel:", ":", "=", "ann:bogus", "compact_bytes:-1",
)


def edge_string(rng: random.Random, max_bytes: int) -> str | bytes:
    """A string-field value: hostile text, hostile JSON, an oversize run, or (rarely) invalid UTF-8.

    Invalid UTF-8 makes the whole message undecodable, so it is kept rare here (the ``frame``
    cases send it on purpose): most random messages must decode to reach the backend.
    """
    kind = rng.randrange(30)
    if kind < 12:
        return rng.choice(_HOSTILE_TEXT)
    if kind < 16:
        return _deep_json(rng)
    if kind < 20:
        return _big_json(rng)
    if kind == 20:
        return rng.choice((b"\xff\xfe", b"\xc3\x28", b"abc\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"))
    if kind < 24:
        return "x" * rng.choice((1 << 10, 1 << 16, min(max_bytes, 1 << 20), 2 * max_bytes))
    if kind < 27:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 64)))
    return " ".join(rng.choice(("the", "cat", "sat", "on", "a", "mat", "<s>", "</s>", "<|im_end|>"))
                    for _ in range(rng.randrange(1, 40)))


def edge_bytes(rng: random.Random, max_bytes: int) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return b""
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if kind == 2:
        return b"\xff" * rng.choice((1, 1000, min(max_bytes, 1 << 20)))
    if kind == 3:
        return b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(rng.randrange(256) for _ in range(32))
    s = edge_string(rng, max_bytes)
    return s.encode("utf-8") if isinstance(s, str) else s


def edge_scalar(rng: random.Random, fd: FieldDescriptor, max_bytes: int) -> Any:
    t = fd.type
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        return rng.choice((0, 1, -1 if lo < 0 else 2, lo, hi, 2, 7, 64, 1000, 2**16, 10**6,
                           rng.randint(lo, hi), rng.randint(-5, 5) if lo < 0 else rng.randint(0, 10)))
    if t == T.TYPE_BOOL:
        return rng.choice((0, 1, 1, 2))  # 2: a non-canonical "true" varint
    if t == T.TYPE_FLOAT:
        return rng.choice(_FLOAT_EDGES + (rng.uniform(-10, 10),))
    if t == T.TYPE_DOUBLE:
        return rng.choice(_FLOAT_EDGES + _DOUBLE_EXTRA + (rng.uniform(-10, 10),))
    if t == T.TYPE_ENUM:
        valid = [v.number for v in fd.enum_type.values]
        return rng.choice(valid + [max(valid) + 1, 99, -1, 2**31 - 1])  # proto3 enums are open
    if t == T.TYPE_STRING:
        return edge_string(rng, max_bytes)
    if t == T.TYPE_BYTES:
        return edge_bytes(rng, max_bytes)
    raise ValueError(f"unexpected scalar type {t}")


def encode_field(rng: random.Random, fd: FieldDescriptor, depth: int, max_bytes: int) -> bytes:
    """One field with a fuzzed value (repeated fields: 0..huge elements, packed or not)."""
    if fd.type == T.TYPE_MESSAGE:
        count = _repeat_count(rng) if is_repeated(fd) else 1
        one = [encode_message(rng, fd.message_type, depth + 1, max_bytes) for _ in range(min(count, 8))]
        if one:  # cap the total near 2 * max_bytes: past the server's limit, not past this machine's memory
            count = min(count, max(1, 2 * max_bytes // max(1, max(len(m) for m in one))))
        items = [one[i % len(one)] for i in range(count)] if one else []
        return b"".join(length_delimited(fd.number, m) for m in items)
    if fd.type == T.TYPE_GROUP:  # not in proto3; kept for completeness
        return b""
    if not is_repeated(fd):
        wt, data = encode_scalar(fd.type, edge_scalar(rng, fd, max_bytes))
        return tag(fd.number, wt) + data
    count = _repeat_count(rng)
    if fd.type in (T.TYPE_STRING, T.TYPE_BYTES):
        values = [edge_scalar(rng, fd, 4096) for _ in range(min(count, 16))]
        longest = max((len(v) for v in values), default=1)
        count = min(count, 4096, max(1, 2 * max_bytes // max(1, longest)))
        return b"".join(tag(fd.number, WT_LEN) + encode_scalar(fd.type, values[i % len(values)])[1]
                        for i in range(count))
    values = [edge_scalar(rng, fd, max_bytes) for _ in range(min(count, 64))]
    encoded = [encode_scalar(fd.type, values[i % len(values)]) for i in range(count)] if values else []
    if rng.random() < 0.7:  # packed, proto3's default
        payload = b"".join(data for _, data in encoded)
        return length_delimited(fd.number, payload)
    return b"".join(tag(fd.number, wt) + data for wt, data in encoded)


def _repeat_count(rng: random.Random) -> int:
    return rng.choice((0, 1, 2, 3, 5, 100, 1000, 100_000))


def encode_message(rng: random.Random, desc: Descriptor, depth: int = 0, max_bytes: int = 1 << 20) -> bytes:
    """A random instance of ``desc``: each field set with probability 1/2 (deeper: less often)."""
    if depth > 3:
        return b""
    p = 0.5 / (depth + 1)
    parts = [encode_field(rng, fd, depth, max_bytes) for fd in desc.fields if rng.random() < p]
    parts.sort(key=len)
    while parts and sum(map(len, parts)) > 2 * max_bytes:  # past the server's limit, within reason
        parts.pop()
    rng.shuffle(parts)
    return b"".join(parts)


def malformed_frame(rng: random.Random, valid: bytes) -> tuple[str, bytes]:
    """A frame that is not a valid encoding of any message (or barely is)."""
    kind = rng.randrange(9)
    if kind == 0 and len(valid) > 1:
        return "truncated", valid[: rng.randrange(1, len(valid))]
    if kind == 1:
        return "random-bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 256)))
    if kind == 2:
        return "field-zero", b"\x00\x01" + valid
    if kind == 3:
        return "wire-type-7", b"\x0f\x01" + valid
    if kind == 4:
        return "overlong-varint", b"\x08" + b"\xff" * 11 + b"\x01"
    if kind == 5:
        return "length-past-end", valid + tag(1, WT_LEN) + varint(2**31) + b"abc"
    if kind == 6:
        depth = rng.choice((100, 2000))
        return "nested-groups", tag(9999, WT_SGROUP) * depth + tag(9999, WT_EGROUP) * depth
    if kind == 7:
        return "unterminated-group", valid + tag(77, WT_SGROUP) + b"\x08\x01"
    return "invalid-utf8-string", valid + _invalid_utf8_in_a_string_field(rng)


def _invalid_utf8_in_a_string_field(rng: random.Random) -> bytes:
    # Field 1 of most request messages; any string field would do: a fixed number keeps
    # this usable for every rpc (it is unknown, or a string, or a mistyped field).
    return length_delimited(rng.choice((1, 2, 3)), b"\xff\xfe\xc3\x28")


# ---- seeds: a valid request per message type (what the mutants start from) -------------------
SEEDS: dict[str, Any] = {
    "PredictOptions": pb.PredictOptions(Prompt="Hello", Tokens=4, Temperature=0.0, Threads=1,
                                        Embeddings="hello world"),
    "StoresSetOptions": pb.StoresSetOptions(Keys=[pb.StoresKey(Floats=[0.1, 0.2, 0.3])],
                                            Values=[pb.StoresValue(Bytes=b"v")]),
    "StoresGetOptions": pb.StoresGetOptions(Keys=[pb.StoresKey(Floats=[0.1, 0.2, 0.3])]),
    "StoresDeleteOptions": pb.StoresDeleteOptions(Keys=[pb.StoresKey(Floats=[0.3, 0.2, 0.1])]),
    "StoresFindOptions": pb.StoresFindOptions(Key=pb.StoresKey(Floats=[0.1, 0.2, 0.3]), TopK=2),
    "RerankRequest": pb.RerankRequest(query="cats", documents=["a cat", "a car"], top_n=2),
    "TokenizationResponse": pb.TokenizationResponse(),
}


def seed_bytes(rpc: Rpc, load: pb.ModelOptions | None) -> bytes:
    name = rpc.request.DESCRIPTOR.name
    if name == "ModelOptions" and load is not None:
        return load.SerializeToString()
    seed = SEEDS.get(name)
    if seed is None:
        seed = rpc.request()
    return seed.SerializeToString()


@dataclass(frozen=True)
class Case:
    kind: str  # mutant | random | frame:<what> | sweep:<field>
    data: bytes


# ---- the sweep: every field of a request gets each of its type's most hostile values once ----------
#: String fields that carry JSON (parsed by a backend): they get the hostile JSON documents.
JSON_FIELDS = frozenset({"LogitBias", "Grammar", "Tools", "ToolChoice", "tool_calls", "Metadata"})
#: ModelOptions fields the quick sweep loads with absurd values (sizes a backend must bound).
SIZE_FIELDS = frozenset({"Threads", "ContextSize", "NBatch", "Options"})
_HOSTILE_JSON = ("[" * 50_000, '{"a":' * 65 + "1" + "}" * 65, "[" + "1," * 300_000 + "1]", '{"1": NaN}',
                 "{not json", '{"type": "object", "properties": {"a": {"$ref": "#"}}}')


def _sweep_values(fd: FieldDescriptor, max_bytes: int, quick: bool = False) -> list[bytes]:
    """Encoded hostile values of one field (one encoding per value, as a field to append).

    ``quick`` keeps the ones that find missing bounds (NaN, a negative, a valid value that must
    really run; the deepest and the largest JSON, and invalid JSON) to keep ``make test`` short.
    """
    t = fd.type
    if fd.type == T.TYPE_MESSAGE:
        if is_repeated(fd):
            one = length_delimited(fd.number, b"")
            return [one * min(100_000, 2 * max_bytes // max(1, len(one)))]
        return [length_delimited(fd.number, tag(9999, WT_VARINT) + varint(1))]  # unknown field inside
    if is_repeated(fd):
        if t in (T.TYPE_STRING, T.TYPE_BYTES):
            return [(tag(fd.number, WT_LEN) + varint(1) + b"a") * 100_000]
        floating = t in (T.TYPE_FLOAT, T.TYPE_DOUBLE)
        wt, data = encode_scalar(t, 1.5 if floating else 1)
        out = [length_delimited(fd.number, data * 100_000)]
        if floating:  # NaN/inf inside an otherwise valid vector
            out += [length_delimited(fd.number, encode_scalar(t, v)[1] + data * 2) for v in (math.nan, math.inf)]
        return out
    if t in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
        # 0.5 and 1.5 are valid for most float options: they must run for real, not crash
        # (a repeat penalty of 1.1 once answered INTERNAL from a wrong native signature).
        values: list[Any] = [math.nan, -1.0, 1.5] if quick else [math.nan, math.inf, -math.inf, -1.0, 0.5, 1.5]
    elif t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        values = [hi, lo if lo < 0 else hi - 1, -1 if lo < 0 else 0]
    elif t == T.TYPE_BOOL:
        values = [2]
    elif t == T.TYPE_ENUM:
        values = [99, -1]
    elif t == T.TYPE_STRING:
        values = list(_HOSTILE_JSON[:3] if quick else _HOSTILE_JSON) if fd.name in JSON_FIELDS else [
            "../../../../etc/passwd", "\x00", "{{ ''.__class__ }}", "x" * (1 << 20)]
        if not quick:
            values.append(b"\xff\xfe")
    else:  # bytes
        values = [b"\xff\xfe\x00", bytes(range(256)) * 4096]
    out = []
    for v in values:
        wt, data = encode_scalar(t, v)
        out.append(tag(fd.number, wt) + data)
    return out


def sweep_cases(rpc: Rpc, load: pb.ModelOptions | None = None, quick: bool = False,
                max_bytes: int = 1 << 20) -> list[Case]:
    """The seed request with one field overwritten by each of its hostile values, for every field.

    ``quick``: only JSON-carrying strings (also inside ``Messages``), floats (NaN/inf and two
    valid values) and, for ModelOptions, one absurd value of each size (Threads, ContextSize,
    NBatch, ``key:value`` Options): the fields where a missing bound hides. The full sweep
    (``make fuzz``) covers every field.
    """
    seed = seed_bytes(rpc, load)
    desc_name = rpc.request.DESCRIPTOR.name
    cases = []
    for fd in rpc.request.DESCRIPTOR.fields:
        if fd.type == T.TYPE_MESSAGE and not fd.message_type.GetOptions().map_entry:
            for inner in fd.message_type.fields:  # one level down: Messages[0].tool_calls...
                if quick and not (inner.name in JSON_FIELDS or inner.type in (T.TYPE_FLOAT, T.TYPE_DOUBLE)):
                    continue
                if inner.type == T.TYPE_MESSAGE:
                    continue
                for value in _sweep_values(inner, max_bytes, quick):
                    cases.append(Case(f"sweep:{fd.name}.{inner.name}", seed + length_delimited(fd.number, value)))
            if quick:
                continue
        elif quick and desc_name == "ModelOptions":
            if fd.name not in SIZE_FIELDS:
                continue
        elif quick and not (fd.name in JSON_FIELDS or fd.type in (T.TYPE_FLOAT, T.TYPE_DOUBLE)):
            continue
        if quick and desc_name == "ModelOptions":  # one absurd size each: every value is a real load
            values = ([tag(fd.number, WT_LEN) + encode_scalar(T.TYPE_STRING, o)[1] for o in ABSURD_OPTIONS]
                      if fd.name == "Options" else [tag(fd.number, WT_VARINT) + varint(2**31 - 1)])
        else:
            values = _sweep_values(fd, max_bytes, quick)
        for value in values:
            cases.append(Case(f"sweep:{fd.name}", seed + value))
    return cases


#: ``key:value`` load options with absurd sizes, as LocalAI would pass from a model's YAML.
ABSURD_OPTIONS = ("parallel:100000000", "threads:1000000", "workers:1000000", "max_batch:1000000000",
                  "queue:1000000000")


def generate(rng: random.Random, rpc: Rpc, load: pb.ModelOptions | None = None,
             max_bytes: int = 1 << 20) -> Case:
    """One case for ``rpc``: 45 % mutants, 35 % random messages, 20 % malformed frames."""
    desc = rpc.request.DESCRIPTOR
    seed = seed_bytes(rpc, load)
    roll = rng.random()
    if roll < 0.45 and desc.fields:
        fields = rng.sample(list(desc.fields), k=min(len(desc.fields), rng.randint(1, 3)))
        return Case("mutant", seed + b"".join(encode_field(rng, fd, 1, max_bytes) for fd in fields))
    if roll < 0.80:
        return Case("random", encode_message(rng, desc, 0, max_bytes))
    what, data = malformed_frame(rng, seed)
    return Case(f"frame:{what}", data)
