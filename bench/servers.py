"""The servers under test, behind one interface.

Theory of operation: a Server knows how to prepare itself from the bench
site once (nginx: render its configuration; the appliance: compile the
site to a content store) and how to start on a `vm.netns.Link`'s server
namespace, pinned to given cores with a given worker count. `start` is a
context manager yielding a Running handle (the pid of the process that
owns the server, the URL base, the process tree for CPU accounting); on
exit it stops the server by pid and, for the appliance, collects the
counters that SIGINT makes `serve` print.

Networks (`net`, one per benchmark session): "ipv4" (as always: the
appliance on 198.18.N.1, nginx with that address on its veth end);
"ipv6": nginx on [::]:80 with 2001:2:0:N::1/64 on its veth end; the
appliance `serve --ip6 auto`, its SLAAC address (RFC 7217: not known in
advance, read from its HABOOB-ADDRESS line) from router advertisements of
a dnsmasq in the client namespace, and a store compiled with --mss 1440
(MTU - 60: the stored sums fit IPv6 segments, docs/internals.md); the
client has 2001:2:0:N::2/64. "https": IPv4, port 443 only (the appliance
`--http off`), both servers with the same ECDSA P-256 certificate and key
(`tls_files`, made once per run with openssl), TLS 1.2 and 1.3 with the
appliance's TLS 1.2 cipher list and server preference, session tickets on,
no server-side session cache (the appliance has none; nginx
`ssl_session_cache none`, its default), access log off. Which protocol,
suite and group are negotiated is the client's choice (bench/run.py sets
it with OPENSSL_CONF) and is recorded per server.

Access log (`access_log=True`, bench --access-log): both servers write
Combined Log Format lines to a regular file in the work directory (a
tmpfs then): nginx `access_log FILE combined buffer=64k flush=1s` (it
batches writes, as the appliance does per loop iteration), the appliance
`serve --access-log console` with its stdout, opened O_APPEND, being that
file. `Running.log_lines()` counts the lines so far, reading only what
was appended since the last call. Both servers are started as
`ip netns exec NS taskset -c CPUS prog ...`: ip and taskset exec, so the
Popen pid is the server's own and the affinity is inherited by its
workers. Nothing is killed by name: stragglers of the process tree
(recorded while the server ran) are killed by pid.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import jinja2

from . import cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


ACCESS_LINE = re.compile(rb"^[0-9A-Fa-f.:]+ - - \[", re.M)   # a Combined Log Format line


class ServerError(RuntimeError):
    """A server failed to prepare, start or stop; the message says which and why."""


@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    base_url: str
    log_path: str
    tree: dict[int, int] = field(default_factory=dict)   # pid -> start time, as seen while running
    counters: dict | None = None   # the appliance's counters, after stop
    access_log: str | None = None  # the access log file, when logging
    _log_at: int = 0               # bytes of it counted so far
    _log_lines: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The live process tree; remembered so stragglers can be killed by pid."""
        pids = cpu.process_tree(self.pid) if self.proc.poll() is None else []
        for pid in pids:
            self.tree.setdefault(pid, cpu.start_time(pid))
        return pids

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_lines(self) -> int:
        """Access log lines written so far: complete lines starting `ADDR - - [`
        (the appliance's stdout also carries its HABOOB-* lines)."""
        if self.access_log is None:
            return 0
        try:
            with open(self.access_log, "rb") as f:
                f.seek(self._log_at)
                data = f.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1         # a line being written counts once complete
        self._log_at += end
        self._log_lines += len(ACCESS_LINE.findall(data[:end]))
        return self._log_lines


