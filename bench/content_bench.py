"""Content-store benchmark: compile time, store size, request-handling throughput.

Theory of operation: three measurements, each on sites this script
generates in a temporary folder and always removes (also on error or
Ctrl-C):

1. compile the bundled example site (examples/www): wall time, store size;
2. compile a generated site of --files files totalling about --total-mb MB
   (deterministic: 40% HTML text, 10% CSS/JS, 30% PNG-named and 20% .bin
   pseudo-random bytes, sizes spread around the mean): wall time, size;
3. throughput for one 4 KB page:
   - `python -m appliance respond` with N pipelined keep-alive requests on
     stdin (the whole tool, process start subtracted, output to /dev/null);
   - `HTTPConnection.receive` in process, one whole request per call (what
     the stack does per received segment), with the reply cache (hot path)
     and without it (full parse + selection every time).
This is a benchmark, not a test: it prints numbers, asserts nothing.

    python -m bench.content_bench                  # everything (~1-2 min, ~1.2 GB temp disk)
    python -m bench.content_bench --quick          # skip the 500 MB site
"""
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from appliance.content.compiler import Options, compile_site  # noqa: E402
from appliance.content.store import Store  # noqa: E402
from appliance.http import HTTPConnection, Limits, reply_bytes  # noqa: E402

WORDS = ("sand dust storm wind desert front haboob packet segment checksum window ack sequence server "
         "client kernel ring batch core prebuilt response header body the of a to and in is that").split()
SDE = 1700000000


def _corpus(rng, n):
    out, size = [], 0
    while size < n:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out).encode()


