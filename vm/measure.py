"""Boot measurements for docs/image.md: `python -m vm.measure IMAGE [--runs N]`.

- boot to ready: the image booted N times on user networking; the ready
  line's ms_since_boot (kernel clock) and the wall time from starting QEMU;
- the floor: the same kernel and QEMU command line booting an initramfs
  whose /init (busybox-static, a measuring tool here, never in an image)
  prints the uptime and powers off at once: what any initramfs costs;
- sizes (`--sizes`): the initramfs's files by group, raw and compressed;
- memory: the smallest -m (in steps of 8 MB) with which the image still
  becomes ready and serves a page.

Prints one JSON object. Under TCG the numbers are slow and noisy (and the
machine may be shared): report the median and say which accelerator.
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .image import Image, VMError
from .qemu import BootError, Machine, Options, kvm_usable

FLOOR_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "FLOOR-READY $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
"""


def floor_image(image: Image, tmp: Path) -> Image:
    from haboob_build.tree import Tree
    busybox = shutil.which("busybox")
    if busybox is None:
        raise VMError("busybox (busybox-static) is needed for the floor measurement")
    t = Tree()
    t.file("/bin/busybox", Path(busybox).read_bytes(), 0o755)
    t.file("/init", FLOOR_INIT.encode(), 0o755)
    t.dir("/proc")
    t.chardev("/dev/console", 5, 1)
    folder = tmp / "floor"
    folder.mkdir()
    (folder / "initrd.img").write_bytes(t.cpio(0))
    shutil.copyfile(image.vmlinuz, folder / "vmlinuz")
    (folder / "cmdline").write_text(image.cmdline)
    return Image(folder, {"options": {"memory": image.memory}}, folder / "vmlinuz", folder / "initrd.img",
                 image.cmdline)


def boot_ready(image: Image, memory: int | None = None, timeout: float = 300) -> dict:
    with Machine(image, Options(net="user", memory=memory)) as m:
        ready = m.wait_ready(timeout)
        conn = http.client.HTTPConnection("127.0.0.1", m.opts.hostport, timeout=60)
        conn.request("GET", "/")
        ready["first_get_status"] = conn.getresponse().status
        conn.close()
        m.powerdown(60)
        return ready


def boot_floor(image: Image) -> dict:
    with Machine(image, Options(net="user")) as m:
        rest = m.wait_for("FLOOR-READY ", 300, fail_on_fatal=False)
        return {"ms_since_boot": int(float(rest.split()[0]) * 1000),
                "host_seconds": round(time.monotonic() - m.started, 3)}


def smallest_memory(image: Image, lo: int = 32, hi: int = 256, step: int = 8) -> int | None:
    """Bisect on multiples of step: the smallest -m that boots to ready and answers GET /."""
    def works(mb: int) -> bool:
        try:
            return boot_ready(image, memory=mb, timeout=240)["first_get_status"] == 200
        except (BootError, OSError, http.client.HTTPException):
            return False
    if not works(hi):
        return None
    lo_ok, hi_ok = lo // step, hi // step         # invariant: hi_ok works
    while lo_ok < hi_ok:
        mid = (lo_ok + hi_ok) // 2
        if works(mid * step):
            hi_ok = mid
        else:
            lo_ok = mid + 1
    return hi_ok * step


def size_split(image: Image) -> list[dict]:
    """The initramfs's files by group, raw and zstd -19 compressed alone (the doc's size table)."""
    import stat
    raw = subprocess.run(["zstd", "-dc", str(image.initrd)], capture_output=True, check=True).stdout
    groups: dict[str, list[bytes]] = {}
    off = 0
    while raw[off:off + 6] == b"070701":
        f = [int(raw[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        name = "/" + raw[off + 110: off + 110 + f[11] - 1].decode()
        off = (off + 110 + f[11] + 3) & ~3
        data = raw[off:off + f[6]]
        off = (off + f[6] + 3) & ~3
        if name == "/TRAILER!!!":
            break
        if not stat.S_ISREG(f[1]):
            continue
        if name.startswith("/usr/lib/modules/"):
            g = "kernel modules"
        elif name == "/usr/bin/python3.11":
            g = "python3.11 binary"
        elif "/libcrypto" in name or "/libssl" in name:
            g = "OpenSSL"
        elif name.startswith(("/usr/lib/x86_64-linux-gnu/", "/usr/lib64/")):
            g = "other shared libraries"
        elif name.endswith(".so"):
            g = "stdlib extension modules"
        elif name.startswith("/usr/lib/python3"):
            g = "stdlib .pyc"
        elif name.startswith("/haboob/lib/") or name == "/init":
            g = "appliance .pyc + /init"
        elif name == "/haboob/site.store":
            g = "content store"
        else:
            g = "config"
        groups.setdefault(g, []).append(data)
    out = []
    for g, blobs in sorted(groups.items(), key=lambda kv: -sum(map(len, kv[1]))):
        joined = b"".join(blobs)
        z = subprocess.run(["zstd", "-19", "-T1", "-c"], input=joined, capture_output=True, check=True).stdout
        out.append({"part": g, "files": len(blobs), "raw_mb": round(len(joined) / 1e6, 2),
                    "zstd19_mb": round(len(z) / 1e6, 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vm.measure")
    ap.add_argument("image")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory bisection")
    ap.add_argument("--sizes", action="store_true", help="only the initramfs size split")
    a = ap.parse_args()
    image = Image.load(a.image)
    if a.sizes:
        print(json.dumps(size_split(image), indent=1))
        return
    out = {"accel": "kvm" if kvm_usable() else "tcg"}
    ready = [boot_ready(image) for _ in range(a.runs)]
    out["ready_ms_since_boot"] = [r["ms_since_boot"] for r in ready]
    out["ready_wall_s"] = [r["host_seconds"] for r in ready]
    out["ready_phases_ms"] = [r.get("phases_ms") for r in ready]
    with tempfile.TemporaryDirectory() as tmp:
        floor = floor_image(image, Path(tmp))
        fl = [boot_floor(floor) for _ in range(a.runs)]
    out["floor_ms_since_boot"] = [f["ms_since_boot"] for f in fl]
    out["floor_wall_s"] = [f["host_seconds"] for f in fl]
    out["median"] = {k: statistics.median(out[k]) for k in
                     ("ready_ms_since_boot", "ready_wall_s", "floor_ms_since_boot", "floor_wall_s")}
    if not a.no_memory:
        out["smallest_memory_mb"] = smallest_memory(image)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
