"""`python -m bench synflood`: throughput under a spoofed SYN flood, next to nginx.

Theory of operation: each server gets its own namespace pair and one
worker pinned to core 0 (as `python -m bench --workers 1`). For each mode
(keep-alive, connection per request) wrk runs twice, back to back: alone,
then while a raw AF_PACKET sender in the client namespace sends spoofed
SYNs (new 4-tuples from 240 sources in 198.19.0.0/16, valid checksums) at
`--rate` packets/s to the server's MAC. The figure is the ratio of the two
rates, per server, measured a few seconds apart. The server's answers to
spoofed sources go back into the client namespace and die there (nginx:
a route to 198.19.0.0/16 via the client; the appliance answers the
frame's source MAC, which nobody has): the cost of answering is paid, as
on a real link. The sender shares the client cores with wrk, so the rate it
reaches is measured and printed (`sent pps`): on a small machine it is
below `--rate`. Not part of the default run.

New clients: while wrk runs under the flood, FRESH clients, each from an
address of the client namespace that never connected before (added for
the pass, removed after), connect once, GET the file and check it; the
time each takes to connect (the kernel's SYN retransmissions at 1, 3, 7 s
included) says how a first-time client fares: wrk's own clients come
from one address that has connected before. Their connect times are
printed (median, how many within 1 s, how many failed within PROBE_S).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

from . import wrk
from .run import log, placement, setup_link
from .site import make_site

SUBNET = 60
SOURCES = 240
FRESH = 16           # first-time clients per flooded pass
PROBE_S = 8.0        # how long each may take (connect and reply)

PROBE = r"""
import json, socket, sys, threading, time
server, path, size, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
srcs = sys.argv[5:]
res = {}
def one(src):
    t0 = time.monotonic()
    try:
        s = socket.create_connection((server, 80), timeout=timeout, source_address=(src, 0))
        tc = time.monotonic() - t0
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        buf = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
        s.close()
        head, _, body = buf.partition(b"\r\n\r\n")
        res[src] = tc if head.startswith(b"HTTP/1.1 200") and len(body) == size else None
    except OSError:
        res[src] = None
ts = [threading.Thread(target=one, args=(a,)) for a in srcs]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(json.dumps([res[a] for a in srcs]))
"""

FLOOD = r"""
import socket, sys, time
iface, path, seconds, rate = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((iface, 0))
data = open(path, "rb").read()
size = int.from_bytes(data[:2], "big")
frames = [data[k:k + size] for k in range(2, len(data), size)]
print("READY", flush=True)
sys.stdin.readline()
n = 0
t0 = time.monotonic()
end = t0 + seconds
k = 0
while True:
    for _ in range(64):
        try:
            s.send(frames[k])
            n += 1
        except OSError:
            pass
        k = k + 1 if k + 1 < len(frames) else 0
    now = time.monotonic()
    if now >= end:
        break
    ahead = t0 + n / rate - now
    if ahead > 0:
        time.sleep(ahead)
print(n / (time.monotonic() - t0), flush=True)
"""


def _csum(b: bytes) -> int:
    n = int.from_bytes(b + b"\0" * (len(b) & 1), "big")
    return (-n) % 0xFFFF if n else 0xFFFF


def flood_frames(path: str, dmac: str, dst: str, count: int, sources: int = SOURCES, seed: int = 5) -> None:
    """Write `count` spoofed SYN frames to `path` (a 2-byte frame size, then the
    frames): distinct 4-tuples and ISNs from `sources` addresses in
    198.19.0.0/16, valid checksums, to `dmac`/`dst` port 80. The sender sends
    them in a loop, so a SYN repeats only after count / rate seconds: with
    more frames than the flood lasts, none does (a random flood, which a
    client's retransmission can be told from); --replay makes it 1 s."""
    import random
    import socket
    import struct
    rng = random.Random(seed)
    mac = bytes.fromhex(dmac.replace(":", ""))
    srcs = [bytes([198, 19, rng.randrange(256), rng.randrange(1, 255)]) for _ in range(sources)]
    dstb = socket.inet_aton(dst)
    tmp = path + ".tmp"
    with open(tmp, "wb") as out:
        out.write((58).to_bytes(2, "big"))
        for i in range(count):
            src = srcs[i % sources]
            ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 44, i & 0xFFFF, 0x4000, 64, 6, 0, src, dstb))
            ip[10:12] = struct.pack("!H", _csum(bytes(ip)))
            tcp = bytearray(struct.pack("!HHIIBBHHH", rng.randrange(1024, 65536), 80, rng.randrange(1 << 32), 0,
                                        0x60, 0x02, 65535, 0, 0) + b"\x02\x04\x05\xb4")
            tcp[16:18] = struct.pack("!H", _csum(src + dstb + struct.pack("!BBH", 0, 6, len(tcp)) + bytes(tcp)))
            out.write(mac + bytes([2, 0x66]) + src + b"\x08\x00" + bytes(ip) + bytes(tcp))
    os.replace(tmp, path)


