"""Network namespaces, veth pairs and taps for tests, benchmarks and vm/.

Theory of operation: every object here is a context manager that creates
one kernel object (a namespace, a veth pair, a tap) under a name unique to
this process and removes exactly that object on exit, also when the body
raises. Nothing is ever removed by pattern, so concurrent users (several
test runs, a benchmark) never disturb each other. IPv6 is switched off in
every namespace we make so that router solicitations and DAD do not reach
the appliance, and only addresses in 198.18.0.0/15 (RFC 2544) are used;
where a test wants IPv6 it turns it on for one interface (`enable_ipv6`)
with an address in 2001:2::/48 (RFC 5180), and `router_advertiser` (or
`dhcp_server(..., ra=PREFIX)`) announces a prefix from it.

Typical use:

    with netns.pair() as link:                 # server ns <-veth-> client ns
        link.client.run(["curl", f"http://{link.server_ip}/"])
"""
from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from dataclasses import dataclass

_counter = itertools.count()


class NetnsError(RuntimeError):
    """An ip(8) command failed; the message carries its stderr."""


def unique(tag: str) -> str:
    """A name unique to this process, at most 15 characters (IFNAMSIZ - 1)."""
    return f"hb{os.getpid() % 1000000}{tag}{next(_counter)}"[:15]


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = (["ip", "-n", ns] if ns else ["ip"]) + list(args)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Namespace:
    name: str

    def argv(self, argv: list[str]) -> list[str]:
        """argv prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc = subprocess.run(self.argv(argv), **kw)
        if check and proc.returncode != 0:
            raise NetnsError(f"in {self.name}: {' '.join(argv)} exited {proc.returncode}: "
                             f"{(proc.stderr or '').strip()}")
        return proc

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kw)

    def sysctl(self, key: str, value: str) -> None:
        # Written through /proc inside the namespace; no sysctl binary needed.
        self.run(["sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}"])


@contextlib.contextmanager
def namespace(tag: str = "n"):
    """A fresh namespace with lo up and IPv6 off; deleted on exit."""
    name = unique(tag)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        ns = Namespace(name)
        ip("link", "set", "lo", "up", ns=name)
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def set_offloads(ns: Namespace, ifname: str, **features: bool) -> None:
    """ethtool -K, e.g. set_offloads(ns, "eth0", tso=False, gso=False)."""
    args = []
    for key, on in features.items():
        args += [key, "on" if on else "off"]
    ns.run(["ethtool", "-K", ifname, *args])


@contextlib.contextmanager
def veth(ns_a: Namespace, ns_b: Namespace, addr_a: str | None = None, addr_b: str | None = None,
         mtu: int | None = None):
    """A veth pair with one end in each namespace, both up.

    Yields (ifname_a, ifname_b). An end whose addr is None gets no IPv4
    address: that is how the appliance's interface must be (the kernel would
    otherwise answer its TCP segments with RSTs). Deleting one end deletes
    both; the namespaces' deletion would too, this is for early cleanup.
    """
    a, b = unique("a"), unique("b")
    ip("link", "add", a, "type", "veth", "peer", "name", b)
    try:
        ip("link", "set", a, "netns", ns_a.name)
        ip("link", "set", b, "netns", ns_b.name)
        for ns, ifname, addr in ((ns_a, a, addr_a), (ns_b, b, addr_b)):
            if mtu:
                ip("link", "set", ifname, "mtu", str(mtu), ns=ns.name)
            if addr:
                ip("addr", "add", addr, "dev", ifname, ns=ns.name)
            ip("link", "set", ifname, "up", ns=ns.name)
        yield a, b
    finally:
        ip("link", "del", a, ns=ns_a.name, check=False)
        ip("link", "del", a, check=False)


@contextlib.contextmanager
def tap(ns: Namespace, addr: str | None = None):
    """A tap device inside ns (for QEMU run in that namespace); yields its name."""
    name = unique("t")
    ip("tuntap", "add", "dev", name, "mode", "tap", ns=ns.name)
    try:
        if addr:
            ip("addr", "add", addr, "dev", name, ns=ns.name)
        ip("link", "set", name, "up", ns=ns.name)
        yield name
    finally:
        ip("link", "del", name, ns=ns.name, check=False)


@dataclass
class Link:
    server: Namespace       # the appliance's namespace; server_if has no IPv4 address
    client: Namespace
    server_if: str
    client_if: str
    server_ip: str          # the address the appliance should take (without prefix)
    client_ip: str
    prefix: int


@contextlib.contextmanager
def pair(subnet: int = 0, mtu: int | None = None):
    """Two namespaces joined by veth: the client at 198.18.N.2/24 with a
    kernel address, the server interface without one (for the appliance at
    198.18.N.1/24). N = subnet, so several links can coexist."""
    server_ip, client_ip = f"198.18.{subnet}.1", f"198.18.{subnet}.2"
    with namespace("s") as s, namespace("c") as c, \
            veth(s, c, None, f"{client_ip}/24", mtu=mtu) as (sif, cif):
        yield Link(s, c, sif, cif, server_ip, client_ip, 24)


def enable_ipv6(ns: Namespace, ifname: str, addr: str | None = None) -> None:
    """IPv6 on for `ifname` only (namespace() turns it off), with `addr` (ADDR/PREFIX, no DAD)."""
    ns.sysctl(f"net.ipv6.conf.{ifname}.accept_ra", "0")     # our own router_advertiser's included
    ns.sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", "0")
    if addr:
        ip("-6", "addr", "add", addr, "dev", ifname, "nodad", ns=ns.name)


def ra_args(prefix: str) -> list[str]:
    """dnsmasq words for router advertisements of `prefix` (A=1: SLAAC; no DHCPv6)."""
    import ipaddress
    net = ipaddress.IPv6Network(prefix)
    return ["--enable-ra", f"--dhcp-range={net.network_address},ra-only,{net.prefixlen},10m"]


@contextlib.contextmanager
def router_advertiser(ns: Namespace, ifname: str, prefix: str):
    """dnsmasq sending only router advertisements of `prefix` on `ifname` (which needs
    IPv6 on and an address in it: enable_ipv6); stopped by pid on exit."""
    with _dnsmasq(ns, ifname, ra_args(prefix)) as proc:
        yield proc


@contextlib.contextmanager
def dhcp_server(ns: Namespace, ifname: str, first: str, last: str, router: str | None = None,
                lease: str = "2m", extra: tuple = (), ra: str | None = None):
    """dnsmasq as a DHCPv4 server only (no DNS, no configuration file, no daemon)
    on `ifname` inside `ns`, handing out first..last /24; stopped by pid on exit.
    `ra`: an IPv6 prefix to send router advertisements for too (see router_advertiser).
    Yields the Popen; its stderr carries dnsmasq's DHCP log (--log-dhcp)."""
    argv = ["--no-ping", "--log-dhcp", f"--dhcp-range={first},{last},255.255.255.0,{lease}", *extra]
    if router:
        argv.append(f"--dhcp-option=option:router,{router}")
    with _dnsmasq(ns, ifname, argv + (ra_args(ra) if ra else []), leases=True) as proc:
        yield proc


@contextlib.contextmanager
def _dnsmasq(ns: Namespace, ifname: str, words: list[str], leases: bool = False):
    import shutil
    import signal
    import tempfile
    if shutil.which("dnsmasq") is None:
        raise NetnsError("dnsmasq is not installed (Debian: dnsmasq-base; see .ci/install.sh)")
    with tempfile.TemporaryDirectory(prefix="haboob-dnsmasq-") as tmp:
        argv = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
                f"--interface={ifname}", "--bind-interfaces", f"--pid-file={tmp}/pid", *words]
        if leases:
            argv.append(f"--dhcp-leasefile={tmp}/leases")
        proc = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
