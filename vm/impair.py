"""An impairment link of our own: a two-port frame forwarder with seeded loss,
duplication and reordering (the host kernel has no netem).

Theory of operation: run inside a middle network namespace holding one end
of two veth pairs (`--a` and `--b`, both up, no addresses). One AF_PACKET
socket per port receives every frame and the forwarder sends it out of the
other port, possibly dropped, duplicated or held back. Senders on veth hand
over checksum-partial frames and TSO super-frames (up to 64 KB); each socket
sets PACKET_VNET_HDR so the kernel tells us so, and the forwarder completes
the checksum and cuts super-frames into MSS segments exactly as a NIC would
(`appliance.stack.rings.memory.virtio_complete`) before impairing them one
wire frame at a time. Only IPv4 frames are impaired (ARP passes), so the
test measures TCP recovery and not ARP retry timers.

Reordering: a frame chosen for it is held and released after the next
frame in the same direction (or after `hold` seconds), i.e. swapped with its
successor. All random choices come from one `random.Random(seed)`, so a run
with the same traffic makes the same choices.

    python -m vm.impair --a IF1 --b IF2 --loss 0.05 --reorder 0.05 --dup 0.02 --seed 7

SIGTERM/SIGINT stop it; it prints its counters as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
ETH_P_ALL = 0x0003
VNET = struct.Struct("=BBHHHH")
NO_VNET = bytes(10)


def _open(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def wire_frames(data: bytes) -> list:
    """The wire frames for one packet received with a virtio_net_hdr in front."""
    flags, gso_type, hdr_len, gso_size, cs, co = VNET.unpack_from(data, 0)
    frame = data[10:]
    if not flags & 1 and not gso_type:
        return [frame]
    from appliance.stack.rings.base import GSO
    from appliance.stack.rings.memory import virtio_complete
    if gso_type and not hdr_len:
        ihl = (frame[14] & 15) * 4
        hdr_len = 14 + ihl + (frame[14 + ihl + 12] >> 4) * 4
    return virtio_complete((frame, None, GSO(cs, co, gso_size if gso_type else 0, hdr_len)))


class Impair:
    def __init__(self, loss=0.0, reorder=0.0, dup=0.0, seed=1, hold=0.005):
        self.loss, self.reorder, self.dup, self.hold = loss, reorder, dup, hold
        self.rng = random.Random(seed)
        self.counters = {"frames": 0, "dropped": 0, "duplicated": 0, "reordered": 0, "segmented": 0}

    def decide(self, frame) -> tuple:
        """(copies to send now, hold it back?) for one wire frame."""
        if frame[12:14] != b"\x08\x00":
            return 1, False
        r = self.rng.random
        if r() < self.loss:
            self.counters["dropped"] += 1
            return 0, False
        copies = 2 if r() < self.dup else 1
        if copies == 2:
            self.counters["duplicated"] += 1
        if r() < self.reorder:
            self.counters["reordered"] += 1
            return copies, True
        return copies, False


def run(a: str, b: str, imp: Impair, stop) -> dict:
    sa, sb = _open(a), _open(b)
    out = {sa.fileno(): sb, sb.fileno(): sa}
    held = {sa.fileno(): [], sb.fileno(): []}        # frames held back, per direction: (until, frame, copies)
    poller = select.poll()
    poller.register(sa.fileno(), select.POLLIN)
    poller.register(sb.fileno(), select.POLLIN)
    c = imp.counters

    def send(sock, frame, copies):
        for _ in range(copies):
            try:
                sock.sendmsg([NO_VNET, frame])   # the socket has PACKET_VNET_HDR: an empty one
            except OSError:
                c["send_errors"] = c.get("send_errors", 0) + 1

    try:
        while not stop():
            now = time.monotonic()
            for fd, q in held.items():           # release overdue held frames
                while q and q[0][0] <= now:
                    _, frame, copies = q.pop(0)
                    send(out[fd], frame, copies)
            ready = poller.poll(2 if any(held.values()) else 100)
            for fd, _ in ready:
                sock_in = sa if fd == sa.fileno() else sb
                for _ in range(64):
                    try:
                        data = sock_in.recv(70000)
                    except BlockingIOError:
                        break
                    if len(data) < 24:
                        continue
                    frames = wire_frames(data)
                    if len(frames) > 1:
                        c["segmented"] += 1
                    for frame in frames:
                        c["frames"] += 1
                        copies, hold = imp.decide(frame)
                        if not copies:
                            continue
                        q = held[fd]
                        if hold:
                            q.append((time.monotonic() + imp.hold, frame, copies))
                            continue
                        send(out[fd], frame, copies)
                        while q:                 # the held frame goes after its successor
                            _, f2, n2 = q.pop(0)
                            send(out[fd], f2, n2)
    finally:
        sa.close()
        sb.close()
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vm.impair", description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="first port (interface)")
    p.add_argument("--b", required=True, help="second port (interface)")
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--reorder", type=float, default=0.0)
    p.add_argument("--dup", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("loss", "reorder", "dup"):
        v = getattr(args, name)
        if not 0.0 <= v < 1.0:
            p.error(f"--{name} must be in [0, 1), not {v}")
    for ifname in (args.a, args.b):
        try:
            socket.if_nametoindex(ifname)
        except OSError:
            p.error(f"interface {ifname!r} does not exist")
    flag = {"stop": False}

    def on_signal(signum, frame):
        flag["stop"] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    imp = Impair(args.loss, args.reorder, args.dup, args.seed)
    print("IMPAIR-READY", flush=True)
    counters = run(args.a, args.b, imp, lambda: flag["stop"])
    print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
