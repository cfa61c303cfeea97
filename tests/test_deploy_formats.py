"""Deploy formats (haboob_build.formats): structure, reproducibility, bad input.

Booting the media is in test_deploy_boot.py; here every artifact is
checked as bytes: the GPT against UEFI 2.10 §5.3 (CRCs, partitions,
backup), the MBR against GRUB's boot.img, the ESP's files through mtools,
the ISO's boot catalogue through xorriso, qcow2 through `qemu-img check`.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest

from haboob_build import formats
from haboob_build.errors import BuildError

from . import deploy_support as ds

EPOCH = 1700000000
CMDLINE = "console=ttyS0,115200 panic=-1 haboob.ip=198.18.41.1/24 haboob.gw=198.18.41.254"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small fake boot inputs: the writers copy bytes, they never look inside."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "vmlinuz").write_bytes(b"K" * 300_000 + os.urandom(1000))
    (d / "initrd.img").write_bytes(b"I" * 500_000 + os.urandom(1000))
    return d


def _build_all(inputs: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return formats.write_formats(formats.FORMATS, out, name="www", vmlinuz=inputs / "vmlinuz",
                                 initrd=inputs / "initrd.img", cmdline=CMDLINE, epoch=EPOCH)


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    return out, _build_all(inputs, out)


# ---------------------------------------------------------------- options

def test_parse_formats():
    assert formats.parse_formats("all") == ["iso", "img", "pxe", "qcow2"]
    assert formats.parse_formats("qcow2,iso") == ["iso", "qcow2"]
    assert formats.parse_formats("none") == []
    with pytest.raises(BuildError, match=r"unknown format 'vmdk'.*known: iso, img, pxe, qcow2"):
        formats.parse_formats("iso,vmdk")


def test_missing_tool_is_named_with_its_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))         # nothing on PATH
    with pytest.raises(BuildError, match=r"missing .*xorriso \(Debian package xorriso\)"):
        formats.check_tools(["iso"])
    with pytest.raises(BuildError, match=r"qemu-img \(Debian package qemu-utils\)"):
        formats.check_tools(["qcow2"])
    formats.check_tools(["pxe"])                       # needs no tool
    with pytest.raises(BuildError):
        formats.write_formats(["iso"], tmp_path, name="x", vmlinuz=tmp_path / "v", initrd=tmp_path / "i",
                              cmdline="", epoch=EPOCH)
    assert list(tmp_path.iterdir()) == []             # refused before writing anything


def test_failed_tool_leaves_nothing(inputs, tmp_path, monkeypatch):
    """A tool failing mid-way: no output file, no temporary file left."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "xorriso").write_text("#!/bin/sh\necho 'xorriso : FAILURE : simulated' >&2\nexit 5\n")
    (fake / "xorriso").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BuildError, match=r"ISO \(xorriso\) failed.*simulated"):
        formats.make_iso(inputs / "vmlinuz", inputs / "initrd.img", CMDLINE, out / "www.iso", name="www",
                         epoch=EPOCH)
    assert list(out.iterdir()) == []


def test_grub_cfg_entries():
    cfg = formats.grub_cfg("www", CMDLINE, timeout=5)
    assert "set timeout=5" in cfg
    assert "terminal_output console serial" in cfg
    assert f"linux /haboob/vmlinuz {CMDLINE}\n" in cfg
    # the second entry rebuilds the line without the built-in address
    ask = cfg.split("--id haboob-ask", 1)[1]
    assert "linux /haboob/vmlinuz console=ttyS0,115200 panic=-1 haboob.ip=$hb_ip $hb_gwarg" in ask
    assert "198.18.41.1" not in ask
    with pytest.raises(BuildError, match="characters GRUB would interpret"):
        formats.grub_cfg("www", 'quiet x="$y"')


# ---------------------------------------------------------------- the raw disk

def _guid(b: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=b)


