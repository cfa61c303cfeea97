"""Build-time bad input: a clear error naming the file, non-zero exit, nothing left behind.
Plus the compile/inspect commands."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from appliance.content import compiler
from appliance.content.cli import compile_cmd, inspect_cmd
from appliance.content.compiler import CompileError, Options, compile_site
from appliance.content.store import Store

from .content_support import EXAMPLE, SDE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(tmp_path, files):
    site = tmp_path / "site"
    site.mkdir()
    for rel, data in files.items():
        p = site / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return site


def fails(tmp_path, site, match, **opts):
    out = tmp_path / "out" / "x.store"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(CompileError, match=match) as e:
        compile_site(str(site), str(out), Options(source_date_epoch=SDE, **opts))
    assert os.listdir(out.parent) == []          # no store, no temp file
    return str(e.value)


def test_missing_site(tmp_path):
    fails(tmp_path, tmp_path / "nope", "does not exist")


def test_site_is_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    fails(tmp_path, tmp_path / "f", "not a directory")


def test_empty_site(tmp_path):
    site = make(tmp_path, {".hidden": b"x"})
    (site / "emptydir").mkdir()
    fails(tmp_path, site, "contains no files")


def test_symlink_outside(tmp_path):
    site = make(tmp_path, {"a.txt": b"a"})
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", site / "leak.txt")
    msg = fails(tmp_path, site, "symlink points outside the site")
    assert "leak.txt" in msg
    os.unlink(site / "leak.txt")
    os.symlink("../", site / "up")
    assert "up" in fails(tmp_path, site, "outside the site")


def test_dangling_symlink(tmp_path):
    site = make(tmp_path, {"a.txt": b"a"})
    os.symlink("missing.txt", site / "b.txt")
    assert "b.txt" in fails(tmp_path, site, "dangling symlink")


def test_symlink_inside_is_served(tmp_path):
    site = make(tmp_path, {"a.txt": b"aaa", "sub/index.html": b"<p>x</p>"})
    os.symlink("a.txt", site / "b.txt")
    os.symlink("sub", site / "alias")
    out = tmp_path / "x.store"
    compile_site(str(site), str(out), Options(source_date_epoch=SDE))
    with Store.open(str(out)) as s:
        assert {"/a.txt", "/b.txt", "/alias/", "/alias/index.html", "/sub/"} <= set(s.site.resources)
        r = s.site.resources["/b.txt"]
        assert bytes(s.blob[r.body_off:r.body_off + r.size]) == b"aaa"


def test_symlink_loop(tmp_path):
    site = make(tmp_path, {"a.txt": b"a"})
    (site / "d").mkdir()
    os.symlink("..", site / "d" / "loop")
    fails(tmp_path, site, "symlink loop")


def test_unreadable_file(tmp_path, monkeypatch):
    site = make(tmp_path, {"a.txt": b"a", "locked.txt": b"b"})
    os.chmod(site / "locked.txt", 0)
    if os.geteuid() == 0:   # root reads anything: make open() fail the way it does for users
        real_open = open

        def fake_open(path, *a, **kw):
            if str(path).endswith("locked.txt"):
                raise PermissionError(13, "Permission denied")
            return real_open(path, *a, **kw)
        monkeypatch.setattr(compiler, "open", fake_open, raising=False)
    msg = fails(tmp_path, site, "cannot read file: Permission denied")
    assert "locked.txt" in msg


def test_name_not_utf8(tmp_path):
    site = make(tmp_path, {"a.txt": b"a"})
    with open(os.path.join(os.fsencode(site), b"bad\xff.html"), "wb") as f:
        f.write(b"x")
    fails(tmp_path, site, "not valid UTF-8")


def test_name_with_control_character(tmp_path):
    site = make(tmp_path, {"a.txt": b"a", "tab\there.html": b"x"})
    assert "tab" in fails(tmp_path, site, "control character")


def test_file_over_size_limit(tmp_path):
    site = make(tmp_path, {"a.txt": b"a", "big/b.bin": b"b" * 2000})
    msg = fails(tmp_path, site, "over the limit of 1000 bytes", max_file_size=1000)
    assert "b.bin" in msg and "2000 bytes" in msg


def test_special_file(tmp_path):
    site = make(tmp_path, {"a.txt": b"a"})
    os.mkfifo(site / "pipe")
    assert "pipe" in fails(tmp_path, site, "not a regular file")


def test_bad_options(tmp_path):
    site = make(tmp_path, {"a.txt": b"a"})
    fails(tmp_path, site, "--mss 100 is out of range", mss=100)
    fails(tmp_path, site, "printable ASCII", cache_control="a\r\nX-Injected: 1")
    with pytest.raises(CompileError, match="output folder .* does not exist"):
        compile_site(str(site), str(tmp_path / "no" / "x.store"))
    with pytest.raises(CompileError, match="is a directory"):
        compile_site(str(site), str(tmp_path))


def test_too_long_path_header(tmp_path):
    deep = "/".join(["d" * 60] * 8)
    site = make(tmp_path, {deep + "/index.html": b"x"})
    fails(tmp_path, site, "response header is .* bytes, over 512")


def test_hidden_files_skipped_well_known_kept(tmp_path):
    site = make(tmp_path, {"a.txt": b"a", ".git/config": b"x", ".env": b"x", ".well-known/x.txt": b"w"})
    out = tmp_path / "x.store"
    r = compile_site(str(site), str(out), Options(source_date_epoch=SDE))
    assert r.skipped_hidden == 2
    with Store.open(str(out)) as s:
        assert set(s.site.resources) == {"/a.txt", "/.well-known/x.txt"}


def test_output_inside_site_is_not_compiled_into_itself(tmp_path):
    site = make(tmp_path, {"a.txt": b"a"})
    out = site / "site.store"
    compile_site(str(site), str(out), Options(source_date_epoch=SDE))
    compile_site(str(site), str(out), Options(source_date_epoch=SDE))
    with Store.open(str(out)) as s:
        assert set(s.site.resources) == {"/a.txt"}


def test_unicode_names(tmp_path):
    site = make(tmp_path, {"caf\u00e9/men\u00fc.html": b"<p>m</p>", "a b.txt": b"ab"})
    out = tmp_path / "x.store"
    compile_site(str(site), str(out), Options(source_date_epoch=SDE))
    from .content_support import exchange, h11_parse
    with Store.open(str(out)) as s:
        data, _ = exchange(s, b"GET /caf%C3%A9/men%C3%BC.html HTTP/1.1\r\nHost: t\r\n\r\nGET /caf%c3%a9 HTTP/1.1\r\n"
                              b"Host: t\r\n\r\nGET /a%20b.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        data2, _ = exchange(s, b"GET /caf%c3%a9 HTTP/1.1\r\nHost: t\r\n\r\n")
    res = h11_parse([("GET", "/x")] * 3, data)
    assert res[0][2] == b"<p>m</p>" and res[2][2] == b"ab"
    assert res[1][0] == 404                      # no index.html there: no redirect


# -- the commands ---------------------------------------------------------------

def test_cli_compile_and_inspect(tmp_path):
    out = tmp_path / "www.store"
    r = CliRunner().invoke(compile_cmd, ["--site", EXAMPLE, "--out", str(out), "--mss", "1200",
                                         "--source-date-epoch", str(SDE), "--max-file-size", "10M"])
    assert r.exit_code == 0, r.output
    assert "URLs" in r.output
    r = CliRunner().invoke(inspect_cmd, [str(out)])
    assert r.exit_code == 0
    assert "/downloads/data.txt" in r.output and "mss 1200" in r.output
    r = CliRunner().invoke(inspect_cmd, [str(out), "--json"])
    rows = [json.loads(line) for line in r.output.splitlines()]
    data = [x for x in rows if x["url"] == "/downloads/data.txt" and x["variant"] == "GET"][0]
    size = os.path.getsize(os.path.join(EXAMPLE, "downloads", "data.txt"))
    assert data["status"] == 200 and data["bytes"] == data["header"] + size
    assert data["segments"] == -(-data["bytes"] // 1200)
    assert {x["variant"] for x in rows if x["url"] == "/about.html"} == {
        "GET", "HEAD", "304", "GET gzip", "HEAD gzip", "304 gzip"}


def test_cli_errors_exit_nonzero(tmp_path):
    r = CliRunner().invoke(compile_cmd, ["--site", str(tmp_path / "nope"), "--out", str(tmp_path / "x.store")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = CliRunner().invoke(compile_cmd, ["--site", EXAMPLE, "--out", str(tmp_path / "x.store"),
                                         "--max-file-size", "2K"])
    assert r.exit_code == 1 and "data.txt" in r.output and "over the limit" in r.output
    assert not os.listdir(tmp_path)
    r = CliRunner().invoke(compile_cmd, ["--site", EXAMPLE, "--out", "x", "--max-file-size", "lots"])
    assert r.exit_code == 2 and "is not a size" in r.output
    (tmp_path / "bad.store").write_bytes(b"garbage" * 1000)
    r = CliRunner().invoke(inspect_cmd, [str(tmp_path / "bad.store")])
    assert r.exit_code == 1 and "not a Haboob store" in r.output


def test_python_m_appliance_help():
    for cmd in (["compile", "--help"], ["inspect", "--help"], ["respond", "--help"]):
        p = subprocess.run([sys.executable, "-m", "appliance"] + cmd, cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0 and "Usage:" in p.stdout
