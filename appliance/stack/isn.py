"""Initial sequence numbers (RFC 6528) and SYN cookies (RFC 4987 §3.6).

Theory of operation: ISN = M + F(4-tuple, secret), where M is a 4 µs clock
derived from the `now` passed in and F a keyed hash (BLAKE2s keyed with the
secret the caller took from os.urandom), RFC 6528 §3. The 4-tuple is the raw
12 bytes (source address, destination address, source port, destination
port) exactly as they appear in the received frame.

SYN cookies: when the SYN backlog is full the SYN-ACK's ISN encodes what we
need to create the connection later, and no state is kept:

    bits 31..27  t, a 64-second time slot counter (mod 32)
    bits 26..24  index of the peer's MSS in MSS_TABLE (rounded down)
    bits 23..0   keyed hash of (4-tuple, peer ISN, t, index)

The returning ACK (ack - 1 = cookie, seq - 1 = peer ISN) is valid when the
hash matches and t is the current or the previous slot (so a cookie lives 64
to 128 seconds). Window scaling cannot be encoded without timestamps, so a
connection made from a cookie runs unscaled in both directions (our cookie
SYN-ACK offers no Window Scale option: RFC 7323 §2.2 then disables it).
"""
import hashlib

__all__ = ["IsnGenerator", "MSS_TABLE"]

MSS_TABLE = (536, 1200, 1360, 1400, 1440, 1452, 1460, 8960)
_SLOT = 64.0
_MSS_IDX = {m: i for i, m in enumerate(MSS_TABLE)}     # the common MSS values: no search
_FCACHE_MAX = 65536     # 4-tuples whose F() is kept (~100 bytes each)


class IsnGenerator:
    def __init__(self, secret: bytes):
        if not secret or len(secret) < 16:
            raise ValueError("the ISN secret must be at least 16 random bytes (os.urandom)")
        self._key = bytes(secret[:32])
        self._ckey = hashlib.blake2s(b"syncookie", key=self._key).digest()
        self._f = hashlib.blake2s(key=self._key, digest_size=4)     # keyed once; copied per ISN
        self._fcache = {}                                            # 4-tuple -> F(4-tuple, secret)

    def isn(self, tuple4: bytes, now: float) -> int:
        m = int(now * 250000)                      # 4 µs ticks (RFC 6528 §3)
        f = self._fcache.get(tuple4)
        if f is None:
            # F(4-tuple, secret) does not change, and clients reuse 4-tuples
            # (a connection per request cycles through the ephemeral ports): keep it
            h = self._f.copy()
            h.update(tuple4)
            f = int.from_bytes(h.digest(), "big")
            if len(self._fcache) >= _FCACHE_MAX:
                self._fcache.clear()
            self._fcache[tuple4] = f
        return (m + f) & 0xFFFFFFFF

    def _hash(self, tuple4: bytes, peer_isn: int, t: int, idx: int) -> int:
        h = hashlib.blake2s(tuple4 + peer_isn.to_bytes(4, "big") + bytes((t, idx)), key=self._ckey,
                            digest_size=3)
        return int.from_bytes(h.digest(), "big")

    def cookie(self, tuple4: bytes, peer_isn: int, mss: int, now: float) -> int:
        idx = _MSS_IDX.get(mss)
        if idx is None:
            idx = 0
            for i, m in enumerate(MSS_TABLE):
                if m <= mss:
                    idx = i
        t = int(now / _SLOT) & 31
        return (t << 27) | (idx << 24) | self._hash(tuple4, peer_isn, t, idx)

    def check_cookie(self, tuple4: bytes, peer_isn: int, cookie: int, now: float):
        """The MSS encoded in a valid cookie, or None."""
        t = cookie >> 27
        idx = (cookie >> 24) & 7
        if (int(now / _SLOT) - t) & 31 > 1:
            return None
        if self._hash(tuple4, peer_isn, t, idx) != cookie & 0xFFFFFF:
            return None
        return MSS_TABLE[idx]