def _parse_gpt(disk: bytes, lba: int):
    hdr = disk[lba * 512:lba * 512 + 92]
    (sig, rev, size, crc, _r, my, alt, first, last, dguid, ent_lba, n, esz, ent_crc) = \
        struct.unpack("<8sIIIIQQQQ16sQIII", hdr)
    assert sig == b"EFI PART" and rev == 0x10000 and size == 92
    assert zlib.crc32(hdr[:16] + b"\0\0\0\0" + hdr[20:]) == crc
    entries = disk[ent_lba * 512:ent_lba * 512 + n * esz]
    assert zlib.crc32(entries) == ent_crc
    parts = []
    for i in range(n):
        t, g, f, l, attrs, name = struct.unpack_from("<16s16sQQQ72s", entries, i * esz)
        if t != bytes(16):
            parts.append((_guid(t), _guid(g), f, l, name.decode("utf-16-le").rstrip("\0")))
    return my, alt, first, last, _guid(dguid), parts


def test_disk_gpt_and_mbr(built):
    out, _ = built
    disk = (out / "www.img").read_bytes()
    total = len(disk) // 512
    assert len(disk) % 512 == 0
    # protective MBR: one 0xEE entry covering the disk, then the signature
    status, ptype, start, count = struct.unpack_from("<B3xB3xII", disk, 446)
    assert (status, ptype, start, count) == (0, 0xEE, 1, total - 1)
    assert disk[462:510] == bytes(48) and disk[510:512] == b"\x55\xaa"
    # primary and backup headers agree and point at each other
    my, alt, first, last, dguid, parts = _parse_gpt(disk, 1)
    bmy, balt, _, _, bguid, bparts = _parse_gpt(disk, total - 1)
    assert (my, alt, bmy, balt) == (1, total - 1, total - 1, 1)
    assert (first, last) == (34, total - 34)
    assert dguid == bguid and parts == bparts
    (t1, _, f1, l1, n1), (t2, _, f2, l2, n2) = parts
    assert t1 == formats.BIOS_BOOT_TYPE and n1 == "BIOS boot" and (f1, l1) == (2048, 4095)
    assert t2 == formats.ESP_TYPE and n2 == "EFI system" and f2 == 4096 and l2 < total - 33
    # MBR code is GRUB's boot.img, patched to load core.img from LBA 2048
    boot = (formats.GRUB_PC_DIR / "boot.img").read_bytes()
    assert disk[:0x5c] == boot[:0x5c]
    assert struct.unpack_from("<Q", disk, 0x5c)[0] == 2048
    assert disk[0x66:0x68] == b"\x90\x90"
    # core.img's first sector (diskboot) continues at LBA 2049
    assert struct.unpack_from("<QHH", disk, 2048 * 512 + 500)[0::2] == (2049, 0x820)


def test_disk_esp_files(built, inputs):
    out, _ = built
    disk = out / "www.img"
    spec = f"{disk}@@{4096 * 512}"
    listing = subprocess.run(["mdir", "-i", spec, "-/", "-b", "::/"], capture_output=True, text=True,
                             check=True).stdout.split()
    assert {"::/EFI/BOOT/BOOTX64.EFI", "::/haboob/vmlinuz", "::/haboob/initrd.img",
            "::/boot/grub/grub.cfg"} <= set(listing)
    for name in ("vmlinuz", "initrd.img"):
        got = subprocess.run(["mtype", "-i", spec, f"::/haboob/{name}"], capture_output=True, check=True).stdout
        assert got == (inputs / name).read_bytes()
    cfg = subprocess.run(["mtype", "-i", spec, "::/boot/grub/grub.cfg"], capture_output=True, text=True,
                         check=True).stdout
    signed = formats.secure_boot_available()
    assert cfg == formats.grub_cfg("www", CMDLINE, ask_on_efi=not signed)
    efi = subprocess.run(["mtype", "-i", spec, "::/EFI/BOOT/BOOTX64.EFI"], capture_output=True, check=True).stdout
    assert efi[:2] == b"MZ" and b"PE\0\0" in efi[:512]
    expected = formats.SIGNED["shim"].read_bytes() if signed else None
    assert (efi == expected) == signed
    info = subprocess.run(["minfo", "-i", spec, "::"], capture_output=True, text=True, check=True).stdout
    assert "FAT32" in info or "fat32" in info.lower() or "big FAT" in info


