"""proxy.commands: the static Redis 7.0 command table and key finding, checked against a real
redis-server (COMMAND, COMMAND GETKEYS and the errors commands reply themselves)."""
from __future__ import annotations

import ast
import dataclasses
import os
import random
import shlex
import socket
import subprocess
import sys

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import command_table
from proxy.admission import DISPATCH
from proxy.commands import (
    ALL_COMMANDS,
    COMMANDS,
    CommandArgsError,
    CommandSpec,
    key_indices,
    shard_channel_indices,
)
from tests.procs import HOST, cleanup, start_redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- live server


class Client:
    """Minimal RESP client keeping Redis's error text intact (e.g. "ERR syntax error")."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.reader = hiredis.Reader()

    def close(self) -> None:
        self.sock.close()

    def pipeline(self, commands: list[list[bytes]]) -> list:
        payload = []
        for args in commands:
            payload.append(b"*%d\r\n" % len(args))
            payload.extend(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        self.sock.sendall(b"".join(payload))
        replies: list = []
        while len(replies) < len(commands):
            reply = self.reader.gets()
            if reply is False:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                self.reader.feed(chunk)
            else:
                replies.append(reply)
        return replies

    def call(self, *args: bytes | str):
        return self.pipeline([[a if isinstance(a, bytes) else a.encode() for a in args]])[0]


@pytest.fixture(scope="module")
def live():
    proc = start_redis()
    client = Client(proc.port)
    try:
        client.port = proc.port  # type: ignore[attr-defined]
        yield client
    finally:
        client.close()
        cleanup([proc])


def spec_of(argv: list[bytes]) -> CommandSpec | None:
    """The spec `proxy.admission.decide` checks `argv` against: the command's, by its
    upper-cased name, or a known subcommand's in its place; None for an unknown command."""
    entry = DISPATCH.get(argv[0].upper()) if argv else None
    if entry is None:
        return None
    spec = entry[1]
    if spec.subcommands is not None and len(argv) > 1:
        return spec.subcommands.get(argv[1].upper(), spec)
    return spec


def arity_ok(spec: CommandSpec, argc: int) -> bool:
    """Redis's arity rule, as decide() applies it."""
    return spec.min_argc <= argc <= spec.max_argc


def argv_of(line: str) -> list[bytes]:
    return [a.encode() for a in shlex.split(line)]


def getkeys(live: Client, argv: list[bytes]):
    return live.pipeline([[b"COMMAND", b"GETKEYS", *argv]])[0]


# --------------------------------------------------------------------------- samples

