"""The store file: reproducible, integrity-checked, zero-copy, segments at the MSS."""
import mmap
import pathlib
import os
import shutil

import pytest

from appliance.content.compiler import Options, compile_site
from appliance.content.store import HEADER_SIZE, MAGIC, Store, StoreError

from .content_support import EXAMPLE, SDE, compile_tree, example_store_path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = example_store_path()
    return os.path.dirname(out), pathlib.Path(out)


def test_reproducible(built, tmp_path):
    d, out = built
    # same site, same options, another output name and a copy of the site elsewhere
    copy = tmp_path / "copy"
    shutil.copytree(EXAMPLE, copy)
    out2 = tmp_path / "b.store"
    compile_site(str(copy), str(out2), Options(source_date_epoch=SDE))
    assert out.read_bytes() == out2.read_bytes()


def test_jobs_do_not_change_the_store(tmp_path):
    site = tmp_path / "s"
    for i in range(60):      # sizes vary so that workers finish out of order
        (site / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (site / f"d{i % 4}" / f"p{i}.html").write_bytes(b"<p>%d</p>" % i * (1 + (i * 7919) % 3000))
    outs = []
    for jobs in (1, 2, 5):
        o = tmp_path / f"j{jobs}.store"
        compile_site(str(site), str(o), Options(source_date_epoch=SDE, jobs=jobs))
        outs.append(o.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_reproducible_without_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    site = tmp_path / "s"
    site.mkdir()
    (site / "a.html").write_bytes(b"<p>a</p>" * 50)
    os.utime(site / "a.html", (1600000000, 1600000000))
    compile_site(str(site), str(tmp_path / "1.store"))
    compile_site(str(site), str(tmp_path / "2.store"))
    assert (tmp_path / "1.store").read_bytes() == (tmp_path / "2.store").read_bytes()
    with Store.open(str(tmp_path / "1.store")) as s:
        assert s.site.date == b"Sun, 13 Sep 2020 12:26:40 GMT"   # newest mtime


def test_source_date_epoch_env_clamps(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000000000")
    s = compile_tree(tmp_path, {"a.txt": b"x"}, source_date_epoch=None)
    assert s.site.date == b"Sun, 09 Sep 2001 01:46:40 GMT"
    assert s.site.resources["/a.txt"].last_modified == 1000000000
    s.close()


def test_options_change_the_store(built, tmp_path):
    d, out = built
    out2 = tmp_path / "m.store"
    compile_site(EXAMPLE, str(out2), Options(source_date_epoch=SDE, mss=536))
    assert out.read_bytes() != out2.read_bytes()
    with Store.open(str(out2)) as s:
        assert s.mss == 536
        r = s.site.resources["/downloads/data.txt"].get
        assert len(r.sums) == -(-r.length // 536)


def test_zero_copy_blob(built):
    d, out = built
    s = Store.open(str(out))
    assert isinstance(s.blob, memoryview) and isinstance(s.blob.obj, mmap.mmap)
    assert s.blob.readonly
    r = s.site.resources["/about.html"].get
    assert isinstance(r.sums, memoryview) and r.sums.format == "H"
    assert bytes(s.blob[r.off:r.off + 15]) == b"HTTP/1.1 200 OK"
    s.close()


def test_response_layout_contract(built):
    with Store.open(str(built[1])) as s:
        for r in s.site.responses:
            data = bytes(s.blob[r.off:r.off + r.length])
            head = data[:r.header_len]
            assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
            assert r.header_len <= 512 and r.header_len <= s.mss
            assert head.count(b"\r\nDate: ") == 1 and head.count(b"\r\nConnection: ") == 1
            assert data[r.date_off - 8:r.date_off] == b"\r\nDate: " and len(data[r.date_off:r.date_off + 29]) == 29
            assert data[r.date_off + 29:r.date_off + 31] == b"\r\n"
            assert data[r.conn_off:r.conn_off + 12] == b"keep-alive\r\n"
            assert data[r.date_off:r.date_off + 29] == s.site.date
        res = s.site.resources["/docs/"]
        assert res.get is s.site.resources["/docs/index.html"].get
        assert bytes(s.blob[res.body_off:res.body_off + res.size]) == open(
            os.path.join(EXAMPLE, "docs", "index.html"), "rb").read()
        assert set(s.site.errors) >= {400, 404, 405, 413, 414, 431, 501, 505}
        assert set(s.site.redirects) == {"/docs", "/docs/guide", "/docs/reference", "/downloads"}


def test_flipped_byte_refused(built, tmp_path):
    d, out = built
    data = out.read_bytes()
    size = len(data)
    # header fields, digest, padding, blob start/middle/end, sums, tables
    for pos in (8, 16, 30, 60, 100, 1000, HEADER_SIZE, HEADER_SIZE + 5000, size // 2, size - 3000, size - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        p = tmp_path / "bad.store"
        p.write_bytes(bad)
        with pytest.raises(StoreError) as e:
            Store.open(str(p))
        assert str(p) in str(e.value), pos


def test_bad_files_messages(built, tmp_path):
    data = built[1].read_bytes()
    cases = {
        "trunc.store": (data[:-10], "truncated"),
        "short.store": (data[:20], "too short"),
        "magic.store": (b"NOTASTOR" + data[8:], "not a Haboob store"),
        "version.store": (data[:8] + b"\x63\0\0\0" + data[12:], "version 99"),
        "trailing.store": (data + b"x", "trailing"),
        "empty.store": (b"", "too short"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(StoreError, match=msg):
            Store.open(str(p))
    with pytest.raises(StoreError, match="cannot open"):
        Store.open(str(tmp_path / "missing.store"))


def test_header_fields(built):
    data = built[1].read_bytes()
    assert data[:8] == MAGIC


def test_empty_file_and_odd_sizes(tmp_path):
    s = compile_tree(tmp_path, {"empty.txt": b"", "one.bin": b"\x01", "odd.txt": b"abc" * 1001})
    for path, body in (("/empty.txt", b""), ("/one.bin", b"\x01"), ("/odd.txt", b"abc" * 1001)):
        res = s.site.resources[path]
        assert res.size == len(body)
        assert bytes(s.blob[res.body_off:res.body_off + res.size]) == body
    s.close()


def test_runtime_modules_use_only_the_standard_library():
    """What runs in the image (store, site, checksum, http) imports nothing outside the
    standard library: run it with site-packages disabled (-S) and isolated (-I)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from appliance.content.store import Store\n"
            "from appliance.http import HTTPConnection, reply_bytes\n"
            "s = Store.open(%r)\n"
            "[r] = HTTPConnection(s.site, s.blob).receive(b'GET /robots.txt HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n')\n"
            "sys.stdout.buffer.write(reply_bytes(r, s.blob))\n"
            "assert not {'click', 'jinja2', 'h11', 'scapy'} & set(sys.modules), sys.modules.keys()\n"
            % (root, example_store_path()))
    p = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(b"HTTP/1.1 200 OK\r\n") and p.stdout.endswith(b"\r\n\r\nUser-agent: *\nAllow: /\n")


def test_dates_outside_imf_fixdate_range_are_clamped(tmp_path):
    site = tmp_path / "s"
    site.mkdir()
    (site / "past.txt").write_bytes(b"p")
    os.utime(site / "past.txt", (-1000, -1000))
    # a year-11476 epoch (file systems clamp such mtimes themselves, SOURCE_DATE_EPOCH does not)
    compile_site(str(site), str(tmp_path / "x.store"), Options(source_date_epoch=300000000000))
    with Store.open(str(tmp_path / "x.store")) as s:
        assert s.site.date == b"Fri, 31 Dec 9999 23:59:59 GMT"
        assert s.site.resources["/past.txt"].last_modified == 0
        for r in s.site.responses:
            assert s.blob[r.off + r.date_off + 29:r.off + r.date_off + 31] == b"\r\n"