# ---------------------------------------------------------------- the ISO

def test_iso_boot_records(built, inputs):
    out, _ = built
    iso = out / "www.iso"
    report = subprocess.run(["xorriso", "-indev", iso, "-report_el_torito", "plain", "-report_system_area",
                             "plain"], capture_output=True, text=True).stdout
    assert "El Torito boot img :   1  BIOS" in report
    assert "El Torito boot img :   2  UEFI" in report
    assert "grub2-mbr" in report and "protective-msdos-label" in report
    target = out / "x-initrd"
    subprocess.run(["xorriso", "-indev", iso, "-osirrox", "on", "-extract", "/haboob/initrd.img", target],
                   capture_output=True, check=True)
    assert target.read_bytes() == (inputs / "initrd.img").read_bytes()
    target.chmod(0o644)
    target.unlink()
    head = iso.read_bytes()[:512]
    assert head[510:512] == b"\x55\xaa"                   # hybrid: a USB stick boots it as a disk


# ---------------------------------------------------------------- qcow2, PXE

def test_qcow2_check_and_content(built):
    out, _ = built
    q = out / "www.qcow2"
    subprocess.run(["qemu-img", "check", q], check=True, capture_output=True)
    info = subprocess.run(["qemu-img", "info", "--output=json", q], capture_output=True, text=True, check=True)
    assert '"format": "qcow2"' in info.stdout
    assert f'"virtual-size": {(out / "www.img").stat().st_size}' in info.stdout
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", q, out / "www.img"],
                   check=True, capture_output=True)


def test_pxe_folder(built, inputs):
    out, _ = built
    pxe = out / "pxe"
    assert sorted(p.name for p in pxe.iterdir()) == ["boot.ipxe", "initrd.img", "vmlinuz"]
    assert (pxe / "vmlinuz").read_bytes() == (inputs / "vmlinuz").read_bytes()
    kernel, initrd, cmdline = formats.parse_ipxe((pxe / "boot.ipxe").read_text())
    assert (kernel, initrd) == ("vmlinuz", "initrd.img")
    assert cmdline == "initrd=initrd.img " + CMDLINE
    with pytest.raises(BuildError, match="not an iPXE script"):
        formats.parse_ipxe("kernel x\n")


def test_manifest_entries(built):
    out, entries = built
    assert set(entries) == {"iso", "img", "pxe", "qcow2"}
    for fmt, e in entries.items():
        for rel, meta in e["files"].items():
            assert meta["size"] == (out / rel).stat().st_size
            assert meta["sha256"] == formats.sha256_file(out / rel)
    assert set(entries["pxe"]["files"]) == {"pxe/vmlinuz", "pxe/initrd.img", "pxe/boot.ipxe"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]       # no scratch left


def test_qcow2_alone_leaves_no_raw(inputs, tmp_path):
    entries = formats.write_formats(["qcow2"], tmp_path, name="www", vmlinuz=inputs / "vmlinuz",
                                    initrd=inputs / "initrd.img", cmdline=CMDLINE, epoch=EPOCH)
    assert list(entries) == ["qcow2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www.qcow2"]


# ---------------------------------------------------------------- reproducibility

def test_reproducible(built, inputs, tmp_path):
    """Same inputs and SOURCE_DATE_EPOCH, built again later elsewhere: same bytes."""
    out, first = built
    second = _build_all(inputs, tmp_path / "again")
    for fmt in formats.FORMATS:
        if formats.REPRODUCIBLE[fmt]:
            assert second[fmt] == first[fmt], fmt
    # a different epoch changes the dates, hence the bytes
    other = formats.write_formats(["iso"], tmp_path / "later", name="www", vmlinuz=inputs / "vmlinuz",
                                  initrd=inputs / "initrd.img", cmdline=CMDLINE, epoch=EPOCH + 86400)
    assert other["iso"] != first["iso"]


