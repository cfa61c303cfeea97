"""Boot the deploy media as machines would, and fetch bytes over the NIC.

Each medium (raw disk, ISO as a CD, ISO written to a USB stick, PXE files)
boots under SeaBIOS or OVMF with no -kernel: firmware -> GRUB -> kernel +
initrd + the medium's command line. The initrd is the stand-in from
deploy_support (busybox, tests only) carrying the NIC modules chosen by
haboob_build.drivers; it serves a page that the test fetches byte for byte
over a tap in a private namespace, so each boot checks the whole path
including the emulated NIC model (virtio, e1000, e1000e) and its driver.

TCG boots are slow (10-60 s), so the media are built once per session and
each combination runs once; together the rows cover every medium, both
firmwares and every NIC model.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from haboob_build import drivers, formats
from vm import media, netns, passthrough as pt

from . import deploy_support as ds

pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and taps"),
              pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="no QEMU")]

QEMU = "qemu-system-x86_64"
GUEST, HOST = "198.18.50.1", "198.18.50.2"
CMDLINE = f"console=ttyS0,115200 panic=-1 haboob.ip={GUEST}/24"
DRIVER = {"virtio": "virtio_net", "e1000": "e1000", "e1000e": "e1000e"}
READY_TIMEOUT = 240


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """images/www-like folder with www.img, www.iso, pxe/ around the stand-in initrd."""
    vmlinuz, mdir = ds.debian_kernel()
    work = tmp_path_factory.mktemp("deploy")
    sel = drivers.select_nic_modules(mdir, ["virtio_net", "e1000", "e1000e"])
    initrd = ds.standin_initrd(work / "initrd.img", sel)
    out = work / "www"
    out.mkdir()
    # timeout=1: the menu shows for a second (the default is 3)
    for fmt in ("iso", "img"):
        maker = formats.make_iso if fmt == "iso" else formats.make_disk
        maker(vmlinuz, initrd, CMDLINE, out / f"www.{fmt}", name="www", epoch=1700000000, timeout=1)
    formats.make_pxe(vmlinuz, initrd, CMDLINE, out / "pxe", name="www")
    # the disk with our own GRUB build on the ESP (the default carries the
    # signed shim chain when its packages are installed)
    (work / "own").mkdir()
    formats.make_disk(vmlinuz, initrd, CMDLINE, work / "own/www.img", name="www", epoch=1700000000, timeout=1,
                      secure_boot="off")
    return out


def boot_and_fetch(medium_args: list[str], firmware: str, nic: str, work: Path) -> str:
    """Boot; wait for the stand-in's ready line; fetch the page; return the console."""
    with netns.namespace("v") as ns, netns.tap(ns, f"{HOST}/24") as tap:
        argv = [QEMU, "-M", "q35", "-m", "512", *ds.accel_args(), "-nodefaults", "-display", "none",
                "-serial", "stdio", "-no-reboot",
                *media.firmware_args(firmware, work), *medium_args,
                *pt.tap_args(tap, nic, "52:54:00:00:50:01")]
        with ds.Console(ns.argv(argv)) as con:
            booted = con.wait_for(ds.MARK_BOOTED, READY_TIMEOUT)
            ready = con.wait_for(ds.MARK_READY, READY_TIMEOUT)
            assert f"driver={DRIVER[nic]} " in ready, ready
            got = ns.run(["curl", "-sS", "--max-time", "20", "--retry", "5", "--retry-all-errors",
                          "--retry-delay", "1", f"http://{GUEST}/index.html"],
                         text=False).stdout
            assert got == ds.PAGE
            return booted + "\n" + con.text


@pytest.mark.parametrize("boot,firmware,nic", [
    ("disk", "bios", "virtio"),
    ("disk", "uefi", "e1000e"),
    ("iso", "bios", "e1000"),
    ("iso", "uefi", "virtio"),
])
def test_boot_medium(media_dir, tmp_path, boot, firmware, nic):
    console = boot_and_fetch(media.boot_args(boot, media_dir), firmware, nic, tmp_path)
    assert "Booting `Haboob www" in console                       # GRUB's menu entry ran
    assert f"{ds.MARK_BOOTED} BOOT_IMAGE=/haboob/vmlinuz {CMDLINE}" in console


def test_boot_disk_with_our_own_grub_uefi(media_dir, tmp_path):
    console = boot_and_fetch(media.boot_args("disk", media_dir.parent / "own", name="www"), "uefi", "e1000",
                             tmp_path)
    assert "Booting `Haboob www" in console


@pytest.mark.skipif(not formats.secure_boot_available(), reason="shim-signed / grub-efi-amd64-signed missing")
def test_boot_disk_with_secure_boot_on(media_dir, tmp_path):
    """OVMF with Secure Boot enforcing and Microsoft's keys: shim -> Debian's
    signed GRUB -> Debian's signed kernel, which reports Secure Boot on."""
    console = boot_and_fetch(media.boot_args("disk", media_dir), "uefi-secure", "virtio", tmp_path)
    assert "Secure boot enabled" in console or "Secure Boot is enabled" in console, console[-3000:]


def test_boot_iso_written_to_usb_stick(media_dir, tmp_path):
    """The same ISO file as a USB disk (as after `dd` to a stick), UEFI."""
    iso = media_dir / "www.iso"
    usb = ["-device", "qemu-xhci,id=hbxhci",
           "-drive", f"if=none,id=hbusb,format=raw,file={iso},snapshot=on",
           "-device", "usb-storage,bus=hbxhci.0,drive=hbusb,bootindex=1"]
    console = boot_and_fetch(usb, "uefi", "e1000", tmp_path)
    assert "Booting `Haboob www" in console


