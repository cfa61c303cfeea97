"""The benchmark run: topology, the measurement loop, medians and ratios.

Theory of operation: for each worker count, every server under test gets
its own `vm.netns.pair()` (server namespace <-veth-> client namespace,
subnets 198.18.50+i.0/24) and is started once. Then, cell by cell (mode x
size) and repetition by repetition, the servers are loaded one after the
other, so the two halves of a repetition pair are measured a few seconds
apart and see the same background load on this shared machine. While one
server is loaded the other is idle; its CPU time over the window is
recorded (`idle_other_cpu_s`) to show it does not interfere.

One measurement = a warm-up pass, a checking pass (wrk's response() checks
status 200 and the body length of every response), and the timed pass
without the Lua check. With the access log on (Plan.access_log), the
lines each server wrote over the three passes must equal the responses
wrk counted, within the requests in flight at each pass's end, or the
measurement is not correct: a baseline that does not do the work is
worse than none. Such cells are labelled "keepalive+log", "close+log". During the timed pass the CPU is sampled over the
middle of the run (from 15% to 85% of it, away from ramp-up and teardown):
the busy share of every core from /proc/stat and the server's process-tree
CPU time. CPU per request = cores used / rps, for two notions of "used".
"core": the busy share of the server's cores from /proc/stat; it covers
everything that ran there, softirq included, but also other users'
processes on a shared machine, and it is tick-sampled. "server" (the
headline): the server's process-tree CPU time plus the ksoftirqd threads
of its cores. Process time is the scheduler's exact runtime, and it
includes the softirq work the kernel does in the process's context (on
syscall and interrupt exit, which is where most packet work lands on a
busy core); softirq deferred to ksoftirqd is added; softirq that runs in
the idle task's context (the core was idle when a frame arrived) is
missed by both servers alike. Adding /proc/stat's irq+softirq ticks
instead would count twice the softirq already in process time (this
kernel has no IRQ_TIME_ACCOUNTING), which is why they are only recorded.
The five busiest other processes of each window are recorded too, to
show the background load.

Networks. Each Plan.nets entry is a session of its own (the servers
restarted for it; bench/servers.py says how each is set up): "ipv4"
(the plain HTTP cells as always), "ipv6" (the same cells over IPv6),
"https" (IPv4, port 443, Plan.tls_modes). The sessions run one after the
other in one run, so the IPv6 and HTTPS ratios stand next to IPv4 ratios
measured minutes apart on the same machine. HTTPS modes: "keepalive"
(wrk), "close" (wrk with Connection: close: a new connection per request
whose handshake wrk resumes, see bench/wrk.py), "full" and "resumed" (a
new connection per request with a full or a resumed handshake:
`openssl s_time -new` / `-reuse`, bench/stime.py, whose timed pass is its
own check). Every HTTPS client reads OPENSSL_CONF from the work dir:
TLS 1.3 only, TLS_AES_128_GCM_SHA256 only (the appliance's Python ssl
cannot restrict its TLS 1.3 suites, so the client does, for both servers
alike); the negotiated protocol, suite and group are recorded per server
(`tls_probe`) and must agree.

Placement. With W workers on a machine of C cores and W < C, the server
is pinned to cores 0..W-1 and wrk to the others. veth delivers a frame in
the softirq of the *sending* core, so by default the server's receive
work (the kernel TCP receive path for nginx, AF_PACKET's copy into the
ring for the appliance) would run on wrk's core and the client's receive
work on the server's core. With steering on (the default) each veth end's
receive queue is steered by RPS to its own side's cores, so the server
cores' busy share is the server's whole cost, kernel work included. With
W >= C the client and server share all cores; wrk is unpinned, steering
is off, and the process CPU time is the meaningful per-server figure.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from . import cpu, stime, wrk
from .site import File, make_site

SUBNET_BASE = 50


@dataclass
class Plan:
    sizes: list[int]
    modes: list[str] = field(default_factory=lambda: ["keepalive", "close"])
    workers: list[int] = field(default_factory=lambda: [1, 2])
    servers: list[str] = field(default_factory=lambda: ["nginx", "appliance"])
    reps: int = 3
    duration: int = 5
    warmup: int = 1
    check: int = 1
    connections: int = 32
    steer: bool = True
    access_log: bool = False     # both servers log every response to a file (see servers.py)
    nets: list[str] = field(default_factory=lambda: ["ipv4"])     # sessions: ipv4, ipv6, https
    tls_modes: list[str] = field(default_factory=lambda: list(TLS_MODES))
    stime_procs: int = 8         # parallel `openssl s_time` clients in the full/resumed HTTPS cells


TLS_MODES = ("keepalive", "close", "full", "resumed")
CLIENT_OPENSSL_CONF = """# bench HTTPS clients (wrk, openssl s_time/s_client): TLS 1.3 with AES-128-GCM only
openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def placement(workers: int, ncpu: int) -> dict:
    if workers < ncpu:
        server = list(range(workers))
        client = list(range(workers, ncpu))
        return {"server_cpus": server, "client_cpus": client, "wrk_cpus": ",".join(map(str, client)),
                "wrk_threads": len(client), "shared": False}
    every = list(range(ncpu))
    return {"server_cpus": every, "client_cpus": every, "wrk_cpus": None,
            "wrk_threads": min(ncpu, 2), "shared": True}


