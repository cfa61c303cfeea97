"""Running wrk inside the client namespace and reading its results.

Theory of operation: wrk runs with bench/wrk.lua, whose done() callback
prints one machine-readable line (prefix HBWRK) with the request and byte
counts, wrk's error counters (connect/read/write/timeout socket errors and
"status": responses that were not 2xx/3xx) and the latency percentiles. A
timed pass runs without a response() callback (it slows wrk down, so it
would measure wrk); a separate short checking pass (HB_WRK_CHECK set)
checks every response's status and body length. wrk is pinned to the
client's cores with taskset; `ip netns exec` and taskset both exec, so the
Popen's pid is wrk's own. Over HTTPS (an https:// URL) `env` carries
OPENSSL_CONF, the client's protocol and suite (bench/run.py). wrk's OpenSSL
client resumes: a connection it reopens (Connection: close) keeps its SSL
object, SSL_clear keeps the session after a clean SSL_shutdown, and the
next SSL_connect offers it (its ticket); so wrk's close cells over HTTPS
are resumed handshakes (the appliance's counters show it), never full ones.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk.lua")


class WrkError(RuntimeError):
    """wrk failed or printed no result line; the message carries its output."""


@dataclass
class WrkJob:
    argv: list[str]
    env: dict
    duration: float

    def start(self, ns) -> subprocess.Popen:
        return ns.popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, env=self.env, start_new_session=True)


def job(url: str, duration: float, connections: int, threads: int, expected: int,
        close: bool, check: bool, cpus: str | None, timeout_s: float = 5.0, env: dict | None = None) -> WrkJob:
    argv = []
    if cpus is not None:
        argv += ["taskset", "-c", cpus]
    dur = max(1, round(duration))  # wrk's -d takes whole seconds
    argv += ["wrk", "-t", str(threads), "-c", str(max(connections, threads)), "-d", f"{dur}s",
             "--timeout", f"{timeout_s:g}s", "--latency", "-s", SCRIPT]
    if close:
        argv += ["-H", "Connection: close"]
    argv += [url, "--", str(expected)]
    env = dict(os.environ, **(env or {}))
    env.pop("HB_WRK_CHECK", None)
    if check:
        env["HB_WRK_CHECK"] = "1"
    return WrkJob(argv, env, dur)


def collect(proc: subprocess.Popen, wrkjob: WrkJob) -> dict:
    """Wait for wrk and parse its HBWRK line; kills it (by pid) if it overruns."""
    try:
        out, err = proc.communicate(timeout=wrkjob.duration + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise WrkError(f"wrk overran its duration by 30 s: {' '.join(wrkjob.argv)}")
    for line in out.splitlines():
        if line.startswith("HBWRK "):
            res = json.loads(line[6:])
            res["duration_s"] = res["duration_us"] / 1e6
            return res
    raise WrkError(f"wrk exited {proc.returncode} without a result: {' '.join(wrkjob.argv)}\n"
                   f"stdout: {out.strip()}\nstderr: {err.strip()}")


def run(ns, wrkjob: WrkJob) -> dict:
    return collect(wrkjob.start(ns), wrkjob)


def version() -> str:
    proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).splitlines()[0].strip() if (proc.stdout or proc.stderr) else "?"
