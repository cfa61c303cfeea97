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

Everything is torn down on exit, in reverse order, also on error.
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import threading
from dataclasses import dataclass, field

from . import netns
from .image import Image, VMError
from .qemu import USER_GUEST, USER_HOST, Machine, Options, kernel_cmdline

CLONE_NEWNET = 0x40000000


@dataclass
class Session:
    machine: Machine
    host: str                       # where clients connect
    port: int
    guest_ip: str
    ns: netns.Namespace | None = None
    prefix: list[str] = field(default_factory=list)     # argv prefix for client programs

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}" if self.port != 80 else f"http://{self.host}"

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
        if opts.net == "user":
            m = stack.enter_context(Machine(image, opts, echo=echo))
            yield Session(m, "127.0.0.1", opts.hostport, opts.config_ip.split("/")[0] if opts.config_ip
                          else USER_GUEST)
            return
        if opts.net in ("socket", "vfio", "netmap"):
            # the guest is on a network we do not set up: reachable at its own address, if at all
            guest = guest_interface(image, opts)
            if guest is None:
                raise VMError(f"--net {opts.net}: a DHCP image on a network we do not set up; "
                              f"give it a static one (build.py --ip, or --config DIR with haboob.ip=)")
            m = stack.enter_context(Machine(image, opts, echo=echo))
            yield Session(m, str(guest.ip), 80, str(guest.ip))
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
            if guest is None:               # a DHCP image: dnsmasq in the namespace hands it USER_GUEST
                guest = ipaddress.IPv4Interface(f"{USER_GUEST}/24")
                opts.tap = stack.enter_context(netns.tap(ns, f"{USER_HOST}/24"))
                stack.enter_context(netns.dhcp_server(ns, opts.tap, USER_GUEST, USER_GUEST, router=USER_HOST))
            else:
                opts.tap = stack.enter_context(netns.tap(ns, str(neighbour(guest))))
            prefix = ns.argv([])
        m = stack.enter_context(Machine(image, opts, prefix=prefix, echo=echo))
        yield Session(m, str(guest.ip), 80, str(guest.ip), ns=ns, prefix=prefix)
