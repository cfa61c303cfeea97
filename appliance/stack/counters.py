"""Counters: everything the stack does or refuses, by name.

Theory of operation: a dict of name -> int that reads 0 for unknown names,
so every layer counts with `c["name"] += 1` and no list of names has to be
kept in sync. Names are `<layer>_<what>`; drops are `drop_<layer>_<reason>`
(e.g. `drop_ip_bad_checksum`), so `drops()` can sum them. One gauge:
`tcp_conns_open` (connections in the table now; it sums across workers). `as_dict()` is
what the serve loop prints as HABOOB-COUNTERS.
"""

__all__ = ["Counters"]


class Counters(dict):
    __slots__ = ()

    def __missing__(self, key):
        return 0

    def as_dict(self) -> dict:
        return {k: self[k] for k in sorted(self) if self[k]}

    def drops(self) -> dict:
        return {k: v for k, v in self.as_dict().items() if k.startswith("drop_")}

    def merge(self, other) -> "Counters":
        """Add `other` (a Counters or dict) into self; used to sum per-worker counters."""
        for k, v in other.items():
            self[k] += v
        return self
