"""The content compiler: a site directory -> one store of prebuilt responses.

Theory of operation: a straight list of steps over one context.

1. walk: visit the site in sorted (byte-wise) order, following symlinks
   only inside the site, and refuse with a `CompileError` naming the file
   anything that cannot be served faithfully: a missing or empty site, a
   symlink that leaves the site or dangles, a special file, an unreadable
   file, a name that cannot be a URL path (not UTF-8, control characters),
   a file over the size limit. Hidden entries (".name") are skipped, except
   ".well-known".
2. build: for every file, the complete responses -- 200 GET, its HEAD twin,
   304, and when gzip makes the body smaller a gzip GET/HEAD/304 with its own
   ETag and "Vary: Accept-Encoding" -- then the 301 redirects "/dir" ->
   "/dir/" for directories with an index.html, then the error pages (404
   from the site's 404.html if it has one, else jinja2-rendered defaults).
   Files are read, hashed and gzipped by a thread pool a bounded distance
   ahead of the writer (zlib and hashlib release the GIL); the writer
   consumes them in order, so the output does not depend on --jobs.
3. write: each response is streamed into the store with the RFC 1071 sum of
   every MSS-sized segment; `StoreWriter` writes to a temp file in the
   output folder and renames it into place only when complete.

Progress: `compile_site(..., progress=fn)` calls fn(files_done, files_total,
bytes_done, bytes_total) once when the walk is done and after each file is
written (bytes are the source files' sizes). Drawing is the caller's business
(a bar on a terminal, a few lines in a log: appliance/content/cli.py); fn is
called on every file, so it should be cheap and throttle itself.

Every header block holds one `Date: ` with a 29-byte IMF-fixdate and one
`Connection: ` with a 10-byte value (`keep-alive`), the fields the stack
patches at serve time (docs/internals.md). Reproducibility: sorted walks,
gzip with mtime=0 at a fixed level, no host paths or build times in the
store; the placeholder Date is SOURCE_DATE_EPOCH if set, else the newest
file mtime; Last-Modified is the file's mtime, clamped to SOURCE_DATE_EPOCH
when that is set (the reproducible-builds convention).
"""
import collections
import gzip
import hashlib
import os
import stat
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import mime
from .checksum import ones_sum
from .store import StoreWriter
from ..http.dates import format_date

__all__ = ["CompileError", "Options", "compile_site", "REASONS", "DEFAULT_MAX_FILE_SIZE",
           "ERROR_STATUSES", "MIN_MSS", "MAX_HEADER"]

DEFAULT_MSS = 1448
MIN_MSS = 536               # RFC 9293 §3.7.1 default send MSS: every peer accepts it
MAX_MSS = 65495
MAX_HEADER = 512            # headers always fit in the first segment (docs/internals.md)
DEFAULT_MAX_FILE_SIZE = 1 << 30
MAX_DATE = 253402300799     # 9999-12-31 23:59:59 UTC
DEFAULT_CACHE_CONTROL = "public, max-age=300"
SERVER = "haboob"

REASONS = {
    200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified",
    400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    412: "Precondition Failed", 413: "Content Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    505: "HTTP Version Not Supported",
}
ERROR_STATUSES = (400, 404, 405, 408, 412, 413, 414, 431, 500, 501, 505)
_MESSAGES = {
    400: "The request could not be understood.",
    404: "The requested page does not exist on this site.",
    405: "This server only answers GET and HEAD.",
    408: "The request took too long to arrive.",
    412: "The page has changed since the version the request refers to.",
    413: "The request carried more content than this server accepts.",
    414: "The request target is too long.",
    431: "The request header fields are too large.",
    500: "The server failed to answer.",
    501: "The request uses a method or coding this server does not implement.",
    505: "This server speaks HTTP/1.0 and HTTP/1.1.",
}

