from __future__ import annotations

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.resp import (
    MAX_MULTIBULK_LEN,
    BackendProtocolError,
    Err,
    ReplyScanner,
    RequestError,
    RequestParser,
    encode,
    encode_command,
    scan_reply,
)


def feed_whole_and_bytewise(data: bytes) -> list[list[list[bytes]]]:
    """The commands found when `data` arrives at once, byte by byte, and in two halves."""
    whole = RequestParser().feed(data)
    parser = RequestParser()
    bytewise = [cmd for i in range(len(data)) for cmd in parser.feed(data[i : i + 1])]
    parser = RequestParser()
    half = len(data) // 2
    halves = parser.feed(data[:half]) + parser.feed(data[half:])
    return [whole, bytewise, halves]


def test_request_parses_the_same_whole_bytewise_and_split():
    data = encode_command([b"SET", b"k", b"v\r\nx"]) + encode_command([b"GET", b"k"])
    for result in feed_whole_and_bytewise(data):
        assert result == [[b"SET", b"k", b"v\r\nx"], [b"GET", b"k"]]


def test_inline_commands_are_accepted():
    for result in feed_whole_and_bytewise(b"PING\r\nset a  b\n"):
        assert result == [[b"PING"], [b"set", b"a", b"b"]]


def test_inline_then_resp_in_one_read():
    assert RequestParser().feed(b"PING\r\n" + encode_command([b"GET", b"a"])) == [
        [b"PING"], [b"GET", b"a"]]


def test_inline_line_after_resp_at_a_request_boundary():
    parser = RequestParser()
    assert parser.feed(encode_command([b"PING"])) == [[b"PING"]]
    assert parser.feed(b"ECHO hi\r\n" + encode_command([b"GET", b"k"])) == [
        [b"ECHO", b"hi"], [b"GET", b"k"]]


def test_huge_bulk_in_a_later_request_is_refused_when_its_header_arrives():
    parser = RequestParser()
    head = encode_command([b"PING"]) + b"*2\r\n$3\r\nGET\r\n"
    assert parser.feed(head) == [[b"PING"]]
    with pytest.raises(RequestError, match="invalid bulk length") as info:
        for byte in b"$999999999999\r\n":
            parser.feed(bytes([byte]))
    assert info.value.commands == []


@pytest.mark.parametrize("element", [b"+GET\r\n", b"(123\r\n", b"=7\r\ntxt:GET\r\n", b":1\r\n",
                                     b"#t\r\n", b"_\r\n"])
@pytest.mark.parametrize("split", [False, True])
def test_only_bulk_strings_are_arguments(element, split):
    """As Redis: hiredis would accept these, and a request forwarded as sent must not carry
    them to the backend (Redis would drop the shared connection)."""
    data = encode_command([b"PING"]) + b"*2\r\n" + element + b"$1\r\nk\r\n"
    parser = RequestParser()
    with pytest.raises(RequestError, match="Protocol error: expected '\\$'"):
        if split:  # the bad header arrives in the read that completes the request
            parser.feed(data[:18])
            parser.feed(data[18:])
        else:
            parser.feed(data)


def test_commands_before_bad_bytes_are_kept_on_the_error():
    with pytest.raises(RequestError) as info:
        RequestParser().feed(encode_command([b"PING"]) + b"*1\r\n$x\r\n")
    assert info.value.commands == [[b"PING"]]


def test_large_bulk_arriving_in_pieces_is_accepted():
    value = b"v" * 300_000
    data = encode_command([b"SET", b"k", value]) + encode_command([b"GET", b"k"])
    parser = RequestParser()
    got = [cmd for i in range(0, len(data), 7000) for cmd in parser.feed(data[i : i + 7000])]
    assert got == [[b"SET", b"k", value], [b"GET", b"k"]]


@pytest.mark.parametrize("chunks, whole", [
    ([encode_command([b"GET", b"k"]) * 3], [True]),
    ([encode_command([b"SET", b"k", b"v" * 300])[:20], encode_command([b"SET", b"k", b"v" * 300])[20:]],
     [False, False]),  # the second read ends a request the first one began
    ([encode_command([b"GET", b"k"]) + b"*2\r\n"], [False]),  # a request left incomplete
    ([b"GET k\r\n"], [False]),  # inline
    ([b"*0\r\n" + encode_command([b"GET", b"k"])], [False]),  # an empty request takes bytes
    ([encode_command([b"PING"]), encode_command([b"GET", b"k"])], [True, True]),
])
def test_parser_says_when_a_read_was_exactly_its_requests(chunks, whole):
    parser = RequestParser()
    seen = []
    for chunk in chunks:
        parser.feed(chunk)
        seen.append(parser.whole)
    assert seen == whole


def test_empty_multibulk_and_blank_lines_are_ignored():
    assert RequestParser().feed(b"\r\n\n*0\r\n" + encode_command([b"PING"])) == [[b"PING"]]


@pytest.mark.parametrize("data", [
    b"*1\r\n$-5\r\n", b"*1\r\n$abc\r\n", b"*x\r\n", b"*-3\r\n",
    b"*%d\r\n" % (MAX_MULTIBULK_LEN + 1),
    b"*1\r\n*1\r\n$1\r\na\r\n",  # nested array
    b"*1\r\n:5\r\n",  # integer argument
    encode_command([b"GET", b"a"]) + b"+OK\r\n",  # not a request
])
def test_malformed_requests_raise_request_error(data):
    with pytest.raises(RequestError, match="Protocol error"):
        RequestParser().feed(data)


