"""Deploy formats: hybrid ISO, raw GPT disk, PXE folder, qcow2, and the
cloud formats of cloud.py (aws, gce, azure, kubevirt, openstack) made from
the same raw disk.

Theory of operation: every writer takes the three boot inputs the builder
produces (vmlinuz, initrd.img and the kernel command line) and writes one
artifact, through a temporary name renamed into place, so a failed step
leaves nothing half-written. All of them boot the same kernel and initrd
with GRUB 2 as the loader, with the same `grub.cfg` (see `grub_cfg`): a
menu on both the screen and the first serial port, a default entry with the
built-in command line, and a second entry that asks for the address.

- ISO (`make_iso`): the standard GRUB hybrid that grub-mkrescue makes,
  built step by step (grub-mkimage, mtools, xorriso) so that it is
  reproducible: El Torito for BIOS (i386-pc) and UEFI (an embedded FAT
  image with BOOTX64.EFI), GRUB's hybrid MBR and an EFI partition entry so
  that the same file written to a USB stick boots too. xorriso and mtools
  honour SOURCE_DATE_EPOCH, which fixes every date.
- Raw disk (`make_disk`): done here by hand, without loop devices or root,
  as grub-install + grub-bios-setup would do it on a real disk. A GPT
  (UEFI 2.10 §5.3) written by `_gpt`, with partition 1 a 1 MiB "BIOS boot"
  partition holding GRUB's i386-pc core.img, and partition 2 a FAT32 EFI
  system partition (made by mformat/mcopy from mtools) with
  EFI/BOOT/BOOTX64.EFI (the removable-media path, UEFI §3.5.1.1), the
  kernel, the initrd and boot/grub/grub.cfg. Sector 0 is GRUB's boot.img
  patched with core.img's location (`_patch_boot_img`), with the
  protective MBR entry of the GPT in its partition table, so BIOS machines
  boot it as well. The ESP is FAT, so the address can be changed for good by
  editing boot/grub/grub.cfg on the stick from any OS.
- qcow2 (`make_qcow2`): `qemu-img convert` of the raw disk.
- PXE (`make_pxe`): the kernel, the initrd and an iPXE script whose
  `kernel` line carries the command line.

Reproducibility: given the same inputs and SOURCE_DATE_EPOCH, the disk, the
qcow2 and the PXE folder are byte-identical (GUIDs and the FAT serial are
derived from the inputs; grub-mkimage output is deterministic). The ISO is
too; `REPRODUCIBLE` records what the tests verify.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from .context import sha256_file
from .errors import BuildError

from .cloud import CLOUD_FORMATS

FORMATS = ("iso", "img", "pxe", "qcow2")          # 'all'
KNOWN = FORMATS + CLOUD_FORMATS                    # 'cloud' is the second part
NEEDS_DISK = ("img", "qcow2") + CLOUD_FORMATS
NEEDS_QCOW2 = ("qcow2", "kubevirt", "openstack")

# Which formats come out byte-identical from identical inputs (checked by
# tests/test_deploy_formats.py and tests/test_deploy_cloud.py, which build each twice).
REPRODUCIBLE = {f: True for f in KNOWN}

GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")

# tool or file -> the Debian package that provides it
_TOOLS = {
    "iso": [("grub-mkimage", "grub-common"), ("xorriso", "xorriso"), ("mformat", "mtools"),
            ("mcopy", "mtools"), ("mmd", "mtools"), (GRUB_PC_DIR, "grub-pc-bin"),
            (GRUB_EFI_DIR, "grub-efi-amd64-bin")],
    "img": [("grub-mkimage", "grub-common"), ("mformat", "mtools"), ("mcopy", "mtools"),
            ("mmd", "mtools"), (GRUB_PC_DIR, "grub-pc-bin"), (GRUB_EFI_DIR, "grub-efi-amd64-bin")],
    "qcow2": [("grub-mkimage", "grub-common"), ("mformat", "mtools"), ("mcopy", "mtools"),
              ("mmd", "mtools"), (GRUB_PC_DIR, "grub-pc-bin"), (GRUB_EFI_DIR, "grub-efi-amd64-bin"),
              ("qemu-img", "qemu-utils")],
    "pxe": [],
}
for _f in CLOUD_FORMATS:
    _TOOLS[_f] = list(_TOOLS["img"])
_TOOLS["gce"] += [("tar", "tar"), ("gzip", "gzip")]
_TOOLS["azure"] += [("qemu-img", "qemu-utils")]
_TOOLS["kubevirt"] += [("qemu-img", "qemu-utils")]
_TOOLS["openstack"] += [("qemu-img", "qemu-utils")]

# GRUB modules built into the disk's core images. Everything grub.cfg uses
# is built in, so the disk needs no module folder; grub-mkimage adds the
# dependencies (moddep.lst).
_GRUB_COMMON = ["part_gpt", "part_msdos", "fat", "normal", "linux", "echo", "serial", "terminal",
                "configfile", "read", "test", "search", "search_fs_file", "sleep", "reboot", "halt",
                "ls", "cat"]
_GRUB_PC_MODULES = ["biosdisk"] + _GRUB_COMMON
_GRUB_EFI_MODULES = ["efi_gop", "efi_uga", "all_video"] + _GRUB_COMMON

ESP_MIN = 64 << 20        # FAT32 needs >= 65525 clusters; 64 MiB keeps 512-byte clusters valid
ALIGN = 1 << 20           # partitions start on 1 MiB boundaries
SECTOR = 512


class FormatError(BuildError):
    """A deploy format cannot be written (missing tool, bad option)."""


# ---------------------------------------------------------------- options

def parse_formats(text: str) -> list[str]:
    """'iso,img' / 'all' / 'cloud' / 'none' -> the list, in canonical order
    ('all' is the four local formats, 'cloud' the cloud ones; both may be
    combined with names: 'all,aws').

    qcow2 and the cloud formats are made from the raw disk, so asking for
    them builds the disk in a scratch place if 'img' itself was not asked for."""
    text = (text or "").strip().lower()
    if text in ("", "none"):
        return []
    wanted = []
    for w in (w.strip() for w in text.split(",") if w.strip()):
        wanted += list(FORMATS) if w == "all" else list(CLOUD_FORMATS) if w == "cloud" else [w]
    bad = [w for w in wanted if w not in KNOWN]
    if bad:
        raise FormatError(f"--formats: unknown format {', '.join(map(repr, bad))}; "
                          f"known: {', '.join(KNOWN)}, or 'all' / 'cloud' / 'none'")
    return [f for f in KNOWN if f in wanted]


def missing_tools(formats) -> list[str]:
    """Human-readable list of what is missing for these formats ('' if none)."""
    out = []
    for fmt in formats:
        for tool, package in _TOOLS[fmt]:
            present = tool.is_dir() if isinstance(tool, Path) else shutil.which(tool) is not None
            item = f"{tool} (Debian package {package})"
            if not present and item not in out:
                out.append(item)
    return out


def check_tools(formats) -> None:
    """Raise FormatError before anything is built if a tool is missing."""
    missing = missing_tools(formats)
    if missing:
        raise FormatError(f"--formats {','.join(formats)}: missing {'; '.join(missing)}. "
                          f"Install them (apt-get install ...) or leave those formats out")


# ---------------------------------------------------------------- tools

def _run(argv, *, what: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """The one subprocess wrapper here: failure -> FormatError naming the step."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        proc = subprocess.run([str(a) for a in argv], capture_output=True, env=full_env, cwd=cwd)
    except FileNotFoundError:
        raise FormatError(f"{what}: the tool {str(argv[0])!r} is not installed") from None
    if proc.returncode != 0:
        err = [l for l in proc.stderr.decode(errors="replace").splitlines() if l.strip()]
        # xorriso ends with a generic "aborting" line; the cause is the FAILURE/SORRY before it
        causes = [l for l in err if any(k in l for k in ("FAILURE", "SORRY", "rror")) and "aborting" not in l]
        tail = (causes or err or [f"exit status {proc.returncode}"])[-1].strip()
        raise FormatError(f"{what} failed ({shlex.join(str(a) for a in argv[:3])} ...): {tail}")
    return proc