# At least one sample per key-bearing command of Redis 7.0 (enforced below), with the
# multi-key, numkeys, keyword and option forms that move keys around.
SAMPLES = [
    # strings
    "APPEND k v", "DECR k", "DECRBY k 2", "GET k", "GETDEL k", "GETEX k PX 10", "GETRANGE k 0 1",
    "GETSET k v", "INCR k", "INCRBY k 3", "INCRBYFLOAT k 1.5", "MGET a b c", "MSET a 1 b 2 c 3",
    "MSETNX a 1 b 2", "PSETEX k 100 v", "SET k v", "SET k v NX GET", "SET k v EX 10 KEEPTTL",
    "SETEX k 10 v", "SETNX k v", "SETRANGE k 0 v", "STRLEN k", "SUBSTR k 0 1", "LCS a b LEN",
    # bits and hyperloglog
    "BITCOUNT k 0 1", "BITFIELD k GET u8 0 SET u8 0 1", "BITFIELD_RO k GET u8 0",
    "BITOP AND dest a b c", "BITOP NOT dest src", "BITPOS k 1 0", "GETBIT k 7", "SETBIT k 7 1",
    "PFADD hll a b", "PFCOUNT h1 h2 h3", "PFMERGE dest s1 s2", "PFDEBUG GETREG hll",
    # generic keyspace
    "COPY src dst DB 0 REPLACE", "DEL a b c", "DUMP k", "EXISTS a b", "EXPIRE k 10 NX",
    "EXPIREAT k 100", "EXPIRETIME k", "MOVE k 1", "PERSIST k", "PEXPIRE k 10", "PEXPIREAT k 10",
    "PEXPIRETIME k", "PTTL k", "RENAME old new", "RENAMENX old new", "RESTORE k 0 payload REPLACE",
    "RESTORE-ASKING k 0 payload", "TOUCH a b", "TTL k", "TYPE k", "UNLINK a b c", "WATCH a b",
    "OBJECT ENCODING k", "object encoding k", "OBJECT FREQ k", "OBJECT IDLETIME k",
    "OBJECT REFCOUNT k", "MEMORY USAGE k SAMPLES 5", "memory usage k",
    # SORT: BY/GET patterns are not keys, the (last) STORE destination is
    "SORT k", "SORT k BY w_* GET # GET o_* STORE dest", "SORT k LIMIT 0 10 ALPHA STORE d1 STORE d2",
    "SORT k STORE", "SORT k LIMIT STORE x STORE d", "sort k store d", "SORT_RO k BY w_* GET #",
    # lists, including blocking forms
    "BLMOVE src dst LEFT RIGHT 0", "BLMPOP 0 2 l1 l2 LEFT COUNT 2", "BLPOP l1 l2 0", "BRPOP l1 0",
    "BRPOPLPUSH src dst 0", "LINDEX l 0", "LINSERT l BEFORE p v", "LLEN l", "LMOVE src dst LEFT LEFT",
    "LMPOP 3 l1 l2 l3 RIGHT", "LMPOP 1 l LEFT COUNT 5", "LPOP l 2", "LPOS l v RANK 1", "LPUSH l a b",
    "LPUSHX l a", "LRANGE l 0 -1", "LREM l 0 v", "LSET l 0 v", "LTRIM l 0 1", "RPOP l",
    "RPOPLPUSH src dst", "RPUSH l a", "RPUSHX l a",
    # sets
    "SADD s a b", "SCARD s", "SDIFF s1 s2 s3", "SDIFFSTORE d s1 s2", "SINTER s1 s2",
    "SINTERCARD 2 s1 s2 LIMIT 5", "SINTERCARD 1 s", "SINTERSTORE d s1 s2", "SISMEMBER s a",
    "SMEMBERS s", "SMISMEMBER s a b", "SMOVE src dst m", "SPOP s 2", "SRANDMEMBER s 2", "SREM s a",
    "SSCAN s 0 MATCH x*", "SUNION s1 s2", "SUNIONSTORE d s1 s2 s3",
    # sorted sets, numkeys forms included
    "BZMPOP 0 2 z1 z2 MIN COUNT 1", "BZPOPMAX z1 z2 0", "BZPOPMIN z 0", "ZADD z 1 a 2 b",
    "ZCARD z", "ZCOUNT z 0 1", "ZDIFF 2 z1 z2 WITHSCORES", "ZDIFFSTORE d 2 z1 z2", "ZINCRBY z 1 a",
    "ZINTER 3 z1 z2 z3 WEIGHTS 1 2 3", "ZINTERCARD 2 z1 z2 LIMIT 1", "ZINTERSTORE d 2 z1 z2 AGGREGATE MIN",
    "ZLEXCOUNT z - +", "ZMPOP 2 z1 z2 MAX", "ZMSCORE z a b", "ZPOPMAX z", "ZPOPMIN z 2",
    "ZRANDMEMBER z 2", "ZRANGE z 0 -1 REV", "ZRANGEBYLEX z - +", "ZRANGEBYSCORE z 0 1",
    "ZRANGESTORE dst src 0 -1", "ZRANK z a", "ZREM z a", "ZREMRANGEBYLEX z - +",
    "ZREMRANGEBYRANK z 0 1", "ZREMRANGEBYSCORE z 0 1", "ZREVRANGE z 0 1", "ZREVRANGEBYLEX z + -",
    "ZREVRANGEBYSCORE z 1 0", "ZREVRANK z a", "ZSCAN z 0", "ZSCORE z a", "ZUNION 2 z1 z2",
    "ZUNIONSTORE d 3 z1 z2 z3 WEIGHTS 1 1 1", "zunionstore d 1 z",
    # hashes
    "HDEL h f1 f2", "HEXISTS h f", "HGET h f", "HGETALL h", "HINCRBY h f 1", "HINCRBYFLOAT h f 1.5",
    "HKEYS h", "HLEN h", "HMGET h f1 f2", "HMSET h f v", "HRANDFIELD h 2", "HSCAN h 0", "HSET h f v g w",
    "HSETNX h f v", "HSTRLEN h f", "HVALS h",
    # streams, including XREAD/XREADGROUP STREAMS and the XINFO/XGROUP subcommands
    "XACK s g 1-0 2-0", "XADD s * f v", "XAUTOCLAIM s g c 10 0", "XCLAIM s g c 10 1-0", "XDEL s 1-0",
    "XLEN s", "XPENDING s g", "XRANGE s - +", "XREVRANGE s + -", "XSETID s 1-0", "XTRIM s MAXLEN 10",
    "XREAD STREAMS s1 s2 0 0", "XREAD COUNT 10 BLOCK 5 STREAMS s 0", "xread streams streams 0",
    "XREAD STREAMS a b c", "XREADGROUP GROUP g c COUNT 1 STREAMS s1 s2 > >",
    "XREADGROUP GROUP streams c NOACK STREAMS s >", "XINFO STREAM s FULL", "XINFO GROUPS s",
    "XINFO CONSUMERS s g", "XGROUP CREATE s g $ MKSTREAM", "XGROUP CREATECONSUMER s g c",
    "XGROUP DELCONSUMER s g c", "XGROUP DESTROY s g", "XGROUP SETID s g $",
    # geo, including STORE/STOREDIST
    "GEOADD g 13.3 38.1 p", "GEODIST g a b km", "GEOHASH g a b", "GEOPOS g a",
    "GEORADIUS g 15 37 200 km", "GEORADIUS g 15 37 200 km WITHDIST STORE dest",
    "GEORADIUS g 15 37 200 km STOREDIST dd", "GEORADIUS g 15 37 200 km STORE a STOREDIST b",
    "GEORADIUS g 15 37 200 km STORE", "GEORADIUSBYMEMBER g m 10 km STORE dest",
    "GEORADIUSBYMEMBER_RO g m 10 km", "GEORADIUS_RO g 15 37 200 km",
    "GEOSEARCH g FROMMEMBER m BYRADIUS 10 km", "GEOSEARCHSTORE dst src FROMMEMBER m BYBOX 1 1 km",
    # scripting and functions
    "EVAL 'return 1' 2 k1 k2 a1", "EVAL 'return 1' 0", "EVAL_RO 'return 1' 1 k",
    "EVALSHA e0e1f9fabfc9d4800c877a703b823ac0578ff8db 3 a b c",
    "EVALSHA_RO e0e1f9fabfc9d4800c877a703b823ac0578ff8db 1 a x", "FCALL f 2 a b x", "FCALL f 0",
    "FCALL_RO f 1 a",
    # MIGRATE: single key, or the keys after KEYS when the key argument is empty
    "MIGRATE h 6379 k 0 5000", "MIGRATE h 6379 k 0 5000 COPY REPLACE",
    "MIGRATE h 6379 '' 0 5000 KEYS a b c", "MIGRATE h 6379 '' 0 5000 AUTH pw KEYS a b",
    "MIGRATE h 6379 '' 0 5000 AUTH2 u pw KEYS a", "MIGRATE h 6379 '' 0 5000 REPLACE AUTH keys KEYS a",
]


