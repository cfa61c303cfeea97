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
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from . import wrk
from .run import log, placement, setup_link
from .site import make_site

SUBNET = 60
SOURCES = 240

FLOOD = r"""
import os, random, socket, struct, sys, time
iface, dmac, dst = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), sys.argv[3]
seconds, rate, nsrc = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
rng = random.Random(5)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((iface, 0))
def csum(b):
    n = int.from_bytes(b + b"\0" * (len(b) & 1), "big")
    return (-n) % 0xFFFF if n else 0xFFFF
srcs = [bytes([198, 19, rng.randrange(256), rng.randrange(1, 255)]) for _ in range(nsrc)]
dstb = socket.inet_aton(dst)
frames = []
for i in range(100000):             # distinct 4-tuples and ISNs: ~1 s of flood before one repeats
    src = srcs[i % nsrc]
    smac = bytes([2, 0x66]) + src
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 44, i & 0xFFFF, 0x4000, 64, 6, 0, src, dstb))
    ip[10:12] = struct.pack("!H", csum(bytes(ip)))
    tcp = bytearray(struct.pack("!HHIIBBHHH", rng.randrange(1024, 65536), 80, rng.randrange(1 << 32), 0,
                                0x60, 0x02, 65535, 0, 0) + b"\x02\x04\x05\xb4")
    tcp[16:18] = struct.pack("!H", csum(src + dstb + struct.pack("!BBH", 0, 6, len(tcp)) + bytes(tcp)))
    frames.append(dmac + smac + b"\x08\x00" + bytes(ip) + bytes(tcp))
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


def _mac(ns, ifname: str) -> str:
    return ns.run(["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()


def measure(link, running, dmac: str, f, mode: str, duration: int, rate: int, place: dict) -> dict:
    url = f"{running.base_url}/{f.name}"
    common = dict(url=url, connections=32, threads=place["wrk_threads"], expected=f.size,
                  close=mode == "close", cpus=place["wrk_cpus"], check=False)
    wrk.run(link.client, wrk.job(duration=1, **common))                       # warm-up
    base = wrk.run(link.client, wrk.job(duration=duration, **common))
    flood = link.client.popen(["taskset", "-c", place["wrk_cpus"] or "0", sys.executable, "-c", FLOOD,
                               link.client_if, dmac, link.server_ip, str(duration + 2), str(rate), str(SOURCES)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if flood.stdout.readline().strip() != "READY":
            raise RuntimeError("the flood sender did not start")
        flood.stdin.write("go\n")
        flood.stdin.flush()
        time.sleep(1.0)                     # backlog full, cookies on
        under = wrk.run(link.client, wrk.job(duration=duration, **common))
        sent = float(flood.communicate(timeout=duration + 30)[0].strip() or 0)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()

    def rps(r):
        return r["requests"] / r["duration_s"] if r["duration_s"] else 0.0
    r0, r1 = rps(base), rps(under)
    return {"mode": mode, "rps": r0, "rps_flood": r1, "ratio": r1 / r0 if r0 else 0.0, "sent_pps": sent,
            "errors_flood": under["errors"], "errors": base["errors"]}


def run(servers: dict, workdir: str, rate: int, duration: int, modes: list[str], size: int) -> dict:
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
            for mode in modes:
                m = measure(link, running, dmac, f, mode, duration, rate, place)
                m["server"] = name
                out.append(m)
                log(f"synflood {name:9s} {mode:9s} {m['rps']:9.0f} req/s alone, {m['rps_flood']:9.0f} under "
                    f"{m['sent_pps']:7.0f} SYN/s: {m['ratio']:.2f}x")
        if running.counters is not None:
            counters[name] = running.counters
    return {"runs": out, "counters": counters, "rate": rate, "duration": duration, "size": size,
            "sources": SOURCES}


def table(res: dict) -> str:
    lines = [f"SYN flood from {res['sources']} spoofed sources, offered {res['rate']} SYN/s, "
             f"{res['size']}-byte file, 1 worker, {res['duration']} s per pass",
             "", "| server | mode | alone req/s | under flood req/s | ratio | flood sent SYN/s |",
             "|---|---|---:|---:|---:|---:|"]
    for m in res["runs"]:
        lines.append(f"| {m['server']} | {m['mode']} | {m['rps']:.0f} | {m['rps_flood']:.0f} | {m['ratio']:.2f}x "
                     f"| {m['sent_pps']:.0f} |")
    return "\n".join(lines) + "\n"
