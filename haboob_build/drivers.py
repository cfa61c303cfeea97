"""NIC drivers the image carries (`--nic-drivers`).

Theory of operation: the user names drivers by the short names people know
(e1000, ixgbe, mlx5, bnxt, virtio_net...); `NIC_DRIVERS` maps each to the
kernel modules that must be loaded for the NIC to appear (the driver, plus
its bus where that is not a dependency: virtio_net needs virtio_pci). The
dependency closure (modules.dep, else each module's .modinfo `depends=`
and `softdep=pre:`) is computed by `kernel.resolve`, the same code that
picks the image's other modules, so the driver list here stays data.

Firmware: a driver's .modinfo lists the firmware files it may request
(`firmware=`). Of the defaults only `ice` needs one to run at full
function: the DDP package intel/ice/ddp/ice.pkg (Debian:
firmware-misc-nonfree, non-free but redistributable); without it ice
runs in "Safe Mode" (one queue, no RSS), which still serves. Firmware is
never included implicitly (licence); `firmware_files` finds the files a
set of modules asks for in a firmware folder the user names, for the
builder to copy to /lib/firmware in the image.

Drivers behind a bus of their own: PID 1 loads a NIC driver when one of
its modalias patterns matches a device present at boot. hv_netvsc's
devices (vmbus:...) exist only once hv_vmbus runs, so hv_netvsc also
matches on hv_vmbus's own patterns (`match_also`: the ACPI VMBUS device
Hyper-V and Azure present). hv_netvsc is not in the default set: hv_vmbus
refuses to load off Hyper-V (ENODEV), and PID 1 loads every driver when
none matches, so it belongs only in images meant for Azure/Hyper-V
(--nic-drivers all,hv_netvsc).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError


@dataclass(frozen=True)
class Driver:
    modules: tuple[str, ...]        # roots to load, in order; dependencies are added by analysis
    hardware: str                   # what it drives, for --nic-drivers help and the docs
    match_also: tuple[str, ...] = ()    # modules whose modalias patterns also select this driver


NIC_DRIVERS: dict[str, Driver] = {
    "virtio_net": Driver(("virtio_pci", "virtio_net"), "virtio-net (QEMU/KVM, most clouds)"),
    "e1000": Driver(("e1000",), "Intel PRO/1000 8254x (QEMU -device e1000, VMware e1000)"),
    "e1000e": Driver(("e1000e",), "Intel 8257x/82583, I217/I218/I219 (QEMU -device e1000e)"),
    "igb": Driver(("igb",), "Intel 82575/82576/82580, I210/I211/I350 1GbE"),
    "ixgbe": Driver(("ixgbe",), "Intel 82598/82599/X520/X540/X550 10GbE"),
    "i40e": Driver(("i40e",), "Intel X710/XL710/XXV710 10/25/40GbE"),
    "ice": Driver(("ice",), "Intel E810 25/50/100GbE (full function needs the DDP firmware package)"),
    "mlx5": Driver(("mlx5_core",), "NVIDIA/Mellanox ConnectX-4 and later"),
    "bnxt": Driver(("bnxt_en",), "Broadcom NetXtreme-C/E (BCM573xx/574xx)"),
    "vmxnet3": Driver(("vmxnet3",), "VMware VMXNET3"),
    "ena": Driver(("ena",), "Amazon EC2 Elastic Network Adapter"),
    "gve": Driver(("gve",), "Google Compute Engine gVNIC"),
    "hv_netvsc": Driver(("hv_vmbus", "hv_netvsc"), "Hyper-V / Azure synthetic NIC (netvsc)",
                        match_also=("hv_vmbus",)),
}

# Other spellings people use: module names, dashes.
ALIASES = {"virtio": "virtio_net", "mlx5_core": "mlx5", "bnxt_en": "bnxt", "gvnic": "gve", "netvsc": "hv_netvsc"}

DEFAULT = [n for n in NIC_DRIVERS if n != "hv_netvsc"]       # 'all'; see the module docstring


def canonical(name: str) -> str:
    """A driver name in canonical form, or BuildError listing the known ones."""
    n = name.strip().lower().replace("-", "_")
    n = ALIASES.get(n, n)
    if n not in NIC_DRIVERS:
        raise BuildError(f"--nic-drivers: unknown NIC driver {name.strip()!r}; known: "
                         f"{', '.join(NIC_DRIVERS)} (or 'all')")
    return n


def parse_nic_drivers(text: str | None) -> list[str]:
    """'all' / None -> the default set; 'e1000,ixgbe' -> those, deduplicated, in
    the order given; 'all,hv_netvsc' -> the default set and hv_netvsc."""
    if text is None or text.strip().lower() in ("", "all", "default"):
        return list(DEFAULT)
    out: list[str] = []
    for word in text.split(","):
        if not word.strip():
            continue
        for n in (DEFAULT if word.strip().lower() in ("all", "default") else [canonical(word)]):
            if n not in out:
                out.append(n)
    if not out:
        raise BuildError("--nic-drivers: no driver named (give e.g. 'virtio_net,e1000' or 'all')")
    return out


def match_also(names: list[str]) -> dict[str, list[str]]:
    """{driver module: [modules whose modalias patterns also select it]} for these drivers."""
    out: dict[str, list[str]] = {}
    for n in names:
        d = NIC_DRIVERS[canonical(n)]
        if d.match_also:
            out[d.modules[-1]] = list(d.match_also)
    return out


def module_roots(names: list[str]) -> list[str]:
    """The kernel modules to load for these drivers (before dependencies)."""
    roots: list[str] = []
    for n in names:
        for m in NIC_DRIVERS[canonical(n)].modules:
            if m not in roots:
                roots.append(m)
    return roots


@dataclass
class Selected:
    name: str             # module name
    path: Path            # the .ko in the modules directory
    firmware: list[str]   # firmware files it may request (modinfo firmware=)


def select_nic_modules(modules_dir, names: list[str]) -> list[Selected]:
    """The modules for these drivers with all their dependencies, in load
    order (dependencies first), from a kernel's modules directory
    (lib/modules/RELEASE). Raises BuildError for an unknown driver or a
    module the kernel does not have."""
    from . import elf, kernel       # kernel.resolve does the dependency analysis

    modules_dir = Path(modules_dir)
    if not (modules_dir / "kernel").is_dir():
        raise BuildError(f"{modules_dir}: not a kernel modules directory (no kernel/ inside)")
    k = kernel.Kernel(vmlinuz=Path("/nonexistent"), release=modules_dir.name, modules_dir=modules_dir)
    blobs = kernel.resolve(None, k, module_roots(names))
    paths = dict(k.modules)
    return [Selected(name, paths[name], elf.modinfo(data, f"module {name}").get("firmware", []))
            for name, data in blobs]


def firmware_files(selected: list[Selected], firmware_dir) -> tuple[dict[str, Path], list[str]]:
    """({relative name: file} found under firmware_dir, [names not found])."""
    firmware_dir = Path(firmware_dir)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for s in selected:
        for fw in s.firmware:
            p = firmware_dir / fw
            for cand in (p, p.with_name(p.name + ".xz"), p.with_name(p.name + ".zst")):
                if cand.is_file():
                    found[str(cand.relative_to(firmware_dir))] = cand
                    break
            else:
                if fw not in missing:
                    missing.append(fw)
    return found, missing