@pytest.mark.parametrize("line", SAMPLES)
def test_key_indices_match_command_getkeys(live, line):
    argv = argv_of(line)
    spec = spec_of(argv)
    assert spec is not None
    expected = getkeys(live, argv)
    assert not isinstance(expected, hiredis.ReplyError), expected
    got = key_indices(spec, argv)
    assert all(0 < i < len(argv) for i in got)
    assert [argv[i] for i in got] == expected


def test_pfmerge_without_source_is_routed_by_its_destination(live):
    # The one deliberate difference from COMMAND GETKEYS: Redis 7.0 finds no key here (the
    # empty source range invalidates the key specs) although the command writes dest.
    argv = argv_of("PFMERGE dest")
    assert str(getkeys(live, argv)) == "ERR Invalid arguments specified for command"
    assert key_indices(spec_of(argv), argv) == [1]
    argv = argv_of("PFMERGE dest a b")
    assert key_indices(spec_of(argv), argv) == [1, 2, 3]
    assert getkeys(live, argv) == [b"dest", b"a", b"b"]


def test_samples_cover_every_key_bearing_command():
    covered = {spec_of(argv_of(line)).name for line in SAMPLES}
    key_bearing = {name for name, spec in ALL_COMMANDS.items() if spec.has_keys}
    assert key_bearing - covered == set()