def _epoch_env(epoch: int) -> dict:
    # TZ=UTC: mtools converts the epoch to local FAT time; keep it the same everywhere.
    return {"SOURCE_DATE_EPOCH": str(int(epoch)), "TZ": "UTC"}


def _replace(tmp: Path, out: Path) -> None:
    os.replace(tmp, out)


# ---------------------------------------------------------------- GRUB config

def strip_params(cmdline: str, *names: str) -> str:
    """The command line without the given `name=` parameters."""
    keep = [w for w in cmdline.split() if not any(w.startswith(n + "=") for n in names)]
    return " ".join(keep)


def param(cmdline: str, name: str) -> str | None:
    for w in cmdline.split():
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def grub_cfg(name: str, cmdline: str, *, kernel: str = "/haboob/vmlinuz",
             initrd: str = "/haboob/initrd.img", timeout: int = 3, ask_on_efi: bool = True) -> str:
    """The menu shared by ISO and disk.

    Entry 1 boots the built-in command line. Entry 2 asks for the address
    and gateway (GRUB's `read`), so one stick serves any network. At the
    menu, 'e' edits an entry's `linux` line (e.g. haboob.ip=), Ctrl-x boots
    it. Output goes to both the screen and the first serial port (115200 8N1)."""
    if any(c in cmdline for c in "\n\"'$\\;{}"):
        raise FormatError(f"kernel command line has characters GRUB would interpret: {cmdline!r}")
    ip = param(cmdline, "haboob.ip") or "none"
    base = strip_params(cmdline, "haboob.ip", "haboob.gw")
    title = f"Haboob {name} ({ip})"
    # Debian's signed GRUB (Secure Boot) has no `read` command and loads no
    # modules: there the second entry is only offered when booted by BIOS.
    guard, unguard = ("", "") if ask_on_efi else ('if [ "$grub_platform" = "pc" ]; then\n', "fi\n")
    return f"""\
# Haboob {name}: boot menu (GRUB 2). Edit haboob.ip= / haboob.gw= below to
# change the address for good; at the menu, 'e' edits an entry for one boot.
serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1
terminal_input console serial
terminal_output console serial
set timeout={int(timeout)}
set default=0

menuentry "{title}" --id haboob {{
    echo "Haboob: loading {name} ..."
    linux {kernel} {cmdline}
    initrd {initrd}
}}

{guard}menuentry "Haboob {name}: type the address at boot" --id haboob-ask {{
    echo -n "Address with prefix, e.g. 198.18.0.1/24, or dhcp: "
    read hb_ip
    echo -n "Gateway (empty for none): "
    read hb_gw
    if [ -n "$hb_gw" ]; then set hb_gwarg="haboob.gw=$hb_gw"; else set hb_gwarg=""; fi
    echo "Haboob: loading {name} with haboob.ip=$hb_ip $hb_gwarg ..."
    linux {kernel} {base} haboob.ip=$hb_ip $hb_gwarg
    initrd {initrd}
}}
{unguard}"""