def generate_site(root, files, total_bytes, seed=2014):
    """A deterministic site of `files` files of about `total_bytes` in all."""
    rng = random.Random(seed)
    corpus = _corpus(rng, 4 << 20)
    mean = total_bytes / files
    written = 0
    for i in range(files):
        d = os.path.join(root, f"section{i // 100:03d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        size = max(64, int(rng.uniform(0.05, 1.95) * mean))
        kind = rng.random()
        if kind < 0.4:
            name, off = f"page{i:05d}.html", rng.randrange(len(corpus) - size)
            data = b"<!DOCTYPE html><html><body><p>" + corpus[off:off + size - 40] + b"</p></body></html>\n"
        elif kind < 0.5:
            name, off = f"asset{i:05d}.{'css' if kind < 0.45 else 'js'}", rng.randrange(len(corpus) - size)
            data = corpus[off:off + size]
        elif kind < 0.8:
            name, data = f"image{i:05d}.png", rng.randbytes(size)
        else:
            name, data = f"blob{i:05d}.bin", rng.randbytes(size)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        written += len(data)
    with open(os.path.join(root, "index.html"), "wb") as f:
        f.write(b"<!DOCTYPE html><title>generated</title><p>generated site</p>\n")
    return written


def _compile(site, out):
    t0 = time.perf_counter()
    r = compile_site(site, out, Options(source_date_epoch=SDE))
    return time.perf_counter() - t0, r


def bench_respond_tool(store_path, n):
    req = b"GET /page.html HTTP/1.1\r\nHost: bench\r\nAccept: */*\r\n\r\n"
    cmd = [sys.executable, "-m", "appliance", "respond", store_path, "--date", "Sun, 06 Nov 1994 08:49:37 GMT"]

    def run(k):
        t0 = time.perf_counter()
        subprocess.run(cmd, input=req * k, stdout=subprocess.DEVNULL, check=True, cwd=ROOT)
        return time.perf_counter() - t0
    base = min(run(1) for _ in range(3))
    full = min(run(n) for _ in range(3))
    return n / max(full - base, 1e-9), base


def bench_receive(store, n, cached):
    req = b"GET /page.html HTTP/1.1\r\nHost: bench\r\nAccept: */*\r\nUser-Agent: bench\r\n\r\n"
    limits = Limits() if cached else Limits(cache_entries=0)
    conn = HTTPConnection(store.site, store.blob, limits)
    conn.receive(req)
    t0 = time.perf_counter()
    for _ in range(n):
        conn.receive(req)
    dt = time.perf_counter() - t0
    return n / dt


def bench_reply_bytes(store, n):
    conn = HTTPConnection(store.site, store.blob)
    [r] = conn.receive(b"GET /page.html HTTP/1.1\r\nHost: bench\r\n\r\n")
    d = b"Sun, 06 Nov 1994 08:49:37 GMT"
    t0 = time.perf_counter()
    for _ in range(n):
        reply_bytes(r, store.blob, d)
    return n / (time.perf_counter() - t0)


@click.command()
@click.option("--files", default=10000, show_default=True, help="Files in the generated site.")
@click.option("--total-mb", default=500, show_default=True, help="Total size of the generated site (MB).")
@click.option("--requests", "nreq", default=20000, show_default=True, help="Requests per throughput run.")
@click.option("--quick", is_flag=True, help="Skip the generated big site.")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="Use this folder instead of a temporary one and keep it (for inspection).")
def main(files, total_mb, nreq, quick, keep):
    """Measure compile time, store size and request throughput of the content store."""
    work = keep or tempfile.mkdtemp(prefix="hb-content-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        out = os.path.join(work, "www.store")
        dt, r = _compile(os.path.join(ROOT, "examples", "www"), out)
        src = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(ROOT, "examples", "www"))
                  for f in fs)
        click.echo(f"example site: {r.files} files, {src} bytes -> {r.urls} URLs, {r.responses} responses, "
                   f"store {r.store_size} bytes, compile {dt:.2f} s")

        page_site = os.path.join(work, "page")
        os.makedirs(page_site)
        rng = random.Random(1)
        body = b"<!DOCTYPE html><html><body><p>" + _corpus(rng, 4096) + b"</p></body></html>\n"
        with open(os.path.join(page_site, "page.html"), "wb") as f:
            f.write(body[:4096])
        page_store = os.path.join(work, "page.store")
        _compile(page_site, page_store)
        rps, start = bench_respond_tool(page_store, nreq)
        click.echo(f"respond tool, 4 KB page, {nreq} pipelined requests: {rps:,.0f} requests/s "
                   f"(process start {start * 1000:.0f} ms subtracted)")
        with Store.open(page_store) as s:
            for cached in (True, False):
                v = max(bench_receive(s, nreq * 5, cached) for _ in range(3))
                click.echo(f"HTTPConnection.receive, 4 KB page, {'with' if cached else 'without'} reply cache: "
                           f"{v:,.0f} requests/s")
            v = max(bench_reply_bytes(s, nreq * 5) for _ in range(3))
            click.echo(f"reply_bytes (copy + patch Date/Connection), 4 KB page: {v:,.0f} replies/s")

        if not quick:
            big = os.path.join(work, "big")
            os.makedirs(big)
            t0 = time.perf_counter()
            total = generate_site(big, files, total_mb * 1000 * 1000)
            gen = time.perf_counter() - t0
            big_store = os.path.join(work, "big.store")
            dt, r = _compile(big, big_store)
            click.echo(f"generated site: {files} files, {total / 1e6:.0f} MB (generated in {gen:.1f} s) -> "
                       f"{r.urls} URLs, {r.responses} responses ({r.gzip_variants} gzip variants), "
                       f"store {r.store_size / 1e6:.0f} MB, compile {dt:.1f} s")
            t0 = time.perf_counter()
            with Store.open(big_store):
                pass
            click.echo(f"  Store.open with SHA-256 verification: {time.perf_counter() - t0:.2f} s")
            t0 = time.perf_counter()
            with Store.open(big_store, verify=False):
                pass
            click.echo(f"  Store.open without verification: {time.perf_counter() - t0:.2f} s")
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
