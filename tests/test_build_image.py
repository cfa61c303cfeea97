"""The image builder: artifacts, manifest, initramfs contents, reproducibility."""
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from appliance.content.store import Store
from haboob_build import elf, kernel
from haboob_build.tree import Tree
from tests import image_support as sup


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def image():
    return sup.build()


@pytest.fixture(scope="module")
def files(image):
    return sup.read_cpio(image / "initrd.img")


def test_artifacts_and_manifest_match(image):
    m = json.loads((image / "manifest.json").read_text())
    assert sorted(p.name for p in image.iterdir()) == ["cmdline", "initrd.img", "manifest.json", "vmlinuz"]
    for name, rec in m["artifacts"].items():
        assert rec == {"size": (image / name).stat().st_size, "sha256": sha(image / name)}
    assert m["python"]["version"].startswith("3.11.")
    assert m["kernel"]["release"] and "virtio_net" in m["kernel"]["modules"]
    assert set(m["sizes"]) >= {"kernel", "kernel-modules", "python", "appliance", "content"}
    for rec in m["inputs"].values():
        assert len(rec["sha256"]) == 64 and rec["size"] > 0 and "/" not in rec["path"]
    cmdline = (image / "cmdline").read_text().split()
    assert "console=ttyS0" in cmdline and "haboob.ip=198.18.0.1/24" in cmdline and "panic=-1" in cmdline


def test_manifest_urls_are_the_stores(image, files, tmp_path):
    m = json.loads((image / "manifest.json").read_text())
    store_bytes = files["/haboob/site.store"]["data"]
    (tmp_path / "s.store").write_bytes(store_bytes)
    with Store.open(tmp_path / "s.store") as st:
        assert m["content"]["urls"] == len(st.site.resources) == len(m["urls"])
    assert m["content"]["store_sha256"] == hashlib.sha256(store_bytes).hexdigest()
    # every URL's body is byte-for-byte its site file
    for url, rec in m["urls"].items():
        assert rec["sha256"] == sha(sup.EXAMPLE / rec["file"]), url
    assert m["content"]["store_size"] == m["sizes"]["content"]


def test_initramfs_holds_only_the_appliance(files):
    names = set(files)
    assert {"/init", "/usr/bin/python3.11", "/haboob/site.store", "/etc/haboob/modules",
            "/etc/haboob/config.json", "/haboob/lib/appliance/init.pyc"} <= names
    # no shell, no package manager, no login, no sources
    for bad in ("/bin/sh", "/usr/bin/sh", "/bin/busybox", "/usr/bin/dpkg", "/usr/bin/apt", "/sbin/getty",
                "/usr/bin/login"):
        assert bad not in names
    assert not [n for n in names if n.endswith(".py")]
    assert "/haboob/lib/appliance/__main__.pyc" not in names      # host-only (click)
    init = files["/init"]
    assert init["data"].startswith(b"#!/usr/bin/python3.11 -IS\n") and init["mode"] & 0o111


def test_device_nodes_exist_before_devtmpfs(files):
    for path, rdev in (("/dev/console", (5, 1)), ("/dev/null", (1, 3)), ("/dev/urandom", (1, 9)),
                       ("/dev/random", (1, 8))):
        assert stat.S_ISCHR(files[path]["mode"]) and files[path]["rdev"] == rdev, path


def test_entries_owned_by_root_at_source_date_epoch(image, files):
    epoch = json.loads((image / "manifest.json").read_text())["source_date_epoch"]
    assert {(f["uid"], f["gid"], f["mtime"]) for f in files.values()} == {(0, 0, epoch)}


def test_modules_listed_in_dependency_order(files):
    lines = [l.split() for l in files["/etc/haboob/modules"]["data"].decode().splitlines()]
    names = [w[0] for w in lines]
    for name, path, role, needs, *aliases in lines:
        assert path in files
        assert role in ("always", "driver", "storage", "fs", "dep")
        for d in ([] if needs == "-" else needs.split(",")):
            assert names.index(d) < names.index(name), f"{name} needs {d}, listed later"
        assert bool(aliases) == (role in ("driver", "storage"))
    roles = {w[0]: w[2] for w in lines}
    assert roles["virtio_net"] == "driver" and roles["virtio_pci"] == "always"
    assert roles["failover"] == roles["net_failover"] == "dep"
    # the configuration volume's: controllers by modalias, file systems only once a volume is found
    assert roles["virtio_blk"] == roles["ahci"] == roles["sd_mod"] == roles["sr_mod"] == "storage"
    assert roles["vfat"] == roles["isofs"] == roles["nls_cp437"] == roles["nls_ascii"] == "fs"
    assert "ata_piix" not in roles                  # see haboob_build/kernel.py: ~0.45 s per TCG boot
    by = {w[0]: w for w in lines}
    assert "virtio:d00000002v*" in by["virtio_blk"][4:]
    assert set(by["ahci"][4:]) <= set(by["sd_mod"][4:])     # sd_mod follows an AHCI controller
    assert names.index("virtio") < names.index("virtio_net")
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    assert names.index("virtio_ring") < names.index("virtio")
    assert {"virtio_pci", "virtio_rng", "button", "evdev"} <= set(names)
    virtio_net = next(w for w in lines if w[0] == "virtio_net")
    assert "virtio:d00000001v*" in virtio_net[4:]


