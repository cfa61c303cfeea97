"""QEMU: the command line, the process, its serial console and QMP.

Theory of operation: `qemu_argv(image, opts)` is a pure function from an
image and a `Options` value to QEMU's argv, so other modules (deploy
formats, NIC passthrough: vm/passthrough.py) extend it by adding fields or
wrapping it. `Machine` is a context manager around one QEMU process:

- the serial console is a unix-socket chardev with `logfile=`: QEMU writes
  everything the guest prints to the log file even when no one is
  connected (so nothing is lost before we attach), and we can still type
  into it (the key 'c' asks PID 1 for its counters);
- QMP is a second unix socket (qemu.qmp's asyncio client, run on the
  Machine's own event loop); connecting and every command have a deadline
  (QMP_TIMEOUT): a QEMU that does not answer by then is taken as hung;
- the clean stop (`stop()`) is `system_powerdown` (the ACPI power button,
  which PID 1 watches) and a wait for the guest to power off; if it does
  not in time, `quit`, then SIGKILL. Every wait has a deadline. Before the
  ready line PID 1 is not watching the button yet (the press is lost), so
  a stop while booting waits only BOOTING_GRACE before `quit`. `kill()`
  SIGKILLs QEMU at once through a pidfd (never another process that got
  its pid after it exited); it is safe to call from a signal handler
  (vm/stop.py: a second signal);
- `-no-reboot` with the guest's `panic=-1` turns a kernel panic into QEMU
  exiting, so every failure ends the process instead of hanging.

The kernel is booted from its extracted ELF through the PVH entry when it
has one (vm/pvh.py: no in-guest decompression, several seconds saved
under TCG); Options.direct=False boots the bzImage as bare metal would.

Waiting reads the log file and watches the process: the ready line, a
HABOOB-FATAL line, QEMU's exit or a timeout each end the wait, the errors
with the console's last lines. KVM is used only when the CPU has vmx/svm
and /dev/kvm opens read-write; otherwise TCG (this never blocks).
Everything a Machine creates (the process, its temp folder) is removed on
exit, also on error.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .image import Image, VMError
from .pvh import direct_kernel

QEMU = "qemu-system-x86_64"
READY = "HABOOB-READY "
FATAL = "HABOOB-FATAL "
COUNTERS = "HABOOB-COUNTERS "
# slirp's private network, inside 198.18.0.0/15 like every address we use.
USER_NET = "198.18.0.0/24"
USER_HOST = "198.18.0.2"
USER_GUEST = "198.18.0.15"
# IPv6 beside it (RFC 5180's 2001:2::/48): slirp's router advertisements (ipv6-net=) and a tap's
# dnsmasq announce this prefix; the host end is ::2 as in slirp
USER_NET6 = "2001:2:0:1::/64"
USER_HOST6 = "2001:2:0:1::2"
DEFAULT_MAC = "52:54:00:12:34:56"
QMP_TIMEOUT = 5.0       # s to connect to QMP and for each command's answer
BOOTING_GRACE = 3.0     # s a stop before the ready line waits for a power-off before QMP quit
QUIT_TIMEOUT = 5.0      # s for QEMU to exit after QMP quit, then SIGKILL


def kvm_usable() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    if " vmx" not in flags and " svm" not in flags:
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise VMError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    return path


@dataclass
class Options:
    net: str = "user"               # "user" or "tap"
    hostport: int = 0               # user: host port forwarded to the guest's port 80 (0: pick one)
    tls_hostport: int = 0           # user: host port forwarded to the guest's port 443 (0: none)
    tap: str | None = None          # tap: the tap device (QEMU must run where it exists)
    smp: int = 1
    memory: int | None = None       # MB; default from the manifest
    capture: Path | None = None     # pcap of the guest NIC (filter-dump)
    mac: str = DEFAULT_MAC
    guest_ip: str | None = None     # haboob.ip= override (CIDR)
    gateway: str | None = None      # haboob.gw= override
    ip6: str | None = None          # haboob.ip6= override: off | auto | ADDR/PREFIX
    append: list[str] = field(default_factory=list)   # more kernel command line words
    extra: list[str] = field(default_factory=list)    # more QEMU arguments
    accel: str | None = None        # None: detect
    direct: bool = True             # boot the extracted ELF kernel via PVH (vm/pvh.py), not the bzImage
    # deploy (vm/media.py, vm/passthrough.py): how the machine boots and what its NIC is
    boot: str = "kernel"            # kernel | disk | iso (disk and iso boot through firmware + GRUB)
    firmware: str = "bios"          # bios (SeaBIOS) | uefi (OVMF)
    nic: str = "virtio"             # virtio | e1000 | e1000e
    netspec: object = None          # passthrough.NetSpec for net = socket | vfio | netmap
    disk: Path | None = None        # boot disk: this file of the image (a cloud format) instead of NAME.img
    disk_bus: str = "ide"           # ide | nvme | virtio (vm/media.py)
    metrics_port: int = 0           # the guest's metrics port (haboob.metrics=; 0: as the image says)
    metrics_hostport: int = 0       # user: host port forwarded to it (0: pick one)
    config: Path | None = None      # a configuration volume's DIR, attached as a disk (vm/media.py)
    config_ip: str | None = None    # the address that volume gives the guest (the tap goes beside it)
    config_ip6: str | None = None   # and its haboob.ip6=, if it sets one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_uses_dhcp(image: Image, opts: Options | None = None) -> bool:
    """The guest takes its address from DHCP: the last haboob.ip= of the image's
    command line and the appended words is `dhcp`."""
    words = image.cmdline.split() + list(opts.append if opts is not None else ())
    ips = [w for w in words if w.startswith("haboob.ip=")]
    return bool(ips) and ips[-1] == "haboob.ip=dhcp"


def kernel_cmdline(image: Image, opts: Options) -> str:
    words = [w for w in image.cmdline.split()]
    over = {}
    # over user networking a DHCP image asks QEMU's DHCP server (which hands it USER_GUEST)
    if (opts.net == "user" and opts.guest_ip is None and opts.config_ip is None
            and not image_uses_dhcp(image, opts)):
        over["haboob.ip"] = f"{USER_GUEST}/24"
        over["haboob.gw"] = USER_HOST
    if opts.guest_ip:
        over["haboob.ip"] = opts.guest_ip
    if opts.gateway:
        over["haboob.gw"] = opts.gateway
    if opts.metrics_port:
        over["haboob.metrics"] = str(opts.metrics_port)
    if opts.ip6:
        over["haboob.ip6"] = opts.ip6
    words = [w for w in words if w.split("=", 1)[0] not in over]
    words += [f"{k}={v}" for k, v in over.items()] + list(opts.append)
    return " ".join(words)


def guest_ip6(image: Image, opts: Options) -> str:
    """The guest's IPv6 mode, off, auto or ADDR/PREFIX: what it boots with (our override,
    else a configuration volume's, else the last haboob.ip6= of its command line)."""
    if opts.ip6 or opts.config_ip6:
        return opts.ip6 or opts.config_ip6
    words = [w.split("=", 1)[1] for w in kernel_cmdline(image, opts).split() if w.startswith("haboob.ip6=")]
    return words[-1] if words else "off"