def _log_tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def wait_ready(link, running: Running, timeout: float = 60.0) -> None:
    """Poll GET / from the client namespace until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        if not running.alive():
            raise ServerError(f"{running.name} exited with {running.proc.returncode} before it "
                              f"answered; its log ({running.log_path}):\n{_log_tail(running.log_path)}")
        probe = link.client.run(["curl", "-k", "-g", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                 "--max-time", "1", running.base_url + "/"], check=False)
        if probe.stdout.strip() == "200":
            return
        if time.monotonic() > deadline:
            raise ServerError(f"{running.name} did not answer GET / with 200 within {timeout:.0f} s "
                              f"(last: {probe.stdout.strip() or probe.stderr.strip()}); its log:\n"
                              f"{_log_tail(running.log_path)}")
        time.sleep(0.2)


def _stop(running: Running, sig: int, grace: float) -> None:
    """Send sig to the server's pid, wait, then SIGKILL whatever of its tree is left."""
    running.pids()
    if running.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid, sig)
        try:
            running.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(running.pid, signal.SIGKILL)
            running.proc.wait()
    for pid, started in running.tree.items():
        # Only if it is still the same process (same start time), not a reused pid.
        if pid != running.pid and started is not None and cpu.start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


NETS = ("ipv4", "ipv6", "https")


def ip6_addr(link, host: int) -> str:
    """The link's IPv6 address `host` in 2001:2:0:N::/64 (N: the IPv4 subnet's third byte)."""
    return f"2001:2:0:{link.server_ip.split('.')[2]}::{host:x}"


def enable_ip6(ns, ifname: str, addr: str | None = None) -> None:
    """IPv6 on for one interface (vm/netns.py turns it off everywhere), with a static address."""
    from vm import netns
    ns.sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", "0")
    if addr:
        netns.ip("-6", "addr", "add", addr, "dev", ifname, "nodad", ns=ns.name)


def tls_files(workdir: str, ips: list[str]) -> tuple[str, str]:
    """One self-signed ECDSA P-256 certificate (SANs: the servers' addresses) and its key, for both servers."""
    cert, key = os.path.join(workdir, "bench-cert.pem"), os.path.join(workdir, "bench-key.pem")
    san = "subjectAltName=DNS:bench.test," + ",".join(f"IP:{ip}" for ip in ips)
    proc = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                           "-nodes", "-keyout", key, "-out", cert, "-days", "7", "-subj", "/CN=bench.test",
                           "-addext", san], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ServerError(f"openssl req (the bench certificate) failed: {proc.stderr.strip()}")
    os.chmod(key, 0o600)
    return cert, key


class Server:
    name = "server"
    tls: tuple[str, str] | None = None     # (cert, key) for the "https" net, set by bench/run.py

    def prepare(self, site_dir: str, workdir: str) -> None:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def start(self, link, workers: int, cpus: str, net: str = "ipv4"):
        raise NotImplementedError