def _volume_id(name: str) -> str:
    """ISO 9660 volume id: d-characters, at most 32 (ECMA-119 §8.4.13)."""
    vid = "".join(c if c.isalnum() else "_" for c in f"HABOOB_{name}".upper())
    return vid[:32]


# ---------------------------------------------------------------- ISO

def make_iso(vmlinuz, initrd, cmdline: str, out, *, name: str, epoch: int, timeout: int = 3) -> Path:
    """A hybrid BIOS+UEFI ISO (CD and USB stick) booting vmlinuz+initrd.

    This is what grub-mkrescue makes, done step by step because
    grub-mkrescue stamps the volume with the current time (the
    --modification-date it passes to xorriso, which its core images also
    search for), so its output is never reproducible. Here both core
    images carry all modules they need and find the ISO by a marker file
    named after the content (`search --file`), and xorriso gets every date
    from SOURCE_DATE_EPOCH."""
    out = Path(out)
    vmlinuz, initrd = Path(vmlinuz), Path(initrd)
    seed = _seed(vmlinuz, initrd, cmdline, name, epoch)
    marker = f"/haboob/id-{seed.hex()[:16]}"
    with tempfile.TemporaryDirectory(prefix="haboob-iso-") as tmpd:
        tmp = Path(tmpd)
        root = tmp / "root"
        (root / "boot/grub").mkdir(parents=True)
        (root / "haboob").mkdir()
        shutil.copyfile(vmlinuz, root / "haboob/vmlinuz")
        shutil.copyfile(initrd, root / "haboob/initrd.img")
        (root / marker.lstrip("/")).write_text(f"Haboob {name}\n")
        (root / "boot/grub/grub.cfg").write_text(grub_cfg(name, cmdline, timeout=timeout))
        early = tmp / "early.cfg"
        early.write_text(f"search --no-floppy --file --set=root {marker}\nset prefix=($root)/boot/grub\n")
        env = _epoch_env(epoch)
        eltorito = root / "boot/grub/eltorito.img"
        _run(["grub-mkimage", "-O", "i386-pc-eltorito", "-d", GRUB_PC_DIR, "-o", eltorito, "-c", early,
              "-p", "/boot/grub", "biosdisk", "iso9660", *_GRUB_PC_MODULES],
             what="GRUB BIOS El Torito image", env=env)
        efi = tmp / "BOOTX64.EFI"
        _run(["grub-mkimage", "-O", "x86_64-efi", "-d", GRUB_EFI_DIR, "-o", efi, "-c", early,
              "-p", "/boot/grub", "iso9660", *_GRUB_EFI_MODULES], what="GRUB UEFI image", env=env)
        # The El Torito UEFI image: a small FAT holding the removable-media path.
        efi_img = root / "boot/grub/efi.img"
        _make_fat(efi_img, -(-(efi.stat().st_size + (256 << 10)) // (64 << 10)) * (64 << 10),
                  {"/EFI/BOOT/BOOTX64.EFI": efi}, label="HABOOB_EFI",
                  serial=int.from_bytes(seed[4:8], "little"), epoch=epoch, fat32=False)
        for p in [root, *root.rglob("*")]:
            os.utime(p, (epoch, epoch), follow_symlinks=False)
        date = time.strftime("%Y%m%d%H%M%S00", time.gmtime(epoch))
        tmp_out = out.with_name(f".{out.name}.tmp")
        try:
            # As grub-mkrescue calls it (minus the HFS+ parts for old Macs):
            # El Torito BIOS + UEFI entries, GRUB's hybrid MBR (boot from a
            # USB stick under BIOS), and an MBR/GPT partition pointing at
            # efi.img (boot from a USB stick under UEFI).
            _run(["xorriso", "-as", "mkisofs", "-graft-points", "--modification-date=" + date,
                  "-volid", _volume_id(name),
                  "-b", "boot/grub/eltorito.img", "-no-emul-boot", "-boot-load-size", "4",
                  "-boot-info-table", "--grub2-boot-info",
                  "--grub2-mbr", GRUB_PC_DIR / "boot_hybrid.img",
                  "--efi-boot", "boot/grub/efi.img", "-efi-boot-part", "--efi-boot-image",
                  "--protective-msdos-label", "-o", tmp_out, "-r", root],
                 what="ISO (xorriso)", env=env)
            _replace(tmp_out, out)
        finally:
            tmp_out.unlink(missing_ok=True)
    return out


def _seed(vmlinuz: Path, initrd: Path, cmdline: str, name: str, epoch: int) -> bytes:
    """A digest of everything that goes into a medium: the source of its
    GUIDs, FAT serials and ISO marker, so they are reproducible and unique."""
    h = hashlib.sha256()
    for p in (vmlinuz, initrd):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(f"\0{cmdline}\0{name}\0{epoch}".encode())
    return h.digest()


# ---------------------------------------------------------------- raw disk

# Secure Boot: Microsoft-signed shim (Debian shim-signed) chain-loading
# Debian-signed GRUB (grub-efi-amd64-signed), which loads Debian's signed
# kernel. The signed GRUB is a fixed image: it finds its root by the file
# /.disk/info and reads /boot/grub/grub.cfg.
SIGNED = {"shim": Path("/usr/lib/shim/shimx64.efi.signed"),
          "grub": Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"),
          "mokmanager": Path("/usr/lib/shim/mmx64.efi.signed")}


def secure_boot_available() -> bool:
    return all(p.is_file() for p in SIGNED.values())


BIOS_BOOT_TYPE = uuid.UUID("21686148-6449-6E6F-744E-656564454649")   # "Hah!IdontNeedEFI"
ESP_TYPE = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")


@dataclass
class Part:
    first: int            # LBA
    last: int             # LBA, inclusive
    type: uuid.UUID
    guid: uuid.UUID
    name: str


def _derived_uuid(seed: bytes, what: str) -> uuid.UUID:
    """A random-looking but reproducible UUID (version 4 layout, RFC 9562 §5.4)."""
    return uuid.UUID(bytes=hashlib.sha256(seed + what.encode()).digest()[:16], version=4)


def _gpt(total_sectors: int, parts: list[Part], disk_guid: uuid.UUID) -> tuple[bytes, bytes, bytes]:
    """(protective MBR partition table bytes 446..512, primary LBA1..33, backup entries+header).

    UEFI 2.10 §5.2.3 (protective MBR), §5.3.2 (header), §5.3.3 (entries):
    128 entries of 128 bytes; CRC32s over the entry array and the header."""
    entries = bytearray(128 * 128)
    for i, p in enumerate(parts):
        struct.pack_into("<16s16sQQQ72s", entries, i * 128, p.type.bytes_le, p.guid.bytes_le,
                         p.first, p.last, 0, p.name.encode("utf-16-le")[:72])
    entries_crc = zlib.crc32(entries)
    last = total_sectors - 1

    def header(my_lba: int, alt_lba: int, entries_lba: int) -> bytes:
        fields = [b"EFI PART", 0x00010000, 92, 0, 0, my_lba, alt_lba, 34, last - 33,
                  disk_guid.bytes_le, entries_lba, 128, 128, entries_crc]
        fmt = "<8sIIIIQQQQ16sQIII"
        crc = zlib.crc32(struct.pack(fmt, *fields))
        fields[3] = crc
        return struct.pack(fmt, *fields).ljust(SECTOR, b"\0")

    primary = header(1, last, 2) + bytes(entries)
    backup = bytes(entries) + header(last, 1, last - 32)
    size = min(total_sectors - 1, 0xFFFFFFFF)
    pmbr = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, size)
    table = pmbr + bytes(48) + b"\x55\xaa"
    return table, primary, backup


