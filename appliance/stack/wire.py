"""Shared helpers of the wire-format modules: the parse error and checksums.

Theory of operation: every `parse` in ethernet/arp/ipv4/icmp/tcp either
returns a parsed representation or raises `Malformed(reason)`; the reason is
the counter suffix the stack counts the drop under (`drop_<reason>`).
Checksums use the RFC 1071 identity of appliance.content.checksum: the
ones'-complement sum of 16-bit words is congruent mod 0xFFFF to the data
read as one big integer, so sums are C-speed int.from_bytes calls.
"""

__all__ = ["Malformed", "csum", "sum_ok", "mac_str", "ip_str", "ip_bytes"]


class Malformed(ValueError):
    """A frame that cannot be used; `reason` names what is wrong (a counter name)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def csum(data, extra: int = 0) -> int:
    """The Internet checksum (RFC 1071) of `data` plus a partial sum `extra`."""
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    n += extra
    # all-zero data sums to +0 (RFC 1071), whose complement is 0xFFFF; any other
    # multiple of 0xFFFF sums to -0 (0xFFFF), whose complement is 0
    return (-n) % 0xFFFF if n else 0xFFFF


def sum_ok(data, extra: int = 0) -> bool:
    """True when `data` (checksum field included) plus `extra` sums to 0xFFFF."""
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    return (n + extra) % 0xFFFF == 0


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_str(ip: bytes) -> str:
    return ".".join(str(b) for b in ip)


def ip_bytes(ip: str) -> bytes:
    parts = ip.split(".")
    if len(parts) != 4 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise ValueError(f"not an IPv4 address: {ip!r}")
    return bytes(int(p) for p in parts)
