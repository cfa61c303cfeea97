"""build.py's output: on a terminal (a pty) a line per step and a progress
bar with file counts and MB for the content step; piped, the same step lines
and a few plain count lines, without carriage returns or escape codes;
--quiet prints nothing, on a terminal too; an error during the content step
still ends in one clear "Error: " line on a line of its own and exit status 1.

The builds use a generated site of 300 files and --formats none
--compress-level 3 (about 3 s each with a warm ~/.cache/haboob).
"""
import fcntl
import io
import os
import pty
import random
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from appliance.content.cli import CompileProgress
from haboob_build.steps import STEPS
from tests.image_support import REPO

NFILES = 300
STEP_NAMES = [name for name, _ in STEPS]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """300 files in 3 folders, 1 byte to ~60 KB, text and random bytes; (path, total bytes)."""
    root = tmp_path_factory.mktemp("progress-site")
    rng = random.Random(13)
    total = 0
    for i in range(NFILES):
        d = root / f"part{i // 100}"
        d.mkdir(exist_ok=True)
        size = rng.randrange(1, 60000)
        data = (b"haboob progress " * (size // 16 + 1))[:size] if i % 2 else rng.randbytes(size)
        (d / (f"page{i:03d}.html" if i % 2 else f"blob{i:03d}.bin")).write_bytes(data)
        total += size
    return root, total


def mb(n):
    return f"{n / 1e6:.1f}"


def build_argv(site, out, *extra):
    return [sys.executable, str(REPO / "build.py"), "--site", str(site), "--out", str(out),
            "--formats", "none", "--compress-level", "3", *extra]


def run_in_pty(argv, cwd, timeout=300, cols=120):
    """Run argv with stdin/stdout/stderr on a pty of `cols` columns; (exit status, output as text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm"
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                start_new_session=True)
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; output so far: {bytes(out)[-2000:]!r}"
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:             # EIO: every holder of the slave side has closed it
                break
            if not chunk:
                break
            out += chunk
        rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The pty turns "\n" into "\r\n"; undo that, keep every other "\r".
    return rc, out.decode().replace("\r\n", "\n")


def step_lines(text):
    return [m.groups() for m in re.finditer(r"^\[ *\d+\.\ds\] step (\d+)/(\d+) (\S+)$", text, re.M)]


def assert_steps(text, upto=None):
    n = len(STEP_NAMES)
    want = [(str(i), str(n), name) for i, name in enumerate(STEP_NAMES, 1)][:upto]
    assert step_lines(text) == want, text


def test_terminal_shows_steps_and_a_bar_with_files_and_bytes(site, tmp_path):
    src, total = site
    rc, text = run_in_pty(build_argv(src, tmp_path / "img"), tmp_path)
    assert rc == 0, text
    assert_steps(text)
    # The bar: redrawn in place ("\r", cursor hidden), ended by showing the cursor and a newline.
    start = text.index("\r\x1b[?25l")
    end = text.index("\x1b[?25h\n", start)
    frames = [f for f in text[start:end].split("\r\x1b[?25l") if f.strip()]
    pat = re.compile(r"^content  \[([#-]+)\] +(\d+)%.*?  +(\d+)/(\d+) files, +([\d.]+)/([\d.]+) MB *$")
    parsed = [pat.match(f) for f in frames]
    assert all(parsed), frames
    first, last = parsed[0].groups(), parsed[-1].groups()
    assert first[1:] == ("0", "0", str(NFILES), "0.0", mb(total)), frames[0]
    assert last[1:] == ("100", str(NFILES), str(NFILES), mb(total), mb(total)), frames[-1]
    assert set(last[0]) == {"#"}
    assert all(len(f.rstrip()) <= 120 for f in frames), "a frame wider than the terminal wraps"
    # The bar lives inside the content step, and the next step's line starts on its own line.
    i = STEP_NAMES.index("content")
    assert step_lines(text[:start])[-1][2] == "content"
    assert re.match(rf"\x1b\[\?25h\n\[ *\d+\.\ds\] step {i + 2}/{len(STEP_NAMES)} {STEP_NAMES[i + 1]}\n",
                    text[end:]), text[end:end + 200]
    assert "\r" not in text[:start] and "\r" not in text[end:]
    assert f"built {tmp_path / 'img'}/ in " in text
    assert (tmp_path / "img" / "manifest.json").is_file()


def test_piped_output_is_plain_lines_with_counts(site, tmp_path):
    src, total = site
    proc = subprocess.run(build_argv(src, tmp_path / "img"), capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    err = proc.stderr
    assert "\r" not in err and "\x1b" not in err
    assert_steps(err)
    counts = re.findall(r"^\[ *\d+\.\ds\] content: (.*)$", err, re.M)
    assert counts[0] == f"{NFILES} files, {mb(total)} MB"
    assert counts[-1] == f"{NFILES}/{NFILES} files, {mb(total)}/{mb(total)} MB (100%)"
    # A few lines, not one per file: the start, then one per quarter of the bytes (or fewer).
    assert 2 <= len(counts) <= 5, counts
    pcts = [int(re.search(r"\((\d+)%\)$", c).group(1)) for c in counts[1:]]
    assert pcts == sorted(set(pcts)) and set(pcts) <= {25, 50, 75, 100}, counts
    assert len(err.splitlines()) < 40, err


def test_quiet_prints_nothing_even_on_a_terminal(site, tmp_path):
    src, _ = site
    rc, text = run_in_pty(build_argv(src, tmp_path / "img", "--quiet"), tmp_path)
    assert rc == 0, text
    assert text == ""
    assert (tmp_path / "img" / "manifest.json").is_file()


def test_error_during_the_content_step_stays_one_clear_line(tmp_path):
    """A directory path too long for its 301's header fails the compile after the bar started."""
    src = tmp_path / "site"
    deep = src / ("d" * 200) / ("e" * 200) / ("f" * 200)
    deep.mkdir(parents=True)
    (deep / "index.html").write_bytes(b"<p>deep</p>\n")
    (src / "index.html").write_bytes(b"<p>top</p>\n")
    out = tmp_path / "out" / "img"
    rc, text = run_in_pty(build_argv(src, out), tmp_path)
    assert rc == 1, text
    assert "Traceback" not in text
    i = STEP_NAMES.index("content")
    assert_steps(text, upto=i + 1)
    lines = text.rstrip("\n").split("\n")
    assert lines[-1].startswith("Error: --site "), lines[-1]
    assert "response header is" in lines[-1] and "over 512" in lines[-1]
    assert lines[-2].endswith("\x1b[?25h"), lines[-2:]     # the bar's line was ended first
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_compile_progress_plain_lines_skip_quarters_not_lines():
    """Files of uneven size: one line per quarter crossed, the highest one only."""
    lines = []
    p = CompileProgress("content", stream=io.StringIO(), line=lines.append, tty=False)
    sizes = [100_000, 700_000, 50_000, 50_000, 100_000]     # 10%, 80%, 85%, 90%, 100% of 1 MB
    p(0, 5, 0, 1_000_000)
    done = 0
    for i, s in enumerate(sizes, 1):
        done += s
        p(i, 5, done, 1_000_000)
    p.close()
    assert lines == ["content: 5 files, 1.0 MB",
                     "content: 2/5 files, 0.8/1.0 MB (75%)",
                     "content: 5/5 files, 1.0/1.0 MB (100%)"]


def test_appliance_compile_bar_on_a_terminal_and_silent_progress_when_piped(site, tmp_path):
    src, total = site
    argv = [sys.executable, "-m", "appliance", "compile", "--site", str(src), "--out", str(tmp_path / "s.store")]
    rc, text = run_in_pty(argv, REPO)
    assert rc == 0, text
    frames = [f for f in text.split("\r\x1b[?25l") if f.startswith("compiling  [")]
    assert frames and f"{NFILES}/{NFILES} files, {mb(total)}/{mb(total)} MB" in frames[-1], text
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert re.fullmatch(rf".*s\.store: {NFILES} files, \d+ URLs, .*\n", proc.stdout)
