"""`vm boot --net` modes (vm.passthrough): parsing, every preflight failure
message (against a fake sysfs), and the argv of each mode checked against
QEMU's own parsing: QEMU is started paused (-S) with the argv and told to
quit on its monitor; it either accepts (exit 0) or refuses with its own
error, and the test checks which, and that our preflight agrees.
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from vm import netns, passthrough as pt
from vm.passthrough import Host, NetError

ADDR = "0000:03:00.0"
QEMU = "qemu-system-x86_64"


# ---------------------------------------------------------------- parsing

def test_parse_modes():
    assert pt.parse_net("user").mode == "user"
    assert pt.parse_net("tap") == pt.NetSpec("tap", "")
    assert pt.parse_net("tap:hbtap0") == pt.NetSpec("tap", "hbtap0")
    assert pt.parse_net("vfio:3:00.0").arg == ADDR
    assert pt.parse_net("vfio:0000:03:00.0").arg == ADDR
    assert pt.parse_net("netmap:vale0:1") == pt.NetSpec("netmap", "vale0:1")
    s = pt.parse_net("socket:listen=127.0.0.1:5555")
    assert (s.mode, s.arg, s.opts) == ("socket", "listen", {"host": "127.0.0.1", "port": 5555})
    assert pt.parse_net("socket:connect=:5555").opts["host"] == "127.0.0.1"
    assert pt.parse_net("socket:udp=127.0.0.1:1,127.0.0.1:2").opts == {"local": ("127.0.0.1", 1),
                                                                       "remote": ("127.0.0.1", 2)}


@pytest.mark.parametrize("text,msg", [
    ("wifi", r"unknown mode 'wifi'; known: user, tap"),
    ("vfio:03:00", r"not a PCI address; give DOMAIN:BUS:SLOT.FUNCTION"),
    ("vfio:", r"not a PCI address"),
    ("netmap:", r"give a netmap port, e.g. netmap:vale0:1"),
    ("tap:this-name-is-too-long", r"not an interface name"),
    ("socket:listen=127.0.0.1", r"expected HOST:PORT"),
    ("socket:listen=127.0.0.1:70000", r"expected HOST:PORT \(port 1-65535\)"),
    ("socket:mcast=198.18.0.1:5000", r"not an IPv4 multicast group"),
    ("socket:udp=127.0.0.1:1", r"expected LOCAL_HOST:PORT,REMOTE_HOST:PORT"),
    ("socket:bridge=x", r"expected listen=HOST:PORT"),
    ("user:x", r"takes no argument"),
])
def test_parse_errors(text, msg):
    with pytest.raises(NetError, match=msg):
        pt.parse_net(text)


def test_nic_models():
    assert pt.nic_device("virtio", "n0", "52:54:00:12:34:56") == ["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"]
    assert pt.nic_device("e1000e", "n0") == ["-device", "e1000e,netdev=n0"]
    with pytest.raises(NetError, match="unknown NIC model; known: virtio, e1000, e1000e"):
        pt.nic_device("rtl8139")


# ---------------------------------------------------------------- vfio preflight on a fake sysfs

def fake_host(tmp: Path, *, iommu=True, in_group=True, driver="vfio-pci", cls="0x020000", group=7,
              others=None, vfio_node=True, euid=0) -> Host:
    sysfs, dev = tmp / "sys", tmp / "dev"
    pci = sysfs / "bus/pci/devices"
    groups = sysfs / "kernel/iommu_groups"
    groups.mkdir(parents=True)
    members = {ADDR: driver, **(others or {})}
    for addr, drv in members.items():
        d = pci / addr
        d.mkdir(parents=True)
        (d / "class").write_text(cls + "\n" if addr == ADDR else "0x060400\n")
        if drv:
            (sysfs / "bus/pci/drivers" / drv).mkdir(parents=True, exist_ok=True)
            (d / "driver").symlink_to(f"../../drivers/{drv}")
        if iommu and in_group:
            g = groups / str(group) / "devices"
            g.mkdir(parents=True, exist_ok=True)
            (g / addr).symlink_to(d)
            (d / "iommu_group").symlink_to(groups / str(group))
    if iommu and not in_group:
        (groups / "0/devices").mkdir(parents=True)      # the IOMMU is on, other devices have groups
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio/vfio").write_text("")
    if vfio_node:
        (dev / "vfio" / str(group)).write_text("")
    return Host(sys=sysfs, dev=dev, euid=euid)


def test_vfio_ok(tmp_path):
    host = fake_host(tmp_path, others={"0000:00:01.0": "pcieport", "0000:03:00.1": None})
    assert pt.preflight_vfio("03:00.0", host) == 7
    assert pt.net_args(pt.parse_net("vfio:03:00.0"), host=host) == ["-device", f"vfio-pci,host={ADDR},id=hbvfio0"]


@pytest.mark.parametrize("kw,addr,msg", [
    ({}, "0000:04:00.0", r"there is no PCI device 0000:04:00.0 on this host\. List the network devices with "
                         r"`lspci -D -nn"),
    ({"cls": "0x010802"}, ADDR, r"is not a network controller \(PCI class 0x010802"),
    ({"iommu": False}, ADDR, r"the IOMMU is off .*`intel_iommu=on iommu=pt`"),
    ({"in_group": False}, ADDR, r"has no IOMMU group although the IOMMU is on"),
    ({"driver": "ixgbe"}, ADDR, r"is bound to ixgbe, not vfio-pci\. Hand it to vfio-pci.*\n"
                                r"  modprobe vfio-pci\n  echo 0000:03:00.0 > /sys/bus/pci/devices/0000:03:00.0/"
                                r"driver/unbind.*\n  echo vfio-pci > /sys/bus/pci/devices/0000:03:00.0/"
                                r"driver_override\n  echo 0000:03:00.0 > /sys/bus/pci/drivers_probe"),
    ({"driver": None}, ADDR, r"is bound to no driver, not vfio-pci"),
    ({"others": {"0000:03:00.1": "ixgbe"}}, ADDR, r"IOMMU group 7 also holds 0000:03:00.1 \(bound to ixgbe\); "
                                                  r"every device in a group must be bound to vfio-pci"),
    ({"vfio_node": False}, ADDR, r"/dev/vfio/7 does not exist although 0000:03:00.0 is bound to vfio-pci"),
])
def test_vfio_preflight_failures(tmp_path, kw, addr, msg):
    host = fake_host(tmp_path, **kw)
    with pytest.raises(NetError, match=msg):
        pt.preflight_vfio(addr, host)
    with pytest.raises(NetError, match=msg):          # the same check guards the argv
        pt.net_args(pt.parse_net("vfio:" + addr), host=host)


def test_vfio_memlock_for_users(tmp_path, monkeypatch):
    host = fake_host(tmp_path, euid=1000)
    monkeypatch.setattr(resource, "getrlimit", lambda what: (64 << 10, 64 << 10))
    with pytest.raises(NetError, match=r"may lock only 0 MiB \(need 576\); raise it \(`ulimit -l 589824`"):
        pt.preflight_vfio(ADDR, host, memory_mb=512)
    assert pt.preflight_vfio(ADDR, fake_host(tmp_path / "root"), memory_mb=512) == 7   # root: no limit


# ---------------------------------------------------------------- tap and netmap preflight

def test_tap_preflight(tmp_path):
    host = Host(sys=tmp_path / "sys", dev=tmp_path / "dev", euid=1000)
    (tmp_path / "sys/class/net").mkdir(parents=True)
    with pytest.raises(NetError, match=r"/net/tun does not exist; load the tun module"):
        pt.net_args(pt.parse_net("tap"), host=host)
    (tmp_path / "dev/net").mkdir(parents=True)
    (tmp_path / "dev/net/tun").write_text("")
    with pytest.raises(NetError, match=r"without root, name a tap your user owns"):
        pt.net_args(pt.parse_net("tap"), host=host)
    with pytest.raises(NetError, match=r"no interface hbt1; create it for your user first: `sudo ip tuntap add "
                                       r"dev hbt1 mode tap user \$USER"):
        pt.net_args(pt.parse_net("tap:hbt1"), host=host)
    (tmp_path / "sys/class/net/hbt1").mkdir()
    assert pt.net_args(pt.parse_net("tap:hbt1"), "e1000", host=host) == [
        "-netdev", "tap,id=hbnet0,script=no,downscript=no,ifname=hbt1", "-device", "e1000,netdev=hbnet0"]
    (tmp_path / "dev/vhost-net").write_text("")
    assert "vhost=on" in pt.net_args(pt.parse_net("tap:hbt1"), host=host)[1]


def test_netmap_preflight_message():
    with pytest.raises(NetError, match=r"this QEMU \(qemu-x\) has no netmap backend: `qemu-x -netdev help` lists "
                                       r"only socket, tap.*--enable-netmap"):
        pt.preflight_netmap("vale0:1", "qemu-x", backends=["socket", "tap"])
    pt.preflight_netmap("vale0:1", "qemu-x", backends=["socket", "netmap"])
    assert pt.netmap_args("vale0:1", "virtio") == ["-netdev", "netmap,id=hbnet0,ifname=vale0:1",
                                                   "-device", "virtio-net-pci,netdev=hbnet0"]


# ---------------------------------------------------------------- QEMU's own parsing

def qemu_try(argv: list[str], ns: netns.Namespace | None = None, timeout: float = 60) -> tuple[int, str]:
    """Start QEMU paused with argv, quit at once; (exit status, stderr)."""
    full = [QEMU, "-M", "q35", "-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-m", "64",
            "-monitor", "stdio", *argv]
    if ns is not None:
        full = ns.argv(full)
    proc = subprocess.run(full, input="quit\n", capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("model", sorted(pt.NIC_MODELS))
def test_qemu_accepts_each_nic_model(model):
    rc, err = qemu_try(pt.net_args(pt.parse_net("user"), model, "52:54:00:12:34:56",
                                   user_opts="net=198.18.44.0/24"))
    assert rc == 0, err


def test_qemu_rejects_a_wrong_argv():
    """The harness itself: a misspelt property is refused (so acceptance above means something)."""
    rc, err = qemu_try(["-netdev", "user,id=hbnet0", "-device", "virtio-net-pci,netdevv=hbnet0"])
    assert rc != 0 and "netdevv" in err


def test_qemu_vfio_argv_reaches_the_host_device_lookup():
    """QEMU parses our vfio-pci argv and gets as far as opening the host
    device, which does not exist here: its error is about the device, not
    about the syntax. (A real passthrough needs a host with an IOMMU.)"""
    rc, err = qemu_try(pt.vfio_netdev_args("0000:7f:1f.7"))
    assert rc != 0
    assert "0000:7f:1f.7" in err and ("no such host device" in err or "No such file" in err), err
    assert "not a valid device model" not in err and "not found" not in err.split("0000:7f:1f.7")[0]


def test_qemu_netmap_agrees_with_preflight():
    backends = pt.qemu_netdev_backends(QEMU)
    assert "user" in backends and "tap" in backends and "socket" in backends
    rc, err = qemu_try(pt.netmap_args("vale0:1", "virtio"))
    if "netmap" in backends:
        pt.preflight_netmap("vale0:1", QEMU)
        assert "netmap" not in err or rc == 0 or "vale" in err   # backend exists: any refusal is about the port
    else:
        with pytest.raises(NetError, match="has no netmap backend"):
            pt.preflight_netmap("vale0:1", QEMU)
        with pytest.raises(NetError, match="has no netmap backend"):
            pt.net_args(pt.parse_net("netmap:vale0:1"), qemu=QEMU)
        assert rc != 0 and "netmap" in err, err


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip(8)")


@pytest.mark.netns
@needs_root
def test_qemu_tap_argv_in_a_namespace():
    with netns.namespace("q") as ns, netns.tap(ns, "198.18.45.2/24") as tap:
        host = Host()
        rc, err = qemu_try(pt.tap_args(tap, "virtio", vhost=pt.vhost_available(host)), ns)
        assert rc == 0, err
        # vhost=on is accepted exactly when the host has vhost-net, which is what we detect
        rc, err = qemu_try(pt.tap_args(tap, "virtio", vhost=True), ns)
        if pt.vhost_available(host):
            assert rc == 0, err
        else:
            assert rc != 0 and "vhost" in err, err
        rc, err = qemu_try(pt.tap_args(tap + "x", "e1000"), ns)
        assert rc == 0, err          # as root QEMU creates a missing tap (inside this namespace)


def paused_qemu(argv: list[str], ns: netns.Namespace) -> subprocess.Popen:
    return subprocess.Popen(ns.argv([QEMU, "-M", "q35", "-accel", "tcg", "-S", "-nodefaults", "-display", "none",
                                     "-m", "64", "-monitor", "stdio", *argv]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ss(ns: netns.Namespace, args: list[str], needle: str, procs) -> None:
    for _ in range(200):
        if needle in ns.run(["ss", "-n", *args], check=False).stdout:
            return
        for p in procs:
            assert p.poll() is None, p.stderr.read()
        subprocess.run(["sleep", "0.1"])
    raise AssertionError(f"no {needle} in ss {args}")


@pytest.mark.netns
@needs_root
def test_qemu_socket_argvs_in_a_namespace():
    """listen / connect / mcast / udp, with host sockets inside a private
    namespace: a paused QEMU listens, a second one connects to it (the TCP
    connection is seen established), mcast and udp are accepted."""
    with netns.namespace("q") as ns:
        port = 5000 + os.getpid() % 1000
        listen = pt.net_args(pt.parse_net(f"socket:listen=127.0.0.1:{port}"), "virtio")
        connect = pt.net_args(pt.parse_net(f"socket:connect=127.0.0.1:{port}"), "e1000")
        procs = []
        try:
            procs.append(paused_qemu(listen, ns))
            wait_ss(ns, ["-lt"], f"127.0.0.1:{port}", procs)
            procs.append(paused_qemu(connect, ns))
            wait_ss(ns, ["-t", "state", "established"], f"127.0.0.1:{port}", procs)
        finally:
            for p in procs:
                p.communicate("quit\n", timeout=30)
        assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    # multicast needs an interface with a route: a veth pair, both ends in the namespace
    with netns.namespace("q") as ns, netns.veth(ns, ns, "198.18.46.1/24", None) as (a, _b):
        netns.ip("route", "add", "224.0.0.0/4", "dev", a, ns=ns.name)
        rc, err = qemu_try(pt.net_args(pt.parse_net(f"socket:mcast=230.0.0.1:{port}"), "e1000e"), ns)
        assert rc == 0, err
        rc, err = qemu_try(pt.net_args(pt.parse_net(f"socket:udp=127.0.0.1:{port},127.0.0.1:{port + 1}"),
                                       "virtio"), ns)
        assert rc == 0, err
        rc, err = qemu_try(pt.net_args(pt.parse_net(f"socket:udp=198.18.47.1:{port},127.0.0.1:{port + 1}"),
                                       "virtio"), ns)
        assert rc != 0 and "198.18.47.1" in err, err     # no such local address in this namespace: refused


# ---------------------------------------------------------------- vm CLI: refused before QEMU starts

def _fake_image(tmp: Path) -> Path:
    import hashlib
    import json
    img = tmp / "www"
    img.mkdir()
    arts = {}
    for name, data in (("vmlinuz", b"not a kernel"), ("initrd.img", b"not an initrd"),
                       ("cmdline", b"console=ttyS0 haboob.ip=198.18.0.1/24\n")):
        (img / name).write_bytes(data)
        arts[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (img / "manifest.json").write_text(json.dumps({"name": "www", "artifacts": arts, "urls": {}}))
    return img


@pytest.mark.parametrize("args,msg,rc", [
    (["--net", "vfio:0000:7f:1f.7"], "there is no PCI device 0000:7f:1f.7 on this host", 1),
    (["--net", "netmap:vale0:1"], "has no netmap backend", 1),
    (["--net", "socket:listen=127.0.0.1"], "expected HOST:PORT", 1),
    (["--boot", "disk"], "--boot disk: ", 2),
    (["--boot", "iso"], "--boot iso: ", 2),
    (["--nic", "rtl8139"], "Invalid value for '--nic'", 2),
])
def test_vm_cli_refuses_before_starting(tmp_path, args, msg, rc):
    import sys
    img = _fake_image(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "vm", "boot", str(img), *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert proc.returncode == rc and msg in proc.stderr, (proc.returncode, proc.stderr)
    assert "booting" not in proc.stderr or rc == 2     # refused at parse time, or before QEMU's Popen


def test_ovmf_missing_is_named():
    from vm import media
    with pytest.raises(media.MediaError, match=r"OVMF is not installed .*`apt-get install ovmf`"):
        media.firmware_args("uefi", Path("/tmp"), pairs=[(Path("/nonexistent/CODE.fd"), Path("/nonexistent/VARS.fd"))])
    assert media.firmware_args("bios", Path("/tmp")) == []
