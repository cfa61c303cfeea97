"""A booted appliance with its network: what `vm boot`, `vm test` and the
tests share.

`session(image, opts)` sets up the network the options ask for, starts the
Machine, and yields a Session telling where the appliance is reachable:

- user: QEMU's slirp on 198.18.0.0/24, the guest at 198.18.0.15, host port
  127.0.0.1:PORT forwarded to its port 80 (a haboob.ip=dhcp image gets that
  address from slirp's DHCP server);
- tap with a name: an existing tap in our namespace, QEMU beside it;
- tap without a name: a fresh namespace (vm/netns.py) holding a tap with
  an address next to the guest's (for a DHCP image: 198.18.0.2, and dnsmasq
  handing the guest 198.18.0.15), QEMU run inside it; clients run in that
  namespace (`Session.prefix` for programs, `Session.call` for Python code,
  through a thread that setns(2)'s into it).

IPv6, when the guest boots with haboob.ip6= other than off (`guest_ip6`):
on user networking slirp advertises USER_NET6 (2001:2:0:1::/64) and the
guest takes a SLAAC address there, but QEMU 7.2's hostfwd forwards IPv4
only, so nothing on the host reaches it; on a fresh namespace's tap, IPv6
is turned on for the tap with USER_HOST6 (auto: dnsmasq advertises
USER_NET6, with the DHCPv4 server when there is one) or an address next to
a static guest's. `Session.wait_ip6()` reads the guest's global address
from its console (HABOOB-READY / HABOOB-ADDRESS lines); `url6` is its URL.

Everything is torn down on exit, in reverse order, also on error.
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import json
import threading
import time
from dataclasses import dataclass, field

from . import netns
from .image import Image, VMError
from .qemu import (USER_GUEST, USER_HOST, USER_HOST6, USER_NET6, Machine, Options, guest_ip6,
                   kernel_cmdline)

CLONE_NEWNET = 0x40000000


@dataclass
class Session:
    machine: Machine
    host: str                       # where clients connect
    port: int
    guest_ip: str
    ns: netns.Namespace | None = None
    prefix: list[str] = field(default_factory=list)     # argv prefix for client programs
    ip6: str = "off"                # the guest's haboob.ip6= (off, auto, ADDR/PREFIX)
    reach6: bool = False            # its IPv6 address is reachable from where the clients are
    guest_ip6: str | None = None    # its global IPv6 address, once wait_ip6() saw it

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}" if self.port != 80 else f"http://{self.host}"

    @property
    def url6(self) -> str | None:
        """http://[ADDR] of the guest's global IPv6 address (port 80), once known."""
        return f"http://[{self.guest_ip6}]" if self.guest_ip6 else None

    def wait_ip6(self, timeout: float = 60) -> str | None:
        """The guest's global IPv6 address from its console (None if IPv6 is off, or none
        came within timeout)."""
        if self.ip6 == "off":
            return None
        deadline = time.monotonic() + timeout
        while True:
            self.machine.poll_console()
            self.guest_ip6 = global_ip6(self.machine.lines)
            if self.guest_ip6 or time.monotonic() > deadline or self.machine.proc.poll() is not None:
                return self.guest_ip6
            time.sleep(0.1)

    def call(self, fn, *args, **kw):
        """fn(*args) run where the clients are (inside the namespace, if any)."""
        if self.ns is None:
            return fn(*args, **kw)
        box = {}

        def run():
            try:
                fd = os.open(f"/run/netns/{self.ns.name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                box["value"] = fn(*args, **kw)
            except BaseException as e:      # handed to the caller's thread
                box["error"] = e
        # setns changes only this thread; a daemon, so that a signal that interrupts join()
        # (vm/stop.py) does not leave the exit waiting for its fetches to time out
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]


def guest_interface(image: Image, opts: Options) -> ipaddress.IPv4Interface | None:
    """The guest's static address, or None when it asks DHCP (haboob.ip=dhcp)."""
    if opts.config_ip:                      # a configuration volume's address beats the image's
        return ipaddress.IPv4Interface(opts.config_ip)
    words = [w.split("=", 1)[1] for w in kernel_cmdline(image, opts).split() if w.startswith("haboob.ip=")]
    if not words:
        raise VMError("the kernel command line has no haboob.ip=")
    v = words[-1]                           # the last one counts (appliance/init.py kernel_args)
    return None if v == "dhcp" else ipaddress.IPv4Interface(v)


