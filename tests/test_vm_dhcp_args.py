"""vm/: how a DHCP image is networked (no boot: the QEMU argv and command line)."""
from pathlib import Path

from vm.image import Image
from vm.qemu import Options, image_uses_dhcp, kernel_cmdline, qemu_argv


def _image(cmdline):
    return Image(Path("/nonexistent"), {"options": {"memory": 256}}, Path("/nonexistent/vmlinuz"),
                 Path("/nonexistent/initrd.img"), cmdline)


def _netdev(argv):
    return argv[argv.index("-netdev") + 1]


def test_user_net_dhcp_image_asks_slirp_which_hands_out_the_forwarded_address(tmp_path):
    img = _image("console=ttyS0 quiet panic=-1 haboob.ip=dhcp")
    opts = Options(net="user", hostport=8080, direct=False)
    assert image_uses_dhcp(img, opts)
    assert kernel_cmdline(img, opts) == "console=ttyS0 quiet panic=-1 haboob.ip=dhcp"
    nd = _netdev(qemu_argv(img, opts, tmp_path / "s", tmp_path / "l", tmp_path / "q"))
    assert "dhcpstart=198.18.0.15" in nd and "hostfwd=tcp:127.0.0.1:8080-198.18.0.15:80" in nd


def test_static_image_keeps_the_static_override_and_the_last_word_counts(tmp_path):
    img = _image("console=ttyS0 haboob.ip=198.18.0.1/24")
    opts = Options(net="user", direct=False)
    assert not image_uses_dhcp(img, opts)
    assert "haboob.ip=198.18.0.15/24" in kernel_cmdline(img, opts)
    assert "dhcpstart=198.18.0.9" in _netdev(qemu_argv(img, opts, tmp_path / "s", tmp_path / "l", tmp_path / "q"))
    opts = Options(net="user", append=["haboob.ip=dhcp"])
    assert image_uses_dhcp(img, opts) and kernel_cmdline(img, opts).endswith("haboob.ip=dhcp")
