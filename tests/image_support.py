"""Helpers for tests/test_build_*.py and tests/test_vm_*.py: build images
(once per test session for the example site), read an initramfs back,
and make deliberately broken images through the builder's step list."""
from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path

from haboob_build.context import Options
from haboob_build.steps import STEPS, build_image

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "www"
_TMP = Path(tempfile.mkdtemp(prefix="haboob-test-images-"))
atexit.register(shutil.rmtree, _TMP, True)      # the images built for this test session
_built: dict = {}


def options(site=EXAMPLE, out=None, **kw) -> Options:
    kw.setdefault("name", "www")
    kw.setdefault("ip", "198.18.0.1/24")
    kw.setdefault("gateway", None)
    kw.setdefault("mss", 1448)
    kw.setdefault("kernel", None)
    kw.setdefault("memory", 256)
    kw.setdefault("compress_level", 3)      # fast; reproducibility holds at every level
    kw.setdefault("quiet", True)
    return Options(site=Path(site), out=Path(out) if out else _TMP / kw["name"], **kw)


def build(key: str = "www", steps=STEPS, **kw) -> Path:
    """An image folder, built once per test session for each key."""
    if key not in _built:
        opts = options(out=_TMP / key, **kw)
        build_image(opts, steps)
        _built[key] = opts.out
    return _built[key]


def insert_after(step_name: str, name: str, fn, steps=STEPS) -> list:
    out = []
    for s in steps:
        out.append(s)
        if s[0] == step_name:
            out.append((name, fn))
    return out


def read_cpio(initrd: Path) -> dict:
    """path -> {"mode", "uid", "gid", "mtime", "rdev", "data"} from a zstd newc initramfs."""
    raw = subprocess.run(["zstd", "-dc", str(initrd)], capture_output=True, check=True).stdout
    out, off = {}, 0
    while True:
        assert raw[off:off + 6] == b"070701", f"bad cpio magic at {off}"
        f = [int(raw[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = raw[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        data = raw[off:off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out["/" + name] = {"mode": f[1], "uid": f[2], "gid": f[3], "mtime": f[5],
                           "rdev": (f[9], f[10]), "data": data}


def copy_image(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