def _patch_boot_img(boot_img: bytes, core_lba: int) -> bytes:
    """GRUB's boot.img as grub-bios-setup installs it on a hard disk
    (grub-core/boot/i386/pc/boot.S, include/grub/i386/pc/boot.h)."""
    b = bytearray(boot_img[:SECTOR])
    if len(b) != SECTOR or b[0x1fe:0x200] != b"\x55\xaa":
        raise FormatError("GRUB boot.img is not a 512-byte boot sector")
    struct.pack_into("<Q", b, 0x5c, core_lba)   # GRUB_BOOT_MACHINE_KERNEL_SECTOR
    b[0x64] = 0xff                              # GRUB_BOOT_MACHINE_BOOT_DRIVE: use the drive BIOS gives in DL
    b[0x66:0x68] = b"\x90\x90"                  # GRUB_BOOT_MACHINE_DRIVE_CHECK: hard disk, trust DL
    return bytes(b[:0x1b8])                     # up to the NT disk signature; the table follows


def _patch_core_img(core: bytes, core_lba: int) -> bytes:
    """Point diskboot.img's blocklist (last 12 bytes of core.img's first
    sector: u64 start, u16 len, u16 segment) at the rest of core.img, which
    follows its first sector on disk."""
    c = bytearray(core)
    start, length, segment = struct.unpack_from("<QHH", c, SECTOR - 12)
    if segment != 0x820 or length != (len(core) + SECTOR - 1) // SECTOR - 1:
        raise FormatError("GRUB core.img has an unexpected blocklist (not i386-pc diskboot?)")
    struct.pack_into("<Q", c, SECTOR - 12, core_lba + 1)
    return bytes(c)


