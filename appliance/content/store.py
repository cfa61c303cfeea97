"""The content store file: format, writer and zero-copy loader.

Theory of operation: a store is one immutable file, built once by the
compiler and mmap'ed read-only by the server. Layout (all integers
little-endian):

    0      header (HEADER_SIZE bytes, struct HEADER_FMT):
             magic b"HABOOBST", format version u32, flags u32, mss u32,
             reserved u32, then (offset u64, length u64) of the blob, the
             sums and the tables sections, then 32 bytes of SHA-256 over
             file[HEADER_SIZE:] followed by the header bytes before the digest
    4096   blob: every prebuilt response, each one contiguous (page-aligned
             start so the blob can be handed to a NIC ring as is)
    ...    sums: u16 array, one RFC 1071 sum per MSS-sized segment of every
             response (2-byte aligned), read via memoryview.cast("H")
    ...    tables: canonical JSON (sorted keys, no spaces): responses,
             resources, redirects, error pages, build metadata

The blob comes first so the writer can stream response bytes straight into
the file while it accumulates the (small) sums and tables in memory; nothing
is ever copied twice. The digest covers everything, the header included, so
any flipped byte is refused at load; structural checks (magic, version,
section bounds) come first so that the common mistakes get a precise message.

Loading maps the file and keeps memoryviews on the map: `Store.blob` is the
blob section without a copy; `Response.sums` are slices of one cast view.
"""
import hashlib
import json
import mmap
import os
import struct
import sys

from .site import Resource, Site
from ..http.dates import format_date

__all__ = ["MAGIC", "VERSION", "HEADER_SIZE", "StoreError", "Response", "Store", "StoreWriter"]

MAGIC = b"HABOOBST"
VERSION = 1
HEADER_FMT = "<8sIIII6Q32s"
HEADER_SIZE = 4096
_HDR = struct.Struct(HEADER_FMT)
_DIGEST_AT = _HDR.size - 32


class StoreError(Exception):
    """The store file cannot be used: not a store, wrong version, truncated or corrupt."""


class Response:
    """One prebuilt response: a contiguous byte run of the blob plus its segment sums."""

    __slots__ = ("status", "off", "length", "header_len", "date_off", "conn_off", "sums", "index")

    def __init__(self, status, off, length, header_len, date_off, conn_off, sums, index=-1):
        self.status = status
        self.off = off
        self.length = length
        self.header_len = header_len
        self.date_off = date_off
        self.conn_off = conn_off
        self.sums = sums
        self.index = index

    @property
    def nsegs(self) -> int:
        return len(self.sums)

    def __repr__(self):
        return (f"Response(status={self.status}, off={self.off}, length={self.length}, "
                f"header_len={self.header_len}, segments={len(self.sums)})")


