"""The README-ready Markdown table of a results JSON.

Theory of operation: one line per (workers, mode, size) with each server's
median requests/s, Gbit/s, server CPU (busy share of the server's cores)
and CPU per request, the p99 latency, and the median of the per-repetition
appliance/nginx ratios. Incorrect cells (a wrong status or length, non-2xx)
are flagged in the table itself, so a fast but wrong number cannot pass
unnoticed.
"""
from __future__ import annotations


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def table(results: dict) -> str:
    servers = [s for s in ("nginx", "appliance") if any(s in row for row in results["summary"])]
    head = ["workers", "mode", "size"]
    for s in servers:
        head += [f"{s} req/s", f"{s} Gbit/s", f"{s} CPU", f"{s} µs/req", f"{s} p99 ms"]
    if len(servers) == 2:
        head += ["ratio req/s", "ratio µs/req"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["summary"]:
        cells = [str(row["workers"]), "keep-alive" if row["mode"] == "keepalive" else "close", row["label"].upper()]
        for s in servers:
            m = row.get(s)
            if not m:
                cells += ["–"] * 5
                continue
            flag = "" if m["correct"] else " ✗"
            cells += [_f(m["rps"], ",.0f") + flag, _f(m["gbps"], ".2f"),
                      _f(m["server_busy_share"] and 100 * m["server_busy_share"], ".0f") + "%",
                      _f(m["us_per_req_core"], ".1f"), _f(m["p99_ms"], ".2f")]
        if len(servers) == 2:
            cells += [_f(row.get("ratio_rps_median"), ".2f"), _f(row.get("ratio_cpu_per_req_median"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def errors_text(results: dict) -> str:
    """One line per run with errors: what wrk counted."""
    out = []
    for r in results["runs"]:
        chk = r.get("check") or {}
        if r["non2xx"] or r["socket_errors"] or not r["correct"] or chk.get("bad_status") or chk.get("bad_length"):
            out.append(f"{r['server']} w={r['workers']} {r['mode']} {r['label']} rep {r['rep']}: "
                       f"non-2xx {r['non2xx']}, socket errors {r['errors']}, check {chk}")
    return "\n".join(out)
