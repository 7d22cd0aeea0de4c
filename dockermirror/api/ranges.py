"""Single-range ``Range: bytes=...`` requests (RFC 9110 section 14)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# ASCII digits only (``\d`` would take other scripts' digits); optional whitespace (space, tab)
# around the unit, the "=" and each position, never inside one ("1 0" is not 10); the unit is
# case-insensitive (RFC 9110 section 14.1)
_RANGE_RE = re.compile(r"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*", re.ASCII | re.IGNORECASE)
# A position with more digits than this is beyond any content (and int() refuses ~4,300 digits)
_MAX_DIGITS = 18


class RangeNotSatisfiable(Exception):
    """The range starts at or beyond the end of the content."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # exclusive

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"

    @property
    def length(self) -> int:
        return self.end - self.start


def _position(digits: str) -> int:
    """A byte position; an absurdly long one counts as "beyond the end" (10**18 bytes)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one range asked for, or None to send the whole content.

    Multiple ranges and malformed headers are ignored (a server may always answer
    200 with the full content); an unsatisfiable range raises. Nothing else raises,
    whatever the header holds.
    """
    if not header:
        return None
    match = _RANGE_RE.fullmatch(header)
    if not match:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return ByteRange(max(0, size - suffix), size)
    start = _position(first)
    if last and _position(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    end = size if not last else min(_position(last) + 1, size)
    return ByteRange(start, end)
