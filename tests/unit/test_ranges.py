"""Range parsing (RFC 9110 section 14): one range or the whole content."""

from __future__ import annotations

import pytest

from dockermirror.api.ranges import ByteRange, RangeNotSatisfiable, parse_range


@pytest.mark.parametrize("header, size, expected", [
    (None, 100, None),
    ("", 100, None),
    ("bytes=0-9", 100, ByteRange(0, 10)),
    ("bytes=10-", 100, ByteRange(10, 100)),
    ("bytes=90-200", 100, ByteRange(90, 100)),          # the end is clipped to the content
    ("bytes=-10", 100, ByteRange(90, 100)),             # a suffix: the last 10 bytes
    ("bytes=-500", 100, ByteRange(0, 100)),             # a suffix longer than the content
    ("bytes=99-99", 100, ByteRange(99, 100)),
    (" bytes = 5 - 6 ", 100, ByteRange(5, 7)),          # spaces are tolerated around the parts
    ("bytes=\t5-\t6\t", 100, ByteRange(5, 7)),           # and tabs
    ("Bytes=5-6", 100, ByteRange(5, 7)),                # the unit is case-insensitive
    ("bytes=1 0-20", 100, None),                        # but not inside a position: not 10-20
    ("bytes=10-2 0", 100, None),
    ("by tes=10-20", 100, None),
    ("bytes=10-20\n", 100, None),                       # other whitespace is not optional whitespace
    ("bytes=5-2", 100, None),                           # invalid: send it all
    ("bytes=0-1,5-6", 100, None),                       # several ranges: send it all
    ("items=0-1", 100, None),                           # another unit
    ("bytes=-", 100, None),
    ("bytes=abc-", 100, None),
])
def test_parse(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header, size", [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100),
                                          ("bytes=0-", 0), ("bytes=-5", 0)])
def test_unsatisfiable(header, size):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


def test_content_range_and_length():
    byte_range = ByteRange(10, 20)
    assert byte_range.length == 10
    assert byte_range.content_range(100) == "bytes 10-19/100"
