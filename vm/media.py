"""Firmware and boot medium for `vm boot --firmware bios|uefi|uefi-secure --boot kernel|disk|iso`.

Theory of operation: `--boot kernel` hands QEMU the image's vmlinuz,
initrd.img and cmdline directly (-kernel, fast, for development). `disk`
and `iso` boot NAME.img / NAME.iso as a machine would: the firmware
(SeaBIOS, QEMU's default, or OVMF for UEFI) finds the boot loader on the
medium, and GRUB loads the kernel with the command line from its grub.cfg.
The medium is attached read-only in spirit (snapshot=on: guest writes go
to a temporary overlay), so booting never changes the image. For UEFI,
OVMF's code is mapped read-only and a private copy of its variable store
is made per boot (OVMF writes boot entries into it).

`--config DIR` (config_args) writes DIR as a configuration volume
(haboob_build/configvol.py, the same writer as `build.py config-volume`)
into the boot's work folder and attaches it read-only as a virtio disk,
which the appliance reads at boot (appliance/configvol.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

BOOTS = ("kernel", "disk", "iso")
FIRMWARES = ("bios", "uefi", "uefi-secure")

# Debian's ovmf package: 4 MiB flash layout first (bookworm's default), then the 2 MiB one.
OVMF_PAIRS = [
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
]
# Secure Boot: the SMM build of OVMF and a variable store with Microsoft's keys enrolled (Debian: ovmf).
OVMF_SECURE_PAIRS = [
    (Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")),
]


class MediaError(Exception):
    """A boot medium or firmware is missing; the message says what to do."""


def find_ovmf(pairs=OVMF_PAIRS) -> tuple[Path, Path]:
    for code, vars_ in pairs:
        if code.is_file() and vars_.is_file():
            return code, vars_
    raise MediaError("--firmware uefi: OVMF is not installed (looked for "
                     + ", ".join(str(c) for c, _ in pairs) + "); `apt-get install ovmf`")


def firmware_args(firmware: str, workdir: Path, pairs=OVMF_PAIRS) -> list[str]:
    """QEMU argv for the firmware; workdir receives the UEFI variable store copy."""
    if firmware == "bios":
        return []                                  # SeaBIOS is QEMU's built-in default
    if firmware not in ("uefi", "uefi-secure"):
        raise MediaError(f"--firmware {firmware}: unknown; known: {', '.join(FIRMWARES)}")
    secure = firmware == "uefi-secure"
    code, vars_ = find_ovmf(OVMF_SECURE_PAIRS if secure and pairs is OVMF_PAIRS else pairs)
    copy = Path(workdir) / "OVMF_VARS.fd"
    shutil.copyfile(vars_, copy)
    argv = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={copy}"]
    if secure:
        # the Secure Boot OVMF keeps its variables behind SMM: q35 with SMM, flash writable only from SMM
        argv = ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on", *argv]
    return argv


def image_name(image_dir: Path) -> str:
    """The image's NAME (the builder names the formats NAME.iso, NAME.img):
    from manifest.json, else the folder's name (images/NAME)."""
    import json
    try:
        return json.loads((Path(image_dir) / "manifest.json").read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return Path(image_dir).resolve().name


DISK_FORMATS = {".img": "raw", ".raw": "raw", ".qcow2": "qcow2", ".vhd": "vpc"}
DISK_BUSES = {"ide": "ide-hd", "nvme": "nvme,serial=haboob", "virtio": "virtio-blk-pci"}


def boot_args(boot: str, image_dir: Path, name: str | None = None, disk: Path | None = None,
              bus: str = "ide") -> list[str]:
    """QEMU argv that attaches the boot medium (disk or iso) of an image folder.
    (`--boot kernel` needs no medium: vm/qemu.py passes -kernel/-initrd itself.)
    disk: another disk file of the image (a cloud format: NAME-aws.raw,
    NAME-azure.vhd), its format from its suffix; bus: ide, nvme (as EC2
    Nitro attaches volumes) or virtio."""
    image_dir = Path(image_dir)
    name = name or image_name(image_dir)
    if bus not in DISK_BUSES:
        raise MediaError(f"disk bus {bus!r}: unknown; known: {', '.join(DISK_BUSES)}")
    if boot == "disk" and disk is not None:
        disk = Path(disk)
        if disk.suffix not in DISK_FORMATS or not disk.is_file():
            raise MediaError(f"--boot disk: {disk} is not a disk file ({', '.join(DISK_FORMATS)})")
        return ["-drive", f"if=none,id=hbdisk,format={DISK_FORMATS[disk.suffix]},file={disk},snapshot=on",
                "-device", f"{DISK_BUSES[bus]},drive=hbdisk,bootindex=1"]
    if boot == "disk":
        for f in (image_dir / f"{name}.img", image_dir / f"{name}.qcow2"):
            if f.is_file():
                fmt = "raw" if f.suffix == ".img" else "qcow2"
                return ["-drive", f"if=none,id=hbdisk,format={fmt},file={f},snapshot=on",
                        "-device", "ide-hd,drive=hbdisk,bootindex=1"]
        raise MediaError(f"--boot disk: {image_dir}/{name}.img missing; build it with "
                         f"`./build.py ... --formats img` (or all)")
    if boot == "iso":
        f = image_dir / f"{name}.iso"
        if not f.is_file():
            raise MediaError(f"--boot iso: {f} missing; build it with `./build.py ... --formats iso` (or all)")
        return ["-drive", f"if=none,id=hbcd,format=raw,media=cdrom,readonly=on,file={f}",
                "-device", "ide-cd,drive=hbcd,bootindex=1"]
    raise MediaError(f"--boot {boot}: unknown; known: {', '.join(BOOTS)}")


def config_volume_settings(folder: Path) -> dict:
    """The settings a configuration volume DIR carries (MediaError if the DIR is bad)."""
    from haboob_build import configvol
    from haboob_build.errors import BuildError
    try:
        return configvol.parse_files(configvol.LABEL, configvol.check_dir(Path(folder)))
    except BuildError as e:
        raise MediaError(str(e)) from None


def config_args(folder: Path, workdir: Path) -> list[str]:
    """QEMU argv attaching DIR, written as a configuration volume in workdir."""
    from haboob_build import configvol
    from haboob_build.errors import BuildError
    out = Path(workdir) / "config-volume.img"
    try:
        configvol.write(Path(folder), out)
    except BuildError as e:
        raise MediaError(str(e)) from None
    return ["-drive", f"if=none,id=hbcfg,format=raw,readonly=on,file={out}",
            "-device", "virtio-blk-pci,drive=hbcfg"]
