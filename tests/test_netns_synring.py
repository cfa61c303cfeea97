"""The SYN ring (TpacketDevice syn_port): pure SYNs to the ports (80, 443) there, every other frame on the main ring.

Crafted frames (scapy, each with its own source MAC 02:00:00:00:00:<id>)
go from the client namespace through a veth to a TpacketDevice opened with
syn_port=(80, 443) in the server namespace. The device is read only after all
were sent: rx_batch(0) takes nothing from the main ring, so it yields the
SYN ring alone (emptied at once); then rx_batch drains the main ring. Each crafted frame must
come back byte for byte from exactly the ring its kind belongs to.
"""
import json
import os
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from vm import netns

pytestmark = pytest.mark.netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

READER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from appliance.stack.rings.tpacket import TpacketDevice
dev = TpacketDevice(sys.argv[1], syn_port=(80, 443), kernel_gate=False)
dev.syn_gate.pressure = True            # the SYN ring apart from the main ring's max_frames
dev.syn_gate.idle = 8                   # (a read without main-ring frames keeps up to 8 untrusted SYNs)
print("READY", flush=True)
sys.stdin.readline()                    # everything is sent
time.sleep(0.5)
# max_frames 0: nothing from the main ring; the SYN ring is emptied (4 SYNs: none shed)
syn = [bytes(f).hex() for f in dev.rx_batch(0)]
main = []
while True:
    got = dev.rx_batch(256)
    if not got:
        break
    main += [bytes(f).hex() for f in got]
print(json.dumps({"syn": syn, "main": main, "stats": dev.kernel_stats(), "counters": dev.counters}))
dev.close()
"""

SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((sys.argv[1], 0))
for h in sys.stdin.read().split():
    s.send(bytes.fromhex(h))
"""


def _frames(dmac: str, dst: str) -> dict:
    """id -> (frame bytes, belongs on the SYN ring: True, False, or "v6" where the
    kernel gate is there to shed IPv6 SYNs)."""
    src = "198.18.200.7"
    kinds = [
        (IP(src=src, dst=dst) / TCP(sport=40001, dport=80, flags="S"), True),
        (IP(src=src, dst=dst, options=b"\x01\x01\x01\x00") / TCP(sport=40002, dport=80, flags="S"), True),
        (IP(src=src, dst=dst) / TCP(sport=40003, dport=80, flags="SEC",
                                    options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]), True),
        (IP(src=src, dst=dst) / TCP(sport=40004, dport=80, flags="SA"), False),
        (IP(src=src, dst=dst) / TCP(sport=40005, dport=80, flags="SR"), False),
        (IP(src=src, dst=dst) / TCP(sport=40006, dport=81, flags="S"), False),
        (IP(src=src, dst=dst) / TCP(sport=40007, dport=80, flags="A"), False),
        (IP(src=src, dst=dst) / TCP(sport=40008, dport=80, flags="PA") / Raw(b"GET / HTTP/1.1\r\n\r\n"), False),
        (IP(src=src, dst=dst) / TCP(sport=40009, dport=80, flags="FA"), False),
        # a later fragment whose first bytes look like a SYN to port 80
        (IP(src=src, dst=dst, proto=6, frag=100) / Raw(bytes(TCP(sport=40010, dport=80, flags="S"))), False),
        (IP(src=src, dst=dst) / UDP(sport=40011, dport=80) / Raw(b"\0" * 5 + b"\x02" + b"\0" * 10), False),
        (IPv6(src="2001:2::7", dst="2001:2::1") / TCP(sport=40012, dport=80, flags="S"), "v6"),
        (ARP(op=1, hwsrc="02:00:00:00:00:0d", psrc=src, pdst=dst), False),
        # the second port (HTTPS): its pure SYNs there too, nothing else
        (IP(src=src, dst=dst) / TCP(sport=40014, dport=443, flags="S"), True),
        (IP(src=src, dst=dst) / TCP(sport=40015, dport=443, flags="SA"), False),
        (IP(src=src, dst=dst) / TCP(sport=40016, dport=444, flags="S"), False),
        (IP(src=src, dst=dst) / TCP(sport=40017, dport=443, flags="PA") / Raw(b"\x16\x03\x01"), False),
        # IPv6: pure SYNs to either port, TCP right behind the fixed header
        (IPv6(src="2001:2::7", dst="2001:2::1") / TCP(sport=40018, dport=443, flags="S",
                                                      options=[("MSS", 1440)]), "v6"),
        (IPv6(src="2001:2::7", dst="2001:2::1") / TCP(sport=40019, dport=80, flags="SA"), False),
        (IPv6(src="2001:2::7", dst="2001:2::1") / TCP(sport=40020, dport=81, flags="S"), False),
        (IPv6(src="2001:2::7", dst="2001:2::1") / TCP(sport=40021, dport=80, flags="SR"), False),
        (IPv6(src="2001:2::7", dst="2001:2::1") / IPv6ExtHdrHopByHop() / TCP(sport=40022, dport=80, flags="S"),
         False),
        (IPv6(src="2001:2::7", dst="2001:2::1") / TCP(sport=40023, dport=80, flags="PA") / Raw(b"GET /"), False),
    ]
    out = {}
    for i, (pkt, syn) in enumerate(kinds, 1):
        out[i] = (bytes(Ether(src=f"02:00:00:00:00:{i:02x}", dst=dmac) / pkt), syn)
    return out


