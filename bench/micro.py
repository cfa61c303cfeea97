"""In-memory microbenchmark of the stack's Python work per request.

Theory of operation: the network benchmark (`python -m bench`) mixes the
stack's Python time with the kernel's packet work and this machine's noise.
This one drives a `Stack` directly, with no device, no kernel and no other
process: a scripted client builds the frames a Linux client sends (SYN with
Linux's option layout, handshake ACK, the request, the ACK of the reply,
its FIN) with a real sequence-number exchange, and only the calls into the
stack (`receive`, `poll`, draining `txq`) are timed. Client ports cycle
through a small range so that, as under wrk, most SYNs reopen a TIME-WAIT
4-tuple. The result is microseconds of stack CPU per request, repeatable to
a few percent, and with `--profile` the cProfile table of the same run:
the number to move when working on the per-connection hot path.

Frames are handed over with `csum_ok=True` (a local sender's NEEDS_CSUM
frames, as on veth) and the stack runs in TSO mode (veth's offloads).
`family=6`: the same over IPv6 to the stack's link-local address (its
control plane brought up with a fake clock first; the store cut at 1440).
"""
from __future__ import annotations

import cProfile
import os
import pstats
import struct
import tempfile
import time

from appliance.content.compiler import Options, compile_site
from appliance.content.store import Store
from appliance.stack.iface import Stack, StackConfig
from appliance.stack.rings.base import Offload
from appliance.stack.wire import csum

SERVER_MAC = bytes.fromhex("020000000001")
CLIENT_MAC = bytes.fromhex("020000000002")
SERVER_IP = bytes([198, 18, 0, 1])
CLIENT_IP = bytes([198, 18, 0, 2])
SYN_OPTS = bytes.fromhex("020405b40402080a000000000000000001030307")   # Linux: MSS, SACK-perm, TS, NOP, WS 7
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


def frame4(sport: int, seq: int, ack: int, flags: int, payload: bytes = b"", opts: bytes = b"",
           dport: int = 80) -> bytes:
    """An Ethernet/IPv4/TCP frame from the client, checksums complete."""
    thl = 20 + len(opts)
    tcp = _TCP.pack(sport, dport, seq, ack, thl << 2, flags, 64240, 0, 0) + opts + payload
    ck = csum(tcp, int.from_bytes(CLIENT_IP + SERVER_IP, "big") + 6 + len(tcp))    # with the pseudo header
    tcp = tcp[:16] + ck.to_bytes(2, "big") + tcp[18:]
    ip = bytearray(_IP.pack(0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, CLIENT_IP, SERVER_IP))
    ip[10:12] = csum(ip).to_bytes(2, "big")
    return SERVER_MAC + CLIENT_MAC + b"\x08\x00" + bytes(ip) + tcp


_IP6 = struct.Struct("!IHBB16s16s")
CLIENT_IP6 = bytes.fromhex("fe800000000000000000000000000002")


def frame6(dst: bytes, sport: int, seq: int, ack: int, flags: int, payload: bytes = b"", opts: bytes = b"",
           dport: int = 80) -> bytes:
    """An Ethernet/IPv6/TCP frame from the client to `dst`, checksum complete."""
    thl = 20 + len(opts)
    tcp = _TCP.pack(sport, dport, seq, ack, thl << 2, flags, 64240, 0, 0) + opts + payload
    ck = csum(tcp, int.from_bytes(CLIENT_IP6 + dst, "big") + 6 + len(tcp))
    tcp = tcp[:16] + ck.to_bytes(2, "big") + tcp[18:]
    return SERVER_MAC + CLIENT_MAC + b"\x86\xdd" + _IP6.pack(0x60000000, len(tcp), 6, 64, CLIENT_IP6, dst) + tcp


def make_stack(size: int, workdir: str, family: int = 4, tls=None) -> tuple[Stack, str]:
    """A Stack serving one `size`-byte file (its path returned), IPv6 past DAD if
    `family` is 6, HTTPS too with a TlsServer `tls` (bench/tls_micro.py)."""
    site = os.path.join(workdir, "site")
    os.makedirs(site, exist_ok=True)
    name = f"f{size}.bin"
    with open(os.path.join(site, name), "wb") as f:
        f.write(bytes((i * 7 + (i >> 8)) & 0xFF for i in range(size)))
    out = os.path.join(workdir, "micro.store")
    compile_site(site, out, Options() if family == 4 else Options(mss=1440))
    st = Stack(Store.open(out), SERVER_MAC, "198.18.0.1", 24, None, Offload(csum=True, tso=True),
               StackConfig(), secret=b"m" * 32, tls=tls)
    if family == 6:
        import random
        st.enable_ipv6(b"m" * 32, rng=random.Random(1))
        st.start(0.0)
        t = 0.0
        while t < 5.0:                  # DAD of the link-local address (fake clock)
            t = max(t + 0.01, min(st.poll(t), 5.0))
        st.txq.clear()
    st.set_date(int(time.time()))
    return st, "/" + name


