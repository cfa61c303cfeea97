"""`python -m appliance serve`: serve a site on a Linux interface ("host mode").

Theory of operation: check everything that can be checked before touching
the network (the interface exists, is up and has no kernel IPv4 address,
since the kernel would answer our peers' TCP segments with RSTs; the
addresses parse; the store opens or the site compiles), then hand over to
`appliance.stack.serve.serve`. Output on stdout is two lines of JSON, the
same as inside the image:

    HABOOB-READY {"ip": ..., "addresses": [{"ip", "prefix", "how", ...}], "port": 80, ...}
    HABOOB-ADDRESS {"event": "changed"|"lost"|"acquired", "ip": ..., "how": "dhcp", ...}
                                   (with --ip dhcp: each address change as it happens;
                                    HABOOB-DHCP {"event": "no_answer"|"declined"} notices;
                                    with --ip6: each IPv6 address acquired, lost, or
                                    "duplicate" (DAD failed: not used; a static one is
                                    also an error line on stderr))
    HABOOB-COUNTERS {...}          (after SIGINT/SIGTERM; on SIGUSR1, the
                                    counters so far, and serving goes on)

Every refusal is one line on stderr naming what is wrong, exit status 2.

HTTPS (`--tls-cert/--tls-key`, or `--tls-self-signed NAMES` for development:
a P-256 key and certificate made with the host's `openssl` CLI in the
temporary directory of this run) is checked before serving: the PEM files
parse, the key matches the certificate, the chain is in order, the leaf is
not expired (a warning when it expires within 30 days). Errors name the
file, never its contents. `--http` says what port 80 does beside HTTPS
(serve the site, 308 to https, or nothing), `--hsts` adds
Strict-Transport-Security to the HTTPS responses.
"""
import contextlib
import json
import os
import signal
import sys
import tempfile

import click

from ..obs.cli_options import obs_options, obs_settings

__all__ = ["serve_cmd", "check_interface", "self_signed", "load_tls"]

EXPIRY_WARN_DAYS = 30


def check_interface(iface: str) -> str | None:
    """Why `iface` cannot be served on, or None if it can."""
    from .rings.tpacket import TpacketError, interface_info
    try:
        info = interface_info(iface)
    except TpacketError as e:
        return e.strerror if e.strerror else str(e)
    except OSError as e:
        return f"interface {iface!r}: {e.strerror or e}"
    if not info.up:
        return f"interface {iface!r} is down (ip link set {iface} up)"
    if info.ipv4:
        return (f"interface {iface!r} has the kernel IPv4 address {info.ipv4}; the kernel would answer "
                f"our clients with RSTs. Remove it first (ip addr flush dev {iface})")
    return None


@contextlib.contextmanager
def _nothing():
    yield None


def _fail(msg: str):
    click.echo(f"haboob serve: {msg}", err=True)
    sys.exit(2)


def self_signed(names, d: str):
    """A P-256 key and a self-signed certificate for `names` (DNS names or IPv4
    addresses) made with the openssl CLI in directory `d`: (cert, key) paths."""
    import ipaddress
    import subprocess
    san = []
    for n in names:
        try:
            ipaddress.ip_address(n)
            san.append("IP:" + n)
        except ValueError:
            san.append("DNS:" + n)
    crt, key = os.path.join(d, "selfsigned.crt"), os.path.join(d, "selfsigned.key")
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", crt, "-days", "365", "-subj", "/CN=" + names[0],
            "-addext", "subjectAltName=" + ",".join(san)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"--tls-self-signed: cannot run openssl ({e})") from None
    if r.returncode != 0:
        raise RuntimeError(f"--tls-self-signed: openssl failed: {r.stderr.strip().splitlines()[-1:]}")
    os.chmod(key, 0o600)
    return crt, key


def load_tls(cert: str, key: str, hsts: int, now_unix: float = None):
    """The TlsServer for `cert`/`key`, checked (tls.check_chain); warnings on stderr.
    Raises tls.TlsError with a message naming the file."""
    import time
    from .tls import TlsError, TlsServer
    srv = TlsServer(cert, key, hsts=hsts, now=time.monotonic())
    left = srv.info["not_after_ts"] - (time.time() if now_unix is None else now_unix)
    if left <= 0:
        raise TlsError(f"certificate file {cert}: expired on {srv.info['not_after']}")
    click.echo(f"haboob serve: HTTPS certificate for {', '.join(srv.names)} (chain of {srv.info['chain']}), "
               f"sha256 {srv.info['fingerprint_sha256']}, expires {srv.info['not_after']} "
               f"({int(left // 86400)} days)", err=True)
    if left < EXPIRY_WARN_DAYS * 86400:
        click.echo(f"haboob serve: warning: certificate file {cert} expires within {EXPIRY_WARN_DAYS} days "
                   f"({srv.info['not_after']}): renew it", err=True)
    return srv