def _mask(cpus: list[int]) -> str:
    return format(sum(1 << c for c in cpus), "x")


def setup_link(link, place: dict, steer: bool) -> dict:
    """Client-side sysctls for many short connections; RPS steering of both veth ends."""
    link.client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
    link.client.sysctl("net.ipv4.tcp_tw_reuse", "1")
    done = {}
    if steer and not place["shared"]:
        for ns, ifname, cpus in ((link.server, link.server_if, place["server_cpus"]),
                                 (link.client, link.client_if, place["client_cpus"])):
            ns.run(["sh", "-c", f"echo {_mask(cpus)} > /sys/class/net/{ifname}/queues/rx-0/rps_cpus"])
            done[ifname] = _mask(cpus)
    return done


def fetch_check(link, base_url: str, f: File, tmpdir: str) -> dict:
    """One GET with curl from the client namespace; the body must match byte for byte."""
    path = os.path.join(tmpdir, f"fetch-{f.name}")
    proc = link.client.run(["curl", "-k", "-g", "-s", "-o", path, "-w", "%{http_code}", "--max-time", "10",
                            f"{base_url}/{f.name}"], check=False)
    status = proc.stdout.strip()
    try:
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        os.unlink(path)
    except OSError:
        digest = None
    return {"status": status, "identical": status == "200" and digest == f.sha256}


