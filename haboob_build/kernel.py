"""The kernel: a stock distribution kernel used only as a driver host.

Theory of operation: by default the kernel is Debian's current
linux-image-amd64 (resolved to the versioned package through its Depends,
fetched and extracted once into the cache, see debs.py). `--kernel PATH`
takes any x86 bzImage instead; its release string is read from the
bzImage header (boot protocol: the kernel_version pointer at 0x20E) and
its modules directory is found beside it (`--modules DIR`, or
ROOT/lib/modules/RELEASE for a vmlinuz in ROOT/boot/, or
/lib/modules/RELEASE).

Only the modules the appliance needs go into the image: the root set
below, closed over their dependencies by analysis: modules.dep when the
directory has it (a depmod'ed tree), else each module's own .modinfo
`depends=` and `softdep=pre:` entries (a Debian package ships no
modules.dep: depmod runs at install time). Built-in modules
(modules.builtin) are skipped. Modules are stored uncompressed, so the
guest can load them with finit_module(2) whether or not the kernel has
in-kernel decompression, and listed in load order in /etc/haboob/modules.
"""
from __future__ import annotations

import lzma
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import debs, elf
from .context import Context
from .errors import BuildError

# The root set, by role. Dependencies are found by analysis, never listed.
NIC_DRIVERS = ["virtio_net"]            # a later issue adds physical NIC drivers here
BUSES = ["virtio_pci"]                  # virtio devices appear on PCI
PLATFORM = [
    "virtio_rng",                       # entropy before CPython and the stack need it
    "button",                           # ACPI power button: QMP system_powerdown
    "evdev",                            # ... whose key press PID 1 reads from /dev/input
]
# The configuration volume (appliance/configvol.py): its file systems always,
# the disk controllers only when PID 1 sees a device they drive (modalias).
FILESYSTEMS = ["vfat", "nls_cp437", "nls_ascii", "nls_utf8", "isofs"]
# Not ata_piix: QEMU's pc machine always has a PIIX IDE controller, and loading
# libata + ata_piix for it costs ~0.45 s per boot under TCG (measured); legacy
# IDE volumes are not read (attach the volume as virtio or SATA/AHCI).
STORAGE = ["virtio_blk", "ahci", "sd_mod", "sr_mod"]
ROOT_MODULES = BUSES + NIC_DRIVERS + PLATFORM + FILESYSTEMS + STORAGE

DEBIAN_META = "linux-image-amd64"


@dataclass
class Kernel:
    vmlinuz: Path
    release: str
    modules_dir: Path
    package: str | None = None
    package_version: str | None = None
    modules: list[tuple[str, Path]] = field(default_factory=list)   # (name, file) in load order
    needs: dict[str, list[str]] = field(default_factory=dict)       # name -> modules it needs (in the image)
    aliases: dict[str, list[str]] = field(default_factory=dict)     # name -> its modalias patterns


def norm(name: str) -> str:
    return name.replace("-", "_")


def release_of(vmlinuz: Path) -> str:
    """The release string of an x86 bzImage (Documentation/x86/boot.rst)."""
    try:
        head = vmlinuz.read_bytes()[:65536]
    except OSError as e:
        raise BuildError(f"--kernel {vmlinuz}: {e.strerror}") from None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise BuildError(f"--kernel {vmlinuz}: not an x86 Linux kernel image (no 'HdrS' boot header)")
    ptr = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    ver = head[ptr:ptr + 256].split(b"\0")[0].decode(errors="replace").split(" ")[0]
    if not re.match(r"^\d+\.\d+", ver):
        raise BuildError(f"--kernel {vmlinuz}: cannot read the kernel release from its header")
    return ver