def global_ip6(lines: list[str]) -> str | None:
    """The guest's current global IPv6 address from its console: the ready line's
    addresses, then HABOOB-ADDRESS acquired/lost/duplicate events (the newest one held)."""
    held: list[str] = []
    for line in lines:
        for tag in ("HABOOB-READY ", "HABOOB-ADDRESS "):
            i = line.find(tag)
            if i < 0:
                continue
            try:
                doc = json.loads(line[i + len(tag):])
            except ValueError:
                continue
            evs = (doc.get("addresses") or []) if tag == "HABOOB-READY " else [doc]
            for ev in evs:
                a = ev.get("ip6") if isinstance(ev, dict) else None
                if not a or ipaddress.IPv6Address(a).is_link_local:
                    continue
                if a in held:
                    held.remove(a)
                if ev.get("event", "acquired") == "acquired":
                    held.append(a)
    return held[-1] if held else None


def neighbour6(static: str) -> str:
    """Our end of the tap beside a static guest ADDR/PREFIX: the next address, same prefix."""
    itf = ipaddress.IPv6Interface(static)
    for cand in (itf.ip + 1, itf.ip - 1):
        if cand in itf.network and cand != itf.network.network_address:
            return f"{cand}/{itf.network.prefixlen}"
    raise VMError(f"no room for a host address next to {static}")


def neighbour(iface: ipaddress.IPv4Interface) -> ipaddress.IPv4Interface:
    """Another host address on the guest's network, for our end of the tap."""
    for cand in (iface.ip + 1, iface.ip - 1):
        if cand in iface.network and cand not in (iface.network.network_address,
                                                  iface.network.broadcast_address):
            return ipaddress.IPv4Interface(f"{cand}/{iface.network.prefixlen}")
    raise VMError(f"no room for a host address next to {iface}")


@contextlib.contextmanager
def session(image: Image, opts: Options, echo=None):
    with contextlib.ExitStack() as stack:
        ns = None
        prefix: list[str] = []
        ip6 = guest_ip6(image, opts)
        if opts.net == "user":
            m = stack.enter_context(Machine(image, opts, echo=echo))
            yield Session(m, "127.0.0.1", opts.hostport, opts.config_ip.split("/")[0] if opts.config_ip
                          else USER_GUEST, ip6=ip6)
            return
        if opts.net in ("socket", "vfio", "netmap"):
            # the guest is on a network we do not set up: reachable at its own address, if at all
            guest = guest_interface(image, opts)
            if guest is None:
                raise VMError(f"--net {opts.net}: a DHCP image on a network we do not set up; "
                              f"give it a static one (build.py --ip, or --config DIR with haboob.ip=)")
            m = stack.enter_context(Machine(image, opts, echo=echo))
            yield Session(m, str(guest.ip), 80, str(guest.ip), ip6=ip6, reach6=ip6 != "off")
            return
        if opts.net != "tap":
            raise VMError(f"--net {opts.net!r}: use user[:PORT] or tap[:IFNAME]")
        guest = guest_interface(image, opts)
        if guest is None and opts.tap:
            raise VMError("--net tap:IFNAME with a DHCP image: give it a static address "
                          "(build.py --ip, or --config DIR with haboob.ip=)")
        if not opts.tap:
            if os.geteuid() != 0:
                raise VMError("--net tap without a name makes a network namespace: run as root")
            ns = stack.enter_context(netns.namespace("v"))
            ra = USER_NET6 if ip6 == "auto" else None      # SLAAC from the namespace's advertisements
            if guest is None:               # a DHCP image: dnsmasq in the namespace hands it USER_GUEST
                guest = ipaddress.IPv4Interface(f"{USER_GUEST}/24")
                opts.tap = stack.enter_context(netns.tap(ns, f"{USER_HOST}/24"))
                _tap6(ns, opts.tap, ip6)
                stack.enter_context(netns.dhcp_server(ns, opts.tap, USER_GUEST, USER_GUEST, router=USER_HOST,
                                                      ra=ra))
            else:
                opts.tap = stack.enter_context(netns.tap(ns, str(neighbour(guest))))
                _tap6(ns, opts.tap, ip6)
                if ra:
                    stack.enter_context(netns.router_advertiser(ns, opts.tap, ra))
            prefix = ns.argv([])
        m = stack.enter_context(Machine(image, opts, prefix=prefix, echo=echo))
        yield Session(m, str(guest.ip), 80, str(guest.ip), ns=ns, prefix=prefix, ip6=ip6,
                      reach6=ip6 != "off")


def _tap6(ns: netns.Namespace, tap: str, ip6: str) -> None:
    """IPv6 on our end of the tap: USER_HOST6 for SLAAC in USER_NET6, or beside a static guest."""
    if ip6 == "auto":
        netns.enable_ipv6(ns, tap, f"{USER_HOST6}/64")
    elif ip6 != "off":
        netns.enable_ipv6(ns, tap, neighbour6(ip6))
