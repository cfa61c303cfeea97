"""The TPACKET ring backend alone, on a veth pair between two namespaces.

A tiny scripted TCP responder (this file run as a script inside the server
namespace) answers ARP, accepts one connection from the client kernel and
sends a response through `TpacketDevice.tx_batch`, either as one GSO
super-frame (virtio header, NEEDS_CSUM + GSO_TCPV4), as MSS-sized frames
with checksum offload only, or with checksums computed in Python, or (the
head TX slot artificially kept busy) through the copy-socket fallback. The
client is the ordinary Linux TCP stack: if it delivers the exact bytes, the
frames on the wire were valid (checksums, segmentation, FIN on the last
segment). The responder also checks that received frames with a partial
checksum (CHECKSUM_PARTIAL from the local sender) are completed by the ring.
"""
import hashlib
import json
import os
import struct
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PORT = 80
ISS = 1000


def payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


# -- the responder (runs inside the server namespace) ------------------------

def _sum(data) -> int:
    data = bytes(data)
    if len(data) & 1:
        data += b"\0"
    n = int.from_bytes(data, "big")
    return n % 0xFFFF or (0xFFFF if n else 0)


def _fold(x):
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def _tcp_frame(dmac, smac, src, dst, sport, dport, seq, ack, flags, opts=b"", plen=0, ipid=1):
    thl = 20 + len(opts)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + thl + plen, ipid, 0x4000, 64, 6, 0, src, dst))
    ip[10:12] = struct.pack("!H", ~_sum(ip) & 0xFFFF)
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, 65535, 0, 0)) + opts
    pseudo = _sum(src + dst) + 6 + thl + plen
    return dmac + smac + b"\x08\x00" + bytes(ip), tcp, pseudo


def responder(iface: str, ip: str, mode: str, size: int) -> None:
    from appliance.stack.rings.base import GSO
    from appliance.stack.rings.tpacket import TpacketDevice

    me = bytes(map(int, ip.split(".")))
    dev = TpacketDevice(iface)
    if mode != "direct":
        dev.direct_min = 1 << 30          # every frame through the ring (what these modes test)
    body = payload(size)
    report = {"offload": list(dev.offload), "rx_csum_ok": None, "done": False}
    deadline = time.monotonic() + 15
    peer = None
    while time.monotonic() < deadline and not report["done"]:
        frames = dev.rx_batch(64)
        if not frames:
            time.sleep(0.005)
            continue
        out = []
        for f in frames:
            f = bytes(f)
            if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x01" and f[38:42] == me:
                out.append((f[6:12] + dev.mac + b"\x08\x06\x00\x01\x08\x00\x06\x04\x00\x02" + dev.mac + me
                            + f[22:28] + f[28:32], None, None))
                continue
            if f[12:14] != b"\x08\x00" or f[23] != 6 or f[30:34] != me:
                continue
            ihl = (f[14] & 15) * 4
            t = 14 + ihl
            src = f[26:30]
            sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", f, t)
            tot = struct.unpack_from("!H", f, 16)[0]
            seg = f[t:14 + tot]
            dlen = len(seg) - (off >> 4) * 4
            if flags & 0x02:                                  # SYN -> SYN-ACK with MSS 1460
                peer = (f[6:12], src, sport, seq + 1)
                h, tcp, ps = _tcp_frame(peer[0], dev.mac, me, src, PORT, sport, ISS, seq + 1, 0x12,
                                        b"\x02\x04\x05\xb4")
                tcp[16:18] = struct.pack("!H", ~_fold(ps + _sum(tcp)) & 0xFFFF)
                out.append((h + bytes(tcp), None, None))
            elif dlen > 0 and peer:                           # the request: check its checksum, answer
                ok = _fold(_sum(src + me) + 6 + len(seg) + _sum(seg)) == 0xFFFF
                report["rx_csum_ok"] = ok
                ackno = seq + dlen
                if mode == "copy":
                    # pretend the kernel still owns the head TX slot (as while a
                    # slow reader holds its pages): the ring must not stall
                    struct.pack_into("=I", dev.mm, dev.tx_slots[dev.tx_head], 2)   # TP_STATUS_SENDING
                out.extend(_response(dev, peer, me, ackno, body, "gso" if mode in ("copy", "direct") else mode))
            elif flags & 0x01 and peer:                       # their FIN: ACK it, done
                h, tcp, ps = _tcp_frame(peer[0], dev.mac, me, src, PORT, sport, ISS + 2 + size, seq + 1, 0x10)
                tcp[16:18] = struct.pack("!H", ~_fold(ps + _sum(tcp)) & 0xFFFF)
                out.append((h + bytes(tcp), None, None))
                report["done"] = True
        if out:
            dev.tx_batch(out)
    report["counters"] = dev.counters
    dev.close()
    print(json.dumps(report))


