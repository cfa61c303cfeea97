"""`python -m appliance compile` and `python -m appliance inspect`.

Theory of operation: thin click wrappers; all the work and every check is in
`compiler` and `store`. Their errors (CompileError, StoreError) become one
clear line on stderr and exit status 1. `CompileProgress` draws the
compiler's progress callback for a person; build.py uses it too. Like the
compiler, this module runs on the build host only (it is not in the image).
"""
import json
import re
import sys
import time

import click

from .compiler import DEFAULT_MAX_FILE_SIZE, DEFAULT_MSS, DEFAULT_CACHE_CONTROL, CompileError, Options, compile_site
from .store import Store, StoreError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SizeType(click.ParamType):
    """A byte count: 1048576, 512K, 20M, 1G (binary units)."""
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.IGNORECASE)
        if not m:
            self.fail(f"{value!r} is not a size (examples: 1048576, 512K, 20M, 1G)", param, ctx)
        return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


class CompileProgress:
    """compile_site's progress callback, drawn on `stream` (default stderr).

    On a terminal: a click progress bar over the bytes with file counts, MB
    and an ETA, redrawn at most every `interval` seconds (the callback runs
    once per file: 10,000 redraws would cost more than the drawing is worth).
    Elsewhere (a pipe, a CI log): plain lines through `line`, one when the
    files are known and one each time another quarter of the bytes is done:
    no carriage returns, no escape codes. With plain=False nothing is drawn
    off a terminal. Use it as a context manager: leaving ends the bar's line
    (also on an error), so whatever is printed next starts on a line of its own.
    """
    QUARTERS = 4

    def __init__(self, label: str = "compiling", stream=None, line=None, plain: bool = True,
                 tty: bool | None = None, interval: float = 0.1):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.line = line or (lambda msg: click.echo(msg, file=self.stream))
        self.plain = plain
        self.interval = interval
        self.bar = None
        self.files = self.nfiles = self.done = self.total = 0
        self._next = 0.0                # the time (tty) or the quarter (plain) of the next output

    @property
    def active(self) -> bool:
        """Whether it draws anything (if not, pass progress=None: not even a call per file)."""
        return self.tty or self.plain

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __call__(self, files: int, nfiles: int, done: int, total: int) -> None:
        self.files, self.nfiles, self.done, self.total = files, nfiles, done, total
        if self.tty:
            now = time.monotonic()
            if now < self._next and files < nfiles:
                return
            self._next = now + self.interval
            if self.bar is None:
                self.bar = click.progressbar(length=max(total, 1), label=self.label, file=self.stream,
                                             show_percent=True, show_eta=True, width=0,
                                             item_show_func=self._counts)
                self.bar.__enter__()
            self.bar.update(done - self.bar.pos)
        elif self.plain:
            frac = done / total if total else files / nfiles if nfiles else 1.0
            quarter = int(frac * self.QUARTERS)
            if files == 0:
                self.line(f"{self.label}: {nfiles} files, {_mb(total)} MB")
                self._next = 1
            elif quarter >= self._next:
                self.line(f"{self.label}: {self._counts()} ({quarter * 100 // self.QUARTERS}%)")
                self._next = quarter + 1

    def _counts(self, _item=None) -> str:
        # Padded to the totals' widths: the bar's line keeps one length while it grows.
        n, t = str(self.nfiles), _mb(self.total)
        return f"{self.files:>{len(n)}}/{n} files, {_mb(self.done):>{len(t)}}/{t} MB"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):      # no isatty, or closed
        return False


@click.command("compile")
@click.option("--site", "site", required=True, metavar="DIR", type=click.Path(file_okay=True, dir_okay=True),
              help="The site directory to compile.")
@click.option("--out", "out", required=True, metavar="FILE.store", type=click.Path(dir_okay=False),
              help="The store file to write (written to a temp file, renamed when complete).")
@click.option("--mss", default=DEFAULT_MSS, show_default=True, type=int,
              help="TCP MSS the responses are cut at (536..65495).")
