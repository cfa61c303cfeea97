"""`python -m appliance respond`: what the appliance answers to raw requests.

Theory of operation: read raw HTTP request bytes from stdin, feed them to
one `HTTPConnection` (all at once, or N bytes at a time with --chunk to
mimic small segments), and write to stdout exactly the bytes the appliance
would send: prebuilt responses with the Date and Connection fields patched
as the stack patches them. The Date is the current time, or --date for
reproducible output, or the store's placeholder with --placeholder-date.
With --tls: what the appliance sends inside the TLS tunnel (the same bytes,
plus Strict-Transport-Security with --hsts), and on stderr, per reply, the
plaintext size of each TLS record it is cut into (appliance.stack.tls
record_plan: small records filling one segment of --mss, then 16 KB).
"""
import os
import sys
import time

import click

from ..content.store import Store, StoreError
from .conn import HTTPConnection, reply_bytes
from .dates import format_date, parse_date


@click.command("respond")
@click.argument("store_path", metavar="FILE.store", type=click.Path(dir_okay=False))
@click.option("--date", "date", default=None, metavar="IMF-FIXDATE",
              help='The Date to send, e.g. "Sun, 06 Nov 1994 08:49:37 GMT" (default: now).')
@click.option("--placeholder-date", is_flag=True, help="Keep the Date stored in the prebuilt responses.")
@click.option("--chunk", default=0, type=click.IntRange(0), metavar="N",
              help="Feed the input N bytes at a time (default: all at once).")
@click.option("--tls", is_flag=True, help="Show what is sent inside TLS (records on stderr).")
@click.option("--hsts", default=0, type=click.IntRange(0), metavar="SECONDS",
              help="With --tls: the Strict-Transport-Security max-age (0: none).")
@click.option("--mss", default=1448, type=click.IntRange(64, 9000), show_default=True,
              help="With --tls: the connection's MSS, for the record sizes (TLS 1.3 overhead).")
def respond_cmd(store_path, date, placeholder_date, chunk, tls, hsts, mss):
    """Read raw HTTP requests on stdin; write the exact reply bytes to stdout."""
    try:
        store = Store.open(store_path)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    if date is not None:
        t = parse_date(date.encode())
        if t is None or len(date) != 29:
            raise click.BadParameter(f"{date!r} is not an IMF-fixdate like 'Sun, 06 Nov 1994 08:49:37 GMT'",
                                     param_hint="--date")
        d = date.encode()
    elif placeholder_date:
        d = store.site.date
    else:
        d = format_date(time.time())
    conn = HTTPConnection(store.site, store.blob)
    conn.now(d)
    data = sys.stdin.buffer.read()
    out = sys.stdout.buffer
    step = chunk or max(1, len(data))
    try:
        for i in range(0, len(data), step):
            for reply in conn.receive(data[i:i + step]):
                b = reply_bytes(reply, store.blob, None if placeholder_date else d)
                if tls:
                    b = _in_tunnel(b, hsts, mss)
                out.write(b)
            if conn.closed:
                break
        out.flush()
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    except OSError as e:
        raise click.ClickException(f"cannot write the replies: {e.strerror}") from None


def _in_tunnel(b: bytes, hsts: int, mss: int) -> bytes:
    """The reply as TlsConn encrypts it (HSTS added), its record sizes on stderr."""
    from ..stack.tls import RECORD_OVERHEAD, record_plan
    if hsts:
        head, sep, body = b.partition(b"\r\n\r\n")
        b = head + b"\r\nStrict-Transport-Security: max-age=%d\r\n\r\n" % hsts + body
    plan = record_plan(len(b), mss - RECORD_OVERHEAD["TLSv1.3"])
    status = b.split(b"\r\n", 1)[0].decode(errors="replace")
    click.echo(f"{status}: {len(b)} bytes in "
               f"{len(plan)} TLS 1.3 records: {' '.join(map(str, plan))}", err=True)
    return b