@pytest.mark.skipif(not shutil.which("sfdisk"), reason="sfdisk (util-linux fdisk) not installed")
def test_disk_table_as_sfdisk_reads_it(built):
    out, _ = built
    dump = subprocess.run(["sfdisk", "--dump", out / "www.img"], capture_output=True, text=True, check=True).stdout
    assert "label: gpt" in dump and "type=21686148-6449-6E6F-744E-656564454649" in dump


def test_stand_in_kernel_is_available():
    """The boot tests' kernel: Debian's, from the shared cache."""
    vmlinuz, mdir = ds.debian_kernel()
    assert vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"
    assert (mdir / "kernel").is_dir()


# ---------------------------------------------------------------- build.py refuses before building

REPO = Path(__file__).resolve().parent.parent


def _build_cli(tmp_path, *args, env=None):
    import sys
    return subprocess.run([sys.executable, str(REPO / "build.py"), "--site", str(REPO / "examples/www"),
                           "--out", str(tmp_path / "out"), "-q", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.parametrize("args,msg", [
    (["--formats", "iso,vmdk"], "--formats: unknown format 'vmdk'; known: iso, img, pxe, qcow2"),
    (["--nic-drivers", "e1000,rtl8139"], "--nic-drivers: unknown NIC driver 'rtl8139'; known: virtio_net"),
])
def test_build_cli_refuses_bad_names(tmp_path, args, msg):
    proc = _build_cli(tmp_path, *args)
    assert proc.returncode != 0 and msg in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_build_cli_refuses_missing_tools(tmp_path):
    import sys
    bindir = tmp_path / "bin"                       # a PATH with Python and nothing else
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    env = dict(os.environ, PATH=str(bindir))
    proc = _build_cli(tmp_path, "--formats", "img,qcow2", env=env)
    assert proc.returncode != 0, proc.stderr
    assert "missing grub-mkimage (Debian package grub-common)" in proc.stderr
    assert "qemu-img (Debian package qemu-utils)" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["on", "off"])
def test_disk_secure_boot_modes(inputs, tmp_path, mode):
    if mode == "on" and not formats.secure_boot_available():
        with pytest.raises(BuildError, match=r"Secure Boot disk: missing .*shim-signed, grub-efi-amd64-signed"):
            formats.make_disk(inputs / "vmlinuz", inputs / "initrd.img", CMDLINE, tmp_path / "d.img", name="www",
                              epoch=EPOCH, secure_boot="on")
        return
    disk = formats.make_disk(inputs / "vmlinuz", inputs / "initrd.img", CMDLINE, tmp_path / "d.img", name="www",
                             epoch=EPOCH, secure_boot=mode)
    spec = f"{disk}@@{4096 * 512}"
    listing = set(subprocess.run(["mdir", "-i", spec, "-/", "-b", "::/"], capture_output=True, text=True,
                                 check=True).stdout.split())
    cfg = subprocess.run(["mtype", "-i", spec, "::/boot/grub/grub.cfg"], capture_output=True, text=True,
                         check=True).stdout
    if mode == "on":
        assert {"::/EFI/BOOT/grubx64.efi", "::/EFI/BOOT/mmx64.efi", "::/.disk/info"} <= listing
        # signed GRUB has no `read`: the typed-address entry is offered on BIOS only
        assert 'if [ "$grub_platform" = "pc" ]; then\nmenuentry "Haboob www: type the address' in cfg
    else:
        assert "::/EFI/BOOT/grubx64.efi" not in listing and "::/.disk/info" not in listing
        assert "if [ \"$grub_platform\"" not in cfg
