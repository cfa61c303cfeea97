"""New HTTPS connections per request with `openssl s_time`, full or resumed handshakes.

Theory of operation: wrk cannot make a full handshake per request (it
resumes, see bench/wrk.py), so the "full" and "resumed" HTTPS cells use
OpenSSL's own client: `openssl s_time -new` (every connection a full
handshake) or `-reuse` (every connection resumes the session of a first
one, with its TLS 1.3 ticket). Each s_time connects, sends
`GET /FILE HTTP/1.0` (no Host header), reads until the server closes and
counts the bytes; it is one connection at a time, so `procs` of them run
in parallel, pinned to the client's cores, to keep the server busy.

What is checked, per timed pass: every connection completed (s_time stops
at the first failed connect or handshake, and then exits non-zero or
reports fewer connections); the bytes read are exactly connections x the
length of one whole response (status line, headers, body) to that very
request, which `probe` fetched once with `openssl s_client` and checked:
status 200 and the body byte for byte. A wrong status, a truncated or a
longer response changes that sum (all responses to it have one length:
Date has a fixed width). And the handshake kind: s_time prints one
character per connection, 'r' for a resumed session, '*' for a new one
(TLS 1.3): -new must show no 'r', -reuse only 'r'.
"""
from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass

MARKS = re.compile(r"^[r*t3]+$", re.M)      # one character per connection: r resumed, * new (TLS 1.3)
RESULT = re.compile(r"^(\d+) connections in ([\d.]+)s; [\d.]+ connections/user sec, bytes read (\d+)$", re.M)


class STimeError(RuntimeError):
    """s_time or s_client failed; the message carries the command and its output."""


def probe(ns, host: str, port: int, path: str, body: bytes, env: dict) -> dict:
    """One GET (the request s_time sends) with s_client: its status line, its whole length,
    and the negotiated protocol, suite and group (from -brief on stderr)."""
    proc = ns.run(["openssl", "s_client", "-connect", f"{host}:{port}", "-brief", "-quiet", "-ign_eof"],
                  check=False, input=f"GET {path} HTTP/1.0\r\n\r\n".encode(), capture_output=True, text=False,
                  env=env, timeout=30)
    raw, err = proc.stdout, proc.stderr.decode(errors="replace")
    status = raw.split(b"\r\n", 1)[0].decode(errors="replace")
    head, _, got = raw.partition(b"\r\n\r\n")
    info = {k.strip().lower().replace(" ", "_"): v.strip() for k, v in
            (line.split(":", 1) for line in err.splitlines() if ":" in line and not line.startswith("depth"))}
    return {"status": status, "length": len(raw), "body_identical": got == body and status.split()[1:2] == ["200"],
            "protocol": info.get("protocol_version"), "suite": info.get("ciphersuite"),
            "group": info.get("server_temp_key")}


@dataclass
class STimeJob:
    argv: list[str]          # one s_time; run `procs` times
    procs: int
    env: dict
    duration: float
    expected: int            # bytes of one whole response
    resume: bool

    def start(self, ns) -> list[subprocess.Popen]:
        procs = [ns.popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                          start_new_session=True) for _ in range(self.procs)]
        self.t0 = time.monotonic()
        return procs


def job(host: str, port: int, path: str, duration: float, procs: int, expected: int, resume: bool,
        cpus: str | None, env: dict) -> STimeJob:
    argv = ["taskset", "-c", cpus] if cpus is not None else []
    argv += ["openssl", "s_time", "-connect", f"{host}:{port}", "-www", path, "-reuse" if resume else "-new",
             "-time", str(max(1, round(duration)))]
    return STimeJob(argv, procs, env, max(1, round(duration)), expected, resume)


def collect(procs: list[subprocess.Popen], j: STimeJob) -> dict:
    """Wait for every s_time; sum and check them. The result has wrk's shape (bench/wrk.py)."""
    conns = nbytes = resumed = new = 0
    failed = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=j.duration + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            failed.append("overran its duration by 30 s")
            continue
        m = RESULT.search(out)
        if p.returncode != 0 or not m:
            failed.append(f"exited {p.returncode}: {(err or out).strip()[-300:]}")
            continue
        conns += int(m.group(1))
        nbytes += int(m.group(3))
        marks = "".join(MARKS.findall(out[:m.start()]))     # not the r of "for", "starting"
        resumed += marks.count("r")
        new += marks.count("*")
    elapsed = time.monotonic() - j.t0
    if failed:
        raise STimeError(f"s_time failed ({len(failed)} of {len(procs)}): {' '.join(j.argv)}: {failed[0]}")
    length_ok = conns > 0 and nbytes == conns * j.expected
    kind_ok = (resumed == conns and new == 0) if j.resume else (resumed == 0 and new == conns)
    nolat = {"min": None, "mean": j.procs * elapsed * 1e6 / conns if conns else None, "stdev": None, "max": None,
             "percentiles": {q: None for q in ("50", "75", "90", "99", "99.9")}}
    return {"duration_us": int(elapsed * 1e6), "duration_s": elapsed, "requests": conns, "bytes": nbytes,
            "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
            "latency_us": nolat, "checked": True,
            "check": {"ok": conns if length_ok and kind_ok else 0, "bad_status": 0,
                      "bad_length": 0 if length_ok else conns, "expected_bytes": conns * j.expected,
                      "bytes": nbytes, "handshakes_resumed": resumed, "handshakes_new": new,
                      "handshake_kind_ok": kind_ok, "how": "s_time sum"}}