_ERROR_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{{ status }} {{ reason }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:36em;margin:4em auto;color:#333}</style></head>
<body><h1>{{ status }} {{ reason }}</h1>
<p>{{ message }}</p>
<hr><address>{{ server }}</address>
</body>
</html>
"""
_REDIRECT_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>301 Moved Permanently</title></head>
<body><h1>Moved Permanently</h1><p>The page is at <a href="{{ location }}">{{ location }}</a>.</p></body>
</html>
"""


class CompileError(Exception):
    """Bad input at build time; the message names the file and what is wrong."""


@dataclass
class Options:
    mss: int = DEFAULT_MSS
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    cache_control: str = DEFAULT_CACHE_CONTROL
    gzip_level: int = 9
    source_date_epoch: int | None = None      # None: from the environment, else the newest mtime
    server: str = SERVER
    jobs: int = 0                             # threads reading/hashing/gzipping; 0: one per CPU


@dataclass
class SourceFile:
    rel: str                 # "docs/index.html" (UTF-8 str, "/" separated)
    path: str                # the path to read (a symlink's target resolved)
    size: int
    mtime: int


@dataclass
class Result:
    out: str
    files: int
    urls: int
    responses: int
    gzip_variants: int
    skipped_hidden: int
    store_size: int
    seconds: float
    warnings: list = field(default_factory=list)


def _check_name(name: str, where: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CompileError(f"{where}: the file name is not valid UTF-8, so it cannot be a URL path") from None
    bad = [c for c in name if ord(c) < 0x20 or ord(c) == 0x7F]
    if bad:
        raise CompileError(f"{where}: the file name contains control character {bad[0]!r}, "
                           f"so it cannot be a URL path")


def _display(rel: str) -> str:
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk_site(site: str, max_file_size: int, exclude=()):
    """The files of the site, sorted, checked; (files, skipped_hidden)."""
    if not os.path.exists(site):
        raise CompileError(f"site directory {site} does not exist")
    if not os.path.isdir(site):
        raise CompileError(f"site {site} is not a directory")
    root = os.path.realpath(site)
    exclude = {os.path.realpath(p) for p in exclude}
    files = []
    skipped = 0

    def inside(real):
        return real == root or real.startswith(root + os.sep)

    def visit(dir_path, rel_prefix, chain):
        nonlocal skipped
        try:
            entries = sorted(os.scandir(dir_path), key=lambda e: os.fsencode(e.name))
        except OSError as e:
            raise CompileError(f"{os.path.join(site, rel_prefix) or site}: cannot read directory: "
                               f"{e.strerror}") from None
        for e in entries:
            rel = rel_prefix + e.name
            shown = os.path.join(site, _display(rel))
            if e.name.startswith(".") and e.name != ".well-known":
                skipped += 1
                continue
            _check_name(e.name, shown)
            target = e.path
            if e.is_symlink():
                real = os.path.realpath(e.path)
                if not inside(real):
                    raise CompileError(f"{shown}: symlink points outside the site (to {real})")
                if not os.path.exists(real):
                    raise CompileError(f"{shown}: dangling symlink (to {real})")
                target = real
            try:
                st = os.stat(target)
            except OSError as err:
                raise CompileError(f"{shown}: cannot stat: {err.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(target)
                if real in chain:
                    raise CompileError(f"{shown}: symlink loop (back to {real})")
                visit(target, rel + "/", chain | {real})
            elif stat.S_ISREG(st.st_mode):
                if os.path.realpath(target) in exclude:
                    continue
                if st.st_size > max_file_size:
                    raise CompileError(f"{shown}: file is {st.st_size} bytes, over the limit of "
                                       f"{max_file_size} bytes (--max-file-size)")
                if not os.access(target, os.R_OK) and os.geteuid() != 0:
                    raise CompileError(f"{shown}: cannot read file: Permission denied")
                files.append(SourceFile(rel, target, st.st_size, int(st.st_mtime)))
            else:
                raise CompileError(f"{shown}: not a regular file or directory (special files cannot be served)")

    visit(site, "", frozenset({root}))
    if not files:
        raise CompileError(f"site directory {site} contains no files to serve")
    return files, skipped


def _read(f: SourceFile, site: str) -> bytes:
    try:
        with open(f.path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise CompileError(f"{os.path.join(site, _display(f.rel))}: cannot read file: {e.strerror}") from None
    return data


def url_path(rel: str) -> str:
    return "/" + rel


def quote_path(path: str) -> str:
    return urllib.parse.quote(path, safe="/-._~!$&'()*+,;=:@")


class _Builder:
    def __init__(self, writer: StoreWriter, opts: Options, date: bytes):
        self.w = writer
        self.opts = opts
        self.mss = opts.mss
        self.date = date
        self.server = opts.server.encode()
        self.count = 0

    def response(self, status: int, fields, body: bytes = b"", head_only: bool = False,
                 content_length: int | None = None, what: str = "") -> int:
        """Write one response; returns its index. `fields` are (name, value) bytes pairs."""
        start = b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status].encode())
        date_line = b"Date: " + self.date + b"\r\n"
        conn_line = b"Connection: keep-alive\r\n"
        date_off = len(start) + 6
        conn_off = len(start) + len(date_line) + 12
        lines = [start, date_line, conn_line, b"Server: " + self.server + b"\r\n"]
        if content_length is not None:
            fields = [(b"Content-Length", str(content_length).encode())] + list(fields)
        for name, value in fields:
            lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        header = b"".join(lines)
        if len(header) > MAX_HEADER:
            raise CompileError(f"{what}: response header is {len(header)} bytes, over {MAX_HEADER} "
                               f"(a path or option is too long)")
        data = header if head_only else header + body
        mv = memoryview(data)
        mss = self.mss
        sums = [ones_sum(mv[i:i + mss]) for i in range(0, len(data), mss)] or [0]
        self.count += 1
        return self.w.add_response(data, status, len(header), date_off, conn_off, sums)


def _gzip(data: bytes, level: int) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def _prepare(f: SourceFile, site: str, opts: Options):
    """Read, hash and gzip one file (a worker thread: zlib and hashlib release the GIL)."""
    body = _read(f, site)
    if len(body) > opts.max_file_size:
        raise CompileError(f"{os.path.join(site, _display(f.rel))}: file grew over the size limit "
                           f"while compiling")
    digest = hashlib.sha256(body).hexdigest()[:32]
    gz = None
    if body and mime.compressible(f.rel):
        z = _gzip(body, opts.gzip_level)
        if len(z) < len(body):
            gz = z
    return body, digest, gz


def _prepared(files, site, opts: Options):
    """(file, (body, digest, gzip-or-None)) in the files' order, prepared by a thread pool
    a bounded distance ahead (in files and bytes) of the writer. The order of the output
    never depends on the number of jobs: the store stays reproducible."""
    jobs = max(1, opts.jobs or os.cpu_count() or 1)
    if jobs == 1:
        for f in files:
            yield f, _prepare(f, site, opts)
        return
    budget = 256 << 20
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="haboob-compile")
    try:
        queue = collections.deque()
        inflight = 0
        it = iter(files)
        nxt = next(it, None)
        while nxt is not None or queue:
            while nxt is not None and len(queue) < 2 * jobs and (not queue or inflight + nxt.size <= budget):
                queue.append((nxt, pool.submit(_prepare, nxt, site, opts)))
                inflight += nxt.size
                nxt = next(it, None)
            f, fut = queue.popleft()
            inflight -= f.size
            yield f, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def compile_site(site, out, options: Options | None = None, progress=None) -> Result:
    """Compile directory `site` into store file `out`. Raises CompileError on bad input.
    progress: None, or fn(files_done, files_total, bytes_done, bytes_total) (see above)."""
    t0 = time.monotonic()
    opts = options or Options()
    site = os.fspath(site)
    out = os.fspath(out)
    if not MIN_MSS <= opts.mss <= MAX_MSS:
        raise CompileError(f"--mss {opts.mss} is out of range ({MIN_MSS}..{MAX_MSS})")
    if opts.max_file_size < 0:
        raise CompileError("--max-file-size must not be negative")
    if not 1 <= opts.gzip_level <= 9:
        raise CompileError(f"gzip level {opts.gzip_level} is out of range (1..9)")
    for label, v in (("cache-control", opts.cache_control), ("server", opts.server)):
        if not v.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise CompileError(f"--{label} must be printable ASCII")
    if os.path.isdir(out):
        raise CompileError(f"output {out} is a directory; give a file name like site.store")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise CompileError(f"output folder {out_dir} does not exist")

    files, skipped = walk_site(site, opts.max_file_size, exclude=[out])

    sde = opts.source_date_epoch
    if sde is None and os.environ.get("SOURCE_DATE_EPOCH", "").strip():
        try:
            sde = int(os.environ["SOURCE_DATE_EPOCH"])
        except ValueError:
            raise CompileError(f"SOURCE_DATE_EPOCH={os.environ['SOURCE_DATE_EPOCH']!r} is not an integer") from None
    if sde is not None:
        for f in files:
            f.mtime = min(f.mtime, sde)
        date_epoch = sde
    else:
        date_epoch = max(f.mtime for f in files)
    # IMF-fixdate has a 4-digit year: keep every date in 1970..9999 so the Date
    # field stays exactly 29 bytes.
    for f in files:
        f.mtime = min(max(0, f.mtime), MAX_DATE)
    date_epoch = min(max(0, date_epoch), MAX_DATE)
    date = format_date(date_epoch)

    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 is pinned in requirements.txt
        raise CompileError("jinja2 is needed to compile a site (pip install -r requirements.txt)") from None
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True)
    error_tpl = env.from_string(_ERROR_TEMPLATE)
    redirect_tpl = env.from_string(_REDIRECT_TEMPLATE)

    cc = opts.cache_control.encode()
    resources = {}
    redirects = {}
    errors = {}
    gz_count = 0
    nfiles, total_bytes, done_bytes = len(files), sum(f.size for f in files), 0
    if progress is not None:
        progress(0, nfiles, 0, total_bytes)
    with StoreWriter(out, opts.mss) as w:
        b = _Builder(w, opts, date)
        by_rel = {}
        for i, (f, (body, digest, gz)) in enumerate(_prepared(files, site, opts), 1):
            shown = os.path.join(site, f.rel)
            etag = f'"{digest}"'.encode()
            ctype = mime.content_type(f.rel).encode()
            lm = format_date(f.mtime)
            vary = [(b"Vary", b"Accept-Encoding")] if gz is not None else []
            common = [(b"Content-Type", ctype)]
            val = [(b"Last-Modified", lm), (b"ETag", etag), (b"Cache-Control", cc)]
            full = common + val + [(b"Accept-Ranges", b"bytes")] + vary
            get = b.response(200, full, body, content_length=len(body), what=shown)
            head = b.response(200, full, body, head_only=True, content_length=len(body), what=shown)
            nm = b.response(304, val + vary, what=shown)
            body_off = w.responses[get][1] + w.responses[get][3]
            d = {"size": len(body), "etag": etag.decode(), "gzip_etag": None, "mtime": f.mtime,
                 "type": ctype.decode(), "get": get, "head": head, "nm": nm, "gz_get": None,
                 "gz_head": None, "gz_nm": None, "body_off": body_off, "vary": bool(vary),
                 "cc": opts.cache_control, "file": f.rel}
            if gz is not None:
                gz_count += 1
                getag = f'"{digest}-gz"'.encode()
                gval = [(b"Last-Modified", lm), (b"ETag", getag), (b"Cache-Control", cc)]
                gfull = common + gval + [(b"Accept-Ranges", b"bytes")] + vary + [(b"Content-Encoding", b"gzip")]
                d["gzip_etag"] = getag.decode()
                d["gz_get"] = b.response(200, gfull, gz, content_length=len(gz), what=shown)
                d["gz_head"] = b.response(200, gfull, gz, head_only=True, content_length=len(gz), what=shown)
                d["gz_nm"] = b.response(304, gval + vary, what=shown)
            by_rel[f.rel] = d
            resources[url_path(f.rel)] = d
            del body, gz
            if progress is not None:
                done_bytes += f.size
                progress(i, nfiles, done_bytes, total_bytes)

        # "/dir/" serves dir/index.html; "/dir" redirects there (RFC 9110 §15.4.2).
        for rel, d in by_rel.items():
            if rel == "index.html" or rel.endswith("/index.html"):
                dir_path = url_path(rel[:-len("index.html")])
                resources[dir_path] = dict(d)
                if dir_path != "/":
                    src = dir_path[:-1]
                    if src in resources:
                        continue   # a file named like the directory cannot exist; be safe anyway
                    loc = quote_path(dir_path)
                    page = redirect_tpl.render(location=loc).encode()
                    fields = [(b"Location", loc.encode()), (b"Content-Type", b"text/html; charset=utf-8")]
                    g = b.response(301, fields, page, content_length=len(page), what=src)
                    h = b.response(301, fields, page, head_only=True, content_length=len(page), what=src)
                    redirects[src] = [g, h]

        html = b"text/html; charset=utf-8"
        for status in ERROR_STATUSES:
            ctype = html
            if status == 404 and "404.html" in by_rel:
                page = _read(next(f for f in files if f.rel == "404.html"), site)
                ctype = by_rel["404.html"]["type"].encode()
            else:
                page = error_tpl.render(status=status, reason=REASONS[status], message=_MESSAGES[status],
                                        server=opts.server).encode()
            fields = [(b"Content-Type", ctype)]
            if status == 405:
                fields.append((b"Allow", b"GET, HEAD"))
            if status == 404:
                fields.append((b"Cache-Control", b"no-cache"))
            g = b.response(status, fields, page, content_length=len(page), what=f"error page {status}")
            h = b.response(status, fields, page, head_only=True, content_length=len(page),
                           what=f"error page {status}")
            errors[str(status)] = [g, h]

        meta = {"format": 1, "mss": opts.mss, "server": opts.server, "date": date_epoch,
                "files": len(files), "cache_control": opts.cache_control, "gzip_level": opts.gzip_level,
                "max_file_size": opts.max_file_size}
        w.finish({"resources": resources, "redirects": redirects, "errors": errors, "meta": meta})
        nresp = b.count
    return Result(out=out, files=len(files), urls=len(resources), responses=nresp, gzip_variants=gz_count,
                  skipped_hidden=skipped, store_size=os.path.getsize(out), seconds=time.monotonic() - t0)