def _grub_images(tmp: Path, epoch: int) -> tuple[bytes, bytes]:
    """(i386-pc core.img, x86_64-efi BOOTX64.EFI) for the disk."""
    core, efi = tmp / "core.img", tmp / "BOOTX64.EFI"
    # BIOS: the disk GRUB booted from ('' = the BIOS boot drive), partition 2.
    _run(["grub-mkimage", "-O", "i386-pc", "-d", GRUB_PC_DIR, "-o", core,
          "-p", "(,gpt2)/boot/grub", *_GRUB_PC_MODULES], what="GRUB BIOS core image", env=_epoch_env(epoch))
    # UEFI: no device in the prefix = the partition the .EFI was loaded from.
    _run(["grub-mkimage", "-O", "x86_64-efi", "-d", GRUB_EFI_DIR, "-o", efi,
          "-p", "/boot/grub", *_GRUB_EFI_MODULES], what="GRUB UEFI image", env=_epoch_env(epoch))
    return core.read_bytes(), efi.read_bytes()


def _make_fat(path: Path, size: int, files: dict[str, Path], label: str, serial: int, epoch: int,
              fat32: bool = True) -> None:
    """A FAT image of `size` bytes holding files {'/dir/name': source};
    FAT32 for a disk's ESP (UEFI 2.10 §13.3.1.1), else what fits (FAT12/16)."""
    with open(path, "wb") as f:
        f.truncate(size)
    env = _epoch_env(epoch)
    # -F FAT32; -T total sectors, -h/-s nominal geometry (only used by BIOS
    # CHS fields); -N fixes the volume serial mformat would draw at random.
    _run(["mformat", "-i", path, *(["-F"] if fat32 else []), "-T", size // SECTOR, "-h", "64", "-s", "32",
          "-N", f"{serial:08x}", "-v", label, "::"], what="ESP (mformat)", env=env)
    dirs = sorted({str(Path(p).parent) for p in files} - {"/"})
    made = set()
    for d in dirs:
        parts = Path(d).parts[1:]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            if sub not in made:
                _run(["mmd", "-i", path, "::" + sub], what=f"ESP (mmd {sub})", env=env)
                made.add(sub)
    for dest, src in sorted(files.items()):
        _run(["mcopy", "-i", path, src, "::" + dest], what=f"ESP (mcopy {dest})", env=env)


