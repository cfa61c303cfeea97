"""How the guest's NIC reaches a network: the `vm boot --net` modes.

Theory of operation: `parse_net` turns the option into a `NetSpec`;
`net_args` runs the mode's preflight checks and returns the QEMU argv
fragment (a -netdev backend plus the emulated NIC, or a -device for a
passed-through one). Every check that fails raises `NetError` whose message
says what is wrong and the exact host commands that fix it, before QEMU is
started. The checks read sysfs and /dev through `Host`, whose roots tests
point at a fake tree.

Modes:
- user (default of vm boot): QEMU's user-mode network (slirp).
- tap[:IFNAME]: a host tap device (root, or a persistent tap owned by the
  user), with vhost-net (in-kernel virtio data path) when /dev/vhost-net
  can be opened, which makes the guest's virtio-net much faster.
- socket:listen=H:P | socket:connect=H:P | socket:mcast=G:P |
  socket:udp=LOCAL_H:P,REMOTE_H:P: Ethernet frames carried over a host
  socket, for joining two appliances (or an appliance and a test guest)
  with no root and no host interface at all.
- vfio:PCI_ADDRESS: a real host NIC given to the guest with VFIO (the guest
  then loads the NIC's own driver, see haboob_build.drivers). Needs the
  IOMMU on, the device and every other device in its IOMMU group bound to
  vfio-pci, and access to /dev/vfio/GROUP (Documentation/driver-api/vfio.rst).
- netmap:PORT: QEMU's netmap backend (a VALE switch port `vale0:1`, or a NIC
  in netmap mode), only if this QEMU was built with it (`-netdev help`).
"""
from __future__ import annotations

import os
import re
import resource
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e"}
MODES = ("user", "tap", "socket", "vfio", "netmap")
NETDEV_ID = "hbnet0"

_PCI_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{1,2}):([0-1]?[0-9a-fA-F])\.([0-7])$")
_HOSTPORT_RE = re.compile(r"^([0-9A-Za-z.\-]*|\[[0-9a-fA-F:]+\]):(\d{1,5})$")


class NetError(Exception):
    """A --net mode cannot be used as asked; the message says what to do."""


@dataclass
class NetSpec:
    mode: str                                  # one of MODES
    arg: str = ""                              # mode-specific, normalized
    opts: dict = field(default_factory=dict)   # parsed options (socket)


@dataclass
class Host:
    """Where the host's state is read; tests point these at a fake tree."""
    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    euid: int = field(default_factory=os.geteuid)


# ---------------------------------------------------------------- parsing

def normalize_pci(addr: str) -> str:
    """'3:00.0' / '03:00.0' / '0000:03:00.0' -> '0000:03:00.0' (domain:bus:slot.function)."""
    m = _PCI_RE.match(addr.strip())
    if not m:
        raise NetError(f"--net vfio:{addr}: not a PCI address; give DOMAIN:BUS:SLOT.FUNCTION as "
                       f"`lspci -D` prints it, e.g. vfio:0000:03:00.0")
    dom, bus, slot, fn = m.groups()
    return f"{(dom or '0000').lower()}:{int(bus, 16):02x}:{int(slot, 16):02x}.{fn}"