def _ours(frames: list, sent: dict) -> dict:
    """id -> frame for the crafted frames among `frames` (hex); the kernel's own are ignored."""
    got = {}
    for h in frames:
        b = bytes.fromhex(h)
        if b[6:11] == b"\x02\x00\x00\x00\x00" and b[11] in sent:
            assert b[11] not in got, f"frame {b[11]} delivered twice"
            got[b[11]] = b
    return got


def _segs(dmac: str, dst: str, **fixed):
    """A maker of crafted TCP frames to the server (IPv6 when the source is):
    seg(src, sport, seq=sport, flags="S", **more TCP fields)."""
    def seg(src, sport, seq=None, flags="S", **kw):
        ip = IPv6(src=src, dst="2001:2::1") if ":" in src else IP(src=src, dst=dst)
        tcp = {"sport": sport, "dport": 80, "seq": sport if seq is None else seq, "flags": flags, **fixed, **kw}
        return bytes(Ether(src="02:00:00:00:01:00", dst=dmac) / ip / TCP(**tcp))
    return seg


def _read_what_is_sent(link, script: str, frames: list) -> dict:
    """Run `script` (a ring reader) in the server namespace, send `frames` from the
    client's, and return the reader's last line, parsed (JSON)."""
    reader = link.server.popen([sys.executable, "-c", script, link.server_if, ROOT],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "READY"
        link.client.run([sys.executable, "-c", SENDER, link.client_if],
                        input=" ".join(f.hex() for f in frames), text=True, timeout=20)
        out, err = reader.communicate("go\n", timeout=20)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _read_in_rounds(link, script: str, bursts: list, args=(), pause: float = 0.0, tail: int = 0) -> list:
    """Run `script` (a ring reader) in the server namespace; for each burst, send it
    from the client's, tell the reader, and take one JSON line from it (then wait
    `pause`); then `tail` more lines. Returns the parsed lines."""
    reader = link.server.popen([sys.executable, "-c", script, link.server_if, ROOT, *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = []
    try:
        if reader.stdout.readline().strip() != "READY":
            reader.stdin.close()
            pytest.fail("the ring reader failed: " + reader.stderr.read()[-2000:])
        for burst in bursts:
            link.client.run([sys.executable, "-c", SENDER, link.client_if],
                            input=" ".join(f.hex() for f in burst), text=True, timeout=20)
            reader.stdin.write("go\n")
            reader.stdin.flush()
            line = reader.stdout.readline()
            if not line:                                # the reader died: say why
                reader.stdin.close()
                pytest.fail("the ring reader failed: " + reader.stderr.read()[-2000:])
            res.append(json.loads(line))
            time.sleep(pause)
        res += [json.loads(reader.stdout.readline()) for _ in range(tail)]
        err = reader.communicate(timeout=20)[1]
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    return res


def test_syn_ring_gets_pure_syns_to_the_port_and_the_main_ring_everything_else():
    with netns.pair(subnet=66) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()
        sent = _frames(dmac, link.server_ip)
        res = _read_what_is_sent(link, READER, [f for f, _ in sent.values()])
    syn, main = _ours(res["syn"], sent), _ours(res["main"], sent)
    assert sorted(syn) == [i for i, (_, s) in sent.items() if s is True]
    assert sorted(main) == [i for i, (_, s) in sent.items() if s is not True]   # IPv6 SYNs too: no kernel gate
    for i, b in {**syn, **main}.items():
        assert b == sent[i][0], i                  # byte for byte, from its own slot
    # only the crafted SYNs (3 to port 80, 1 to 443) ever reached the SYN ring (nothing else the kernel sent)
    assert len(res["syn"]) == 4 and res["stats"]["kernel_syn_packets"] == 4
    assert res["stats"]["kernel_syn_drops"] == 0 and res["stats"]["kernel_rx_drops"] == 0
    assert res["counters"]["rx_syn_shed"] == 0


BURST = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from appliance.stack.rings import tpacket
dev = tpacket.TpacketDevice(sys.argv[1], syn_port=80, kernel_gate=False)
dev.syn_gate.pressure = True                           # as the serve loop sets it during a flood
dev.syn_gate.trusted[bytes([198, 18, 200, 9])] = None  # a source that completed a handshake before
print("READY", flush=True)
sys.stdin.readline()
time.sleep(0.5)
kept = [bytes(f).hex() for f in dev.rx_batch(0)]      # no main-ring frames: SYN_MIN SYNs kept
print(json.dumps({"kept": kept, "min": tpacket.SYN_MIN, "counters": dev.counters,
                  "stats": dev.kernel_stats()}))
dev.close()
"""


def test_syn_ring_keeps_an_evenly_spaced_sample_of_a_burst():
    """400 SYNs wait in the SYN ring, every 20th from a trusted source; under
    pressure, one read keeps all 20 of those and SYN_MIN of the others (no
    other frames came), one every 380 / SYN_MIN in arrival order from some
    offset, not the first few (tail drop), and hands the other slots back."""
    n = 400
    with netns.pair(subnet=67) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()
        frames = [bytes(Ether(src="02:00:00:00:01:00", dst=dmac) /
                        IP(src="198.18.200.9" if k % 20 == 3 else "198.18.200.8", dst=link.server_ip)
                        / TCP(sport=20000 + k, dport=80, flags="S")) for k in range(n)]
        res = _read_what_is_sent(link, BURST, frames)
    assert res["stats"]["kernel_syn_packets"] == n and res["stats"]["kernel_syn_drops"] == 0
    kept = [bytes.fromhex(h) for h in res["kept"]]
    assert len(kept) == 20 + res["min"] and res["counters"]["rx_syn_shed"] == n - 20 - res["min"]
    idx = []
    for b in kept:
        assert b in frames                              # byte for byte one of the burst
        idx.append(frames.index(b))
    assert idx == sorted(idx)                           # in arrival order
    assert {k for k in idx if k % 20 == 3} == set(range(3, n, 20))      # every trusted one
    others = [k for k in range(n) if k % 20 != 3]
    pos = [others.index(k) for k in idx if k % 20 != 3]
    m = len(others)
    gaps = [b - a for a, b in zip(pos, pos[1:])] + [pos[0] + m - pos[-1]]   # around the ring
    step = m // res["min"]
    assert all(step - 1 <= g <= step + 1 for g in gaps), pos


RETRY = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from appliance.stack.rings import tpacket
dev = tpacket.TpacketDevice(sys.argv[1], syn_port=80, kernel_gate=False)
g = dev.syn_gate
g.pressure = True                                      # a flood, and no budget for first SYNs:
g.idle, g.rate, g.burst = 0, 0.0, 0                    # only retransmissions get through
print("READY", flush=True)
for k in range(2):
    sys.stdin.readline()                               # a burst was sent
    time.sleep(0.3)
    kept = [bytes(f).hex() for f in dev.rx_batch(0)]
    print(json.dumps({"kept": kept, "counters": dev.counters}), flush=True)
dev.close()
"""


def test_syn_ring_lets_a_retransmitted_syn_through_a_flood_and_not_a_copy_at_once():
    """Under pressure with no budget for first SYNs: a burst of 300 spoofed SYNs
    with a client's SYN in it, twice (a copy at once is not a retransmission),
    is all shed; ~1 s later the same SYN (addresses, ports, ISN) in a second
    burst of new spoofed SYNs is the one SYN handed to the stack, byte for byte,
    read through the real ring at the key's offsets."""
    with netns.pair(subnet=68) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        syn = _segs(dmac, link.server_ip, options=[("MSS", 1460)])
        client = syn("198.18.200.9", 41000, 123456789)
        flood = [[syn(f"198.19.{r}.{k % 250 + 1}", 20000 + k, 1000 * k + r) for k in range(300)] for r in (1, 2)]
        burst1 = flood[0][:150] + [client, client] + flood[0][150:]
        burst2 = flood[1][:100] + [client] + flood[1][100:]
        res = _read_in_rounds(link, RETRY, [burst1, burst2], pause=0.7)
    assert res[0]["kept"] == [] and res[0]["counters"]["rx_syn_shed"] == 302
    assert [bytes.fromhex(h) for h in res[1]["kept"]] == [client]
    assert res[1]["counters"]["rx_syn_shed"] == 302 + 300 and res[1]["counters"]["rx_syn_retransmits"] == 1


WRAP = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from appliance.stack.rings import tpacket
dev = tpacket.TpacketDevice(sys.argv[1], syn_port=80, kernel_gate=False)
g = dev.syn_gate
g.pressure = True
g.idle, g.rate, g.burst = 0, 0.0, 0                    # only the trusted source's SYNs get through
g.trusted[bytes([198, 18, 200, 9])] = None
print("READY", flush=True)
for k in range(int(sys.argv[3])):
    sys.stdin.readline()
    time.sleep(0.3)
    kept = [bytes(f).hex() for f in dev.rx_batch(0)]
    print(json.dumps({"kept": kept, "counters": dev.counters, "stats": dev.kernel_stats()}), flush=True)
dev.close()
"""


def test_syn_ring_is_read_in_runs_across_its_end():
    """Three bursts of 1,500 SYNs (4,500: past the 4,096 slots, so the reads wrap
    around the ring's end), every 10th from a trusted source: each read hands
    over exactly that burst's trusted SYNs, byte for byte and in order, and
    gives every other slot back (nothing is dropped by the kernel)."""
    rounds, per = 3, 1500
    with netns.pair(subnet=69) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()
        bursts = [[bytes(Ether(src="02:00:00:00:01:00", dst=dmac) /
                         IP(src="198.18.200.9" if k % 10 == 4 else f"198.19.{r}.{k % 250 + 1}", dst=link.server_ip)
                         / TCP(sport=10000 + k, dport=80, seq=r * 100000 + k, flags="S")) for k in range(per)]
                  for r in range(rounds)]
        res = _read_in_rounds(link, WRAP, bursts, args=(str(rounds),))
    for r, burst in enumerate(bursts):
        assert [bytes.fromhex(h) for h in res[r]["kept"]] == [f for k, f in enumerate(burst) if k % 10 == 4]
        assert res[r]["counters"]["rx_syn_shed"] == (r + 1) * per * 9 // 10
    assert res[-1]["stats"]["kernel_syn_packets"] == rounds * per and res[-1]["stats"]["kernel_syn_drops"] == 0


TRUST = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from appliance.stack.rings import tpacket
dev = tpacket.TpacketDevice(sys.argv[1], syn_port=80, kernel_gate=False)
g = dev.syn_gate
g.pressure = True
g.idle, g.rate, g.burst = 0, 0.0, 0                    # no budget for the flood's SYNs
changed = [dev.trust_sources([bytes([198, 18, 200, 9])]), dev.trust_sources([bytes([198, 18, 200, 9])])]
print("READY", flush=True)
res = []
for k in range(2):
    sys.stdin.readline()
    time.sleep(0.3)
    got = []
    while True:
        more = dev.rx_batch(256)
        if not more:
            break
        got += [bytes(f).hex() for f in more]
    res.append({"got": got, "stats": dict(dev.kernel_stats()), "counters": dict(dev.counters)})
    changed.append(dev.trust_sources([]))              # the second burst: no source trusted by the filter
    print(json.dumps(res[-1]), flush=True)
print(json.dumps({"changed": changed}), flush=True)
dev.close()
"""


def test_syn_ring_filter_sends_trusted_sources_syns_to_the_main_ring():
    """trust_sources(): a trusted client's SYNs (and its ACK) come through the
    main ring, in order and byte for byte, while a flood of 100 SYNs fills the
    SYN ring and is shed (no budget); the same filter without the source sends
    its SYNs to the SYN ring again (and, with no budget, they are shed too)."""
    with netns.pair(subnet=70) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        def seg(src, sport, flags):
            return bytes(Ether(src="02:00:00:00:01:00", dst=dmac) / IP(src=src, dst=link.server_ip)
                         / TCP(sport=sport, dport=80, seq=sport, flags=flags))
        flood = [seg(f"198.19.0.{k % 250 + 1}", 20000 + k, "S") for k in range(100)]
        client = [seg("198.18.200.9", 41000 + k, "S") for k in range(10)] + [seg("198.18.200.9", 41000, "A")]
        burst = flood[:50] + client[:5] + flood[50:] + client[5:]
        res = _read_in_rounds(link, TRUST, [burst, burst], tail=1)
    assert res[2]["changed"] == [True, False, True, False]
    first, second = res[0], res[1]
    assert [bytes.fromhex(h) for h in first["got"]] == client
    assert first["stats"]["kernel_syn_packets"] == 100 and first["counters"]["rx_syn_shed"] == 100
    assert [bytes.fromhex(h) for h in second["got"]] == client[-1:]          # only the ACK
    assert second["stats"]["kernel_syn_packets"] == 2 * 100 + 10
    assert second["counters"]["rx_syn_shed"] == 2 * 100 + 10


# -- the kernel gate (rings/ebpf.py): the SYN ring's eBPF filter under pressure --------------

KGATE = r"""
import ipaddress, json, sys, time
sys.path.insert(0, sys.argv[2])
from appliance.stack.rings import tpacket
args = json.loads(sys.argv[3])
dev = tpacket.TpacketDevice(sys.argv[1], syn_port=(80, 443), kernel_gate=args.get("gate", True))
tpacket.KGATE_LINGER = args.get("linger", tpacket.KGATE_LINGER)
g = dev.syn_gate
g.pressure = not args.get("start_calm")                # as the serve loop sets it during a flood
g.idle, g.rate, g.burst = args.get("py_idle", 0), 0.0, 0   # (the Python gate would keep nothing)
for a in args.get("known", []):                        # sources that completed a handshake (Stack.syn_trusted)
    p = ipaddress.ip_address(a).packed
    g.trusted[p[:8] if len(p) == 16 else p] = None     # (IPv6: the /64)
dev.rx_batch(0)                                        # the first read under pressure swaps the filter
trusted = [bytes(map(int, a.split("."))) for a in args.get("trusted", [])]
if trusted:
    dev.trust_sources(trusted)
print("READY", flush=True)
for k in range(args["rounds"]):
    sys.stdin.readline()
    time.sleep(0.3)
    if args.get("before", {}).get(str(k)) == "pressure":
        g.pressure = True
    syn = [bytes(f).hex() for f in dev.rx_batch(0)]    # the SYN ring alone
    main = []
    while True:
        more = dev.rx_batch(256)
        if not more:
            break
        main += [bytes(f).hex() for f in more]
    print(json.dumps({"syn": syn, "main": main, "gate": dev._kgate is not None, "on": dev._kgate_on,
                      "syn6": dev._syn6, "stats": dev.kernel_stats(), "counters": dev.counters}), flush=True)
    for action in args.get("after", {}).get(str(k), "").split():
        if action == "calm":                           # the flood is over: the gate passes every SYN
            g.pressure = False
            dev.rx_batch(0)
        elif action == "housekeep":                    # (once a second in the serve loop)
            dev.housekeep()
        elif action == "pressure":
            g.pressure = True
            dev.rx_batch(0)
        elif action == "untrust":
            dev.trust_sources([])
dev.close()
"""


def _kgate_rounds(link, bursts, pause=0.0, **args):
    args.setdefault("rounds", len(bursts))
    return _read_in_rounds(link, KGATE, bursts, args=(json.dumps(args),), pause=pause)


def test_kernel_gate_sorts_frames_exactly_as_the_classic_filter():
    """Under pressure (a budget for all): the crafted frames of every kind reach
    exactly the rings they reach without the gate, byte for byte, and the
    pure IPv6 SYNs the SYN ring too; the kernel gate kept the 6 SYNs as first
    SYNs and shed nothing."""
    with netns.pair(subnet=71) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()
        sent = _frames(dmac, link.server_ip)
        res, = _kgate_rounds(link, [[f for f, _ in sent.values()]], gate={"burst": 100})
    assert res["gate"]
    syn, main = _ours(res["syn"], sent), _ours(res["main"], sent)
    assert sorted(syn) == [i for i, (_, s) in sent.items() if s]          # the IPv6 SYNs as well
    assert sorted(main) == [i for i, (_, s) in sent.items() if not s]
    for i, b in {**syn, **main}.items():
        assert b == sent[i][0], i
    st = res["stats"]
    assert st["kernel_syn_packets"] == 6 and st["kernel_syn_first_kept"] == 6 and st["kernel_syn_shed"] == 0
    assert res["counters"]["rx_kernel_gates"] == 1 and res["counters"]["rx_syn_shed"] == 0


def test_kernel_gate_sheds_a_flood_in_the_kernel_and_lets_a_retransmission_through():
    """A first-SYN budget of one: of a burst of 300 spoofed SYNs with a client's
    SYN (twice: a copy at once) in it, only the burst's first SYN reaches the
    ring, the rest never does (kernel_syn_shed; the ring saw one packet).
    ~1 s later the client's SYN again, in a burst of new spoofed SYNs, is the
    one SYN in the ring, byte for byte (a retransmission); sent once more at
    once it is shed (answered once). When the flood is over the classic filter
    is back (housekeep(), the linger over), the gate's maps closed: every SYN
    reaches the ring again."""
    with netns.pair(subnet=72) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        syn = _segs(dmac, link.server_ip, options=[("MSS", 1460)])
        client = syn("198.18.200.9", 41000, 123456789)
        flood = [[syn(f"198.19.{r}.{k % 250 + 1}", 20000 + k, 1000 * k + r) for k in range(300)] for r in range(4)]
        bursts = [flood[0][:150] + [client, client] + flood[0][150:],
                  flood[1][:100] + [client] + flood[1][100:],
                  [client] + flood[2][:50],
                  flood[3][:20]]
        res = _kgate_rounds(link, bursts, pause=0.7, gate={"rate": 0.001, "burst": 1, "retry_min": 0.5},
                            after={"2": "calm housekeep"}, linger=0.0)
    got = [[bytes.fromhex(h) for h in r["syn"]] for r in res]
    assert got[0] == [flood[0][0]]                      # the budget's one SYN
    assert got[1] == [client]                           # the retransmission
    assert got[2] == []                                 # answered once
    calm = [bytes.fromhex(h) for h in res[3]["main"]]   # (a calm read takes the SYN ring with the others)
    assert got[3] == [] and sorted(calm) == sorted(flood[3][:20]) and not res[3]["gate"]
    st = [r["stats"] for r in res]
    assert [s["kernel_syn_packets"] for s in st] == [1, 2, 2, 22]
    assert [s["kernel_syn_shed"] for s in st] == [301, 601, 652, 652]
    assert st[3]["kernel_syn_retransmits"] == 1 and st[3]["kernel_syn_first_kept"] == 1
    assert all(r["main"] == [] for r in res[:3]) and res[3]["counters"]["rx_syn_shed"] == 0


def test_kernel_gate_leaves_trusted_sources_syns_to_the_main_ring():
    """trust_sources() under the kernel gate: a trusted client's SYNs come through
    the main ring while the flood around them is shed in the kernel; once the
    source is no longer trusted its SYNs meet the (spent) budget and are shed."""
    with netns.pair(subnet=73) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        mk = _segs(dmac, link.server_ip)

        def seg(src, sport, flags, seq=0):
            return mk(src, sport, seq or sport, flags)
        flood = [[seg(f"198.19.{r}.{k % 250 + 1}", 20000 + k, "S", 7 + r) for k in range(100)] for r in range(2)]
        client = [seg("198.18.200.9", 41000 + k, "S") for k in range(10)] + [seg("198.18.200.9", 41000, "A")]
        bursts = [flood[r][:50] + client[:5] + flood[r][50:] + client[5:] for r in range(2)]
        res = _kgate_rounds(link, bursts, gate={"rate": 0.001, "burst": 1}, trusted=["198.18.200.9"],
                            after={"0": "untrust"})
    first, second = res
    assert [bytes.fromhex(h) for h in first["main"]] == client
    assert [bytes.fromhex(h) for h in first["syn"]] == [flood[0][0]]
    assert first["stats"]["kernel_syn_to_main"] == 10 and first["stats"]["kernel_syn_shed"] == 99
    assert [bytes.fromhex(h) for h in second["main"]] == client[-1:]          # only the ACK
    assert second["syn"] == [] and second["stats"]["kernel_syn_shed"] == 99 + 110


def _fate(f: bytes, ports=(80, 443), v6: bool = True) -> str:
    """Where the two filters put frame `f`: "syn" (the SYN ring), "main", or
    "none" (a load past its end: both drop it), step by step as they read it;
    `v6`: IPv6 SYNs take the SYN ring (the kernel gate is there)."""
    def load(off, n):
        if off + n > len(f):
            raise IndexError
        return int.from_bytes(f[off:off + n], "big")
    try:
        if v6 and load(12, 2) == 0x86DD:                # IPv6 (the kernel gate's SYN ring has them)
            if load(20, 1) != 6 or load(56, 2) not in ports:
                return "main"
            return "syn" if load(67, 1) & 0x16 == 0x02 else "main"
        if load(12, 2) != 0x0800 or load(23, 1) != 6 or load(20, 2) & 0x1FFF:
            return "main"
        x = 4 * (load(14, 1) & 0xF)
        if load(x + 16, 2) not in ports:
            return "main"
        if load(x + 27, 1) & 0x16 != 0x02:
            return "main"
        load(41, 1)                                     # (the SYN key's last byte: bytes 26-42)
        return "syn"
    except IndexError:
        return "none"


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-gate", "classic"])
def test_fuzz_mutated_frames_land_where_a_model_of_the_filters_puts_them(kernel):
    """1,200 SYNs to 80/443 (IPv4 with random IP options, and IPv6) mutated at
    random (bytes of the Ethernet, IP and TCP headers flipped, frames cut
    short) go through the kernel gate under pressure, or the classic filters
    (a budget for all): every frame is in the ring one reference model of
    both gives it (or in none when a read runs past its end), byte for
    byte; the program never fails a frame."""
    import random
    rng = random.Random(11)
    with netns.pair(subnet=74) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()
        sent = {}
        bursts = []
        for r in range(4):                      # (fewer SYNs a round than the 256 a read hands over)
            burst = []
            for k in range(300):
                i = r * 300 + k
                opts = bytes(rng.randrange(256) for _ in range(4 * rng.randrange(3)))
                tcp = TCP(sport=rng.randrange(1024, 65536), dport=rng.choice((80, 443)),
                          seq=rng.randrange(1 << 32), flags="S", options=[("MSS", 1460)])
                if k % 3 == 2:
                    pkt = IPv6(src=f"2001:2:0:{rng.randrange(1 << 16):x}::{rng.randrange(1, 1 << 16):x}",
                               dst="2001:2::1") / tcp
                else:
                    pkt = IP(src=f"198.19.{rng.randrange(256)}.{rng.randrange(1, 255)}", dst=link.server_ip,
                             options=opts) / tcp
                f = bytearray(bytes(Ether(src="02:00:ff:00:%02x:%02x" % (i >> 8, i & 255), dst=dmac) / pkt))
                for _ in range(rng.randrange(4)):
                    f[rng.randrange(12, len(f))] = rng.randrange(256)
                if rng.random() < 0.25:
                    f = f[:rng.randrange(15, len(f))]
                sent[i] = bytes(f)
                burst.append(bytes(f))
            bursts.append(burst)
        res = _kgate_rounds(link, bursts, gate={"burst": 100000} if kernel else False, py_idle=1000)

    def ours(frames):
        got = {}
        for h in frames:
            b = bytes.fromhex(h)
            if b[6:9] == b"\x02\x00\xff":
                i = (b[10] << 8) | b[11]
                assert i in sent and i not in got and b == sent[i], i
                got[i] = b
        return got
    syn = {i for r in res for i in ours(r["syn"])}
    main = {i for r in res for i in ours(r["main"])}
    fate = {i: _fate(f, v6=kernel) for i, f in sent.items()}
    assert syn == {i for i, v in fate.items() if v == "syn"}
    assert main == {i for i, v in fate.items() if v == "main"}
    assert len(syn) > 300 and len(main) > 150 and 0 < sum(v == "none" for v in fate.values()) < 300
    assert res[-1]["stats"]["kernel_syn_shed"] == 0 and res[-1]["stats"]["kernel_syn_drops"] == 0
    assert res[-1]["counters"]["rx_syn_shed"] == 0


def test_kernel_gate_memory_is_bounded_and_forgets_the_oldest_first():
    """A gate that remembers 256 SYNs: a client's SYN followed by 2,000 spoofed
    ones is forgotten by the time it is retransmitted (a first SYN again: shed,
    no budget), while one seen after them is still known (a retransmission)."""
    with netns.pair(subnet=75) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        syn = _segs(dmac, link.server_ip)
        early, late = syn("198.18.200.9", 41000, 111), syn("198.18.200.10", 41001, 222)
        flood = [syn(f"198.19.{k // 250}.{k % 250 + 1}", 20000 + k, k) for k in range(2000)]
        res = _kgate_rounds(link, [flood[:1] + [early] + flood[1:] + [late], [early, late]], pause=0.7,
                            gate={"rate": 0.001, "burst": 1, "recent": 256})
    assert [bytes.fromhex(h) for h in res[0]["syn"]] == flood[:1]
    assert [bytes.fromhex(h) for h in res[1]["syn"]] == [late]
    assert res[1]["stats"]["kernel_syn_retransmits"] == 1 and res[1]["stats"]["kernel_syn_shed"] == 2001 + 1


def test_kernel_gate_keeps_every_syn_of_a_source_that_completed_a_handshake():
    """The stack's other trusted sources (syn_trusted, beyond the main ring's
    filter): under the kernel gate with no budget left, each of their SYNs
    reaches the SYN ring, in order and byte for byte, while the flood around
    them is shed."""
    with netns.pair(subnet=76) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        syn = _segs(dmac, link.server_ip)
        flood = [syn(f"198.19.0.{k % 250 + 1}", 20000 + k) for k in range(300)]
        known = [syn("198.18.200.11", 42000 + k) for k in range(5)] + [syn("198.18.200.12", 43000)]
        burst = flood[:1] + known[:3] + flood[1:150] + known[3:] + flood[150:]
        res, = _kgate_rounds(link, [burst], gate={"rate": 0.001, "burst": 1},
                             known=["198.18.200.11", "198.18.200.12"])
    assert [bytes.fromhex(h) for h in res["syn"]] == flood[:1] + known
    st = res["stats"]
    assert st["kernel_syn_trusted"] == 6 and st["kernel_syn_shed"] == 299 and st["kernel_syn_to_main"] == 0


def test_kernel_gate_sheds_an_ipv6_flood_and_keeps_ipv6_retransmissions_and_known_sources():
    """IPv6 SYNs take the SYN ring with the kernel gate: of an IPv6 flood only the
    budget's one SYN gets through; a known IPv6 source's SYNs (syn_trusted, 16
    bytes) all do; a client's SYN shed in the first burst is kept ~1 s later
    (a retransmission: the same addresses, ports and ISN)."""
    with netns.pair(subnet=77) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        syn6 = _segs(dmac, link.server_ip, dport=443, options=[("MSS", 1440)])
        flood = [[syn6(f"2001:2:0:{r + 1:x}::{k + 1:x}", 20000 + k, k) for k in range(200)] for r in range(2)]
        client = syn6("2001:2:0:99::9", 41000, 987654321)
        known = [syn6("2001:2:0:77::7", 42000 + k, k) for k in range(3)]
        bursts = [flood[0][:1] + [client] + flood[0][1:100] + known + flood[0][100:],
                  flood[1][:50] + [client] + flood[1][50:]]
        res = _kgate_rounds(link, bursts, pause=0.7, gate={"rate": 0.001, "burst": 1}, known=["2001:2:0:77::7"])
    got = [[bytes.fromhex(h) for h in r["syn"]] for r in res]
    assert got[0] == flood[0][:1] + known
    assert got[1] == [client]
    st = res[1]["stats"]
    assert st["kernel_syn_trusted"] == 3 and st["kernel_syn_retransmits"] == 1 and st["kernel_syn_shed"] == 200 + 200
    assert all(r["main"] == [] for r in res)


def test_kernel_gate_bounds_each_trusted_source_and_lingers_after_a_flood():
    """A known source (syn_trusted) gets its own bucket in the kernel: of 40 SYNs
    at once, keep_burst (8) are kept, the rest meet the spent budget and are
    shed. When the flood ends the gate stays, passing every SYN but those the
    main ring's filter takes (one copy each), until housekeep() after the
    linger; a new flood then gets a new gate."""
    with netns.pair(subnet=78) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        syn = _segs(dmac, link.server_ip)
        flood = [syn(f"198.19.0.{k % 250 + 1}", 20000 + k) for k in range(100)]
        known = [syn("198.18.200.11", 42000 + k) for k in range(40)]
        main = [syn("198.18.200.9", 43000 + k) for k in range(5)]
        bursts = [flood[:1] + known + flood[1:],
                  flood[:30] + main,                    # the flood is over, the gate lingers
                  flood[30:40],                         # after housekeep: the classic filter
                  flood[40:41]]                         # a new flood
        res = _kgate_rounds(link, bursts, gate={"rate": 0.001, "burst": 1, "keep_burst": 8},
                            known=["198.18.200.11", "198.18.200.9"], trusted=["198.18.200.9"],
                            after={"0": "calm", "1": "housekeep", "2": "pressure"}, linger=0.0)
    got = [[bytes.fromhex(h) for h in r["syn"] + r["main"]] for r in res]
    assert got[0] == flood[:1] + known[:8]
    assert res[0]["stats"]["kernel_syn_trusted"] == 8 and res[0]["stats"]["kernel_syn_shed"] == 32 + 99
    assert res[1]["gate"] and not res[1]["on"]
    assert sorted(got[1]) == sorted(flood[:30] + main)   # every SYN, the trusted ones once (main ring)
    assert [bytes.fromhex(h) for h in res[1]["main"]][:5] == main
    assert not res[2]["gate"] and sorted(got[2]) == sorted(flood[30:40])
    assert res[3]["gate"] and res[3]["on"] and res[3]["counters"]["rx_kernel_gates"] == 2   # a new gate


def test_kernel_gate_sorts_what_the_ring_held_before_it_through_the_python_gate():
    """SYNs that waited in the ring when the flood began (let in by the classic
    filter) go through the Python gate once (no budget here: all shed), not
    to the stack unsorted."""
    with netns.pair(subnet=79) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()
        flood = [bytes(Ether(src="02:00:00:00:01:00", dst=dmac) / IP(src=f"198.19.1.{k % 250 + 1}",
                                                                     dst=link.server_ip)
                       / TCP(sport=20000 + k, dport=80, seq=k, flags="S")) for k in range(300)]
        res, = _kgate_rounds(link, [flood], start_calm=True, before={"0": "pressure"})
    assert res["gate"] and res["syn"] == [] and res["main"] == []
    assert res["counters"]["rx_syn_shed"] == 300 and res["stats"]["kernel_syn_packets"] == 300


def test_without_the_kernel_gates_maps_ipv6_syns_go_back_to_the_main_ring():
    """Where the gate's maps cannot be made (here: too large, E2BIG), the device
    counts the error, keeps the Python gate for IPv4 SYNs (the trusted
    source's kept, the flood's shed) and sends IPv6 SYNs to the main ring."""
    with netns.pair(subnet=80) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        def seg(ip):
            return bytes(Ether(src="02:00:00:00:01:00", dst=dmac) / ip / TCP(sport=41000, dport=80, flags="S"))
        flood = [seg(IP(src=f"198.19.1.{k + 1}", dst=link.server_ip)) for k in range(50)]
        v4, v6 = seg(IP(src="198.18.200.11", dst=link.server_ip)), seg(IPv6(src="2001:2::9", dst="2001:2::1"))
        res, = _kgate_rounds(link, [flood[:25] + [v4, v6] + flood[25:]], gate={"recent": 1 << 30},
                             known=["198.18.200.11"])
    assert not res["gate"] and not res["syn6"] and res["counters"]["rx_kernel_gate_errors"] >= 1
    assert [bytes.fromhex(h) for h in res["syn"]] == [v4]
    assert [bytes.fromhex(h) for h in res["main"]] == [v6]
    assert res["counters"]["rx_syn_shed"] == 50


def test_kernel_gate_remembers_the_syns_it_passes_while_it_lingers():
    """After a flood the gate passes every SYN but remembers it: a client's SYN
    sent then (which a ring full of a resuming flood may drop) is known as a
    retransmission when it comes again under pressure, ~1 s later."""
    with netns.pair(subnet=81) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()

        syn = _segs(dmac, link.server_ip)
        client = syn("198.18.200.9", 41000, 4242)
        flood = [syn(f"198.19.2.{k % 250 + 1}", 20000 + k, k) for k in range(100)]
        res = _kgate_rounds(link, [flood[:50], [client], flood[50:] + [client]], pause=0.7,
                            gate={"rate": 0.001, "burst": 1}, after={"0": "calm", "1": "pressure"})
    got = [[bytes.fromhex(h) for h in r["syn"] + r["main"]] for r in res]
    assert got[0] == flood[:1] and got[1] == [client]          # passed while the gate lingered
    # (the first-SYN bucket starts full again with the pressure: the flood's first SYN)
    assert got[2] == [flood[50], client] and res[2]["stats"]["kernel_syn_retransmits"] == 1


SWAPS = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from appliance.stack.rings import tpacket
tpacket.KGATE_LINGER = 0.0
dev = tpacket.TpacketDevice(sys.argv[1], syn_port=80, kernel_gate={"burst": 1000000, "recent": 4096})
g = dev.syn_gate
g.idle = 100000                                        # the Python gate (the swap's backlog) keeps all too
got = []
swaps = 0
print("READY", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    g.pressure = not g.pressure                        # a flood begins (the gate swapped in) or ends
    got += [bytes(f)[34:42].hex() for f in dev.rx_batch(0)]
    if not g.pressure:
        dev.housekeep()                                # (linger 0: the classic filter at once)
    swaps += 1
    t = time.monotonic() + 0.02
    while time.monotonic() < t:
        got += [bytes(f)[34:42].hex() for f in dev.rx_batch(256)]
g.pressure = False
got += [bytes(f)[34:42].hex() for f in dev.rx_batch(0)]
dev.housekeep()
time.sleep(0.2)
while True:
    more = dev.rx_batch(256)
    if not more:
        break
    got += [bytes(f)[34:42].hex() for f in more]
print(json.dumps({"got": got, "swaps": swaps, "gates": dev.counters["rx_kernel_gates"],
                  "stats": dev.kernel_stats()}), flush=True)
dev.close()
"""

PACED = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((sys.argv[1], 0))
frames = [bytes.fromhex(h) for h in sys.stdin.read().split()]
t0 = time.monotonic()
for k, f in enumerate(frames):                         # paced over the reader's swaps
    s.send(f)
    ahead = t0 + k * float(sys.argv[2]) - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
"""


def test_swapping_filters_under_traffic_loses_and_doubles_no_syn():
    """3,000 SYNs (IPv4 and IPv6) sent over ~1.5 s while the reader swaps the
    SYN ring's filter between the classic one and the kernel gate every 20 ms
    (a budget for all): every SYN arrives exactly once, from one ring or the
    other (SO_ATTACH_FILTER / SO_ATTACH_BPF swap atomically)."""
    with netns.pair(subnet=82) as link:
        dmac = link.server.run(["cat", f"/sys/class/net/{link.server_if}/address"]).stdout.strip()
        syn = _segs(dmac, link.server_ip)
        frames = [syn(f"2001:2:0:5::{k + 1:x}" if k % 4 == 3 else f"198.19.3.{k % 250 + 1}", 10000 + k, k)
                  for k in range(3000)]
        reader = link.server.popen([sys.executable, "-c", SWAPS, link.server_if, ROOT, "2.0"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if reader.stdout.readline().strip() != "READY":
                pytest.fail("the ring reader failed: " + reader.communicate(timeout=20)[1][-2000:])
            link.client.run([sys.executable, "-c", PACED, link.client_if, "0.0005"],
                            input=" ".join(f.hex() for f in frames), text=True, timeout=30)
            out, err = reader.communicate(timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    assert reader.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    # bytes 34-42: the IPv4 ports and ISN; for IPv6 part of the source (unique per frame here too)
    want = sorted(f[34:42].hex() for f in frames)
    got = sorted(h for h in res["got"] if h in set(want))
    assert res["swaps"] > 20 and res["gates"] > 10
    assert res["stats"]["kernel_syn_drops"] == 0 and res["stats"]["kernel_rx_drops"] == 0
    assert got == want                                   # each once: none lost, none doubled
