"""vm/ and IPv6 without a boot: the QEMU argv (slirp's prefix inside 2001:2::/48),
the guest's haboob.ip6= (override, volume, image), `--ip6` checks, and the
guest's IPv6 address read back from console lines. The boots that reach a
guest over IPv6: tests/test_vm_boot.py."""
from pathlib import Path

import click
import pytest

from vm.__main__ import make_options
from vm.image import Image
from vm.qemu import Options, guest_ip6, kernel_cmdline, qemu_argv
from vm.session import global_ip6, neighbour6


def _image(cmdline):
    return Image(Path("/nonexistent"), {"options": {"memory": 256}}, Path("/nonexistent/vmlinuz"),
                 Path("/nonexistent/initrd.img"), cmdline)


def test_user_net_advertises_a_prefix_inside_the_benchmark_range(tmp_path):
    img = _image("console=ttyS0 haboob.ip=dhcp")
    argv = qemu_argv(img, Options(net="user", hostport=8080, direct=False), tmp_path / "s", tmp_path / "l",
                     tmp_path / "q")
    nd = argv[argv.index("-netdev") + 1]
    assert ",ipv6-net=2001:2:0:1::/64,ipv6-host=2001:2:0:1::2" in nd
    assert "hostfwd=tcp:127.0.0.1:8080-" in nd and "[" not in nd          # QEMU 7.2: IPv4 forwards only


def test_guest_ip6_override_volume_then_image():
    img = _image("console=ttyS0 haboob.ip=dhcp haboob.ip6=2001:2:0:1::10/64")
    assert guest_ip6(img, Options()) == "2001:2:0:1::10/64"
    assert guest_ip6(_image("haboob.ip=dhcp"), Options()) == "off"
    assert guest_ip6(img, Options(config_ip6="auto")) == "auto"
    opts = Options(ip6="auto", config_ip6="off")
    assert guest_ip6(img, opts) == "auto"
    assert kernel_cmdline(img, opts).split().count("haboob.ip6=auto") == 1
    assert "haboob.ip6=2001:2:0:1::10/64" not in kernel_cmdline(img, opts)


def test_ip6_option_is_checked_and_needs_a_kernel_boot():
    assert make_options("user", 1, None, None, ip6="2001:2:0:1:0::10/64").ip6 == "2001:2:0:1::10/64"
    assert make_options("user", 1, None, None).ip6 is None
    with pytest.raises(click.BadParameter, match="'ff02::1/64': ff02::1 is a multicast address"):
        make_options("user", 1, None, None, ip6="ff02::1/64")
    with pytest.raises(click.BadParameter, match="--boot disk: the medium's command line is fixed"):
        make_options("user", 1, None, None, boot="disk", ip6="auto")


def test_global_ip6_from_console_lines():
    ready = ('\x1b[0mHABOOB-READY {"ip": "198.18.0.15", "addresses": [{"ip": "198.18.0.15"}, '
             '{"event": "acquired", "ip6": "fe80::1", "how": "link-local"}]}')
    slaac = 'HABOOB-ADDRESS {"event": "acquired", "ip6": "2001:2:0:1::5", "prefix": 64, "how": "slaac"}'
    assert global_ip6([ready]) is None                                   # link-local only
    assert global_ip6([ready, slaac]) == "2001:2:0:1::5"
    assert global_ip6([ready, slaac, slaac.replace("acquired", "lost")]) is None
    dup = 'HABOOB-ADDRESS {"event": "duplicate", "ip6": "2001:2:0:1::10", "prefix": 64, "how": "static"}'
    assert global_ip6([ready, dup, "HABOOB-ADDRESS {broken"]) is None
    assert neighbour6("2001:2:0:1::10/64") == "2001:2:0:1::11/64"