def medium_args(image: Image, opts: Options, workdir: Path) -> list[str]:
    """-kernel/-initrd/-append, or (--boot disk|iso) firmware + the medium, GRUB's command line."""
    from . import media
    try:
        if opts.config is not None:
            return [*media.config_args(opts.config, workdir),
                    *medium_args(image, replace(opts, config=None), workdir)]
        if opts.boot == "kernel":
            return [*media.firmware_args(opts.firmware, workdir),
                    "-kernel", str(direct_kernel(image.vmlinuz) if opts.direct else image.vmlinuz),
                    "-initrd", str(image.initrd), "-append", kernel_cmdline(image, opts)]
        if opts.guest_ip or opts.gateway or opts.append:
            raise VMError(f"--boot {opts.boot} boots the command line in the medium's grub.cfg; changing "
                          f"the address or the command line needs --boot kernel (or the GRUB menu)")
        return [*media.firmware_args(opts.firmware, workdir),
                *media.boot_args(opts.boot, image.folder, name=image.manifest.get("name"), disk=opts.disk,
                                 bus=opts.disk_bus)]
    except media.MediaError as e:
        raise VMError(str(e)) from None


def user_net_for_medium(image: Image, ip: str | None = None) -> tuple[str, str, str]:
    """(net, host, guest) for slirp when the guest takes the image's own
    address (a disk or ISO boot cannot be given another one), or ip (a
    configuration volume's)."""
    import ipaddress
    ip = ip or next((w.split("=", 1)[1] for w in image.cmdline.split() if w.startswith("haboob.ip=")), None)
    if ip == "dhcp":
        return USER_NET, USER_HOST, USER_GUEST
    if ip is None:
        raise VMError("the image's command line has no haboob.ip=")
    guest = ipaddress.IPv4Interface(ip)
    if guest.network.prefixlen > 29:
        raise VMError(f"--net user with --boot disk|iso: the image's network {guest.network} is too small "
                      f"for QEMU's user network; use --net tap or --boot kernel")
    host = next(h for h in guest.network.hosts() if h != guest.ip)
    return str(guest.network), str(host), str(guest.ip)