def measure(link, running, others, f: File, mode: str, plan: Plan, place: dict, net: str = "ipv4",
            client_env: dict | None = None, probe: dict | None = None) -> dict:
    url = f"{running.base_url}/{f.name}"
    close = mode == "close"
    lines0 = running.log_lines()
    if mode in ("full", "resumed"):     # HTTPS, s_time: the timed pass checks itself (bench/stime.py)
        host = running.base_url.split("//", 1)[1]
        common = dict(host=host, port=443, path=f"/{f.name}", procs=plan.stime_procs, expected=probe["length"],
                      resume=mode == "resumed", cpus=place["wrk_cpus"], env=client_env)
        if plan.warmup:
            w = stime.job(duration=plan.warmup, **common)
            stime.collect(w.start(link.client), w)
        warm = checked = None
        job = stime.job(duration=plan.duration, **common)
        collect = stime.collect
    else:
        common = dict(url=url, connections=plan.connections, threads=place["wrk_threads"],
                      expected=f.size, close=close, cpus=place["wrk_cpus"], env=client_env)
        warm = wrk.run(link.client, wrk.job(duration=plan.warmup, check=False, **common)) if plan.warmup else None
        checked = wrk.run(link.client, wrk.job(duration=plan.check, check=True, **common)) if plan.check else None
        job = wrk.job(duration=plan.duration, check=False, **common)
        collect = wrk.collect

    lead = 0.15 * job.duration
    pids = running.pids()
    other_pids = [p for o in others for p in o.pids()]
    proc = job.start(link.client)
    client_pids = {p.pid for p in proc} if isinstance(proc, list) else {proc.pid}
    try:
        time.sleep(lead)
        s0 = cpu.snapshot()
        c0, p0, o0, t0 = cpu.read_cores(), cpu.process_cpu(pids), cpu.process_cpu(other_pids), time.monotonic()
        time.sleep(job.duration - 2 * lead)
        c1, p1, o1, t1 = cpu.read_cores(), cpu.process_cpu(running.pids()), cpu.process_cpu(other_pids), \
            time.monotonic()
        s1 = cpu.snapshot()
    finally:
        res = collect(proc, job)
    if checked is None and "how" in res["check"]:       # s_time: the timed pass is the checked one
        checked = res
    window = t1 - t0
    shares = cpu.busy_shares(c0, c1)
    irqs = cpu.irq_shares(c0, c1)
    server_busy = sum(shares[c] for c in place["server_cpus"])      # in cores
    server_irq = sum(irqs[c] for c in place["server_cpus"])
    rps = res["requests"] / res["duration_s"] if res["duration_s"] else 0.0
    proc_cores = (p1 - p0) / window
    # Softirq work deferred to ksoftirqd/N is billed to that thread as system
    # time, not as softirq: count the server cores' ksoftirqd as the server's.
    used = cpu.snapshot_delta(s0, s1)
    ksoftirqd = sum(t for comm, t in used.values()
                    if comm in {f"ksoftirqd/{c}" for c in place["server_cpus"]}) / window
    attributed = proc_cores + (ksoftirqd if not place["shared"] else 0.0)
    mine = set(running.tree) | client_pids
    top_other = sorted(((comm, t / window) for pid, (comm, t) in used.items()
                        if pid not in mine and not comm.startswith("ksoftirqd/")), key=lambda x: -x[1])[:5]
    errors = res["errors"]
    out = {
        "rps": rps,
        "gbps": res["bytes"] * 8 / res["duration_s"] / 1e9 if res["duration_s"] else 0.0,
        "goodput_gbps": rps * f.size * 8 / 1e9,
        "requests": res["requests"], "bytes": res["bytes"], "duration_s": res["duration_s"],
        "latency_us": res["latency_us"],
        "errors": errors,
        "socket_errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "non2xx": errors["status"],
        "client": "s_time" if mode in ("full", "resumed") else "wrk",
        "check": checked and {**checked["check"], "requests": checked["requests"],
                              "non2xx": checked["errors"]["status"],
                              "socket_errors": sum(checked["errors"][k] for k in ("connect", "read", "write", "timeout"))},
        "cpu": {
            "window_s": window,
            "core_busy": {str(k): v for k, v in sorted(shares.items())},
            "server_cores_busy": server_busy,                # sum of busy shares of the server's cores
            "server_busy_share": server_busy / len(place["server_cpus"]),
            "machine_busy_share": sum(shares.values()) / len(shares),
            "proc_cores": proc_cores,                        # server process tree CPU s per s
            "server_irq_cores": server_irq,                  # irq+softirq on the server's cores
            "ksoftirqd_cores": ksoftirqd,                    # ksoftirqd of the server's cores
            "top_other_processes": [[c, round(v, 3)] for c, v in top_other],   # (comm, cores), not ours
            "attributed_cores": attributed,                  # process tree + ksoftirqd of the server cores
            # busy time on the server cores that was not the server (other work; a tick-sampled estimate)
            "foreign_cores": max(0.0, server_busy - attributed) if not place["shared"] else None,
            "us_per_req": attributed * 1e6 / rps if rps else None,
            "us_per_req_core": server_busy * 1e6 / rps if rps else None,
            "us_per_req_proc": proc_cores * 1e6 / rps if rps else None,
            "us_per_req_machine": sum(shares.values()) * 1e6 / rps if rps else None,
            "idle_other_cpu_s": o1 - o0,
        },
    }
    derive_cpu(out, place["shared"])
    if plan.access_log:
        passes = [p for p in (warm, checked, res) if p is not None]
        out["access_log"] = access_log_check(running, lines0, sum(p["requests"] for p in passes),
                                             len(passes) * plan.connections)
    out["correct"] = bool(checked is None or (checked["check"]["bad_status"] == 0 and checked["check"]["bad_length"] == 0
                                             and checked["check"]["ok"] > 0 and checked["errors"]["status"] == 0)) \
        and out["non2xx"] == 0 and res["requests"] > 0 and out.get("access_log", {}).get("ok", True) \
        and (probe is None or probe["body_identical"])
    return out