def _mac(ns, ifname: str) -> str:
    return ns.run(["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()


def flood_seconds(duration: int) -> float:
    """How long the flood of one pass lasts: 1 s before wrk, the pass or the probes, 1 s after."""
    return max(duration, PROBE_S) + 2


def measure(link, running, frames: str, f, mode: str, duration: int, rate: int, place: dict, fresh: list) -> dict:
    """One mode: wrk alone, then wrk under the flood with the `fresh` client addresses probing."""
    from vm import netns
    url = f"{running.base_url}/{f.name}"
    common = dict(url=url, connections=32, threads=place["wrk_threads"], expected=f.size,
                  close=mode == "close", cpus=place["wrk_cpus"], check=False)
    wrk.run(link.client, wrk.job(duration=1, **common))                       # warm-up
    base = wrk.run(link.client, wrk.job(duration=duration, **common))
    flood = link.client.popen(["taskset", "-c", place["wrk_cpus"] or "0", sys.executable, "-c", FLOOD,
                               link.client_if, frames, str(flood_seconds(duration)), str(rate)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    probe = None
    for a in fresh:
        netns.ip("addr", "add", f"{a}/32", "dev", link.client_if, ns=link.client.name)
    try:
        if flood.stdout.readline().strip() != "READY":
            raise RuntimeError("the flood sender did not start")
        flood.stdin.write("go\n")
        flood.stdin.flush()
        time.sleep(1.0)                     # backlog full, cookies on
        probe = link.client.popen(["taskset", "-c", place["wrk_cpus"] or "0", sys.executable, "-c", PROBE,
                                   link.server_ip, "/" + f.name, str(f.size), str(PROBE_S)] + fresh,
                                  stdout=subprocess.PIPE, text=True)
        under = wrk.run(link.client, wrk.job(duration=duration, **common))
        times = json.loads(probe.communicate(timeout=PROBE_S + 30)[0])
        sent = float(flood.communicate(timeout=PROBE_S + duration + 30)[0].strip() or 0)
    finally:
        for p in (flood, probe):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for a in fresh:
            netns.ip("addr", "del", f"{a}/32", "dev", link.client_if, ns=link.client.name, check=False)

    def rps(r):
        return r["requests"] / r["duration_s"] if r["duration_s"] else 0.0
    r0, r1 = rps(base), rps(under)
    ok = sorted(t for t in times if t is not None)
    return {"mode": mode, "rps": r0, "rps_flood": r1, "ratio": r1 / r0 if r0 else 0.0, "sent_pps": sent,
            "errors_flood": under["errors"], "errors": base["errors"], "fresh": len(times),
            "fresh_connect_s": times, "fresh_within_1s": sum(1 for t in ok if t < 1.0),
            "fresh_within_2s": sum(1 for t in ok if t < 2.0),
            "fresh_failed": len(times) - len(ok), "fresh_median_s": ok[len(ok) // 2] if ok else None}


def run(servers: dict, workdir: str, rate: int, duration: int, modes: list[str], size: int,
        replay: bool = False) -> dict:
    from vm import netns
    site_dir = os.path.join(workdir, "site")
    os.makedirs(site_dir, exist_ok=True)
    os.chmod(workdir, 0o755)
    f = make_site(site_dir, [size])[0]
    place = placement(1, os.cpu_count() or 1)
    out = []
    counters = {}
    for i, (name, srv) in enumerate(servers.items()):
        srv.prepare(site_dir, workdir)
        with contextlib.ExitStack() as stack:
            link = stack.enter_context(netns.pair(subnet=SUBNET + i))
            setup_link(link, place, True)
            running = stack.enter_context(srv.start(link, 1, place["server_cpus"]))
            if name == "nginx":
                netns.ip("route", "add", "198.19.0.0/16", "via", link.client_ip, ns=link.server.name)
                dmac = _mac(link.server, link.server_if)
            else:
                from .servers import APPLIANCE_MAC
                dmac = APPLIANCE_MAC
            frames = os.path.join(workdir, f"flood-{name}.bin")
            flood_frames(frames, dmac, link.server_ip, rate if replay else int(rate * (flood_seconds(duration) + 1)))
            for k, mode in enumerate(modes):
                base = link.server_ip.rsplit(".", 1)[0]
                fresh = [f"{base}.{100 + k * FRESH + j}" for j in range(FRESH)]      # never seen before
                m = measure(link, running, frames, f, mode, duration, rate, place, fresh)
                m["server"] = name
                out.append(m)
                med = f"{m['fresh_median_s']:.2f} s" if m["fresh_median_s"] is not None else "-"
                log(f"synflood {name:9s} {mode:9s} {m['rps']:9.0f} req/s alone, {m['rps_flood']:9.0f} under "
                    f"{m['sent_pps']:7.0f} SYN/s: {m['ratio']:.2f}x; new clients: {m['fresh_within_1s']}/"
                    f"{m['fresh']} within 1 s, {m['fresh_within_2s']} within 2 s, median {med}, {m['fresh_failed']} failed")
        if running.counters is not None:
            counters[name] = running.counters
    return {"runs": out, "counters": counters, "rate": rate, "duration": duration, "size": size,
            "sources": SOURCES, "replay": replay}


def table(res: dict) -> str:
    kind = "each SYN sent again every second (--replay)" if res.get("replay") else "no SYN repeated"
    lines = [f"SYN flood from {res['sources']} spoofed sources, offered {res['rate']} SYN/s, {kind}, "
             f"{res['size']}-byte file, 1 worker, {res['duration']} s per pass",
             "", "| server | mode | alone req/s | under flood req/s | ratio | flood sent SYN/s "
             f"| new clients connected < 1 s / < 2 s (of {FRESH}) | their median connect | failed in {PROBE_S:.0f} s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in res["runs"]:
        med = f"{m['fresh_median_s']:.2f} s" if m["fresh_median_s"] is not None else "-"
        lines.append(f"| {m['server']} | {m['mode']} | {m['rps']:.0f} | {m['rps_flood']:.0f} | {m['ratio']:.2f}x "
                     f"| {m['sent_pps']:.0f} | {m['fresh_within_1s']} / {m.get('fresh_within_2s', '-')} | {med} "
                     f"| {m['fresh_failed']} |")
    return "\n".join(lines) + "\n"
