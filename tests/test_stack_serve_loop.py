"""The serve loop and the pcap recorder on the in-memory device (no root needed)."""
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from appliance.stack.rings.base import GSO, Offload
from appliance.stack.rings.memory import MemoryLink, virtio_complete
from appliance.stack.rings.pcap import PcapDevice
from appliance.stack.serve import parse_mac, run_loop

from .stack_support import CLIENT_IP, CLIENT_MAC, SERVER_IP, SERVER_MAC, make_stack, make_store


def _stop_after(n):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > n
    return stop


def test_loop_answers_arp_and_syn_in_one_batch(tmp_path):
    store = make_store(tmp_path)
    link = MemoryLink(mac=parse_mac(SERVER_MAC))
    st = make_stack(store)
    link.peer.send(bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") /
                         ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT_IP, pdst=SERVER_IP)))
    link.peer.send(bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                         TCP(sport=40000, dport=80, flags="S", seq=1000, options=[("MSS", 1460)])))
    run_loop(st, link.dev, _stop_after(1))
    out = [Ether(f) for f in link.peer.recv()]
    assert any(ARP in p and p[ARP].op == 2 and p[ARP].psrc == SERVER_IP for p in out)
    synack = [p for p in out if TCP in p and p[TCP].flags == "SA"]
    assert len(synack) == 1 and synack[0][TCP].ack == 1001
    assert st.txq == []                      # drained into the device
    assert st.counters["loop_stack_errors"] == 0


def test_loop_counts_exceptions_out_of_the_stack_and_goes_on(tmp_path):
    store = make_store(tmp_path)
    link = MemoryLink(mac=parse_mac(SERVER_MAC))
    st = make_stack(store)
    real = st.receive
    seen = []

    def flaky(frame, now):
        seen.append(bytes(frame))
        if len(seen) == 1:
            raise RuntimeError("boom")
        real(frame, now)
    st.receive = flaky
    for _ in range(2):
        link.peer.send(bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") /
                             ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT_IP, pdst=SERVER_IP)))
    run_loop(st, link.dev, _stop_after(1))
    assert len(seen) == 2
    assert st.counters["loop_stack_errors"] == 1
    assert sum(1 for f in link.peer.recv() if ARP in Ether(f)) == 1


def test_parse_mac_rejects_garbage():
    assert parse_mac("02:00:00:00:00:0a") == b"\x02\x00\x00\x00\x00\x0a"
    for bad in ("02:00:00", "zz:00:00:00:00:00", "0200.0000.0001"):
        with pytest.raises(ValueError, match="bad MAC address"):
            parse_mac(bad)


def _tcp_frame(payload_len, gso_size):
    pkt = (Ether(src=SERVER_MAC, dst=CLIENT_MAC) / IP(src=SERVER_IP, dst=CLIENT_IP, id=5) /
           TCP(sport=80, dport=40000, seq=1, ack=1, flags="PA"))
    raw = bytearray(bytes(pkt))
    raw[16:18] = (20 + 20 + payload_len).to_bytes(2, "big")
    raw[24:26] = b"\0\0"
    ipsum = int.from_bytes(raw[14:34], "big") % 0xFFFF
    raw[24:26] = ((~ipsum) & 0xFFFF).to_bytes(2, "big")
    pseudo = (int.from_bytes(raw[26:34], "big") + 6 + 20 + payload_len) % 0xFFFF
    raw[50:52] = pseudo.to_bytes(2, "big")          # CHECKSUM_PARTIAL: folded pseudo sum
    payload = memoryview(bytes(range(256)) * (payload_len // 256 + 1))[:payload_len]
    return (bytes(raw), payload, GSO(34, 16, gso_size, 54))


def test_pcap_records_both_directions_as_on_the_wire(tmp_path):
    path = str(tmp_path / "x.pcap")
    link = MemoryLink(mac=parse_mac(SERVER_MAC), offload=Offload(True, True))
    dev = PcapDevice(link.dev, path)
    assert dev.mac == link.dev.mac and dev.offload == Offload(True, True) and dev.fileno() == -1
    arp = bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") /
                ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT_IP, pdst=SERVER_IP))
    link.peer.send(arp)
    assert [bytes(f) for f in dev.rx_batch()] == [arp]
    frame = _tcp_frame(4000, 1448)
    assert dev.tx_batch([frame]) == 1
    dev.close()
    pkts = rdpcap(path)
    assert bytes(pkts[0]) == arp
    segs = pkts[1:]
    assert [bytes(p) for p in segs] == virtio_complete(frame) == link.peer.recv()
    assert [len(p[TCP].payload) for p in segs] == [1448, 1448, 1104]
    for p in segs:                           # scapy agrees with every recorded checksum
        q = Ether(bytes(p))
        sums = (q[IP].chksum, q[TCP].chksum)
        del q[IP].chksum, q[TCP].chksum
        q = Ether(bytes(q))
        assert (q[IP].chksum, q[TCP].chksum) == sums


