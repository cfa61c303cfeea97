"""A fleet: N appliance VMs of one image behind HAProxy (`python -m vm fleet`).

Theory of operation: one private network namespace holds a Linux bridge
(198.18.60.1/24) and one tap per appliance; appliance i runs under QEMU in
that namespace at 198.18.60.(11+i) (`haboob.ip=` on its kernel command
line, its own MAC). HAProxy (Debian's) runs in our namespace, so the
balancer listens on 127.0.0.1:PORT like `vm boot`'s, while its server
sockets are opened inside the fleet's namespace (HAProxy's `namespace`
server keyword, setns(2) per connection). It balances TCP round-robin and
checks every appliance with `GET /` each 500 ms: two failures take a
server out, two successes put it back. A connection that cannot reach its
server is retried on another one (`option redispatch`), so requests keep
working while a dead appliance is still considered up. When a server is
taken out, HAProxy closes the sessions it still had with it
(`on-marked-down shutdown-sessions`): a dead guest sends no FIN or RST,
so without that a client in the middle of a download from it would hang
until a timeout (the client's, or `timeout server`) instead of seeing the
connection end and trying again. HAProxy logs health changes and abnormal
sessions (timeouts, cut ones; not the normal ones, which would grow the
file without bound) to haproxy.log beside its admin socket.

`Fleet.watch()` restarts a member whose QEMU exited (as an autoscaling
group replaces an instance); the balancer puts it back once its checks
pass. Before anything starts, `preflight` refuses a fleet the machine
cannot hold (memory, CPU: under TCG at most two guest vCPUs per host
core) or a missing tool. Everything is torn down in reverse order on exit,
also on Ctrl-C, SIGTERM or error: the guests are powered off together
(ACPI via QMP, QEMU killed after a grace time; a guest still booting is
quit at once, as its PID 1 does not watch the power button yet), then
HAProxy, the taps, the bridge and the namespace. The caller says which
waits a signal may interrupt (`interruptible`, vm/stop.py's phases); a
second signal kills every QEMU at once (`kill`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import netns
from .image import Image, VMError
from .qemu import READY, Machine, Options, _die_with_parent, free_port, kvm_usable

SUBNET = "198.18.60"
BRIDGE_IP = f"{SUBNET}.1/24"
FIRST_HOST = 11
QEMU_OVERHEAD_MB = 96          # QEMU's own memory beside the guest's, per VM (TCG translation cache included)
MEM_SHARE = 0.8                # of MemAvailable the fleet may take
VCPUS_PER_CORE = {"tcg": 2, "kvm": 4}


@dataclass
class Member:
    index: int
    ip: str
    mac: str
    tap: str
    machine: Machine | None = None
    restarts: int = 0

    @property
    def server(self) -> str:
        return f"app{self.index + 1}"


def mem_available_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise VMError("cannot read MemAvailable from /proc/meminfo")


def preflight(image: Image, n: int, smp: int = 1, memory: int | None = None) -> None:
    """Refuse, before anything starts, a fleet this machine cannot hold."""
    if n < 1:
        raise VMError(f"-n {n}: a fleet needs at least one appliance")
    if n > 200:
        raise VMError(f"-n {n}: at most 200 appliances (one /24 of {SUBNET}.0)")
    accel = "kvm" if kvm_usable() else "tcg"
    cores = os.cpu_count() or 1
    most = cores * VCPUS_PER_CORE[accel] // smp
    if n > most:
        raise VMError(f"-n {n}: {n} appliances of {smp} vCPU need {n * smp} vCPUs; this machine has {cores} "
                      f"cores and runs guests under {accel.upper()}, which holds at most "
                      f"{VCPUS_PER_CORE[accel]} vCPUs per core: at most -n {most}")
    mem = memory or image.memory
    need = n * (mem + QEMU_OVERHEAD_MB)
    have = int(mem_available_mb() * MEM_SHARE)
    if need > have:
        raise VMError(f"-n {n}: {n} appliances of {mem} MB (+{QEMU_OVERHEAD_MB} MB for QEMU each) need "
                      f"{need} MB; {have} MB are free for them here: at most -n "
                      f"{have // (mem + QEMU_OVERHEAD_MB)}")
    if os.geteuid() != 0:
        raise VMError("vm fleet makes a network namespace, a bridge and taps: run it as root")
    if shutil.which("haproxy") is None:
        raise VMError("vm fleet needs HAProxy: apt-get install haproxy")


def haproxy_config(members: list[Member], ns: str, port: int, stats: Path) -> str:
    servers = "\n".join(f"    server {m.server} {m.ip}:80 namespace {ns} check" for m in members)
    return f"""\
# Haboob fleet: written by vm/fleet.py for one run
global
    stats socket {stats} mode 600 level admin
    maxconn 4096
    log stderr format iso local0 info

defaults
    mode tcp
    log global
    option tcplog
    option dontlog-normal
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1

frontend site
    bind 127.0.0.1:{port}
    default_backend appliances

backend appliances
    balance roundrobin
    option httpchk GET /
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
{servers}
"""


def stats(sock: Path) -> dict[str, dict]:
    """HAProxy's `show stat` for the backend's servers: {name: {"status", "stot", ...}}."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(head, line.split(",")))
        if row.get("pxname") == "appliances" and row.get("svname") not in ("BACKEND", None):
            out[row["svname"]] = row
    return out