def _nsegs(length: int, mss: int) -> int:
    return max(1, -(-length // mss))


class Store:
    """A loaded store: `mss`, `blob` (memoryview over the map), `site`, `meta`."""

    def __init__(self, path, mm, view, mss, blob, sums, site, meta):
        self.path = path
        self._mm = mm
        self._view = view
        self.mss = mss
        self.blob = blob
        self._sums = sums
        self.site = site
        self.meta = meta

    @classmethod
    def open(cls, path, verify: bool = True) -> "Store":
        """Map `path` read-only and check it; StoreError with a clear message if unusable."""
        path = os.fspath(path)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise StoreError(f"cannot open store {path}: {e.strerror}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < _HDR.size:
                raise StoreError(f"{path}: not a Haboob store (file too short: {size} bytes)")
            head = f.read(_HDR.size)
            if head[:8] != MAGIC:
                raise StoreError(f"{path}: not a Haboob store (bad magic {head[:8]!r})")
            (_m, version, _flags, mss, _r, blob_off, blob_len, sums_off, sums_len,
             tab_off, tab_len, digest) = _HDR.unpack(head)
            if version != VERSION:
                raise StoreError(f"{path}: unsupported store format version {version} "
                                 f"(this appliance reads version {VERSION}; recompile the site)")
            end = max(HEADER_SIZE, blob_off + blob_len, sums_off + sums_len, tab_off + tab_len)
            if size < end:
                raise StoreError(f"{path}: truncated store ({size} bytes, sections need {end})")
            if size != end:
                raise StoreError(f"{path}: corrupt store ({size - end} unexpected trailing bytes)")
            if (blob_off < HEADER_SIZE or sums_off < blob_off + blob_len or tab_off < sums_off + sums_len
                    or sums_off & 1 or sums_len & 1):
                raise StoreError(f"{path}: corrupt store (section table is inconsistent)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        try:
            if verify:
                h = hashlib.sha256(view[HEADER_SIZE:])
                h.update(view[_HDR.size:HEADER_SIZE])
                h.update(view[:_DIGEST_AT])
                if h.digest() != digest:
                    raise StoreError(f"{path}: corrupt store (SHA-256 mismatch; the file was "
                                     f"modified or damaged after it was built)")
            blob = view[blob_off:blob_off + blob_len]
            sums = view[sums_off:sums_off + sums_len].cast("H")
            if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
                import array
                a = array.array("H", sums)
                a.byteswap()
                sums = memoryview(a)
            try:
                tables = json.loads(bytes(view[tab_off:tab_off + tab_len]))
            except ValueError as e:
                raise StoreError(f"{path}: corrupt store (tables: {e})") from None
            site = _build_site(path, tables, sums, mss, blob_len)
        except BaseException:
            view.release()
            mm.close()
            raise
        return cls(path, mm, view, mss, blob, sums, site, tables.get("meta", {}))

    def close(self):
        """Release the map; if slices are still referenced elsewhere, the GC does it later."""
        self.site = None
        for v in (self.blob, self._sums, self._view):
            try:
                v.release()
            except BufferError:
                return
        try:
            self._mm.close()
        except BufferError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _build_site(path, tables, sums, mss, blob_len) -> Site:
    try:
        responses = []
        for i, (status, off, length, header_len, date_off, conn_off, s0) in enumerate(tables["responses"]):
            n = _nsegs(length, mss)
            if off < 0 or off + length > blob_len or s0 < 0 or s0 + n > len(sums) or header_len > length:
                raise StoreError(f"{path}: corrupt store (response {i} out of bounds)")
            responses.append(Response(status, off, length, header_len, date_off, conn_off, sums[s0:s0 + n], i))

        def resp(i):
            return None if i is None else responses[i]

        resources = {}
        for p, d in tables["resources"].items():
            resources[p] = Resource(
                path=p, size=d["size"], etag=d["etag"].encode(),
                gzip_etag=None if d["gzip_etag"] is None else d["gzip_etag"].encode(),
                last_modified=d["mtime"], content_type=d["type"].encode(),
                get=resp(d["get"]), head=resp(d["head"]), not_modified=resp(d["nm"]),
                gzip_get=resp(d["gz_get"]), gzip_head=resp(d["gz_head"]),
                gzip_not_modified=resp(d["gz_nm"]), body_off=d["body_off"],
                vary=d["vary"], cache_control=d["cc"].encode(), file=d.get("file", ""))
        redirects = {p: responses[g] for p, (g, _h) in tables["redirects"].items()}
        redirects_head = {p: responses[h] for p, (_g, h) in tables["redirects"].items()}
        errors = {int(s): (responses[g], responses[h]) for s, (g, h) in tables["errors"].items()}
        meta = tables.get("meta", {})
        return Site(resources, redirects, redirects_head, errors,
                    server=meta.get("server", "haboob").encode(), responses=responses,
                    date=format_date(meta.get("date", 0)))
    except StoreError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise StoreError(f"{path}: corrupt store (tables: {type(e).__name__}: {e})") from None


class StoreWriter:
    """Writes a store: `add_response` streams bytes into the blob, `finish` writes
    sums, tables and the header and atomically renames the temp file into place.
    Use as a context manager: on error the temp file is removed.
    """

    def __init__(self, out_path, mss: int):
        self.out_path = os.fspath(out_path)
        self.mss = mss
        folder = os.path.dirname(os.path.abspath(self.out_path))
        base = os.path.basename(self.out_path)
        self.tmp_path = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
        self._f = open(self.tmp_path, "wb")
        self._f.truncate(HEADER_SIZE)
        self._f.seek(HEADER_SIZE)
        self._h = hashlib.sha256()
        self._blob_len = 0
        self._sums = bytearray()
        self._nsums = 0
        self.responses = []  # table rows
        self._done = False

    def add_response(self, data: bytes, status: int, header_len: int, date_off: int, conn_off: int,
                     seg_sums) -> int:
        """Append one response; returns its index. `seg_sums` are its per-MSS-segment sums."""
        off = self._blob_len
        self._f.write(data)
        self._h.update(data)
        self._blob_len += len(data)
        n = _nsegs(len(data), self.mss)
        if len(seg_sums) != n:
            raise ValueError("add_response: wrong number of segment sums")
        self.responses.append([status, off, len(data), header_len, date_off, conn_off, self._nsums])
        self._sums += struct.pack(f"<{n}H", *seg_sums)
        self._nsums += n
        return len(self.responses) - 1

    def finish(self, tables: dict):
        tables = dict(tables, responses=self.responses)
        if self._blob_len & 1:  # keep the sums section 2-byte aligned
            self._f.write(b"\0")
            self._h.update(b"\0")
            self._blob_len += 1
            blob_len = self._blob_len - 1
        else:
            blob_len = self._blob_len
        sums_off = HEADER_SIZE + self._blob_len
        self._f.write(self._sums)
        self._h.update(self._sums)
        tab = json.dumps(tables, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        tab_off = sums_off + len(self._sums)
        self._f.write(tab)
        self._h.update(tab)
        head = _HDR.pack(MAGIC, VERSION, 0, self.mss, 0, HEADER_SIZE, blob_len,
                         sums_off, len(self._sums), tab_off, len(tab), b"\0" * 32)
        self._h.update(b"\0" * (HEADER_SIZE - _HDR.size))
        self._h.update(head[:_DIGEST_AT])
        head = head[:_DIGEST_AT] + self._h.digest()
        self._f.seek(0)
        self._f.write(head)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.out_path)
        self._done = True

    def abort(self):
        if not self._done:
            try:
                self._f.close()
            finally:
                try:
                    os.unlink(self.tmp_path)
                except FileNotFoundError:
                    pass
            self._done = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()
