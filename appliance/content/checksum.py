"""RFC 1071 ones'-complement sums, at C speed, and RFC 1624 incremental updates.

Theory of operation: the Internet checksum is the ones'-complement of the
ones'-complement sum of the data taken as big-endian 16-bit words. Because
2**16 == 1 (mod 0xFFFF), that sum is congruent to the whole data read as one
big-endian integer, so `int.from_bytes(data, "big") % 0xFFFF` computes it in
C without a Python loop over words. The only care needed is the
representation of zero: RFC 1071's end-around-carry addition yields 0x0000
only when every word is zero; any other data whose sum is a multiple of
0xFFFF yields 0xFFFF ("negative zero"). `ones_sum` returns exactly that
value, so it equals the reference word-by-word fold bit for bit, and sums
combine with `fold(a + b)`.

Odd-length data is padded with one zero byte (RFC 1071 §4.1 / RFC 9293
§3.1). A run of bytes starting at an odd offset of a packet contributes its
sum byte-swapped (RFC 1071 §2(B), byte order independence); `field_delta`
takes `odd` for that reason.

Checksum of a TCP segment from a stored payload sum:
    csum = ~fold(pseudo_sum + ones_sum(tcp_header) + payload_sum) & 0xFFFF
and after replacing `old` bytes by `new` bytes inside the payload:
    payload_sum' = fold(payload_sum + field_delta(old, new, odd))
(RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
"""

__all__ = ["ones_sum", "fold", "swap16", "field_delta", "checksum", "pseudo_header_sum", "ones_sum_reference"]


def ones_sum(data) -> int:
    """The RFC 1071 ones'-complement sum (0..0xFFFF) of bytes-like `data`.

    0 only for all-zero (or empty) data, else 1..0xFFFF, exactly as the
    word-by-word end-around-carry reference produces it.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    if n == 0:
        return 0
    r = n % 0xFFFF
    return r if r else 0xFFFF


def fold(x: int) -> int:
    """Fold carries of a (non-negative) sum of 16-bit sums into 16 bits."""
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def swap16(x: int) -> int:
    """Swap the two bytes of a 16-bit sum (the sum of the same data at an odd offset)."""
    return ((x & 0xFF) << 8) | (x >> 8)


def field_delta(old: bytes, new: bytes, odd: bool) -> int:
    """The sum to add to a stored sum when the bytes `old` are replaced by
    `new` (same length) at an odd (`odd=True`) or even offset of the summed
    data: fold(stored + field_delta(...)) is the sum of the patched data.
    RFC 1624 §3: subtracting m is adding its ones'-complement ~m.
    """
    if len(old) != len(new):
        raise ValueError("field_delta: old and new must have the same length")
    d = fold((~ones_sum(old) & 0xFFFF) + ones_sum(new))
    return swap16(d) if odd else d


def checksum(*sums: int) -> int:
    """The Internet checksum (the value to put in the header) from partial sums."""
    return ~fold(sum(sums)) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the IPv4 pseudo header (RFC 9293 §3.1): addresses, protocol, TCP length."""
    return fold(ones_sum(src) + ones_sum(dst) + proto + length)


def ones_sum_reference(data) -> int:
    """Straightforward word-by-word RFC 1071 sum; for tests only (slow)."""
    data = bytes(data)
    if len(data) & 1:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s
