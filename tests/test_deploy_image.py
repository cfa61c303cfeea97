"""The real appliance image, deployed: ./build.py's formats booted as
machines boot them (`vm --boot disk|iso`, SeaBIOS and OVMF, no -kernel),
with every emulated NIC model, and the whole site fetched byte-exact.

One build (all formats, every NIC driver) per session; each boot row runs
once. The stand-in tests (test_deploy_boot.py) cover the media alone; this
file checks they carry the real appliance, its NIC drivers and its
console lines.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from haboob_build import drivers, formats
from tests import image_support as sup
from vm import check
from vm.image import Image
from vm.qemu import Options
from vm.session import session

pytestmark = pytest.mark.vm
DRIVER = {"virtio": "virtio_net", "e1000": "e1000", "e1000e": "e1000e"}


@pytest.fixture(scope="module")
def image():
    folder = sup.build("deploy", formats=tuple(formats.FORMATS), nic_drivers=tuple(drivers.DEFAULT))
    return Image.load(folder)


def test_build_writes_every_format_into_the_manifest(image):
    folder, m = image.folder, image.manifest
    assert {"www.iso", "www.img", "www.qcow2", "pxe"} <= {p.name for p in folder.iterdir()}
    for fmt in formats.FORMATS:
        for rel, rec in m["formats"][fmt]["files"].items():
            assert rec == {"size": (folder / rel).stat().st_size, "sha256": formats.sha256_file(folder / rel)}
    # PXE carries exactly the image's kernel and initrd, and the media command line
    assert m["formats"]["pxe"]["files"]["pxe/vmlinuz"]["sha256"] == m["artifacts"]["vmlinuz"]["sha256"]
    assert m["formats"]["pxe"]["files"]["pxe/initrd.img"]["sha256"] == m["artifacts"]["initrd.img"]["sha256"]
    _k, _i, cmdline = formats.parse_ipxe((folder / "pxe/boot.ipxe").read_text())
    assert cmdline == "initrd=initrd.img " + m["formats_cmdline"]
    assert "haboob.ip=198.18.0.1/24" in m["formats_cmdline"]
    assert set(m["formats_tools"]) == {"grub-mkimage", "xorriso", "mtools", "qemu-img"}
    assert m["formats_tools"]["grub-mkimage"].startswith("grub-mkimage (GRUB) 2.")
    subprocess.run(["qemu-img", "check", folder / "www.qcow2"], check=True, capture_output=True)
    # every NIC driver asked for is in the image's module list
    mods = set(m["kernel"]["modules"])
    assert set(drivers.module_roots(drivers.DEFAULT)) <= mods


@pytest.mark.parametrize("boot,firmware,nic,net", [
    ("disk", "bios", "e1000", "user"),
    ("disk", "uefi", "virtio", "tap"),
    ("iso", "bios", "e1000e", "tap"),
    ("iso", "uefi", "e1000", "user"),
    pytest.param("disk", "uefi-secure", "virtio", "user", marks=pytest.mark.skipif(
        not formats.secure_boot_available(), reason="shim-signed / grub-efi-amd64-signed missing")),
])
def test_boot_and_fetch_the_site(image, boot, firmware, nic, net):
    if net == "tap" and os.geteuid() != 0:
        pytest.skip("tap in a namespace needs root")
    with session(image, Options(net=net, boot=boot, firmware=firmware, nic=nic)) as s:
        ready = s.machine.wait_ready(400)
        assert ready["ip"] == "198.18.0.1" and ready["driver"] == DRIVER[nic], ready
        assert ready["urls"] == len(image.urls)
        bad = [r for r in s.call(check.fetch_all, image, s.host, s.port, sup.EXAMPLE) if not r.ok]
        assert not bad, bad
        assert s.machine.powerdown(90), s.machine.tail()


def test_medium_refuses_a_command_line_override(image, tmp_path):
    from vm.image import VMError
    from vm.qemu import qemu_argv
    with pytest.raises(VMError, match=r"--boot disk boots the command line in the medium's grub.cfg"):
        qemu_argv(image, Options(boot="disk", guest_ip="198.18.3.1/24"), tmp_path / "s", tmp_path / "l",
                  tmp_path / "q")
    argv = qemu_argv(image, Options(boot="iso", firmware="uefi", nic="e1000e", hostport=8080),
                     tmp_path / "s", tmp_path / "l", tmp_path / "q")
    assert "-kernel" not in argv and "-m" in argv and int(argv[argv.index("-m") + 1]) >= 512
    assert any(a.startswith("e1000e,netdev=n0") for a in argv)
    assert any("hostfwd=tcp:127.0.0.1:8080-198.18.0.1:80" in a for a in argv)
    assert json.dumps(argv).count("pflash") == 2


def test_init_picks_the_nic_with_a_link(image):
    """Two NICs, the first one (virtio, probed first: eth0) without link:
    init brings both up and serves on the one with carrier (e1000, eth1)."""
    extra = ["-netdev", "user,id=hbdown,net=198.18.99.0/24,restrict=on",
             "-device", "virtio-net-pci,netdev=hbdown,id=hbdownnic,mac=52:54:00:00:99:01,romfile="]
    with session(image, Options(net="user", nic="e1000", extra=extra)) as s:
        s.machine.qmp("set_link", name="hbdownnic", up=False)    # long before PID 1 looks at carrier
        ready = s.machine.wait_ready(400)
        assert (ready["iface"], ready["driver"]) == ("eth1", "e1000"), ready
        bad = [r for r in check.fetch_all(image, s.host, s.port, sup.EXAMPLE) if not r.ok]
        assert not bad, bad
        assert s.machine.powerdown(90), s.machine.tail()