def _hostport(text: str, what: str) -> tuple[str, int]:
    m = _HOSTPORT_RE.match(text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise NetError(f"--net {what}: expected HOST:PORT (port 1-65535), got {text!r}")
    return m.group(1), int(m.group(2))


def parse_net(text: str) -> NetSpec:
    """The --net option: user | tap[:IFNAME] | socket:... | vfio:ADDR | netmap:PORT."""
    mode, _, arg = (text or "user").partition(":")
    mode = mode.strip().lower()
    if mode not in MODES:
        raise NetError(f"--net {text}: unknown mode {mode!r}; known: user, tap[:IFNAME], "
                       f"socket:listen=HOST:PORT|connect=HOST:PORT|mcast=GROUP:PORT|udp=HOST:PORT,HOST:PORT, "
                       f"vfio:PCI_ADDRESS, netmap:PORT")
    if mode == "user":
        if arg:
            raise NetError(f"--net {text}: 'user' takes no argument")
        return NetSpec("user")
    if mode == "tap":
        if arg and (len(arg) > 15 or not re.match(r"^[A-Za-z0-9_.\-]+$", arg)):
            raise NetError(f"--net tap:{arg}: not an interface name (at most 15 letters, digits, '_.-')")
        return NetSpec("tap", arg)
    if mode == "vfio":
        return NetSpec("vfio", normalize_pci(arg))
    if mode == "netmap":
        if not arg or not re.match(r"^[A-Za-z0-9_.:{}\-]+$", arg):
            raise NetError(f"--net netmap:{arg}: give a netmap port, e.g. netmap:vale0:1 (a VALE switch "
                           f"port) or netmap:eth1 (a NIC in netmap mode)")
        return NetSpec("netmap", arg)
    # socket
    kind, _, rest = arg.partition("=")
    if kind in ("listen", "connect", "mcast"):
        host, port = _hostport(rest, f"socket:{kind}")
        if kind == "mcast" and not _is_multicast(host):
            raise NetError(f"--net socket:mcast={rest}: {host} is not an IPv4 multicast group (224.0.0.0/4)")
        return NetSpec("socket", kind, {"host": host or "127.0.0.1", "port": port})
    if kind == "udp":
        parts = rest.split(",")
        if len(parts) != 2:
            raise NetError(f"--net socket:udp={rest}: expected LOCAL_HOST:PORT,REMOTE_HOST:PORT")
        (lh, lp), (rh, rp) = (_hostport(p, "socket:udp") for p in parts)
        return NetSpec("socket", "udp", {"local": (lh or "127.0.0.1", lp), "remote": (rh or "127.0.0.1", rp)})
    raise NetError(f"--net socket:{arg}: expected listen=HOST:PORT, connect=HOST:PORT, mcast=GROUP:PORT "
                   f"or udp=LOCAL_HOST:PORT,REMOTE_HOST:PORT")


def _is_multicast(host: str) -> bool:
    try:
        first = int(host.split(".")[0])
    except ValueError:
        return False
    return 224 <= first <= 239 and len(host.split(".")) == 4


# ---------------------------------------------------------------- the NIC

def nic_device(model: str, netdev: str = NETDEV_ID, mac: str | None = None) -> list[str]:
    """-device for the emulated NIC: virtio | e1000 | e1000e."""
    if model not in NIC_MODELS:
        raise NetError(f"--nic {model}: unknown NIC model; known: {', '.join(NIC_MODELS)}")
    dev = f"{NIC_MODELS[model]},netdev={netdev}"
    if mac:
        dev += f",mac={mac}"
    return ["-device", dev]


# ---------------------------------------------------------------- vfio

_UNBIND_HELP = ("modprobe vfio-pci\n"
                "  echo {addr} > /sys/bus/pci/devices/{addr}/driver/unbind    # if bound to another driver\n"
                "  echo vfio-pci > /sys/bus/pci/devices/{addr}/driver_override\n"
                "  echo {addr} > /sys/bus/pci/drivers_probe")


def _driver(host: Host, addr: str) -> str | None:
    link = host.sys / "bus/pci/devices" / addr / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def preflight_vfio(addr: str, host: Host = Host(), memory_mb: int = 0) -> int:
    """Check a host PCI NIC can be passed through; return its IOMMU group."""
    addr = normalize_pci(addr)
    dev = host.sys / "bus/pci/devices" / addr
    if not dev.exists():
        raise NetError(f"--net vfio:{addr}: there is no PCI device {addr} on this host. "
                       f"List the network devices with `lspci -D -nn | grep -i -e ethernet -e network`")
    try:
        cls = int((dev / "class").read_text().strip(), 16)
    except (OSError, ValueError):
        cls = None
    if cls is not None and cls >> 16 != 0x02:
        raise NetError(f"--net vfio:{addr}: device {addr} is not a network controller "
                       f"(PCI class {cls:#08x}, a NIC is 0x02xxxx); check the address with `lspci -D -s {addr}`")
    groups = host.sys / "kernel/iommu_groups"
    if not groups.is_dir() or not any(groups.iterdir()):
        raise NetError(f"--net vfio:{addr}: the IOMMU is off (no groups in {groups}). Enable VT-d (Intel) or "
                       f"AMD-Vi in the firmware set-up, boot the host with `intel_iommu=on iommu=pt` "
                       f"(AMD: `amd_iommu=on iommu=pt`) on the kernel command line, and reboot")
    glink = dev / "iommu_group"
    if not glink.is_symlink():
        raise NetError(f"--net vfio:{addr}: device {addr} has no IOMMU group although the IOMMU is on; "
                       f"it cannot be passed through (try another slot, or check `dmesg | grep -i -e DMAR -e IOMMU`)")
    group = int(os.path.basename(os.readlink(glink)))
    drv = _driver(host, addr)
    if drv != "vfio-pci":
        now = f"bound to {drv}" if drv else "bound to no driver"
        raise NetError(f"--net vfio:{addr}: device {addr} is {now}, not vfio-pci. Hand it to vfio-pci "
                       f"(as root; the host loses the NIC until you undo it):\n  "
                       + _UNBIND_HELP.format(addr=addr))
    others = []
    gdir = groups / str(group) / "devices"
    if gdir.is_dir():
        for member in sorted(p.name for p in gdir.iterdir()):
            if member == addr:
                continue
            mdrv = _driver(host, member)
            if mdrv not in (None, "vfio-pci", "pcieport"):
                others.append(f"{member} (bound to {mdrv})")
    if others:
        raise NetError(f"--net vfio:{addr}: IOMMU group {group} also holds {', '.join(others)}; every device "
                       f"in a group must be bound to vfio-pci (or to no driver) before any of them can be "
                       f"passed through. Bind them too, for each ADDR:\n  " + _UNBIND_HELP.format(addr="ADDR")
                       + "\n  or put the NIC in a slot with its own IOMMU group")
    node = host.dev / "vfio" / str(group)
    if not node.exists():
        raise NetError(f"--net vfio:{addr}: {node} does not exist although {addr} is bound to vfio-pci; "
                       f"load the module (`modprobe vfio-pci`) and check that udev created {node}")
    if not os.access(node, os.R_OK | os.W_OK) or not os.access(host.dev / "vfio/vfio", os.R_OK | os.W_OK):
        raise NetError(f"--net vfio:{addr}: no read/write access to {node} and {host.dev / 'vfio/vfio'}; run "
                       f"as root, or `chown $USER {node}` for this user")
    if host.euid != 0 and memory_mb:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        need = (memory_mb + 64) << 20
        if soft != resource.RLIM_INFINITY and soft < need:
            raise NetError(f"--net vfio:{addr}: VFIO pins all guest memory, but this user may lock only "
                           f"{soft >> 20} MiB (need {need >> 20}); raise it (`ulimit -l {need >> 10}`, or "
                           f"memlock in /etc/security/limits.conf) or run as root")
    return group


def vfio_netdev_args(addr: str) -> list[str]:
    """The passed-through NIC: QEMU's vfio-pci device (no -netdev: the guest drives the hardware)."""
    return ["-device", f"vfio-pci,host={normalize_pci(addr)},id=hbvfio0"]


# ---------------------------------------------------------------- netmap

def qemu_netdev_backends(qemu: str = "qemu-system-x86_64") -> list[str]:
    """The -netdev backend types this QEMU binary was built with."""
    try:
        proc = subprocess.run([qemu, "-netdev", "help"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetError(f"{qemu}: not installed (Debian package qemu-system-x86)") from None
    lines = proc.stdout.splitlines()
    return [w.strip() for w in lines if w.strip() and not w.strip().endswith(":")]


def preflight_netmap(port: str, qemu: str = "qemu-system-x86_64", backends: list[str] | None = None) -> None:
    backends = qemu_netdev_backends(qemu) if backends is None else backends
    if "netmap" not in backends:
        raise NetError(f"--net netmap:{port}: this QEMU ({qemu}) has no netmap backend: `{qemu} -netdev help` "
                       f"lists only {', '.join(backends)}. Debian's QEMU is built without netmap; build QEMU "
                       f"from source with `./configure --enable-netmap` on a host with the netmap kernel module "
                       f"and headers, or use --net tap (vhost-net) or --net vfio:ADDR instead")


def netmap_args(port: str, model: str, mac: str | None = None) -> list[str]:
    return ["-netdev", f"netmap,id={NETDEV_ID},ifname={port}", *nic_device(model, NETDEV_ID, mac)]


# ---------------------------------------------------------------- tap

def vhost_available(host: Host = Host()) -> bool:
    node = host.dev / "vhost-net"
    return node.exists() and os.access(node, os.R_OK | os.W_OK)


def preflight_tap(ifname: str, host: Host = Host()) -> None:
    tun = host.dev / "net/tun"
    if not tun.exists():
        raise NetError(f"--net tap: {tun} does not exist; load the tun module (`modprobe tun`)")
    if ifname:
        if not (host.sys / "class/net" / ifname).exists() and host.euid != 0:
            raise NetError(f"--net tap:{ifname}: no interface {ifname}; create it for your user first: "
                           f"`sudo ip tuntap add dev {ifname} mode tap user $USER && sudo ip link set {ifname} up`")
    elif host.euid != 0:
        raise NetError("--net tap: without root, name a tap your user owns (--net tap:IFNAME), made with "
                       "`sudo ip tuntap add dev IFNAME mode tap user $USER`")


def tap_args(ifname: str, model: str, mac: str | None = None, vhost: bool = False) -> list[str]:
    """A host tap; QEMU creates it when ifname is empty and we are root.
    script=no: we configure the host side ourselves (no /etc/qemu-ifup)."""
    nd = f"tap,id={NETDEV_ID},script=no,downscript=no"
    if ifname:
        nd += f",ifname={ifname}"
    if vhost:
        nd += ",vhost=on"
    return ["-netdev", nd, *nic_device(model, NETDEV_ID, mac)]


# ---------------------------------------------------------------- socket

def socket_args(spec: NetSpec, model: str, mac: str | None = None) -> list[str]:
    """Frames over a host socket (QEMU -netdev socket/dgram). listen/connect
    carry frames over one TCP connection (length-prefixed); mcast joins any
    number of guests on one multicast group; udp links exactly two."""
    o = spec.opts
    if spec.arg in ("listen", "connect", "mcast"):
        nd = f"socket,id={NETDEV_ID},{spec.arg}={o['host']}:{o['port']}"
    elif spec.arg == "udp":
        (lh, lp), (rh, rp) = o["local"], o["remote"]
        nd = (f"dgram,id={NETDEV_ID},local.type=inet,local.host={lh},local.port={lp},"
              f"remote.type=inet,remote.host={rh},remote.port={rp}")
    else:
        raise NetError(f"--net socket:{spec.arg}: unknown socket kind")
    return ["-netdev", nd, *nic_device(model, NETDEV_ID, mac)]


# ---------------------------------------------------------------- all modes

def net_args(spec: NetSpec, model: str = "virtio", mac: str | None = None, *, host: Host = Host(),
             qemu: str = "qemu-system-x86_64", memory_mb: int = 0, user_opts: str = "") -> list[str]:
    """Preflight + argv for one --net mode. `user_opts` is appended to the
    user-mode netdev (e.g. hostfwd=..., net=...)."""
    if spec.mode == "user":
        return ["-netdev", f"user,id={NETDEV_ID}" + (f",{user_opts}" if user_opts else ""),
                *nic_device(model, NETDEV_ID, mac)]
    if spec.mode == "tap":
        preflight_tap(spec.arg, host)
        return tap_args(spec.arg, model, mac, vhost=vhost_available(host))
    if spec.mode == "socket":
        return socket_args(spec, model, mac)
    if spec.mode == "vfio":
        preflight_vfio(spec.arg, host, memory_mb)
        return vfio_netdev_args(spec.arg)
    if spec.mode == "netmap":
        preflight_netmap(spec.arg, qemu)
        return netmap_args(spec.arg, model, mac)
    raise NetError(f"--net: unknown mode {spec.mode!r}")
