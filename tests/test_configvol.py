"""The configuration volume without a VM: the appliance's parsers
(haboob.conf, NoCloud meta-data / network-config v1 and v2 / user-data,
OpenStack network_data.json), label detection on FAT12, FAT32 and ISO 9660
images made here with mtools, dosfstools and xorriso, the whole read path
over a stand-in /sys/class/block and /dev (the kernel's mount replaced by
mtools/xorriso extraction), the precedence rule, and the writer
(`build.py config-volume`), read back with mdir/mtype."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import configvol as cv
from haboob_build import configvol as writer
from haboob_build.errors import BuildError

REPO = Path(__file__).resolve().parent.parent
V1 = """\
version: 1
config:
  - type: physical
    name: eth0
    mac_address: "52:54:00:AB:CD:EF"
    subnets:
      - type: static
        address: 198.18.2.7
        netmask: 255.255.255.0
        gateway: 198.18.2.1
        dns_nameservers: [198.18.2.53]
  - type: nameserver
    address: [198.18.2.53]
"""
V2 = """\
# written by the cloud
network:
  version: 2
  ethernets:
    id0:
      match:
        macaddress: '52:54:00:12:34:56'
      dhcp4: false
      addresses:
        - 2001:2::5/64
        - 198.18.3.9/24   # the one haboob takes
      routes:
        - to: default
          via: 198.18.3.1
