"""Debian packages as build inputs: resolve a version from the local apt
lists, download it once with `apt-get download`, and extract it once, all
under the cache folder (cache/debs/*.deb, cache/pkgs/NAME_VERSION/).
Reuse is keyed by the exact package version, so a new kernel or Python
security update is a new input, while an unchanged one is never fetched
again.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from .context import Context
from .errors import BuildError

_lists_updated = False
_records: dict[str, str] = {}          # package -> its apt-cache record (one lookup per process)


def resolve(ctx: Context, pkgs: list[str]) -> None:
    """Look up every package not yet known in ONE apt-cache call (each call costs ~1-2 s)."""
    global _lists_updated
    todo = sorted({p for p in pkgs if p not in _records})
    if not todo:
        return
    argv = ["apt-cache", "show", "--no-all-versions", *todo]
    try:
        out = ctx.run(argv, what=f"looking up package(s) {', '.join(todo)}").stdout.decode()
    except BuildError:
        if _lists_updated:
            raise
        ctx.log("apt lists lack %s; running apt-get update" % ", ".join(todo))
        ctx.run(["apt-get", "update"], what="apt-get update")
        _lists_updated = True
        out = ctx.run(argv, what=f"looking up package(s) {', '.join(todo)}").stdout.decode()
    for rec in out.split("\n\n"):
        m = re.search(r"^Package: (\S+)$", rec, re.M)
        if m:
            _records.setdefault(m.group(1), rec)
    missing = [p for p in todo if p not in _records]
    if missing:
        raise BuildError(f"apt-cache knows no package {', '.join(missing)}")


def _apt_show(ctx: Context, pkg: str) -> str:
    resolve(ctx, [pkg])
    return _records[pkg]


def version(ctx: Context, pkg: str) -> str:
    m = re.search(r"^Version: (\S+)$", _apt_show(ctx, pkg), re.M)
    if not m:
        raise BuildError(f"package {pkg}: apt-cache shows no version")
    return m.group(1)


def depends(ctx: Context, pkg: str) -> list[str]:
    """First alternatives of a package's Depends (e.g. linux-image-amd64 -> the versioned image)."""
    m = re.search(r"^Depends: (.*)$", _apt_show(ctx, pkg), re.M)
    if not m:
        return []
    return [alt.split("|")[0].split("(")[0].strip() for alt in m.group(1).split(",")]


def fetch(ctx: Context, pkg: str) -> tuple[Path, Path, str]:
    """(the .deb, its extracted root, the version) for the candidate version of pkg."""
    ver = version(ctx, pkg)
    debs = ctx.cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    safe_ver = ver.replace(":", "%3a")
    found = sorted(debs.glob(f"{pkg}_{safe_ver}_*.deb"))
    if not found:
        ctx.log(f"fetching {pkg} {ver} (apt-get download)")
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            ctx.run(["apt-get", "download", f"{pkg}={ver}"], what=f"downloading {pkg}", cwd=Path(tmp))
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise BuildError(f"downloading {pkg}: expected one .deb, got {len(got)}")
            got[0].rename(debs / got[0].name)
        found = sorted(debs.glob(f"{pkg}_{safe_ver}_*.deb"))
    deb = found[0]
    root = ctx.cache / "pkgs" / f"{pkg}_{safe_ver}"
    if not root.is_dir():
        ctx.log(f"extracting {deb.name}")
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".x-"))
        try:
            ctx.run(["dpkg-deb", "-x", deb, tmp], what=f"extracting {deb.name}")
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return deb, root, ver
