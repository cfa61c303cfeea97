"""An image folder as build.py wrote it, checked against its manifest.

`Image.load(folder)` refuses, with one clear line, a missing folder, a
missing artifact, or an artifact whose size or sha256 differs from
manifest.json: booting something other than what was built would make
every later result meaningless.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


class VMError(Exception):
    """A clear one-line reason vm/ cannot go on (shown without a traceback)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Image:
    folder: Path
    manifest: dict
    vmlinuz: Path
    initrd: Path
    cmdline: str

    @property
    def urls(self) -> dict:
        return self.manifest.get("urls", {})

    @property
    def memory(self) -> int:
        return int(self.manifest.get("options", {}).get("memory", 256))

    @classmethod
    def load(cls, folder, verify: bool = True) -> "Image":
        folder = Path(folder)
        if not folder.is_dir():
            raise VMError(f"image folder {folder}: no such folder (build one with ./build.py --site DIR)")
        mpath = folder / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise VMError(f"{mpath}: missing; {folder} is not an image folder") from None
        except ValueError as e:
            raise VMError(f"{mpath}: not valid JSON ({e})") from None
        arts = manifest.get("artifacts")
        if not isinstance(arts, dict) or not {"vmlinuz", "initrd.img", "cmdline"} <= set(arts):
            raise VMError(f"{mpath}: lists no vmlinuz/initrd.img/cmdline artifacts")
        for name, want in sorted(arts.items()):
            p = folder / name
            if not p.is_file():
                raise VMError(f"{p}: missing (the manifest lists it)")
            if not verify:
                continue
            if p.stat().st_size != want.get("size") or _sha256(p) != want.get("sha256"):
                raise VMError(f"{p}: does not match manifest.json (size or sha256 differ); rebuild the image")
        return cls(folder, manifest, folder / "vmlinuz", folder / "initrd.img",
                   (folder / "cmdline").read_text().strip())