def qemu_argv(image: Image, opts: Options, serial_sock: Path, serial_log: Path, qmp_sock: Path) -> list[str]:
    accel = opts.accel or ("kvm" if kvm_usable() else "tcg")
    memory = opts.memory or image.memory
    if opts.firmware.startswith("uefi"):
        memory = max(memory, 512)   # OVMF + GRUB's EFI loader fail to place kernel+initrd in less
    argv = [QEMU, "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(opts.smp), "-m", str(memory),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            *medium_args(image, opts, serial_sock.parent),
            "-chardev", f"socket,id=ser0,path={serial_sock},server=on,wait=off,logfile={serial_log}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{qmp_sock},server=on,wait=off",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-pci,rng=rng0"]
    from . import passthrough as pt
    if opts.nic not in pt.NIC_MODELS:
        raise VMError(f"--nic {opts.nic}: unknown; known: {', '.join(pt.NIC_MODELS)}")
    netdev = "n0"
    if opts.net == "user":
        port = opts.hostport
        # a DHCP guest (no static address given) gets USER_GUEST, the first address QEMU hands out
        dhcp = image_uses_dhcp(image, opts) and opts.guest_ip is None and opts.config_ip is None
        if opts.boot == "kernel" and opts.config_ip is None:
            net, host, guest = USER_NET, USER_HOST, USER_GUEST
        else:
            net, host, guest = user_net_for_medium(image, opts.config_ip)
        argv += ["-netdev", f"user,id=n0,net={net},host={host},"
                            f"hostfwd=tcp:127.0.0.1:{port}-{guest}:80"
                            + (f",hostfwd=tcp:127.0.0.1:{opts.metrics_hostport}-{guest}:{opts.metrics_port}"
                               if opts.metrics_port else "")
                            + (f",hostfwd=tcp:127.0.0.1:{opts.tls_hostport}-{guest}:443" if opts.tls_hostport else "")
                            + (f",dhcpstart={USER_GUEST}" if dhcp else
                               ",dhcpstart=198.18.0.9" if net == USER_NET else "")
                            # slirp's IPv6 (on by default, fec0::/64) inside 2001:2::/48; QEMU 7.2 cannot
                            # forward a host port to it (hostfwd takes IPv4 only): reach it over a tap
                            + f",ipv6-net={USER_NET6},ipv6-host={USER_HOST6}"]
    elif opts.net == "tap":
        if not opts.tap:
            raise VMError("--net tap needs a tap device name")
        vhost = ",vhost=on" if pt.vhost_available() else ""
        argv += ["-netdev", f"tap,id=n0,ifname={opts.tap},script=no,downscript=no{vhost}"]
    elif opts.net in ("socket", "netmap", "vfio") and opts.netspec is not None:
        # preflight happened when the option was parsed (vm/__main__.py); argv only here
        if opts.net == "vfio":
            if opts.capture:
                raise VMError("--capture cannot record a passed-through NIC (QEMU never sees its frames)")
            return argv + pt.vfio_netdev_args(opts.netspec.arg) + list(opts.extra)
        frag = (pt.socket_args(opts.netspec, opts.nic, opts.mac) if opts.net == "socket"
                else pt.netmap_args(opts.netspec.arg, opts.nic, opts.mac))
        argv += frag[:2]
        netdev = pt.NETDEV_ID
    else:
        raise VMError(f"--net {opts.net!r}: use user[:PORT], tap[:IFNAME], socket:..., vfio:ADDR or netmap:PORT")
    # romfile= : no iPXE option ROM; the kernel is loaded directly, and
    # SeaBIOS scanning the ROM only costs boot time (seconds under TCG).
    argv += ["-device", f"{pt.NIC_MODELS[opts.nic]},netdev={netdev},mac={opts.mac},romfile="]
    if opts.capture:
        argv += ["-object", f"filter-dump,id=cap0,netdev={netdev},file={opts.capture}"]
    return argv + list(opts.extra)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if we die (even by SIGKILL), so no
    QEMU outlives the process that started it. PR_SET_PDEATHSIG survives exec."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class BootError(VMError):
    """The guest did not become ready (fatal line, QEMU exit, timeout); carries the console tail."""

    def __init__(self, reason: str, tail: list[str]):
        self.reason, self.tail = reason, tail
        super().__init__(reason + ("\n  console: " + "\n  console: ".join(tail) if tail else ""))


class QMPTimeout(VMError):
    """QEMU did not answer QMP within QMP_TIMEOUT: it is hung, only SIGKILL stops it."""


class Machine:
    def __init__(self, image: Image, opts: Options | None = None, prefix: list[str] | None = None,
                 echo=None):
        """prefix: argv to run QEMU under (e.g. `ip netns exec NS`); echo: callable(line) for the console."""
        self.image, self.opts = image, opts or Options()
        self.prefix = list(prefix or [])
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.ready: dict | None = None
        self._log_pos = 0
        self._partial = b""
        self.lines: list[str] = []
        self.started = 0.0
        self._qmp = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pidfd: int | None = None
        self.qmp_hung = False           # a QMP connect or command went unanswered

    # -- life cycle --
    def start(self) -> "Machine":
        qemu_binary()
        self.tmp = Path(tempfile.mkdtemp(prefix="haboob-vm-"))
        try:                            # a refused option or a failed start leaves no folder behind
            self.serial_sock, self.serial_log = self.tmp / "serial.sock", self.tmp / "serial.log"
            self.qmp_sock = self.tmp / "qmp.sock"
            if self.opts.net == "user" and not self.opts.hostport:
                self.opts.hostport = free_port()
            if self.opts.net == "user" and self.opts.metrics_port and not self.opts.metrics_hostport:
                self.opts.metrics_hostport = free_port()
            argv = self.prefix + qemu_argv(self.image, self.opts, self.serial_sock, self.serial_log, self.qmp_sock)
            self.argv = argv
            self.stderr = open(self.tmp / "qemu.stderr", "wb")
            self.started = time.monotonic()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        except BaseException:
            self.close()
            raise
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)      # still our unreaped child: it is QEMU
        except (AttributeError, OSError):
            self._pidfd = None
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stop QEMU if it still runs (QMP quit, then SIGKILL; no power-off wait) and remove everything."""
        try:
            if self.proc and self.proc.poll() is None:
                self._quit_or_kill()
        finally:
            self._qmp_disconnect()
            if self._loop is not None:
                self._loop.close()
                self._loop = None
            if self._pidfd is not None:
                fd, self._pidfd = self._pidfd, None     # None first: kill() from a handler uses the pid
                os.close(fd)
            if getattr(self, "stderr", None):
                self.stderr.close()
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None

    def kill(self) -> None:
        """SIGKILL QEMU now, by its pidfd (or pid). Async-signal-safe enough for a Python signal handler:
        no locks, no waiting; the waits, which poll the process, see it gone."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                os.kill(self.proc.pid, signal.SIGKILL)
        except OSError:         # gone already (ESRCH)
            pass

    def _quit_or_kill(self) -> None:
        if not self.qmp_hung:
            try:
                self.qmp("quit")
            except Exception:       # QMP gone, hung or QEMU exiting: the wait decides
                pass
            if self.wait_exit(0 if self.qmp_hung else QUIT_TIMEOUT) is not None:
                return
        self.kill()
        self.proc.wait(10)      # SIGKILL: only a process stuck in the kernel survives this long

    def stop(self, timeout: float = 60) -> str:
        """The clean stop, every wait bounded: the ACPI power button (QMP system_powerdown) and up to
        `timeout` s (BOOTING_GRACE before the ready line) for the guest to power off; then QMP quit;
        then SIGKILL. Returns how QEMU ended: "powered off" (by the guest), "quit", "killed" (by us),
        or "exited" (it had exited already, or with an error of its own)."""
        if self.proc.poll() is None:
            self.poll_console()
            booted = any(READY in line for line in self.lines)
            try:
                self.qmp("system_powerdown")
            except Exception:       # hung (QMP_TIMEOUT), or QEMU gone: the next steps decide
                pass
            if not self.qmp_hung:
                self.wait_exit(timeout if booted else min(timeout, BOOTING_GRACE))
            if self.proc.poll() is None:
                self._quit_or_kill()
                self.poll_console()
                return self._ended("quit")
            self.poll_console()
            return self._ended("powered off")
        return "exited"

    def _ended(self, clean: str) -> str:
        rc = self.proc.returncode
        return clean if rc == 0 else "killed" if rc == -signal.SIGKILL else "exited"

    # -- console --
    def poll_console(self) -> list[str]:
        """New complete console lines since the last call (also echoed, and kept in self.lines)."""
        try:
            with open(self.serial_log, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self._log_pos += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        new = [c.decode(errors="replace").rstrip("\r") for c in complete]
        self.lines += new
        if self.echo:
            for line in new:
                self.echo(line)
        return new

    def tail(self, n: int = 15) -> list[str]:
        self.poll_console()
        lines = self.lines + ([self._partial.decode(errors="replace")] if self._partial else [])
        return [l for l in lines if l.strip()][-n:]

    def qemu_stderr(self) -> str:
        try:
            return (self.tmp / "qemu.stderr").read_text(errors="replace").strip()
        except (OSError, TypeError):
            return ""

    def send_console(self, data: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.serial_sock))
            s.sendall(data)
            time.sleep(0.2)          # let QEMU read it before we hang up

    def wait_for(self, prefix: str, timeout: float, fail_on_fatal: bool = True) -> str:
        """The first console line starting with prefix (the rest of it); BootError otherwise."""
        deadline = time.monotonic() + timeout
        scanned = 0
        while True:
            self.poll_console()
            for line in self.lines[scanned:]:
                # the console may put kernel messages or escapes before our text
                i = line.find(prefix)
                if i >= 0:
                    return line[i + len(prefix):]
                if fail_on_fatal and FATAL in line:
                    raise BootError(f"the appliance failed: {line[line.find(FATAL):]}", self.tail())
                if "Kernel panic" in line:
                    raise BootError(f"guest kernel panic: {line.strip()}", self.tail())
            scanned = len(self.lines)
            if self.proc.poll() is not None:
                time.sleep(0.1)
                self.poll_console()
                if any(prefix in l for l in self.lines[scanned:]):
                    continue
                err = self.qemu_stderr().splitlines()
                why = f"QEMU exited with status {self.proc.returncode}" + (f": {err[-1]}" if err else "")
                raise BootError(why + f" before {prefix.strip()}", self.tail())
            if time.monotonic() > deadline:
                raise BootError(f"no {prefix.strip()} within {timeout:.0f}s", self.tail())
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 180) -> dict:
        rest = self.wait_for(READY, timeout)
        try:
            self.ready = json.loads(rest)
        except ValueError:
            raise BootError(f"unreadable ready line: {rest!r}", self.tail()) from None
        self.ready["host_seconds"] = round(time.monotonic() - self.started, 3)
        return self.ready

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # -- QMP --
    def _qmp_run(self, coro, what: str):
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, QMP_TIMEOUT))
        except asyncio.TimeoutError:
            self.qmp_hung = True
            raise QMPTimeout(f"QEMU did not answer QMP {what} within {QMP_TIMEOUT:g}s") from None

    def _qmp_disconnect(self) -> None:
        client, self._qmp = self._qmp, None
        if client is not None:
            try:
                self._loop.run_until_complete(asyncio.wait_for(client.disconnect(), QMP_TIMEOUT))
            except (Exception, asyncio.CancelledError):     # broken or hung: the socket goes with the loop
                pass

    def qmp(self, cmd: str, **args):
        """One QMP command's answer; QMPTimeout if QEMU does not answer within QMP_TIMEOUT."""
        from qemu.qmp import QMPClient
        if self.qmp_hung:
            raise QMPTimeout("QEMU did not answer QMP before: not asking again")
        if self._qmp is None:
            deadline = time.monotonic() + 10
            while not self.qmp_sock.exists():
                if self.proc.poll() is not None:
                    raise VMError("QMP socket did not appear (QEMU exited)")
                if time.monotonic() > deadline:
                    self.qmp_hung = True    # QEMU runs but never opened QMP: no use waiting again
                    raise QMPTimeout("QMP socket did not appear within 10s")
                time.sleep(0.05)
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            self._qmp = QMPClient()
            try:
                self._qmp_run(self._qmp.connect(str(self.qmp_sock)), "connect")
            except BaseException:
                self._qmp_disconnect()
                raise
        return self._qmp_run(self._qmp.execute(cmd, args or None), cmd)

    def powerdown(self, timeout: float = 60) -> bool:
        """The ACPI power button via QMP; True if the guest powered itself off within timeout."""
        if self.proc.poll() is not None:
            return False
        self.qmp("system_powerdown")
        code = self.wait_exit(timeout)
        self.poll_console()
        return code == 0