def test_boot_pxe_as_ipxe_would(media_dir, tmp_path):
    """kernel, initrd and command line taken from boot.ipxe as iPXE reads it."""
    pxe = media_dir / "pxe"
    kernel, initrd, cmdline = formats.parse_ipxe((pxe / "boot.ipxe").read_text())
    argv = ["-kernel", str(pxe / kernel), "-initrd", str(pxe / initrd), "-append", cmdline]
    console = boot_and_fetch(argv, "bios", "e1000e", tmp_path)
    assert f"{ds.MARK_BOOTED} initrd=initrd.img {CMDLINE}" in console


def test_qcow2_of_the_disk_is_the_disk(media_dir, tmp_path):
    """The qcow2 holds the same blocks as the raw disk that boots above."""
    q = tmp_path / "www.qcow2"
    formats.make_qcow2(media_dir / "www.img", q)
    subprocess.run(["qemu-img", "check", q], check=True, capture_output=True)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", media_dir / "www.img", q], check=True,
                   capture_output=True)


def test_two_guests_joined_by_a_socket(media_dir, tmp_path):
    """--net socket: two guests on one Ethernet carried by a host TCP
    connection (listen/connect), no tap, no bridge; the second fetches the
    first's page. Sockets live in a private namespace."""
    import hashlib
    pxe = media_dir / "pxe"
    with netns.namespace("k") as ns:
        port = 6000 + os.getpid() % 1000
        base = ["-M", "q35", "-m", "256", *ds.accel_args(), "-nodefaults", "-display", "none", "-serial", "stdio",
                "-no-reboot", "-kernel", str(pxe / "vmlinuz"), "-initrd", str(pxe / "initrd.img")]
        a = [QEMU, *base, "-append", "console=ttyS0,115200 panic=-1 haboob.ip=198.18.51.1/24",
             *pt.net_args(pt.parse_net(f"socket:listen=127.0.0.1:{port}"), "e1000", "52:54:00:00:51:01")]
        b = [QEMU, *base, "-append", "console=ttyS0,115200 panic=-1 haboob.ip=198.18.51.2/24 deploy.fetch=198.18.51.1",
             *pt.net_args(pt.parse_net(f"socket:connect=127.0.0.1:{port}"), "virtio", "52:54:00:00:51:02")]
        with ds.Console(ns.argv(a)) as ca:
            for _ in range(100):                      # B connects at start: A must listen first
                if f":{port}" in ns.run(["ss", "-ltn"], check=False).stdout:
                    break
                subprocess.run(["sleep", "0.1"])
            with ds.Console(ns.argv(b)) as cb:
                ca.wait_for(ds.MARK_READY, READY_TIMEOUT)
                line = cb.wait_for("DEPLOY-FETCHED", READY_TIMEOUT)
                assert line.split()[1] == hashlib.sha256(ds.PAGE).hexdigest()


@pytest.mark.skipif(not formats.secure_boot_available(), reason="shim-signed / grub-efi-amd64-signed missing")
def test_secure_boot_firmware_refuses_our_unsigned_grub(media_dir, tmp_path):
    """The Secure Boot rows mean something: the same firmware refuses the
    disk whose ESP holds our own (unsigned) GRUB build."""
    argv = [QEMU, "-M", "q35", "-m", "512", *ds.accel_args(), "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", *media.firmware_args("uefi-secure", tmp_path),
            *media.boot_args("disk", media_dir.parent / "own", name="www")]
    with ds.Console(argv) as con:
        con.wait_for("Access Denied", READY_TIMEOUT, partial=True)
        assert ds.MARK_BOOTED not in con.text


def test_address_typed_at_the_boot_menu(media_dir, tmp_path):
    """The second menu entry asks for the address and gateway on the serial
    console (GRUB's `read`) and boots with them instead of the built-in ones."""
    with netns.namespace("v") as ns, netns.tap(ns, f"{HOST}/24") as tap:
        argv = [QEMU, "-M", "q35", "-m", "512", *ds.accel_args(), "-nodefaults", "-display", "none",
                "-serial", "stdio", "-no-reboot", *media.boot_args("iso", media_dir),
                *pt.tap_args(tap, "e1000", "52:54:00:00:50:02")]
        with ds.Console(ns.argv(argv)) as con:
            con.wait_for("type the address at boot", READY_TIMEOUT, partial=True)
            con.send(b"\x0e")                    # Ctrl-N: next entry (stops the 1 s countdown)
            con.send(b"\r")
            con.wait_for("Address with prefix", 60, partial=True)
            con.send(b"198.18.50.1/24\r")
            con.wait_for("Gateway (", 60, partial=True)
            con.send(b"198.18.50.254\r")
            booted = con.wait_for(ds.MARK_BOOTED, READY_TIMEOUT)
            assert booted.endswith("panic=-1 haboob.ip=198.18.50.1/24 haboob.gw=198.18.50.254"), booted
            con.wait_for(ds.MARK_READY, READY_TIMEOUT)
            got = ns.run(["curl", "-sS", "--max-time", "20", "--retry", "5", "--retry-all-errors",
                          f"http://{GUEST}/index.html"], text=False).stdout
            assert got == ds.PAGE
