"""The PNG plot, in the manner of Sandstorm's figures.

Theory of operation: one row per network and mode (IPv4 keep-alive, close,
then IPv6 and HTTPS when measured), three columns:
requests/s, Gbit/s, and server CPU per request, each against file size on
a log axis; one colour per server, solid for 1 worker, dashed for more.
Points are the medians of the repetitions; the whiskers span min..max.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"nginx": "#1f77b4", "appliance": "#d62728"}
MODE_TITLE = {"keepalive": "persistent connections (keep-alive)", "close": "a new connection per request",
              "full": "a new connection per request, full handshake (s_time)",
              "resumed": "a new connection per request, resumed handshake (s_time)"}
NET_TITLE = {"ipv4": "", "ipv6": "IPv6, ", "https": "HTTPS, "}
METRICS = (("rps", "requests/s", 1.0), ("gbps", "Gbit/s", 1.0),
           ("us_per_req", "server CPU per request (µs)", 1.0))


def _value(run: dict, key: str):
    return run["cpu"][key] if key.startswith("us_per_req") else run[key]


def plot(results: dict, path: str) -> None:
    runs = results["runs"]
    rows = [(n, m) for n in NET_TITLE for m in ("keepalive", "close", "full", "resumed", "keepalive+log", "close+log")
            if any(r["mode"] == m and r.get("net", "ipv4") == n for r in runs)]
    fig, axes = plt.subplots(len(rows), len(METRICS), figsize=(15, 4.2 * len(rows)), squeeze=False)
    for row, (net, mode) in enumerate(rows):
        for col, (key, label, _) in enumerate(METRICS):
            ax = axes[row][col]
            series = {}
            for r in runs:
                if r["mode"] == mode and r.get("net", "ipv4") == net:
                    series.setdefault((r["server"], r["workers"]), {}).setdefault(r["size"], []).append(_value(r, key))
            for (server, workers), by_size in sorted(series.items()):
                sizes = sorted(by_size)
                vals = [sorted(v for v in by_size[s] if v is not None) for s in sizes]
                keep = [(s, v) for s, v in zip(sizes, vals) if v]
                if not keep:
                    continue
                xs = [s / 1024 for s, _ in keep]
                med = [v[len(v) // 2] for _, v in keep]
                lo = [m - v[0] for m, (_, v) in zip(med, keep)]
                hi = [v[-1] - m for m, (_, v) in zip(med, keep)]
                ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3,
                            color=COLORS.get(server), linestyle="-" if workers == 1 else "--",
                            label=f"{server}, {workers} worker{'s' if workers > 1 else ''}")
            ax.set_xscale("log")
            sizes_kb = sorted({r["size"] / 1024 for r in runs})
            ax.set_xticks(sizes_kb)
            ax.set_xticklabels([f"{s:g}K" if s < 1024 else f"{s / 1024:g}M" for s in sizes_kb])
            ax.minorticks_off()
            ax.set_xlabel("file size (KB)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.grid(True, which="both", alpha=0.3)
            title = MODE_TITLE[mode.split('+')[0]] + (", resumed handshake (wrk)" if (net, mode) == ("https", "close")
                                                      else "")
            ax.set_title(f"{label}: {NET_TITLE[net]}{title}" + (", access log on" if "+log" in mode else ""),
                         fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    env = results.get("environment", {})
    fig.suptitle(f"Haboob appliance vs nginx {env.get('nginx', '')} — {results.get('date', '')}, "
                 f"{env.get('cpus', '?')} x {env.get('cpu', '?')}, kernel {env.get('kernel', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
