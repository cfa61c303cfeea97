"""The image's file tree, held in memory, and its newc cpio serialization.

Theory of operation: steps add entries (directories, files, symlinks,
device nodes) by absolute path inside the image; each entry records which
part of the image it belongs to ("kernel-modules", "python", "appliance",
"content", "base") so the manifest can report the size split. `cpio()`
writes the SVR4 "newc" format the kernel's initramfs unpacker reads
(Documentation/driver-api/early-userspace/buffer-format.rst): entries
sorted by path, parents first, every mtime = SOURCE_DATE_EPOCH, uid/gid 0,
inode numbers assigned in order; so the same tree always gives the same
bytes.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import BuildError


@dataclass
class Entry:
    mode: int                 # full st_mode (type | permissions)
    data: bytes = b""         # file content or symlink target
    rdev: tuple[int, int] = (0, 0)
    part: str = "base"


class Tree:
    def __init__(self):
        self.entries: dict[str, Entry] = {}

    def _parents(self, path: str) -> None:
        for parent in reversed(PurePosixPath(path).parents):
            p = str(parent)
            if p == "/":
                continue
            e = self.entries.get(p)
            if e is None:
                self.entries[p] = Entry(stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(e.mode):
                raise BuildError(f"image tree: {p} is both a file and a directory")

    def _put(self, path: str, entry: Entry) -> None:
        if not path.startswith("/") or "//" in path or path.endswith("/"):
            raise BuildError(f"image tree: bad path {path!r}")
        old = self.entries.get(path)
        if old is not None and old != entry and not (stat.S_ISDIR(old.mode) and stat.S_ISDIR(entry.mode)):
            raise BuildError(f"image tree: {path} added twice with different content")
        self._parents(path)
        self.entries[path] = entry

    def dir(self, path: str, mode: int = 0o755) -> None:
        self._put(path, Entry(stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644, part: str = "base") -> None:
        self._put(path, Entry(stat.S_IFREG | mode, bytes(data), part=part))

    def symlink(self, path: str, target: str) -> None:
        self._put(path, Entry(stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(path, Entry(stat.S_IFCHR | mode, rdev=(major, minor)))

    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries.values():
            if stat.S_ISREG(e.mode):
                out[e.part] = out.get(e.part, 0) + len(e.data)
        return dict(sorted(out.items()))

    def cpio(self, mtime: int) -> bytes:
        chunks = []
        ino = 1
        for path in sorted(self.entries):      # "/a" sorts before "/a/b": parents first
            e = self.entries[path]
            chunks.append(_record(path.lstrip("/"), e, ino, mtime))
            ino += 1
        chunks.append(_record("TRAILER!!!", Entry(0), 0, 0))
        out = b"".join(chunks)
        return out + b"\0" * (-len(out) % 512)


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _record(name: str, e: Entry, ino: int, mtime: int) -> bytes:
    nameb = name.encode() + b"\0"
    data = e.data if (stat.S_ISREG(e.mode) or stat.S_ISLNK(e.mode)) else b""
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    fields = (ino, e.mode, 0, 0, nlink if e.mode else 0, mtime, len(data), 0, 0,
              e.rdev[0], e.rdev[1], len(nameb), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    return _pad4(header + nameb) + _pad4(data)
