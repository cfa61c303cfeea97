"""A full TX ring is backpressure, not loss (rings/tpacket.py `tx_pending`, serve.run_loop).

The TPACKET device runs here on a fake kernel (no root, no interface): its
TX ring lives in an anonymous mmap, the kick (`send`) walks the ring like
tpacket_snd() does and either frees a slot at once or holds it (a slow
reader on veth keeps the skb, and so the slot), and the ring-less copy
socket answers ENOBUFS while "full". Frames come from a real Stack serving
a 24 KB reply, and what leaves must be exactly those frames, in order.
"""
import collections
import errno
import mmap
import struct
import time

from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether

from appliance.stack.rings import tpacket
from appliance.stack.rings.base import frame_bytes
from appliance.stack.rings.tpacket import TpacketDevice
from appliance.stack.serve import run_loop

from .stack_support import Client, expected, make_stack, make_store

SLOT = 2048


class FakeKernel:
    """The kernel's side of a TX ring of `nslots` slots and of the copy socket."""

    def __init__(self, mm, nslots):
        self.mm = mm
        self.nslots = nslots
        self.head = 0
        self.hold = False          # a kicked slot stays SENDING (its skb is not freed yet)
        self.full = False          # the copy socket's buffer is full: ENOBUFS
        self.wire = []             # frames that left, in order
        self.held = []

    def send(self, data, flags=0):          # the kick: tpacket_snd()
        while True:
            off = self.head * SLOT
            status, length = struct.unpack_from("=II", self.mm, off)
            if status != tpacket.TP_STATUS_SEND_REQUEST:
                return 0
            d = off + tpacket.TPACKET2_DATA
            self.wire.append(bytes(self.mm[d:d + length]))
            if self.hold:
                struct.pack_into("=I", self.mm, off, 2)           # TP_STATUS_SENDING
                self.held.append(off)
            else:
                struct.pack_into("=I", self.mm, off, tpacket.TP_STATUS_AVAILABLE)
            self.head = (self.head + 1) % self.nslots

    def sendmsg(self, parts, anc, flags=0):  # the ring-less copy socket
        if self.full:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        data = b"".join(bytes(p) for p in parts)
        self.wire.append(data)
        return len(data)

    def release(self):
        """The slow reader caught up: held skbs are freed, buffers drain."""
        for off in self.held:
            struct.pack_into("=I", self.mm, off, tpacket.TP_STATUS_AVAILABLE)
        self.held = []
        self.hold = self.full = False


def fake_device(nslots=4):
    dev = TpacketDevice.__new__(TpacketDevice)
    mm = mmap.mmap(-1, nslots * SLOT)
    k = FakeKernel(mm, nslots)
    dev.mm = mm
    dev.tx_slots = [i * SLOT for i in range(nslots)]
    dev.tx_nr = nslots
    dev.tx_head = 0
    dev.tx_size = SLOT
    dev.max_frame = SLOT - tpacket.TPACKET2_DATA
    dev.vnet = False
    dev.direct_min = tpacket.DIRECT_MIN
    dev.counters = collections.defaultdict(int)
    dev.tx_pending = []
    dev.sock = k
    dev._csock = k
    dev._socks = []
    dev._rx = []
    dev._mm = []
    dev._epoll = None
    dev.mtu = 1500
    dev._kgate = None                  # (no SYN ring: housekeep has nothing to do)
    dev.rx_batch = lambda max_frames=256: []
    dev.fileno = lambda: -1
    return dev, k


def reply_frames(tmp_path):
    """The frames (in order) of a 24 KB reply's initial window: 10 MSS segments."""
    st = make_stack(make_store(tmp_path), rto_initial=30.0, rto_min=30.0)   # no RTO during a test
    c = Client(st, now=time.monotonic())          # the serve loop's clock: no timer is due
    c.connect()
    st.receive(memoryview(bytes(c.seg("PA", data=c.request("/big.bin")))), c.now)
    frames = list(st.txq)
    st.txq.clear()
    assert len(frames) == 10
    return st, c, frames


def test_full_ring_and_socket_keep_frames_in_order_until_room(tmp_path):
    st, c, frames = reply_frames(tmp_path)
    dev, k = fake_device(4)
    k.hold = k.full = True
    assert dev.tx_batch(frames[:7]) == 7           # accepted: 4 into the ring, 3 waiting
    assert len(k.wire) == 4 and len(dev.tx_pending) == 3
    assert dev.tx_batch(frames[7:]) == 3           # still no room: they queue behind
    assert len(k.wire) == 4 and len(dev.tx_pending) == 6
    k.release()
    dev.tx_batch([])                               # the next pass: the waiting frames go first
    assert dev.tx_pending == []
    assert k.wire == [frame_bytes(f) for f in frames]
    assert dev.counters["tx_dropped_full"] == 0 and dev.counters["tx_dropped_error"] == 0
    assert dev.counters["tx_deferred"] == 3 + 6
    # the bytes on the wire are the reply's first 10 segments, nothing missing
    body = b"".join(bytes(Ether(w)[TCP].payload) for w in k.wire)
    assert body == expected(st.store, "/big.bin")[:len(body)] and len(body) == 10 * 1460


def test_serve_loop_retries_waiting_frames_without_new_output(tmp_path):
    """No retransmission needed: the loop keeps calling tx_batch while frames wait,
    even when the stack has nothing new to send."""
    st, c, frames = reply_frames(tmp_path)
    dev, k = fake_device(4)
    k.hold = k.full = True
    st.txq.extend(frames)
    passes = {"n": 0}

    def stop():
        passes["n"] += 1
        if passes["n"] == 3:
            k.release()                            # room again after two passes
        return passes["n"] > 4
    run_loop(st, dev, stop)
    assert k.wire == [frame_bytes(f) for f in frames]
    assert dev.tx_pending == [] and dev.counters["tx_dropped_full"] == 0
    assert st.counters["tcp_retransmits"] == 0


def test_a_frame_the_socket_refuses_for_good_is_dropped_and_counted(tmp_path):
    st, c, frames = reply_frames(tmp_path)
    dev, k = fake_device(2)
    k.hold = True
    real = k.sendmsg
    calls = {"n": 0}

    def refuse_first(parts, anc, flags=0):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EMSGSIZE, "Message too long")
        return real(parts, anc, flags)
    k.sendmsg = refuse_first
    assert dev.tx_batch(frames[:4]) == 3
    assert dev.counters["tx_dropped_error"] == 1 and dev.tx_pending == []
    assert k.wire == [frame_bytes(f) for f in frames[:2] + frames[3:4]]


def test_waiting_frames_beyond_the_limit_are_dropped_and_counted(tmp_path, monkeypatch):
    st, c, frames = reply_frames(tmp_path)
    monkeypatch.setattr(tpacket, "PENDING_MAX", 5)
    dev, k = fake_device(2)
    k.hold = k.full = True
    assert dev.tx_batch(frames) == 7               # 2 in the ring, 5 waiting, 3 dropped
    assert len(dev.tx_pending) == 5 and dev.counters["tx_dropped_full"] == 3
    k.release()
    dev.tx_batch([])
    assert k.wire == [frame_bytes(f) for f in frames[:7]]
