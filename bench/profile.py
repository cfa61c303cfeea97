"""Where the appliance's time goes per request: py-spy under wrk load.

Theory of operation: the appliance is started as in the benchmark (1
worker pinned to core 0, wrk on core 1, steering on), loaded with one
(mode, size) cell, and sampled by `py-spy record --nonblocking` (it reads
the process's memory without stopping it, so the load is barely
disturbed) in its raw collapsed-stack format, idle samples included
(--idle: py-spy's idle detection is a heuristic, so keeping every sample
makes each stand for exactly 1/rate s of wall time). A frame's time per
request is then samples / rate / seconds / (requests/s): self (the
function's own lines), inclusive (with callees) and per line. The time
blocked waiting for frames shows on the loop's wait line; the process CPU
per request measured over the same window (/proc/PID/stat) is printed
next to it, so wall time minus CPU time is the idle part.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter

from . import cpu, wrk
from .run import placement, setup_link


_LINENO = re.compile(r":\d+\)$")


def parse_raw(text: str) -> tuple[int, Counter, Counter, Counter]:
    """py-spy raw output ('f1;f2;f3 N' per line, frames 'func (file:line)')
    -> (total, self counts by function, inclusive counts by function, self counts by line)."""
    total, own, incl, lines = 0, Counter(), Counter(), Counter()
    for line in text.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        lines[frames[-1]] += n
        funcs = [_LINENO.sub(")", f) for f in frames]
        own[funcs[-1]] += n
        for f in set(funcs):
            incl[f] += n
    return total, own, incl, lines


def profile(server, site_file, mode: str, seconds: int, out: str, connections: int = 32, rate: int = 200) -> dict:
    from vm import netns
    if shutil.which("py-spy") is None:
        raise RuntimeError("py-spy is not installed (pip install -r requirements.txt)")
    place = placement(1, os.cpu_count() or 1)
    os.makedirs(out, exist_ok=True)
    raw = os.path.join(out, f"profile-{mode}-{site_file.label}.txt")
    with netns.pair(subnet=60) as link:
        setup_link(link, place, True)
        with server.start(link, 1, place["server_cpus"]) as running:
            url = f"{running.base_url}/{site_file.name}"
            common = dict(url=url, connections=connections, threads=place["wrk_threads"], expected=site_file.size,
                          close=mode == "close", cpus=place["wrk_cpus"])
            wrk.run(link.client, wrk.job(duration=1, check=False, **common))  # warm-up
            job = wrk.job(duration=seconds + 2, check=False, **common)
            proc = job.start(link.client)
            try:
                time.sleep(1)
                p0, t0 = cpu.process_cpu(running.pids()), time.monotonic()
                spy = subprocess.run(["py-spy", "record", "--nonblocking", "--idle", "-r", str(rate),
                                      "-d", str(seconds), "-f", "raw", "-o", raw, "-p", str(running.pid)],
                                     capture_output=True, text=True)
                p1, t1 = cpu.process_cpu(running.pids()), time.monotonic()
            finally:
                res = wrk.collect(proc, job)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-1000:]}")
    rps = res["requests"] / res["duration_s"]
    us_per_req = (p1 - p0) / (t1 - t0) * 1e6 / rps if rps else 0.0
    with open(raw) as f:
        total, own, incl, by_line = parse_raw(f.read())

    # Every sample stands for 1/rate s of wall time (idle samples are kept,
    # --idle), so a frame's time per request is its samples / rate / seconds / rps.
    wall = total / rate if total else 0.0

    def rows(counter, n=25):
        return [{"frame": fr, "share": c / total, "us_per_req": c / rate / wall * 1e6 / rps}
                for fr, c in counter.most_common(n)] if total and rps else []
    return {"mode": mode, "size": site_file.size, "label": site_file.label, "seconds": seconds, "rate": rate,
            "rps": rps, "proc_us_per_req": us_per_req, "wall_us_per_req": 1e6 / rps if rps else None,
            "samples": total, "non2xx": res["errors"]["status"],
            "self": rows(own), "inclusive": rows(incl), "lines": rows(by_line, 30), "raw": raw}


def text_report(p: dict) -> str:
    lines = [f"profile {p['mode']} {p['label']}: {p['rps']:.0f} req/s under py-spy, "
             f"{p['wall_us_per_req']:.1f} µs of wall time per request of which "
             f"{p['proc_us_per_req']:.1f} µs process CPU (/proc), {p['samples']} samples "
             f"(idle ones included: time blocked in poll shows on the wait line)",
             "", "self time (function's own code):", "| µs/req | share | function |", "|---|---|---|"]
    lines += [f"| {r['us_per_req']:.2f} | {100 * r['share']:.1f}% | `{r['frame']}` |" for r in p["self"][:20]]
    lines += ["", "inclusive time (with callees):", "| µs/req | share | function |", "|---|---|---|"]
    lines += [f"| {r['us_per_req']:.2f} | {100 * r['share']:.1f}% | `{r['frame']}` |" for r in p["inclusive"][:20]]
    lines += ["", "hottest lines (self):", "| µs/req | share | line |", "|---|---|---|"]
    lines += [f"| {r['us_per_req']:.2f} | {100 * r['share']:.1f}% | `{r['frame']}` |" for r in p["lines"][:20]]
    return "\n".join(lines) + "\n"