def _out_seqs(txq) -> list:
    """(seq, flags, payload length) of each frame the stack queued."""
    res = []
    for head, payload, _ in txq:
        if head[12] == 0x86:
            seq, = struct.unpack_from("!I", head, 58)
            res.append((seq, head[67], ((head[18] << 8) | head[19]) - ((head[66] >> 4) << 2)))
            continue
        seq, = struct.unpack_from("!I", head, 38)
        thl = (head[46] >> 4) << 2
        tl = (head[16] << 8) | head[17]
        res.append((seq, head[47], tl - 20 - thl))
    return res


def run(mode: str = "close", size: int = 4096, requests: int = 20000, ports: int = 64,
        profile: bool = False, log: str = "off", family: int = 4) -> dict:
    """Returns {"us_per_req", "requests", ...}; with profile=True also "profile" (text).
    `log` "combined"/"json": the access log on (appliance/obs), its batch flushed after
    every frame (the worst case: one frame per loop iteration), lines to /dev/null.
    `family` 6: TCP over IPv6 to the stack's link-local address."""
    with tempfile.TemporaryDirectory() as tmp:
        st, path = make_stack(size, tmp, family)
        if family == 6:
            ll = next(iter(st.ip6.addrs))
            mk = lambda *a, **k: frame6(ll, *a, **k)        # noqa: E731
        else:
            mk = frame4
        flush = None
        if log != "off":
            from appliance.obs import Observer
            from appliance.obs.accesslog import AccessLog, ConsoleSink
            null = os.open(os.devnull, os.O_WRONLY)
            flush = Observer(st, log=AccessLog(ConsoleSink(st.counters, null), log, 1, st.counters)).install().flush
        req = f"GET {path} HTTP/1.1\r\nHost: 198.18.0.1\r\n".encode()
        req += b"Connection: close\r\n\r\n" if mode == "close" else b"\r\n"
        txq = st.txq
        recv = st.receive
        poll = st.poll
        clock = time.perf_counter
        spent = 0.0
        phases = {}
        now = 1000.0
        prof = cProfile.Profile() if profile else None

        def deliver(f, phase):
            nonlocal spent
            if prof:
                prof.enable()
            t0 = clock()
            recv(f, now, True)
            poll(now)
            if flush is not None:
                flush(now)
            out = list(txq)
            txq.clear()
            dt = clock() - t0
            if prof:
                prof.disable()
            spent += dt
            phases[phase] = phases.get(phase, 0.0) + dt
            return out

        done = 0
        if mode == "close":
            for i in range(requests):
                now += 0.0001
                sport = 40000 + i % ports
                cseq = (i * 2654435761) & 0xFFFFFFFF
                out = _out_seqs(deliver(mk(sport, cseq, 0, 0x02, opts=SYN_OPTS), "syn"))
                s_isn = out[0][0]
                cseq = (cseq + 1) & 0xFFFFFFFF
                sack = (s_isn + 1) & 0xFFFFFFFF
                deliver(mk(sport, cseq, sack, 0x10), "handshake ack")
                out = _out_seqs(deliver(mk(sport, cseq, sack, 0x18, req), "request"))
                cseq = (cseq + len(req)) & 0xFFFFFFFF
                sent = sum(n for _, _, n in out) + 1     # + the FIN
                if not out or not out[-1][1] & 0x01:
                    raise RuntimeError(f"no FIN with the reply: {out}")
                sack = (sack + sent) & 0xFFFFFFFF
                deliver(mk(sport, cseq, sack, 0x10), "ack of reply+fin")
                deliver(mk(sport, cseq, sack, 0x11), "fin")
                done += 1
        else:
            sport = 40000
            out = _out_seqs(deliver(mk(sport, 1, 0, 0x02, opts=SYN_OPTS), "syn"))
            cseq, sack = 2, (out[0][0] + 1) & 0xFFFFFFFF
            deliver(mk(sport, cseq, sack, 0x10), "handshake ack")
            spent = 0.0
            phases.clear()
            for i in range(requests):
                now += 0.0001
                out = _out_seqs(deliver(mk(sport, cseq, sack, 0x18, req), "request"))
                cseq = (cseq + len(req)) & 0xFFFFFFFF
                sack = (sack + sum(n for _, _, n in out)) & 0xFFFFFFFF
                deliver(mk(sport, cseq, sack, 0x10), "ack of reply")
                done += 1
        c = st.counters
        if c.get("http_replies", 0) != done or c.get("drop_internal_error", 0):
            raise RuntimeError(f"the stack did not answer every request: {dict(c)} {st.last_error}")
        if mode == "close" and (c["tcp_time_wait"] != done or st.conns):
            raise RuntimeError(f"connections did not all end in TIME-WAIT: {dict(c)}")
        res = {"mode": mode, "size": size, "requests": done, "us_per_req": spent * 1e6 / done,
               "phases_us": {k: v * 1e6 / done for k, v in phases.items()}}
        if prof:
            import io
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            res["profile"] = s.getvalue()
        return res
