"""`python -m appliance compile` and `python -m appliance inspect`.

Theory of operation: thin click wrappers; all the work and every check is in
`compiler` and `store`. Their errors (CompileError, StoreError) become one
clear line on stderr and exit status 1.
"""
import json
import re

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
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def compile_cmd(site, out, mss, max_file_size, cache_control, gzip_level, source_date_epoch, jobs, quiet):
    """Compile a site directory into a content store of prebuilt responses."""
    opts = Options(mss=mss, max_file_size=max_file_size, cache_control=cache_control,
                   gzip_level=gzip_level, source_date_epoch=source_date_epoch, jobs=jobs)
    try:
        r = compile_site(site, out, opts)
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