def make_disk(vmlinuz, initrd, cmdline: str, out, *, name: str, epoch: int, timeout: int = 3,
              extra_mib: int = 8, secure_boot: str = "auto", size_multiple: int = ALIGN) -> Path:
    """A raw GPT disk image bootable by BIOS and UEFI firmware, its size a
    multiple of size_multiple (1 MiB; Compute Engine wants whole GiB).

    secure_boot: "on" puts the signed shim + GRUB chain on the ESP (boots
    with Secure Boot enabled, with Debian's signed kernel); "off" our own
    GRUB build; "auto" the signed chain when its packages are installed."""
    out = Path(out)
    if secure_boot not in ("auto", "on", "off"):
        raise FormatError(f"secure_boot={secure_boot!r}: use auto, on or off")
    signed = secure_boot == "on" or (secure_boot == "auto" and secure_boot_available())
    if signed and not secure_boot_available():
        missing = ", ".join(str(p) for p in SIGNED.values() if not p.is_file())
        raise FormatError(f"Secure Boot disk: missing {missing} (Debian packages shim-signed, "
                          f"grub-efi-amd64-signed)")
    vmlinuz, initrd = Path(vmlinuz), Path(initrd)
    seed = _seed(vmlinuz, initrd, cmdline, name, epoch)

    with tempfile.TemporaryDirectory(prefix="haboob-disk-") as tmpd:
        tmp = Path(tmpd)
        core, efi = _grub_images(tmp, epoch)
        (tmp / "BOOTX64.EFI").write_bytes(efi)
        (tmp / "grub.cfg").write_text(grub_cfg(name, cmdline, timeout=timeout, ask_on_efi=not signed))
        if signed:
            efi_files = {"/EFI/BOOT/BOOTX64.EFI": SIGNED["shim"], "/EFI/BOOT/grubx64.efi": SIGNED["grub"],
                         "/EFI/BOOT/mmx64.efi": SIGNED["mokmanager"], "/.disk/info": tmp / "info"}
            (tmp / "info").write_text(f"Haboob {name}\n")
            efi = b"".join(p.read_bytes() for p in efi_files.values())      # for the size estimate
        else:
            efi_files = {"/EFI/BOOT/BOOTX64.EFI": tmp / "BOOTX64.EFI"}

        payload = vmlinuz.stat().st_size + initrd.stat().st_size + len(efi) + 4096
        esp_size = max(ESP_MIN, -(-(payload * 11 // 10 + (extra_mib << 20)) // ALIGN) * ALIGN)
        bios_first, bios_size = ALIGN // SECTOR, ALIGN // SECTOR
        if len(core) > bios_size * SECTOR:
            raise FormatError(f"GRUB core.img is {len(core)} bytes, more than the 1 MiB BIOS boot partition")
        esp_first = bios_first + bios_size
        esp_sectors = esp_size // SECTOR
        total = esp_first + esp_sectors + ALIGN // SECTOR     # 1 MiB tail for the backup GPT
        if size_multiple % ALIGN:
            raise FormatError(f"disk size multiple {size_multiple} is not a whole number of MiB")
        total = -(-total * SECTOR // size_multiple) * size_multiple // SECTOR
        parts = [Part(bios_first, bios_first + bios_size - 1, BIOS_BOOT_TYPE,
                      _derived_uuid(seed, "bios-boot"), "BIOS boot"),
                 Part(esp_first, esp_first + esp_sectors - 1, ESP_TYPE,
                      _derived_uuid(seed, "esp"), "EFI system")]
        table, primary, backup = _gpt(total, parts, _derived_uuid(seed, "disk"))

        esp = tmp / "esp.img"
        _make_fat(esp, esp_size, {
            **efi_files,
            "/boot/grub/grub.cfg": tmp / "grub.cfg",
            "/haboob/vmlinuz": vmlinuz,
            "/haboob/initrd.img": initrd,
        }, label="HABOOB", serial=int.from_bytes(seed[:4], "little"), epoch=epoch)

        mbr = _patch_boot_img((GRUB_PC_DIR / "boot.img").read_bytes(), bios_first)
        mbr = mbr + bytes(0x1be - len(mbr)) + table       # disk signature 0, then the PMBR table
        tmp_out = out.with_name(f".{out.name}.tmp")
        try:
            with open(tmp_out, "wb") as f:
                f.truncate(total * SECTOR)                 # sparse: holes read as zeros
                f.write(mbr)
                f.write(primary)                           # LBA 1..33
                f.seek(bios_first * SECTOR)
                f.write(_patch_core_img(core, bios_first))
                f.seek(esp_first * SECTOR)
                with open(esp, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
                f.seek((total - 33) * SECTOR)
                f.write(backup)                            # LBA total-33 .. total-1
            _replace(tmp_out, out)
        finally:
            tmp_out.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- qcow2, PXE

def make_qcow2(raw, out) -> Path:
    """qcow2 (compressed clusters) of the raw disk, for OpenStack, KubeVirt..."""
    out = Path(out)
    tmp_out = out.with_name(f".{out.name}.tmp")
    try:
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", raw, tmp_out],
             what="qcow2 (qemu-img convert)")
        _replace(tmp_out, out)
    finally:
        tmp_out.unlink(missing_ok=True)
    return out


def ipxe_script(name: str, cmdline: str) -> str:
    """iPXE script; file names are relative to the script's own URL.

    `initrd=initrd.img` on the kernel line lets the kernel's EFI stub find
    the initrd when iPXE runs under UEFI; under BIOS the kernel ignores it."""
    if "\n" in cmdline:
        raise FormatError("kernel command line contains a newline")
    return (f"#!ipxe\n"
            f"# Haboob {name}: chain this script (e.g. `chain http://SERVER/pxe/boot.ipxe`);\n"
            f"# edit haboob.ip= / haboob.gw= below to set the address.\n"
            f"echo Haboob: loading {name} ...\n"
            f"kernel vmlinuz initrd=initrd.img {cmdline}\n"
            f"initrd initrd.img\n"
            f"boot\n")


def parse_ipxe(text: str) -> tuple[str, str, str]:
    """(kernel file, initrd file, command line) as iPXE reads the script:
    `kernel FILE ARGS...` (options before FILE start with '-'), `initrd FILE`."""
    kernel = initrd = cmdline = None
    lines = text.splitlines()
    if not lines or not lines[0].startswith("#!ipxe"):
        raise FormatError("not an iPXE script (no #!ipxe first line)")
    for line in lines[1:]:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] in ("kernel", "chain", "imgexec") and len(words) > 1:
            args = [w for w in words[1:]]
            while args and args[0].startswith("-"):
                args.pop(0)
            kernel, cmdline = args[0], " ".join(args[1:])
        elif words[0] in ("initrd", "module"):
            args = [w for w in words[1:] if not w.startswith("-")]
            initrd = args[0]
    if kernel is None or initrd is None:
        raise FormatError("iPXE script has no kernel or no initrd line")
    return kernel, initrd, cmdline


def make_pxe(vmlinuz, initrd, cmdline: str, out_dir, *, name: str, epoch: int | None = None) -> Path:
    """out_dir/{vmlinuz, initrd.img, boot.ipxe}, written to a temporary
    folder renamed into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        shutil.copyfile(vmlinuz, tmp / "vmlinuz")
        shutil.copyfile(initrd, tmp / "initrd.img")
        (tmp / "boot.ipxe").write_text(ipxe_script(name, cmdline))
        if epoch is not None:
            for p in (*tmp.iterdir(), tmp):
                os.utime(p, (epoch, epoch))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------- all at once

def write_formats(formats, folder, *, name: str, vmlinuz, initrd, cmdline: str, epoch: int,
                  log=lambda msg: None) -> dict:
    """Write the asked formats into `folder`; return the manifest's
    "formats" entry: {fmt: {"files": {relpath: {"size", "sha256"}}, "reproducible"}},
    the cloud formats with their "platform" facts (NIC driver, commands)."""
    from . import cloud
    folder = Path(folder)
    check_tools(formats)
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[Path]] = {}
    scratch: list[Path] = []            # intermediate files not asked for, removed at the end
    try:
        if "iso" in formats:
            log(f"format iso: {name}.iso")
            made["iso"] = [make_iso(vmlinuz, initrd, cmdline, folder / f"{name}.iso", name=name, epoch=epoch)]
        raw = None
        if any(f in NEEDS_DISK for f in formats):
            log(f"format img: {name}.img")
            target = folder / f"{name}.img" if "img" in formats else folder / f".{name}.img.scratch"
            raw = make_disk(vmlinuz, initrd, cmdline, target, name=name, epoch=epoch)
            if "img" in formats:
                made["img"] = [raw]
            else:
                scratch.append(raw)
        qcow2 = None
        if any(f in NEEDS_QCOW2 for f in formats):
            log(f"format qcow2: {name}.qcow2")
            wanted = "qcow2" in formats or "openstack" in formats
            qcow2 = make_qcow2(raw, folder / (f"{name}.qcow2" if wanted else f".{name}.qcow2.scratch"))
            if "qcow2" in formats:
                made["qcow2"] = [qcow2]
            if not wanted:
                scratch.append(qcow2)
        seed = _seed(Path(vmlinuz), Path(initrd), cmdline, name, epoch)
        for fmt in (f for f in cloud.CLOUD_FORMATS if f in formats):
            out = folder / cloud.PLATFORMS[fmt].file.format(name=name)
            log(f"format {fmt}: {out.name}")
            if fmt == "aws":
                files = [cloud.make_aws(raw, out)]
            elif fmt == "gce":
                # disk.raw must be a whole number of GiB: the same disk, the backup GPT at the GiB end
                big = make_disk(vmlinuz, initrd, cmdline, folder / f".{name}.gce.scratch", name=name,
                                epoch=epoch, size_multiple=cloud.GIB)
                scratch.append(big)
                files = [cloud.make_gce(big, out, epoch=epoch)]
            elif fmt == "azure":
                files = [cloud.make_azure(raw, out, epoch=epoch, seed=seed)]
            elif fmt == "kubevirt":
                files = [cloud.make_kubevirt(qcow2, out, name=name, epoch=epoch)]
            else:                       # openstack: the qcow2 itself
                files = [qcow2]
            if cloud.PLATFORMS[fmt].template:
                files.append(cloud.write_template(fmt, folder, name))
            made[fmt] = files
        if "pxe" in formats:
            log("format pxe: pxe/")
            d = make_pxe(vmlinuz, initrd, cmdline, folder / "pxe", name=name, epoch=epoch)
            made["pxe"] = [d / "vmlinuz", d / "initrd.img", d / "boot.ipxe"]
    finally:
        for p in scratch:
            p.unlink(missing_ok=True)
    out = {}
    for fmt, files in made.items():
        out[fmt] = {"files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                              for p in files},
                    "reproducible": REPRODUCIBLE[fmt]}
        if fmt in NEEDS_DISK:
            # which UEFI loader the disk carries (make_disk's secure_boot="auto")
            out[fmt]["uefi_secure_boot"] = secure_boot_available()
        if fmt in cloud.PLATFORMS:
            out[fmt]["platform"] = {"nic_driver": cloud.PLATFORMS[fmt].nic, "boot": ["bios", "uefi"],
                                    "commands": cloud.commands(fmt, name, "IMAGE_DIR")}
    return out


# ---------------------------------------------------------------- the build step

def media_cmdline(cmdline: str) -> str:
    """The command line for bare-metal media: kernel messages on the screen
    and the first serial port; the last console= (the serial port, as under
    QEMU) is /dev/console, where PID 1 writes."""
    words = [w for w in cmdline.split() if not w.startswith("console=")]
    return " ".join(["console=tty0", "console=ttyS0,115200", *words])


def step(ctx) -> None:
    """Build step (haboob_build.steps, after "initramfs"): the formats in
    ctx.options.formats, written beside vmlinuz/initrd.img; their names,
    sizes and sha256 go to the manifest under "formats"."""
    fmts = list(getattr(ctx.options, "formats", ()) or ())
    if not fmts:
        return
    cmdline = media_cmdline((ctx.work / "cmdline").read_text().strip())
    ctx.facts["formats"] = write_formats(fmts, ctx.work, name=ctx.options.name, vmlinuz=ctx.work / "vmlinuz",
                                         initrd=ctx.work / "initrd.img", cmdline=cmdline, epoch=ctx.epoch,
                                         log=ctx.log)
    ctx.facts["formats_cmdline"] = cmdline
    ctx.facts["formats_tools"] = tool_versions(fmts)


def tool_versions(fmts) -> dict:
    """The versions of the tools that wrote the formats: inputs of the
    bytes as much as the kernel is (another GRUB, another image)."""
    probes = {"grub-mkimage": ["grub-mkimage", "--version"], "xorriso": ["xorriso", "-version"],
              "mtools": ["mformat", "--version"], "qemu-img": ["qemu-img", "--version"],
              "tar": ["tar", "--version"], "gzip": ["gzip", "--version"]}
    used = {"iso": ["grub-mkimage", "xorriso", "mtools"], "img": ["grub-mkimage", "mtools"],
            "qcow2": ["grub-mkimage", "mtools", "qemu-img"], "pxe": [],
            "aws": ["grub-mkimage", "mtools"], "gce": ["grub-mkimage", "mtools", "tar", "gzip"],
            "azure": ["grub-mkimage", "mtools", "qemu-img"], "kubevirt": ["grub-mkimage", "mtools", "qemu-img"],
            "openstack": ["grub-mkimage", "mtools", "qemu-img"]}
    out = {}
    for tool in sorted({t for f in fmts for t in used[f]}):
        try:
            proc = subprocess.run(probes[tool], capture_output=True, text=True, timeout=30)
            out[tool] = (proc.stdout or proc.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out[tool] = "unknown"
    return out