@click.option("--max-file-size", default=DEFAULT_MAX_FILE_SIZE, show_default="1G", type=SizeType(),
              help="Refuse files larger than this (e.g. 500M, 2G).")
@click.option("--cache-control", default=DEFAULT_CACHE_CONTROL, show_default=True,
              help="Cache-Control value of every page.")
@click.option("--gzip-level", default=9, show_default=True, type=click.IntRange(1, 9),
              help="zlib level of the prebuilt gzip variants.")
@click.option("--source-date-epoch", type=int, default=None,
              help="Placeholder Date and Last-Modified clamp (default: $SOURCE_DATE_EPOCH, "
                   "else the newest file's mtime).")
@click.option("-j", "--jobs", default=0, type=click.IntRange(0),
              help="Threads reading, hashing and gzipping files (default: one per CPU). "
                   "The store does not depend on it.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success (and no progress bar).")
def compile_cmd(site, out, mss, max_file_size, cache_control, gzip_level, source_date_epoch, jobs, quiet):
    """Compile a site directory into a content store of prebuilt responses.

    On a terminal, a progress bar on stderr shows the files and bytes done;
    piped, the one summary line is all it prints."""
    opts = Options(mss=mss, max_file_size=max_file_size, cache_control=cache_control,
                   gzip_level=gzip_level, source_date_epoch=source_date_epoch, jobs=jobs)
    try:
        with CompileProgress(plain=False, tty=False if quiet else None) as progress:
            r = compile_site(site, out, opts, progress=progress if progress.active else None)
    except CompileError as e:
        raise click.ClickException(str(e)) from None
    if not quiet:
        click.echo(f"{r.out}: {r.files} files, {r.urls} URLs, {r.responses} responses "
                   f"({r.gzip_variants} gzip variants), {r.store_size} bytes, {r.seconds:.2f} s"
                   + (f"; skipped {r.skipped_hidden} hidden entries" if r.skipped_hidden else ""))


def _variants(store):
    site = store.site
    for path in sorted(site.resources):
        res = site.resources[path]
        yield path, "GET", res.get
        yield path, "HEAD", res.head
        yield path, "304", res.not_modified
        if res.gzip_get is not None:
            yield path, "GET gzip", res.gzip_get
            yield path, "HEAD gzip", res.gzip_head
            yield path, "304 gzip", res.gzip_not_modified
    for path in sorted(site.redirects):
        yield path, "GET", site.redirects[path]
        yield path, "HEAD", site.redirects_head[path]
    for status in sorted(site.errors):
        g, h = site.errors[status]
        yield f"(error {status})", "GET", g
        yield f"(error {status})", "HEAD", h


@click.command("inspect")
@click.argument("store_path", metavar="FILE.store", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def inspect_cmd(store_path, as_json):
    """List every URL of a store with its variants, sizes and segment counts."""
    try:
        store = Store.open(store_path)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    try:
        with store:
            _list(store, store_path, as_json)
    except BrokenPipeError:
        raise           # click exits quietly when the reader goes away
    except OSError as e:
        raise click.ClickException(f"cannot write the listing: {e.strerror}") from None


def _list(store, store_path, as_json):
    """Write the listing: a header line and a table, or JSON lines."""
    meta = store.meta
    if not as_json:
        click.echo(f"# {store_path}: format {meta.get('format')}, mss {store.mss}, "
                   f"{len(store.site.resources)} URLs, blob {len(store.blob)} bytes, "
                   f"placeholder date {store.site.date.decode()}")
        click.echo(f"{'URL':<40} {'STATUS':>6} {'VARIANT':<10} {'BYTES':>10} {'HEADER':>6} {'SEGS':>6}")
    for path, variant, r in _variants(store):
        if as_json:
            click.echo(json.dumps({"url": path, "variant": variant, "status": r.status, "bytes": r.length,
                                   "header": r.header_len, "segments": r.nsegs}, sort_keys=True))
        else:
            click.echo(f"{path:<40} {r.status:>6} {variant:<10} {r.length:>10} {r.header_len:>6} {r.nsegs:>6}")
