"""`python -m appliance respond`: what the appliance answers to raw requests.

Theory of operation: read raw HTTP request bytes from stdin, feed them to
one `HTTPConnection` (all at once, or N bytes at a time with --chunk to
mimic small segments), and write to stdout exactly the bytes the appliance
would send: prebuilt responses with the Date and Connection fields patched
as the stack patches them. The Date is the current time, or --date for
reproducible output, or the store's placeholder with --placeholder-date.
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
def respond_cmd(store_path, date, placeholder_date, chunk):
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
                out.write(reply_bytes(reply, store.blob, None if placeholder_date else d))
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