def test_movable_commands_find_keys_by_their_arguments():
    cases = {
        "EVAL s 2 k1 k2 arg": [3, 4],
        "FCALL f 1 k arg": [3],
        "ZUNIONSTORE d 2 a b WEIGHTS 1 2": [1, 3, 4],
        "ZINTER 2 a b": [2, 3],
        "SINTERCARD 2 a b LIMIT 1": [2, 3],
        "BLMPOP 0 2 a b LEFT": [3, 4],
        "BZMPOP 1 1 z MIN": [3],
        "XREAD COUNT 2 STREAMS a b 0 0": [4, 5],
        "XREADGROUP GROUP g c STREAMS a >": [5],
        "SORT k BY p GET q STORE d": [1, 7],
        "SORT_RO k BY p GET q": [1],
        "GEORADIUS g 0 0 1 km STORE d": [1, 7],
        "GEORADIUSBYMEMBER g m 1 km STOREDIST d": [1, 6],
        "MIGRATE h 1 '' 0 5 KEYS a b": [7, 8],
        "MIGRATE h 1 k 0 5": [3],
        "OBJECT ENCODING k": [2],
        "MEMORY USAGE k": [2],
        "XINFO STREAM s": [2],
    }
    for line, expected in cases.items():
        argv = argv_of(line)
        spec = spec_of(argv)
        assert key_indices(spec, argv) == expected, line
    assert all(COMMANDS[n].movable for n in
               [b"EVAL", b"FCALL", b"ZUNIONSTORE", b"XREAD", b"SORT", b"GEORADIUS", b"MIGRATE"])
    assert not any(COMMANDS[n].movable for n in [b"GET", b"MSET", b"RENAME", b"BLPOP"])


def test_random_arguments_agree_with_command_getkeys(live):
    """Differential check on arguments full of keywords, numbers and NUL bytes.

    Agreement: same key names; or both find nothing (GETKEYS replies an error); or
    key_indices raises CommandArgsError where the command itself would fail (a wrong
    argument count, or numkeys Redis would reject).
    """
    rng = random.Random(7)
    tokens = [b"STREAMS", b"streams", b"STORE", b"store", b"STOREDIST", b"KEYS", b"keys",
              b"BY", b"GET", b"LIMIT", b"COUNT", b"BLOCK", b"GROUP", b"NOACK", b"AUTH", b"AUTH2",
              b"COPY", b"", b"0", b"1", b"2", b"3", b"-1", b"01", b"2x", b"+1", b"k", b"a",
              b"STREAMS\0x", b"store\0", b"LEFT", b"MIN"]
    specs = list(ALL_COMMANDS.values())
    movable = [s for s in specs if s.movable]
    cases = []
    for i in range(6000):
        spec = rng.choice(movable if i % 2 else specs)
        name = spec.name.split(b"|")
        n = max(0, abs(spec.arity) - len(name) + rng.randint(-1, 10))
        args = [rng.choice(tokens) if rng.random() < 0.6 else b"x%d" % rng.randint(0, 9)
                for _ in range(n)]
        cases.append(name + args)
    replies = live.pipeline([[b"COMMAND", b"GETKEYS", *argv] for argv in cases])
    mismatches = []
    for argv, reply in zip(cases, replies):
        spec = spec_of(argv)
        try:
            got, error = key_indices(spec, argv), None
        except CommandArgsError as e:
            got, error = None, e.message
        if argv[0] == b"PFMERGE" and len(argv) == 2:
            continue                                      # documented deviation, tested above
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if "'command|getkeys'" in text:
                continue                                  # GETKEYS needs an argument
            if "Invalid number of arguments" in text:
                ok = error is not None and error.startswith("ERR wrong number of arguments")
            else:                                         # no keys / invalid arguments
                ok = got == [] or error is not None
        elif got is None:
            ok = not error.startswith("ERR wrong number of arguments")
        else:
            ok = [argv[i] for i in got] == reply
        if not ok:
            mismatches.append((argv, reply, got, error))
    assert mismatches == []