def access_log_check(running, lines0: int, responses: int, margin: int, timeout: float = 3.0) -> dict:
    """The access log lines written over a measurement against the responses wrk
    counted in its passes: at least one line per response (both servers log a
    response before wrk can have read all of it: nginx once written, the
    appliance on the ACK of its last byte), at most `margin` more (wrk stops
    each pass with up to `connections` requests in flight, which the server
    may answer and log uncounted). nginx's buffer is flushed within 1 s
    (flush=1s), so poll until the count is in range and steady, for at most
    `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        lines = running.log_lines() - lines0
        ok = responses <= lines <= responses + margin
        if (ok and lines == last) or time.monotonic() > deadline:
            break
        last = lines
        time.sleep(0.25)
    return {"lines": lines, "responses": responses, "margin": margin, "ok": ok}


def run(plan: Plan, servers: dict, workdir: str) -> dict:
    """Run the plan; servers: name -> Server (already configured, not prepared)."""
    site_dir = os.path.join(workdir, "site")
    os.makedirs(site_dir, exist_ok=True)
    os.chmod(workdir, 0o755)
    files = make_site(site_dir, plan.sizes)
    log(f"work dir {workdir}")
    client_env = None
    if "https" in plan.nets:
        from .servers import tls_files
        cert = tls_files(workdir, [f"198.18.{SUBNET_BASE + i}.1" for i in range(len(servers))])
        conf = os.path.join(workdir, "client-openssl.cnf")
        with open(conf, "w") as fh:
            fh.write(CLIENT_OPENSSL_CONF)
        client_env = {"OPENSSL_CONF": conf}
        for srv in servers.values():
            srv.tls = cert
    for srv in servers.values():
        log(f"preparing {srv.name} ...")
        srv.prepare(site_dir, workdir, **({"ip6": True} if "ipv6" in plan.nets and hasattr(srv, "store") else {}))
    ncpu = os.cpu_count() or 1
    runs, sessions = [], []
    for w in plan.workers:
        place = placement(w, ncpu)
        for net in plan.nets:
            sessions.append(_session(plan, servers, files, workdir, w, place, net, client_env, runs))
    return {"plan": asdict(plan), "files": [asdict(f) for f in files], "sessions": sessions,
            "runs": runs, "summary": summarize(runs)}


def _ms(us):
    return "      –" if us is None else f"{us / 1000:7.2f}"


def _session(plan: Plan, servers: dict, files: list[File], workdir: str, w: int, place: dict, net: str,
             client_env: dict | None, runs: list) -> dict:
    """Start every server for one network (ipv4, ipv6, https), measure its cells, stop them."""
    from vm import netns
    with contextlib.ExitStack() as stack:
        live = {}
        session = {"workers": w, "net": net, "placement": place, "servers": {}}
        for i, (name, srv) in enumerate(servers.items()):
            link = stack.enter_context(netns.pair(subnet=SUBNET_BASE + i))
            steered = setup_link(link, place, plan.steer)
            if net == "ipv6":
                from .servers import enable_ip6, ip6_addr
                enable_ip6(link.client, link.client_if, ip6_addr(link, 2) + "/64")
            running = stack.enter_context(srv.start(link, w, place["server_cpus"], net=net))
            live[name] = (link, running)
            fetched = {f.label: fetch_check(link, running.base_url, f, workdir) for f in files}
            session["servers"][name] = {"pid": running.pid, "steering": steered, "fetch": fetched,
                                        "base_url": running.base_url,
                                        "namespaces": [link.server.name, link.client.name]}
            bad = [k for k, v in fetched.items() if not v["identical"]]
            if net == "https":
                host = running.base_url.split("//", 1)[1]
                probes = {}
                for f in files:
                    with open(os.path.join(workdir, "site", f.name), "rb") as fh:
                        body = fh.read()
                    probes[f.label] = stime.probe(link.client, host, 443, f"/{f.name}", body,
                                                  dict(os.environ, **client_env))
                session["servers"][name]["tls_probe"] = probes
                bad += [f"{k} (s_client: {v['status']!r})" for k, v in probes.items() if not v["body_identical"]]
            log(f"{name} up with {w} worker(s) on cpus {place['server_cpus']} ({net}, {running.base_url}); "
                "byte-for-byte fetch " + ("ok" if not bad else f"WRONG for {bad}"))
        if net == "https":
            negotiated = {(p["protocol"], p["suite"], p["group"]) for srv in session["servers"].values()
                          for p in srv["tls_probe"].values()}
            session["tls_negotiated"] = sorted(" / ".join(map(str, n)) for n in negotiated)
            log(f"negotiated (protocol / suite / group): {', '.join(session['tls_negotiated'])}")
        if plan.access_log:     # nginx's buffered lines of the probes and fetches: flushed after 1 s
            time.sleep(1.2)
        for mode in (plan.tls_modes if net == "https" else plan.modes):
            for f in files:
                for rep in range(plan.reps):
                    for name, (link, running) in live.items():
                        others = [r for n, (_, r) in live.items() if n != name]
                        probe = session["servers"][name].get("tls_probe", {}).get(f.label)
                        m = measure(link, running, others, f, mode, plan, place, net=net,
                                    client_env=client_env if net == "https" else None, probe=probe)
                        if net == "https" and len(session["tls_negotiated"]) != 1:
                            m["correct"] = False        # the servers did not negotiate the same parameters
                        # "keepalive+log": a cell of its own, never mistaken for one without the log
                        m.update(server=name, workers=w, net=net, mode=mode + ("+log" if plan.access_log else ""),
                                 size=f.size, label=f.label, rep=rep)
                        runs.append(m)
                        log(f"w={w} {net} {mode:9s} {f.label:>5s} rep {rep} {name:9s} {m['rps']:10.0f} req/s "
                            f"{m['gbps']:6.2f} Gbit/s  server cpu {100 * m['cpu']['server_busy_share']:5.1f}% "
                            f"{m['cpu']['us_per_req_core'] or 0:7.1f} us/req  p99 "
                            f"{_ms(m['latency_us']['percentiles']['99'])} ms  "
                            f"non2xx {m['non2xx']} sockerr {m['socket_errors']}"
                            + (f"  log {m['access_log']['lines']}/{m['access_log']['responses']} lines"
                               if "access_log" in m else "")
                            + ("" if m["correct"] else "  INCORRECT"))
    # Counters exist only after stop (the ExitStack above).
    for name, (_, running) in live.items():
        if running.counters is not None:
            session["servers"][name]["counters"] = running.counters
    return session


def derive_cpu(run: dict, shared: bool) -> None:
    """(Re)compute the derived CPU figures of a run from its measured ones,
    so `render` can apply the current definitions to an older results.json."""
    c, rps = run["cpu"], run["rps"]
    c["attributed_cores"] = c["proc_cores"] + (0.0 if shared else c.get("ksoftirqd_cores", 0.0))
    c["foreign_cores"] = None if shared else max(0.0, c["server_cores_busy"] - c["attributed_cores"])
    c["us_per_req"] = c["attributed_cores"] * 1e6 / rps if rps else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _div(x, d):
    return None if x is None else x / d


def summarize(runs: list[dict]) -> list[dict]:
    """Medians per (workers, mode, size, server); appliance/nginx ratios per repetition pair."""
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in runs:
        cells.setdefault((r.get("net", "ipv4"), r["workers"], r["mode"], r["size"], r["label"]), {}) \
            .setdefault(r["server"], []).append(r)
    out = []
    order = {"keepalive": 0, "close": 1, "full": 2, "resumed": 3, "keepalive+log": 4, "close+log": 5}
    nets = {"ipv4": 0, "ipv6": 1, "https": 2}
    for (net, w, mode, size, label), by_server in sorted(
            cells.items(), key=lambda kv: (nets.get(kv[0][0], 9), kv[0][1], order.get(kv[0][2], 9), kv[0][3])):
        row = {"workers": w, "mode": mode, "size": size, "label": label, "net": net}
        for name, rs in by_server.items():
            row[name] = {
                "reps": len(rs),
                "rps": _median([r["rps"] for r in rs]),
                "gbps": _median([r["gbps"] for r in rs]),
                "server_busy_share": _median([r["cpu"]["server_busy_share"] for r in rs]),
                "proc_cores": _median([r["cpu"]["proc_cores"] for r in rs]),
                "us_per_req": _median([r["cpu"]["us_per_req"] for r in rs]),
                # requests/s per server core actually used (process + its softirq): 1e6 / µs per request
                "rps_per_core": _median([1e6 / r["cpu"]["us_per_req"] if r["cpu"]["us_per_req"] else None
                                         for r in rs]),
                "us_per_req_core": _median([r["cpu"]["us_per_req_core"] for r in rs]),
                "foreign_cores": _median([r["cpu"]["foreign_cores"] for r in rs]),
                "us_per_req_proc": _median([r["cpu"]["us_per_req_proc"] for r in rs]),
                "us_per_req_machine": _median([r["cpu"]["us_per_req_machine"] for r in rs]),
                "p50_ms": _median([_div(r["latency_us"]["percentiles"]["50"], 1000) for r in rs]),
                "p99_ms": _median([_div(r["latency_us"]["percentiles"]["99"], 1000) for r in rs]),
                "non2xx": sum(r["non2xx"] for r in rs),
                "socket_errors": sum(r["socket_errors"] for r in rs),
                "correct": all(r["correct"] for r in rs),
            }
            if any("access_log" in r for r in rs):
                row[name]["access_log_ok"] = all(r.get("access_log", {}).get("ok", False) for r in rs)
        if "nginx" in by_server and "appliance" in by_server:
            pairs = list(zip(sorted(by_server["appliance"], key=lambda r: r["rep"]),
                             sorted(by_server["nginx"], key=lambda r: r["rep"])))
            ratios = [a["rps"] / n["rps"] if n["rps"] else None for a, n in pairs]
            cpu_ratios = [a["cpu"]["us_per_req"] / n["cpu"]["us_per_req"]
                          if a["cpu"]["us_per_req"] and n["cpu"]["us_per_req"] else None for a, n in pairs]
            per_core = [(1 / a["cpu"]["us_per_req"]) / (1 / n["cpu"]["us_per_req"])
                        if a["cpu"]["us_per_req"] and n["cpu"]["us_per_req"] else None for a, n in pairs]
            row["ratio_rps_per_core"] = per_core
            row["ratio_rps_per_core_median"] = _median(per_core)
            row["ratio_rps"] = ratios
            row["ratio_rps_median"] = _median(ratios)
            row["ratio_cpu_per_req"] = cpu_ratios
            row["ratio_cpu_per_req_median"] = _median(cpu_ratios)
        out.append(row)
    return out


def environment() -> dict:
    """Versions and machine, for the JSON."""
    import platform
    from .servers import Nginx
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    virt = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True).stdout.strip() \
        if shutil_which("systemd-detect-virt") else "?"
    return {
        "cpu": model, "cpus": os.cpu_count(), "memory": mem, "virtualization": virt or "none",
        "kernel": platform.release(), "python": sys.version.split()[0],
        "nginx": Nginx().version(), "wrk": wrk.version(),
        "git": subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip(),
        # uncommitted changes under appliance/ when the run ended (the appliance runs from the tree)
        "appliance_dirty": bool(subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "appliance"],
                                               capture_output=True, text=True).stdout.strip()),
    }


def shutil_which(name: str):
    import shutil
    return shutil.which(name)
