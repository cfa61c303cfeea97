"""Boot the example image with a configuration volume and reach it at the
address the volume gives, not the built-in one (198.18.0.1/24): a HABOOB
FAT volume written by `vm boot --config`'s writer, and a NoCloud `cidata`
ISO 9660 volume made here with xorriso (network-config v2), behind an
empty HABOOB volume like the disk image's EFI partition. Two boots,
each on a tap in a fresh namespace whose host address is next to the
volume's address (vm/session.py), so only the new address is on-link. The
HABOOB volume also gives a static IPv6 address and gateway (haboob.ip6=,
haboob.gw6=): the guest passes DAD, resolves the gateway and serves every
URL over IPv6 there, with no router advertisement on the link."""
import os
import subprocess

import pytest

from tests import image_support as sup
from vm import check
from vm.image import Image
from vm.media import config_volume_settings
from vm.qemu import Options
from vm.session import session

pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the namespace and tap")]


@pytest.fixture(scope="module")
def image():
    img = Image.load(sup.build())
    assert "haboob.ip=198.18.0.1/24" in img.cmdline.split()       # the built-in address we move away from
    return img


def serve_and_check(image, opts, want_ip, want_label, want_dev="/dev/vda", want_ip6=None):
    with session(image, opts) as s:
        assert s.guest_ip == want_ip
        ready = s.machine.wait_ready(300)
        assert ready["ip"] == want_ip, ready
        assert any(l.startswith(f"haboob: configuration volume {want_label} on {want_dev}: haboob.ip={want_ip}/")
                   for l in s.machine.lines), s.machine.tail()
        assert not any("HABOOB-WARN" in l for l in s.machine.lines), s.machine.tail()
        bad = [r for r in s.call(check.fetch_all, image, s.host, s.port, sup.EXAMPLE) if not r.ok]
        assert not bad, bad
        assert check.ping(want_ip, prefix=s.prefix).ok
        if want_ip6:
            assert s.wait_ip6(60) == want_ip6, s.machine.tail()
            bad = [r for r in s.call(check.fetch_all, image, want_ip6, 80, sup.EXAMPLE) if not r.ok]
            assert not bad, bad
            assert check.ping(want_ip6, prefix=s.prefix).ok
            neigh = subprocess.run(s.prefix + ["ip", "-6", "neigh", "show", want_ip6], capture_output=True,
                                   text=True).stdout
            assert "lladdr 52:54:00:12:34:56" in neigh, neigh
        assert s.machine.powerdown(90)
        return s.machine.lines


def test_haboob_volume_sets_the_address(image, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "haboob.conf").write_text("# per-deployment settings\nhaboob.ip=198.18.7.9/24\n"
                                     "haboob.gw=198.18.7.1\nhaboob.ip6=2001:2:0:7::9/64\n"
                                     "haboob.gw6=2001:2:0:7::a\n")
    got = config_volume_settings(cfg)
    assert (got["ip"], got["ip6"]) == ("198.18.7.9/24", "2001:2:0:7::9/64")
    # the namespace's end of the tap is 2001:2:0:7::a (next to the guest's): the gateway, no RA
    lines = serve_and_check(image, Options(net="tap", config=cfg, config_ip=got["ip"], config_ip6=got["ip6"]),
                            "198.18.7.9", "HABOOB", want_ip6="2001:2:0:7::9")
    ev = [l for l in lines if "HABOOB-ADDRESS " in l and '"how": "static"' in l]
    assert ev and '"gateway": "2001:2:0:7::a"' in ev[0] and '"event": "acquired"' in ev[0], ev


def test_nocloud_cidata_iso_sets_the_address(image, tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "meta-data").write_text("instance-id: iid-haboob-1\nlocal-hostname: www\n")
    (seed / "user-data").write_text("#cloud-config\npackages: [nginx]\n")    # cloud-init's: ignored
    (seed / "network-config").write_text(
        "version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: '52:54:00:12:34:56'\n"
        "    addresses:\n      - 198.18.9.21/24\n    routes:\n      - to: default\n        via: 198.18.9.1\n")
    iso = tmp_path / "seed.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-R", "-o", str(iso),
                    str(seed)], check=True, capture_output=True)
    # first (vda): a HABOOB FAT volume without haboob.conf, as the disk image's EFI partition is;
    # the guest reads it, finds nothing and goes on to the seed (vdb) without a warning
    esp = tmp_path / "esp.img"
    with open(esp, "wb") as f:
        f.truncate(1 << 20)
    subprocess.run(["mformat", "-i", str(esp), "-v", "HABOOB", "-T", "2048", "-h", "64", "-s", "32", "::"],
                   check=True, capture_output=True)
    subprocess.run(["mmd", "-i", str(esp), "::EFI"], check=True, capture_output=True)
    opts = Options(net="tap", config_ip="198.18.9.21/24",
                   extra=["-drive", f"if=none,id=esp,format=raw,readonly=on,file={esp}",
                          "-device", "virtio-blk-pci,drive=esp",
                          "-drive", f"if=none,id=seed,format=raw,readonly=on,file={iso}",
                          "-device", "virtio-blk-pci,drive=seed"])
    serve_and_check(image, opts, "198.18.9.21", "CIDATA", "/dev/vdb")
