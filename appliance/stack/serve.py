"""The serve loop: one stack instance per worker, driven in batches from a NIC ring.

Theory of operation. `serve()` opens the content store and the interface's
TPACKET rings (optionally wrapped by the pcap recorder), builds a `Stack`
with a fresh secret from the OS (ISNs, SYN cookies; RFC 6528) and runs the
batch loop until a signal or `stop_event`:

    now = monotonic()
    frames = rx_batch()            # the previous batch's slots go back to the kernel
    for f in frames: receive(f, now)
    deadline = stack.poll(now)     # timers; returns the next deadline
    tx_batch(txq); txq.clear()     # one copy per frame into the TX ring, one kick
    if nothing was received: wait on the ring's fd until the deadline
                                   # (1 ms at most while frames wait for TX room)

One wake-up serves a whole batch; the loop only sleeps after a scan found
the RX ring empty (and so handed every slot back; see rings/tpacket.py).

Overload (a SYN flood). Answering a SYN (a cookie and a SYN-ACK) costs as
much as serving several segments of known connections, so which SYNs the
stack sees is decided before it, by a SynGate (rings/base.py): every SYN
from a source that completed a handshake before (the stack's syn_trusted:
a spoofed source never does), every retransmission of a SYN it shed
before (a client's, 1 s later: a random flood never repeats a SYN; within
a bucket of 4,000/s), and of the rest a budget, an even draw (each with
the same odds whatever its place): up to 2 in a read that brought
nothing else, else one per 64 frames of known connections plus a token
bucket of 500 per second. The TPACKET device keeps pure SYNs on a
ring of their own and gates them there (rings/tpacket.py), with the same
policy in the kernel where it loads the eBPF gate (rings/ebpf.py), so a
flood can neither fill nor delay the ring that established connections
use, and a shed SYN never reaches the stack (with the kernel gate, never
Python); during a flood the loop also hands the sources that connected
last to the device once a second (trust_sources: their SYNs take the main
ring; with the kernel gate, the other trusted sources' SYNs are kept). For other devices, a full batch
(frames arrive faster than they are handled, and once the RX ring is full
the kernel drops at random) is followed by more reads (up to DRAIN
batches, the whole default ring) and the loop gates the SYNs among them
(_shed_syns): every other frame goes first, in arrival order, then the
SYNs the gate keeps. The loop waits on the fds of every ring in one poll.
Timers use time.monotonic(); the wall clock is read once a second for the
Date header (`stack.set_date`). Signals are delivered through a wake-up
pipe polled next to the ring, so SIGINT/SIGTERM end the wait at once.

Workers (`workers=N`): N processes forked after the store is checked, each
with its own device socket in one PACKET_FANOUT_HASH group (the flow hash
keeps every TCP connection on one worker), its own Stack, store mapping and
secret: nothing is shared, no locks. Each worker reports on a pipe, one
line each: readiness, its counters once a second (the parent keeps their
sum as the live counters it hands to on_ready) and its counters at exit
(the parent sums them for the result). With ip="dhcp" or IPv6 the parent
also runs the control plane (lease.py: the DHCP lease; link-local, SLAAC or
DHCPv6 or static, DAD, MLD, RS/RA on a socket of its own), starts the
workers on what it acquired (a static IPv4 address; an ipv6.Delegated6:
no DAD, MLD, RS or DHCPv6 in the workers) and restarts them when that
changes. With IPv6 the fanout rings take every protocol but ARP. The
loop is kept flat (locals for every attribute it touches per batch) since
it runs once per wake-up at full load.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import select
import signal
import time
from itertools import islice

from .counters import Counters
from .rings.base import TRUSTED_BPF, SynGate

__all__ = ["serve", "run_loop", "Ready", "parse_mac", "BATCH"]

BATCH = 256          # frames taken from the RX ring per scan
DRAIN = 4            # batches read in one pass while overloaded (the default ring: 1024 slots)
MAX_WAIT = 1.0       # seconds; the Date header is refreshed at least this often
PENDING_WAIT = 0.001  # seconds; the longest wait while frames wait for room in the TX ring


class Ready:
    """Passed to on_ready: `info` (what the appliance serves where) and the
    live `counters` (`as_dict()`): this process's stack and ring as they are
    now, or in a multi-worker parent the sum of what the workers last
    reported (each reports once a second)."""

    def __init__(self, info: dict, counters):
        self.info = info
        self.counters = counters

    def __repr__(self):
        return f"Ready({self.info!r})"


class _Live:
    """Counters computed when asked: `as_dict()` of `collect()`."""

    def __init__(self, collect):
        self._collect = collect

    def as_dict(self) -> dict:
        return self._collect().as_dict()


def parse_mac(mac: str) -> bytes:
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {mac!r} (want xx:xx:xx:xx:xx:xx)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {mac!r} (want xx:xx:xx:xx:xx:xx)") from None


def _parse_ip(ip: str):
    if ip == "dhcp":
        return None, 0
    try:
        itf = ipaddress.IPv4Interface(ip if "/" in ip else ip + "/24")
    except ValueError as e:
        raise ValueError(f"bad IPv4 address {ip!r}: {e}") from None
    return str(itf.ip), itf.network.prefixlen


def ip6_secret(mac: bytes, iface: str = "") -> bytes:
    """The RFC 7217 key: stable per host and interface (machine-id when there is one).
    Without a machine-id it is derived from the MAC only: stable, but then the
    identifiers do not hide the MAC from someone who knows this derivation."""
    import hashlib
    mid = b""
    try:
        with open("/etc/machine-id", "rb") as f:
            mid = f.read().strip()
    except OSError:
        pass
    return hashlib.sha256(b"haboob rfc7217\0" + mid + b"\0" + iface.encode() + b"\0" + bytes(mac)).digest()


def make_stack(store, mac: bytes, ip: str | None, prefix: int, gateway, dev, config=None, hostname=None,
               ip6: str = "off", iface: str = "", tls=None):
    """The protocol stack (appliance.stack.iface.Stack) for one worker, with a
    fresh secret from the OS's random source (RFC 6528 ISNs, SYN cookies).
    `ip` None: the address comes from DHCP (dhcp4.py).
    `tls`: None, or {"server": tls.TlsServer, "http": "serve"|"redirect"|"off",
    "default_host": name for redirects without a usable Host}."""
    from .iface import Stack, StackConfig
    if config is None:
        config = StackConfig(mtu=dev.mtu)
    if tls and tls["http"] == "off":
        config = config._replace(port=0)
    factory = None
    if tls and tls["http"] == "redirect":
        from ..http.redirect import redirect_factory
        factory = redirect_factory(store.site, store.blob, tls["default_host"], config.tls_port)
    st = Stack(store, mac, ip, prefix, gateway, dev.offload, config, os.getrandom(32), http_factory=factory,
               tls=tls["server"] if tls else None)
    if ip is None:
        from .dhcp4 import DhcpConfig
        st.enable_dhcp(DhcpConfig(hostname=hostname))
    if ip6 != "off":                # "auto", an ipv6.Static6, or a parent's ipv6.Delegated6
        from .ipv6 import Delegated6
        st.enable_ipv6(ip6_secret(mac, iface))
        if isinstance(ip6, Delegated6):
            st.ip6.set_delegated(ip6)
        elif ip6 != "auto":
            st.ip6.set_static(ip6)
    return st


def run_loop(stack, dev, stop, wake_fd: int = -1, batch: int = BATCH, tick=None, after=None,
             clock=time.monotonic, on_event=None) -> None:
    """Drive `stack` from `dev` until `stop()` is true. Never raises for a frame:
    an exception out of the stack is counted (loop_stack_errors) and the loop goes on.
    `tick()`, if given, is called once a second (with the Date refresh); `after(now)`
    once per iteration, before the transmit (appliance/obs: the access log's batch);
    `clock` is the monotonic clock (tests pass a fake one: it is read once per pass
    while frames keep coming); `on_event(kind, info)` with each of the stack's events
    (address changes), after the timers."""
    rx = dev.rx_batch
    tx = dev.tx_batch
    receive = stack.receive
    # The ring can vouch for checksums the kernel validated or that come from a
    # local sender (no wire crossed): pass that on to the stack.
    oks = None
    if hasattr(dev, "trust_csum"):
        dev.trust_csum = True
        oks = dev.rx_csum_ok
    spoll = stack.poll
    set_date = stack.set_date
    txq = stack.txq
    # Frames the device could not hand to the kernel yet (a full ring and socket
    # buffer): retried on every pass until gone, before new ones (rings/tpacket.py).
    pending = getattr(dev, "tx_pending", None)
    if not isinstance(pending, list):
        pending = ()
    counters = stack.counters
    events = stack.events
    mono = clock
    poller = select.poll()
    # every ring's own fd (TPACKET: main, SYN, ARP) rather than an epoll around
    # them: one poll, no nested wake-up per frame
    fds = dev.filenos() if hasattr(dev, "filenos") else [dev.fileno()]
    for fd in fds:
        if fd >= 0:
            poller.register(fd, select.POLLIN)
    # SYNs: a device with a SYN ring has its own gate (rings/tpacket.py); for the
    # others the overloaded passes go through this one. Both trust the sources
    # the stack saw complete a handshake.
    syn_gate = getattr(dev, "syn_gate", None)
    gate = None
    if not isinstance(syn_gate, SynGate):
        syn_gate = gate = SynGate(rng=_RNG)
    syn_gate.trusted = stack.syn_trusted
    pressure = stack.under_pressure
    trust_sources = getattr(dev, "trust_sources", None)
    if not callable(trust_sources):
        trust_sources = None
    housekeep = getattr(dev, "housekeep", None)         # (TPACKET: the kernel gate's end)
    if not callable(housekeep):
        housekeep = None
    if wake_fd >= 0:
        poller.register(wake_fd, select.POLLIN)
    wait = poller.poll
    next_date = 0.0
    errors = 0
    wakeups = 0
    shed = 0
    while not stop():
        now = mono()
        if now >= next_date:
            wall = time.time()
            set_date(int(wall))
            next_date = now + (1.0 - (wall % 1.0)) + 0.0005
            syn_gate.forget(now)                # the SYNs a flood left in the gate's memory
            if housekeep is not None:
                housekeep()
            if trust_sources is not None and syn_gate.pressure:
                # the sources that connected last: their SYNs go to the main ring, not the flood's
                # (IPv4 ones: the classic filters' jeq compares one word)
                trust_sources(list(islice((a for a in reversed(stack.syn_trusted) if len(a) == 4), TRUSTED_BPF)))
            if tick is not None:
                tick()
        syn_gate.pressure = pressure(now)       # the SYN budget applies during a flood only
        frames = rx(batch)
        fok = oks
        if len(frames) >= batch:        # (a TPACKET device adds a sample of its SYN ring to a batch)
            # A full batch: frames arrive faster than we handle them and the
            # kernel will soon drop at random. Drain more, then shed SYNs beyond
            # the budget (a flood: each costs a cookie and a SYN-ACK), so that
            # established connections keep their share.
            if oks is not None:
                fok = list(oks)            # the device refills rx_csum_ok per read
            for _ in range(DRAIN - 1):
                more = rx(batch)
                frames += more
                if oks is not None:
                    fok += oks
                if len(more) < batch:
                    break
            if gate is not None:
                shed += _shed_syns(frames, fok, gate, now)
        if fok is None:
            for f in frames:
                try:
                    receive(f, now)
                except Exception:    # a stack bug must not stop the appliance: count, drop
                    errors += 1
        else:
            for f, ok in zip(frames, fok):
                try:
                    receive(f, now, ok)
                except Exception:
                    errors += 1
        try:
            deadline = spoll(now)
        except Exception:
            errors += 1
            deadline = None
        if events:
            evs = events[:]
            events.clear()
            if on_event is not None:
                for kind, info in evs:
                    on_event(kind, info)
        if after is not None:
            after(now)
        if txq or pending:
            tx(txq)
            txq.clear()
        if frames:
            continue
        # Ring empty and handed back: sleep until the next timer, a frame or a signal.
        until = next_date if deadline is None or deadline > next_date else deadline
        timeout = until - mono()
        if pending and timeout > PENDING_WAIT:
            timeout = PENDING_WAIT           # the ring frees slots without waking us: look again soon
        if timeout > 0:
            wakeups += 1
            if wake_fd >= 0:
                for rfd, _ in wait(min(timeout, MAX_WAIT) * 1000.0 + 0.5):
                    if rfd == wake_fd:
                        _drain(wake_fd)
            else:
                wait(min(timeout, MAX_WAIT) * 1000.0 + 0.5)
    counters["loop_stack_errors"] += errors
    counters["loop_waits"] += wakeups
    counters["loop_syn_shed"] += shed
    if gate is not None:
        counters["loop_syn_retransmits"] += gate.retransmits


_RNG = random.Random()     # which SYNs an overloaded pass keeps (seeded from the OS)


def _shed_syns(frames: list, oks, gate: SynGate, now: float) -> int:
    """Order an overloaded pass (in place, `oks` kept aligned): every frame
    that is not an IPv4 TCP SYN (no ACK/RST) first, in arrival order, then
    the SYNs `gate` lets through for that many other frames (every one from
    a trusted source, an even draw of the rest within the budget; see
    SynGate). Returns how many SYNs were dropped."""
    flags = [len(f) > 47 and f[23] == 6 and f[14] == 0x45 and f[12] == 8 and f[13] == 0
             and f[47] & 0x16 == 0x02 for f in frames]
    syns = sum(flags)
    if not syns:
        return 0
    n = len(frames)
    keep = [k for k in range(n) if not flags[k]]
    si = [k for k in range(n) if flags[k]]
    allow = gate.allow(n - syns, now)
    if syns > allow:
        si = [si[j] for j in gate.pick([bytes(frames[k][26:42]) for k in si], allow, now)]
    else:
        gate.spend(syns)
    keep += si
    frames[:] = [frames[k] for k in keep]
    if oks is not None:
        oks[:] = [oks[k] for k in keep]
    return syns - len(si)


def _drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _syn_gate_kind() -> str:
    """How the SYN ring sheds a flood here: "kernel" (its eBPF gate, rings/ebpf.py),
    or "python: why" where this kernel refuses the program."""
    from .rings.ebpf import unavailable
    why = unavailable()
    return "kernel" if why is None else f"python: {why}"


def _open_device(iface, capture, fanout=None, unicast=None, allmulti=False, syn_ports=(80,)):
    from .rings.tpacket import TpacketDevice
    dev = TpacketDevice(iface, fanout=fanout, unicast=unicast, syn_port=syn_ports,  # SYNs on a ring of their own
                        allmulti=allmulti)                                          # IPv6: solicited-node groups
    if capture:
        from .rings.pcap import PcapDevice
        dev = PcapDevice(dev, capture)
    return dev


def _collect(stack, dev) -> Counters:
    total = Counters()
    total.merge(stack.counters)
    inner = getattr(dev, "dev", dev)
    for k, v in getattr(inner, "counters", {}).items():
        total["ring_" + k] += v
    stats = getattr(inner, "kernel_stats", None)
    if stats:
        for k, v in stats().items():
            total["ring_" + k] += v
    return total


def _observe(stack, dev, observe, worker):
    """The appliance/obs Observer for `observe` (serve()'s dict), or None when all is off."""
    if not observe:
        return None
    from ..obs import Observer, build_info, parse_allow
    from ..obs.accesslog import AccessLog, ConsoleSink, SyslogSink, parse_destination
    kind, where = parse_destination(observe.get("access_log", "off"))
    port = int(observe.get("metrics_port", 0) or 0)
    if kind == "off" and not port:
        return None
    log = None
    if kind == "console":
        log = AccessLog(ConsoleSink(stack.counters), observe.get("log_format", "combined"),
                        int(observe.get("log_sample", 1)), stack.counters)
    elif kind == "syslog":
        sink = SyslogSink(stack, where[0], where[1], observe.get("hostname") or os.uname().nodename,
                          bsd=observe.get("syslog_framing", "rfc5424") == "rfc3164")
        log = AccessLog(sink, observe.get("log_format", "combined"), int(observe.get("log_sample", 1)),
                        stack.counters)
    return Observer(stack, lambda: _collect(stack, dev), log=log, metrics_port=port,
                    metrics_allow=parse_allow(observe.get("metrics_allow")),
                    build=build_info(stack.store, observe.get("version")), worker=worker).install()


def _worker(store_path, iface, ip, prefix, gateway, mac, capture, fanout, stop, wake_fd,
            on_stack=None, config=None, cpu=None, on_tick=None, observe=None, drain=0.0,
            worker=None, on_event=None, hostname=None, ip6="off", tls=None) -> Counters:
    from ..content.store import Store
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass
    store = Store.open(store_path, verify=False)      # serve() verified it before starting workers
    dev = None
    try:
        from .iface import StackConfig
        cfg = config or StackConfig()           # the SYN ring takes the HTTPS port's SYNs too
        dev = _open_device(iface, capture, fanout, unicast=mac, allmulti=ip6 != "off",
                           syn_ports=(cfg.port, cfg.tls_port) if tls else (cfg.port,))
        stack = make_stack(store, mac or dev.mac, ip, prefix, gateway, dev, config, hostname, ip6, iface, tls)
        stack.start(time.monotonic())
        if stack.txq:
            dev.tx_batch(stack.txq)
            stack.txq.clear()
        obs = _observe(stack, dev, observe, worker)
        if drain > 0:
            from ..obs import Drain
            stop = Drain(stack, stop, drain, obs if obs is not None and obs.metrics_port else None)
        if on_stack:
            on_stack(stack, dev)
        tick = (lambda: on_tick(stack, dev)) if on_tick else None
        if obs is not None:
            tick = (lambda: (obs.tick(time.monotonic()), on_tick and on_tick(stack, dev)))
        run_loop(stack, dev, stop, wake_fd, tick=tick, after=obs.flush if obs is not None else None,
                 on_event=(lambda k, i: on_event(stack, dev, k, i)) if on_event else None)
        if obs is not None:
            obs.flush(time.monotonic())
        if drain > 0:
            stack.shutdown()                # what the drain left: RST (after its timeout)
        if stack.txq:                       # the drain's last FINs / RSTs, the log's last lines
            dev.tx_batch(stack.txq)
            stack.txq.clear()
        if obs is not None and obs.log is not None:
            obs.log.sink.close()
        return _collect(stack, dev)
    finally:
        if dev is not None:
            dev.close()
        try:
            store.close()
        except Exception:        # frame views into the blob may still be referenced
            pass


class _Stopper:
    """stop(): a signal arrived (flag set by the handler) or stop_event is set.
    With `drain`, the first SIGTERM (or stop_event) only asks for a drain
    (`drain` set, appliance/obs.Drain does it); SIGINT or a second SIGTERM set `flag`."""

    def __init__(self, stop_event=None, drain=False):
        self.flag = False
        self.drain = False
        self.signals = 0
        self.drain_ok = drain
        self.event = stop_event

    def __call__(self):
        if self.event is not None and self.event.is_set():
            if not self.drain_ok:
                self.flag = True
            self.drain = True
        return self.flag or self.drain

    def handler(self, signum, frame):
        self.signals += 1
        if signum == signal.SIGTERM and self.drain_ok and self.signals == 1:
            self.drain = True
        else:
            self.flag = True


def _install_signals(stopper):
    """SIGINT/SIGTERM set the stop flag and, through a wake-up pipe, end the
    loop's wait. Only possible in the main thread; elsewhere the caller
    stops us with stop_event. Returns (wake_fd, restore)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return -1, lambda: None
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old = {s: signal.signal(s, stopper.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def restore():
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(r)
        os.close(w)
    return r, restore


def serve(store_path: str, iface: str, ip: str, gateway: str | None = None, mac: str | None = None,
          workers: int = 1, capture: str | None = None, on_ready=None, stop_event=None,
          pin: bool = False, config=None, observe: dict | None = None, drain: float = 0.0,
          on_event=None, hostname: str | None = None, ip6: str = "off", tls=None) -> Counters:
    """Serve the store on `iface` at `ip` ("a.b.c.d/prefix", /24 if omitted, or
    "dhcp") until SIGINT/SIGTERM or `stop_event`; returns the counters (summed
    over workers).

    `observe`: access log / metrics settings (appliance/obs; keys access_log,
    log_format, log_sample, syslog_framing, metrics_port, metrics_allow, version,
    hostname); `drain` > 0: SIGTERM / stop_event drain for up to that many seconds.

    `info["addresses"]` lists each address served, with how it was obtained
    ("static", "dhcp"). With "dhcp", on_ready is called once the first lease
    is bound, and `on_event(kind, info)` with every later address event
    (changed, lost, acquired again) and the DHCP client's notices
    (no_answer, declined). With several workers the parent keeps the lease
    (lease.py) and (re)starts the workers on the leased address.
    `ip6="auto"` (or an ipv6.Static6: that address, DAD, no SLAAC): the IPv6 control plane (ipv6.py: link-local + SLAAC
    addresses, DHCPv6 (dhcp6.py) when an RA says M=1, ND, ping -6; the site over TCP/IPv6 on the same port), its addresses
    reported as "address6" events. With several workers the parent runs it (lease.py) and waits
    for it to settle (at most lease.SETTLE6 seconds) before starting them.
    `tls`: HTTPS beside HTTP (see make_stack); the TlsServer is made before the
    workers fork, so they share its session ticket keys (a client resumes on any)."""
    from ..content.store import Store
    addr, prefix = _parse_ip(ip)
    if addr is None and gateway:
        raise ValueError("a gateway is given by DHCP: --gateway needs a static --ip")
    from .ipv6 import Static6
    if ip6 not in ("off", "auto") and not isinstance(ip6, Static6):
        raise ValueError(f"ip6 must be off, auto or an ipv6.Static6, not {ip6!r}")

    if gateway:
        gateway = str(ipaddress.IPv4Address(gateway))
    mac_b = parse_mac(mac) if mac else None
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    with Store.open(store_path) as store:        # check it once before forking
        urls = len(store.site.resources)
    from .rings.tpacket import interface_info, read_offload
    hw = interface_info(iface)
    addresses = [{"ip": addr, "prefix": prefix, "how": "static", "gateway": gateway}] if addr else []
    info = {"ip": addr, "prefix": prefix if addr else None, "addresses": addresses, "port": 80, "urls": urls,
            "iface": iface,
            "mac": ":".join(f"{b:02x}" for b in (mac_b or hw.mac)),
            "offload": read_offload(iface)._asdict(), "workers": workers, "syn_gate": _syn_gate_kind()}
    if observe and observe.get("metrics_port"):
        info["metrics_port"] = int(observe["metrics_port"])
    stopper = _Stopper(stop_event, drain > 0)
    if tls:
        srv = tls["server"]
        info["port"] = 0 if tls["http"] == "off" else 80
        info["https"] = {"port": 443, "http": tls["http"], "names": srv.names, "not_after": srv.info["not_after"],
                         "fingerprint_sha256": srv.info["fingerprint_sha256"]}
        if tls.get("self_signed"):
            info["https"]["self_signed_cert"] = srv.certfile     # for clients to trust (never the key)
    wake_fd, restore = _install_signals(stopper)
    try:
        if workers == 1:
            fired = []

            def ready(stack, dev):
                info["offload"] = dev.offload._asdict()
                if on_ready and stack.ip is not None:
                    fired.append(1)
                    on_ready(Ready(info, _Live(lambda: _collect(stack, dev))))

            def event(stack, dev, kind, ev):
                if kind == "address":
                    info["ip"], info["prefix"] = ev["ip"], ev["prefix"]
                    info["addresses"][:] = [a for a in info["addresses"] if "ip6" in a] + ([ev] if ev["ip"] else [])
                elif kind == "address6":
                    info["addresses"][:] = [a for a in info["addresses"] if a.get("ip6") != ev["ip6"]]
                    if ev["event"] == "acquired":
                        info["addresses"].append(ev)
                if not fired and stack.ip is not None:
                    ready(stack, dev)                   # the first lease: the ready line says where
                elif on_event:
                    on_event(kind, ev)
            return _worker(store_path, iface, addr, prefix, gateway, mac_b, capture, None, stopper,
                           wake_fd, ready, config, _cpu_for(0) if pin else None, observe=observe,
                           drain=drain, on_event=event, hostname=hostname, ip6=ip6, tls=tls)
        if addr is None or ip6 != "off":
            return _serve_parent_workers(store_path, iface, hw, addr, prefix, gateway, ip6, mac_b, capture, workers,
                                         stopper, wake_fd, on_ready, info, pin, config, on_event, hostname,
                                         observe, drain, tls)
        return _serve_workers(store_path, iface, addr, prefix, gateway, mac_b, capture, workers,
                              stopper, wake_fd, on_ready, info, pin, config, observe, drain, tls=tls)
    finally:
        restore()


def _cpu_for(i: int) -> int:
    """Worker i's CPU: the i-th of the CPUs we may run on (respects taskset)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[i % len(cpus)]


def _serve_parent_workers(store_path, iface, hw, addr, prefix, gateway, ip6, mac_b, capture, workers, stopper,
                          wake_fd, on_ready, info, pin, config, on_event, hostname, observe=None, drain=0.0,
                          tls=None) -> Counters:
    """Several workers with a DHCP address or IPv6: the parent runs the control plane
    (lease.py: the lease, IPv6 addresses and routers), waits for the lease and for
    IPv6 to settle, starts the workers on what it holds (a static IPv4 address, an
    ipv6.Delegated6), and restarts them when that changes or is lost. on_ready fires
    once, with the first set of workers; later address events go to on_event."""
    from .iface import StackConfig
    from .lease import HOLD6, ParentControl
    mac = mac_b or hw.mac
    parent = ParentControl(iface, mac, hw.mtu, hostname, time.monotonic(), dhcp=addr is None, ip6=ip6,
                           secret=ip6_secret(mac, iface) if ip6 != "off" else b"")
    v4 = {"ev": None, "again": False}       # the lease; a new one after a loss is announced
    running = {"key": None, "restart": False, "since": 0.0}
    total = Counters()
    live = Counters()            # one object across restarts: the on_ready holder keeps seeing it
    first = [True]

    def handle(evs):
        for kind, ev in evs:
            if kind == "address":
                if ev["event"] in ("changed", "lost") or ev["ip"] and v4["ev"] is None:
                    if running["key"] is not None:
                        running["restart"] = True       # the workers serve the old address: start over
                    if ev["event"] in ("changed", "lost") and on_event:
                        on_event(kind, ev)
                    v4["ev"] = ev if ev["ip"] else None
                    v4["again"] = v4["again"] or not ev["ip"]
            elif kind == "address6":
                info["addresses"][:] = [a for a in info["addresses"] if a.get("ip6") != ev["ip6"]]
                if ev["event"] == "acquired":
                    info["addresses"].append(ev)
                if not first[0] and on_event:
                    on_event(kind, ev)
            elif on_event:
                on_event(kind, ev)
        if running["key"] is not None and ip6 != "off" and parent.delegation().key() != running["key"] \
                and time.monotonic() - running["since"] >= HOLD6:
            running["restart"] = True           # an address came or went, the MTU changed

    def started(r):
        first[0] = False                        # the ready line is out: later address events are printed
        if on_ready:
            on_ready(r)

    def ready_to_start(now):
        return (addr is not None or v4["ev"] is not None) and parent.ip6_settled(now)

    poller = select.poll()
    poller.register(parent.fileno(), select.POLLIN)
    if wake_fd >= 0:
        poller.register(wake_fd, select.POLLIN)
    try:
        while not stopper():
            deadline, evs = parent.pump(time.monotonic())
            handle(evs)
            if not ready_to_start(time.monotonic()):
                for fd, _ in poller.poll(max(0.0, min(deadline - time.monotonic(), 0.2)) * 1000.0 + 1):
                    if fd == wake_fd:
                        _drain(wake_fd)
                continue
            a, p, gw = addr, prefix, gateway
            cfg = config
            if addr is None:
                ev = v4["ev"]
                if v4["again"] and on_event:
                    on_event("address", ev)                     # a new lease after a lost one
                v4["again"] = False
                a, p, gw = ev["ip"], ev["prefix"], ev.get("gateway")
                info["ip"], info["prefix"] = a, p
                info["addresses"][:] = [x for x in info["addresses"] if "ip6" in x] + [ev]
                if gw and ipaddress.IPv4Address(gw) not in ipaddress.IPv4Interface(f"{a}/{p}").network:
                    gw = None               # an off-link gateway (/32 leases): replies go to the sender's MAC anyway
                if cfg is None and ev.get("mtu") and ev["mtu"] < hw.mtu:
                    cfg = StackConfig(mtu=ev["mtu"])            # option 26
            d6 = parent.delegation()
            running.update(key=d6.key() if d6 != "off" else (), restart=False, since=time.monotonic())
            parent.serving = True
            try:
                total.merge(_serve_workers(store_path, iface, a, p, gw, mac_b, capture, workers, stopper, wake_fd,
                                           started if first[0] else None, info, pin, cfg, observe=observe,
                                           drain=drain, parent=parent, on_parent=handle, running=running,
                                           live=live, tls=tls, ip6=d6))
            finally:
                parent.serving = False
                running["key"] = None
    finally:
        parent.close()
    total.merge(parent.counters)
    total["workers"] = workers
    return total


def _serve_workers(store_path, iface, addr, prefix, gateway, mac_b, capture, workers, stopper,
                   wake_fd, on_ready, info, pin, config, observe=None, drain=0.0, parent=None, on_parent=None,
                   running=None, live=None, tls=None, ip6="off") -> Counters:
    """Fork the workers on `addr` (and `ip6`: "off" or an ipv6.Delegated6) and supervise
    them until stopped; with `parent` (lease.ParentControl) pump it, hand its events to
    `on_parent`, and stop the workers once that sets running["restart"]."""
    fanout = os.getpid() & 0xFFFF
    children = {}                # pid -> read end of its report pipe
    total = Counters()
    live = Counters() if live is None else live     # the workers' last LIVE reports, summed (Ready.counters)
    last = {}                    # pid -> its last LIVE report
    ready = 0
    failed = []
    try:                         # a failed fork still stops and reaps the workers already started
        for i in range(workers):
            r, w = os.pipe()
            try:
                pid = os.fork()
            except OSError:
                os.close(r)
                os.close(w)
                raise
            if pid == 0:         # the worker
                os.close(r)
                code = _child(w, i, store_path, iface, addr, prefix, gateway, mac_b,
                              f"{capture}.{i}" if capture else None, fanout, config,
                              _cpu_for(i) if pin else None, observe, drain, tls, ip6)
                os._exit(code)
            os.close(w)
            children[pid] = os.fdopen(r, "r")
        poller = select.poll()
        by_fd = {}
        for pid, f in children.items():
            poller.register(f.fileno(), select.POLLIN | select.POLLHUP)
            by_fd[f.fileno()] = pid
        if wake_fd >= 0:
            poller.register(wake_fd, select.POLLIN)
        if parent is not None:
            poller.register(parent.fileno(), select.POLLIN)
        open_fds = set(by_fd)
        signalled = False
        while open_fds:
            if (stopper() or running is not None and running["restart"]) and not signalled:
                signalled = True
                for pid in children:
                    _kill(pid, signal.SIGTERM)
            timeout = 200
            if parent is not None:                      # renewal, rebinding, RAs, change, loss
                deadline, evs = parent.pump(time.monotonic())
                on_parent(evs)
                timeout = max(1.0, min(200.0, (deadline - time.monotonic()) * 1000.0))
            for fd, _ in poller.poll(timeout):
                if fd == wake_fd:
                    _drain(wake_fd)
                    continue
                if parent is not None and fd == parent.fileno():
                    continue                            # pumped at the top of the loop
                line = children[by_fd[fd]].readline()
                if not line:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                kind, _, data = line.rstrip("\n").partition(" ")
                if kind == "READY":
                    ready += 1
                    if ready == workers and on_ready:
                        on_ready(Ready(info, live))
                elif kind == "LIVE":
                    last[by_fd[fd]] = json.loads(data)
                    live.clear()
                    for part in last.values():
                        live.merge(part)
                    if parent is not None:
                        live.merge(parent.counters)     # the parent's DHCP client and IPv6 host
                    live["workers"] = workers
                elif kind == "COUNTERS":
                    part = json.loads(data)
                    total.merge(part)
                    if part.get("http_replies"):
                        total["workers_serving"] += 1
                elif kind == "ERROR":
                    failed.append(data.strip())
                    if not signalled:             # one worker failed: stop them all
                        stopper.flag = True
    finally:
        for pid, f in children.items():
            _kill(pid, signal.SIGTERM)
            f.close()
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    if failed:
        raise RuntimeError("worker failed: " + "; ".join(failed))
    total["workers"] = workers
    return total


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent():
    """PR_SET_PDEATHSIG: a worker gets SIGTERM if the parent dies without
    stopping it (SIGKILL), so no worker outlives its server. Best effort."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)    # PR_SET_PDEATHSIG
    except Exception:
        pass


def _child(w, i, store_path, iface, addr, prefix, gateway, mac_b, capture, fanout, config, cpu,
           observe=None, drain=0.0, tls=None, ip6="off") -> int:
    out = os.fdopen(w, "w", buffering=1)
    _die_with_parent()
    try:
        stopper = _Stopper(None, drain > 0)
        wake_fd, _ = _install_signals(stopper)

        def ready(stack, dev):
            out.write("READY\n")

        def tick(stack, dev):
            out.write("LIVE " + json.dumps(dict(_collect(stack, dev))) + "\n")
        counters = _worker(store_path, iface, addr, prefix, gateway, mac_b, capture, fanout,
                           stopper, wake_fd, ready, config, cpu, tick, observe, drain, i, ip6=ip6, tls=tls)
        out.write("COUNTERS " + json.dumps(dict(counters)) + "\n")
        return 0
    except BaseException as e:
        try:
            out.write(f"ERROR worker {i}: {type(e).__name__}: {e}\n")
        except Exception:
            pass
        return 1
    finally:
        try:
            out.close()
        except Exception:
            pass