READ_BYTES = 256 * 1024  # what asyncio and uvloop hand data_received at most


@pytest.mark.parametrize("read_bytes", [READ_BYTES, 1 << 30])  # in reads, or whole at once
def test_a_command_of_more_arguments_than_the_limit_is_refused_however_it_arrives(read_bytes):
    data = encode_command([b"DEL"] + [b"k%d" % i for i in range(MAX_MULTIBULK_LEN)])
    parser = RequestParser()
    with pytest.raises(RequestError, match=f"at most {MAX_MULTIBULK_LEN} arguments"):
        for at in range(0, len(data), read_bytes):
            parser.feed(data[at:at + read_bytes])


@pytest.mark.parametrize("read_bytes", [READ_BYTES, 1 << 30])
def test_a_command_of_as_many_arguments_as_the_limit_is_parsed(read_bytes):
    argv = [b"DEL"] + [b"k%d" % i for i in range(MAX_MULTIBULK_LEN - 1)]
    data = encode_command(argv)
    parser = RequestParser()
    got = []
    for at in range(0, len(data), read_bytes):
        got += parser.feed(data[at:at + read_bytes])
    assert got == [argv]


def test_too_big_inline_request_is_refused():
    with pytest.raises(RequestError, match="too big inline"):
        RequestParser().feed(b"A" * (70 * 1024))


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_parser_only_ever_raises_request_error(data):
    parser = RequestParser()
    try:
        for cmd in parser.feed(data):
            assert cmd and all(isinstance(a, bytes) for a in cmd)
    except RequestError:
        pass


# -- replies ----------------------------------------------------------------------------------

REPLIES = [
    b"+OK\r\n", b"-ERR bad\r\n", b":42\r\n", b"$-1\r\n", b"$0\r\n\r\n", b"$5\r\nhe\r\no\r\n",
    b"*-1\r\n", b"*0\r\n", b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n", b"_\r\n", b",3.14\r\n", b"#t\r\n",
    b"(12345678901234567890\r\n", b"!3\r\nerr\r\n", b"=8\r\ntxt:abcd\r\n",
    b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n:2\r\n", b"~2\r\n:1\r\n:2\r\n", b">2\r\n+msg\r\n$1\r\nx\r\n",
    b"|1\r\n+ttl\r\n:3\r\n$2\r\nok\r\n",  # an attribute, then the reply it annotates
]


@pytest.mark.parametrize("reply", REPLIES)
def test_scanner_finds_the_end_of_each_reply_type(reply):
    assert scan_reply(reply + b"+NEXT\r\n") == len(reply)
    for cut in range(len(reply)):
        assert scan_reply(reply[:cut]) == -1


def test_scanner_resumes_a_partial_aggregate_without_rescanning():
    big = b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"
    scanner = ReplyScanner()
    buf = bytearray()
    ends = []
    for byte in big + b":1\r\n":
        buf.append(byte)
        end = scanner.next_end(buf)
        if end >= 0:
            ends.append(end)
    assert ends == [len(big), len(big) + 4]


def test_scanner_rejects_bytes_that_are_not_resp():
    with pytest.raises(BackendProtocolError):
        scan_reply(b"hello\r\n")
    with pytest.raises(BackendProtocolError):
        scan_reply(b"$x\r\n")


resp_values = st.recursive(
    st.one_of(st.binary(max_size=20), st.integers(-2**63, 2**63 - 1), st.none(),
              st.builds(Err, st.sampled_from(["ERR x", "MOVED 1 a:1"]))),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.binary(max_size=5), children, max_size=3),
    max_leaves=12)


@given(st.lists(resp_values, min_size=1, max_size=6), st.booleans(),
       st.lists(st.integers(1, 40), max_size=8))
@settings(max_examples=300)
def test_scanner_splits_a_stream_into_the_replies_it_was_made_of(values, resp3, cuts):
    encoded = [encode(v, resp3) for v in values]
    stream = b"".join(encoded)
    scanner = ReplyScanner()
    buf = bytearray()
    found = []
    pos = 0
    chunks = []
    for size in cuts + [len(stream)]:
        chunks.append(stream[pos : pos + size])
        pos += size
    for chunk in chunks:
        buf += chunk
        while (end := scanner.next_end(buf)) >= 0:
            found.append(bytes(buf[:end]))
            del buf[:end]
            scanner.shift(end)
    assert found == encoded
    for raw in found:  # and hiredis agrees each one is one whole reply
        reader = hiredis.Reader(notEnoughData=Ellipsis)
        reader.feed(raw)
        reader.gets()
        assert reader.gets() is Ellipsis


@given(st.lists(resp_values, min_size=1, max_size=8), st.booleans(), st.integers(1, 8),
       st.lists(st.integers(1, 40), max_size=8))
@settings(max_examples=300)
def test_scanner_counts_replies_in_groups_as_it_does_one_by_one(values, resp3, group, cuts):
    encoded = [encode(v, resp3) for v in values]
    stream = b"".join(encoded)
    expected_ends = [sum(map(len, encoded[: i + 1])) for i in range(len(encoded))]
    scanner = ReplyScanner()
    buf = bytearray()
    ends, pos = [], 0
    for size in cuts + [len(stream)]:
        buf += stream[pos : pos + size]
        pos += size
        while True:
            found, end = scanner.next_ends(buf, group)
            if found:
                ends.append((found, end))
            if found < group:
                break
    assert sum(found for found, _ in ends) == len(values)
    done = 0
    for found, end in ends:  # each group ends where its last reply ends
        done += found
        assert end == expected_ends[done - 1]