# --------------------------------------------------------------------------- errors


def _load_script_and_function(live: Client) -> bytes:
    live.call("FUNCTION", "LOAD", "REPLACE",
              "#!lua name=testlib\nredis.register_function('f', function(keys, args) return 1 end)")
    return live.call("SCRIPT", "LOAD", "return 1")


BAD_NUMKEYS = [
    "EVAL 'return 1' abc a", "EVAL 'return 1' -1 a", "EVAL 'return 1' 2 a", "EVAL 'return 1' 01",
    "EVAL 'return 1' 99999999999999999999", "EVAL 'return 1' 9999999999 a", "EVAL_RO 'return 1' 3",
    "EVALSHA {sha} x a", "EVALSHA {sha} -5", "EVALSHA_RO {sha} 2 a",
    "FCALL f abc a", "FCALL f -1 a", "FCALL f 2 a", "FCALL_RO f 1", "FCALL f ''",
    "ZUNION abc a", "ZUNION 0 a", "ZUNION -1 a", "ZUNION 3 a b", "ZINTER 0 a", "ZDIFF 5 a",
    "ZINTERCARD 0 a", "ZINTERCARD 2 a", "ZUNIONSTORE d 0 a", "ZINTERSTORE d x a",
    "ZDIFFSTORE d 4 a b", "SINTERCARD 0 a", "SINTERCARD x a", "SINTERCARD 3 a b",
    "LMPOP 0 a LEFT", "LMPOP 4 a LEFT", "LMPOP x a LEFT", "BLMPOP 0 -1 a LEFT", "BLMPOP 0 5 a LEFT",
    "ZMPOP 0 z MIN", "ZMPOP 3 z MIN", "BZMPOP 0 +1 z MIN", "BZMPOP 0 7 z MIN",
]


@pytest.mark.parametrize("line", BAD_NUMKEYS)
def test_bad_numkeys_raise_the_error_redis_replies(live, line):
    sha = _load_script_and_function(live)
    argv = argv_of(line.replace("{sha}", sha.decode()))
    with pytest.raises(CommandArgsError) as excinfo:
        key_indices(spec_of(argv), argv)
    reply = live.call(*argv)
    assert isinstance(reply, hiredis.ReplyError)
    assert excinfo.value.message == str(reply)


def test_zero_numkeys_means_no_keys_for_scripts_and_functions():
    for line in ["EVAL 'return 1' 0", "EVALSHA_RO abc 0 x y", "FCALL f 0", "FCALL_RO f 0 arg"]:
        argv = argv_of(line)
        assert key_indices(spec_of(argv), argv) == []


@pytest.mark.parametrize("line", ["GET", "GET a b", "OBJECT", "OBJECT ENCODING", "XINFO STREAM",
                                  "EVAL s", "MSET a", "CONFIG", "LMOVE a b LEFT"])
def test_wrong_argument_count_raises_the_error_redis_replies(live, line):
    argv = argv_of(line)
    spec = spec_of(argv)
    assert not arity_ok(spec, len(argv))
    with pytest.raises(CommandArgsError) as excinfo:
        key_indices(spec, argv)
    assert excinfo.value.message == str(live.call(*argv))


# --------------------------------------------------------------------------- the table


def _live_command_rows(live: Client) -> dict[bytes, tuple]:
    def walk(entries):
        for e in entries:
            yield e
            if e[9]:
                yield from walk(e[9])

    return {e[0].upper(): e for e in walk(live.call("COMMAND"))}