"""
NETWORK_DATA = {
    "links": [{"id": "tap1", "type": "phy", "ethernet_mac_address": "fa:16:3e:00:00:01"}],
    "networks": [
        {"id": "n0", "type": "ipv4_dhcp", "link": "tap1"},
        {"id": "n1", "type": "ipv4", "link": "tap1", "ip_address": "198.18.4.20", "netmask": "255.255.255.0",
         "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "198.18.4.1"}]}],
    "services": []}


# -- parsers ---------------------------------------------------------------------------------

def test_haboob_conf_words_comments_and_canonical_values():
    got = cv.parse_conf("# site A\n\nhaboob.ip=198.18.1.10/255.255.255.0\n  haboob.gw=198.18.1.1  # router\n"
                        "haboob.mac=52:54:00:AA:BB:CC\nhaboob.workers=02\n")
    assert got == {"ip": "198.18.1.10/24", "gw": "198.18.1.1", "mac": "52:54:00:aa:bb:cc", "workers": "2"}


@pytest.mark.parametrize("text, problem", [
    ("haboob.ip=198.18.1.10/24\nhaboob.colour=red\n", "line 2: unknown setting haboob.colour"),
    ("ip=198.18.1.10/24\n", "line 1: 'ip=198.18.1.10/24' is not haboob.KEY=VALUE"),
    ("haboob.ip=198.18.1.10/24 haboob.gw=198.18.1.1\n", "is not haboob.KEY=VALUE"),
    ("haboob.ip=198.18.1.10\n", "has no prefix"),
    ("haboob.ip=198.18.1.300/24\n", "is not an IPv4 address with a prefix"),
    ("haboob.gw=router\n", "haboob.gw='router' is not an IPv4 address"),
    ("haboob.mac=52:54:00:12:34\n", "is not a MAC address"),
    ("haboob.workers=0\n", "1..256"),
    ("haboob.ip=198.18.1.10/24\nhaboob.ip=198.18.1.11/24\n", "line 2: haboob.ip given twice"),
    ("haboob.ip6=on\n", "line 1: haboob.ip6='on' is neither off, auto nor an IPv6 ADDR/PREFIX"),
    ("haboob.ip6=ff02::1/64\n", "ff02::1 is a multicast address"),
    ("haboob.gw6=ff02::2\n", "haboob.gw6='ff02::2' is not a router's unicast address"),
    ("haboob.gw6=fe80::1\n", "haboob.gw6 needs a static haboob.ip6=ADDR/PREFIX"),
    ("haboob.ip6=2001:2:0:1::10/64\nhaboob.gw6=2001:2:0:2::1\n", "is neither link-local (fe80::/10) nor on-link"),
])
def test_haboob_conf_refuses_with_line_and_reason(text, problem):
    with pytest.raises(cv.ConfigError) as e:
        cv.parse_conf(text)
    assert str(e.value).startswith("haboob.conf: ") and problem in str(e.value)


def test_haboob_conf_static_ipv6():
    got = cv.parse_conf("haboob.ip6=2001:2:0:1:0:0:0:10/64\nhaboob.gw6=FE80::1\n")
    assert got == {"ip6": "2001:2:0:1::10/64", "gw6": "fe80::1"}
    assert cv.parse_conf("haboob.ip6=auto\n") == {"ip6": "auto"}
    # the build's static IPv6 repeated on the image's command line does not beat the volume
    config = {"ip": "198.18.0.1/24", "ip6": "2001:2:0:1::10/64", "gateway6": "fe80::1"}
    assert cv.merge(config, {"ip6": "auto"}, {"ip6": "2001:2:0:1::10/64", "gw6": "fe80::1"}) == {"ip6": "auto"}


def test_network_config_v1_static_with_netmask():
    assert cv.parse_network_config(V1) == {"ip": "198.18.2.7/24", "gw": "198.18.2.1", "mac": "52:54:00:ab:cd:ef"}


def test_network_config_v2_static_skips_ipv6_and_takes_default_route():
    assert cv.parse_network_config(V2) == {"ip": "198.18.3.9/24", "gw": "198.18.3.1", "mac": "52:54:00:12:34:56"}


def test_network_config_v2_as_json_and_gateway4():
    doc = {"version": 2, "ethernets": {"eth0": {"addresses": ["198.18.6.6/26"], "gateway4": "198.18.6.1"}}}
    assert cv.parse_network_config(json.dumps(doc)) == {"ip": "198.18.6.6/26", "gw": "198.18.6.1"}


@pytest.mark.parametrize("text, problem", [
    ("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n", "no static IPv4 address"),
    ("version: 3\n", "no 'version: 1' or 'version: 2'"),
    ("version: 2\nethernets:\n  eth0: {dhcp4: true}\n", "not YAML/JSON: unsupported YAML construct"),
    ("version: 2\n ethernets:\n", "not YAML/JSON: line 2: unexpected indentation"),
    ("version: 1\nconfig:\n  - type: physical\n    subnets:\n      - type: static\n        address: 198.18.2.7\n",
     "has no prefix or netmask"),
    ("version: 2\nethernets:\n  e:\n    addresses: [198.18.3.9/24]\n    gateway4: nowhere\n",
     "haboob.gw='nowhere' is not an IPv4 address"),
])
def test_network_config_malformed(text, problem):
    with pytest.raises(cv.ConfigError) as e:
        cv.parse_network_config(text)
    assert str(e.value).startswith("network-config: ") and problem in str(e.value), str(e.value)


def test_meta_data_and_user_data():
    assert cv.parse_meta_data("instance-id: iid-1\nlocal-hostname: www\n") == {}
    with pytest.raises(cv.ConfigError, match="meta-data: not a mapping"):
        cv.parse_meta_data("- just\n- a list\n")
    assert cv.parse_user_data("#cloud-config\nruncmd: [reboot]\n") == {}      # cloud-init's, not ours
    assert cv.parse_user_data("#haboob\nhaboob.ip=198.18.8.8/24\n") == {"ip": "198.18.8.8/24"}
    with pytest.raises(cv.ConfigError, match="user-data: line 1: unknown setting haboob.x"):
        cv.parse_user_data("#haboob\nhaboob.x=1\n")


def test_openstack_network_data_first_static_ipv4():
    got = cv.parse_network_data(json.dumps(NETWORK_DATA))
    assert got == {"ip": "198.18.4.20/24", "gw": "198.18.4.1", "mac": "fa:16:3e:00:00:01"}
    dhcp = dict(NETWORK_DATA, networks=NETWORK_DATA["networks"][:1])
    with pytest.raises(cv.ConfigError, match="no static 'ipv4' network"):
        cv.parse_network_data(json.dumps(dhcp))
    with pytest.raises(cv.ConfigError, match=r"network_data.json: not JSON"):
        cv.parse_network_data('{"networks": [')


def test_precedence_defaults_volume_command_line():
    config = {"ip": "198.18.0.1/24", "gateway": None}
    vol = {"ip": "198.18.7.9/24", "gw": "198.18.7.1"}
    # the image's own command line repeats the build default: the volume wins
    assert cv.merge(config, vol, {"ip": "198.18.0.1/24"}) == vol
    # an address typed at the GRUB prompt wins over the volume
    assert cv.merge(config, vol, {"ip": "198.18.5.5/24"}) == {"ip": "198.18.5.5/24", "gw": "198.18.7.1"}
    # the build's gateway repeated on the command line goes with the build's address, not the volume's
    assert cv.merge(dict(config, gateway="198.18.0.254"), {"ip": "dhcp"},
                    {"ip": "198.18.0.1/24", "gw": "198.18.0.254"}) == {"ip": "dhcp"}
    assert cv.merge(config, {}, {"ip": "198.18.0.1/24", "workers": "2"}) == {"ip": "198.18.0.1/24",
                                                                             "workers": "2"}


def test_pid1_settings_carry_the_volume_tls_paths():
    from appliance.init import settings
    s = settings({"ip": "198.18.0.1/24"}, cv.merge({"ip": "198.18.0.1/24"},
                                                   {"ip": "198.18.7.9/24", "tls_cert": "/run/c", "tls_key": "/run/k"},
                                                   {"ip": "198.18.0.1/24"}))
    assert (s["ip"], s["tls_cert"], s["tls_key"]) == ("198.18.7.9/24", "/run/c", "/run/k")


# -- labels from real file system images -------------------------------------------------------

def fat(path: Path, label: str, files: dict, fat32: bool = False) -> Path:
    if fat32:                               # FAT32 needs ~33 MB: a sparse file
        with open(path, "wb") as f:
            f.truncate(40 << 20)
        subprocess.run(["mkfs.vfat", "-F", "32", "-n", label, str(path)], check=True, capture_output=True)
    else:
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        subprocess.run(["mformat", "-i", str(path), "-v", label, "-T", "2048", "-h", "64", "-s", "32", "::"],
                       check=True, capture_output=True)
    src = path.parent / f"{path.name}.src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    for d in sorted({str(p) for r in files for p in Path(r).parents} - {"."}):
        subprocess.run(["mmd", "-i", str(path), f"::{d}"], check=True, capture_output=True)
    for rel in files:
        subprocess.run(["mcopy", "-i", str(path), str(src / rel), f"::{rel}"], check=True, capture_output=True)
    return path


def iso(path: Path, label: str, files: dict) -> Path:
    src = path.parent / f"{path.name}.src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", label, "-J", "-R", "-o", str(path), str(src)],
                   check=True, capture_output=True)
    return path


def head(p: Path) -> bytes:
    return p.read_bytes()[:0x8800]


def test_labels_fat12_fat32_iso(tmp_path):
    assert cv.volume_label(head(fat(tmp_path / "a.img", "HABOOB", {}))) == ("vfat", "HABOOB")
    assert cv.volume_label(head(fat(tmp_path / "b.img", "CIDATA", {}, fat32=True))) == ("vfat", "CIDATA")
    assert cv.volume_label(head(iso(tmp_path / "c.iso", "config-2", {"x": b"y"}))) == ("iso9660", "config-2")
    assert cv.volume_label(head(iso(tmp_path / "d.iso", "cidata", {"x": b"y"}))) == ("iso9660", "cidata")
    assert cv.volume_label(os.urandom(0x8800)) is None
    mbr = bytearray(0x8800)
    mbr[510:512] = b"\x55\xaa"                    # a partition table, no BPB
    assert cv.volume_label(bytes(mbr)) is None
    assert cv.volume_label(b"") is None


# -- the read path over a stand-in sysfs and /dev ------------------------------------------------

class Devices:
    """/sys/class/block and /dev with image files as the block devices; mount() extracts
    the image with mtools or xorriso where the kernel would mount it."""

    def __init__(self, tmp: Path):
        self.sys, self.dev, self.tmp = tmp / "sys", tmp / "dev", tmp
        self.sys.mkdir()
        self.dev.mkdir()
        self.mounts, self.lines = [], []

    def add(self, name: str, image: Path):
        (self.sys / name).mkdir()
        os.link(image, self.dev / name)

    def mount(self, source, target, fstype, flags):
        assert flags & cv.MS_RDONLY
        self.mounts.append((source, fstype))
        os.makedirs(target, exist_ok=True)
        if fstype == "vfat":
            subprocess.run(["mcopy", "-s", "-n", "-i", source, "::*", target], check=True, capture_output=True)
        else:
            subprocess.run(["xorriso", "-osirrox", "on", "-indev", source, "-extract", "/", target],
                           check=True, capture_output=True)

    def read(self, config, cmdline=None, prepared=None):
        return cv.read_settings(self.mount, self.lines.append, config, cmdline or {},
                                prepare=prepared, root=str(self.tmp / "mnt"),
                                sys_block=str(self.sys), dev=str(self.dev))


CONFIG = {"ip": "198.18.0.1/24", "gateway": None}


def test_read_haboob_volume_with_tls_by_label_priority(tmp_path, monkeypatch):
    monkeypatch.setattr(cv, "RUN", str(tmp_path / "run"))
    d = Devices(tmp_path)
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    key = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
    d.add("sda", fat(tmp_path / "other.img", "DATA", {"haboob.conf": b"haboob.ip=198.18.9.9/24\n"}))
    d.add("sr0", iso(tmp_path / "seed.iso", "cidata", {"meta-data": b"instance-id: i\n",
                                                      "network-config": V2.encode()}))
    d.add("vda", fat(tmp_path / "cfg.img", "HABOOB", {"haboob.conf": b"haboob.ip=198.18.7.9/24\n",
                                                     "tls/fullchain.pem": pem, "tls/key.pem": key}))
    calls = []
    got = d.read(CONFIG, {"ip": "198.18.0.1/24"}, prepared=lambda: calls.append(1))
    assert calls == [1]                               # the file system modules were asked for once
    assert d.mounts == [(str(d.dev / "vda"), "vfat")]  # HABOOB beats cidata; DATA is not ours
    assert got == {"ip": "198.18.7.9/24", "tls_cert": f"{cv.RUN}/tls/fullchain.pem",
                   "tls_key": f"{cv.RUN}/tls/key.pem"}
    assert Path(got["tls_cert"]).read_bytes() == pem and Path(got["tls_key"]).read_bytes() == key
    assert Path(got["tls_key"]).stat().st_mode & 0o077 == 0
    assert d.lines == [f"haboob: configuration volume HABOOB on {d.dev}/vda: haboob.ip=198.18.7.9/24"]


def test_read_nocloud_iso_and_config_drive(tmp_path):
    d = Devices(tmp_path)
    d.add("sr0", iso(tmp_path / "seed.iso", "cidata", {"meta-data": b"instance-id: i\n",
                                                      "network-config": V1.encode(),
                                                      "user-data": b"#cloud-config\n"}))
    assert d.read(CONFIG) == {"ip": "198.18.2.7/24", "gw": "198.18.2.1", "mac": "52:54:00:ab:cd:ef"}
    (tmp_path / "2").mkdir()
    d2 = Devices(tmp_path / "2")
    d2.add("vdb", fat(tmp_path / "cd.img", "CONFIG-2",
                      {"openstack/latest/network_data.json": json.dumps(NETWORK_DATA).encode()}))
    assert d2.read(CONFIG) == {"ip": "198.18.4.20/24", "gw": "198.18.4.1", "mac": "fa:16:3e:00:00:01"}


@pytest.mark.parametrize("label, files, problem", [
    ("HABOOB", {"haboob.conf": b"haboob.ip=198.18.7.9/24\nhaboob.dns=1.1.1.1\n"},
     "haboob.conf: line 2: unknown setting haboob.dns"),
    ("HABOOB", {"haboob.conf": b"haboob.ip=198.18.7.9/24\n", "tls/fullchain.pem": b"not pem"},
     "tls/fullchain.pem: not a PEM file"),
    ("CIDATA", {"network-config": V2.encode()}, "meta-data: missing"),
    ("CIDATA", {"meta-data": b"instance-id: i\n", "network-config": b"version: 2\nethernets: [\n"},
     "network-config: "),
    ("CIDATA", {"meta-data": b"instance-id: i\n", "network-config": b"\xff\xfe"}, "network-config: not UTF-8"),
])
def test_malformed_volume_warns_and_keeps_built_in_settings(tmp_path, label, files, problem):
    d = Devices(tmp_path)
    d.add("vda", fat(tmp_path / "bad.img", label, files))
    assert d.read(CONFIG, {"ip": "198.18.0.1/24"}) == {"ip": "198.18.0.1/24"}
    assert len(d.lines) == 1 and d.lines[0].startswith("HABOOB-WARN configuration volume: " + problem), d.lines
    assert d.lines[0].endswith("using the built-in settings")


def test_unmountable_volume_is_a_warning_not_a_crash(tmp_path):
    d = Devices(tmp_path)
    d.add("vda", fat(tmp_path / "cfg.img", "HABOOB", {"haboob.conf": b"haboob.ip=198.18.7.9/24\n"}))

    def refuse(source, target, fstype, flags):
        raise OSError(19, "mount vfat on /run/haboob/volume: No such device")
    got = cv.read_settings(refuse, d.lines.append, CONFIG, {}, sys_block=str(d.sys), dev=str(d.dev))
    assert got == {}
    assert d.lines == ["HABOOB-WARN configuration volume: OSError: [Errno 19] mount vfat on /run/haboob/volume: "
                       "No such device; using the built-in settings"]


def test_empty_haboob_volume_is_skipped_for_the_next_one(tmp_path):
    """The boot disk's EFI partition is labelled HABOOB and holds no haboob.conf: no warning,
    and a NoCloud volume beside it still counts."""
    d = Devices(tmp_path)
    d.add("vda1", fat(tmp_path / "esp.img", "HABOOB", {"EFI/BOOT/BOOTX64.EFI": b"MZ"}))
    d.add("vdb", iso(tmp_path / "seed.iso", "cidata", {"meta-data": b"instance-id: i\n",
                                                      "network-config": V2.encode()}))
    assert d.read(CONFIG)["ip"] == "198.18.3.9/24"
    assert d.mounts == [(str(d.dev / "vda1"), "vfat"), (str(d.dev / "vdb"), "iso9660")]
    assert d.lines == [f"haboob: configuration volume CIDATA on {d.dev}/vdb: haboob.ip=198.18.3.9/24 "
                       "haboob.gw=198.18.3.1 haboob.mac=52:54:00:12:34:56"]


def test_no_volume_no_line(tmp_path):
    d = Devices(tmp_path)
    (tmp_path / "blank").write_bytes(bytes(4096))
    d.add("vda", tmp_path / "blank")
    assert d.read(CONFIG, {"gw": "198.18.0.254"}) == {"gw": "198.18.0.254"} and d.lines == [] and d.mounts == []


# -- the writer ------------------------------------------------------------------------------

def conf_dir(tmp_path: Path, files: dict) -> Path:
    d = tmp_path / "cfg"
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def mtools(*argv) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_writer_volume_reads_back_with_mtools_and_is_reproducible(tmp_path, monkeypatch):
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    key = b"-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n"
    conf = b"# deployment 7\nhaboob.ip=198.18.7.9/24\nhaboob.gw=198.18.7.1\n"
    d = conf_dir(tmp_path, {"haboob.conf": conf, "tls/fullchain.pem": pem, "tls/key.pem": key})
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    assert writer.write(d, a) == {"ip": "198.18.7.9/24", "gw": "198.18.7.1"}
    os.utime(d / "haboob.conf", (1, 1))
    writer.write(d, b)
    assert a.read_bytes() == b.read_bytes()
    assert "Volume in drive : is HABOOB" in mtools("mdir", "-i", str(a), "::")
    assert "2023-11-14" in mtools("mdir", "-i", str(a), "::")       # SOURCE_DATE_EPOCH
    assert mtools("mtype", "-i", str(a), "::haboob.conf").encode() == conf
    assert mtools("mtype", "-i", str(a), "::tls/fullchain.pem").encode() == pem
    assert mtools("mtype", "-i", str(a), "::tls/key.pem").encode() == key
    assert cv.volume_label(head(a)) == ("vfat", "HABOOB")
    (d / "haboob.conf").write_bytes(conf.replace(b"7.9", b"7.10"))
    writer.write(d, b)
    assert a.read_bytes()[0x27:0x2B] != b.read_bytes()[0x27:0x2B]       # the serial follows the contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.img", "b.img", "cfg"]


@pytest.mark.parametrize("files, problem", [
    ({"haboob.conf": b"haboob.ip=198.18.7.9/24\n", "notes.txt": b"hi"}, "notes.txt: not a configuration file"),
    ({"haboob.conf": b"haboob.ip=198.18.7.9/24\nhaboob.colour=red\n"},
     "haboob.conf: line 2: unknown setting haboob.colour"),
    ({"haboob.conf": b"this is not a setting\n"}, "haboob.conf: line 1: 'this is not a setting' is not haboob"),
    ({"haboob.conf": b"haboob.ip=198.18.7.9/24\n", "tls/key.pem": b"-----BEGIN PRIVATE KEY-----\n"},
     "needs both fullchain.pem and key.pem"),
    ({"tls/other.pem": b"x"}, "tls/other.pem: not a configuration file"),
    ({}, "holds neither haboob.conf nor tls/fullchain.pem"),
])
def test_writer_refuses_bad_dir_and_leaves_nothing(tmp_path, files, problem):
    d = conf_dir(tmp_path, files)
    d.mkdir(exist_ok=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.img").write_bytes(b"previous volume")
    with pytest.raises(BuildError) as e:
        writer.write(d, out / "old.img")
    assert problem in str(e.value), str(e.value)
    assert [p.name for p in out.iterdir()] == ["old.img"] and (out / "old.img").read_bytes() == b"previous volume"


def test_build_py_config_volume_command(tmp_path):
    d = conf_dir(tmp_path, {"haboob.conf": b"haboob.ip=198.18.7.9/24\n"})
    out = tmp_path / "cfg.img"
    ok = subprocess.run([sys.executable, "build.py", "config-volume", str(d), "--out", str(out)], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "haboob.ip=198.18.7.9/24" in ok.stderr
    assert mtools("mtype", "-i", str(out), "::haboob.conf") == "haboob.ip=198.18.7.9/24\n"
    (d / "haboob.conf").write_text("haboob.ip=198.18.7.9\n")
    bad = subprocess.run([sys.executable, "build.py", "config-volume", str(d), "--out", str(tmp_path / "x.img")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "haboob.conf: line 1: haboob.ip='198.18.7.9' has no prefix" in bad.stderr
    assert not (tmp_path / "x.img").exists()
    missing = subprocess.run([sys.executable, "build.py", "config-volume", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "y.img")], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 1 and "nope: not a folder" in missing.stderr


def test_vm_config_option_checks_dir_and_attaches_volume(tmp_path):
    from vm import media
    d = conf_dir(tmp_path, {"haboob.conf": b"haboob.ip=198.18.7.9/24\n"})
    work = tmp_path / "work"
    work.mkdir()
    argv = media.config_args(d, work)
    assert argv == ["-drive", f"if=none,id=hbcfg,format=raw,readonly=on,file={work}/config-volume.img",
                    "-device", "virtio-blk-pci,drive=hbcfg"]
    assert cv.volume_label(head(work / "config-volume.img")) == ("vfat", "HABOOB")
    import click
    from vm.__main__ import make_options
    o = make_options("tap", 1, None, None, config=d)
    assert o.config == d.resolve() and o.config_ip == "198.18.7.9/24"
    (d / "haboob.conf").write_text("haboob.nope=1\n")
    with pytest.raises(click.BadParameter, match="unknown setting haboob.nope"):
        make_options("tap", 1, None, None, config=d)