def wait_status(sock: Path, server: str, status: str, timeout: float) -> float:
    """Wait until HAProxy reports server exactly in status (UP, DOWN); the time it was seen.
    Exactly: on the way down a server is "UP 1/2" (one check failed) and still gets traffic."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = stats(sock).get(server, {}).get("status")
        if last == status:
            return time.monotonic()
        time.sleep(0.1)
    raise VMError(f"HAProxy did not report {server} {status} within {timeout:.0f}s (last: {last})")


@dataclass
class Fleet:
    image: Image
    n: int
    smp: int = 1
    memory: int | None = None
    port: int = 0
    echo: object = None                       # callable(str) for progress lines
    interruptible: object = contextlib.nullcontext   # () -> context manager: a wait a signal may cut
    members: list[Member] = field(default_factory=list)
    ns: netns.Namespace | None = None
    haproxy: subprocess.Popen | None = None
    tmp: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def stats_socket(self) -> Path:
        return self.tmp / "haproxy.sock"

    def _say(self, msg: str) -> None:
        if self.echo:
            self.echo(msg)

    def _options(self, m: Member) -> Options:
        return Options(net="tap", tap=m.tap, guest_ip=f"{m.ip}/24", mac=m.mac, smp=self.smp, memory=self.memory)

    def start_member(self, m: Member) -> Machine:
        m.machine = Machine(self.image, self._options(m), prefix=self.ns.argv([])).start()
        return m.machine

    def stats(self) -> dict[str, dict]:
        return stats(self.stats_socket)

    def wait_status(self, server: str, status: str, timeout: float) -> float:
        return wait_status(self.stats_socket, server, status, timeout)

    def watch(self, timeout: float = 300) -> list[Member]:
        """Restart members whose QEMU exited; the ones restarted."""
        out = []
        for m in self.members:
            if m.machine is not None and m.machine.proc.poll() is not None:
                rc = m.machine.proc.returncode
                m.machine.close()
                m.restarts += 1
                self._say(f"{m.server} ({m.ip}) stopped (QEMU exit {rc}); starting it again")
                self.start_member(m)
                out.append(m)
        return out

    @contextlib.contextmanager
    def run(self, ready_timeout: float = 400):
        preflight(self.image, self.n, self.smp, self.memory)
        with contextlib.ExitStack() as stack:
            self.tmp = Path(tempfile.mkdtemp(prefix="haboob-fleet-"))
            stack.callback(shutil.rmtree, self.tmp, True)
            self.ns = stack.enter_context(netns.namespace("f"))
            bridge = netns.unique("br")
            netns.ip("link", "add", bridge, "type", "bridge", ns=self.ns.name)
            stack.callback(netns.ip, "link", "del", bridge, ns=self.ns.name, check=False)
            netns.ip("addr", "add", BRIDGE_IP, "dev", bridge, ns=self.ns.name)
            netns.ip("link", "set", bridge, "up", ns=self.ns.name)
            for i in range(self.n):
                tap = stack.enter_context(netns.tap(self.ns))
                netns.ip("link", "set", tap, "master", bridge, ns=self.ns.name)
                self.members.append(Member(i, f"{SUBNET}.{FIRST_HOST + i}", f"52:54:00:00:60:{i + 1:02x}", tap))
            self.port = self.port or free_port()
            cfg = self.tmp / "haproxy.cfg"
            cfg.write_text(haproxy_config(self.members, self.ns.name, self.port, self.stats_socket))
            check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
            if check.returncode != 0:
                raise VMError(f"haproxy refused its configuration: {check.stderr.strip()}")
            stack.callback(self._stop_members)         # runs before the taps and the namespace go
            for m in self.members:
                self.start_member(m)
            log = open(self.tmp / "haproxy.log", "wb")
            stack.callback(log.close)
            self.haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, start_new_session=True,
                                            preexec_fn=_die_with_parent)     # no balancer outlives us
            stack.callback(self._stop_haproxy)
            with self.interruptible():
                for m in self.members:
                    ready = m.machine.wait_ready(ready_timeout)
                    self._say(f"{m.server} ready at {m.ip} ({ready['host_seconds']:.1f}s)")
                for m in self.members:
                    self.wait_status(m.server, "UP", 30)
            yield self

    def kill(self) -> None:
        """SIGKILL every QEMU now (from a signal handler: no waiting; the teardown's waits see them gone)."""
        for m in self.members:
            if m.machine is not None:
                m.machine.kill()

    def _stop_haproxy(self) -> None:
        if self.haproxy and self.haproxy.poll() is None:
            self.haproxy.send_signal(signal.SIGUSR1)     # soft stop: finish what is in flight
            try:
                self.haproxy.wait(5)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(5)

    def _stop_members(self) -> None:
        """The ACPI power button to every booted guest at once, then wait; close() quits (QMP) or
        kills the late ones and the ones still booting."""
        running = [m.machine for m in self.members if m.machine and m.machine.proc and m.machine.proc.poll() is None]
        for mach in running:
            mach.poll_console()
        running = [mach for mach in running if any(READY in line for line in mach.lines)]
        for mach in running:
            try:
                mach.qmp("system_powerdown")
            except Exception:
                pass
        deadline = time.monotonic() + 30
        for mach in running:
            mach.wait_exit(max(0.1, deadline - time.monotonic()))
        for m in self.members:
            if m.machine:
                m.machine.close()
