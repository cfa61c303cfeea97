"""The benchmark site: one file per size, deterministic bytes.

Theory of operation: both servers must serve byte-identical files, and two
runs of the benchmark must serve the same bytes, so each file's content is
SHAKE-256 of its name stretched to the size (incompressible, like the media
files that dominate real traffic, and stable across Python versions). The
directory is nginx's root as is, and the appliance compiles it to a store.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

# The sizes of issue 5 (Sandstorm's figures go from 1 KB to 1 MB).
DEFAULT_SIZES = ("1k", "4k", "24k", "100k", "1m")
QUICK_SIZES = ("4k", "100k")

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
          "m": 1024 * 1024, "mb": 1024 * 1024, "mib": 1024 * 1024}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
MAX_SIZE = 64 * 1024 * 1024


class SizeError(ValueError):
    """A size argument that is not '<number>[k|m]'."""


@dataclass(frozen=True)
class File:
    label: str      # "4k"
    size: int       # bytes of the body
    name: str       # "4k.bin": the URL path is "/" + name
    sha256: str     # of the body, for the byte-for-byte check


def parse_size(text: str) -> tuple[str, int]:
    """'24k' -> ('24k', 24576); 1024-based units k/kb/kib, m/mb/mib."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise SizeError(f"bad size {text!r}: expected a number with an optional unit k or m, e.g. 4k")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 1 <= size <= MAX_SIZE:
        raise SizeError(f"bad size {text!r}: must be between 1 byte and {MAX_SIZE // 2**20} MB")
    return label_of(size), size


def label_of(size: int) -> str:
    if size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)}m"
    if size % 1024 == 0:
        return f"{size // 1024}k"
    return f"{size}b"


def content(label: str, size: int) -> bytes:
    return hashlib.shake_256(f"haboob-bench/{label}".encode()).digest(size)


def make_site(root: str, sizes: list[int]) -> list[File]:
    """Write one file per size into root (which must exist); return them in size order."""
    files = []
    for size in sorted(set(sizes)):
        label = label_of(size)
        data = content(label, size)
        name = f"{label}.bin"
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        files.append(File(label, size, name, hashlib.sha256(data).hexdigest()))
    # An index so that "/" answers 200 on both servers (used as the readiness probe).
    with open(os.path.join(root, "index.html"), "wb") as f:
        f.write(b"<!doctype html><title>haboob bench</title>\n")
    return files
