"""`build.py config-volume DIR --out FILE`: write a configuration volume.

Theory of operation: the volume is a small FAT image labelled HABOOB
(appliance/configvol.py reads it at boot), made with mtools (mformat,
mmd, mcopy) on a plain file: no root, no loop mount. DIR is checked first
with the appliance's own parser, so a volume this writes is one the
appliance accepts: haboob.conf (haboob.KEY=VALUE lines) and optionally
tls/fullchain.pem + tls/key.pem; anything else in DIR is refused. The image
is written beside FILE and renamed into place only when complete.
Reproducible: the volume serial (mformat -N) is derived from the contents,
and with SOURCE_DATE_EPOCH set mtools stamps every entry with it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from appliance.configvol import ConfigError, parse_files

from .errors import BuildError

LABEL = "HABOOB"
ALLOWED = ("haboob.conf", "tls/fullchain.pem", "tls/key.pem")
SIZE_KIB = 1024                 # 1 MiB: FAT12, room for a certificate chain and its key


def check_dir(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of DIR, or BuildError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BuildError(f"config-volume: {folder}: not a folder")
    files: dict[str, bytes] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() and rel == "tls":
            continue
        if rel not in ALLOWED or not p.is_file():
            raise BuildError(f"config-volume: {folder}/{rel}: not a configuration file "
                             f"(allowed: {', '.join(ALLOWED)})")
        files[rel] = p.read_bytes()
    if "haboob.conf" not in files and "tls/fullchain.pem" not in files:
        raise BuildError(f"config-volume: {folder}: holds neither haboob.conf nor tls/fullchain.pem")
    if sum(map(len, files.values())) > (SIZE_KIB - 64) * 1024:
        raise BuildError(f"config-volume: {folder}: more than {SIZE_KIB - 64} KiB of files")
    try:
        parse_files(LABEL, files)
    except ConfigError as e:
        raise BuildError(f"config-volume: {folder}/{e}") from None
    return files


def write(folder: Path, out: Path) -> dict:
    """Write the volume for DIR to FILE; returns the settings it carries."""
    for tool in ("mformat", "mmd", "mcopy"):
        if shutil.which(tool) is None:
            raise BuildError(f"config-volume: {tool} not found (apt-get install mtools)")
    files = check_dir(folder)
    out = Path(out)
    if not out.parent.is_dir():
        raise BuildError(f"config-volume: --out {out}: folder {out.parent} does not exist")
    h = hashlib.sha256()
    for rel, data in sorted(files.items()):
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    serial = h.hexdigest()[:8]
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    try:
        os.ftruncate(fd, SIZE_KIB * 1024)
        os.close(fd)
        fd = -1

        def run(*argv):
            p = subprocess.run(argv, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise BuildError(f"config-volume: {argv[0]} failed: {(p.stderr or p.stdout).strip()}")
        run("mformat", "-i", tmp, "-v", LABEL, "-N", serial, "-T", str(SIZE_KIB * 2), "-h", "64", "-s", "32", "::")
        if any(r.startswith("tls/") for r in files):
            run("mmd", "-i", tmp, "::tls")
        for rel in sorted(files):
            run("mcopy", "-i", tmp, "-o", str(Path(folder) / rel), f"::{rel}")
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return parse_files(LABEL, files)