def test_table_has_every_live_command_with_same_arity_flags_and_key_specs(live):
    rows = _live_command_rows(live)
    assert set(rows) == set(ALL_COMMANDS)
    for name, e in rows.items():
        spec = ALL_COMMANDS[name]
        assert spec.arity == e[1], name
        assert spec.flags == {f.decode() for f in e[2]}, name
        assert (spec.first_key, spec.last_key, spec.key_step) == (e[3], e[4], e[5]), name
        assert len(spec.key_specs) == len(e[8]), name
        for ks, raw in zip(spec.key_specs, e[8]):
            d = dict(zip(raw[::2], raw[1::2]))
            assert ks.flags == {f.decode() for f in d[b"flags"]}, name
            bs = dict(zip(d[b"begin_search"][::2], d[b"begin_search"][1::2]))
            fk = dict(zip(d[b"find_keys"][::2], d[b"find_keys"][1::2]))
            assert ks.begin_search == bs[b"type"].decode(), name
            assert ks.find_keys == fk[b"type"].decode(), name
            if ks.begin_search == "index":
                assert [b"index", ks.index] == bs[b"spec"], name
            elif ks.begin_search == "keyword":
                assert [b"keyword", ks.keyword, b"startfrom", ks.startfrom] == bs[b"spec"], name
            if ks.find_keys == "range":
                assert [b"lastkey", ks.lastkey, b"keystep", ks.keystep, b"limit", ks.limit] \
                    == fk[b"spec"], name
            elif ks.find_keys == "keynum":
                assert [b"keynumidx", ks.keynumidx, b"firstkey", ks.firstkey,
                        b"keystep", ks.keystep] == fk[b"spec"], name


def test_generator_reports_the_committed_table_current(live):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gen_commands.py"),
         "--port", str(live.port), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_generated_table_is_plain_sorted_data_marked_generated():
    path = command_table.__file__
    with open(path) as f:
        text = f.read()
    head = text[:400]
    assert "DO NOT EDIT BY HAND" in head
    assert f"tools/gen_commands.py from redis-server {command_table.REDIS_VERSION}" in head
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.Assign):
            ast.literal_eval(node.value)                  # only literals
        else:
            assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)  # docstring
    names = [row[0] for row in command_table.COMMAND_ROWS]
    assert names == sorted(names)


def test_subcommands_hang_off_their_containers():
    for container in [b"OBJECT", b"XINFO", b"MEMORY", b"CLIENT", b"CONFIG", b"SCRIPT", b"FUNCTION",
                      b"CLUSTER", b"COMMAND", b"XGROUP", b"ACL", b"PUBSUB"]:
        spec = COMMANDS[container]
        assert spec.subcommands, container
        for sub, subspec in spec.subcommands.items():
            assert subspec.name == container + b"|" + sub
            assert ALL_COMMANDS[subspec.name] is subspec
    assert COMMANDS[b"GET"].subcommands is None


def test_legacy_triple_agrees_with_key_specs_for_non_movable_commands():
    for spec in ALL_COMMANDS.values():
        if spec.movable or not spec.has_keys:
            continue
        name = spec.name.split(b"|")
        for argc in range(spec.min_argc, spec.min_argc + 7):
            if not arity_ok(spec, argc):
                continue
            argv = name + [b"x"] * (argc - len(name))
            last = spec.last_key if spec.last_key >= 0 else argc + spec.last_key
            legacy = list(range(spec.first_key, last + 1, spec.key_step))
            assert key_indices(spec, argv) == legacy, (spec.name, argc)


# --------------------------------------------------------------------------- finding the spec / arity


def test_commands_and_subcommands_are_found_whatever_their_case():
    assert spec_of([b"get", b"k"]) is spec_of([b"GET", b"k"]) is spec_of([b"gEt", b"k"]) is COMMANDS[b"GET"]
    enc = ALL_COMMANDS[b"OBJECT|ENCODING"]
    assert spec_of([b"object", b"encoding", b"k"]) is enc
    assert spec_of([b"ObJeCt", b"EnCoDiNg", b"k"]) is enc
    assert spec_of([b"xinfo", b"stream", b"s"]) is ALL_COMMANDS[b"XINFO|STREAM"]
    argv = [b"mEmOrY", b"usage", b"k"]
    assert key_indices(spec_of(argv), argv) == [2]


def test_a_container_without_a_known_subcommand_gives_the_container():
    assert spec_of([b"OBJECT"]) is COMMANDS[b"OBJECT"]
    assert spec_of([b"object", b"nosuch", b"k"]) is COMMANDS[b"OBJECT"]
    assert key_indices(COMMANDS[b"OBJECT"], [b"object", b"nosuch", b"k"]) == []


def test_an_unknown_command_has_no_spec():
    assert spec_of([]) is None
    assert spec_of([b"NOSUCHCOMMAND"]) is None
    assert spec_of([b"GET|X", b"k"]) is None
    assert spec_of([b"OBJECT|ENCODING", b"k"]) is None      # subcommands only via their container