@click.command("serve")
@click.option("--site", type=click.Path(file_okay=False), help="Site directory (compiled to a temporary store first).")
@click.option("--store", type=click.Path(dir_okay=False), help="A compiled content store file.")
@click.option("--iface", required=True, help="Interface to serve on (up, without an IPv4 address).")
@click.option("--ip", "ip", required=True,
              help="Our address with prefix, e.g. 198.18.0.1/24, or 'dhcp' (DHCPv4: the ready line waits for a lease).")
@click.option("--gateway", default=None, help="IPv4 gateway for clients outside the prefix.")
@click.option("--mac", default=None,
              help="Our MAC (default: the interface's). Another one than the interface's keeps our "
                   "frames out of the host kernel's IP layer (it drops them as for another host).")
@click.option("--workers", default=1, show_default=True, type=int,
              help="Stack instances (processes) sharing the interface via PACKET_FANOUT.")
@click.option("--pin", is_flag=True, help="Pin worker i to the i-th CPU this process may run on.")
@click.option("--capture", type=click.Path(dir_okay=False), default=None,
              help="Record every frame to this pcap file (one file per worker: FILE.i).")
@click.option("--hostname", default=None, help="Host name sent to the DHCP server (option 12).")
@click.option("--ip6", default="off", show_default=True, metavar="off|auto|ADDR/PREFIX",
              help="auto: IPv6 link-local and SLAAC addresses (DHCPv6 when the router says M=1), neighbour discovery, ping -6, "
                   "and the site over TCP/IPv6 on the same port; ADDR/PREFIX (e.g. 2001:2:0:1::10/64): that "
                   "static address beside the link-local one (after DAD), no SLAAC. Off unless asked in host "
                   "mode (built images default to auto). With --workers N the parent runs IPv6 and waits up "
                   "to 6 s for it before starting the workers.")
@click.option("--gateway6", default=None, metavar="ADDR",
              help="IPv6 default router with a static --ip6: link-local (fe80::...) or on-link.")
@click.option("--tls-cert", default=None, help="HTTPS on port 443: the certificate chain (PEM, leaf first).")
@click.option("--tls-key", default=None, help="The private key (PEM) of --tls-cert.")
@click.option("--tls-self-signed", "self_names", default=None, metavar="NAME[,NAME...]",
              help="HTTPS with a self-signed certificate for these names, made now (development only).")
@click.option("--http", "http_mode", type=click.Choice(["redirect", "serve", "off"]), default=None,
              help="Port 80 beside HTTPS: 308 to https, serve the site too, or closed.  [default: redirect]")
@click.option("--hsts", type=click.IntRange(0, 2 ** 31 - 1), default=0,
              help="Add Strict-Transport-Security: max-age=SECONDS to HTTPS responses (0: no).")