class Nginx(Server):
    """nginx on the kernel's stack; 198.18.N.1 is added to the server veth end."""
    name = "nginx"

    def __init__(self, binary: str = "nginx", access_log: bool = False):
        self.binary = binary
        self.access_log = access_log

    def prepare(self, site_dir: str, workdir: str) -> None:
        self.site_dir = site_dir
        self.workdir = os.path.join(workdir, "nginx")
        os.makedirs(self.workdir, exist_ok=True)

    def version(self) -> str:
        proc = subprocess.run([self.binary, "-v"], capture_output=True, text=True)
        return (proc.stderr or proc.stdout).strip().split("/", 1)[-1]

    def render(self, ip: str, workers: int, cpu_list: list[int], prefix: str, access_log: str | None = None,
               net: str = "ipv4") -> str:
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), undefined=jinja2.StrictUndefined,
                                 keep_trailing_newline=True)
        ncpu = os.cpu_count() or 1
        # worker_cpu_affinity: one bitmask per worker, rightmost bit = CPU 0.
        masks = ["".join("1" if c == cpu_list[i % len(cpu_list)] else "0" for c in reversed(range(ncpu)))
                 for i in range(workers)]
        return env.get_template("nginx.conf.j2").render(
            workers=workers, affinity=" ".join(masks), prefix=prefix, ip=ip, root=self.site_dir,
            access_log=access_log, net=net, tls=self.tls)

    @contextlib.contextmanager
    def start(self, link, workers: int, cpus: list[int], net: str = "ipv4"):
        from vm import netns
        prefix = os.path.join(self.workdir, f"w{workers}" + ("" if net == "ipv4" else f"-{net}"))
        os.makedirs(prefix, exist_ok=True)
        conf = os.path.join(prefix, "nginx.conf")
        access = os.path.join(prefix, "access.log") if self.access_log else None
        with open(conf, "w") as f:
            f.write(self.render(link.server_ip, workers, cpus, prefix, access, net=net))
        netns.ip("addr", "add", f"{link.server_ip}/{link.prefix}", "dev", link.server_if, ns=link.server.name)
        if net == "ipv6":
            enable_ip6(link.server, link.server_if, ip6_addr(link, 1) + "/64")
        base = {"ipv4": f"http://{link.server_ip}", "ipv6": f"http://[{ip6_addr(link, 1)}]",
                "https": f"https://{link.server_ip}"}[net]
        log = os.path.join(prefix, "stderr.log")
        check = link.server.run([self.binary, "-t", "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")],
                                check=False)
        if check.returncode != 0:
            raise ServerError(f"nginx -t rejected {conf}: {check.stderr.strip()}")
        with open(log, "wb") as logf:
            proc = link.server.popen(["taskset", "-c", ",".join(map(str, cpus)), self.binary,
                                      "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")],
                                     stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        running = Running(self.name, proc, base, os.path.join(prefix, "error.log"), access_log=access)
        try:
            wait_ready(link, running)
            running.pids()
            yield running
        finally:
            _stop(running, signal.SIGTERM, 10)  # SIGTERM: nginx's fast shutdown
            netns.ip("addr", "del", f"{link.server_ip}/{link.prefix}", "dev", link.server_if,
                     ns=link.server.name, check=False)


def parse_counters(text: str) -> dict | None:
    """The last JSON object printed on a line (optionally after a 'HABOOB-COUNTERS ' prefix)."""
    found = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("HABOOB-COUNTERS "):
            line = line[len("HABOOB-COUNTERS "):]
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    found = obj
    return found


APPLIANCE_MAC = "02:48:42:00:00:01"     # locally administered (the link is ours alone)


