"""Just enough ELF64 reading for the builder: a named section's bytes
(a kernel module's .modinfo) and a binary's DT_NEEDED entries.
"""
from __future__ import annotations

import struct

from .errors import BuildError


def _sections(data: bytes, what: str) -> list[tuple[str, int, int, int]]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{what}: not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        link, = struct.unpack_from("<I", data, shoff + i * shentsize + 0x28)
        raw.append((name, typ, off, size, link))
    stroff, strsize = raw[shstrndx][2], raw[shstrndx][3]
    strtab = data[stroff:stroff + strsize]
    out = []
    for name, typ, off, size, link in raw:
        end = strtab.index(b"\0", name)
        out.append((strtab[name:end].decode(), typ, off, size, link))
    return out


def section(data: bytes, name: str, what: str) -> bytes | None:
    for sname, _typ, off, size, _link in _sections(data, what):
        if sname == name:
            return data[off:off + size]
    return None


def modinfo(data: bytes, what: str) -> dict[str, list[str]]:
    """A kernel module's .modinfo as key -> values (keys may repeat)."""
    raw = section(data, ".modinfo", what)
    if raw is None:
        raise BuildError(f"{what}: no .modinfo section (not a kernel module?)")
    info: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            info.setdefault(k, []).append(v)
    return info


def needed(data: bytes, what: str) -> list[str]:
    """DT_NEEDED sonames of a dynamically linked ELF file."""
    secs = _sections(data, what)
    for sname, typ, off, size, link in secs:
        if sname == ".dynamic":
            strtab_off = secs[link][2]
            out = []
            for i in range(0, size, 16):
                tag, val = struct.unpack_from("<qQ", data, off + i)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    end = data.index(b"\0", strtab_off + val)
                    out.append(data[strtab_off + val:end].decode())
            return out
    return []
