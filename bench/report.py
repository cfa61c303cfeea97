"""The README-ready Markdown tables of a results JSON.

Theory of operation: two tables, one line per (workers, mode, size), each
cell the median over the repetitions. Throughput: requests/s, requests/s per
server core, Gbit/s, p99 latency, and the median of the per-repetition appliance/nginx ratios.
"req/s per core" is requests/s divided by the server cores actually used
(process time plus ksoftirqd of its cores; see bench/run.py), the figure that stays
meaningful when the load generator, not the server, is the bottleneck.
CPU: the busy share of the server's cores (/proc/stat, softirq included),
CPU per request of the server (its process time, which includes the
softirq work done in its context, plus ksoftirqd of its cores; see
bench/run.py) and from the whole busy share of its cores ("core", which on
a shared machine includes other users' work), and the appliance/nginx
ratio of the server figure (below 1: the appliance spends less). Incorrect cells (a wrong status or length, non-2xx)
are flagged with ✗ in the table itself, so a fast but wrong number cannot
pass unnoticed. A run with IPv6 or HTTPS sessions has one pair of tables
per network, each under its heading (IPv4 first); the ratio columns show
the median and, with several repetitions, the range of the per-repetition
ratios.
"""
from __future__ import annotations


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def _servers(results):
    return [s for s in ("nginx", "appliance") if any(s in row for row in results["summary"])]


def _key(row):
    return [str(row["workers"]), row["mode"].replace("keepalive", "keep-alive"), row["label"].upper()]


NET_TITLES = {"ipv4": "HTTP over IPv4", "ipv6": "HTTP over IPv6",
              "https": "HTTPS (TLS 1.3, IPv4; close: wrk, resumed handshakes; full/resumed: openssl s_time)"}


def table(results: dict) -> str:
    nets = []
    for row in results["summary"]:
        if row.get("net", "ipv4") not in nets:
            nets.append(row.get("net", "ipv4"))
    if nets in ([], ["ipv4"]):
        return throughput_table(results) + "\n" + cpu_table(results)
    out = []
    for net in nets:
        part = {**results, "summary": [r for r in results["summary"] if r.get("net", "ipv4") == net]}
        out.append(f"**{NET_TITLES.get(net, net)}**\n\n" + throughput_table(part) + "\n" + cpu_table(part))
    return "\n".join(out)


def _ratio(row, key):
    """The median of the per-repetition ratios, and their range when there are several."""
    xs = [x for x in row.get(key) or [] if x is not None]
    med = _f(row.get(key + "_median"), ".2f")
    return med if len(xs) < 2 else f"{med} ({min(xs):.2f}–{max(xs):.2f})"


def throughput_table(results: dict) -> str:
    servers = _servers(results)
    head = ["workers", "mode", "size"]
    for s in servers:
        head += [f"{s} req/s", f"{s} req/s per core", f"{s} Gbit/s", f"{s} p99 ms"]
    if len(servers) == 2:
        head += ["appliance/nginx req/s", "appliance/nginx per core"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["summary"]:
        cells = _key(row)
        for s in servers:
            m = row.get(s)
            if not m:
                cells += ["–"] * 4
                continue
            flag = "" if m["correct"] else " ✗"
            cells += [_f(m["rps"], ",.0f") + flag, _f(m.get("rps_per_core"), ",.0f"), _f(m["gbps"], ".2f"),
                      _f(m["p99_ms"], ".2f")]
        if len(servers) == 2:
            cells += [_ratio(row, "ratio_rps"), _ratio(row, "ratio_rps_per_core")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cpu_table(results: dict) -> str:
    servers = _servers(results)
    head = ["workers", "mode", "size"]
    for s in servers:
        head += [f"{s} CPU busy", f"{s} µs/req", f"{s} µs/req core"]
    if len(servers) == 2:
        head += ["appliance/nginx µs/req"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["summary"]:
        cells = _key(row)
        for s in servers:
            m = row.get(s)
            if not m:
                cells += ["–"] * 3
                continue
            busy = m["server_busy_share"]
            cells += [_f(busy and 100 * busy, ".0f") + "%", _f(m["us_per_req"], ".1f"),
                      _f(m["us_per_req_core"], ".1f")]
        if len(servers) == 2:
            cells.append(_ratio(row, "ratio_cpu_per_req"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def errors_text(results: dict) -> str:
    """One line per run with errors: what wrk counted."""
    out = []
    for r in results["runs"]:
        chk = r.get("check") or {}
        if r["non2xx"] or r["socket_errors"] or not r["correct"] or chk.get("bad_status") or chk.get("bad_length"):
            out.append(f"{r['server']} w={r['workers']} {r.get('net', 'ipv4')} {r['mode']} {r['label']} rep {r['rep']}: "
                       f"non-2xx {r['non2xx']}, socket errors {r['errors']}, check {chk}")
    return "\n".join(out)