def locate(ctx: Context, modules_dir: Path | None = None) -> Kernel:
    opt = ctx.options.kernel
    if opt is None:
        deps = [d for d in debs.depends(ctx, DEBIAN_META) if d.startswith("linux-image-")]
        if not deps:
            raise BuildError(f"{DEBIAN_META}: cannot find the versioned kernel package it depends on")
        _deb, root, ver = debs.fetch(ctx, deps[0])
        images = sorted((root / "boot").glob("vmlinuz-*"))
        if len(images) != 1:
            raise BuildError(f"{deps[0]}: expected one vmlinuz in the package, found {len(images)}")
        release = images[0].name[len("vmlinuz-"):]
        k = Kernel(images[0], release, root / "lib/modules" / release, deps[0], ver)
    else:
        vmlinuz = Path(opt)
        if not vmlinuz.is_file():
            raise BuildError(f"--kernel {vmlinuz}: no such file")
        release = release_of(vmlinuz)
        candidates = [modules_dir] if modules_dir else [
            vmlinuz.resolve().parent.parent / "lib/modules" / release,
            vmlinuz.resolve().parent / "modules" / release,
            Path("/lib/modules") / release]
        found = next((c for c in candidates if c and (c / "kernel").is_dir()), None)
        if found is None:
            raise BuildError(f"--kernel {vmlinuz}: no modules directory for release {release} "
                             f"(looked in {', '.join(str(c) for c in candidates)})")
        if modules_dir and not (modules_dir.name == release or (modules_dir / f"../{release}").exists()):
            ctx.log(f"note: modules directory {modules_dir} is not named after release {release}")
        k = Kernel(vmlinuz, release, found)
    return k


def _index(mdir: Path) -> dict[str, Path]:
    """module name -> file, for every module in the directory."""
    idx: dict[str, Path] = {}
    for p in sorted((mdir / "kernel").rglob("*.ko*")):
        stem = p.name.split(".ko")[0]
        idx[norm(stem)] = p
    if not idx:
        raise BuildError(f"modules directory {mdir}: contains no kernel modules")
    return idx


def _builtin(mdir: Path) -> set[str]:
    f = mdir / "modules.builtin"
    if not f.exists():
        return set()
    return {norm(Path(line.strip()).name.split(".ko")[0]) for line in f.read_text().splitlines() if line.strip()}


def _modules_dep(mdir: Path, idx: dict[str, Path]) -> dict[str, list[str]] | None:
    f = mdir / "modules.dep"
    if not f.exists():
        return None
    out = {}
    for line in f.read_text().splitlines():
        if ":" not in line:
            continue
        mod, deps = line.split(":", 1)
        out[norm(Path(mod).name.split(".ko")[0])] = [norm(Path(d).name.split(".ko")[0]) for d in deps.split()]
    return out


def _load(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".zst"):
        raise BuildError(f"{path}: zstd-compressed modules are not supported yet (decompress the tree first)")
    elif path.name.endswith(".gz"):
        import gzip
        data = gzip.decompress(data)
    return data


def resolve(ctx: Context, k: Kernel, roots: list[str] = ROOT_MODULES) -> list[tuple[str, bytes]]:
    """The root modules and their dependencies, in load order (dependencies first)."""
    idx = _index(k.modules_dir)
    builtin = _builtin(k.modules_dir)
    depmap = _modules_dep(k.modules_dir, idx)
    blobs: dict[str, bytes] = {}
    order: list[str] = []
    visiting: set[str] = set()

    def deps_of(name: str, info: dict) -> tuple[list[str], list[str]]:
        """(hard dependencies, soft pre-dependencies that exist)."""
        soft = []
        for s in info.get("softdep", []):
            m = re.search(r"pre:\s*(.*?)(\s+post:|$)", s)
            if m:
                soft += [norm(d) for d in m.group(1).split()]
        if depmap is not None:
            return depmap.get(name, []), soft
        return [norm(d) for v in info.get("depends", []) for d in v.split(",") if d], soft

    def visit(name: str, required_by: str | None) -> None:
        if name in blobs or name in builtin:
            return
        if name in visiting:
            raise BuildError(f"module {name}: dependency cycle")
        path = idx.get(name)
        if path is None:
            if required_by and required_by.startswith("softdep of"):
                return          # a soft dependency is optional by definition
            raise BuildError(f"module {name} (needed by {required_by or 'the appliance'}) is neither "
                             f"built into kernel {k.release} nor in {k.modules_dir}")
        visiting.add(name)
        data = _load(path)
        info = elf.modinfo(data, f"module {path}")
        vermagic = (info.get("vermagic") or [""])[0].split(" ")[0]
        if vermagic and vermagic != k.release:
            raise BuildError(f"module {name} was built for kernel {vermagic}, not {k.release} "
                             f"(wrong modules directory for this kernel?)")
        hard, soft = deps_of(name, info)
        for d in hard:
            visit(d, name)
        for d in soft:
            visit(d, f"softdep of {name}")
        k.needs[name] = [d for d in hard + soft if d in blobs]
        k.aliases[name] = info.get("alias", [])
        visiting.discard(name)
        blobs[name] = data
        order.append(name)
        k.modules.append((name, path))

    for r in roots:
        visit(norm(r), None)
    return [(n, blobs[n]) for n in order]