def _response(dev, peer, me, ackno, body, mode):
    from appliance.stack.rings.base import GSO
    mac, src, sport, _ = peer
    mss = 1448
    view = memoryview(body)
    if mode == "gso":
        # One super-frame; the TCP checksum field holds the folded pseudo sum
        # for the whole length (CHECKSUM_PARTIAL); FIN must land on the last segment.
        h, tcp, ps = _tcp_frame(mac, dev.mac, me, src, PORT, sport, ISS + 1, ackno, 0x19, plen=len(body))
        tcp[16:18] = struct.pack("!H", _fold(ps))
        return [(h + bytes(tcp), view, GSO(34, 16, mss, 54))]
    frames = []
    for i in range(0, len(body), mss):
        chunk = view[i:i + mss]
        last = i + mss >= len(body)
        flags = 0x19 if last else 0x10
        h, tcp, ps = _tcp_frame(mac, dev.mac, me, src, PORT, sport, ISS + 1 + i, ackno, flags,
                                plen=len(chunk), ipid=2 + i // mss)
        if mode == "csum":
            tcp[16:18] = struct.pack("!H", _fold(ps + len(chunk) * 0))
            frames.append((h + bytes(tcp), chunk, GSO(34, 16, 0, 54)))
        else:
            tcp[16:18] = struct.pack("!H", ~_fold(ps + _sum(tcp) + _sum(chunk)) & 0xFFFF)
            frames.append((h + bytes(tcp), chunk, None))
    return frames


# -- the tests (run on the host, as root) ------------------------------------

CLIENT = r"""
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
s.close()
print(len(data), hashlib.sha256(data).hexdigest())
"""


def _exchange(mode: str, size: int, subnet: int, offloads_off: bool = False):
    from vm import netns
    with netns.pair(subnet=subnet) as link:
        if offloads_off:
            netns.set_offloads(link.server, link.server_if, tx=False, tso=False, gso=False)
        srv = link.server.popen([sys.executable, os.path.abspath(__file__), link.server_if,
                                 link.server_ip, mode, str(size)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            time.sleep(0.5)
            cli = link.client.run([sys.executable, "-c", CLIENT, link.server_ip], check=False, timeout=20)
            out, err = srv.communicate(timeout=20)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
        assert srv.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        return cli, report


@pytest.mark.netns
@pytest.mark.parametrize("mode,subnet", [("gso", 60), ("csum", 61), ("soft", 62), ("copy", 64), ("direct", 65)])
def test_ring_sends_a_tcp_stream_the_kernel_accepts(mode, subnet):
    size = 30000
    cli, report = _exchange(mode, size, subnet)
    assert cli.returncode == 0, cli.stderr
    n, digest = cli.stdout.split()
    assert int(n) == size
    assert digest == hashlib.sha256(payload(size)).hexdigest()
    assert report["offload"] == [True, True]          # veth: checksum and TSO
    assert report["rx_csum_ok"] is True
    assert report["done"] is True
    c = report["counters"]
    assert c["rx_truncated"] == 0 and c["tx_oversize"] == 0 and c["tx_dropped_full"] == 0
    if mode == "copy":
        assert c["tx_ring_waits"] >= 1 and c["tx_copied"] >= 2     # the response and the final ACK
    if mode == "gso":
        # the whole response left in one slot (plus ARP reply, SYN-ACK, final ACK)
        assert c["tx_frames"] == 4 and c["tx_direct"] == 0
    if mode == "direct":
        # the 30000-byte super-frame by sendmsg straight from the body, the rest through the ring
        assert c["tx_direct"] == 1 and c["tx_frames"] == 4 and c["tx_copied"] == 0
    # the client kernel leaves checksums partial over veth; the ring completed them
    assert c["rx_csum_completed"] > 0


@pytest.mark.netns
def test_ring_reports_no_offload_when_switched_off():
    size = 5000
    cli, report = _exchange("soft", size, 63, offloads_off=True)
    assert report["offload"] == [False, False]
    assert cli.stdout.split()[1] == hashlib.sha256(payload(size)).hexdigest()


if __name__ == "__main__":
    responder(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