@obs_options
def serve_cmd(site, store, iface, ip, gateway, mac, workers, pin, capture, hostname, ip6, gateway6, tls_cert, tls_key,
              self_names, http_mode, hsts, **obs):
    """Serve a site on a network interface until SIGINT/SIGTERM.

    Prints `HABOOB-READY {json}` once serving and `HABOOB-COUNTERS {json}`
    at exit, and on SIGUSR1 the counters so far (with several workers, as
    of their last report: once a second). The interface must be up and have
    no IPv4 address.
    """
    import ipaddress
    from .ipv6 import ip6_mode
    from .serve import parse_mac, serve
    if bool(site) == bool(store):
        _fail("give exactly one of --site DIR or --store FILE")
    try:
        observe = obs_settings(obs)
    except click.BadParameter as e:
        _fail(e.message)
    try:
        ip6 = ip6_mode(ip6, gateway6)
    except ValueError as e:
        _fail(str(e))
    if ip == "dhcp":
        if gateway:
            _fail("--gateway comes from the DHCP server with --ip dhcp (give a static --ip ADDR/PREFIX to set one)")
        if hostname is not None and not (0 < len(hostname) <= 63 and hostname.replace("-", "").isalnum()
                                         and hostname.isascii()):
            _fail(f"--hostname {hostname!r} is not a host name (1-63 letters, digits, '-')")
        itf = None
    else:
        try:
            itf = ipaddress.IPv4Interface(ip)
        except ValueError as e:
            _fail(f"--ip {ip!r} is not an IPv4 address with prefix (nor 'dhcp'): {e}")
        if "/" not in ip:
            _fail(f"--ip {ip!r} needs a prefix length, e.g. {ip}/24")
    if gateway:
        try:
            gw = ipaddress.IPv4Address(gateway)
        except ValueError as e:
            _fail(f"--gateway {gateway!r}: {e}")
        if gw not in itf.network:
            _fail(f"--gateway {gateway} is not inside {itf.network}")
    if mac:
        try:
            parse_mac(mac)
        except ValueError as e:
            _fail(f"--mac: {e}")
    if workers < 1:
        _fail(f"--workers must be at least 1, not {workers}")
    if bool(tls_cert) != bool(tls_key):
        _fail("give both --tls-cert and --tls-key (or --tls-self-signed)")
    if tls_cert and self_names:
        _fail("give either --tls-cert/--tls-key or --tls-self-signed, not both")
    tls_on = bool(tls_cert or self_names)
    if not tls_on and (http_mode or hsts):
        _fail("--http and --hsts need HTTPS (--tls-cert/--tls-key or --tls-self-signed)")
    names = [n.strip() for n in self_names.split(",") if n.strip()] if self_names else []
    if self_names and not names:
        _fail("--tls-self-signed needs at least one name")
    # HTTPS first: a bad certificate or key is refused before anything else
    tls_tmp = tempfile.TemporaryDirectory(prefix="haboob-tls-") if names else None
    try:
        tls = None
        if tls_on:
            from .tls import TlsError
            try:
                if names:
                    tls_cert, tls_key = self_signed(names, tls_tmp.name)
                    click.echo(f"haboob serve: warning: self-signed certificate for {', '.join(names)} in "
                               f"{tls_cert}: for development only, not for production (clients must be "
                               f"told to trust it)", err=True)
                srv = load_tls(tls_cert, tls_key, hsts)
            except (TlsError, RuntimeError) as e:
                _fail(str(e))
            default_host = next((n for n in srv.names if not n.startswith("*")), ip.split("/")[0])
            tls = {"server": srv, "http": http_mode or "redirect", "default_host": default_host,
                       "self_signed": bool(names)}
        if os.geteuid() != 0:
            _fail("serving needs root (AF_PACKET rings, CAP_NET_RAW)")
        why = check_interface(iface)
        if why:
            _fail(why)
        if capture:
            d = os.path.dirname(os.path.abspath(capture))
            if not os.path.isdir(d):
                _fail(f"--capture: directory {d} does not exist")
        with (tempfile.TemporaryDirectory(prefix="haboob-serve-") if site else _nothing()) as tmp:
            if site:
                if not os.path.isdir(site):
                    _fail(f"--site {site}: not a directory")
                from ..content.compiler import CompileError, compile_site
                store = os.path.join(tmp, "site.store")
                try:
                    compile_site(site, store)
                except CompileError as e:
                    _fail(f"--site {site}: {e}")

            live = {}

            def on_ready(ready):
                live["counters"] = ready.counters
                click.echo("HABOOB-READY " + json.dumps(ready.info))
                sys.stdout.flush()

            def on_event(kind, info):
                if kind == "address6" and info.get("event") == "duplicate" and info.get("how") == "static":
                    click.echo(f"haboob serve: error: the static IPv6 address {info['ip6']} is in use by "
                               f"another node (duplicate address detection, RFC 4862 §5.4.5): not used",
                               err=True)
                click.echo(("HABOOB-ADDRESS " if kind in ("address", "address6") else "HABOOB-DHCP ")
                           + json.dumps(info))
                sys.stdout.flush()

            def on_usr1(signum, frame):             # the counters so far, without stopping
                c = live.get("counters")
                click.echo("HABOOB-COUNTERS " + json.dumps(c.as_dict() if c is not None else {}))
                sys.stdout.flush()

            from ..content.store import StoreError
            old_usr1 = signal.signal(signal.SIGUSR1, on_usr1)
            try:                                    # serve() opens and checks the store first
                counters = serve(store, iface, ip, gateway=gateway, mac=mac, workers=workers,
                                 capture=capture, on_ready=on_ready, pin=pin, on_event=on_event,
                                 hostname=hostname, ip6=ip6, observe=observe, drain=observe["drain"], tls=tls)
            except StoreError as e:
                _fail(f"--store {store}: {e}")
            except OSError as e:
                _fail(f"interface {iface}: {e}")
            except RuntimeError as e:               # a worker failed to start
                _fail(str(e))
            finally:
                signal.signal(signal.SIGUSR1, old_usr1)
            click.echo("HABOOB-COUNTERS " + json.dumps(counters.as_dict() if hasattr(counters, "as_dict")
                                                      else dict(counters)))
    finally:
        if tls_tmp is not None:
            tls_tmp.cleanup()           # the self-signed key goes with the run
