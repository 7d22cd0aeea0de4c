"""Numbers for people: sizes and ages in log lines, status lines and command output."""

from __future__ import annotations


def size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def age(seconds: float) -> str:
    """``5400`` -> ``2h`` (rounded, largest unit)."""
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


def printable(text: str | bytes, *, quote: bool = True) -> str:
    """Text from a client or an upstream, made safe for one log line (like nginx's access log).

    Visible ASCII and spaces stay as they are; every other character (CR, LF, ESC, DEL,
    non-ASCII) becomes its UTF-8 bytes (or, given bytes, its byte) as ``\\xHH``, and so do
    ``"`` and ``\\`` when ``quote`` is true, so that nobody can end a quoted field, start a
    line or move the cursor of the terminal that shows the log."""
    encoding = "latin-1" if isinstance(text, bytes) else "utf-8"   # bytes: one character per byte
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if text.isascii() and text.isprintable() and (not quote or ('"' not in text and "\\" not in text)):
        return text
    out = []
    for char in text:
        if " " <= char <= "~" and not (quote and char in '"\\'):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode(encoding, "surrogatepass"))
    return "".join(out)


def controls_escaped(text: str) -> str:
    """``text`` with control characters (C0 but tab, DEL, C1, line and paragraph separators)
    as ``\\xHH`` or ``\\uHHHH``: the last line of defence of the log formatter."""
    if text.isprintable():
        return text
    return "".join(_escaped(char) if _is_control(char) else char for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _is_control(char: str) -> bool:
    code = ord(char)
    return (code < 0x20 and char != "\t") or 0x7F <= code <= 0x9F or char in "\u2028\u2029"
