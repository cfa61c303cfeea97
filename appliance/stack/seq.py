"""TCP sequence numbers: 32-bit arithmetic with wrap-around comparison (RFC 9293 §3.4).

Theory of operation: sequence space is modular; a < b means b is "after" a
within half the space (RFC 1982 serial arithmetic). `Seq` is the type used
by tests as the reference model. The connection code (conn.py, iface.py)
inlines the same arithmetic on plain ints with this module's MASK and HALF
-- `((b - a) & MASK) < HALF` is `le(a, b)` -- because a function call or an
object per comparison costs too much on the per-packet path.
"""

__all__ = ["Seq", "MASK", "HALF", "add", "diff", "lt", "le", "gt", "ge", "between"]

MASK = 0xFFFFFFFF
HALF = _HALF = 0x80000000


def add(a: int, n: int) -> int:
    return (a + n) & MASK


def diff(a: int, b: int) -> int:
    """a - b as a signed distance in (-2**31, 2**31]."""
    d = (a - b) & MASK
    return d - 0x100000000 if d > _HALF else d


def lt(a: int, b: int) -> bool:
    return 0 < ((b - a) & MASK) < _HALF


def le(a: int, b: int) -> bool:
    return ((b - a) & MASK) < _HALF


def gt(a: int, b: int) -> bool:
    return lt(b, a)


def ge(a: int, b: int) -> bool:
    return le(b, a)


def between(lo: int, x: int, hi: int) -> bool:
    """lo <= x <= hi in sequence space (the span hi - lo must be < 2**31)."""
    return ((x - lo) & MASK) <= ((hi - lo) & MASK)


class Seq(int):
    """A sequence number: + and - wrap, comparisons are modular, a - b of two Seqs is a signed int."""

    __slots__ = ()

    def __new__(cls, v: int):
        return super().__new__(cls, v & MASK)

    def __add__(self, n):
        return Seq(int(self) + int(n))

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, Seq):
            return diff(int(self), int(other))
        return Seq(int(self) - int(other))

    def __lt__(self, o):
        return lt(int(self), int(o))

    def __le__(self, o):
        return le(int(self), int(o))

    def __gt__(self, o):
        return lt(int(o), int(self))

    def __ge__(self, o):
        return le(int(o), int(self))

    def __eq__(self, o):
        return int(self) == (int(o) & MASK)

    def __hash__(self):
        return int.__hash__(self)

    def __repr__(self):
        return f"Seq({int(self)})"
