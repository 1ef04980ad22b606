from __future__ import annotations

import pytest

from proxy.umctl import SlotEntry, Tag, UmctlError, parse_setcluster


def parse(line: str):
    return parse_setcluster([w.encode() for w in line.split()])


def test_v2_spelling_from_the_seed():
    meta = parse("v2 1 NOFLAGS mydb 127.0.0.1:6379 1 0-8000 PEER 127.0.0.1:7000 1 8001-16383")
    assert (meta.epoch, meta.cluster, meta.force) == (1, "mydb", False)
    assert meta.local == (SlotEntry("127.0.0.1:6379", ((0, 8000),)),)
    assert meta.peers == (SlotEntry("127.0.0.1:7000", ((8001, 16383),)),)


def test_old_spelling_repeats_the_cluster_name():
    old = parse("1 NOFLAGS mydb 127.0.0.1:6379 1 0-8000 PEER mydb 127.0.0.1:7000 1 8001-16383")
    new = parse("v2 1 NOFLAGS mydb 127.0.0.1:6379 1 0-8000 PEER 127.0.0.1:7000 1 8001-16383")
    assert old == new


def test_several_ranges_merge_and_single_slots_parse():
    meta = parse("v2 3 FORCE,X c 127.0.0.1:1 3 5-9 0-4 300")
    assert meta.force
    assert meta.local[0].ranges == ((0, 9), (300, 300))


def test_migration_tags_and_config():
    meta = parse("v2 2 NOFLAG mydb 127.0.0.1:7001 1 0-8000 127.0.0.1:7001 migrating 1 8001-16383 "
                 "2 127.0.0.1:6001 127.0.0.1:7001 127.0.0.1:6002 127.0.0.1:7002 "
                 "PEER 127.0.0.1:6002 IMPORTING 1 8001-16383 "
                 "2 127.0.0.1:6001 127.0.0.1:7001 127.0.0.1:6002 127.0.0.1:7002 "
                 "CONFIG migration_scan_interval 0")
    migrating = meta.local[1]
    assert migrating.tag is Tag.MIGRATING and migrating.migration.dst_proxy == "127.0.0.1:6002"
    assert meta.peers[0].tag is Tag.IMPORTING
    assert meta.config == (("migration_scan_interval", "0"),)
    # the source still owns a migrating range; the importing peer owns nothing yet
    assert meta.owned() == [("", ((0, 8000),)), ("", ((8001, 16383),))]


@pytest.mark.parametrize("line, message", [
    ("", "missing epoch"),
    ("v2 x NOFLAGS c 127.0.0.1:1 1 0-1", "bad epoch"),
    ("v2 1 NOFLAGS", "missing cluster name"),
    ("v2 1 NOFLAGS c 127.0.0.1:1 1 0-16384", "invalid slot range"),
    ("v2 1 NOFLAGS c 127.0.0.1:1 1 9-3", "invalid slot range"),
    ("v2 1 NOFLAGS c 127.0.0.1:1 2 0-3", "missing slot range"),
    ("v2 1 NOFLAGS c 127.0.0.1:1 0", "bad range count"),
    ("v2 1 NOFLAGS c nohost 1 0-3", "bad address"),
    ("v2 1 NOFLAGS c 127.0.0.1:99999 1 0-3", "bad address"),
    ("v2 1 NOFLAGS c 127.0.0.1:1 1 0-10 PEER 127.0.0.1:2 1 5-20", "owned twice"),
    ("v2 1 NOFLAGS c 127.0.0.1:1 1 0-10 127.0.0.1:2 1 11-20", "one backend"),
    ("1 NOFLAGS a 127.0.0.1:1 1 0-10 PEER b 127.0.0.1:2 1 11-20", "differs"),
    ("v2 1 COMPRESS c abc", "COMPRESS"),
    ("v2 1 NOFLAGS c 127.0.0.1:1 migrating 1 0-3 2 127.0.0.1:1", "missing migration address"),
])
def test_bad_arguments_name_the_problem(line, message):
    with pytest.raises(UmctlError, match=message):
        parse(line)