class Appliance(Server):
    """`python -m appliance serve` in host mode on the bare veth end."""
    name = "appliance"

    def __init__(self, python: str = sys.executable, store: str | None = None, access_log: bool = False):
        self.python = python
        self.store = store
        self.access_log = access_log

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def prepare(self, site_dir: str, workdir: str, ip6: bool = False) -> None:
        """Compile the bench site (and, for IPv6 cells, once more at --mss 1440) unless --store was given."""
        self.workdir = os.path.join(workdir, "appliance")
        os.makedirs(self.workdir, exist_ok=True)
        if self.store:
            self.store6 = self.store
            return
        self.store = self._compile(site_dir, "bench.store")
        self.store6 = self._compile(site_dir, "bench6.store", "--mss", "1440") if ip6 else None

    def _compile(self, site_dir: str, name: str, *extra: str) -> str:
        out = os.path.join(self.workdir, name)
        proc = subprocess.run([self.python, "-m", "appliance", "compile", "--site", site_dir, "--out", out, *extra],
                              capture_output=True, text=True, cwd=REPO, env=self._env())
        if proc.returncode != 0:
            raise ServerError(f"python -m appliance compile failed ({proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        return out

    def version(self) -> str:
        proc = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        rev = proc.stdout.strip() or "?"
        return f"haboob {rev} (python {sys.version.split()[0]})"

    def argv(self, link, workers: int, net: str = "ipv4") -> list[str]:
        # --mac: the appliance owns the link, so its frames should not be the host
        # kernel's: with a MAC of its own they are PACKET_OTHERHOST there and
        # ip_rcv drops them at its first check, instead of a route lookup per
        # frame (the veth end has no address). The kernel-bypass NIC of Sandstorm
        # (netmap) gives the same separation.
        extra = {"ipv4": [], "ipv6": ["--ip6", "auto"],
                 "https": ["--tls-cert", self.tls[0], "--tls-key", self.tls[1], "--http", "off"] if self.tls else []}
        return [self.python, "-m", "appliance", "serve", "--store", self.store6 if net == "ipv6" else self.store,
                "--iface", link.server_if, "--ip", f"{link.server_ip}/{link.prefix}", "--mac", APPLIANCE_MAC,
                "--workers", str(workers), "--pin", *extra[net]] \
            + (["--access-log", "console", "--log-format", "combined"] if self.access_log else [])

    @contextlib.contextmanager
    def start(self, link, workers: int, cpus: list[int], net: str = "ipv4"):
        log = os.path.join(self.workdir, f"serve-w{workers}-{link.server.name}.log")
        out = os.path.join(self.workdir, f"serve-w{workers}-{link.server.name}.out")
        with contextlib.ExitStack() as cleanup:
            if net == "ipv6":       # router advertisements for SLAAC, from the client's side (as a router would)
                ra = link.client.popen(
                    ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
                     f"--interface={link.client_if}", "--bind-interfaces", "--enable-ra",
                     f"--dhcp-range={ip6_addr(link, 0)},ra-only,64,1h",
                     f"--pid-file={os.path.join(self.workdir, link.client.name + '.dnsmasq.pid')}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                cleanup.callback(_end, ra)
            # stdout O_APPEND: the console access log appends through a description
            # of its own, and the counters printed at exit must land after its lines.
            with open(log, "wb") as logf, open(out, "ab") as outf:
                proc = link.server.popen(["taskset", "-c", ",".join(map(str, cpus)),
                                          *self.argv(link, workers, net)],
                                         stdout=outf, stderr=logf, cwd=REPO, env=self._env(), start_new_session=True)
            running = Running(self.name, proc, ("https://" if net == "https" else "http://") + link.server_ip, log,
                              access_log=out if self.access_log else None)
            try:
                if net == "ipv6":
                    running.base_url = f"http://[{_slaac_address(running, out)}]"
                wait_ready(link, running)
                running.pids()
                yield running
            finally:
                # SIGINT makes serve print its counters as JSON and exit.
                _stop(running, signal.SIGINT, 15)
                with open(out, errors="replace") as f:
                    text = f.read()
                running.counters = parse_counters(text) or parse_counters(_log_tail(log, 20000))


def _end(proc: subprocess.Popen) -> None:
    """Stop a helper process we started (dnsmasq), by its pid."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _slaac_address(running: Running, out: str, timeout: float = 40.0) -> str:
    """The appliance's SLAAC address, from the `HABOOB-ADDRESS {"event": "acquired", "how": "slaac"}`
    line it prints once DAD is done (the address is RFC 7217's, not derived from the MAC)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running.alive():
            raise ServerError(f"appliance exited with {running.proc.returncode} before it had an IPv6 address; "
                              f"its log ({running.log_path}):\n{_log_tail(running.log_path)}")
        with open(out, errors="replace") as f:
            for line in f:
                if line.startswith("HABOOB-ADDRESS "):
                    with contextlib.suppress(ValueError):
                        info = json.loads(line.split(" ", 1)[1])
                        if info.get("event") == "acquired" and info.get("how") == "slaac":
                            return info["ip6"]
        time.sleep(0.2)
    raise ServerError(f"the appliance got no SLAAC address within {timeout:.0f} s (no router advertisement "
                      f"from dnsmasq?); its log:\n{_log_tail(running.log_path)}")


SERVERS = {"nginx": Nginx, "appliance": Appliance}
