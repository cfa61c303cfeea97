"""Helpers for the DHCPv4 tests: a scripted DHCP server built with scapy's
BOOTP/DHCP layers (the independent encoder and parser of every message), a
fake clock and a deterministic random source."""
import random

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from appliance.stack.counters import Counters
from appliance.stack.dhcp4 import DhcpConfig, Dhcp4Client

CMAC = bytes.fromhex("020000000001")
SMAC = "02:00:00:00:00:fe"
SIP = "198.18.0.254"
TYPES = {1: "discover", 2: "offer", 3: "request", 4: "decline", 5: "ack", 6: "nak", 7: "release"}


def opts(p) -> dict:
    """A scapy DHCP layer's options as a dict (name -> value)."""
    return {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in p[DHCP].options if isinstance(o, tuple)}


def msg_type(p) -> str:
    return TYPES[opts(p)["message-type"]]


def make_client(**cfg):
    c = Dhcp4Client(CMAC, Counters(), random.Random(7), DhcpConfig(**cfg))
    return c


def sent(c):
    """The client's UDP output as scapy BOOTP packets (with where they went); ARP probes kept apart."""
    out, probes = [], []
    for o in c.out:
        if o[0] == "udp":
            _, dmac, src, dst, payload = o
            p = BOOTP(payload)
            assert DHCP in p, "not a DHCP message"
            assert len(payload) >= 300
            out.append((dmac, src, dst, p))
        else:
            probes.append(o[1])
    c.out.clear()
    return out, probes


class Server:
    """Answers a client's message with scapy-built replies."""

    def __init__(self, ip=SIP, mac=SMAC, addr="198.18.0.10", mask="255.255.255.0", lease=3600, t1=None, t2=None,
                 extra=()):
        self.ip, self.mac, self.addr, self.mask = ip, mac, addr, mask
        self.lease, self.t1, self.t2, self.extra = lease, t1, t2, list(extra)

    def reply(self, req, mtype, addr=None, extra=None, server_id=None, xid=None, chaddr=None):
        o = [("message-type", mtype), ("server_id", server_id or self.ip)]
        if mtype in ("offer", "ack"):
            o += [("subnet_mask", self.mask), ("lease_time", self.lease)]
            if self.t1 is not None:
                o.append(("renewal_time", self.t1))
            if self.t2 is not None:
                o.append(("rebinding_time", self.t2))
            o += self.extra if extra is None else extra
        o.append("end")
        yi = (addr or self.addr) if mtype != "nak" else "0.0.0.0"
        b = BOOTP(op=2, xid=req.xid if xid is None else xid, yiaddr=yi,
                  chaddr=req.chaddr if chaddr is None else chaddr, flags=req.flags) / DHCP(options=o)
        return bytes(b)

    def frame(self, payload, dst="255.255.255.255", dmac="ff:ff:ff:ff:ff:ff"):
        return bytes(Ether(src=self.mac, dst=dmac) / IP(src=self.ip, dst=dst) / UDP(sport=67, dport=68) / payload)

    @property
    def mac_b(self):
        return bytes.fromhex(self.mac.replace(":", ""))
