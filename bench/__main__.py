"""`python -m bench`: the appliance against nginx, Sandstorm-style.

Theory of operation: the command builds a Plan from the options, makes a
work directory (the generated site, the store, nginx's prefix, logs),
runs the plan (bench/run.py), and writes results.json (everything: plan,
environment, every run, medians, ratios, the appliance's counters),
bench.png (bench/plot.py) and table.md (bench/report.py) into --out.
`--families 4,6` adds the plain HTTP cells over IPv6, `--tls` the HTTPS
cells (bench/run.py: one session per network; bench/stime.py for the new
connections with full and resumed handshakes).
Namespaces and processes are removed on the way out, also on Ctrl-C or
SIGTERM (turned into KeyboardInterrupt so every context manager unwinds).
`python -m bench render FILE` redraws the plot and table from a JSON;
`python -m bench profile` samples the appliance under load with py-spy;
`python -m bench fuzz` fuzzes the stack in memory (bench/fuzz.py).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile

import click

from . import report, run as runmod
from .run import derive_cpu, summarize as run_summarize
from .site import DEFAULT_SIZES, QUICK_SIZES, SizeError, parse_size

HERE = os.path.dirname(os.path.abspath(__file__))
NEEDED = ("ip", "wrk", "nginx", "curl", "taskset")


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _work_dir(prefix: str, dir: str | None = None):
    """A work directory for one benchmark command, removed on the way out; Ctrl-C
    or SIGTERM exits 130 (after every context manager inside has unwound: the
    namespaces and processes are gone), a server or wrk failure is a clear error."""
    from .servers import ServerError
    from .stime import STimeError
    from .wrk import WrkError
    workdir = tempfile.mkdtemp(prefix=prefix, dir=dir)
    try:
        yield workdir
    except KeyboardInterrupt:
        click.echo("interrupted: namespaces and processes removed", err=True)
        sys.exit(130)
    except (ServerError, WrkError, STimeError, RuntimeError) as e:
        raise click.ClickException(str(e))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _csv(ctx, param, value):
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("empty list")
    return items


def _preflight(servers, extra=()) -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the benchmark needs root (network namespaces, veth); run it as root")
    missing = [t for t in NEEDED + tuple(extra)
               if shutil.which(t) is None and not (t == "nginx" and "nginx" not in servers)]
    if missing:
        raise click.ClickException(f"missing tools: {', '.join(missing)} (apt-get install them)")


def write_outputs(results: dict, out: str) -> None:
    from . import plot
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(report.table(results))
    plot.plot(results, os.path.join(out, "bench.png"))


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="Smoke run: 1 repetition of 1 s, sizes 4k and 100k, 1 worker.")
@click.option("--sizes", callback=_csv, help=f"Comma-separated sizes [default: {','.join(DEFAULT_SIZES)}].")
@click.option("--modes", callback=_csv, help="keepalive,close [default: both].")
@click.option("--workers", "workers", callback=_csv, help="Worker counts to compare [default: 1,2; quick: 1].")
@click.option("--servers", callback=_csv, help="nginx,appliance [default: both].")
@click.option("--reps", type=click.IntRange(1, 100), help="Repetitions per cell [default: 3; quick: 1].")
@click.option("--duration", type=click.IntRange(1, 600), help="Seconds per timed pass [default: 5; quick: 1].")
@click.option("--warmup", type=click.IntRange(0, 600), help="Seconds of warm-up before each [default: 1; quick: 0].")
@click.option("--check-seconds", type=click.IntRange(0, 600),
              help="Seconds of the checking pass (status+length of every response) [default: 1].")
@click.option("--connections", "-c", type=click.IntRange(1, 20000), default=32, show_default=True,
              help="wrk connections.")
@click.option("--steer/--no-steer", default=True, show_default=True,
              help="RPS-steer each veth end's receive work to its own side's cores.")
@click.option("--store", type=click.Path(exists=True, dir_okay=False),
              help="Use this compiled store instead of compiling the bench site (it must hold the bench files).")
@click.option("--access-log", "access_log", is_flag=True,
              help="Both servers log every response (Combined Log Format) to a file on /dev/shm: nginx "
                   "buffer=64k, the appliance --access-log console; line counts are checked (cells '+log').")
@click.option("--families", callback=_csv,
              help="IP versions of the plain HTTP cells: 4, 6 or 4,6 [default: 4]. IPv6: nginx on [::]:80, "
                   "the appliance `serve --ip6 auto` (SLAAC from a dnsmasq router advertisement); 1 worker only.")
@click.option("--tls", is_flag=True,
              help="Add HTTPS cells (IPv4, port 443, one ECDSA P-256 certificate for both servers, TLS 1.3 "
                   "AES-128-GCM chosen by the client).")
@click.option("--tls-modes", callback=_csv,
              help="HTTPS cells: keepalive, close (wrk: it resumes), full, resumed (openssl s_time -new/-reuse) "
                   "[default: all four].")
@click.option("--http/--no-http", "plain", default=True, show_default=True,
              help="The plain HTTP cells (--no-http --tls: HTTPS cells only).")
@click.option("--stime-procs", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Parallel openssl s_time clients in the full/resumed HTTPS cells.")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory [default: bench/results/DATE].")
@click.pass_context
def main(ctx, quick, sizes, modes, workers, servers, reps, duration, warmup, check_seconds, connections, steer,
         store, access_log, families, tls, tls_modes, plain, stime_procs, out):
    """Benchmark the Haboob appliance against a tuned nginx, each in a network
    namespace joined by veth to a client namespace running wrk."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        size_list = [parse_size(s)[1] for s in (sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))]
    except SizeError as e:
        raise click.BadParameter(str(e), param_hint="--sizes")
    modes = modes or ["keepalive", "close"]
    bad = [m for m in modes if m not in ("keepalive", "close")]
    if bad:
        raise click.BadParameter(f"unknown mode(s) {bad}: use keepalive, close", param_hint="--modes")
    servers = servers or ["nginx", "appliance"]
    from .servers import SERVERS, Appliance
    bad = [s for s in servers if s not in SERVERS]
    if bad:
        raise click.BadParameter(f"unknown server(s) {bad}: use {', '.join(SERVERS)}", param_hint="--servers")
    try:
        worker_list = [int(w) for w in (workers or (["1"] if quick else ["1", "2"]))]
    except ValueError:
        raise click.BadParameter(f"not integers: {workers}", param_hint="--workers")
    if any(w < 1 or w > (os.cpu_count() or 1) for w in worker_list):
        raise click.BadParameter(f"worker counts must be 1..{os.cpu_count()}", param_hint="--workers")
    families = families or ["4"]
    bad = [f for f in families if f not in ("4", "6")]
    if bad:
        raise click.BadParameter(f"unknown IP version(s) {bad}: use 4, 6", param_hint="--families")
    tls_modes = tls_modes or list(runmod.TLS_MODES)
    bad = [m for m in tls_modes if m not in runmod.TLS_MODES]
    if bad:
        raise click.BadParameter(f"unknown HTTPS mode(s) {bad}: use {', '.join(runmod.TLS_MODES)}",
                                 param_hint="--tls-modes")
    nets = ([f"ipv{f}" for f in ("4", "6") if f in families] if plain else []) + (["https"] if tls else [])
    if not nets:
        raise click.BadParameter("nothing to measure: --no-http without --tls", param_hint="--no-http")
    if "ipv6" in nets and "appliance" in servers and worker_list != [1]:
        raise click.BadParameter("IPv6 cells need --workers 1 (the appliance's IPv6 runs in one worker)",
                                 param_hint="--families")
    if access_log and tls:
        raise click.BadParameter("--access-log is for the plain HTTP cells only", param_hint="--tls")
    plan = runmod.Plan(sizes=size_list, modes=modes, workers=worker_list, servers=servers,
                       reps=reps or (1 if quick else 3), duration=duration or (1 if quick else 5),
                       warmup=warmup if warmup is not None else (0 if quick else 1),
                       check=check_seconds if check_seconds is not None else 1,
                       connections=connections, steer=steer, access_log=access_log, nets=nets,
                       tls_modes=tls_modes, stime_procs=stime_procs)
    _preflight(servers, (["dnsmasq"] if "ipv6" in nets else []) + (["openssl"] if tls else []))
    now = datetime.datetime.now(datetime.timezone.utc)
    out = out or os.path.join(HERE, "results", now.strftime("%Y%m%d-%H%M%S"))
    signal.signal(signal.SIGTERM, _sigterm)
    objs = {name: (Appliance(store=store, access_log=access_log) if name == "appliance"
                   else SERVERS[name](access_log=access_log)) for name in servers}
    # The logs go to the work dir: on a tmpfs when logging, the same one for both servers.
    with _work_dir("haboob-bench-", "/dev/shm" if access_log and os.path.isdir("/dev/shm") else None) as workdir:
        results = runmod.run(plan, objs, workdir)
    results.update(date=now.strftime("%Y-%m-%d %H:%M UTC"),
                   command="python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                   environment=runmod.environment())
    write_outputs(results, out)
    click.echo(report.table(results))
    errs = report.errors_text(results)
    if errs:
        click.echo("errors counted by wrk:\n" + errs, err=True)
    click.echo(f"results: {out}/results.json, {out}/bench.png, {out}/table.md", err=True)
    unlogged = [f"{r['server']} {r['mode']} {r['label']} rep {r['rep']}: {r['access_log']['lines']} lines for "
                f"{r['access_log']['responses']} responses" for r in results["runs"]
                if "access_log" in r and not r["access_log"]["ok"]]
    if unlogged:
        raise click.ClickException("access log lines do not match the responses (a server is not logging):\n  "
                                   + "\n  ".join(unlogged))
    if not all(r["correct"] for r in results["runs"]) or not all(
            v["identical"] for s in results["sessions"] for srv in s["servers"].values() for v in srv["fetch"].values()):
        raise click.ClickException("some responses were wrong (status, length or bytes): see above")


@main.command()
@click.argument("results_json", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output directory [default: the JSON's].")
def render(results_json, out):
    """Recompute the derived figures of a results.json and redraw bench.png and table.md."""
    try:
        with open(results_json) as f:
            results = json.load(f)
        shared = {sess["workers"]: sess["placement"]["shared"] for sess in results.get("sessions", [])}
        for r in results["runs"]:
            if r["workers"] in shared:
                derive_cpu(r, shared[r["workers"]])
        results["summary"] = run_summarize(results["runs"])
    except (ValueError, KeyError) as e:
        raise click.ClickException(f"{results_json}: not a bench results file ({e})")
    out = out or os.path.dirname(os.path.abspath(results_json))
    # Writes results.json (derived figures recomputed, measurements unchanged), table.md, bench.png.
    write_outputs(results, out)
    click.echo(report.table(results))


@main.command("profile")
@click.option("--size", default="4k", show_default=True, help="File size to load the appliance with.")
@click.option("--mode", type=click.Choice(["keepalive", "close"]), default="keepalive", show_default=True)
@click.option("--seconds", type=click.IntRange(1, 600), default=10, show_default=True, help="Sampling time.")
@click.option("--rate", type=click.IntRange(1, 10000), default=200, show_default=True, help="py-spy samples/s.")
@click.option("--connections", "-c", type=click.IntRange(1, 20000), default=32, show_default=True)
@click.option("--store", type=click.Path(exists=True, dir_okay=False), help="A compiled store holding the bench files.")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory [default: bench/results/profile-DATE].")
def profile_cmd(size, mode, seconds, rate, connections, store, out):
    """Sample the appliance's hot path with py-spy under wrk load; print
    where its time goes per request (self and inclusive µs/request)."""
    from . import profile as prof
    from .servers import Appliance
    from .site import make_site
    try:
        size_b = parse_size(size)[1]
    except SizeError as e:
        raise click.BadParameter(str(e), param_hint="--size")
    _preflight(["appliance"])
    now = datetime.datetime.now(datetime.timezone.utc)
    out = out or os.path.join(HERE, "results", "profile-" + now.strftime("%Y%m%d-%H%M%S"))
    signal.signal(signal.SIGTERM, _sigterm)
    with _work_dir("haboob-profile-") as workdir:
        site_dir = os.path.join(workdir, "site")
        os.makedirs(site_dir)
        os.chmod(workdir, 0o755)
        f = make_site(site_dir, [size_b])[0]
        server = Appliance(store=store)
        server.prepare(site_dir, workdir)
        result = prof.profile(server, f, mode, seconds, out, connections=connections, rate=rate)
    result["date"] = now.strftime("%Y-%m-%d %H:%M UTC")
    text = prof.text_report(result)
    with open(os.path.join(out, "profile.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(out, "profile.md"), "w") as fh:
        fh.write(text)
    click.echo(text)
    click.echo(f"profile: {out}/profile.md, {result['raw']} (py-spy raw stacks)", err=True)


@main.command("synflood")
@click.option("--rate", type=click.IntRange(1000, 10_000_000), default=65000, show_default=True,
              help="Spoofed SYNs per second offered (the sender's reach is measured and printed).")
@click.option("--duration", type=click.IntRange(1, 600), default=3, show_default=True, help="Seconds per pass.")
@click.option("--modes", callback=_csv, help="keepalive,close [default: both].")
@click.option("--servers", callback=_csv, help="nginx,appliance [default: both].")
@click.option("--size", default="4k", show_default=True, help="Size of the file requested.")
@click.option("--store", type=click.Path(exists=True, dir_okay=False), help="A compiled store holding the bench file.")
@click.option("--replay", is_flag=True,
              help="Send each spoofed SYN again every second (a flood that mimics retransmissions).")
def synflood_cmd(rate, duration, modes, servers, size, store, replay):
    """Throughput of each server alone and under a spoofed SYN flood (bench/synflood.py):
    the ratio, next to nginx under the same flood. Not in the default run."""
    from . import synflood
    from .servers import SERVERS, Appliance
    try:
        size_b = parse_size(size)[1]
    except SizeError as e:
        raise click.BadParameter(str(e), param_hint="--size")
    modes = modes or ["keepalive", "close"]
    if [m for m in modes if m not in ("keepalive", "close")]:
        raise click.BadParameter(f"unknown mode(s) in {modes}: use keepalive, close", param_hint="--modes")
    servers = servers or ["nginx", "appliance"]
    if [s for s in servers if s not in SERVERS]:
        raise click.BadParameter(f"unknown server(s) in {servers}: use {', '.join(SERVERS)}", param_hint="--servers")
    _preflight(servers)
    signal.signal(signal.SIGTERM, _sigterm)
    objs = {name: (Appliance(store=store) if name == "appliance" else SERVERS[name]()) for name in servers}
    with _work_dir("haboob-synflood-") as workdir:
        res = synflood.run(objs, workdir, rate, duration, modes, size_b, replay)
    click.echo(synflood.table(res))
    for name, c in res["counters"].items():
        keys = ("loop_syn_shed", "ring_rx_syn_shed", "ring_kernel_syn_shed", "ring_kernel_syn_first_kept",
                "ring_kernel_syn_retransmits", "ring_kernel_syn_trusted", "ring_kernel_syn_to_main",
                "ring_rx_kernel_gates",
                "ring_rx_kernel_gate_errors", "ring_kernel_rx_drops", "ring_kernel_syn_drops",
                "ring_rx_syn_retransmits", "ring_rx_trusted_bpf_updates", "tcp_syncookies_sent",
                "tcp_syncookies_accepted", "tcp_synack_giveup", "tcp_rto")
        click.echo(f"{name} counters: " + ", ".join(f"{k} {c.get(k, 0)}" for k in keys))


@main.command("micro")
@click.option("--mode", type=click.Choice(["close", "keepalive", "both"]), default="both", show_default=True)
@click.option("--size", default="4k", show_default=True, help="Size of the file requested.")
@click.option("--requests", "-n", type=click.IntRange(100, 10_000_000), default=20000, show_default=True)
@click.option("--reps", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Repetitions; the fastest is reported (the least disturbed by the machine).")
@click.option("--profile", is_flag=True, help="Also print cProfile's table for one more run.")
@click.option("--access-log", "log", type=click.Choice(["off", "combined", "json"]), default="off",
              show_default=True, help="With the access log on (lines to /dev/null; appliance/obs).")
@click.option("--family", type=click.Choice(["4", "6"]), default="4", show_default=True,
              help="IPv4 or IPv6 (TCP over IPv6 to the stack's link-local address).")
def micro_cmd(mode, size, requests, reps, profile, log, family):
    """The stack's Python work per request, in memory: no kernel, no network,
    no root (bench/micro.py). Prints µs per request and per phase."""
    from . import micro
    try:
        size_b = parse_size(size)[1]
    except SizeError as e:
        raise click.BadParameter(str(e), param_hint="--size")
    for m in (("close", "keepalive") if mode == "both" else (mode,)):
        runs = [micro.run(m, size_b, requests, log=log, family=int(family)) for _ in range(reps)]
        best = min(runs, key=lambda r: r["us_per_req"])
        med = sorted(r["us_per_req"] for r in runs)[len(runs) // 2]
        phases = ", ".join(f"{k} {v:.2f}" for k, v in best["phases_us"].items())
        click.echo(f"{m:9s} {size}{'' if family == '4' else ' IPv6'}: {best['us_per_req']:.2f} µs/request (median of {reps}: {med:.2f}); "
                   f"per phase: {phases}")
        if profile:
            click.echo(micro.run(m, size_b, requests, profile=True, log=log, family=int(family))["profile"])


@main.command("fuzz")
@click.option("--frames", type=click.IntRange(0, 100_000_000), default=1_000_000, show_default=True,
              help="Random and mutated frames (every layer) to push.")
@click.option("--requests", type=click.IntRange(0, 10_000_000), default=100_000, show_default=True,
              help="HTTP requests (mostly mutated; long pipelines read slowly among them).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--offload", type=click.Choice(["sw", "csum", "tso"]), default="sw", show_default=True,
              help="The stack's offload mode (TSO frames are cut as the kernel would before checking).")
@click.option("--tracemalloc", "trace", is_flag=True, help="Also trace live Python memory (several times slower).")
@click.option("--idle", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="Then open this many idle connections, let the idle timeout close them, and report "
                   "memory at each point: RSS (a run without tracemalloc) and live objects (a run with it).")
@click.option("--costs", is_flag=True, help="Only measure what each table entry and a connection cost in "
                                            "live memory (the figures of docs/internals.md) and exit.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write every figure to this file.")
def fuzz_cmd(frames, requests, seed, offload, trace, idle, costs, json_out):
    """Fuzz the stack in memory (bench/fuzz.py): random and mutated frames and
    HTTP requests, every emitted frame checked (checksums, the peer's window),
    clean pipelines' bytes compared. Exits non-zero on an internal error, a bad
    frame, a wrong byte, a window violation, a table over its bound, or a
    connection left behind."""
    from . import fuzz
    if costs:
        click.echo(fuzz.costs_text(fuzz.costs()))
        return
    res = fuzz.run(frames=frames, requests=requests, seed=seed, offload=offload, trace=trace, check_bounds=True,
                   progress=lambda m: click.echo("  " + m, err=True))
    if idle:    # twice: RSS without tracemalloc (whose own tables are in RSS), live objects with it
        res["idle"] = fuzz.idle(idle, seed, trace=False)
        res["idle_traced"] = fuzz.idle(idle, seed, trace=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)
    click.echo(fuzz.text_report(res))
    bad = fuzz.failures(res)
    if bad:
        raise click.ClickException("fuzz failed: " + "; ".join(bad))


@main.command("tls-micro")
@click.option("--mode", type=click.Choice(["keepalive", "full", "resumed", "all"]), default="all", show_default=True)
@click.option("--size", default="4k", show_default=True, help="Size of the file requested.")
@click.option("--requests", "-n", type=click.IntRange(10, 1_000_000), default=1000, show_default=True)
@click.option("--reps", type=click.IntRange(1, 100), default=3, show_default=True)
def tls_micro_cmd(mode, size, requests, reps):
    """HTTPS in memory (bench/tls_micro.py): the stack's work per request over
    TLS 1.3, keep-alive or a new connection per request (full or resumed handshake)."""
    from . import tls_micro
    try:
        size_b = parse_size(size)[1]
    except SizeError as e:
        raise click.BadParameter(str(e), param_hint="--size")
    for m in (("keepalive", "full", "resumed") if mode == "all" else (mode,)):
        runs = [tls_micro.run(m, size_b, requests) for _ in range(reps)]
        best = min(runs, key=lambda r: r["us_per_req"])
        med = sorted(r["us_per_req"] for r in runs)[len(runs) // 2]
        click.echo(f"tls {m:9s} {size}: {best['us_per_req']:.2f} µs/request (median of {reps}: {med:.2f})")


if __name__ == "__main__":
    main(prog_name="python -m bench")