def test_pycs_are_unchecked_hash(files):
    pycs = [f for n, f in files.items() if n.endswith(".pyc")]
    assert len(pycs) > 50
    for f in pycs:
        flags = int.from_bytes(f["data"][4:8], "little")
        assert flags == 0b01, "expected a hash-based pyc that is never checked against a source"


def test_shared_libraries_resolve_inside_the_image(files):
    have = {os.path.basename(n) for n in files}
    for n, f in files.items():
        if (n.endswith(".so") or n == "/usr/bin/python3.11") and f["data"][:4] == b"\x7fELF":
            for lib in elf.needed(f["data"], n):
                assert lib in have, f"{n} needs {lib}"


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_runtime_runs_alone_in_a_chroot(files, tmp_path):
    """The image's Python, with only the image's files, imports everything PID 1 uses."""
    root = tmp_path / "root"
    for name, f in sorted(files.items()):
        p = root / name.lstrip("/")
        if stat.S_ISDIR(f["mode"]):
            p.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(f["mode"]):
            p.symlink_to(f["data"].decode())
        elif stat.S_ISREG(f["mode"]):
            p.write_bytes(f["data"])
            p.chmod(stat.S_IMODE(f["mode"]))
    (root / "dev/urandom").unlink(missing_ok=True)
    (root / "dev/urandom").write_bytes(os.urandom(4096))   # a file stands in for the device
    code = ("import sys; sys.path.insert(0, '/haboob/lib'); import appliance.init as i, "
            "appliance.content.store as s, ctypes, json, mmap, socket, fcntl; "
            "st = s.Store.open('/haboob/site.store'); print(len(st.site.resources), sys.version.split()[0])")
    proc = subprocess.run(["chroot", str(root), "/usr/bin/python3.11", "-I", "-S", "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[1].startswith("3.11.")


def test_reproducible_byte_identical(tmp_path, monkeypatch):
    """Two builds from the same inputs, one in this process and one by build.py
    in another with a different hash seed, into different folders: identical."""
    import sys
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = sup.options(out=tmp_path / "a" / "img", name="repro")
    from haboob_build.steps import build_image
    build_image(a)
    b = tmp_path / "b" / "img"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, str(sup.REPO / "build.py"), "-q", "--site", str(sup.EXAMPLE), "--name", "repro",
                    "--out", str(b), "--compress-level", "3", "--formats", "none", "--nic-drivers", "virtio_net",
                    "--ip", str(a.ip)],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    for name in ("vmlinuz", "initrd.img", "manifest.json", "cmdline"):
        assert sha(a.out / name) == sha(b / name), name
    assert json.loads((a.out / "manifest.json").read_text())["source_date_epoch"] == 1700000000


def test_cpio_is_read_by_gnu_cpio(tmp_path):
    t = Tree()
    t.file("/a/b.txt", b"hello", part="x")
    t.symlink("/lib", "usr/lib")
    t.chardev("/dev/null", 1, 3)
    raw = t.cpio(1234)
    assert len(raw) % 512 == 0
    proc = subprocess.run(["cpio", "-itv", "--quiet"], input=raw, capture_output=True, check=True)
    listing = proc.stdout.decode().splitlines()
    assert [l.split()[-1] if "->" not in l else l.split()[-3] for l in listing] == ["a", "a/b.txt", "dev", "dev/null", "lib"]
    assert t.sizes() == {"x": 5}


def test_kernel_release_read_from_bzimage_header(image):
    m = json.loads((image / "manifest.json").read_text())
    assert kernel.release_of(image / "vmlinuz") == m["kernel"]["release"]


def test_custom_kernel_with_its_modules_folder(image, tmp_path):
    """--kernel + --modules: the same Debian kernel given by path gives the same initramfs."""
    from haboob_build.steps import build_image
    m = json.loads((image / "manifest.json").read_text())
    release = m["kernel"]["release"]
    from haboob_build.context import cache_root
    pkgs = sorted(cache_root().glob(f"pkgs/linux-image-{release}_*"))
    assert pkgs, "the Debian kernel package is in the cache after the first build"
    root = pkgs[-1]
    opts = sup.options(out=tmp_path / "custom", kernel=root / "boot" / f"vmlinuz-{release}",
                       modules=root / "lib" / "modules" / release)
    build_image(opts)
    cm = json.loads((opts.out / "manifest.json").read_text())
    assert cm["options"]["kernel"] == "custom" and cm["kernel"]["release"] == release
    assert cm["kernel"]["modules"] == m["kernel"]["modules"]
    assert sha(opts.out / "vmlinuz") == sha(image / "vmlinuz")
    # the kernel's part of the initramfs is identical (the rest may differ if
    # someone edits appliance/ meanwhile: the working tree is shared)
    a, b = sup.read_cpio(image / "initrd.img"), sup.read_cpio(opts.out / "initrd.img")
    kernel_part = [n for n in a if n.startswith("/usr/lib/modules/") or n == "/etc/haboob/modules"]
    assert len(kernel_part) > 10
    assert {n: a[n] for n in kernel_part} == {n: b.get(n) for n in kernel_part}
