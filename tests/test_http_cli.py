"""`python -m appliance respond`: the exact bytes the appliance sends, for raw requests on stdin."""
import os
import subprocess
import sys

import pytest


from .content_support import EXAMPLE, SDE, h11_parse, httpclient_parse, example_store_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATE = "Tue, 15 Nov 1994 12:45:26 GMT"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return example_store_path()


def respond(store_path, raw, *args):
    return subprocess.run([sys.executable, "-m", "appliance", "respond", store_path, *args], input=raw,
                          cwd=ROOT, capture_output=True, timeout=60)


def test_respond_pipelined(store_path):
    raw = (b"GET /robots.txt HTTP/1.1\r\nHost: t\r\n\r\n"
           b"GET /downloads/data.txt HTTP/1.1\r\nHost: t\r\nRange: bytes=-10\r\n\r\n"
           b"HEAD / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
           b"GET /never-answered HTTP/1.1\r\nHost: t\r\n\r\n")
    p = respond(store_path, raw, "--date", DATE)
    assert p.returncode == 0, p.stderr
    res = h11_parse([("GET", "/robots.txt"), ("GET", "/downloads/data.txt"), ("HEAD", "/")], p.stdout)
    assert [r[0] for r in res] == [200, 206, 200]
    assert all(r[1]["date"] == DATE for r in res)
    assert res[0][2] == b"User-agent: *\nAllow: /\n"
    with open(os.path.join(EXAMPLE, "downloads", "data.txt"), "rb") as f:
        assert res[1][2] == f.read()[-10:]
    assert res[2][1]["connection"] == "close"
    assert p.stdout.count(b"HTTP/1.1 ") == 3          # nothing after the close


def test_respond_chunked_input_gives_same_bytes(store_path):
    raw = b"GET /about.html HTTP/1.1\r\nHost: t\r\n\r\nGET /docs HTTP/1.1\r\nHost: t\r\n\r\n"
    a = respond(store_path, raw, "--date", DATE).stdout
    b = respond(store_path, raw, "--date", DATE, "--chunk", "1").stdout
    assert a == b and a.count(b"HTTP/1.1 ") == 2


def test_respond_placeholder_date(store_path):
    p = respond(store_path, b"GET / HTTP/1.0\r\n\r\n", "--placeholder-date")
    status, h, body = httpclient_parse(p.stdout)
    assert status == 200 and h["connection"] == "close"
    from appliance.http.dates import format_date
    assert h["date"] == format_date(SDE).decode()


def test_respond_bad_input(store_path, tmp_path):
    p = respond(store_path, b"", "--date", "yesterday")
    assert p.returncode == 2 and b"IMF-fixdate" in p.stderr
    bad = tmp_path / "bad.store"
    bad.write_bytes(b"\0" * 5000)
    p = respond(str(bad), b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert p.returncode == 1 and b"not a Haboob store" in p.stderr
    p = respond(store_path, b"garbage\r\n\r\n", "--date", DATE)
    assert p.returncode == 0 and p.stdout.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_respond_output_errors(store_path):
    raw = b"GET /downloads/data.txt HTTP/1.1\r\nHost: t\r\n\r\n" * 4
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-m", "appliance", "respond", store_path], input=raw, cwd=ROOT,
                           stdout=full, stderr=subprocess.PIPE, timeout=60)
    assert p.returncode == 1 and b"cannot write the replies" in p.stderr
    # a reader that goes away early is not an error
    p = subprocess.Popen([sys.executable, "-m", "appliance", "respond", store_path], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(raw)
    p.stdin.close()
    p.stdout.read(100)
    p.stdout.close()
    assert p.wait(timeout=60) == 0
    assert p.stderr.read() == b""
    p.stderr.close()