def test_arity_follows_redis_convention():
    get, mset, obj = COMMANDS[b"GET"], COMMANDS[b"MSET"], ALL_COMMANDS[b"OBJECT|ENCODING"]
    assert get.arity == 2 and arity_ok(get, 2)
    assert not arity_ok(get, 1) and not arity_ok(get, 3)
    assert mset.arity == -3 and arity_ok(mset, 3) and arity_ok(mset, 103)
    assert not arity_ok(mset, 2)
    assert arity_ok(obj, 3) and not arity_ok(obj, 2) and not arity_ok(obj, 4)


def test_keyless_commands_have_no_keys():
    for line in ["PING", "INFO server", "CLIENT LIST", "CONFIG GET maxmemory", "DBSIZE",
                 "SCRIPT FLUSH", "PUBLISH ch msg", "SUBSCRIBE a b", "CLUSTER KEYSLOT k"]:
        argv = argv_of(line)
        spec = spec_of(argv)
        assert key_indices(spec, argv) == [], line
        assert not spec.movable


def test_sharded_pubsub_channels_are_not_keys_but_are_found():
    for line, channels in [("SPUBLISH ch msg", [1]), ("SSUBSCRIBE a b", [1, 2]),
                           ("SUNSUBSCRIBE a", [1]), ("SUNSUBSCRIBE", [])]:
        argv = argv_of(line)
        spec = spec_of(argv)
        assert key_indices(spec, argv) == []
        assert shard_channel_indices(spec, argv) == channels


def test_hand_made_spec_without_key_data_is_keyless():
    spec = CommandSpec(name=b"LOCALCMD", arity=-2, flags=frozenset(), first_key=0, last_key=0,
                       key_step=0, movable=False, min_argc=2, max_argc=1 << 31,
                       arity_error="ERR wrong number of arguments for 'localcmd' command")
    assert key_indices(spec, [b"LOCALCMD", b"x"]) == []
    with pytest.raises(CommandArgsError):
        key_indices(spec, [b"LOCALCMD"])


def test_command_spec_is_frozen_and_hashable():
    spec = COMMANDS[b"GET"]
    assert isinstance(spec, CommandSpec)
    with pytest.raises(AttributeError):
        spec.arity = 3  # type: ignore[misc]
    assert {spec: 1}[dataclasses.replace(spec)] == 1  # an equal copy finds it
    assert isinstance(spec.flags, frozenset) and "readonly" in spec.flags


# --------------------------------------------------------------------------- property


_NAMES = sorted({n.split(b"|")[0] for n in ALL_COMMANDS} | {b"NOSUCH"})
_SUBS = sorted({n.split(b"|")[1] for n in ALL_COMMANDS if b"|" in n})
_TOKENS = [b"STREAMS", b"STORE", b"STOREDIST", b"KEYS", b"BY", b"GET", b"LIMIT", b"COUNT",
           b"BLOCK", b"GROUP", b"NOACK", b"AUTH", b"AUTH2", b"WEIGHTS", b"0", b"1", b"2", b"-1",
           b"9223372036854775808", b"", b"\0"]


def _case(b: bytes, flips: list[bool]) -> bytes:
    return bytes(c ^ 32 if f and 65 <= (c & ~32) <= 90 else c for c, f in zip(b, flips + [False] * len(b)))


@settings(max_examples=3000, deadline=None)
@given(
    name=st.sampled_from(_NAMES),
    flips=st.lists(st.booleans(), max_size=20),
    args=st.lists(st.one_of(st.sampled_from(_TOKENS + _SUBS), st.binary(max_size=6),
                            st.integers(-5, 40).map(lambda i: str(i).encode())), max_size=14),
)
def test_key_indices_raise_only_command_args_error_and_stay_in_range(name, flips, args):
    argv = [_case(name, flips)] + args
    spec = spec_of(argv)
    if spec is None:
        return
    try:
        keys = key_indices(spec, argv)
    except CommandArgsError as e:
        assert e.message.startswith("ERR ")
        return
    assert isinstance(keys, list)
    assert all(isinstance(i, int) and 0 < i < len(argv) for i in keys)
    channels = shard_channel_indices(spec, argv)
    assert all(0 < i < len(argv) for i in channels)