def test_overloaded_batch_puts_other_frames_first_and_keeps_a_fair_share_of_syns():
    import random
    from collections import Counter
    from appliance.stack.rings.base import SynGate
    from appliance.stack.serve import _shed_syns

    def seg(i, flags, src=CLIENT_IP):
        return memoryview(bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=src, dst=SERVER_IP) /
                                TCP(sport=1000 + i, dport=80, flags=flags)))
    gate = SynGate(share=1, rng=random.Random(7))       # one SYN per other frame, no tokens (no time passes)
    gate.pressure = True                                # (the stack's SYN backlog overflowed: a flood)
    allow = 40
    template = [seg(i, "S" if i % 5 else "A") for i in range(200)]   # 160 SYNs, 40 ACKs
    kept = Counter()
    for _ in range(400):
        frames = list(template)
        oks = [i % 2 == 0 for i in range(200)]
        assert _shed_syns(frames, oks, gate, 5.0) == 160 - allow
        order = [int.from_bytes(f[34:36], "big") - 1000 for f in frames]   # the source port
        # the other frames first, all of them, in arrival order; then the SYNs kept
        assert order[:40] == list(range(0, 200, 5))
        syn_pos = [i for i in range(200) if i % 5]
        picked = [syn_pos.index(i) for i in order[40:]]
        gaps = {(b - a) % 160 for a, b in zip(picked, picked[1:] + picked[:1])}
        assert len(set(picked)) == allow and gaps <= {160 // allow, -(-160 // allow)}   # evenly spread
        assert oks == [i % 2 == 0 for i in order]                     # still aligned with the frames
        kept.update(order[40:])
    # every SYN, first or last in the batch, is kept with the same odds (allow / 160 = 1/4)
    assert len(kept) == 160 and min(kept.values()) > 400 * allow / 160 * 0.6
    assert max(kept.values()) < 400 * allow / 160 * 1.4
    # a gate of one untrusted SYN per 8 other frames; a source that completed a
    # handshake before (the stack's syn_trusted) is never shed, wherever its SYNs are
    gate = SynGate(share=8, rate=0.0, burst=0, rng=random.Random(7))
    gate.pressure = True
    gate.trusted[bytes([198, 18, 0, 9])] = None
    mixed = [seg(i, "S", "198.19.0.%d" % (i % 200 + 1)) if i % 4 else seg(i, "S" if i % 8 else "A", "198.18.0.9")
             for i in range(256)]
    assert _shed_syns(mixed, None, gate, 5.0) == 192 - 4
    srcs = [bytes(f[26:30]) for f in mixed]
    assert srcs.count(bytes([198, 18, 0, 9])) == 64 and len(mixed) == 64 + 4      # 32 ACKs: 4 flood SYNs
    assert [int.from_bytes(f[34:36], "big") - 1000 for f in mixed[:32]] == list(range(0, 256, 8))   # ACKs first
    # SYN-ACKs, RSTs and non-TCP frames are never shed
    other = [seg(i, "SA") for i in range(100)] + [seg(i, "R") for i in range(100)]
    assert _shed_syns(other, None, gate, 5.0) == 0 and len(other) == 200
    # no flood (no pressure): every SYN is kept, up to the gate's quota
    gate.pressure = False
    mixed = [seg(i, "S", "198.19.0.%d" % (i % 200 + 1)) if i % 4 else seg(i, "A") for i in range(256)]
    assert _shed_syns(mixed, None, gate, 5.0) == 0 and len(mixed) == 256


def test_loop_hands_a_tpacket_device_its_ipv4_trusted_sources_and_housekeeps_once_a_second(tmp_path):
    """Under pressure, once a second: trust_sources() gets the most recent IPv4
    sources of syn_trusted (not its IPv6 /64s: the classic filters compare one
    word) and housekeep() runs (the kernel gate's end after a flood)."""
    store = make_store(tmp_path)
    link = MemoryLink(mac=parse_mac(SERVER_MAC))
    st = make_stack(store)
    st._pressure_until = float("inf")                 # a flood
    v4a, v4b, net6 = bytes([198, 18, 0, 7]), bytes([198, 18, 0, 8]), bytes.fromhex("2001000200000077")
    for a in (v4a, net6, v4b):
        st.syn_trusted[a] = None
    calls = {"trust": [], "housekeep": 0}

    class Dev:
        def __getattr__(self, name):
            return getattr(link.dev, name)

        def trust_sources(self, sources):
            calls["trust"].append(list(sources))

        def housekeep(self):
            calls["housekeep"] += 1
    t = [100.0]

    def clock():
        t[0] += 0.25
        return t[0]
    run_loop(st, Dev(), _stop_after(12), clock=clock)
    # (the once-a-second block follows the wall clock's seconds: with a fake monotonic
    # clock it runs more often; the first pass has not seen the pressure yet)
    assert calls["housekeep"] >= 2 and len(calls["trust"]) == calls["housekeep"] - 1
    assert all(s == [v4b, v4a] for s in calls["trust"])     # the newest first, IPv4 only
